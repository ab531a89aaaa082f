"""Bad input through the real consume path, with real PostgreSQL.

Every case is raw bytes as they would arrive from RabbitMQ: the codec
decodes the envelope (layer ``envelope``), the actor's wrapper
(issuance.workers.runtime.pipeline_actor) reads the payload (layer ``validation``,
dead-lettered with its reason) and calls the handler, which may refuse it on
business rules (layer ``handler``: a refused claim with its reason, an
unknown claim, an ID reused with another payload) or accept it.

Asserted: no case raises out of the consume path (no worker crash), a case
stopped at the envelope or at validation writes nothing but its dead letter,
and ``issuance verify`` is clean after all of them. The counts by category
and layer are printed (and written to ``$FUZZ_REPORT`` when set).

``FUZZ_CASES`` sets the cases per message type (CI: 300; raise it for a
longer run).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from issuance.shared.errors import TransientError
from issuance.shared.wire import codec
from issuance.shared.wire.messages import CODE, MESSAGE_TYPES, ClaimRequested

from tests.conftest import make_activity, verify_clean

CASES = int(os.environ.get("FUZZ_CASES", "300"))
SCHEMAS = Path(__file__).parents[2] / "shared" / "issuance" / "shared" / "wire" / "schemas"
TYPES = sorted(t for t in MESSAGE_TYPES if (SCHEMAS / f"{t}.v1.json").exists())
# Every message type has its schema: an empty list would skip the fuzzing silently.
assert set(TYPES) == set(MESSAGE_TYPES), f"schemas missing in {SCHEMAS}"
SNAPSHOT = """SELECT (SELECT count(*) FROM claims), (SELECT count(*) FROM shares),
  (SELECT count(*) FROM share_opens), (SELECT count(*) FROM wallet_ledger),
  (SELECT count(*) FROM codes WHERE claim_id IS NOT NULL), (SELECT count(*) FROM members),
  (SELECT count(*) FROM codes WHERE status <> 'available')"""

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
WRONG_VALUES = st.sampled_from(
    [
        None, True, -1, 0, -(10**12), 10**30, 2**63, 1.5, "", "x" * 5000, [], {}, ["a"],
        "not-a-uuid", "2026-13-45T99:99:99Z", "2026-11-11T00:00:00",
        "+0000000", "12345",
        "+1 (555) 010-9999", "+44 20 7946 0958", "+861380013800099999",
        "\u0000\u202e", "DROP TABLE claims;--",
    ]
)  # fmt: skip


def _schema(type_: str) -> dict[str, Any]:
    schema = json.loads((SCHEMAS / f"{type_}.v1.json").read_text())
    schema.pop("examples", None)
    return schema


def _envelope(type_: str, payload: Any, **over: Any) -> bytes:
    route = codec.ROUTES[type_]
    env = {
        "queue_name": route.queue,
        "actor_name": route.actor,
        "args": [payload],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1_700_000_000_000,
        **over,
    }
    # The standard library writes integers of any size, as a foreign producer might.
    return json.dumps(env, default=str).encode()


UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def well_formed(example: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Payloads that pass validation: the example with fresh IDs, live or
    unknown activities, numbers of many countries (valid or not), any amount
    in range. (hypothesis-jsonschema 0.23 cannot run on this Hypothesis.)"""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, value in example.items():
        if isinstance(value, str) and UUID_TEXT.match(value):
            fields[name] = st.uuids().map(str)
        elif name == "activity":
            fields[name] = st.sampled_from(["fuzz-live", "no-such-activity", "x"])
        elif name == "phone":
            fields[name] = st.from_regex(r"\A\+?[0-9]{3,15}\Z")
        elif name in ("amount_cents",):
            fields[name] = st.integers(0, 10**11)
        elif name == "member_id":
            fields[name] = st.integers(1, 2**63 - 1)
        elif name == "claim_ids":
            fields[name] = st.lists(st.uuids().map(str), min_size=1, max_size=5)
        elif name == "claims":
            fields[name] = st.just(value)
        else:
            fields[name] = st.just(value)
    schema = {k: v for k, v in _schema(type_of(example)).items() if k != "$schema"}
    validator = jsonschema.Draft202012Validator(schema)
    # Checked against the published JSON Schema, so these are schema-valid.
    return st.fixed_dictionaries(fields).filter(validator.is_valid)


