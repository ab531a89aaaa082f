"""phone key IDs: every member's digest says which phone key made it

Revision ID: 0013
Revises: 0009
Create Date: 2026-11-30 08:10:00

A number is looked up under the current key and every older one still
configured, and re-keyed to the current one when found (issuance.shared.db.store):
rows written before this revision were all made with the single key, ID "1".
The default keeps writers that do not name a key (older releases during a
rolling upgrade) correct for the single-key deployment they run in.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: PostgreSQL 11+ adds the column without rewriting the table.
    op.add_column(
        "members",
        sa.Column("phone_key_id", sa.String(length=16), server_default=sa.text("'1'"), nullable=False),
    )
    # No index: re-keying finds members by digest (unique already), and
    # `issuance phone-keys status` counting members per key in one scan is
    # cheaper than one more index written by every new member.


def downgrade() -> None:
    op.drop_column("members", "phone_key_id")
