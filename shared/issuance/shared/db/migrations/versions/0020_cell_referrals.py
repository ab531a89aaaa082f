"""cells: referrals counted in the referee's cell for a referrer of this one,
what the referrer's rebates are counted from alongside its own referrals

Revision ID: 0020
Revises: 0019
Create Date: 2026-11-30 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cell_referrals",
        sa.Column("referee_member_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("referrer_member_id", sa.BigInteger(), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=False),
        sa.Column("share_id", sa.UUID(), nullable=False),
        sa.Column("claim_id", sa.UUID(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("counted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reversed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("referrer_member_id <> referee_member_id", name="cell_referrals_not_self_check"),
        sa.ForeignKeyConstraint(["activity_id"], ["activities.activity_id"]),
        sa.ForeignKeyConstraint(["share_id"], ["shares.share_id"]),
        sa.PrimaryKeyConstraint("referee_member_id"),
        sa.UniqueConstraint("claim_id"),
        sa.UniqueConstraint("order_id"),
    )
    op.create_index(
        "cell_referrals_standing_idx",
        "cell_referrals",
        ["referrer_member_id", "activity_id"],
        unique=False,
        postgresql_where=sa.text("reversed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("cell_referrals_standing_idx", table_name="cell_referrals")
    op.drop_table("cell_referrals")
