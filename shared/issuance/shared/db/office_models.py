"""The back office's own tables: its users, the audit log of every change,
the budget approvals and the key that signs its sessions. They share the
metadata of :mod:`issuance.shared.db.models`, so one Alembic history
describes the whole schema (migration 0008)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from issuance.shared.db.models import Base
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column


class ApprovalStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    # The operator's later edit made the request moot (budget lowered, or
    # the activity taken offline): decided_by is then that operator.
    WITHDRAWN = "withdrawn"


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class OfficeUser(Base):
    """Someone who signs in to the back office. Passwords are kept only as
    argon2id hashes."""

    __tablename__ = "office_users"
    __table_args__ = (
        CheckConstraint("role IN ('viewer', 'operator', 'approver')", name="office_users_role_check"),
        CheckConstraint("name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'", name="office_users_name_check"),
    )

    user_id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(12))
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = _now()
    last_sign_in_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Failed sign-ins since the last success; at the limit the name is locked a while.
    failed_sign_ins: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """One change: who made it, what it was, when, and the values before and
    after. Written in the transaction of the change, so a change without its
    entry (or an entry without its change) cannot be committed. A trigger
    (migration 0008) refuses UPDATE and DELETE: the log is append-only."""

    __tablename__ = "office_audit"
    __table_args__ = (
        Index("office_audit_subject_idx", "subject_kind", "subject_key", "audit_id"),
        Index("office_audit_at_idx", "at"),
    )

    audit_id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = _now()
    # None for changes made from the command line (the actor is then "cli:<user>").
    user_id: Mapped[int | None] = mapped_column(ForeignKey("office_users.user_id"))
    actor: Mapped[str] = mapped_column(String(80))
    action: Mapped[str] = mapped_column(String(40))
    subject_kind: Mapped[str] = mapped_column(String(40))
    subject_key: Mapped[str] = mapped_column(String(120))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class BudgetApproval(Base):
    """A budget above the approval threshold, waiting for (or signed off by)
    an approver. The activity stays offline until its budget is approved."""

    __tablename__ = "office_budget_approvals"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'approved', 'rejected', 'withdrawn')",
            name="office_budget_approvals_status_check",
        ),
        CheckConstraint(
            "(status = 'pending') = (decided_at IS NULL AND decided_by IS NULL)",
            name="office_budget_approvals_decided_check",
        ),
        # At most one request waits per activity; a new one replaces it.
        Index(
            "office_budget_approvals_one_pending",
            "activity_id",
            unique=True,
            postgresql_where=text("status = 'pending'"),
        ),
    )

    approval_id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    activity_id: Mapped[int] = mapped_column(ForeignKey("activities.activity_id", ondelete="CASCADE"))
    budget: Mapped[int] = mapped_column(Integer)
    # Whether the activity goes online once approved (what the operator asked for).
    go_online: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(12), server_default="pending")
    requested_by: Mapped[int] = mapped_column(ForeignKey("office_users.user_id"))
    requested_at: Mapped[datetime] = _now()
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("office_users.user_id"))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SessionKey(Base):
    """The secret that signs the back office's session cookies, made on first
    start, so that every process of the back office agrees on it without any
    configuration. Deleting the row signs everyone out."""

    __tablename__ = "office_session_keys"

    key_id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    secret: Mapped[bytes] = mapped_column(LargeBinary(64))
    created_at: Mapped[datetime] = _now()


class CatalogVersion(Base):
    """The version of this database's catalog (channels, activities and their
    templates), one row. Every back-office write to the catalog that changes
    its definition bumps ``version`` and stores the definition's ``digest``
    in the same transaction, so that ``issuance cells apply`` can see that
    the cells agree before it changes them all, and change each one only if
    it is still at the version it read (compare-and-set). ``change`` names
    the cross-cell change that made this version and ``previous_digest`` the
    digest it was made from (None: a change made in this database alone)."""

    __tablename__ = "catalog_version"
    __table_args__ = (CheckConstraint("one_row", name="catalog_version_one_row_check"),)

    one_row: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    version: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    digest: Mapped[str] = mapped_column(String(64), server_default=text("''"))
    change: Mapped[str | None] = mapped_column(String(64))
    previous_digest: Mapped[str | None] = mapped_column(String(64))
    changed_at: Mapped[datetime] = _now()
