"""ring slots handed from one cell to another: each member's ring slot, the
handover state of each slot a cell gives or receives, and the packages a
moved member already held in the cell it came from

Revision ID: 0022
Revises: 0021
Create Date: 2026-11-30 11:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The routing hash needs the number, which is not stored: the claim path
    # records the slot it computed, so a handover can find a slot's members.
    op.add_column("members", sa.Column("ring_slot", sa.SmallInteger(), nullable=True))
    op.add_column("members", sa.Column("moved_from", sa.String(length=63), nullable=True))
    op.add_column("members", sa.Column("moved_to", sa.String(length=63), nullable=True))
    op.add_column("members", sa.Column("moved_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint("members_ring_slot_check", "members", "ring_slot BETWEEN 0 AND 1023")
    op.create_table(
        "ring_handovers",
        sa.Column("slot", sa.SmallInteger(), nullable=False),
        sa.Column("from_cell", sa.String(length=63), nullable=False),
        sa.Column("to_cell", sa.String(length=63), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('leaving', 'holding', 'done')", name="ring_handovers_state_check"),
        sa.CheckConstraint("slot BETWEEN 0 AND 1023", name="ring_handovers_slot_check"),
        sa.PrimaryKeyConstraint("slot"),
    )
    op.create_table(
        "member_holdings",
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("activity_slug", sa.String(length=63), nullable=False),
        sa.Column("exclusivity_group", sa.String(length=100), nullable=False),
        sa.Column("from_cell", sa.String(length=63), nullable=False),
        sa.ForeignKeyConstraint(["member_id"], ["members.member_id"]),
        sa.PrimaryKeyConstraint("member_id", "activity_slug"),
    )


def downgrade() -> None:
    op.drop_table("member_holdings")
    op.drop_table("ring_handovers")
    op.drop_constraint("members_ring_slot_check", "members", type_="check")
    for column in ("moved_at", "moved_to", "moved_from", "ring_slot"):
        op.drop_column("members", column)
