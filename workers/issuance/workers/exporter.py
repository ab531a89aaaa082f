"""The campaign and promise exporter: one process that reads PostgreSQL (and
RabbitMQ's queue depths) every ``interval`` seconds and serves the figures as
Prometheus gauges on ``/metrics``.

Run it with ``issuance exporter --port 9192 --interval 30``. The promise (the
uncredited claims and the credit rate over the last ``rate_window``) is read
on every refresh from two partial indexes, in milliseconds; campaign figures,
whose cost grows with the claims of the running activities (never with the
size of the code pools), every ``campaign_interval``. Claim and binding rates
come from the difference between successive campaign readings: right after a
start they are unknown (NaN), and so are the forecasts that divide by them.

With cells, run one exporter per cell with that cell's settings and
``ISSUANCE_CELL=<name>``: every sample then carries a ``cell`` label, and a
platform figure is ``sum without (cell) (...)``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import psycopg
from issuance.shared.db.analytics import (
    REPORT_HORIZON,
    ActivityFigures,
    PromiseSnapshot,
    TemplateFigures,
    UsageFigures,
    activity_figures,
    promise_snapshot,
    template_figures,
    usage_figures,
)
from issuance.shared.domain.claims import ClaimStatus
from issuance.shared.settings import Settings
from issuance.shared.wire.codec import QUEUES, xq_name
from issuance.shared.wire.messages import utcnow
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

INF = float("inf")
NAN = float("nan")

# name -> (type, help, labels). The only names this process exports.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "issuance_promise_uncredited_claims": ("gauge", "Claims bound and not yet credited.", ()),
    "issuance_promise_oldest_uncredited_age_seconds": (
        "gauge",
        "Age of the oldest claim bound and not yet credited (0 when there is none).",
        (),
    ),
    "issuance_promise_headroom_seconds": (
        "gauge",
        "Time left before the earliest deadline of an uncredited claim (negative once passed).",
        (),
    ),
    "issuance_promise_claims_at_risk": (
        "gauge",
        "Uncredited claims whose deadline falls within the window (1h, 6h) and has not passed.",
        ("window",),
    ),
    "issuance_promise_claims_overdue": ("gauge", "Uncredited claims past their deadline.", ()),
    "issuance_promise_held_claims": (
        "gauge",
        "Bound claims whose credit waits for the member to register (not under the promise yet).",
        (),
    ),
    "issuance_promise_credit_rate": (
        "gauge",
        "Claims credited per second over the rate window before the reading.",
        (),
    ),
    "issuance_promise_drain_forecast_seconds": (
        "gauge",
        "Uncredited claims divided by the recent credit rate: when the backlog is gone.",
        (),
    ),
    "issuance_activity_packages_budget": ("gauge", "Packages offered by the activity.", ("activity",)),
    "issuance_activity_packages_remaining": ("gauge", "Packages not yet granted.", ("activity",)),
    "issuance_activity_claims": (
        "gauge",
        "Claims decided for the activity, by status (bound, credited, refused).",
        ("activity", "status"),
    ),
    "issuance_activity_collect_ratio": ("gauge", "Packages granted / packages offered.", ("activity",)),
    "issuance_activity_usage_ratio": (
        "gauge",
        "Coupons used / coupons granted, over every template of the activity.",
        ("activity",),
    ),
    "issuance_activity_new_members": (
        "gauge",
        "Granted claims by numbers new to the platform.",
        ("activity",),
    ),
    "issuance_activity_promise_breaches": (
        "gauge",
        "Claims credited after their deadline, or uncredited past it.",
        ("activity",),
    ),
    "issuance_activity_funnel": (
        "gauge",
        "Funnel counts: shares, shares_opened, claims_requested, claims_via_share, granted, credited.",
        ("activity", "step"),
    ),
    "issuance_activity_coupon_orders": (
        "gauge",
        "Orders (placed or paid) that used a coupon of the activity.",
        ("activity",),
    ),
    "issuance_activity_discount_cents": (
        "gauge",
        "Total discount given by the activity's coupons, in minor currency units.",
        ("activity",),
    ),
    "issuance_activity_coupon_sales_cents": (
        "gauge",
        "Sales of the orders that used the activity's coupons, in minor currency units.",
        ("activity",),
    ),
    "issuance_activity_cost_effectiveness_ratio": (
        "gauge",
        "Sales of coupon orders / discount given.",
        ("activity",),
    ),
    "issuance_activity_coupon_order_value_cents": (
        "gauge",
        "Average value of an order that used a coupon, in minor currency units.",
        ("activity",),
    ),
    "issuance_activity_claim_rate": (
        "gauge",
        "Packages granted per second over the recent window.",
        ("activity",),
    ),
    "issuance_template_codes_generated": (
        "gauge",
        "Codes generated for the template.",
        ("activity", "template"),
    ),
    "issuance_template_codes_available": (
        "gauge",
        "Codes of the template still available to bind.",
        ("activity", "template"),
    ),
    "issuance_template_codes_used": (
        "gauge",
        "Codes of the template used in an order.",
        ("activity", "template"),
    ),
    "issuance_template_exhaustion_forecast_seconds": (
        "gauge",
        "Available codes divided by the recent binding rate: when the pool runs dry (+Inf at rate 0).",
        ("activity", "template"),
    ),
    "issuance_queue_messages": ("gauge", "Messages ready in the RabbitMQ queue.", ("queue",)),
    "issuance_queue_consumers": ("gauge", "Consumers attached to the RabbitMQ queue.", ("queue",)),
    "issuance_exporter_last_success_timestamp_seconds": (
        "gauge",
        "Unix time of the exporter's last complete reading.",
        (),
    ),
    "issuance_exporter_refresh_duration_seconds": ("gauge", "How long the last reading took.", ()),
    "issuance_exporter_refresh_errors": (
        "counter",
        "Readings that failed, by source (postgres, rabbitmq).",
        ("source",),
    ),
}


def exported_names() -> set[str]:
    from issuance.shared.metrics import sample_names

    names: set[str] = set()
    for name, (kind, _, _) in FAMILIES.items():
        names |= sample_names(name, kind) - {name + "_created"}
    return names


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """What one refresh read, and when it started (wall clock, for rates)."""

    at: float
    promise: PromiseSnapshot
    activities: list[ActivityFigures]
    templates: list[TemplateFigures]
    queues: dict[str, tuple[int, int]] | None
    usage: list[UsageFigures] = dataclasses.field(default_factory=list)


def _rate(history: Iterable[Reading], latest: Reading, value: Any, window: float) -> dict[Any, float]:
    """Per key: increase per second between the oldest reading within
    ``window`` and ``latest`` (keys seen in both)."""
    base = next((r for r in history if latest.at - r.at <= window and r is not latest), None)
    if base is None or latest.at <= base.at:
        return {}
    before, after = value(base), value(latest)
    return {k: max(after[k] - before[k], 0) / (latest.at - base.at) for k in after if k in before}


def _divide(amount: float, rate: float | None) -> float:
    if amount <= 0:
        return 0.0
    if rate is None:
        return NAN
    return amount / rate if rate > 0 else INF


class Exporter(Collector):
    """Reads on demand (:meth:`refresh`) and exposes the last reading."""

    def __init__(
        self,
        settings: Settings,
        *,
        rate_window: float = 900.0,
        campaign_interval: float = 0.0,
        horizon: timedelta = REPORT_HORIZON,
    ) -> None:
        self.settings = settings
        # The cell label of every sample (ISSUANCE_CELL); none without cells.
        self.cell = settings.cell.strip()
        self.rate_window = rate_window
        # The promise is read on every refresh (a few milliseconds); campaign
        # figures, whose cost grows with the claims of running activities, at
        # most this often.
        self.campaign_interval = campaign_interval
        self.horizon = horizon
        self.latest: Reading | None = None
        # Readings with fresh campaign figures, for the claim and binding rates.
        self.history: collections.deque[Reading] = collections.deque(maxlen=512)
        self.errors: collections.Counter[str] = collections.Counter()
        self.last_success = NAN
        self.last_duration = NAN
        self._lock = threading.Lock()

    def refresh(self, now: datetime | None = None) -> Reading | None:
        """Read PostgreSQL (the promise at ``now``) and RabbitMQ once."""
        started, started_at = time.monotonic(), time.time()
        now = now or utcnow()
        previous = self.history[-1] if self.history else None
        due = previous is None or started_at - previous.at >= self.campaign_interval
        try:
            with psycopg.connect(self.settings.database_url, connect_timeout=5) as conn:
                conn.execute("SET LOCAL statement_timeout = '20s'")
                promise = promise_snapshot(conn, now, timedelta(seconds=self.rate_window))
                if due or previous is None:
                    activities = activity_figures(conn, now, self.horizon)
                    templates = template_figures(conn, now, self.horizon)
                    usage = usage_figures(conn, now, self.horizon)
                else:
                    activities, templates, usage = previous.activities, previous.templates, previous.usage
        except psycopg.Error as exc:
            log.error("cannot read PostgreSQL: %s", exc)
            with self._lock:
                self.errors["postgres"] += 1
            return None
        queues = self._queues()
        reading = Reading(started_at, promise, activities, templates, queues, usage)
        with self._lock:
            self.latest = reading
            if due:
                self.history.append(reading)
            while self.history and reading.at - self.history[0].at > self.rate_window * 2:
                self.history.popleft()
            self.last_success = reading.at
            self.last_duration = time.monotonic() - started
        return reading

    def _queues(self) -> dict[str, tuple[int, int]] | None:
        import pika
        import pika.exceptions
        from issuance.shared.wire import amqp

        names = [*QUEUES, *(xq_name(q) for q in QUEUES)]
        found: dict[str, tuple[int, int]] = {}
        try:
            # The first node of the list that answers: every node reports the
            # depth of every queue of the cluster.
            connection = amqp.connect(self.settings.amqp_url, socket_timeout=5)
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.error("cannot read RabbitMQ: %s", exc)
            with self._lock:
                self.errors["rabbitmq"] += 1
            return None
        try:
            channel = connection.channel()
            for name in names:
                try:
                    method = channel.queue_declare(name, passive=True).method
                    found[name] = (int(method.message_count), int(method.consumer_count))
                except pika.exceptions.ChannelClosedByBroker:
                    channel = connection.channel()  # the queue does not exist (yet)
        finally:
            connection.close()
        return found

    # -- exposition ---------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            history = list(self.history)
            latest = self.latest
            errors = dict(self.errors)
            last_success, last_duration = self.last_success, self.last_duration
        families = {
            name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name.removesuffix("_total"), text, labels=list(labels)
            )
            for name, (kind, text, labels) in FAMILIES.items()
        }
        meta = families["issuance_exporter_last_success_timestamp_seconds"]
        meta.add_metric([], last_success)
        families["issuance_exporter_refresh_duration_seconds"].add_metric([], last_duration)
        for source in ("postgres", "rabbitmq"):
            families["issuance_exporter_refresh_errors"].add_metric([source], errors.get(source, 0))
        if latest is not None and history:
            self._add_reading(families, latest, history)
        for family in families.values():
            if self.cell:
                family.samples = [s._replace(labels={**s.labels, "cell": self.cell}) for s in family.samples]
            yield family

    def _add_reading(self, families: Mapping[str, Any], latest: Reading, history: list[Reading]) -> None:
        window = self.rate_window

        def granted(r: Reading) -> dict[str, float]:
            return {a.slug: a.granted for a in r.activities}

        def taken(r: Reading) -> dict[tuple[str, str], float]:
            return {(t.activity, t.prefix): t.taken for t in r.templates}

        claim_rates = _rate(history, history[-1], granted, window)
        take_rates = _rate(history, history[-1], taken, window)

        p = latest.promise
        families["issuance_promise_uncredited_claims"].add_metric([], p.uncredited)
        families["issuance_promise_oldest_uncredited_age_seconds"].add_metric([], p.oldest_age_seconds)
        families["issuance_promise_headroom_seconds"].add_metric([], p.headroom_seconds)
        families["issuance_promise_claims_at_risk"].add_metric(["1h"], p.at_risk_1h)
        families["issuance_promise_claims_at_risk"].add_metric(["6h"], p.at_risk_6h)
        families["issuance_promise_claims_overdue"].add_metric([], p.overdue)
        families["issuance_promise_held_claims"].add_metric([], p.held)
        families["issuance_promise_credit_rate"].add_metric([], p.credit_rate)
        families["issuance_promise_drain_forecast_seconds"].add_metric(
            [], _divide(p.uncredited, p.credit_rate)
        )

        used_by_activity: collections.Counter[str] = collections.Counter()
        taken_by_activity: collections.Counter[str] = collections.Counter()
        for t in latest.templates:
            labels = [t.activity, t.prefix]
            families["issuance_template_codes_generated"].add_metric(labels, t.generated)
            families["issuance_template_codes_available"].add_metric(labels, t.available)
            families["issuance_template_codes_used"].add_metric(labels, t.used)
            families["issuance_template_exhaustion_forecast_seconds"].add_metric(
                labels, _divide(t.available, take_rates.get((t.activity, t.prefix)))
            )
            used_by_activity[t.activity] += t.used
            taken_by_activity[t.activity] += t.taken

        for a in latest.activities:
            labels = [a.slug]
            families["issuance_activity_packages_budget"].add_metric(labels, a.budget)
            families["issuance_activity_packages_remaining"].add_metric(labels, max(a.budget - a.granted, 0))
            for status, value in (
                (ClaimStatus.BOUND, a.uncredited),
                (ClaimStatus.CREDITED, a.credited),
                (ClaimStatus.REFUSED, a.refused),
            ):
                families["issuance_activity_claims"].add_metric([a.slug, status.value], value)
            families["issuance_activity_collect_ratio"].add_metric(
                labels, a.granted / a.budget if a.budget else NAN
            )
            taken_codes = taken_by_activity[a.slug]
            families["issuance_activity_usage_ratio"].add_metric(
                labels, used_by_activity[a.slug] / taken_codes if taken_codes else NAN
            )
            families["issuance_activity_new_members"].add_metric(labels, a.new_members)
            families["issuance_activity_promise_breaches"].add_metric(labels, a.breaches)
            for step, value in (
                ("shares", a.shares),
                ("shares_opened", a.shares_opened),
                ("claims_requested", a.claims),
                ("claims_via_share", a.via_share),
                ("granted", a.granted),
                ("credited", a.credited),
            ):
                families["issuance_activity_funnel"].add_metric([a.slug, step], value)
            families["issuance_activity_claim_rate"].add_metric(labels, claim_rates.get(a.slug, NAN))

        usage = {u.slug: u for u in latest.usage}
        for a in latest.activities:
            u = usage.get(a.slug, UsageFigures(slug=a.slug, orders=0, discount_cents=0, sales_cents=0))
            labels = [a.slug]
            families["issuance_activity_coupon_orders"].add_metric(labels, u.orders)
            families["issuance_activity_discount_cents"].add_metric(labels, u.discount_cents)
            families["issuance_activity_coupon_sales_cents"].add_metric(labels, u.sales_cents)
            families["issuance_activity_cost_effectiveness_ratio"].add_metric(
                labels, u.sales_cents / u.discount_cents if u.discount_cents else NAN
            )
            families["issuance_activity_coupon_order_value_cents"].add_metric(
                labels, u.sales_cents / u.orders if u.orders else NAN
            )

        for queue, (messages, consumers) in (latest.queues or {}).items():
            families["issuance_queue_messages"].add_metric([queue], messages)
            families["issuance_queue_consumers"].add_metric([queue], consumers)


def registry_for(exporter: Exporter) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    return registry


def run_exporter(
    settings: Settings,
    *,
    port: int,
    interval: float,
    campaign_interval: float | None = None,
    now: datetime | None = None,
    passes: int | None = None,
) -> None:
    """Serve ``/metrics`` on ``port`` and read every ``interval`` seconds.
    With ``now`` the promise is evaluated at that instant plus the time
    elapsed since start (an operator's what-if)."""
    campaign_interval = max(interval * 2, 60.0) if campaign_interval is None else campaign_interval
    # A passive declare of a queue nobody declared yet is answered with a
    # channel close that pika logs as a warning on every reading.
    logging.getLogger("pika.channel").setLevel(logging.ERROR)
    exporter = Exporter(settings, rate_window=max(900.0, interval * 4), campaign_interval=campaign_interval)
    start_http_server(port, addr=settings.metrics_bind, registry=registry_for(exporter))
    import setproctitle

    setproctitle.setproctitle(f"issuance exporter :{port}")
    log.info("exporter serving on :%d/metrics, reading every %.0fs", port, interval)
    offset = (now - utcnow()) if now is not None else timedelta(0)
    done = 0
    while passes is None or done < passes:
        started = time.monotonic()
        exporter.refresh(utcnow() + offset)
        done += 1
        time.sleep(max(interval - (time.monotonic() - started), 0))
