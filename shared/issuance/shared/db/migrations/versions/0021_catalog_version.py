"""the catalog's version: a number and a digest of the definition (channels,
activities, templates), bumped by every back-office change of it, compared
and set by ``issuance cells apply`` in every cell

Revision ID: 0021
Revises: 0020
Create Date: 2026-11-30 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_version",
        sa.Column("one_row", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("version", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("digest", sa.String(length=64), server_default=sa.text("''"), nullable=False),
        sa.Column("change", sa.String(length=64), nullable=True),
        sa.Column("previous_digest", sa.String(length=64), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("one_row", name="catalog_version_one_row_check"),
        sa.PrimaryKeyConstraint("one_row"),
    )
    # The row exists from the start: a change locks it, never races to insert it.
    op.execute("INSERT INTO catalog_version DEFAULT VALUES")


def downgrade() -> None:
    op.drop_table("catalog_version")
