"""The schema, as typed SQLAlchemy 2 models. Alembic migrations are written
from these; the invariants of the product are constraints here, so they hold
even when the code above them is wrong:

- a code is bound to at most one member (one row per code, one member column,
  and a claim gets at most one code per template);
- one package per (activity, member) and per (exclusivity group, member):
  partial unique indexes over granted claims; every activity has a group
  (its own by default) and a claim's group must match its activity's;
- one wallet credit per (claim, code), and only for a code bound to that claim
  and member (composite foreign key);
- no package beyond the budget: a granted claim holds one of the activity's
  package slots (foreign key, unique), and there are exactly ``budget`` slots.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

GRANTED = "status <> 'refused'"


class Base(DeclarativeBase):
    pass


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Channel(Base):
    __tablename__ = "channels"

    channel_id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _now()


class Activity(Base):
    __tablename__ = "activities"
    __table_args__ = (
        UniqueConstraint("activity_id", "exclusivity_group", name="activities_id_group_key"),
        CheckConstraint("ends_at > starts_at", name="activities_window_check"),
        CheckConstraint("budget >= 0", name="activities_budget_check"),
        CheckConstraint(
            "(validity_days IS NOT NULL AND validity_days BETWEEN 0 AND 3650) OR (valid_until IS NOT NULL)",
            name="activities_validity_check",
        ),
        CheckConstraint("slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'", name="activities_slug_check"),
        CheckConstraint("rebate_every >= 1", name="activities_rebate_every_check"),
        CheckConstraint(
            "rebate_amount_cents IS NULL OR (rebate_amount_cents > 0 AND rebate_template_id IS NULL)",
            name="activities_rebate_kind_check",
        ),
    )

    activity_id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    banner_url: Mapped[str] = mapped_column(Text, server_default="")
    copy: Mapped[str] = mapped_column(Text, server_default="")
    rules: Mapped[str] = mapped_column(Text, server_default="")
    brand: Mapped[str] = mapped_column(String(200), server_default="")
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.channel_id"))
    starts_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ends_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    timezone: Mapped[str] = mapped_column(String(64), server_default="Asia/Shanghai")
    online: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    budget: Mapped[int] = mapped_column(Integer)
    # Activities in one group are "similar": one package per member per group.
    # An activity with no group of its own is alone in "solo:<slug>".
    exclusivity_group: Mapped[str] = mapped_column(String(100))
    validity_days: Mapped[int | None] = mapped_column(Integer)
    valid_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    valid_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The cities or provinces the activity is limited to; none: everywhere (migration 0014).
    regions: Mapped[list[str]] = mapped_column(ARRAY(String(64)), server_default=text("'{}'"))
    hold_until_registered: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Refer K, get one back: every ``rebate_every`` successful referrals earn
    # the referrer either an amount or a coupon of a template (usually of a
    # budget-0 "rewards" activity, so it is never part of a claimed package).
    rebate_every: Mapped[int] = mapped_column(SmallInteger, server_default="3")
    rebate_amount_cents: Mapped[int | None] = mapped_column(Integer)
    rebate_template_id: Mapped[int | None] = mapped_column(
        ForeignKey("coupon_templates.template_id", use_alter=True, name="activities_rebate_template_fkey")
    )
    created_at: Mapped[datetime] = _now()


class CouponTemplate(Base):
    __tablename__ = "coupon_templates"
    __table_args__ = (
        UniqueConstraint("activity_id", "position", name="coupon_templates_position_key"),
        CheckConstraint(
            "kind IN ('discount_rate', 'amount_off', 'gift')", name="coupon_templates_kind_check"
        ),
        CheckConstraint("value >= 0 AND threshold_cents >= 0", name="coupon_templates_value_check"),
        CheckConstraint("position BETWEEN 1 AND 5", name="coupon_templates_position_check"),
        CheckConstraint(
            "min_items >= 0 AND min_member_level >= 0 AND priority BETWEEN 0 AND 1000"
            " AND (per_person_limit IS NULL OR per_person_limit >= 1)",
            name="coupon_templates_rules_check",
        ),
    )

    template_id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.activity_id"))
    position: Mapped[int] = mapped_column(SmallInteger)
    prefix: Mapped[str] = mapped_column(String(6), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    # discount_rate: basis points off (1500 = 15% off); amount_off and gift: minor units.
    value: Mapped[int] = mapped_column(Integer)
    threshold_cents: Mapped[int] = mapped_column(Integer, server_default="0")
    new_user_only: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    title: Mapped[str] = mapped_column(String(200), server_default="")
    # The coupon's rules (issuance.shared.domain.checkout): an empty scope is
    # no restriction; per_person_limit None is no limit (migration 0014).
    scope_products: Mapped[list[str]] = mapped_column(ARRAY(String(64)), server_default=text("'{}'"))
    scope_categories: Mapped[list[str]] = mapped_column(ARRAY(String(64)), server_default=text("'{}'"))
    scope_stores: Mapped[list[str]] = mapped_column(ARRAY(String(64)), server_default=text("'{}'"))
    min_items: Mapped[int] = mapped_column(Integer, server_default="0")
    min_member_level: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    stackable: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    priority: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    per_person_limit: Mapped[int | None] = mapped_column(Integer)


class CodeBatch(Base):
    __tablename__ = "code_batches"

    batch_id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("coupon_templates.template_id"))
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()


class Member(Base):
    __tablename__ = "members"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'registered')", name="members_status_check"),
        CheckConstraint("ring_slot BETWEEN 0 AND 1023", name="members_ring_slot_check"),
        # Over linked members only: a member created by a claim writes no entry.
        Index(
            "members_app_member_id_key",
            "app_member_id",
            unique=True,
            postgresql_where=text("app_member_id IS NOT NULL"),
        ),
    )

    member_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # HMAC-SHA256 of the E.164 number under the phone key phone_key_id: numbers are
    # looked up by digest and never stored in clear.
    phone_digest: Mapped[bytes | None] = mapped_column(LargeBinary(32), unique=True)
    # Which phone key made the digest (ISSUANCE_PHONE_KEYS; "1": ISSUANCE_PHONE_KEY).
    phone_key_id: Mapped[str] = mapped_column(String(16), server_default=text("'1'"))
    phone_masked: Mapped[str] = mapped_column(String(24), server_default="")
    status: Mapped[str] = mapped_column(String(12), server_default="pending")
    created_at: Mapped[datetime] = _now()
    registered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The app's member ID, linked by member-registered (migration 0014).
    app_member_id: Mapped[int | None] = mapped_column(BigInteger)
    # The member's ring slot (issuance.shared.domain.cells.route_slot), recorded
    # by the claim and registration paths: the number itself is not stored,
    # and a handover of ring slots between cells finds its members by it.
    ring_slot: Mapped[int | None] = mapped_column(SmallInteger)
    # A handover moved the member: from which cell it came (its ID then lies
    # outside this cell's range), or to which cell it went (this row is then
    # history only; the member is decided in moved_to). Migration 0022.
    moved_from: Mapped[str | None] = mapped_column(String(63))
    moved_to: Mapped[str | None] = mapped_column(String(63))
    moved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RingHandover(Base):
    """A ring slot this cell gives (``from_cell``) or receives (``to_cell``)
    in a handover, and how far it went (issuance.shared.db.cells)."""

    __tablename__ = "ring_handovers"
    __table_args__ = (
        CheckConstraint("state IN ('leaving', 'holding', 'done')", name="ring_handovers_state_check"),
        CheckConstraint("slot BETWEEN 0 AND 1023", name="ring_handovers_slot_check"),
    )

    slot: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    from_cell: Mapped[str] = mapped_column(String(63))
    to_cell: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(8))
    updated_at: Mapped[datetime] = _now()


class MemberHolding(Base):
    """A package a moved member held in the cell it came from: its activity
    (by slug: activity IDs differ between cells) and exclusivity group. The
    claim path counts it as held (issuance.shared.db.store.member_grants)."""

    __tablename__ = "member_holdings"

    member_id: Mapped[int] = mapped_column(ForeignKey("members.member_id"), primary_key=True)
    activity_slug: Mapped[str] = mapped_column(String(63), primary_key=True)
    exclusivity_group: Mapped[str] = mapped_column(String(100))
    from_cell: Mapped[str] = mapped_column(String(63))


class ClaimChannel(Base):
    """The channel a claim came through when it is not its activity's own
    (issuance.shared.db.claim_channels; migration 0014)."""

    __tablename__ = "claim_channels"

    claim_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("claims.claim_id"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64))


class PackageSlot(Base):
    """One row per package in an activity's budget."""

    __tablename__ = "package_slots"
    # Free slots only, in slot order: a claim starts where the last one in
    # its process stopped (issuance.shared.db.store) instead of walking over the entries
    # of slots just taken, which stay in the index until vacuum.
    __table_args__ = (
        Index("package_slots_free_idx", "activity_id", "slot_no", postgresql_where=text("NOT taken")),
    )

    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.activity_id"), primary_key=True)
    slot_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    taken: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class Share(Base):
    __tablename__ = "shares"

    share_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(64), unique=True)
    activity_id: Mapped[int | None] = mapped_column(ForeignKey("activities.activity_id"))
    referrer_member_id: Mapped[int] = mapped_column(BigInteger)
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()


