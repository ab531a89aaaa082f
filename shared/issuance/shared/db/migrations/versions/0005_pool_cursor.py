"""codes in generation order; pool and free-slot indexes that a claim can enter where the last one
stopped

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 16:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

AVAILABLE = sa.text("status = 'available'")
FREE = sa.text("NOT taken")


def upgrade() -> None:
    # Existing codes are numbered in their physical order (the table is rewritten once).
    op.add_column("codes", sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False))
    op.drop_index("codes_available_idx", table_name="codes", postgresql_where=AVAILABLE)
    op.create_index("codes_available_idx", "codes", ["template_id", "seq"], postgresql_where=AVAILABLE)
    op.drop_index("package_slots_free_idx", table_name="package_slots", postgresql_where=FREE)
    op.create_index(
        "package_slots_free_idx", "package_slots", ["activity_id", "slot_no"], postgresql_where=FREE
    )


def downgrade() -> None:
    op.drop_index("package_slots_free_idx", table_name="package_slots", postgresql_where=FREE)
    op.create_index("package_slots_free_idx", "package_slots", ["activity_id"], postgresql_where=FREE)
    op.drop_index("codes_available_idx", table_name="codes", postgresql_where=AVAILABLE)
    op.create_index("codes_available_idx", "codes", ["template_id"], postgresql_where=AVAILABLE)
    op.drop_column("codes", "seq")
