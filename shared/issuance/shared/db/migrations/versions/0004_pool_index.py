"""pool index keyed by template alone, an index of free package slots; joins the back-office and
observability branches

Revision ID: 0004
Revises: 0002, 0003
Create Date: 2026-11-23 14:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = ("0002", "0003")
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "package_slots_free_idx", "package_slots", ["activity_id"], postgresql_where=sa.text("NOT taken")
    )
    op.drop_index("codes_available_idx", table_name="codes", postgresql_where=sa.text("status = 'available'"))
    op.create_index(
        "codes_available_idx", "codes", ["template_id"], postgresql_where=sa.text("status = 'available'")
    )


def downgrade() -> None:
    op.drop_index("package_slots_free_idx", table_name="package_slots", postgresql_where=sa.text("NOT taken"))
    op.drop_index("codes_available_idx", table_name="codes", postgresql_where=sa.text("status = 'available'"))
    op.create_index(
        "codes_available_idx",
        "codes",
        ["template_id", "code"],
        postgresql_where=sa.text("status = 'available'"),
    )
