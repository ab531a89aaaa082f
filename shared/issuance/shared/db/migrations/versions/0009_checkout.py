"""checkout: coupons reserved at order creation, redeemed at payment,
released on cancellation or timeout; a code live in at most one order

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 06:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkout_reservations",
        sa.Column("reservation_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=10), server_default="reserved", nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("discount_cents", sa.BigInteger(), nullable=False),
        sa.Column("reserved_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("hold_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("redeemed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("release_reason", sa.String(length=20), nullable=True),
        sa.CheckConstraint(
            "state IN ('reserved', 'redeemed', 'released')", name="checkout_reservations_state_check"
        ),
        sa.CheckConstraint(
            "amount_cents >= 0 AND items >= 0 AND discount_cents BETWEEN 0 AND amount_cents",
            name="checkout_reservations_amount_check",
        ),
        sa.CheckConstraint(
            "(state = 'redeemed') = (redeemed_at IS NOT NULL)", name="checkout_reservations_redeemed_check"
        ),
        sa.CheckConstraint(
            "(state = 'released') = (released_at IS NOT NULL AND release_reason IS NOT NULL)",
            name="checkout_reservations_released_check",
        ),
        sa.ForeignKeyConstraint(["code"], ["codes.code"]),
        sa.ForeignKeyConstraint(["order_id"], ["orders.order_id"]),
        sa.PrimaryKeyConstraint("reservation_id"),
        sa.UniqueConstraint("order_id", "code", name="checkout_reservations_order_code_key"),
    )
    # The guarantee: one code, at most one live reservation or redemption.
    op.create_index(
        "checkout_reservations_live_code_key",
        "checkout_reservations",
        ["code"],
        unique=True,
        postgresql_where=sa.text("state IN ('reserved', 'redeemed')"),
    )
    op.create_index(
        "checkout_reservations_hold_idx",
        "checkout_reservations",
        ["hold_until"],
        unique=False,
        postgresql_where=sa.text("state = 'reserved'"),
    )


def downgrade() -> None:
    op.drop_index("checkout_reservations_hold_idx", table_name="checkout_reservations")
    op.drop_index("checkout_reservations_live_code_key", table_name="checkout_reservations")
    op.drop_table("checkout_reservations")
