"""The changes the back office makes. Each is one catalog call (the same
functions, and so the same rules, as the CLI), the budget approval rule and
an audit entry, in the caller's transaction: all of it commits or none."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from issuance.shared.backoffice import catalog
from issuance.shared.backoffice.web import approvals, audit
from issuance.shared.backoffice.web.auth import CurrentUser
from issuance.shared.db.models import Activity, Channel
from sqlalchemy import select
from sqlalchemy.orm import Session


def create_channel(session: Session, user: CurrentUser, name: str) -> Channel:
    channel = catalog.create_channel(session, name)
    audit.record(session, user, "create", "channel", name, after={"name": name})
    return channel


def create_activity(
    session: Session, user: CurrentUser, spec: catalog.ActivitySpec, *, threshold: int
) -> tuple[Activity, bool]:
    """Create an activity; returns it and whether its budget waits for approval
    (it is then created offline)."""
    waits = approvals.needs_approval(spec.budget, None, threshold)
    activity = catalog.create_activity(session, dataclasses.replace(spec, online=False) if waits else spec)
    audit.record(session, user, "create", "activity", spec.slug, after=describe(session, activity))
    if waits:
        approvals.request(session, user, activity, go_online=spec.online)
    return activity, waits


def edit_activity(
    session: Session, user: CurrentUser, slug: str, changes: Mapping[str, Any], *, threshold: int
) -> tuple[list[str], bool]:
    """Change an activity through ``catalog.update_activity``; returns the
    fields that changed and whether its budget now waits for approval."""
    activity = session.scalar(select(Activity).where(Activity.slug == slug))
    if activity is None:
        raise catalog.BackOfficeError(f"no activity {slug!r}")
    before = catalog.describe_activity(session, activity)
    wanted = dict(changes)
    budget = int(wanted.get("budget", before.budget))
    online = bool(wanted.get("online", before.online))
    needed = approvals.needs_approval(
        budget, approvals.approved_budget(session, activity.activity_id), threshold
    )
    waits = online and needed
    pending = approvals.pending_for(session, activity.activity_id)
    if waits:
        wanted["online"] = False
    fields = catalog.update_activity(session, slug, wanted)
    after = describe(session, activity)
    if fields:
        old, new = audit.changed(before, after, fields)
        audit.record(session, user, "edit", "activity", slug, before=old, after=new)
    if waits:
        approvals.request(session, user, activity, go_online=True)
    elif pending is not None and (not needed or wanted.get("online") is False):
        approvals.withdraw(session, user, pending, slug)
    return fields, waits


def describe(session: Session, activity: Activity) -> catalog.ActivitySpec:
    session.refresh(activity)
    return catalog.describe_activity(session, activity)
