"""redemptions without an order and shared promo codes: gift coupons and
partner or printed codes written off with an audit record; one promo code
string many members use, up to a cap the database holds

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30 09:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

CODE_STATES = "('available', 'unused', 'used', 'expired', 'cancelled', 'voided', 'written_off')"
OLD_CODE_STATES = "('available', 'unused', 'used', 'expired', 'cancelled', 'voided')"
BOUND = "(status = 'available') = (member_id IS NULL) OR status IN ('cancelled', 'written_off')"
OLD_BOUND = "(status = 'available') = (member_id IS NULL) OR status = 'cancelled'"
PROMO_USE_STATES = "state IN ('reserved', 'redeemed', 'released')"


def upgrade() -> None:
    # A code written off without an order: a gift coupon in a wallet, or a
    # partner's or printed code never bound to a member.
    op.drop_constraint("codes_status_check", "codes", type_="check")
    op.create_check_constraint("codes_status_check", "codes", f"status IN {CODE_STATES}")
    op.drop_constraint("codes_bound_status_check", "codes", type_="check")
    op.create_check_constraint("codes_bound_status_check", "codes", BOUND)
    op.create_table(
        "code_writeoffs",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("written_off_by", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("written_off_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("channel IN ('operator', 'partner')", name="code_writeoffs_channel_check"),
        sa.CheckConstraint(
            "length(written_off_by) > 0 AND length(reason) > 0", name="code_writeoffs_audit_check"
        ),
        sa.ForeignKeyConstraint(["code"], ["codes.code"]),
        sa.PrimaryKeyConstraint("code"),
    )
    op.create_table(
        "promo_codes",
        sa.Column("promo_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("template_id", sa.Integer(), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("per_member_limit", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("uses BETWEEN 0 AND max_uses", name="promo_codes_cap_check"),
        sa.CheckConstraint(
            "max_uses >= 1 AND (per_member_limit IS NULL OR per_member_limit >= 1)",
            name="promo_codes_limits_check",
        ),
        sa.CheckConstraint(
            "valid_from IS NULL OR valid_until IS NULL OR valid_from < valid_until",
            name="promo_codes_window_check",
        ),
        sa.ForeignKeyConstraint(["template_id"], ["coupon_templates.template_id"]),
        sa.PrimaryKeyConstraint("promo_id"),
        sa.UniqueConstraint("code", name="promo_codes_code_key"),
    )
    op.create_table(
        "promo_member_uses",
        sa.Column("promo_id", sa.BigInteger(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.CheckConstraint("uses >= 0", name="promo_member_uses_uses_check"),
        sa.ForeignKeyConstraint(["promo_id"], ["promo_codes.promo_id"]),
        sa.PrimaryKeyConstraint("promo_id", "member_id"),
    )
    op.create_table(
        "promo_uses",
        sa.Column("use_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("promo_id", sa.BigInteger(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=10), server_default="reserved", nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("discount_cents", sa.BigInteger(), nullable=False),
        sa.Column("reserved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hold_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("redeemed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("release_reason", sa.String(length=20), nullable=True),
        sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(PROMO_USE_STATES, name="promo_uses_state_check"),
        sa.CheckConstraint(
            "amount_cents >= 0 AND items >= 0 AND discount_cents BETWEEN 0 AND amount_cents",
            name="promo_uses_amount_check",
        ),
        sa.CheckConstraint(
            "(state = 'redeemed') = (redeemed_at IS NOT NULL)", name="promo_uses_redeemed_check"
        ),
        sa.CheckConstraint(
            "(state = 'released') = (released_at IS NOT NULL AND release_reason IS NOT NULL)",
            name="promo_uses_released_check",
        ),
        sa.CheckConstraint("voided_at IS NULL OR state = 'redeemed'", name="promo_uses_voided_check"),
        sa.ForeignKeyConstraint(["order_id"], ["orders.order_id"]),
        sa.ForeignKeyConstraint(["promo_id"], ["promo_codes.promo_id"]),
        sa.PrimaryKeyConstraint("use_id"),
        sa.UniqueConstraint("promo_id", "order_id", name="promo_uses_promo_order_key"),
    )
    op.create_index("promo_uses_order_idx", "promo_uses", ["order_id"], unique=False)
    op.create_index(
        "promo_uses_hold_idx",
        "promo_uses",
        ["hold_until"],
        unique=False,
        postgresql_where=sa.text("state = 'reserved'"),
    )


def downgrade() -> None:
    op.drop_index("promo_uses_hold_idx", table_name="promo_uses")
    op.drop_index("promo_uses_order_idx", table_name="promo_uses")
    op.drop_table("promo_uses")
    op.drop_table("promo_member_uses")
    op.drop_table("promo_codes")
    op.drop_table("code_writeoffs")
    op.execute("UPDATE codes SET status = 'cancelled' WHERE status = 'written_off'")
    op.drop_constraint("codes_bound_status_check", "codes", type_="check")
    op.create_check_constraint("codes_bound_status_check", "codes", OLD_BOUND)
    op.drop_constraint("codes_status_check", "codes", type_="check")
    op.create_check_constraint("codes_status_check", "codes", f"status IN {OLD_CODE_STATES}")
