"""The back office as an ASGI app (Starlette, Jinja2 templates, no script
needed except for the progress bar and the live banner preview).

Every endpoint is wrapped by :func:`page`, which loads the signed-in user
and refuses a role that may not use it; every POST is refused without the
session's CSRF token (security.CsrfMiddleware) and, by construction of the
routes table, needs a role that may change something (viewers get 403).
Changes go through :mod:`operations` (catalog functions + audit entry in one
transaction); reads through the catalog, the reports and :mod:`queries`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

from issuance.shared import domain
from issuance.shared.asgi import HttpMiddleware
from issuance.shared.backoffice import catalog, charts, reports
from issuance.shared.backoffice.web import approvals, audit, auth, forms, operations, queries
from issuance.shared.backoffice.web.auth import APPROVES, CHANGES, EVERYONE, CurrentUser, Role
from issuance.shared.backoffice.web.jobs import Jobs
from issuance.shared.backoffice.web.security import CsrfMiddleware, HeadersMiddleware, csrf_token
from issuance.shared.db import database, dead_letters
from issuance.shared.db.models import Activity, Channel, CodeBatch
from issuance.shared.db.office_models import ApprovalStatus, BudgetApproval, SessionKey
from issuance.shared.errors import OperatorError
from issuance.shared.settings import PhoneKeyError, Settings, require_phone_keys
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import Engine, func, inspect, or_, select, text
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SESSION_COOKIE = "office_session"
SESSION_SECONDS = 8 * 3600
STATUSES = {"online": "online", "offline": "offline", "awaiting": "awaiting approval"}
KINDS = ("amount_off", "discount_rate", "gift")
T = TypeVar("T")
Handler = Callable[[Request, CurrentUser], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Office:
    """What the endpoints share: settings, the database, the jobs."""

    settings: Settings
    engine: Engine
    jobs: Jobs
    threshold: int
    templates: Environment
    chart_lock: threading.Lock


def _office(request: Request) -> Office:
    office: Office = request.app.state.office
    return office


async def run(request: Request, fn: Callable[..., T], *args: Any, write: bool = False, **kwargs: Any) -> T:
    """``fn(session, *args, **kwargs)`` on a worker thread; ``write``: in one
    transaction that commits when it returns."""
    engine = _office(request).engine

    def call() -> T:
        with Session(engine, expire_on_commit=False) as session:
            if write:
                with session.begin():
                    return fn(session, *args, **kwargs)
            return fn(session, *args, **kwargs)

    return await run_in_threadpool(call)


def raw(session: Session) -> Any:
    """The session's psycopg connection (for the reports and queries)."""
    return session.connection().connection.driver_connection


