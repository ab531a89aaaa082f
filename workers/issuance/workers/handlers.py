"""What each message does, one function per message type.

Each handler works on a connection inside the caller's transaction (the
unit of work of issuance.workers.runtime, one per message) and returns values
saying what happened; it sends nothing. The claim handler loads what the
decision needs (issuance.shared.db.store), lets the pure decision of
issuance.shared.domain.claims decide, and writes the result: a batch of
claims costs the same statements whatever its decisions.

The ``handle_*`` functions run a handler in a transaction of its own on a
pool (the tests, benchmarks and command line call them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson
import psycopg
from issuance.shared.db import claim_channels, store
from issuance.shared.db import members as member_identity
from issuance.shared.db.store import Conn
from issuance.shared.domain import (
    InvalidPhone,
    Refusal,
    credit_deadline,
    mask_phone,
    normalize_phone,
    phone_digests,
    share_id_for,
)
from issuance.shared.domain.cells import route_slot
from issuance.shared.domain.claims import (
    ActivityTerms,
    ClaimRequest,
    ClaimStatus,
    Decision,
    Granted,
    Holding,
    Stock,
    activity_refusal,
    claimed_at,
    decide_claims,
)
from issuance.shared.errors import ConflictingDuplicate, PermanentError
from issuance.shared.settings import Settings, require_phone_keys
from issuance.shared.wire.messages import ClaimRequested, CreditRequested, OrderPlaced, ShareOpened, utcnow
from issuance.workers import lifecycle
from issuance.workers.runtime import UnitOfWork
from psycopg_pool import ConnectionPool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimOutcome:
    claim_id: uuid.UUID
    status: ClaimStatus
    reason: Refusal | None = None
    duplicate: bool = False
    codes: tuple[str, ...] = ()
    # For the gate, set when this call granted the package.
    activity: str | None = None
    group: str | None = None
    digest: bytes | None = None


class _Concurrent(Exception):
    """A concurrent delivery of a claim in this batch committed first."""


# A claim batch is decided again, in a fresh transaction, after one of these.
RETRYABLE = (_Concurrent, psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
CLAIM_ATTEMPTS = 5


def payload_digest(message: ClaimRequested) -> bytes:
    return hashlib.sha256(orjson.dumps(message.to_payload(), option=orjson.OPT_SORT_KEYS)).digest()


def handle_claim(
    pool: ConnectionPool, settings: Settings, message: ClaimRequested, *, now: datetime | None = None
) -> ClaimOutcome:
    """Decide one claim (a batch of one). Raises ConflictingDuplicate when
    its ID was recorded with another payload."""
    outcome = handle_claims(pool, settings, [message], now=now)[0]
    if outcome.status is ClaimStatus.CONFLICT:
        raise ConflictingDuplicate(f"claim {message.claim_id} was already recorded with another payload")
    return outcome


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """What deciding a batch needs from its messages alone, worked out before
    its transaction opens (and once across the transaction's retries): the
    payload digests, and each claim's number in E.164 (None when invalid)."""

    payload_digests: list[bytes]
    e164: dict[uuid.UUID, str | None]

    def pick(self, indices: Sequence[int]) -> Prepared:
        """What the messages at ``indices`` (of those prepared) need."""
        return Prepared(payload_digests=[self.payload_digests[i] for i in indices], e164=self.e164)

    def items(self, messages: Sequence[ClaimRequested]) -> list[PreparedClaim]:
        """Each of ``messages`` (those prepared) with what it needs, to be
        joined again with other messages' (:meth:`join`)."""
        return [
            (m, digest, self.e164[m.claim_id])
            for m, digest in zip(messages, self.payload_digests, strict=True)
        ]

    @classmethod
    def join(cls, items: Sequence[PreparedClaim]) -> Prepared:
        e164: dict[uuid.UUID, str | None] = {}
        for message, _, number in items:
            e164.setdefault(message.claim_id, number)  # a repeat is decided as its first delivery
        return cls(payload_digests=[digest for _, digest, _ in items], e164=e164)


# A claim with its payload digest and its number in E.164 (None: invalid).
PreparedClaim = tuple[ClaimRequested, bytes, "str | None"]


def prepare(settings: Settings, messages: Sequence[ClaimRequested]) -> Prepared:
    e164: dict[uuid.UUID, str | None] = {}
    for message in messages:
        if message.claim_id not in e164:  # a repeat is decided as its first delivery
            e164[message.claim_id] = _e164(message.phone, settings)
    return Prepared(payload_digests=[payload_digest(m) for m in messages], e164=e164)


def handle_claims(
    pool: ConnectionPool,
    settings: Settings,
    messages: Sequence[ClaimRequested],
    *,
    now: datetime | None = None,
) -> list[ClaimOutcome]:
    """:func:`claims_in_turn` in transactions of their own, each retried
    after a deadlock or a concurrent delivery of the same claim."""
    uow = UnitOfWork(pool)
    return claims_in_turn(
        lambda work: uow.run(work, retry_on=RETRYABLE, attempts=CLAIM_ATTEMPTS), settings, messages, now=now
    )


Outcomes = list[ClaimOutcome | None]
Transact = Callable[[Callable[[Conn], Outcomes]], Outcomes]


def claims_in_turn(
    transact: Transact,
    settings: Settings,
    messages: Sequence[ClaimRequested],
    *,
    now: datetime | None = None,
    prepared: Prepared | None = None,
    settle: Callable[[Sequence[ClaimRequested], Sequence[ClaimOutcome]], None] | None = None,
) -> list[ClaimOutcome]:
    """Decide a batch without waiting for another transaction
    (:func:`claims_unless_busy`); then, in a transaction of its own, the few
    claims another one was deciding (by then mostly committed: they come
    back duplicates). ``transact`` runs its argument in a transaction (and
    commits it); ``settle`` is told each transaction's claims and outcomes
    once it has committed."""
    now = now or utcnow()
    prepared = prepared or prepare(settings, messages)
    first = transact(lambda conn: claims_unless_busy(conn, settings, messages, now=now, prepared=prepared))
    done = [i for i, o in enumerate(first) if o is not None]
    busy = [i for i, o in enumerate(first) if o is None]
    if settle is not None:
        settle([messages[i] for i in done], [o for o in first if o is not None])
    if not busy:
        return [o for o in first if o is not None]
    waiting, ready = [messages[i] for i in busy], prepared.pick(busy)

    def decide_waiting(conn: Conn) -> Outcomes:
        return [*claims(conn, settings, waiting, now=now, prepared=ready)]

    later = [o for o in transact(decide_waiting) if o is not None]
    if settle is not None:
        settle(waiting, later)
    rest = iter(later)
    return [o if o is not None else next(rest) for o in first]


def claims(
    conn: Conn,
    settings: Settings,
    messages: Sequence[ClaimRequested],
    *,
    now: datetime | None = None,
    prepared: Prepared | None = None,
) -> list[ClaimOutcome]:
    """Decide a batch of claims: refuse each with a reason, or bind one code
    per template of its package. Idempotent on claim IDs; outcomes come back
    in the order of ``messages``. A claim being decided by a concurrent
    transaction is waited for. Raises one of RETRYABLE when the batch must
    be decided again in a fresh transaction. ``prepared``: :func:`prepare`'s
    result for ``messages``, made before the transaction."""
    store.lock_claim_ids(conn, [m.claim_id for m in messages])
    outcomes = _decide(conn, settings, messages, now, prepared, busy=frozenset())
    return [o for o in outcomes if o is not None]


def claims_unless_busy(
    conn: Conn,
    settings: Settings,
    messages: Sequence[ClaimRequested],
    *,
    now: datetime | None = None,
    prepared: Prepared | None = None,
) -> Outcomes:
    """:func:`claims`, except that a claim being decided by a concurrent
    transaction is not waited for: its outcome is None, and the caller
    decides it again after this transaction (with :func:`claims`). Two
    deliveries of one claim in two processes' batches then cost the second
    batch nothing but that claim, instead of its whole turn behind the first."""
    ids = [m.claim_id for m in messages]
    locked = store.try_lock_claim_ids(conn, ids)
    return _decide(conn, settings, messages, now, prepared, busy=frozenset(ids) - locked)


def _decide(
    conn: Conn,
    settings: Settings,
    messages: Sequence[ClaimRequested],
    now: datetime | None,
    prepared: Prepared | None,
    *,
    busy: frozenset[uuid.UUID],
) -> Outcomes:
    """Decide the claims of ``messages`` this transaction has locked (all
    but ``busy``, whose outcomes are None)."""
    now = now or utcnow()
    prepared = prepared or prepare(settings, messages)
    digests = prepared.payload_digests
    recorded = store.claims_by_ids(conn, [m.claim_id for m in messages if m.claim_id not in busy])
    first_of: dict[uuid.UUID, int] = {}
    for i, message in enumerate(messages):
        if message.claim_id not in recorded and message.claim_id not in busy:
            first_of.setdefault(message.claim_id, i)
    batch = _load(conn, settings, [messages[i] for i in first_of.values()], now, prepared.e164)
    decisions = decide_claims(
        batch.requests,
        holdings=batch.holdings,
        stock=batch.stock,
        now=now,
        credit_inline=settings.credit_inline,
    )
    decided = _write(conn, settings, batch, decisions, {c: digests[i] for c, i in first_of.items()})
    claim_channels.record(conn, [(m.claim_id, m.channel) for m in batch.messages])
    outcomes: list[ClaimOutcome | None] = []
    for i, (message, digest) in enumerate(zip(messages, digests, strict=True)):
        if message.claim_id in busy:
            outcomes.append(None)
            continue
        if message.claim_id in recorded:
            outcomes.append(_recorded(recorded[message.claim_id], digest))
            continue
        outcome = decided[message.claim_id]
        first = first_of[message.claim_id]
        if i != first:  # a repeat, within the batch, of a claim decided above
            same = digest == digests[first]
            status = outcome.status if same else ClaimStatus.CONFLICT
            outcome = dataclasses.replace(outcome, duplicate=True, status=status, digest=None, codes=())
        outcomes.append(outcome)
    return outcomes


def _recorded(claim: store.ClaimRow, digest: bytes) -> ClaimOutcome:
    """The outcome of a claim decided by an earlier delivery."""
    if claim.payload_digest != digest:
        return ClaimOutcome(claim_id=claim.claim_id, status=ClaimStatus.CONFLICT, duplicate=True)
    return ClaimOutcome(claim_id=claim.claim_id, status=claim.status, reason=claim.reason, duplicate=True)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Batch:
    """The new claims of a batch and what their decision needs."""

    messages: list[ClaimRequested]
    requests: list[ClaimRequest]
    phone_digests: dict[uuid.UUID, bytes]
    holdings: dict[int, list[Holding]]
    stock: Stock


def _load(
    conn: Conn,
    settings: Settings,
    messages: list[ClaimRequested],
    now: datetime,
    numbers_e164: dict[uuid.UUID, str | None],
) -> _Batch:
    """Load what deciding ``messages`` needs, locking the rows it may
    change: members (created pending where new), free slots and codes. Only
    claims whose activity is open need their number read, and only those
    with a valid number a member and stock."""
    activities: dict[str, ActivityTerms | None] = {}
    keys = require_phone_keys(settings)
    numbers: dict[uuid.UUID, tuple[bytes, str]] = {}  # claim -> current phone digest, E.164
    digests: dict[str, list[tuple[str, bytes]]] = {}  # E.164 -> its digest under every key
    for message in messages:
        if message.activity not in activities:
            activities[message.activity] = store.activity_by_slug(conn, message.activity)
        at = claimed_at(message.requested_at, now)
        if activity_refusal(activities[message.activity], at) is None:  # the number counts: read it
            e164 = numbers_e164[message.claim_id]
            if e164 is not None:
                digests[e164] = phone_digests(e164, keys.secrets)
                numbers[message.claim_id] = (digests[e164][0][1], e164)
    masked = {digest: mask_phone(e164) for digest, e164 in numbers.values()}
    ring = {digest: route_slot(e164) for digest, e164 in numbers.values()}
    if masked:
        store.rekey_members(conn, keys.current_id, list(digests.values()))
    members = store.lock_members(conn, masked, key_id=keys.current_id, ring_slots=ring) if masked else {}
    registered = member_identity.registered_at(conn, sorted(set(members.values()))) if members else {}
    requests = []
    for message in messages:
        digest, e164 = numbers.get(message.claim_id, (None, None))
        requests.append(
            ClaimRequest(
                claim_id=message.claim_id,
                activity=activities[message.activity],
                requested_at=message.requested_at,
                phone=e164,
                member_id=None if digest is None else members[digest],
                registered_at=None if digest is None else registered.get(members[digest]),
            )
        )
    return _Batch(
        messages=messages,
        requests=requests,
        phone_digests={c: d for c, (d, _) in numbers.items()},
        holdings=store.member_grants(conn, sorted(set(members.values()))) if members else {},
        stock=_lock_stock(conn, [r for r in requests if r.member_id is not None]),
    )


def _e164(typed: str, settings: Settings) -> str | None:
    try:
        return normalize_phone(typed, settings.default_region)
    except InvalidPhone:
        return None


def _lock_stock(conn: Conn, candidates: list[ClaimRequest]) -> Stock:
    """Lock as many free slots and codes as the candidates could take: one
    slot each, one code of every template of their activity's package."""
    wanted: Counter[int] = Counter()
    per_template: Counter[int] = Counter()
    for request in candidates:
        assert request.activity is not None
        wanted[request.activity.activity_id] += 1
        per_template.update(t.template_id for t in request.activity.templates)
    return Stock(
        slots={a: store.lock_free_slots(conn, a, n) for a, n in wanted.items()},
        codes={t: store.lock_free_codes(conn, t, n) for t, n in per_template.items()},
    )


def _write(
    conn: Conn,
    settings: Settings,
    batch: _Batch,
    decisions: list[Decision],
    payload_digests: dict[uuid.UUID, bytes],
) -> dict[uuid.UUID, ClaimOutcome]:
    """Record the decisions: every claim's row, then the slots taken, the
    codes bound and the wallet entries of the claims credited now."""
    rows: list[dict[str, Any]] = []
    outcomes: dict[uuid.UUID, ClaimOutcome] = {}
    bindings: list[tuple[str, uuid.UUID, int, datetime]] = []
    for message, request, decision in zip(batch.messages, batch.requests, decisions, strict=True):
        row = _row(settings, message, payload_digests[message.claim_id], request)
        if isinstance(decision, Granted):
            row.update(
                status=decision.status.value,
                group=decision.activity.exclusivity_group,
                slot_no=decision.slot_no,
                new_member=decision.new_member,
            )
            bindings += [
                (code, message.claim_id, decision.member_id, decision.expires_at) for code in decision.codes
            ]
            outcomes[message.claim_id] = ClaimOutcome(
                claim_id=message.claim_id,
                status=decision.status,
                codes=decision.codes,
                activity=decision.activity.slug,
                group=decision.activity.exclusivity_group,
                digest=batch.phone_digests[message.claim_id],
            )
        else:
            row.update(status=ClaimStatus.REFUSED.value, reason=decision.reason.value)
            outcomes[message.claim_id] = ClaimOutcome(
                claim_id=message.claim_id, status=ClaimStatus.REFUSED, reason=decision.reason
            )
        rows.append(row)
    if rows and store.insert_claims(conn, rows) != len(rows):
        raise _Concurrent
    granted = [d for d in decisions if isinstance(d, Granted)]
    store.take_slots(conn, [(d.activity.activity_id, d.slot_no) for d in granted])
    store.bind_codes(conn, bindings)
    credit_now = [o.claim_id for o in outcomes.values() if o.status is ClaimStatus.CREDITED]
    if credit_now:
        store.write_wallet(conn, credit_now)
    return outcomes


def _row(settings: Settings, message: ClaimRequested, digest: bytes, request: ClaimRequest) -> dict[str, Any]:
    return {
        "claim_id": message.claim_id,
        "activity_slug": message.activity,
        "activity_id": None if request.activity is None else request.activity.activity_id,
        "member_id": request.member_id,
        "share_id": message.share_id,
        "payload_digest": digest,
        "requested_at": message.requested_at,
        "deadline": credit_deadline(message.requested_at, settings.credit_promise_seconds),
        "new_member": False,
    }


class UnknownClaim(PermanentError):
    """A credit was requested for a claim that was never recorded."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CreditOutcome:
    """What a credit message did: the (claim, promise start) of each claim it
    credited; whether every claim was held until registration; and the
    claims never recorded, when nothing could be credited."""

    credited: list[tuple[uuid.UUID, datetime]]
    held: bool = False
    unknown: tuple[uuid.UUID, ...] = ()

    def check(self) -> None:
        """Raise UnknownClaim for a credit of claims that do not exist (the
        actor calls it after the commit, so that the holds stay)."""
        if self.unknown:
            raise UnknownClaim(f"no claims {', '.join(str(c) for c in self.unknown[:5])}")


def credit_requested(conn: Conn, message: CreditRequested) -> CreditOutcome:
    """Credit the bound claims of a credit message, except those whose
    activity holds credits until their pending member registers. A credit
    released from such a hold is promised from registration."""
    plan = lifecycle.plan_credit(conn, message.claim_ids)
    if not plan.ready:
        return CreditOutcome(credited=[], held=True)
    credited, unknown = _credit(conn, plan.ready)
    return CreditOutcome(credited=[(c, plan.promise_from.get(c, at)) for c, at in credited], unknown=unknown)


def handle_credit(pool: ConnectionPool, message: CreditRequested) -> list[tuple[uuid.UUID, datetime]]:
    """Credit the claims of a credit message in a transaction of its own;
    returns the (claim, requested at) of each claim this call credited."""
    credited, unknown = UnitOfWork(pool).run(lambda conn: _credit(conn, message.claim_ids))
    CreditOutcome(credited=credited, unknown=unknown).check()
    return credited


def _credit(
    conn: Conn, claim_ids: Sequence[uuid.UUID]
) -> tuple[list[tuple[uuid.UUID, datetime]], tuple[uuid.UUID, ...]]:
    """Credit bound claims to their wallets, exactly once. Returns the
    (claim, requested at) of each claim this call credited (none for a
    duplicate delivery) and, when it credited none, the claims never
    recorded."""
    _, credited = store.credit_claims(conn, claim_ids)
    if credited or not claim_ids:
        return credited, ()
    known = store.claims_by_ids(conn, claim_ids)
    return credited, tuple(c for c in claim_ids if c not in known)


def order_placed(conn: Conn, message: OrderPlaced) -> bool:
    """Open the order's share and record the order, redeeming the coupons
    it used. Returns False when both were already done."""
    opened = open_share(conn, message)
    return lifecycle.record_order_in(conn, message).recorded or opened


def handle_order_placed(pool: ConnectionPool, message: OrderPlaced) -> bool:
    """:func:`open_share` in a transaction of its own."""
    return UnitOfWork(pool).run(lambda conn: open_share(conn, message))


def open_share(conn: Conn, message: OrderPlaced) -> bool:
    """Open the order's share. Returns False when it was already open."""
    return store.open_share(
        conn,
        share_id=share_id_for(message.order_id),
        order_id=message.order_id,
        activity=message.activity,
        referrer=lifecycle.order_member(conn, message),
        placed_at=message.placed_at,
    )


def handle_share_opened(pool: ConnectionPool, message: ShareOpened) -> bool:
    """:func:`share_opened` in a transaction of its own."""
    return UnitOfWork(pool).run(lambda conn: share_opened(conn, message))


def share_opened(conn: Conn, message: ShareOpened) -> bool:
    """Record that a share was opened. Returns False for a duplicate."""
    return store.record_share_open(
        conn, event_id=message.event_id, share_id=message.share_id, opened_at=message.opened_at
    )