def type_of(example: dict[str, Any]) -> str:
    return next(t for t, m in MESSAGE_TYPES.items() if dict(m.EXAMPLE) == example)


def cases(type_: str, example: dict[str, Any]) -> st.SearchStrategy[tuple[str, bytes]]:
    """(category, raw delivery) pairs for one message type."""
    valid = well_formed(example)
    fields = sorted(set(example) - {"v"})
    required = [f for f in fields if MESSAGE_TYPES[type_].FIELDS[f].required] or ["v"]
    mutated = st.tuples(st.sampled_from(fields or ["v"]), WRONG_VALUES).map(
        lambda fv: {**example, fv[0]: fv[1]}
    )
    return st.one_of(
        valid.map(lambda p: ("schema_valid", _envelope(type_, p))),
        mutated.map(lambda p: ("wrong_type_or_value", _envelope(type_, p))),
        st.integers(-5, 99)
        .filter(lambda v: v != 1)
        .map(lambda v: ("unknown_version", _envelope(type_, {**example, "v": v}))),
        st.text(min_size=1, max_size=12).map(
            lambda k: ("unknown_field", _envelope(type_, {**example, f"x_{k}": 1}))
        ),
        st.sampled_from(required).map(
            lambda f: ("missing_field", _envelope(type_, {k: v for k, v in example.items() if k != f}))
        ),
        JSON.map(lambda p: ("not_an_object_or_garbage", _envelope(type_, p))),
        st.binary(max_size=200).map(lambda b: ("malformed_json", b)),
        st.text(max_size=40).map(lambda t: ("malformed_json", b'{"actor_name": ' + t.encode())),
        st.just(("oversized", _envelope(type_, {**example, "pad": "x" * (codec.MAX_ENVELOPE_BYTES + 10)}))),
        st.text(max_size=30)
        .filter(lambda a: a not in codec.TYPE_BY_ACTOR)
        .map(lambda a: ("unknown_actor", _envelope(type_, example, actor_name=a))),
        st.sampled_from([[], [example, example]]).map(
            lambda args: ("wrong_arity", _envelope(type_, None, args=args))
        ),
        st.just(("envelope_shape", orjson.dumps({"args": [example], "actor_name": 1, "extra": 2}))),
        # The example's own ID with another, valid payload (the example itself
        # is delivered first by the test).
        st.sampled_from(OTHER_VALUES[type_]).map(
            lambda other: ("same_id_other_payload", _envelope(type_, {**example, **other}))
        )
        if OTHER_VALUES.get(type_)
        else st.nothing(),
        st.lists(st.from_regex(CODE, fullmatch=True), min_size=1, max_size=3, unique=True).map(
            lambda codes: ("unknown_codes", _envelope(type_, {**example, "redeemed_codes": codes}))
        )
        if "redeemed_codes" in example
        else st.nothing(),
    )


OTHER_VALUES: dict[str, list[dict[str, Any]]] = {
    "claim-requested": [{"phone": "+8613900000001"}, {"activity": "fuzz-live"}],
    "order-placed": [{"amount_cents": 1}, {"member_id": 7}],
    "share-opened": [{"opened_at": "2026-11-12T00:00:00Z"}],
    "order-status-changed": [{"changed_at": "2026-11-12T00:00:00Z"}],
    "credit-requested": [],
    "claims-requested": [{"claims": [{**ClaimRequested.EXAMPLE, "phone": "+8613900000002"}]}],
    "member-registered": [{"registered_at": "2026-11-12T00:00:00Z"}],
}