class ShareOpen(Base):
    __tablename__ = "share_opens"
    __table_args__ = (Index("share_opens_share_idx", "share_id"),)

    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    share_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Claim(Base):
    __tablename__ = "claims"
    __table_args__ = (
        CheckConstraint("status IN ('refused', 'bound', 'credited')", name="claims_status_check"),
        CheckConstraint("(status = 'refused') = (reason IS NOT NULL)", name="claims_reason_check"),
        CheckConstraint(
            "status = 'refused' OR (member_id IS NOT NULL AND slot_no IS NOT NULL"
            " AND activity_id IS NOT NULL AND exclusivity_group IS NOT NULL)",
            name="claims_granted_check",
        ),
        CheckConstraint("(status = 'credited') = (credited_at IS NOT NULL)", name="claims_credited_check"),
        # Its activity and group, slot and member are checked once per
        # statement (triggers of migration 0019), not by foreign keys.
        UniqueConstraint("activity_id", "slot_no", name="claims_slot_key"),
        # Member first: it also finds the packages a member holds (the claim
        # rules, referrals), so claims need no other index on member_id.
        Index(
            "claims_one_package_per_activity",
            "member_id",
            "activity_id",
            unique=True,
            postgresql_where=text(GRANTED),
        ),
        Index(
            "claims_one_package_per_group",
            "exclusivity_group",
            "member_id",
            unique=True,
            postgresql_where=text(GRANTED),
        ),
        Index("claims_uncredited_idx", "deadline", postgresql_where=text("status = 'bound'")),
        # The recent credit rate of the promise exporter (issuance.shared.db.analytics).
        Index("claims_credited_idx", "credited_at", postgresql_where=text("status = 'credited'")),
    )

    claim_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    activity_slug: Mapped[str] = mapped_column(String(63))
    activity_id: Mapped[int | None] = mapped_column(Integer)
    exclusivity_group: Mapped[str | None] = mapped_column(String(100))
    member_id: Mapped[int | None] = mapped_column(BigInteger)
    share_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    slot_no: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12))
    reason: Mapped[str | None] = mapped_column(String(32))
    new_member: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Digest of the claim's payload: the same claim ID with another payload is
    # a conflicting duplicate, not a re-send.
    payload_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime] = _now()
    deadline: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    credited_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Code(Base):
    __tablename__ = "codes"
    __table_args__ = (
        CheckConstraint(
            "status IN ('available', 'unused', 'used', 'expired', 'cancelled', 'voided', 'written_off')",
            name="codes_status_check",
        ),
        # Voided (a refund after payment, a rebate taken back) is final; the
        # trigger codes_void_guard (migration 0010) refuses any move out of it.
        CheckConstraint("(status = 'voided') = (voided_at IS NOT NULL)", name="codes_voided_check"),
        # A code belongs to a member through exactly one claim or one rebate.
        CheckConstraint(
            "(member_id IS NULL) = (claim_id IS NULL AND rebate_id IS NULL)", name="codes_binding_check"
        ),
        CheckConstraint("claim_id IS NULL OR rebate_id IS NULL", name="codes_one_owner_check"),
        # A used coupon always names its order; returning it clears both; a
        # voided one keeps the order that voided it.
        CheckConstraint(
            "(status <> 'used' OR order_id IS NOT NULL)"
            " AND (order_id IS NULL OR status IN ('used', 'voided'))",
            name="codes_used_order_check",
        ),
        CheckConstraint(
            "status <> 'used' OR (used_at IS NOT NULL AND discount_cents IS NOT NULL)",
            name="codes_used_detail_check",
        ),
        CheckConstraint(
            # written_off: redeemed without an order (migration 0015), a gift
            # coupon or a partner's or printed code that was never bound.
            "(status = 'available') = (member_id IS NULL) OR status IN ('cancelled', 'written_off')",
            name="codes_bound_status_check",
        ),
        # The keys of a code (its batch of its template; its claim or rebate
        # and member; its order) are checked once per statement over the rows
        # it wrote, and its owner never changes once set: triggers of
        # migration 0011, so that generating codes is a COPY into two B-trees
        # (primary key and pool) with no trigger event per row.
        # One code per template and claim, over bound codes only.
        Index(
            "codes_one_per_template_key",
            "claim_id",
            "template_id",
            unique=True,
            postgresql_where=text("claim_id IS NOT NULL"),
        ),
        # The pool a claim draws from, in generation order: a generated code is
        # an append at the index's right edge (a random code as the key made
        # it a random insert), and a claim starts where the last one in its
        # process stopped (issuance.shared.db.store) instead of walking over the entries
        # of codes just bound, which stay in the index until vacuum.
        Index("codes_available_idx", "template_id", "seq", postgresql_where=text("status = 'available'")),
        # No index by batch: every bind would update it (a bind is not a HOT
        # update), for the sake of an occasional export that can scan.
        Index("codes_order_idx", "order_id", postgresql_where=text("order_id IS NOT NULL")),
        Index("codes_unused_expiry_idx", "expires_at", postgresql_where=text("status = 'unused'")),
        Index("codes_rebate_idx", "rebate_id", postgresql_where=text("rebate_id IS NOT NULL")),
        # Bound, used, expired and cancelled codes per template, and the orders
        # and discounts of used ones, read without the pool of available codes
        # or the table (issuance.shared.db.analytics).
        Index(
            "codes_taken_idx",
            "template_id",
            "status",
            postgresql_include=["order_id", "discount_cents"],
            postgresql_where=text("status <> 'available'"),
        ),
    )

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    # Generation order: the order in which the pool is handed out.
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    template_id: Mapped[int] = mapped_column(Integer)
    batch_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12), server_default="available")
    member_id: Mapped[int | None] = mapped_column(BigInteger)
    claim_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    bound_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rebate_id: Mapped[int | None] = mapped_column(BigInteger)
    order_id: Mapped[str | None] = mapped_column(String(64))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    discount_cents: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    voided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WalletEntry(Base):
    __tablename__ = "wallet_ledger"
    __table_args__ = (
        UniqueConstraint("claim_id", "code", name="wallet_one_credit_per_claim_code"),
        # The entry's code, claim and member are the code's binding: checked
        # once per statement (migration 0011), which spares codes a second
        # unique index on the code; the binding's own keys (codes -> claims ->
        # members) make separate keys to claims and members redundant.
        Index("wallet_member_idx", "member_id"),
    )

    entry_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    member_id: Mapped[int] = mapped_column(BigInteger)
    claim_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    code: Mapped[str] = mapped_column(String(16))
    credited_at: Mapped[datetime] = _now()


