"""The checkout's own table: a coupon reserved by an order at its creation,
redeemed at payment, or released on cancellation or timeout. It shares the
metadata of :mod:`issuance.shared.db.models`, so one Alembic history
describes the whole schema (migration 0009)."""

from __future__ import annotations

from datetime import datetime

from issuance.shared.db.models import Base
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

LIVE = "state IN ('reserved', 'redeemed')"


class Reservation(Base):
    """One code held by one order. The partial unique index on ``code`` is
    the guarantee: a code has at most one live reservation or redemption,
    whatever the code above it does, so two checkouts racing for one code
    cannot both win."""

    __tablename__ = "checkout_reservations"
    __table_args__ = (
        CheckConstraint(
            "state IN ('reserved', 'redeemed', 'released')", name="checkout_reservations_state_check"
        ),
        CheckConstraint(
            "amount_cents >= 0 AND items >= 0 AND discount_cents BETWEEN 0 AND amount_cents",
            name="checkout_reservations_amount_check",
        ),
        CheckConstraint(
            "(state = 'redeemed') = (redeemed_at IS NOT NULL)", name="checkout_reservations_redeemed_check"
        ),
        CheckConstraint(
            "(state = 'released') = (released_at IS NOT NULL AND release_reason IS NOT NULL)",
            name="checkout_reservations_released_check",
        ),
        UniqueConstraint("order_id", "code", name="checkout_reservations_order_code_key"),
        Index("checkout_reservations_live_code_key", "code", unique=True, postgresql_where=text(LIVE)),
        # The timeout sweep reads only reservations still waiting for payment.
        Index("checkout_reservations_hold_idx", "hold_until", postgresql_where=text("state = 'reserved'")),
    )

    reservation_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.order_id"))
    code: Mapped[str] = mapped_column(ForeignKey("codes.code"))
    member_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(10), server_default="reserved")
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    items: Mapped[int] = mapped_column(Integer)
    discount_cents: Mapped[int] = mapped_column(BigInteger)
    reserved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    hold_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    redeemed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    release_reason: Mapped[str | None] = mapped_column(String(20))


class CodeWriteOff(Base):
    """A code redeemed without an order (migration 0015): a gift coupon or a
    partner's or printed code, written off by an operator or a partner. The
    audit record: who, through which channel, why, when, and whose it was.
    One per code: writing it off again finds this row."""

    __tablename__ = "code_writeoffs"
    __table_args__ = (
        CheckConstraint("channel IN ('operator', 'partner')", name="code_writeoffs_channel_check"),
        CheckConstraint(
            "length(written_off_by) > 0 AND length(reason) > 0", name="code_writeoffs_audit_check"
        ),
    )

    code: Mapped[str] = mapped_column(ForeignKey("codes.code"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(8))
    written_off_by: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(200))
    member_id: Mapped[int | None] = mapped_column(BigInteger)
    written_off_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PromoCode(Base):
    """A shared promo code: one string many members use, with the rules of
    its template. ``uses`` counts its live uses (reserved or redeemed); the
    check keeps it within ``max_uses`` whatever the code above does, and a
    use is taken by one conditional UPDATE, so racing checkouts cannot pass
    the cap."""

    __tablename__ = "promo_codes"
    __table_args__ = (
        CheckConstraint("uses BETWEEN 0 AND max_uses", name="promo_codes_cap_check"),
        CheckConstraint(
            "max_uses >= 1 AND (per_member_limit IS NULL OR per_member_limit >= 1)",
            name="promo_codes_limits_check",
        ),
        CheckConstraint(
            "valid_from IS NULL OR valid_until IS NULL OR valid_from < valid_until",
            name="promo_codes_window_check",
        ),
        UniqueConstraint("code", name="promo_codes_code_key"),
    )

    promo_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    code: Mapped[str] = mapped_column(String(32))
    template_id: Mapped[int] = mapped_column(ForeignKey("coupon_templates.template_id"))
    valid_from: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    valid_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    max_uses: Mapped[int] = mapped_column(Integer)
    per_member_limit: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PromoMemberUses(Base):
    """A member's live uses of a promo code, taken by a conditional upsert
    under the code's per-member limit."""

    __tablename__ = "promo_member_uses"
    __table_args__ = (CheckConstraint("uses >= 0", name="promo_member_uses_uses_check"),)

    promo_id: Mapped[int] = mapped_column(ForeignKey("promo_codes.promo_id"), primary_key=True)
    member_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    uses: Mapped[int] = mapped_column(Integer)


class PromoUse(Base):
    """One use of a promo code by one order, held, redeemed or released like
    a coupon's reservation; one per (promo, order), so asking again by order
    ID finds it. A refund that voids it keeps it redeemed with ``voided_at``."""

    __tablename__ = "promo_uses"
    __table_args__ = (
        CheckConstraint("state IN ('reserved', 'redeemed', 'released')", name="promo_uses_state_check"),
        CheckConstraint(
            "amount_cents >= 0 AND items >= 0 AND discount_cents BETWEEN 0 AND amount_cents",
            name="promo_uses_amount_check",
        ),
        CheckConstraint("(state = 'redeemed') = (redeemed_at IS NOT NULL)", name="promo_uses_redeemed_check"),
        CheckConstraint(
            "(state = 'released') = (released_at IS NOT NULL AND release_reason IS NOT NULL)",
            name="promo_uses_released_check",
        ),
        CheckConstraint("voided_at IS NULL OR state = 'redeemed'", name="promo_uses_voided_check"),
        UniqueConstraint("promo_id", "order_id", name="promo_uses_promo_order_key"),
        Index("promo_uses_order_idx", "order_id"),
        Index("promo_uses_hold_idx", "hold_until", postgresql_where=text("state = 'reserved'")),
    )

    use_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    promo_id: Mapped[int] = mapped_column(ForeignKey("promo_codes.promo_id"))
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.order_id"))
    member_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(10), server_default="reserved")
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    items: Mapped[int] = mapped_column(Integer)
    discount_cents: Mapped[int] = mapped_column(BigInteger)
    reserved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    hold_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    redeemed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    release_reason: Mapped[str | None] = mapped_column(String(20))
    voided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
