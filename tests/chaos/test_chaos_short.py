"""The short chaos run of CI: every fault type at least once against the real
pipeline on private services; nothing lost, nothing doubled, verify clean.

The seed is random and printed; replay a failure with
``CHAOS_SEED=<seed> pytest tests/chaos`` or ``make chaos CHAOS_SEED=<seed>``.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.chaos.run import FAULT_TYPES, REFUSED_QUEUES, TRAFFIC_KINDS, ChaosRun, render


@pytest.mark.timeout(900)
def test_short_chaos_run_loses_nothing_and_doubles_nothing():
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    lines: list[str] = []
    run = ChaosRun(seed, "short", log=lines.append)
    result = run.run()
    r = result.report
    text = "\n".join([*lines, render(result)])
    print(text)
    assert set(r["faults_by_type"]) == set(FAULT_TYPES), text
    assert r["crash_points_fired"] == {
        "crash_after_commit_before_ack": 1,
        "crash_after_commit_before_publish": 1,
    }, text
    assert r["messages"]["envelopes_confirmed"] >= r["messages"]["envelopes_injected"] > 1000, text
    assert r["lost"]["total"] == 0, text
    assert r["duplicate_effects"]["total"] == 0, text
    assert r["verify"]["clean"] and r["verify"]["cli_exit"] == 0, text
    assert all(f["recovery_s"] is not None for f in r["faults"]), text
    # Each fault of the matrix did what it says.
    by_kind: dict[str, list[dict]] = {}
    for f in r["faults"]:
        by_kind.setdefault(f["kind"], []).append(f)
    assert {f["target"] for f in by_kind["publish_refused"]} == set(REFUSED_QUEUES), text
    assert all(f["evidence"]["claims_sent_during_fault"] > 0 for k in TRAFFIC_KINDS for f in by_kind[k]), text
    for f in by_kind["publish_refused"]:
        if f["target"].endswith(".DQ"):  # retry copies were refused, and their deliveries kept
            assert f["evidence"]["deliveries_handed_back"] >= 1, text
    for f in by_kind["worker_stop_past_consumer_timeout"]:
        assert f["evidence"]["channels_closed_by_consumer_timeout"] >= 1, text
    for f in by_kind["publish_conn_drop"]:
        ev = f["evidence"]
        assert ev["publishing_connections_closed"] >= 1, text
        assert ev["consuming_connections_kept"] == ev["consuming_connections_before"] > 0, text
    assert r["duplicate_deliveries_seen"] > 0, "re-sends were absorbed as duplicates\n" + text
    assert r["claim_states"].get("credited", 0) > 100 and r["claim_states"].get("refused", 0) > 0, text
    assert result.ok, text
    # Security: the workers' logs of the whole run hold no phone number in clear.
    logs = "\n".join(run.worker_logs.values())
    assert "worker process is ready" in logs.lower()
    leaked = [p for p in run.workload.phones if p in logs or p[3:] in logs]
    assert not leaked, f"{len(leaked)} numbers in clear in the worker logs, e.g. {leaked[0][:6]}..."