class Pipeline:
    """The consume path of the real actors, in process, on the test database."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
        monkeypatch.setenv("ISSUANCE_BROKER", "stub")
        import dramatiq
        from issuance.workers import actors, runtime

        self.sent: list[Any] = []
        self.reasons: list[str] = []
        monkeypatch.setattr(runtime, "send", lambda actor, message: self.sent.append(message))
        original = runtime.dead_letter

        def recorded(queue: str, actor: str, reason: str, detail: str, payload: Any, **options: Any) -> None:
            self.reasons.append(reason)
            original(queue, actor, reason, detail, payload, **options)

        monkeypatch.setattr(runtime, "dead_letter", recorded)
        monkeypatch.setattr(actors, "dead_letter", recorded)
        runtime.use_resources(runtime.Resources(settings))
        self.actors = {a: dramatiq.get_broker().get_actor(a) for a in codec.TYPE_BY_ACTOR}
        self.conn = psycopg.connect(settings.database_url, autocommit=True)
        tables = {
            r[0] for r in self.conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        counted = [t for t in ("orders", "referrals", "rebates", "held_credits") if t in tables]
        self.snapshot_sql = SNAPSHOT + "".join(f", (SELECT count(*) FROM {t})" for t in counted)

    def snapshot(self) -> tuple[int, ...]:
        row = self.conn.execute(self.snapshot_sql).fetchone()
        assert row is not None
        return tuple(row)

    def dead_letters(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def refused_claims(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM claims WHERE status = 'refused'").fetchone()[0])

    def deliver(self, raw: bytes) -> str:
        """The layer that stopped the delivery, or "accepted"."""
        try:
            env = codec.OrjsonEncoder().decode(raw)
        except Exception:
            return "envelope"
        actor = self.actors.get(env["actor_name"]) if isinstance(env["actor_name"], str) else None
        if actor is None:
            return "envelope"  # Dramatiq: ActorNotFound, rejected to the dead-letter queue
        refused = self.refused_claims()
        self.reasons.clear()
        try:
            actor.fn(*env["args"])  # any other raise is a worker crash: the test fails
        except TransientError:
            return "retried"  # by design (e.g. a status change before its order): Dramatiq retries it
        if self.reasons:
            known = {"bad_field", "bad_payload", "unknown_version", "unknown_field", "missing_field"}
            return "validation" if self.reasons[0] in known else "handler"
        if self.refused_claims() > refused:
            return "handler"
        return "accepted"


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("type_", TYPES)
def test_bad_input_is_refused_at_the_right_layer_without_crash_or_partial_write(
    type_, settings, monkeypatch, request
):
    make_activity(settings, slug="fuzz-live", budget=50, codes=50)
    pipeline = Pipeline(monkeypatch, settings)
    example = dict(MESSAGE_TYPES[type_].EXAMPLE)
    counts: Counter[tuple[str, str]] = Counter()
    partial: list[str] = []

    @hsettings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(type_, example))
    def run(case: tuple[str, bytes]) -> None:
        category, raw = case
        before = pipeline.snapshot()
        layer = pipeline.deliver(raw)
        changed = pipeline.snapshot() != before
        if layer == "accepted" and not changed:
            layer = "absorbed"  # a duplicate (first write wins) or an event with nothing to change
        counts[(category, layer)] += 1
        if layer in ("envelope", "validation") and changed:
            partial.append(f"{category}: {raw[:120]!r}")

    first = pipeline.deliver(_envelope(type_, example))  # the example's IDs now exist
    counts[("example_first", first)] += 1
    run()
    total = sum(counts.values())
    by_layer = Counter()
    by_category = Counter()
    for (category, layer), n in counts.items():
        by_layer[layer] += n
        by_category[category] += n
    pairs = {f"{c} -> {where}": n for (c, where), n in sorted(counts.items())}
    report = {"type": type_, "cases": total, "by_layer": dict(by_layer), "by_category": dict(by_category),
              "by_category_and_layer": pairs}  # fmt: skip
    print(json.dumps(report, indent=1))
    if os.environ.get("FUZZ_REPORT"):
        with open(os.environ["FUZZ_REPORT"], "a") as out:
            out.write(json.dumps(report) + "\n")
    assert total >= CASES * 0.9, f"hypothesis ran only {total} cases"
    assert not partial, partial[:5]
    # Garbage never gets past the codec, wrong fields never past validation.
    assert all(
        layer == "envelope" for (c, layer) in counts if c in ("malformed_json", "oversized", "unknown_actor")
    )
    assert all(
        layer != "accepted"
        for (c, layer) in counts
        if c in ("unknown_version", "unknown_field", "missing_field")
    )
    assert by_layer["envelope"] and by_layer["validation"]
    if (
        type_ == "claim-requested"
    ):  # the same claim ID with another payload is a conflict, never a second claim
        assert {layer for (c, layer) in counts if c == "same_id_other_payload"} == {"handler"}
    verify_clean(settings)
    pipeline.conn.close()
