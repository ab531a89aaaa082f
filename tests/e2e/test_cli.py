"""The `issuance` command as a subprocess, the way operators and newcomers run it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from issuance.shared.wire.messages import ClaimRequested, utcnow
from issuance.shared.wire.publisher import RabbitPublisher  # noqa: F401 - the command publishes with it

from tests.conftest import make_activity, take_all, verify_clean
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
    # Nothing but the demo's story: no warning, no log line, no library chatter.
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("embedded mode: ")
    assert re.fullmatch(r"published \d+ messages: 400 claims, re-sends, orders and share opens", lines[1])
    assert re.fullmatch(r"handled in \d+\.\ds", lines[2])
    assert lines[3] == "" and lines[-2] == ""
    assert lines[-1].startswith("verify: clean")
    # One column per activity, so that granted never reads against the wrong budget.
    header, *rows = lines[4:-2]
    slug, similar = header.split()
    assert similar == f"{slug}-similar"
    table = {row.rsplit(maxsplit=2)[0].strip(): [int(v) for v in row.split()[-2:]] for row in rows}
    assert list(table)[:4] == ["claims", "budget (packages)", "granted", "credited"]
    assert {"refused: bad phone", "refused: already received"} <= set(table)
    assert all(label.startswith("refused: ") for label in list(table)[4:])
    for column in (0, 1):
        granted, budget = table["granted"][column], table["budget (packages)"][column]
        assert granted <= budget and table["credited"][column] == granted
        refused = sum(v[column] for label, v in table.items() if label.startswith("refused: "))
        assert granted + refused == table["claims"][column]
    assert len(lines) <= 16, result.stdout


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
        "cells",
        "phone-keys",
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


def test_sweep_is_one_pass_and_only_the_sweeper_has_an_interval():
    from issuance.shared.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sweeper", "--interval", "5"]).interval == 5
    try:
        parser.parse_args(["sweep", "--interval", "5"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("sweep accepted --interval")


def test_a_long_command_says_it_is_working_and_when_it_is_done(capsys, monkeypatch):
    import time

    from issuance.shared import cli

    monkeypatch.setattr(cli, "PROGRESS_AFTER_SECONDS", 0.1)
    args = argparse.Namespace(command="activity", sub="create")
    with cli.progress_note(args, terminal=True):
        time.sleep(0.4)
    with cli.progress_note(argparse.Namespace(command="verify"), terminal=True):
        pass
    with cli.progress_note(argparse.Namespace(command="worker", quiet=True), terminal=True):
        time.sleep(0.3)
    with cli.progress_note(args, terminal=False):  # a pipe: the command's output is the record
        time.sleep(0.3)
    try:
        with cli.progress_note(args, terminal=True):
            time.sleep(0.3)
            raise ValueError("refused")
    except ValueError:
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "activity create: working..."
    assert re.fullmatch(r"activity create: done in 0\.\ds", err[1])
    assert err[2:] == ["activity create: working..."], "quick, quiet, piped: nothing; a failure: no done line"


def test_the_outbox_relay_says_when_it_starts_and_what_it_published(settings, service_env):
    import signal
    import time

    import psycopg
    from issuance.producers import outbox
    from issuance.shared.wire.messages import OrderPlaced

    with psycopg.connect(settings.database_url) as conn:
        outbox.install(conn)
        with conn.transaction():
            conn.execute("DELETE FROM issuance_outbox")
            for n in range(3):
                outbox.add(
                    conn,
                    OrderPlaced(
                        order_id=f"SO-R{n}", member_id=1000 + n, amount_cents=100, placed_at=utcnow()
                    ),
                )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    relay = subprocess.Popen(
        [sys.executable, "-m", "issuance.shared.cli", "outbox-relay", "--batch", "2"],
        env={**clean, **service_env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            wait_for(
                lambda: not conn.execute("SELECT 1 FROM issuance_outbox WHERE sent_at IS NULL").fetchone(),
                what="the relay to publish the outbox",
            )
        time.sleep(0.5)
    finally:
        relay.send_signal(signal.SIGTERM)
        out, err = relay.communicate(timeout=30)
        # The three orders were published to the session's vhost: take them
        # off, or the next test's workers would record them as their own.
        published = take_all(settings, "orders")
    assert len(published) == 3
    assert relay.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "outbox relay: publishing issuance_outbox in batches of 2; Ctrl-C stops"
    assert re.fullmatch(r"outbox relay: published 3 rows in \d+\.\ds", lines[1]), out
    assert len(lines) == 2 and err == "", out + err


def test_the_delivery_window_is_one_rabbitmq_takes():
    from issuance.shared.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["worker", "--prefetch", "65535"]).prefetch == 65535
    assert parser.parse_args(["worker"]).prefetch is None  # twice the threads, set when it runs
    for bad in ("0", "65536", "many"):
        result = issuance("worker", "--prefetch", bad)
        assert result.returncode == 2, result.stderr
        assert "argument --prefetch" in result.stderr and "Traceback" not in result.stderr, result.stderr
