"""core schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 13:36:50.582612
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "channels",
        sa.Column("channel_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("channel_id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "dead_letters",
        sa.Column("dead_letter_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("message_key", sa.String(length=80), nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("dead_letter_id"),
        sa.UniqueConstraint("message_key", "reason", name="dead_letters_once_key"),
    )
    op.create_table(
        "members",
        sa.Column("member_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("phone_digest", sa.LargeBinary(length=32), nullable=True),
        sa.Column("phone_masked", sa.String(length=24), server_default="", nullable=False),
        sa.Column("status", sa.String(length=12), server_default="pending", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'registered')", name="members_status_check"),
        sa.PrimaryKeyConstraint("member_id"),
        sa.UniqueConstraint("phone_digest"),
    )
    op.create_table(
        "share_opens",
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("share_id", sa.UUID(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index("share_opens_share_idx", "share_opens", ["share_id"], unique=False)
    op.create_table(
        "activities",
        sa.Column("activity_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("slug", sa.String(length=63), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("banner_url", sa.Text(), server_default="", nullable=False),
        sa.Column("copy", sa.Text(), server_default="", nullable=False),
        sa.Column("rules", sa.Text(), server_default="", nullable=False),
        sa.Column("brand", sa.String(length=200), server_default="", nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("timezone", sa.String(length=64), server_default="Asia/Shanghai", nullable=False),
        sa.Column("online", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("budget", sa.Integer(), nullable=False),
        sa.Column("exclusivity_group", sa.String(length=100), nullable=False),
        sa.Column("validity_days", sa.Integer(), nullable=True),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("hold_until_registered", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'", name="activities_slug_check"),
        sa.CheckConstraint(
            "(validity_days IS NOT NULL AND validity_days BETWEEN 0 AND 3650) OR (valid_until IS NOT NULL)",
            name="activities_validity_check",
        ),
        sa.CheckConstraint("budget >= 0", name="activities_budget_check"),
        sa.CheckConstraint("ends_at > starts_at", name="activities_window_check"),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["channels.channel_id"],
        ),
        sa.PrimaryKeyConstraint("activity_id"),
        sa.UniqueConstraint("activity_id", "exclusivity_group", name="activities_id_group_key"),
        sa.UniqueConstraint("slug"),
    )
    op.create_table(
        "coupon_templates",
        sa.Column("template_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.SmallInteger(), nullable=False),
        sa.Column("prefix", sa.String(length=6), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.Column("threshold_cents", sa.Integer(), server_default="0", nullable=False),
        sa.Column("new_user_only", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("title", sa.String(length=200), server_default="", nullable=False),
        sa.CheckConstraint(
            "kind IN ('discount_rate', 'amount_off', 'gift')", name="coupon_templates_kind_check"
        ),
        sa.CheckConstraint("position BETWEEN 1 AND 5", name="coupon_templates_position_check"),
        sa.CheckConstraint("value >= 0 AND threshold_cents >= 0", name="coupon_templates_value_check"),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.activity_id"],
        ),
        sa.PrimaryKeyConstraint("template_id"),
        sa.UniqueConstraint("activity_id", "position", name="coupon_templates_position_key"),
        sa.UniqueConstraint("prefix"),
    )
    op.create_table(
        "package_slots",
        sa.Column("activity_id", sa.Integer(), nullable=False),
        sa.Column("slot_no", sa.Integer(), nullable=False),
        sa.Column("taken", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.activity_id"],
        ),
        sa.PrimaryKeyConstraint("activity_id", "slot_no"),
    )
    op.create_table(
        "shares",
        sa.Column("share_id", sa.UUID(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=True),
        sa.Column("referrer_member_id", sa.BigInteger(), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.activity_id"],
        ),
        sa.PrimaryKeyConstraint("share_id"),
        sa.UniqueConstraint("order_id"),
    )
    op.create_table(
        "claims",
        sa.Column("claim_id", sa.UUID(), nullable=False),
        sa.Column("activity_slug", sa.String(length=63), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=True),
        sa.Column("exclusivity_group", sa.String(length=100), nullable=True),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("share_id", sa.UUID(), nullable=True),
        sa.Column("slot_no", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("new_member", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("payload_digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("credited_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("(status = 'credited') = (credited_at IS NOT NULL)", name="claims_credited_check"),
        sa.CheckConstraint("(status = 'refused') = (reason IS NOT NULL)", name="claims_reason_check"),
        sa.CheckConstraint(
            "status = 'refused' OR (member_id IS NOT NULL AND slot_no IS NOT NULL AND activity_id IS NOT NULL AND exclusivity_group IS NOT NULL)",
            name="claims_granted_check",
        ),
        sa.CheckConstraint("status IN ('refused', 'bound', 'credited')", name="claims_status_check"),
        sa.ForeignKeyConstraint(
            ["activity_id", "exclusivity_group"],
            ["activities.activity_id", "activities.exclusivity_group"],
            name="claims_activity_group_fkey",
            onupdate="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["activity_id", "slot_no"],
            ["package_slots.activity_id", "package_slots.slot_no"],
            name="claims_slot_fkey",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.member_id"],
        ),
        sa.PrimaryKeyConstraint("claim_id"),
        sa.UniqueConstraint("activity_id", "slot_no", name="claims_slot_key"),
        sa.UniqueConstraint("claim_id", "member_id", name="claims_id_member_key"),
    )
    op.create_index("claims_member_idx", "claims", ["member_id"], unique=False)
    op.create_index(
        "claims_one_package_per_activity",
        "claims",
        ["activity_id", "member_id"],
        unique=True,
        postgresql_where=sa.text("status <> 'refused'"),
    )
    op.create_index(
        "claims_one_package_per_group",
        "claims",
        ["exclusivity_group", "member_id"],
        unique=True,
        postgresql_where=sa.text("status <> 'refused'"),
    )
    op.create_index(
        "claims_uncredited_idx",
        "claims",
        ["deadline"],
        unique=False,
        postgresql_where=sa.text("status = 'bound'"),
    )
    op.create_table(
        "code_batches",
        sa.Column("batch_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("template_id", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["coupon_templates.template_id"],
        ),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    op.create_table(
        "codes",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("template_id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=12), server_default="available", nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("claim_id", sa.UUID(), nullable=True),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'available') = (member_id IS NULL) OR status = 'cancelled'",
            name="codes_bound_status_check",
        ),
        sa.CheckConstraint(
            "status IN ('available', 'unused', 'used', 'expired', 'cancelled')", name="codes_status_check"
        ),
        sa.CheckConstraint("(member_id IS NULL) = (claim_id IS NULL)", name="codes_binding_check"),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["code_batches.batch_id"],
        ),
        sa.ForeignKeyConstraint(
            ["claim_id", "member_id"], ["claims.claim_id", "claims.member_id"], name="codes_claim_member_fkey"
        ),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["coupon_templates.template_id"],
        ),
        sa.PrimaryKeyConstraint("code"),
        sa.UniqueConstraint("claim_id", "template_id", name="codes_one_per_template_key"),
        sa.UniqueConstraint("code", "claim_id", "member_id", name="codes_binding_key"),
    )
    op.create_index(
        "codes_available_idx",
        "codes",
        ["template_id", "code"],
        unique=False,
        postgresql_where=sa.text("status = 'available'"),
    )
    op.create_index("codes_batch_idx", "codes", ["batch_id"], unique=False)
    op.create_table(
        "wallet_ledger",
        sa.Column("entry_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("claim_id", sa.UUID(), nullable=False),
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("credited_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["claim_id"],
            ["claims.claim_id"],
        ),
        sa.ForeignKeyConstraint(
            ["code", "claim_id", "member_id"],
            ["codes.code", "codes.claim_id", "codes.member_id"],
            name="wallet_code_binding_fkey",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.member_id"],
        ),
        sa.PrimaryKeyConstraint("entry_id"),
        sa.UniqueConstraint("claim_id", "code", name="wallet_one_credit_per_claim_code"),
    )
    op.create_index("wallet_member_idx", "wallet_ledger", ["member_id"], unique=False)


def downgrade() -> None:

    op.drop_index("wallet_member_idx", table_name="wallet_ledger")
    op.drop_table("wallet_ledger")
    op.drop_index("codes_batch_idx", table_name="codes")
    op.drop_index("codes_available_idx", table_name="codes", postgresql_where=sa.text("status = 'available'"))
    op.drop_table("codes")
    op.drop_table("code_batches")
    op.drop_index("claims_uncredited_idx", table_name="claims", postgresql_where=sa.text("status = 'bound'"))
    op.drop_index(
        "claims_one_package_per_group", table_name="claims", postgresql_where=sa.text("status <> 'refused'")
    )
    op.drop_index(
        "claims_one_package_per_activity",
        table_name="claims",
        postgresql_where=sa.text("status <> 'refused'"),
    )
    op.drop_index("claims_member_idx", table_name="claims")
    op.drop_table("claims")
    op.drop_table("shares")
    op.drop_table("package_slots")
    op.drop_table("coupon_templates")
    op.drop_table("activities")
    op.drop_index("share_opens_share_idx", table_name="share_opens")
    op.drop_table("share_opens")
    op.drop_table("members")
    op.drop_table("dead_letters")
    op.drop_table("channels")
