"""fewer index entries and key checks per granted claim: the member-first unique index serves member
lookups; the wallet's binding key implies its claim and member keys; no index of codes by batch

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

GRANTED = sa.text("status <> 'refused'")


def upgrade() -> None:
    op.drop_index("claims_one_package_per_activity", table_name="claims", postgresql_where=GRANTED)
    op.create_index(
        "claims_one_package_per_activity",
        "claims",
        ["member_id", "activity_id"],
        unique=True,
        postgresql_where=GRANTED,
    )
    op.drop_index("claims_member_idx", table_name="claims")
    op.drop_constraint("wallet_ledger_claim_id_fkey", "wallet_ledger", type_="foreignkey")
    op.drop_constraint("wallet_ledger_member_id_fkey", "wallet_ledger", type_="foreignkey")
    op.drop_index("codes_batch_idx", table_name="codes")


def downgrade() -> None:
    op.create_index("codes_batch_idx", "codes", ["batch_id"])
    op.create_foreign_key(
        "wallet_ledger_member_id_fkey", "wallet_ledger", "members", ["member_id"], ["member_id"]
    )
    op.create_foreign_key(
        "wallet_ledger_claim_id_fkey", "wallet_ledger", "claims", ["claim_id"], ["claim_id"]
    )
    op.create_index("claims_member_idx", "claims", ["member_id"])
    op.drop_index("claims_one_package_per_activity", table_name="claims", postgresql_where=GRANTED)
    op.create_index(
        "claims_one_package_per_activity",
        "claims",
        ["activity_id", "member_id"],
        unique=True,
        postgresql_where=GRANTED,
    )