class KeyFingerprint(Base):
    """A secret's fingerprint, HMAC(secret, a constant), recorded by the first
    process that used it: every later process proves it holds the same secret
    without the database ever holding it (issuance.shared.db.fingerprints)."""

    __tablename__ = "key_fingerprints"
    __table_args__ = (CheckConstraint("octet_length(fingerprint) = 32", name="key_fingerprints_sha256"),)

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary(32))
    recorded_at: Mapped[datetime] = _now()


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (UniqueConstraint("message_key", "reason", name="dead_letters_once_key"),)

    dead_letter_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # The envelope's message ID, or a digest of the body when there is none.
    message_key: Mapped[str] = mapped_column(String(80))
    queue: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


class LedgerCheckpoint(Base):
    """Where reconciliation resumes reading an acceptance ledger stream: the
    offset of its first entry not known to be settled (issuance.shared.db.ledger)."""

    __tablename__ = "ledger_checkpoints"
    __table_args__ = (CheckConstraint("next_offset >= 0", name="ledger_checkpoints_offset_check"),)

    stream: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = _now()


class Order(Base):
    """An order as far as coupons and referrals need it. Orders move
    placed -> paid [-> fulfilled] -> refunded, or placed -> cancelled."""

    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint(
            "status IN ('placed', 'paid', 'fulfilled', 'cancelled', 'refunded')", name="orders_status_check"
        ),
        CheckConstraint(
            "(status IN ('paid', 'fulfilled', 'refunded')) = (paid_at IS NOT NULL)", name="orders_paid_check"
        ),
        CheckConstraint(
            "(status <> 'fulfilled' OR fulfilled_at IS NOT NULL)"
            " AND (fulfilled_at IS NULL OR paid_at IS NOT NULL)",
            name="orders_fulfilled_check",
        ),
        CheckConstraint(
            "refunded_by IS NULL OR (status = 'refunded' AND refunded_by IN ('buyer', 'merchant'))",
            name="orders_refunded_by_check",
        ),
        CheckConstraint("(status = 'cancelled') = (cancelled_at IS NOT NULL)", name="orders_cancelled_check"),
        CheckConstraint("(status = 'refunded') = (refunded_at IS NOT NULL)", name="orders_refunded_check"),
        CheckConstraint(
            "amount_cents >= 0 AND discount_cents BETWEEN 0 AND amount_cents", name="orders_amount_check"
        ),
        Index("orders_member_idx", "member_id"),
    )

    order_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    member_id: Mapped[int] = mapped_column(BigInteger)
    activity_id: Mapped[int | None] = mapped_column(ForeignKey("activities.activity_id"))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    discount_cents: Mapped[int] = mapped_column(BigInteger, server_default="0")
    status: Mapped[str] = mapped_column(String(12), server_default="placed")
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    refunded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    fulfilled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Who refunded it: a merchant's refund before fulfilment gives the
    # coupons back, any other refund voids them (issuance.shared.domain.refunds).
    refunded_by: Mapped[str | None] = mapped_column(String(8))


