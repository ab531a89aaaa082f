"""back office web app: users, the audit log, budget approvals, the session key

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 05:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


# The audit log is written, never rewritten: not by the back office, not by
# a hand-typed UPDATE. (A user with audit entries cannot be deleted either,
# by the foreign key: users are deactivated.)
APPEND_ONLY = """
CREATE FUNCTION office_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "office_users",
        sa.Column("user_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=12), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_sign_in_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_sign_ins", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('viewer', 'operator', 'approver')", name="office_users_role_check"),
        sa.CheckConstraint("name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'", name="office_users_name_check"),
        sa.PrimaryKeyConstraint("user_id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "office_audit",
        sa.Column("audit_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("subject_kind", sa.String(length=40), nullable=False),
        sa.Column("subject_key", sa.String(length=120), nullable=False),
        sa.Column("before", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("after", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["office_users.user_id"]),
        sa.PrimaryKeyConstraint("audit_id"),
    )
    op.execute(APPEND_ONLY)
    op.execute(
        "CREATE TRIGGER office_audit_append_only BEFORE UPDATE OR DELETE ON office_audit"
        " FOR EACH ROW EXECUTE FUNCTION office_audit_append_only()"
    )
    op.create_index("office_audit_at_idx", "office_audit", ["at"])
    op.create_index("office_audit_subject_idx", "office_audit", ["subject_kind", "subject_key", "audit_id"])
    op.create_table(
        "office_budget_approvals",
        sa.Column("approval_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=False),
        sa.Column("budget", sa.Integer(), nullable=False),
        sa.Column("go_online", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=12), server_default="pending", nullable=False),
        sa.Column("requested_by", sa.Integer(), nullable=False),
        sa.Column(
            "requested_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("decided_by", sa.Integer(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'rejected', 'withdrawn')",
            name="office_budget_approvals_status_check",
        ),
        sa.CheckConstraint(
            "(status = 'pending') = (decided_at IS NULL AND decided_by IS NULL)",
            name="office_budget_approvals_decided_check",
        ),
        sa.ForeignKeyConstraint(["activity_id"], ["activities.activity_id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["decided_by"], ["office_users.user_id"]),
        sa.ForeignKeyConstraint(["requested_by"], ["office_users.user_id"]),
        sa.PrimaryKeyConstraint("approval_id"),
    )
    op.create_index(
        "office_budget_approvals_one_pending",
        "office_budget_approvals",
        ["activity_id"],
        unique=True,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "office_session_keys",
        sa.Column("key_id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("secret", sa.LargeBinary(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("key_id"),
    )


def downgrade() -> None:
    op.drop_table("office_session_keys")
    op.drop_index("office_budget_approvals_one_pending", table_name="office_budget_approvals")
    op.drop_table("office_budget_approvals")
    op.drop_index("office_audit_subject_idx", table_name="office_audit")
    op.drop_index("office_audit_at_idx", table_name="office_audit")
    op.drop_table("office_audit")
    op.execute("DROP FUNCTION office_audit_append_only()")
    op.drop_table("office_users")
