"""coupon rules as data on the template (scope, stacking, priority,
per-person count), the app's member ID next to the phone-based member, the
cities or provinces an activity is limited to, and the channel of a claim

Revision ID: 0014
Revises: 0009
Create Date: 2026-11-30 08:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

RULES_CHECK = (
    "min_items >= 0 AND min_member_level >= 0 AND priority BETWEEN 0 AND 1000"
    " AND (per_person_limit IS NULL OR per_person_limit >= 1)"
)
SCOPES = ("scope_products", "scope_categories", "scope_stores")


def upgrade() -> None:
    for name in SCOPES:
        op.add_column(
            "coupon_templates",
            sa.Column(
                name, postgresql.ARRAY(sa.String(length=64)), server_default=sa.text("'{}'"), nullable=False
            ),
        )
    op.add_column(
        "coupon_templates", sa.Column("min_items", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "coupon_templates",
        sa.Column("min_member_level", sa.SmallInteger(), server_default="0", nullable=False),
    )
    op.add_column(
        "coupon_templates",
        sa.Column("stackable", sa.Boolean(), server_default=sa.text("true"), nullable=False),
    )
    op.add_column(
        "coupon_templates", sa.Column("priority", sa.SmallInteger(), server_default="0", nullable=False)
    )
    op.add_column("coupon_templates", sa.Column("per_person_limit", sa.Integer(), nullable=True))
    op.create_check_constraint("coupon_templates_rules_check", "coupon_templates", RULES_CHECK)
    op.add_column(
        "activities",
        sa.Column(
            "regions", postgresql.ARRAY(sa.String(length=64)), server_default=sa.text("'{}'"), nullable=False
        ),
    )
    op.create_table(
        "claim_channels",
        sa.Column("claim_id", sa.UUID(), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["claim_id"], ["claims.claim_id"]),
        sa.PrimaryKeyConstraint("claim_id"),
    )
    # The app's own member ID: one app member is one phone-based member.
    op.add_column("members", sa.Column("app_member_id", sa.BigInteger(), nullable=True))
    op.create_unique_constraint("members_app_member_id_key", "members", ["app_member_id"])


def downgrade() -> None:
    op.drop_constraint("members_app_member_id_key", "members", type_="unique")
    op.drop_column("members", "app_member_id")
    op.drop_column("activities", "regions")
    op.drop_table("claim_channels")
    op.drop_constraint("coupon_templates_rules_check", "coupon_templates", type_="check")
    for name in ("per_person_limit", "priority", "stackable", "min_member_level", "min_items", *SCOPES):
        op.drop_column("coupon_templates", name)