class Referral(Base):
    """One successful referral: a new member who claimed through a share and
    then paid a first order. A referee counts once, never for themselves;
    the referee's refund reverses it (the row stays, so it cannot count again)."""

    __tablename__ = "referrals"
    __table_args__ = (
        CheckConstraint("referrer_member_id <> referee_member_id", name="referrals_not_self_check"),
        Index("referrals_referrer_idx", "referrer_member_id", "activity_id"),
        Index(
            "referrals_standing_idx",
            "referrer_member_id",
            "activity_id",
            postgresql_where=text("reversed_at IS NULL"),
        ),
    )

    referee_member_id: Mapped[int] = mapped_column(ForeignKey("members.member_id"), primary_key=True)
    referrer_member_id: Mapped[int] = mapped_column(BigInteger)
    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.activity_id"))
    share_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("shares.share_id"))
    claim_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("claims.claim_id"), unique=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.order_id"), unique=True)
    counted_at: Mapped[datetime] = _now()
    reversed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CellReferral(Base):
    """A referral counted in another cell, the referee's, for a referrer of
    this cell through a share of this cell (cells: issuance.workers.cell_referrals).
    The referee's cell keeps the referral itself (``referrals``, with its claim
    and order); this row is what the referrer's rebates are counted from
    alongside this cell's own referrals. Reversed when the referee's order is
    refunded or cancelled there; never counted twice for one referee."""

    __tablename__ = "cell_referrals"
    __table_args__ = (
        CheckConstraint("referrer_member_id <> referee_member_id", name="cell_referrals_not_self_check"),
        Index(
            "cell_referrals_standing_idx",
            "referrer_member_id",
            "activity_id",
            postgresql_where=text("reversed_at IS NULL"),
        ),
    )

    referee_member_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    referrer_member_id: Mapped[int] = mapped_column(BigInteger)
    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.activity_id"))
    share_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("shares.share_id"))
    # The referee's claim through the share and first paid order, in the referee's cell.
    claim_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), unique=True)
    order_id: Mapped[str] = mapped_column(String(64), unique=True)
    counted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reversed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = _now()


