"""a claim row writes one index fewer: the unique (claim_id, member_id) key
is gone

Revision ID: 0019
Revises: 0015
Create Date: 2026-11-30 11:40:00

The key existed for a composite foreign key from codes and the wallet to
(claim, member). Since 0011 those are checked per statement against the
primary key (codes_owners_check), and nothing else uses it: every claim
paid for one more B-tree entry led by a random UUID, the same as its
primary key.
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("claims_id_member_key", "claims", type_="unique")


def downgrade() -> None:
    op.create_unique_constraint("claims_id_member_key", "claims", ["claim_id", "member_id"])
