"""The `issuance` command as a subprocess, the way operators and newcomers run it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from issuance.shared.wire.messages import ClaimRequested, utcnow
from issuance.shared.wire.publisher import RabbitPublisher  # noqa: F401 - the command publishes with it

from tests.conftest import make_activity, verify_clean
from tests.e2e.conftest import claim_states, wait_for

ROOT = Path(__file__).parents[2]


def issuance(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "issuance.shared.cli", *args],
        env={**clean, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_demo_runs_embedded_with_no_servers():
    result = issuance("demo", "--claims", "400", "--embedded", "yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded mode" in result.stdout
    assert "verify: clean" in result.stdout
    assert "refused bad_phone" in result.stdout and "refused already_received" in result.stdout


def test_publish_replays_a_file_refusing_bad_lines_and_verify_reports(
    settings, service_env, start_workers, tmp_path
):
    act = make_activity(settings)
    lines = [
        json.dumps(
            {
                **ClaimRequested.EXAMPLE,
                "claim_id": str(uuid.uuid4()),
                "activity": act["slug"],
                "phone": f"+861390000{i:04d}",
                "requested_at": utcnow().isoformat(),
            }
        )
        for i in range(30)
    ]
    lines.append('{"v": 1, "claim_id": "broken"}')
    path = tmp_path / "claims.jsonl"
    path.write_text("\n".join(lines) + "\n")
    start_workers(queues=["claims", "credits"])
    result = issuance("publish", "claim-requested", "--file", str(path), env=service_env)
    assert result.returncode == 1, "a refused line makes the replay exit non-zero"
    assert "published 30 claim-requested messages; refused 1 lines" in result.stdout
    assert "line 31: refused" in result.stderr
    wait_for(lambda: claim_states(settings).get("credited") == 30, what="the replayed claims credited")
    report = issuance("verify", "--json", env=service_env)
    assert report.returncode == 0, report.stdout + report.stderr
    counts = json.loads(report.stdout)["counts"]
    assert counts["credited"] == 30 and counts["credits"] == 30
    verify_clean(settings)


def test_verify_exits_non_zero_on_a_breach(settings, two_step, service_env, pool):
    import psycopg
    from issuance.workers.handlers import handle_claim

    from tests.conftest import claim

    act = make_activity(settings)
    handle_claim(pool, two_step, claim(act["slug"]))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        # A bound claim whose promise has run out: the one breach no constraint can stop.
        conn.execute("UPDATE claims SET deadline = now() - interval '1 minute'")
    result = issuance("verify", env=service_env)
    assert result.returncode == 1
    assert "BREACH uncredited_past_deadline: 1" in result.stdout


def _parsers(parser: argparse.ArgumentParser, path: str = "issuance") -> Iterator[tuple[str, Any]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_each_side_registers_its_commands_and_every_option_says_what_it_does():
    from issuance.shared.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {
        # the shared layer
        *("db", "channel", "activity", "codes", "coupons", "report", "verify", "schemas", "chart", "office"),
        # issuance.producers.commands, through the issuance.commands entry points
        *("publish", "web", "outbox-relay"),
        # issuance.producers.checkout.commands, its own entry point
        "checkout",
        # issuance.workers.commands, likewise
        *("worker", "dead-letters", "sweep", "sweeper", "exporter", "demo"),
    }
    silent = [
        f"{path} {action.dest}"
        for path, sub in _parsers(parser)
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction) and not action.help
    ]
    assert not silent, f"options without help: {silent}"
    assert "``" not in (parser.description or ""), "the top-level help is plain text"
