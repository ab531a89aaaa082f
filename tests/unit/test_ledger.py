"""The acceptance ledger's pure parts: what an entry promises, when it is
settled, and how far the checkpoint may move."""

from __future__ import annotations

import uuid

import orjson
import pytest
from issuance.shared.db.ledger import Progress, Reconciliation, is_settled
from issuance.shared.wire import codec
from issuance.shared.wire.ledger import Entry, Unit, entry
from issuance.shared.wire.messages import ClaimsRequested

from tests.conftest import claim


def _entry(offset: int, *claim_ids: uuid.UUID) -> Entry:
    return Entry(offset, b"{}", f"m{offset}", 1000, tuple(Unit(c, (f"m{offset}",)) for c in claim_ids))


def test_a_claim_envelope_promises_its_claim_settled_by_a_row_or_a_dead_letter_of_the_message():
    message = claim("spring")
    body = codec.encode(message)
    found = entry(7, body, None)
    envelope = orjson.loads(body)
    assert found.offset == 7 and found.message_id == envelope["message_id"]
    assert found.accepted_ms == envelope["message_timestamp"]
    assert found.units == (Unit(message.claim_id, (envelope["message_id"],)),)
    assert found.item() == ("claims", body, envelope["message_id"])


def test_a_batch_promises_each_claim_and_an_invalid_item_by_its_own_dead_letter_key():
    claims = [claim("spring"), claim("spring")]
    batch = ClaimsRequested(batch_id=uuid.uuid4(), claims=tuple(claims))
    envelope = codec.envelope(batch)
    envelope["args"][0]["claims"].append({"claim_id": "not-a-uuid", "phone": 5})
    found = entry(0, orjson.dumps(envelope), None)
    mid = envelope["message_id"]
    assert found.units == (
        Unit(claims[0].claim_id, (f"{batch.batch_id}:0", mid)),
        Unit(claims[1].claim_id, (f"{batch.batch_id}:1", mid)),
        Unit(None, (f"{batch.batch_id}:2", mid)),
    )


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'{"actor_name": "claim_requested", "args": []}', b'{"args": "x"}'],
)
def test_an_unreadable_envelope_is_settled_only_by_a_dead_letter_of_the_whole_message(body):
    found = entry(3, body, "given-id")
    assert found.units == (Unit(None, ("given-id",)),)
    unnamed = entry(3, body, None)
    assert len(unnamed.message_id) == 64, "the body's SHA-256, as the dead-letter drain keys it"


def test_settled_needs_every_claim_recorded_or_dead_lettered():
    a, b = uuid.uuid4(), uuid.uuid4()
    two = _entry(0, a, b)
    assert not is_settled(two, {a}, set())
    assert is_settled(two, {a, b}, set())
    assert is_settled(two, set(), {"m0"}), "the whole message dead-lettered"
    assert not is_settled(two, {a}, {"m1"}), "another message's dead letter settles nothing here"


def test_the_checkpoint_stops_at_the_first_unsettled_entry():
    progress = Progress(start=10)
    for offset, settled in [(10, True), (11, True), (12, False), (13, True), (14, False)]:
        progress.add(_entry(offset, uuid.uuid4()), settled)
    assert (progress.read, progress.unsettled, progress.checkpoint) == (5, 2, 12)
    assert [e.offset for e in progress.kept] == [12, 14]


def test_the_checkpoint_moves_past_a_settled_run_and_stays_when_nothing_was_read():
    progress = Progress(start=None)
    assert progress.checkpoint is None
    for offset in (0, 1, 2):
        progress.add(_entry(offset, uuid.uuid4()), True)
    assert progress.checkpoint == 3 and not progress.kept
    assert Progress(start=5).checkpoint == 5


def test_only_so_many_unsettled_entries_are_kept_but_all_are_counted():
    progress = Progress(start=0, keep=2)
    for offset in range(5):
        progress.add(_entry(offset, uuid.uuid4()), False)
    assert progress.unsettled == 5 and len(progress.kept) == 2 and progress.checkpoint == 0


def test_the_report_names_each_claim_with_its_offset_and_acceptance_time():
    a, b = uuid.uuid4(), uuid.uuid4()
    report = Reconciliation(start=0, checkpoint=4, read=5, unsettled=1, entries=(_entry(4, a, b),))
    assert report.rows() == [
        [str(a), "4", "1970-01-01T00:00:01+00:00"],
        [str(b), "4", "1970-01-01T00:00:01+00:00"],
    ]
    assert "1 not recorded; checkpoint now 4" in report.summary()
    assert "absent" in Reconciliation(absent="no stream").summary()


def test_the_ledger_is_a_bounded_stream():
    arguments = codec.ledger_arguments()
    assert arguments["x-queue-type"] == "stream"
    assert arguments["x-max-age"] == "7D" and arguments["x-max-length-bytes"] > 0


def test_a_backlog_defers_the_redrive_of_what_may_still_wait_in_it():
    from datetime import timedelta

    from issuance.workers.sweeper import BACKLOG_PATIENCE, due_for_redrive

    grace = timedelta(seconds=60)
    now = 10_000_000
    recent = Entry(0, b"{}", "recent", now - 2 * 60_000, ())
    old = Entry(1, b"{}", "old", now - (BACKLOG_PATIENCE * 60_000 + 1), ())
    assert due_for_redrive([recent, old], 0, grace, now) == [recent, old], "no backlog: every lost claim"
    assert due_for_redrive([recent, old], 500, grace, now) == [old], "a backlog: only what waited too long"
