"""Budget approval: a campaign's budget is money, and finance signs it off.

The rule, in one sentence: an activity whose budget is above the approval
threshold may be online only once an approver has approved a budget at
least that large. So an activity created with such a budget is created
offline, and raising a budget above it takes the activity offline; either
way one request waits on the approvals page, and approving it puts the
activity online if the operator had asked for that. Rejecting it leaves the
activity offline (the operator lowers the budget or asks again).
"""

from __future__ import annotations

from issuance.shared.backoffice import catalog
from issuance.shared.backoffice.web import audit
from issuance.shared.backoffice.web.auth import CurrentUser
from issuance.shared.db.models import Activity
from issuance.shared.db.office_models import ApprovalStatus, BudgetApproval, OfficeUser
from sqlalchemy import func, select
from sqlalchemy.orm import Session

DEFAULT_THRESHOLD = 10_000  # packages


def needs_approval(budget: int, approved: int | None, threshold: int) -> bool:
    """Whether an activity with ``budget`` packages must stay offline: above
    the threshold and above the largest budget an approver signed off."""
    return budget > max(threshold, approved or 0)


def approved_budget(session: Session, activity_id: int) -> int | None:
    return session.scalar(
        select(func.max(BudgetApproval.budget)).where(
            BudgetApproval.activity_id == activity_id, BudgetApproval.status == ApprovalStatus.APPROVED
        )
    )


def request(session: Session, user: CurrentUser, activity: Activity, *, go_online: bool) -> None:
    """Ask for ``activity``'s current budget to be approved (replacing a
    request that still waits)."""
    assert user.user_id is not None
    waiting = session.scalar(
        select(BudgetApproval)
        .where(
            BudgetApproval.activity_id == activity.activity_id,
            BudgetApproval.status == ApprovalStatus.PENDING,
        )
        .with_for_update()
    )
    if waiting is None:
        waiting = BudgetApproval(activity_id=activity.activity_id, status=ApprovalStatus.PENDING)
        session.add(waiting)
    waiting.budget = activity.budget
    waiting.go_online = go_online
    waiting.requested_by = user.user_id
    waiting.requested_at = func.now()
    session.flush()
    audit.record(
        session,
        user,
        "request-approval",
        "activity",
        activity.slug,
        after={"budget": activity.budget, "go_online": go_online},
    )


def withdraw(session: Session, user: CurrentUser, approval: BudgetApproval, slug: str) -> None:
    """Close a waiting request that a later edit made moot."""
    _close(session, user, approval, ApprovalStatus.WITHDRAWN)
    audit.record(
        session,
        user,
        "withdraw-approval",
        "activity",
        slug,
        before={"status": ApprovalStatus.PENDING.value, "budget": approval.budget},
        after={"status": ApprovalStatus.WITHDRAWN.value},
    )


def _close(session: Session, user: CurrentUser, approval: BudgetApproval, status: ApprovalStatus) -> None:
    """A waiting request leaves the queue with ``status``, decided by ``user`` now."""
    approval.status = status
    approval.decided_by = user.user_id
    approval.decided_at = func.now()
    session.flush()


def pending_for(session: Session, activity_id: int) -> BudgetApproval | None:
    return session.scalar(
        select(BudgetApproval).where(
            BudgetApproval.activity_id == activity_id, BudgetApproval.status == ApprovalStatus.PENDING
        )
    )


def waiting(session: Session) -> list[tuple[BudgetApproval, str, str, str]]:
    """Requests that wait: (request, activity slug, title, requested by)."""
    rows = session.execute(
        select(BudgetApproval, Activity.slug, Activity.title, OfficeUser.name)
        .join(Activity, Activity.activity_id == BudgetApproval.activity_id)
        .join(OfficeUser, OfficeUser.user_id == BudgetApproval.requested_by)
        .where(BudgetApproval.status == ApprovalStatus.PENDING)
        .order_by(BudgetApproval.requested_at)
    ).all()
    return [(a, slug, title, name) for a, slug, title, name in rows]


def decide(session: Session, user: CurrentUser, approval_id: int, *, approve: bool) -> str:
    """Approve or reject a waiting request; returns the activity's slug."""
    assert user.user_id is not None
    approval = session.scalar(
        select(BudgetApproval).where(BudgetApproval.approval_id == approval_id).with_for_update()
    )
    if approval is None or approval.status != ApprovalStatus.PENDING:
        raise catalog.BackOfficeError("this request was already decided or does not exist")
    activity = session.get(Activity, approval.activity_id)
    assert activity is not None
    _close(session, user, approval, ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED)
    audit.record(
        session,
        user,
        "approve-budget" if approve else "reject-budget",
        "activity",
        activity.slug,
        before={"status": ApprovalStatus.PENDING.value},
        after={"status": str(approval.status), "budget": approval.budget},
    )
    if approve and approval.go_online and not activity.online and activity.budget <= approval.budget:
        catalog.update_activity(session, activity.slug, {"online": True})
        audit.record(
            session, user, "edit", "activity", activity.slug, before={"online": False}, after={"online": True}
        )
    return activity.slug
