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