class Rebate(Base):
    """The rebate ledger: the n-th rebate of a referrer in an activity is
    written once among the standing ones (an amount, or a coupon code bound
    through ``codes.rebate_id``). A rebate no longer earned is reversed:
    ``clawed_back`` (its unused coupon voided) or ``review`` (spent already)."""

    __tablename__ = "rebates"
    __table_args__ = (
        Index(
            "rebates_once_key",
            "referrer_member_id",
            "activity_id",
            "rebate_no",
            unique=True,
            postgresql_where=text("reversed_at IS NULL"),
        ),
        CheckConstraint(
            "(reversed_at IS NULL) = (reversal IS NULL) AND reversal IN ('clawed_back', 'review')",
            name="rebates_reversal_check",
        ),
        UniqueConstraint("rebate_id", "referrer_member_id", name="rebates_id_member_key"),
        CheckConstraint("rebate_no >= 1", name="rebates_no_check"),
        CheckConstraint("(amount_cents IS NULL) <> (template_id IS NULL)", name="rebates_kind_check"),
        CheckConstraint(
            "(credited_at IS NOT NULL) = (amount_cents IS NOT NULL OR code IS NOT NULL)",
            name="rebates_credited_check",
        ),
    )

    rebate_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    referrer_member_id: Mapped[int] = mapped_column(BigInteger)
    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.activity_id"))
    rebate_no: Mapped[int] = mapped_column(Integer)
    amount_cents: Mapped[int | None] = mapped_column(BigInteger)
    template_id: Mapped[int | None] = mapped_column(ForeignKey("coupon_templates.template_id"))
    code: Mapped[str | None] = mapped_column(String(16))
    earned_at: Mapped[datetime] = _now()
    credited_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reversed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reversal: Mapped[str | None] = mapped_column(String(12))


class HeldCredit(Base):
    """A bound claim whose credit waits for its member to register (activities
    with ``hold_until_registered``); the promise then runs from registration."""

    __tablename__ = "held_credits"

    claim_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("claims.claim_id"), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.member_id"), index=True)
    held_at: Mapped[datetime] = _now()
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LifecycleRefusal(Base):
    """An illegal transition asked for by a message or an operator, kept with
    its reason (once per event, subject and reason) instead of retried."""

    __tablename__ = "lifecycle_refusals"
    __table_args__ = (UniqueConstraint("event_key", "subject", "reason", name="lifecycle_refusals_once_key"),)

    refusal_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_key: Mapped[str] = mapped_column(String(120))
    subject: Mapped[str] = mapped_column(String(80))
    reason: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(Text, server_default="")
    created_at: Mapped[datetime] = _now()
