"""back office: orders and coupon usage, referrals and rebates, held credits,
lifecycle refusals, rebate configuration of activities

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lifecycle_refusals",
        sa.Column("refusal_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("event_key", sa.String(length=120), nullable=False),
        sa.Column("subject", sa.String(length=80), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("refusal_id"),
        sa.UniqueConstraint("event_key", "subject", "reason", name="lifecycle_refusals_once_key"),
    )
    op.create_table(
        "orders",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=True),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("discount_cents", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("status", sa.String(length=12), server_default="placed", nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'cancelled') = (cancelled_at IS NOT NULL)", name="orders_cancelled_check"
        ),
        sa.CheckConstraint("(status = 'refunded') = (refunded_at IS NOT NULL)", name="orders_refunded_check"),
        sa.CheckConstraint(
            "(status IN ('paid', 'refunded')) = (paid_at IS NOT NULL)", name="orders_paid_check"
        ),
        sa.CheckConstraint(
            "status IN ('placed', 'paid', 'cancelled', 'refunded')", name="orders_status_check"
        ),
        sa.CheckConstraint(
            "amount_cents >= 0 AND discount_cents BETWEEN 0 AND amount_cents", name="orders_amount_check"
        ),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.activity_id"],
        ),
        sa.PrimaryKeyConstraint("order_id"),
    )
    op.create_index("orders_member_idx", "orders", ["member_id"], unique=False)
    op.create_table(
        "rebates",
        sa.Column("rebate_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("referrer_member_id", sa.BigInteger(), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=False),
        sa.Column("rebate_no", sa.Integer(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=True),
        sa.Column("template_id", sa.Integer(), nullable=True),
        sa.Column("code", sa.String(length=16), nullable=True),
        sa.Column("earned_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("credited_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("(amount_cents IS NULL) <> (template_id IS NULL)", name="rebates_kind_check"),
        sa.CheckConstraint(
            "(credited_at IS NOT NULL) = (amount_cents IS NOT NULL OR code IS NOT NULL)",
            name="rebates_credited_check",
        ),
        sa.CheckConstraint("rebate_no >= 1", name="rebates_no_check"),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.activity_id"],
        ),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["coupon_templates.template_id"],
        ),
        sa.PrimaryKeyConstraint("rebate_id"),
        sa.UniqueConstraint("rebate_id", "referrer_member_id", name="rebates_id_member_key"),
        sa.UniqueConstraint("referrer_member_id", "activity_id", "rebate_no", name="rebates_once_key"),
    )
    op.create_table(
        "held_credits",
        sa.Column("claim_id", sa.UUID(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("held_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["claim_id"],
            ["claims.claim_id"],
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.member_id"],
        ),
        sa.PrimaryKeyConstraint("claim_id"),
    )
    op.create_index(op.f("ix_held_credits_member_id"), "held_credits", ["member_id"], unique=False)
    op.create_table(
        "referrals",
        sa.Column("referee_member_id", sa.BigInteger(), nullable=False),
        sa.Column("referrer_member_id", sa.BigInteger(), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=False),
        sa.Column("share_id", sa.UUID(), nullable=False),
        sa.Column("claim_id", sa.UUID(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("counted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("referrer_member_id <> referee_member_id", name="referrals_not_self_check"),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.activity_id"],
        ),
        sa.ForeignKeyConstraint(
            ["claim_id"],
            ["claims.claim_id"],
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.order_id"],
        ),
        sa.ForeignKeyConstraint(
            ["referee_member_id"],
            ["members.member_id"],
        ),
        sa.ForeignKeyConstraint(
            ["share_id"],
            ["shares.share_id"],
        ),
        sa.PrimaryKeyConstraint("referee_member_id"),
        sa.UniqueConstraint("claim_id"),
        sa.UniqueConstraint("order_id"),
    )
    op.create_index(
        "referrals_referrer_idx", "referrals", ["referrer_member_id", "activity_id"], unique=False
    )
    op.add_column(
        "activities", sa.Column("rebate_every", sa.SmallInteger(), server_default="3", nullable=False)
    )
    op.add_column("activities", sa.Column("rebate_amount_cents", sa.Integer(), nullable=True))
    op.add_column("activities", sa.Column("rebate_template_id", sa.Integer(), nullable=True))
    op.create_foreign_key(
        "activities_rebate_template_fkey",
        "activities",
        "coupon_templates",
        ["rebate_template_id"],
        ["template_id"],
        use_alter=True,
    )
    op.add_column("codes", sa.Column("rebate_id", sa.BigInteger(), nullable=True))
    op.add_column("codes", sa.Column("order_id", sa.String(length=64), nullable=True))
    op.add_column("codes", sa.Column("used_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("codes", sa.Column("discount_cents", sa.BigInteger(), nullable=True))
    op.add_column("codes", sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key(
        "codes_rebate_member_fkey",
        "codes",
        "rebates",
        ["rebate_id", "member_id"],
        ["rebate_id", "referrer_member_id"],
    )
    op.create_foreign_key("codes_order_id_fkey", "codes", "orders", ["order_id"], ["order_id"])
    op.create_index(
        "codes_order_idx",
        "codes",
        ["order_id"],
        unique=False,
        postgresql_where=sa.text("order_id IS NOT NULL"),
    )
    op.create_index(
        "codes_unused_expiry_idx",
        "codes",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'unused'"),
    )
    op.create_index(
        "codes_rebate_idx",
        "codes",
        ["rebate_id"],
        unique=False,
        postgresql_where=sa.text("rebate_id IS NOT NULL"),
    )
    op.create_check_constraint("activities_rebate_every_check", "activities", "rebate_every >= 1")
    op.create_check_constraint(
        "activities_rebate_kind_check",
        "activities",
        "rebate_amount_cents IS NULL OR (rebate_amount_cents > 0 AND rebate_template_id IS NULL)",
    )
    # A code now belongs to a member through one claim or one rebate.
    op.drop_constraint("codes_binding_check", "codes", type_="check")
    op.create_check_constraint(
        "codes_binding_check", "codes", "(member_id IS NULL) = (claim_id IS NULL AND rebate_id IS NULL)"
    )
    op.create_check_constraint("codes_one_owner_check", "codes", "claim_id IS NULL OR rebate_id IS NULL")
    op.create_check_constraint(
        "codes_used_order_check", "codes", "(status = 'used') = (order_id IS NOT NULL)"
    )
    op.create_check_constraint(
        "codes_used_detail_check",
        "codes",
        "status <> 'used' OR (used_at IS NOT NULL AND discount_cents IS NOT NULL)",
    )


def downgrade() -> None:
    op.drop_constraint("codes_used_detail_check", "codes", type_="check")
    op.drop_constraint("codes_used_order_check", "codes", type_="check")
    op.drop_constraint("codes_one_owner_check", "codes", type_="check")
    op.drop_constraint("codes_binding_check", "codes", type_="check")
    op.create_check_constraint("codes_binding_check", "codes", "(member_id IS NULL) = (claim_id IS NULL)")
    op.drop_constraint("activities_rebate_kind_check", "activities", type_="check")
    op.drop_constraint("activities_rebate_every_check", "activities", type_="check")
    op.drop_index("codes_rebate_idx", table_name="codes")
    op.drop_index("codes_unused_expiry_idx", table_name="codes")
    op.drop_index("codes_order_idx", table_name="codes")
    op.drop_constraint("codes_order_id_fkey", "codes", type_="foreignkey")
    op.drop_constraint("codes_rebate_member_fkey", "codes", type_="foreignkey")
    op.drop_column("codes", "cancelled_at")
    op.drop_column("codes", "discount_cents")
    op.drop_column("codes", "used_at")
    op.drop_column("codes", "order_id")
    op.drop_column("codes", "rebate_id")
    op.drop_constraint("activities_rebate_template_fkey", "activities", type_="foreignkey")
    op.drop_column("activities", "rebate_template_id")
    op.drop_column("activities", "rebate_amount_cents")
    op.drop_column("activities", "rebate_every")
    op.drop_index("referrals_referrer_idx", table_name="referrals")
    op.drop_table("referrals")
    op.drop_index("ix_held_credits_member_id", table_name="held_credits")
    op.drop_table("held_credits")
    op.drop_table("rebates")
    op.drop_index("orders_member_idx", table_name="orders")
    op.drop_table("orders")
    op.drop_table("lifecycle_refusals")
