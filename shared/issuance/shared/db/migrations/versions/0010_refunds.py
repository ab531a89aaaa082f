"""refunds: voided coupons, fulfilled orders and who refunded them,
referrals reversed and rebates taken back

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

CODE_STATES = "('available', 'unused', 'used', 'expired', 'cancelled', 'voided')"
OLD_CODE_STATES = "('available', 'unused', 'used', 'expired', 'cancelled')"

# A voided coupon is final, and only a coupon in a wallet (used in an order,
# or an unused rebate coupon taken back) can be voided: the database refuses
# any other move, whatever the code above it asks.
VOID_GUARD = """
CREATE FUNCTION codes_void_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'voided' AND NEW.status <> 'voided' THEN
        RAISE EXCEPTION 'coupon % is voided: it cannot become %', OLD.code, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.status = 'voided' AND OLD.status NOT IN ('used', 'unused', 'voided') THEN
        RAISE EXCEPTION 'coupon % is %: only a used or unused coupon can be voided', OLD.code, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER codes_void_guard BEFORE UPDATE OF status ON codes
    FOR EACH ROW WHEN (OLD.status = 'voided' OR NEW.status = 'voided') EXECUTE FUNCTION codes_void_guard();
"""


def upgrade() -> None:
    # Coupons: voided, with when; a used or voided coupon may name its order.
    op.add_column("codes", sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint("codes_status_check", "codes", type_="check")
    op.create_check_constraint("codes_status_check", "codes", f"status IN {CODE_STATES}")
    op.create_check_constraint("codes_voided_check", "codes", "(status = 'voided') = (voided_at IS NOT NULL)")
    op.drop_constraint("codes_used_order_check", "codes", type_="check")
    op.create_check_constraint(
        "codes_used_order_check",
        "codes",
        "(status <> 'used' OR order_id IS NOT NULL) AND (order_id IS NULL OR status IN ('used', 'voided'))",
    )
    op.execute(VOID_GUARD)

    # Orders: fulfilled (shipped) after payment; a refund names who made it
    # (none named: the buyer).
    op.add_column("orders", sa.Column("fulfilled_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("orders", sa.Column("refunded_by", sa.String(length=8), nullable=True))
    op.execute("UPDATE orders SET refunded_by = 'buyer' WHERE status = 'refunded'")
    op.drop_constraint("orders_status_check", "orders", type_="check")
    op.create_check_constraint(
        "orders_status_check", "orders", "status IN ('placed', 'paid', 'fulfilled', 'cancelled', 'refunded')"
    )
    op.drop_constraint("orders_paid_check", "orders", type_="check")
    op.create_check_constraint(
        "orders_paid_check", "orders", "(status IN ('paid', 'fulfilled', 'refunded')) = (paid_at IS NOT NULL)"
    )
    op.create_check_constraint(
        "orders_fulfilled_check",
        "orders",
        "(status <> 'fulfilled' OR fulfilled_at IS NOT NULL) AND (fulfilled_at IS NULL OR paid_at IS NOT NULL)",
    )
    op.create_check_constraint(
        "orders_refunded_by_check",
        "orders",
        "refunded_by IS NULL OR (status = 'refunded' AND refunded_by IN ('buyer', 'merchant'))",
    )

    # Referrals: reversed (the referee's order refunded), kept for the record
    # so that the referee can never count again.
    op.add_column("referrals", sa.Column("reversed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "referrals_standing_idx",
        "referrals",
        ["referrer_member_id", "activity_id"],
        unique=False,
        postgresql_where=sa.text("reversed_at IS NULL"),
    )

    # Rebates: taken back (clawed back, or flagged for review); the n-th rebate is
    # written once among the standing ones, so a referrer who earns it again
    # after a reversal gets a new row, never two standing.
    op.add_column("rebates", sa.Column("reversed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("rebates", sa.Column("reversal", sa.String(length=12), nullable=True))
    op.create_check_constraint(
        "rebates_reversal_check",
        "rebates",
        "(reversed_at IS NULL) = (reversal IS NULL) AND reversal IN ('clawed_back', 'review')",
    )
    op.drop_constraint("rebates_once_key", "rebates", type_="unique")
    op.create_index(
        "rebates_once_key",
        "rebates",
        ["referrer_member_id", "activity_id", "rebate_no"],
        unique=True,
        postgresql_where=sa.text("reversed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("rebates_once_key", table_name="rebates")
    op.execute(
        "DELETE FROM rebates r WHERE reversed_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM codes c WHERE c.rebate_id = r.rebate_id)"
    )
    op.create_unique_constraint(
        "rebates_once_key", "rebates", ["referrer_member_id", "activity_id", "rebate_no"]
    )
    op.drop_constraint("rebates_reversal_check", "rebates", type_="check")
    op.drop_column("rebates", "reversal")
    op.drop_column("rebates", "reversed_at")
    op.drop_index("referrals_standing_idx", table_name="referrals")
    op.drop_column("referrals", "reversed_at")
    op.drop_constraint("orders_refunded_by_check", "orders", type_="check")
    op.drop_constraint("orders_fulfilled_check", "orders", type_="check")
    op.execute("UPDATE orders SET status = 'paid' WHERE status = 'fulfilled'")
    op.drop_constraint("orders_paid_check", "orders", type_="check")
    op.create_check_constraint(
        "orders_paid_check", "orders", "(status IN ('paid', 'refunded')) = (paid_at IS NOT NULL)"
    )
    op.drop_constraint("orders_status_check", "orders", type_="check")
    op.create_check_constraint(
        "orders_status_check", "orders", "status IN ('placed', 'paid', 'cancelled', 'refunded')"
    )
    op.drop_column("orders", "refunded_by")
    op.drop_column("orders", "fulfilled_at")
    op.execute("DROP TRIGGER codes_void_guard ON codes")
    op.execute("DROP FUNCTION codes_void_guard()")
    # A voided coupon was a used one: it goes back to used, with its order.
    op.execute(
        "UPDATE codes SET status = 'cancelled', cancelled_at = voided_at WHERE status = 'voided' AND order_id IS NULL"
    )
    op.execute("UPDATE codes SET status = 'used' WHERE status = 'voided'")
    op.drop_constraint("codes_used_order_check", "codes", type_="check")
    op.create_check_constraint(
        "codes_used_order_check", "codes", "(status = 'used') = (order_id IS NOT NULL)"
    )
    op.drop_constraint("codes_voided_check", "codes", type_="check")
    op.drop_constraint("codes_status_check", "codes", type_="check")
    op.create_check_constraint("codes_status_check", "codes", f"status IN {OLD_CODE_STATES}")
    op.drop_column("codes", "voided_at")
