"""observability: taken codes per template, recent credits

Revision ID: 0003
Revises: 0001 (depends on 0002)
Create Date: 2026-11-23 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
# The index covers columns that the back-office migration adds to codes.
depends_on = "0002"


def upgrade() -> None:
    op.create_index(
        "codes_taken_idx",
        "codes",
        ["template_id", "status"],
        unique=False,
        postgresql_include=["order_id", "discount_cents"],
        postgresql_where=sa.text("status <> 'available'"),
    )
    op.create_index(
        "claims_credited_idx",
        "claims",
        ["credited_at"],
        unique=False,
        postgresql_where=sa.text("status = 'credited'"),
    )


def downgrade() -> None:
    op.drop_index("claims_credited_idx", table_name="claims", postgresql_where=sa.text("status = 'credited'"))
    op.drop_index("codes_taken_idx", table_name="codes", postgresql_where=sa.text("status <> 'available'"))