def page(roles: frozenset[Role] = EVERYONE) -> Callable[[Handler], Endpoint]:
    """An endpoint for signed-in users of ``roles``: others get the sign-in
    page (GET) or 403."""

    def wrap(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            user_id = request.session.get("user_id")
            user = await run(request, auth.load_user, user_id) if isinstance(user_id, int) else None
            if user is None:
                if request.method == "GET":
                    return RedirectResponse(f"/login?{urlencode({'next': request.url.path})}", 303)
                return _refused(request, None, "sign in first")
            if user.role not in roles:
                return _refused(request, user, f"a {user.role} may not do this")
            return await handler(request, user)

        endpoint.roles = roles  # type: ignore[attr-defined]
        return endpoint

    return wrap


def render(
    request: Request, user: CurrentUser | None, template: str, *, status: int = 200, **context: Any
) -> HTMLResponse:
    flashes = request.session.pop("flash", []) if user is not None else []
    html = (
        _office(request)
        .templates.get_template(template)
        .render(
            request=request,
            user=user,
            csrf=csrf_token(request.session),
            flashes=flashes,
            path=request.url.path,
            **context,
        )
    )
    return HTMLResponse(html, status_code=status)


def _refused(request: Request, user: CurrentUser | None, reason: str) -> HTMLResponse:
    return render(request, user, "refused.html", status=403, reason=reason)


def _not_found(request: Request, user: CurrentUser, what: str) -> HTMLResponse:
    return render(request, user, "not_found.html", status=404, what=what)


def flash(request: Request, message: str) -> None:
    request.session["flash"] = [*request.session.get("flash", []), message]


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _form(form: FormData) -> dict[str, str]:
    return {k: v for k, v in form.items() if isinstance(v, str)}


# ---------------------------------------------------------------- sign-in


async def login_page(request: Request) -> Response:
    return render(request, None, "login.html", next=_next(request.query_params.get("next")), error="")


async def login(request: Request) -> Response:
    form = _form(await request.form())
    name, password = form.get("name", "").strip(), form.get("password", "")

    def sign_in(session: Session) -> CurrentUser | None:
        user = auth.authenticate(session, name, password)
        if user is not None:
            audit.record(session, user, "sign-in", "user", user.name)
        return user

    user = await run(request, sign_in, write=True)
    if user is None:
        return render(
            request,
            None,
            "login.html",
            status=401,
            next=_next(form.get("next")),
            error="wrong name or password",
        )
    # A new session (and CSRF token) on sign-in: nothing from before carries over.
    request.session.clear()
    request.session["user_id"] = user.user_id
    csrf_token(request.session)
    return RedirectResponse(_next(form.get("next")), 303)


def _next(target: str | None) -> str:
    """Only a path of this site (never //host or a full URL)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/activities"


@page()
async def logout(request: Request, user: CurrentUser) -> Response:
    request.session.clear()
    return RedirectResponse("/login", 303)


async def home(request: Request) -> Response:
    return RedirectResponse("/activities", 303)


# ---------------------------------------------------------------- channels


def _channels(session: Session) -> list[Any]:
    return list(
        session.execute(
            select(Channel.name, Channel.created_at, func.count(Activity.activity_id))
            .outerjoin(Activity, Activity.channel_id == Channel.channel_id)
            .group_by(Channel.channel_id)
            .order_by(Channel.name)
        ).all()
    )


@page()
async def channels_page(request: Request, user: CurrentUser) -> Response:
    rows = await run(request, _channels)
    return render(request, user, "channels.html", channels=rows, errors={}, name="")


@page(CHANGES)
async def channel_create(request: Request, user: CurrentUser) -> Response:
    name = _form(await request.form()).get("name", "").strip()
    error = "" if name else "enter a name"
    if not error:
        try:
            await run(request, operations.create_channel, user, name, write=True)
        except catalog.BackOfficeError as exc:
            error = str(exc)
        except (IntegrityError, DataError):
            error = "a channel name has at most 64 characters"
    if error:
        rows = await run(request, _channels)
        return render(
            request, user, "channels.html", status=422, channels=rows, errors={"name": error}, name=name
        )
    flash(request, f"channel {name} created")
    return RedirectResponse("/channels", 303)


# ---------------------------------------------------------------- activities


def _filters(channel: str, status: str, query: str) -> list[Any]:
    filters: list[Any] = []
    if channel:
        filters.append(Channel.name == channel)
    if status == "online":
        filters.append(Activity.online.is_(True))
    elif status == "offline":
        filters.append(Activity.online.is_(False))
    elif status == "awaiting":
        filters.append(
            Activity.activity_id.in_(
                select(BudgetApproval.activity_id).where(BudgetApproval.status == ApprovalStatus.PENDING)
            )
        )
    if query:
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        filters.append(
            or_(Activity.title.ilike(pattern, escape="\\"), Activity.slug.ilike(pattern, escape="\\"))
        )
    return filters


def _state(activity: Activity, waiting: bool, now: datetime) -> str:
    if waiting:
        return "awaiting approval"
    rules = domain.ActivityRules(
        online=activity.online, starts_at=activity.starts_at, ends_at=activity.ends_at
    )
    refusal = domain.window_refusal(rules, now)
    if refusal is None:
        return "running"
    if not activity.online:
        return "offline"
    return "not started" if refusal is domain.Refusal.NOT_STARTED else "ended"


@page()
async def activities_page(request: Request, user: CurrentUser) -> Response:
    params = request.query_params
    channel, status, query = params.get("channel", ""), params.get("status", ""), params.get("q", "").strip()
    number = max(_int(params.get("page"), 1), 1)
    base_url = _office(request).settings.activity_base_url
    filters = _filters(channel, status if status in STATUSES else "", query)

    def load(session: Session) -> dict[str, Any]:
        total = session.scalar(
            select(func.count())
            .select_from(Activity)
            .join(Channel, Channel.channel_id == Activity.channel_id)
            .where(*filters)
        )
        rows = catalog.list_activities(session, page=number, base_url=base_url, filters=filters)
        slugs = [r.slug for r in rows]
        activities = {a.slug: a for a in session.scalars(select(Activity).where(Activity.slug.in_(slugs)))}
        waiting = set(
            session.scalars(
                select(Activity.slug)
                .join(BudgetApproval, BudgetApproval.activity_id == Activity.activity_id)
                .where(BudgetApproval.status == ApprovalStatus.PENDING, Activity.slug.in_(slugs))
            )
        )
        now = datetime.now(UTC)
        states = {slug: _state(a, slug in waiting, now) for slug, a in activities.items()}
        names = list(session.scalars(select(Channel.name).order_by(Channel.name)))
        return {"total": total or 0, "rows": rows, "states": states, "channels": names}

    data = await run(request, load)
    pages = max(math.ceil(data["total"] / catalog.PAGE_SIZE), 1)
    keep = {k: v for k, v in (("channel", channel), ("status", status), ("q", query)) if v}
    return render(
        request,
        user,
        "activities.html",
        **data,
        page=number,
        pages=pages,
        filter_channel=channel,
        filter_status=status,
        filter_q=query,
        statuses=STATUSES,
        page_url=lambda n: "/activities?" + urlencode({**keep, "page": n}),
    )


def _channel_names(session: Session) -> list[str]:
    return list(session.scalars(select(Channel.name).order_by(Channel.name)))


def _form_page(
    request: Request,
    user: CurrentUser,
    *,
    values: dict[str, str],
    errors: dict[str, str],
    channels: list[str],
    activity: dict[str, Any] | None,
    status: int = 200,
) -> HTMLResponse:
    return render(
        request,
        user,
        "activity_form.html",
        status=status,
        values=values,
        errors=errors,
        channels=channels,
        activity=activity,
        kinds=KINDS,
        template_rows=range(forms.MAX_TEMPLATES),
        threshold=_office(request).threshold,
    )


@page(CHANGES)
async def activity_new(request: Request, user: CurrentUser) -> Response:
    names = await run(request, _channel_names)
    return _form_page(request, user, values=forms.render(None), errors={}, channels=names, activity=None)


def _errors_of(exc: Exception) -> dict[str, str]:
    if isinstance(exc, IntegrityError | DataError):
        detail = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
        return {"": f"the database refused this: {detail}"}
    message = str(exc)
    return {forms.field_of(message): message}


@page(CHANGES)
async def activity_create(request: Request, user: CurrentUser) -> Response:
    parsed = forms.parse(_form(await request.form()))
    errors = dict(parsed.errors)
    if not errors:
        threshold = _office(request).threshold
        try:
            spec = catalog.ActivitySpec.from_mapping(parsed.values)
            _, waits = await run(
                request,
                lambda s: operations.create_activity(s, user, spec, threshold=threshold),
                write=True,
            )
        except (catalog.BackOfficeError, IntegrityError, DataError) as exc:
            errors = _errors_of(exc)
    if errors:
        names = await run(request, _channel_names)
        return _form_page(
            request, user, values=parsed.raw, errors=errors, channels=names, activity=None, status=422
        )
    slug = parsed.values["slug"]
    flash(request, f"activity {slug} created")
    if waits:
        flash(
            request,
            f"its budget is above {threshold} packages: it stays offline until an approver signs it off",
        )
    return RedirectResponse(f"/activities/{slug}", 303)


def _activity(session: Session, slug: str, base_url: str) -> dict[str, Any] | None:
    activity = session.scalar(select(Activity).where(Activity.slug == slug))
    if activity is None:
        return None
    spec = catalog.describe_activity(session, activity)
    pending = approvals.pending_for(session, activity.activity_id)
    return {
        "slug": slug,
        "spec": spec,
        "form": forms.render(spec),
        "url": f"{base_url.rstrip('/')}/{slug}",
        "state": _state(activity, pending is not None, datetime.now(UTC)),
        "pending": pending.budget if pending is not None else None,
        "approved": approvals.approved_budget(session, activity.activity_id),
    }


def _activity_and_channels(
    session: Session, slug: str, base_url: str
) -> tuple[dict[str, Any] | None, list[str]]:
    return _activity(session, slug, base_url), _channel_names(session)


@page()
async def activity_page(request: Request, user: CurrentUser) -> Response:
    slug = request.path_params["slug"]
    base_url = _office(request).settings.activity_base_url
    activity, names = await run(request, _activity_and_channels, slug, base_url)
    if activity is None:
        return _not_found(request, user, f"activity {slug}")
    return _form_page(request, user, values=activity["form"], errors={}, channels=names, activity=activity)


@page(CHANGES)
async def activity_update(request: Request, user: CurrentUser) -> Response:
    slug = request.path_params["slug"]
    threshold = _office(request).threshold
    base_url = _office(request).settings.activity_base_url
    parsed = forms.parse(_form(await request.form()))
    errors = dict(parsed.errors)

    def save(session: Session) -> tuple[list[str], bool] | None:
        activity = session.scalar(select(Activity).where(Activity.slug == slug))
        if activity is None:
            return None
        current = forms.render(catalog.describe_activity(session, activity))
        return operations.edit_activity(
            session, user, slug, forms.changes(parsed, current), threshold=threshold
        )

    result: tuple[list[str], bool] | None = ([], False)
    if not errors:
        try:
            result = await run(request, save, write=True)
        except (catalog.BackOfficeError, IntegrityError, DataError) as exc:
            errors = _errors_of(exc)
    if result is None:
        return _not_found(request, user, f"activity {slug}")
    if errors:
        activity, names = await run(request, _activity_and_channels, slug, base_url)
        return _form_page(
            request, user, values=parsed.raw, errors=errors, channels=names, activity=activity, status=422
        )
    changed, waits = result
    flash(request, f"{slug}: {', '.join(changed) or 'nothing changed'}")
    if waits:
        flash(request, f"the budget is above {threshold} packages: offline until an approver signs it off")
    return RedirectResponse(f"/activities/{slug}", 303)


@page(CHANGES)
async def activity_switch(request: Request, user: CurrentUser) -> Response:
    slug = request.path_params["slug"]
    online = _form(await request.form()).get("online") == "true"
    threshold = _office(request).threshold
    try:
        _, waits = await run(
            request, operations.edit_activity, user, slug, {"online": online}, threshold=threshold, write=True
        )
    except catalog.BackOfficeError as exc:
        flash(request, str(exc))
        return RedirectResponse(f"/activities/{slug}", 303)
    if waits:
        flash(request, f"{slug} stays offline until an approver signs off its budget")
    else:
        flash(request, f"{slug} is {'online' if online else 'offline'}")
    # Back to the list or the activity, whichever the switch was on (a path of this site only).
    back = urlsplit(request.headers.get("referer", ""))
    return RedirectResponse(_next(back.path + (f"?{back.query}" if back.query else "")), 303)


# ---------------------------------------------------------------- templates and code batches


def _codes(session: Session, slug: str) -> dict[str, Any] | None:
    conn = raw(session)
    try:
        report = reports.activity_report(conn, slug)
    except reports.UnknownActivity:
        return None
    return {"templates": report.templates, "batches": queries.batches(conn, slug), "report": report}


@page()
async def codes_page(request: Request, user: CurrentUser) -> Response:
    slug = request.path_params["slug"]
    data = await run(request, _codes, slug)
    if data is None:
        return _not_found(request, user, f"activity {slug}")
    return render(request, user, "codes.html", slug=slug, errors={}, count="", **data)


@page(CHANGES)
async def codes_generate(request: Request, user: CurrentUser) -> Response:
    slug = request.path_params["slug"]
    form = _form(await request.form())
    prefix, count_text = form.get("template", ""), form.get("count", "").strip()
    data = await run(request, _codes, slug)
    if data is None:
        return _not_found(request, user, f"activity {slug}")
    errors: dict[str, str] = {}
    if prefix not in {t.prefix for t in data["templates"]}:
        errors["template"] = "choose one of this activity's templates"
    count = _int(count_text, 0)
    if count < 1:
        errors["count"] = "enter how many codes, a whole number of at least 1"
    if errors:
        return render(
            request, user, "codes.html", status=422, slug=slug, errors=errors, count=count_text, **data
        )
    job = _office(request).jobs.start(user, slug, prefix, count)
    return RedirectResponse(f"/jobs/{job.job_id}", 303)


@page(CHANGES)
async def job_page(request: Request, user: CurrentUser) -> Response:
    job = _office(request).jobs.get(request.path_params["job"])
    if job is None:
        return _not_found(request, user, "this generation job")
    return render(request, user, "job.html", job=job)


@page(CHANGES)
async def job_progress(request: Request, user: CurrentUser) -> Response:
    job = _office(request).jobs.get(request.path_params["job"])
    if job is None:
        return JSONResponse({"error": "no such job"}, status_code=404)
    return JSONResponse(job.as_json())


@page(CHANGES)
async def batch_export(request: Request, user: CurrentUser) -> Response:
    """The batch as CSV, streamed from COPY (catalog.export_batch); every
    export is in the audit log, since codes are worth money."""
    batch_id = _int(request.path_params["batch"], 0)
    engine = _office(request).engine

    def open_export() -> Iterator[bytes] | None:
        session = Session(engine)
        with session.begin():
            if session.get(CodeBatch, batch_id) is None:
                session.close()
                return None
            audit.record(session, user, "export", "batch", str(batch_id))

        def stream() -> Iterator[bytes]:
            try:
                with session.begin():
                    yield from catalog.export_batch(raw(session), batch_id)
            finally:
                session.close()

        return stream()

    chunks = await run_in_threadpool(open_export)
    if chunks is None:
        return _not_found(request, user, f"code batch {batch_id}")
    return StreamingResponse(
        chunks,
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="batch-{batch_id}.csv"'},
    )


# ---------------------------------------------------------------- the report


def _report(session: Session, slug: str) -> dict[str, Any] | None:
    conn = raw(session)
    try:
        report = reports.activity_report(conn, slug)
    except reports.UnknownActivity:
        return None
    series = charts.load_series(conn, activity=slug)
    return {"report": report, "promise": queries.promise(conn, slug), "has_chart": bool(series.times)}


@page()
async def report_page(request: Request, user: CurrentUser) -> Response:
    slug = request.path_params["slug"]
    data = await run(request, _report, slug)
    if data is None:
        return _not_found(request, user, f"activity {slug}")
    r = data["report"]
    funnel = [
        ("shares opened", r.shares_opened),
        ("claims requested", r.claims_requested),
        ("packages granted", r.packages_claimed),
        ("claims credited", r.claims_credited),
    ]
    return render(
        request, user, "report.html", slug=slug, funnel=funnel, top=max([1, *(n for _, n in funnel)]), **data
    )


@page()
async def report_chart(request: Request, user: CurrentUser) -> Response:
    """charts.render's PNG of the activity's claims, credits, backlog and
    latency (matplotlib's pyplot is one global state: one chart at a time)."""
    slug = request.path_params["slug"]
    office = _office(request)

    def draw(session: Session) -> bytes | None:
        series = charts.load_series(raw(session), activity=slug)
        if not series.times:
            return None
        with office.chart_lock, tempfile.TemporaryDirectory() as scratch:
            path = charts.render(
                series, Path(scratch) / "chart.png", promise_seconds=office.settings.credit_promise_seconds
            )
            return path.read_bytes()

    png = await run(request, draw)
    if png is None:
        return _not_found(request, user, f"claims of {slug}")
    return Response(png, media_type="image/png")


# ---------------------------------------------------------------- approvals


@page()
async def approvals_page(request: Request, user: CurrentUser) -> Response:
    rows = await run(request, approvals.waiting)
    return render(request, user, "approvals.html", rows=rows, threshold=_office(request).threshold)


@page(APPROVES)
async def approval_decide(request: Request, user: CurrentUser) -> Response:
    approval_id = _int(request.path_params["approval"], 0)
    decision = _form(await request.form()).get("decision")
    if decision not in ("approve", "reject"):
        flash(request, "choose approve or reject")
        return RedirectResponse("/approvals", 303)
    try:
        slug = await run(
            request, approvals.decide, user, approval_id, approve=decision == "approve", write=True
        )
    except catalog.BackOfficeError as exc:
        flash(request, str(exc))
    else:
        flash(request, f"budget of {slug} {'approved' if decision == 'approve' else 'rejected'}")
    return RedirectResponse("/approvals", 303)


# ---------------------------------------------------------------- dead letters, lookup, audit


@page()
async def dead_letters_page(request: Request, user: CurrentUser) -> Response:
    number = max(_int(request.query_params.get("page"), 1), 1)
    rows = await run(request, lambda s: queries.dead_letters(raw(s), number))
    more = len(rows) > queries.DEAD_LETTER_PAGE
    return render(
        request, user, "dead_letters.html", rows=rows[: queries.DEAD_LETTER_PAGE], page=number, more=more
    )


@page()
async def dead_letter_page(request: Request, user: CurrentUser) -> Response:
    dead_letter_id = _int(request.path_params["dead_letter"], 0)
    row = await run(request, lambda s: queries.dead_letter(raw(s), dead_letter_id))
    if row is None:
        return _not_found(request, user, f"dead letter {dead_letter_id}")
    return render(request, user, "dead_letter.html", row=row)


@page(CHANGES)
async def dead_letter_replay(request: Request, user: CurrentUser) -> Response:
    """Publish a dead letter again after its cause was fixed (the same replay
    as ``issuance dead-letters replay --id N``: once in effect), audited."""
    dead_letter_id = _int(request.path_params["dead_letter"], 0)
    settings = _office(request).settings

    def replay_one() -> dead_letters.ReplayResult:
        with database.pool(settings, max_size=1) as pool:
            return dead_letters.replay(settings, pool, dead_letters.Selection(ids=(dead_letter_id,)))

    try:
        result = await run_in_threadpool(replay_one)
    except OperatorError as exc:
        flash(request, str(exc))
        return RedirectResponse(f"/dead-letters/{dead_letter_id}", 303)
    outcome = {"replayed": result.replayed, "skipped": {str(k): v for k, v in result.skipped.items()}}
    await run(
        request,
        lambda s: audit.record(s, user, "replay", "dead letter", str(dead_letter_id), after=outcome),
        write=True,
    )
    if result.replayed:
        flash(request, f"dead letter {dead_letter_id} published again")
    else:
        why = result.skipped.get(dead_letter_id, "it was replayed before, or it is not there")
        flash(request, f"dead letter {dead_letter_id} not replayed: {why}")
    return RedirectResponse(f"/dead-letters/{dead_letter_id}", 303)


@page()
async def lookup_page(request: Request, user: CurrentUser) -> Response:
    """A member by phone (normalised and digested like a claim) or a code."""
    phone = request.query_params.get("phone", "").strip()
    code = request.query_params.get("code", "").strip()
    settings = _office(request).settings
    result: dict[str, Any] = {
        "phone": "",
        "code": code,
        "error": "",
        "member": None,
        "history": None,
        "found": None,
    }

    def by_phone(session: Session) -> tuple[Any, Any]:
        keys = require_phone_keys(settings).secrets
        member = queries.member_by_phone(raw(session), phone, region=settings.default_region, keys=keys)
        return member, queries.member_history(raw(session), member["member_id"]) if member else None

    if phone:
        try:
            result["member"], result["history"] = await run(request, by_phone)
        except (domain.InvalidPhone, PhoneKeyError) as exc:
            result["error"] = str(exc)
        else:
            if result["member"] is None:
                result["error"] = "no member has this number"
    elif code:
        result["found"] = await run(request, lambda s: queries.code_history(raw(s), code))
        if result["found"] is None:
            result["error"] = "no such code"
    return render(request, user, "lookup.html", searched=bool(phone or code), **result)


@page()
async def audit_page(request: Request, user: CurrentUser) -> Response:
    kind = request.query_params.get("kind", "")
    key = request.query_params.get("key", "")
    number = max(_int(request.query_params.get("page"), 1), 1)
    rows = await run(request, lambda s: audit.entries(s, kind=kind, key=key, page=number))
    return render(
        request, user, "audit.html", rows=rows, kind=kind, key=key, page=number, size=audit.PAGE_SIZE
    )


# ---------------------------------------------------------------- the app


def routes() -> list[BaseRoute]:
    """Every POST needs CHANGES or APPROVES, except signing in and out."""
    return [
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/channels", channels_page, methods=["GET"]),
        Route("/channels", channel_create, methods=["POST"]),
        Route("/activities", activities_page, methods=["GET"]),
        Route("/activities/new", activity_new, methods=["GET"]),
        Route("/activities/new", activity_create, methods=["POST"]),
        Route("/activities/{slug}", activity_page, methods=["GET"]),
        Route("/activities/{slug}", activity_update, methods=["POST"]),
        Route("/activities/{slug}/online", activity_switch, methods=["POST"]),
        Route("/activities/{slug}/codes", codes_page, methods=["GET"]),
        Route("/activities/{slug}/codes", codes_generate, methods=["POST"]),
        Route("/activities/{slug}/report", report_page, methods=["GET"]),
        Route("/activities/{slug}/chart.png", report_chart, methods=["GET"]),
        Route("/jobs/{job}", job_page, methods=["GET"]),
        Route("/jobs/{job}/progress", job_progress, methods=["GET"]),
        Route("/batches/{batch:int}.csv", batch_export, methods=["GET"]),
        Route("/approvals", approvals_page, methods=["GET"]),
        Route("/approvals/{approval:int}", approval_decide, methods=["POST"]),
        Route("/dead-letters", dead_letters_page, methods=["GET"]),
        Route("/dead-letters/{dead_letter:int}", dead_letter_page, methods=["GET"]),
        Route("/dead-letters/{dead_letter:int}/replay", dead_letter_replay, methods=["POST"]),
        Route("/lookup", lookup_page, methods=["GET"]),
        Route("/audit", audit_page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


LOCK_SESSION_KEYS = "SELECT pg_advisory_xact_lock(hashtext('office_session_keys'))"


class OfficeNotReady(OperatorError):
    """The database has no back-office tables yet."""


def session_secret(engine: Engine) -> str:
    """The key that signs sessions: the newest in the database, made on the
    first start (under a lock, so that processes starting together agree)."""
    if not inspect(engine).has_table(SessionKey.__tablename__):
        raise OfficeNotReady("the database has no back-office tables: run `issuance db upgrade` first")
    with Session(engine) as session, session.begin():
        session.execute(text(LOCK_SESSION_KEYS))
        secret = session.scalar(select(SessionKey.secret).order_by(SessionKey.key_id.desc()).limit(1))
        if secret is None:
            secret = secrets.token_bytes(64)
            session.add(SessionKey(secret=secret))
    return secret.hex()


class AccessLog(HttpMiddleware):
    """One log line per request, without the query string (a lookup's
    query holds a phone number): uvicorn's own access log is off."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info(
                "%s %s %d %.0fms",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )


def _money(cents: float | None) -> str:
    return "-" if cents is None else f"{cents / 100:,.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def create_app(
    settings: Settings, *, approval_threshold: int = approvals.DEFAULT_THRESHOLD, https_only: bool = False
) -> Starlette:
    """The back office. ``approval_threshold``: budgets (packages) above it
    wait for an approver; ``https_only``: session cookie only over TLS (set
    it behind a TLS-terminating proxy)."""
    engine = database.engine(settings)
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters.update(money=_money, rate=_rate, when=_when)
    office = Office(
        settings=settings,
        engine=engine,
        jobs=Jobs(engine),
        threshold=approval_threshold,
        templates=templates,
        chart_lock=threading.Lock(),
    )
    app = Starlette(
        routes=routes(),
        middleware=[
            Middleware(AccessLog),
            Middleware(HeadersMiddleware),
            Middleware(
                SessionMiddleware,
                secret_key=session_secret(engine),
                session_cookie=SESSION_COOKIE,
                max_age=SESSION_SECONDS,
                same_site="strict",
                https_only=https_only,
            ),
            Middleware(CsrfMiddleware),
        ],
    )
    app.state.office = office
    return app
