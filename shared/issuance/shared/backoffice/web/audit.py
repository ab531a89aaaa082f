"""The audit log: every change the back office makes (who, what, when, the
values before and after) is one ``office_audit`` row written in the
transaction of the change."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from issuance.shared.db.office_models import AuditEntry
from sqlalchemy import select
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from issuance.shared.backoffice.web.auth import CurrentUser


def jsonable(value: Any) -> Any:
    """A value as JSON can hold it: dataclasses as objects, instants as ISO
    8601 text, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def changed(before: Any, after: Any, fields: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``fields`` of two snapshots, as (before, after) JSON objects."""
    old, new = jsonable(before), jsonable(after)
    return {f: old[f] for f in fields}, {f: new[f] for f in fields}


def record(
    session: Session,
    user: CurrentUser,
    action: str,
    kind: str,
    key: str,
    *,
    before: Any = None,
    after: Any = None,
) -> None:
    """Add the entry of one change to the caller's transaction; ``before``
    and ``after`` are mappings or dataclasses (stored as JSON objects)."""
    session.add(
        AuditEntry(
            user_id=user.user_id,
            actor=user.actor,
            action=action,
            subject_kind=kind,
            subject_key=key[:120],
            before=jsonable(before) if before is not None else None,
            after=jsonable(after) if after is not None else None,
        )
    )
    session.flush()


PAGE_SIZE = 50


def entries(session: Session, *, kind: str = "", key: str = "", page: int = 1) -> list[AuditEntry]:
    """The newest entries first, optionally of one subject."""
    query = select(AuditEntry).order_by(AuditEntry.audit_id.desc())
    if kind:
        query = query.where(AuditEntry.subject_kind == kind)
    if key:
        query = query.where(AuditEntry.subject_key == key)
    return list(session.scalars(query.limit(PAGE_SIZE).offset((max(page, 1) - 1) * PAGE_SIZE)))
