"""PNG charts people look at: claims, credits and the backlog over time, and
claim-to-credit latency percentiles against the promise, for one activity or
for every claim of a time window (a benchmark run).

``issuance chart --activity SLUG --out chart.png`` (or ``--since/--until``).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg import Connection

Conn = Connection[Any]

SPAN = """
SELECT min(requested_at), max(greatest(requested_at, coalesce(credited_at, requested_at)))
  FROM claims
 WHERE status <> 'refused' AND {where}
"""

CLAIMED = """
SELECT date_bin(%(bucket)s, requested_at, %(origin)s) AS t, count(*)
  FROM claims
 WHERE status <> 'refused' AND {where}
 GROUP BY t ORDER BY t
"""

CREDITED = """
SELECT date_bin(%(bucket)s, credited_at, %(origin)s) AS t, count(*),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM credited_at - requested_at))
  FROM claims
 WHERE status = 'credited' AND {where}
 GROUP BY t ORDER BY t
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Series:
    title: str
    times: list[datetime]
    claimed: list[int]  # cumulative
    credited: list[int]  # cumulative
    backlog: list[int]
    latency_times: list[datetime]
    p50: list[float]
    p95: list[float]
    p99: list[float]


def load_series(
    conn: Conn,
    *,
    activity: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    buckets: int = 120,
) -> Series:
    """Bucketed counts and latency percentiles of the claims of ``activity``
    and/or of the window [since, until)."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if activity is not None:
        clauses.append("activity_slug = %(activity)s")
        params["activity"] = activity
    if since is not None:
        clauses.append("requested_at >= %(since)s")
        params["since"] = since
    if until is not None:
        clauses.append("requested_at < %(until)s")
        params["until"] = until
    where = " AND ".join(clauses) or "true"
    start, end = conn.execute(SPAN.format(where=where), params).fetchone() or (None, None)
    title = f"activity {activity}" if activity else "claims"
    if since or until:
        title += f" {since or ''} to {until or ''}"
    if start is None:
        return Series(
            title=title,
            times=[],
            claimed=[],
            credited=[],
            backlog=[],
            latency_times=[],
            p50=[],
            p95=[],
            p99=[],
        )
    bucket = timedelta(milliseconds=max(round((end - start).total_seconds() * 1000 / buckets), 1))
    query = {**params, "bucket": bucket, "origin": start}
    claimed = dict(conn.execute(CLAIMED.format(where=where), query).fetchall())
    credited_rows = conn.execute(CREDITED.format(where=where), query).fetchall()
    credited = {t: n for t, n, _ in credited_rows}
    times = sorted(set(claimed) | set(credited))
    cum_claimed, cum_credited, total_c, total_k = [], [], 0, 0
    for t in times:
        total_c += claimed.get(t, 0)
        total_k += credited.get(t, 0)
        cum_claimed.append(total_c)
        cum_credited.append(total_k)
    return Series(
        title=title,
        times=times,
        claimed=cum_claimed,
        credited=cum_credited,
        backlog=[c - k for c, k in zip(cum_claimed, cum_credited, strict=True)],
        latency_times=[t for t, _, _ in credited_rows],
        p50=[float(p[0]) for _, _, p in credited_rows],
        p95=[float(p[1]) for _, _, p in credited_rows],
        p99=[float(p[2]) for _, _, p in credited_rows],
    )


def render(series: Series, out: str | Path, *, promise_seconds: int = 86_400) -> Path:
    """Write the two-panel PNG chart of ``series`` to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.set_title(f"Claims, credits and backlog: {series.title}")
    marker = "o" if len(series.times) < 20 else None
    top.step(series.times, series.claimed, where="post", marker=marker, label="claims granted (cumulative)")
    top.step(series.times, series.credited, where="post", marker=marker, label="claims credited (cumulative)")
    top.fill_between(
        series.times, series.backlog, step="post", alpha=0.3, color="tab:red", label="backlog (uncredited)"
    )
    if series.times:
        span = max(series.times[-1] - series.times[0], timedelta(seconds=1))
        top.set_xlim(series.times[0] - span / 20, series.times[-1] + span / 20)
    top.set_ylabel("claims")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_title("Claim-to-credit latency")
    for values, label in ((series.p50, "p50"), (series.p95, "p95"), (series.p99, "p99")):
        bottom.plot(series.latency_times, values, marker=".", label=label)
    if series.p99 and max(series.p99) > promise_seconds / 4:
        bottom.axhline(promise_seconds, color="tab:red", linestyle="--", label="promise")
    if series.p99 and max(series.p99) > 60:
        bottom.set_yscale("symlog", linthresh=1)
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("time (UTC)")
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
