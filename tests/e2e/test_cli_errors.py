"""Every mistake an operator can make at the `issuance` command prints one
line, ``error: ...``, and exits non-zero; a bug keeps its traceback.

The command runs as the installed script, the way an operator runs it, with
ISSUANCE_* variables pointing at the test's private services or at closed
ports (127.0.0.1:1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from issuance.shared import cli
from issuance.shared.errors import BadInput, ServiceUnavailable
from issuance.shared.settings import Settings

from tests.conftest import claim, make_activity

ROOT = Path(__file__).parents[2]
ISSUANCE = Path(sys.executable).parent / "issuance"  # .venv/bin/issuance
CLOSED = "127.0.0.1:1"


def issuance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    return subprocess.run(
        [str(ISSUANCE), *args],
        env={**clean, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The single stderr line of a refused command, with its exit status."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert result.returncode == status, (result.returncode, result.stderr)
    return lines[0]


# Files ------------------------------------------------------------------------


def test_a_missing_file(tmp_path):
    missing = tmp_path / "spring.yaml"
    line = one_error_line(issuance("activity", "create", "--file", str(missing)))
    assert line == f"error: {missing}: No such file or directory"
    line = one_error_line(issuance("publish", "claim-requested", "--file", str(missing)))
    assert line == f"error: {missing}: No such file or directory"


def test_a_file_that_cannot_be_read_or_written(tmp_path):
    line = one_error_line(issuance("publish", "claim-requested", "--file", str(tmp_path)))
    assert line == f"error: {tmp_path}: Is a directory"
    out = tmp_path / "no-such-dir" / "batch.csv"
    line = one_error_line(issuance("codes", "export", "--batch", "1", "--out", str(out)))
    assert line == f"error: cannot write {out}: No such file or directory"


def test_a_file_with_a_bad_value(tmp_path):
    spec = tmp_path / "spring.yaml"
    spec.write_text("slug: spring\nbudget: lots\n")
    line = one_error_line(issuance("activity", "create", "--file", str(spec)))
    assert "budget must be a whole number, got 'lots'" in line


# Values and names ---------------------------------------------------------------


def test_a_bad_value(settings, service_env):
    act = make_activity(settings)
    for change, says in (
        ("budget=abc", "budget must be a whole number, got 'abc'"),
        ("online=maybe", "online must be true or false, got 'maybe'"),
        ("starts_at=yesterday", "Invalid isoformat string: 'yesterday'"),
        ("budget", "--set takes FIELD=VALUE, got 'budget'"),
        ("colour=red", "unknown activity fields: colour"),
    ):
        line = one_error_line(issuance("activity", "edit", act["slug"], "--set", change, env=service_env))
        assert says in line
    line = one_error_line(issuance("activity", "edit", act["slug"], "--templates", "[{", env=service_env))
    assert line.startswith("error: --templates is not a JSON list")


def test_an_unknown_name(settings, service_env):
    for args, says in (
        (("activity", "show", "no-such"), "no activity 'no-such'"),
        (("activity", "edit", "no-such", "--set", "budget=5"), "no activity 'no-such'"),
        (
            ("codes", "generate", "--template", "NOPE", "--count", "1"),
            "no coupon template with prefix 'NOPE'",
        ),
        (("codes", "export", "--batch", "999999"), "no code batch 999999"),
        (("report", "--activity", "no-such"), "no activity 'no-such'"),
        (("report", "--channel", "no-such"), "no activity on channel 'no-such'"),
    ):
        assert one_error_line(issuance(*args, env=service_env)) == f"error: {says}"


# Services -----------------------------------------------------------------------


def test_the_database_down_or_refusing(service_env):
    for url in (f"postgresql://postgres@{CLOSED}/issuance", "postgresql://no_such_role@127.0.0.1:5432/nodb"):
        env = {**service_env, "ISSUANCE_DATABASE_URL": url}
        for args in (("verify",), ("activity", "list"), ("dead-letters", "list")):
            line = one_error_line(issuance(*args, env=env), status=3)
            assert line.startswith(f"error: PostgreSQL ({url}): connection failed:"), line


def test_rabbitmq_down(service_env, tmp_path):
    from issuance.shared.wire.messages import ClaimRequested

    lines = tmp_path / "claims.jsonl"
    lines.write_text(json.dumps(ClaimRequested.EXAMPLE) + "\n")
    env = {**service_env, "ISSUANCE_AMQP_URL": f"amqp://guest:s3cret@{CLOSED}/%2F"}
    line = one_error_line(issuance("publish", "claim-requested", "--file", str(lines), env=env), status=3)
    assert line.startswith(f"error: RabbitMQ (amqp://guest:***@{CLOSED}/%2F): cannot connect to RabbitMQ")
    assert "s3cret" not in line
    line = one_error_line(issuance("dead-letters", "drain", env=env), status=3)
    assert line.startswith(f"error: RabbitMQ (amqp://guest:***@{CLOSED}/%2F)")


def test_redis_down_slows_the_sweep_but_does_not_stop_it(settings, two_step, service_env, pool):
    """Redis is a cache for every command (the sweep remembers there what it
    re-sent): with Redis down the command says so once and does its work."""
    from issuance.workers.handlers import handle_claim

    act = make_activity(settings)
    handle_claim(pool, two_step, claim(act["slug"]))  # bound, not credited: the sweep asks Redis
    env = {**service_env, "ISSUANCE_REDIS_URL": f"redis://{CLOSED}/0"}
    result = issuance("sweep", "--grace", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    redis_lines = [line for line in result.stderr.splitlines() if "Redis" in line]
    assert (
        len(redis_lines) == 1 and "Redis unavailable (Error 111 connecting to 127.0.0.1:1" in redis_lines[0]
    )
    assert "re-sent: 1" in result.stdout


# Configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("DATABASE_URL", "nonsense", "ISSUANCE_DATABASE_URL must start with postgresql://, postgres://"),
        ("DATABASE_URL", "postgresql://127.0.0.1:port/x", "ISSUANCE_DATABASE_URL is not a valid URL"),
        ("AMQP_URL", "amqp://guest:pw@h:abc/", "ISSUANCE_AMQP_URL is not a valid URL"),
        ("AMQP_URL", "127.0.0.1:5672", "ISSUANCE_AMQP_URL must start with amqp://, amqps://"),
        ("REDIS_URL", "http://u:pw@h/", "ISSUANCE_REDIS_URL must start with redis://"),
        ("MAX_RETRIES", "many", "ISSUANCE_MAX_RETRIES must be an integer, got 'many'"),
        ("SIGNING_KEYS", "k1", "ISSUANCE_SIGNING_KEYS: expected kid:secret"),
    ],
)
def test_a_malformed_setting(name, value, says, tmp_path):
    from issuance.shared.wire.messages import ClaimRequested

    lines = tmp_path / "claims.jsonl"
    lines.write_text(json.dumps(ClaimRequested.EXAMPLE) + "\n")
    result = issuance("publish", "claim-requested", "--file", str(lines), env={f"ISSUANCE_{name}": value})
    line = one_error_line(result)
    assert says in line
    assert ":pw@" not in line, "a password never reaches the terminal"


# Bugs ---------------------------------------------------------------------------


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("a bug"), TypeError("a bug")])
def test_a_programming_error_keeps_its_traceback(bug, monkeypatch):
    def broken(args: argparse.Namespace, settings: Settings) -> int:
        raise bug

    monkeypatch.setattr(cli, "cmd_schemas", broken)
    with pytest.raises(type(bug), match="a bug"):
        cli.main(["schemas"])


def test_operator_errors_are_told_from_bugs():
    assert cli.operator_error(ValueError("x")) is None
    assert cli.operator_error(KeyError("x")) is None
    assert (
        cli.operator_error(ConnectionRefusedError(111, "refused")) is None
    )  # no service named: a traceback says more
    assert isinstance(cli.operator_error(FileNotFoundError(2, "No such file", "f.yaml")), BadInput)
    import psycopg
    import redis
    import sqlalchemy.exc

    problem = cli.operator_error(redis.ConnectionError("Error 111 connecting"), Settings())
    assert isinstance(problem, ServiceUnavailable)
    assert str(problem) == "Redis (redis://127.0.0.1:6379/0): Error 111 connecting"
    import dramatiq.errors

    problem = cli.operator_error(dramatiq.errors.ConnectionFailed("refused"), Settings())
    assert isinstance(problem, ServiceUnavailable)
    assert str(problem) == "RabbitMQ (amqp://guest:***@127.0.0.1:5672/%2F): refused"
    wrapped = sqlalchemy.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("down"))
    problem = cli.operator_error(wrapped, Settings(database_url="postgresql://u:pw@db:5432/x"))
    assert isinstance(problem, ServiceUnavailable) and problem.exit_status == 3
    assert str(problem) == "PostgreSQL (postgresql://u:***@db:5432/x): down"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgresql:///x?host=/run/pg&password=pw", "postgresql:///x?host=/run/pg&password=***"),
        ("redis://:pw@cache/0", "redis://:***@cache/0"),
        ("amqp://guest@mq/%2F", "amqp://guest@mq/%2F"),
    ],
)
def test_passwords_never_reach_the_terminal(url, shown):
    assert cli.redact(url) == shown
