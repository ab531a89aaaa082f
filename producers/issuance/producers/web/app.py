"""The activity page: an ASGI app (Starlette) that renders an activity,
takes claims and reports their status.

The endpoints only parse, check what is known at once, and hand the claim to
the pipeline with a confirmed publish; the workers decide everything else
(and enforce every rule again, since Redis is only a fast gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import phonenumbers
import psycopg
from issuance.producers.background import PublisherThread
from issuance.producers.web.challenge import Challenge, ChallengePolicy, Verifier, VerifierUnavailable
from issuance.producers.web.edge import CLAIMS_PATH, PageEdge
from issuance.producers.web.fastgate import FastGate, Limits, Verdict
from issuance.producers.web.i18n import Texts, choose_language
from issuance.producers.web.openapi import (
    MAX_CHALLENGE_CHARS,
    MAX_PHONE_CHARS,
    REGION_REASON,
    SPEC,
    TOKEN_HEADER,
)
from issuance.producers.web.page import render_error, render_not_found, render_page
from issuance.producers.web.queries import ActivityPage, CellQueries, Queries
from issuance.producers.web.security import (
    BodyTooLarge,
    own_hosts,
    parse_origins,
    same_site,
    status_key,
    status_token,
    token_cell,
    token_matches,
)
from issuance.shared.cellmap import configured, load_cell_map
from issuance.shared.db.fingerprints import check_phone_key_async
from issuance.shared.domain import (
    InvalidPhone,
    Refusal,
    mask_phone,
    normalize_phone,
    phone_digest,
    phone_digests,
    window_refusal,
)
from issuance.shared.domain.cells import CellMap
from issuance.shared.domain.regions import outside
from issuance.shared.errors import PublishError
from issuance.shared.metrics import metrics_response
from issuance.shared.settings import PhoneKeyError, Settings, load_settings, require_phone_keys
from issuance.shared.wire.cells import publisher_for
from issuance.shared.wire.messages import (
    CHANNEL,
    SLUG,
    ClaimRequested,
    Message,
    ShareOpened,
    new_claim_id,
    utcnow,
)
from issuance.shared.wire.publisher import Publisher
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
FORM_FIELDS = frozenset(("activity", "phone", "share_id", "claim_id", "challenge", "channel"))
BUSY = "busy, try again"
LIMITED = "too many attempts, please try again in a minute"
NO_SUCH_CLAIM = "no such claim"
CHALLENGE_NEEDED = "please complete the verification first"
OPENAPI_BYTES = orjson.dumps(SPEC)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class InvalidForm(ValueError):
    """The claim form is not what the API describes."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimForm:
    activity: str
    phone: str
    share_id: uuid.UUID | None
    claim_id: uuid.UUID | None
    challenge: str | None = None
    channel: str | None = None

    @classmethod
    def parse(cls, data: Any) -> ClaimForm:
        """Strict types: an object with exactly the documented fields."""
        if not isinstance(data, dict):
            raise InvalidForm("the body must be a JSON object")
        unknown = set(data) - FORM_FIELDS
        if unknown:
            raise InvalidForm(f"unknown field {sorted(unknown)[0]!r}")
        activity = data.get("activity")
        if not isinstance(activity, str) or not SLUG.fullmatch(activity):
            raise InvalidForm("activity must be an activity slug")
        phone = data.get("phone")
        if not isinstance(phone, str) or len(phone) > MAX_PHONE_CHARS:
            raise InvalidForm(f"phone must be a string of at most {MAX_PHONE_CHARS} characters")
        challenge = data.get("challenge")
        if challenge is not None and (not isinstance(challenge, str) or len(challenge) > MAX_CHALLENGE_CHARS):
            raise InvalidForm(f"challenge must be a string of at most {MAX_CHALLENGE_CHARS} characters")
        channel = data.get("channel")
        if channel is not None and (not isinstance(channel, str) or not CHANNEL.fullmatch(channel)):
            raise InvalidForm("channel must be a channel's name, 1 to 64 printable characters")
        return cls(
            activity=activity,
            phone=phone,
            share_id=_optional_uuid(data.get("share_id"), "share_id"),
            claim_id=_optional_uuid(data.get("claim_id"), "claim_id"),
            challenge=challenge,
            channel=channel,
        )


def _optional_uuid(value: Any, name: str) -> uuid.UUID | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 36:
        raise InvalidForm(f"{name} must be a UUID")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidForm(f"{name} must be a UUID") from None


def _refused(reason: Refusal, status_code: int = 200) -> JSON:
    return JSON({"status": "refused", "reason": reason.value, "message": reason.text}, status_code)


def _invalid(message: str, status_code: int) -> JSON:
    return JSON({"status": "invalid", "message": message}, status_code)


def parse_regions(raw: str) -> frozenset[str]:
    """``ISSUANCE_WEB_ALLOWED_REGIONS``: ISO region codes, comma-separated."""
    return frozenset(code.strip().upper() for code in raw.split(",") if code.strip())


def region_of(e164: str) -> str:
    """The region a normalised number belongs to (by its prefix), or "ZZ"."""
    return phonenumbers.region_code_for_number(phonenumbers.parse(e164)) or "ZZ"


def _limited(window_seconds: int) -> JSON:
    return JSON({"status": "limited", "message": LIMITED}, 429, headers={"retry-after": str(window_seconds)})


VERDICT_REFUSALS = {
    Verdict.ALREADY_RECEIVED: Refusal.ALREADY_RECEIVED,
    Verdict.SIMILAR_ACTIVITY: Refusal.SIMILAR_ACTIVITY,
    Verdict.SOLD_OUT: Refusal.SOLD_OUT,
}


class ActivityPageApp:
    """The routes, over the process's connections (opened in the lifespan)."""

    def __init__(
        self,
        settings: Settings,
        publisher_factory: Callable[[], Publisher] | None = None,
        challenge: Challenge | None = None,
    ) -> None:
        self.settings = settings
        self.allowed_regions = parse_regions(settings.web_allowed_regions)
        self.challenge = challenge or Challenge(ChallengePolicy.parse(settings.web_challenge))
        self.phone_keys = require_phone_keys(settings)
        # Tokens are made with the current phone key's and accepted with every
        # configured key's: a rotation does not lock claimants out of claims in flight.
        self.status_keys = [status_key(secret) for _, secret in self.phone_keys.secrets]
        self.trusted = parse_origins(settings.web_trusted_origins)
        # With cells, the page reads each cell's database and tells each
        # claimant which cell their claim went to (in the status token).
        self.cells: CellMap | None = load_cell_map(settings) if configured(settings) else None
        self.own_hosts = own_hosts(settings.activity_base_url, self.trusted)
        hours = settings.credit_promise_seconds // 3600
        self.accepted_text = f"accepted: your coupons arrive within {hours} hours"
        self._publisher_factory = publisher_factory or (
            # Fail fast when RabbitMQ is down: the member is told to try again.
            lambda: publisher_for(settings, connect_attempts=2, confirm_timeout=5.0)
        )
        self.publisher: PublisherThread
        self.gate: FastGate
        self.queries: Queries

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        settings = self.settings
        urls = {0: settings.database_url}
        if self.cells is not None:
            urls = {cell.number: cell.database_url for cell in self.cells.cells}
        pools: dict[int, AsyncConnectionPool[Any]] = {
            number: AsyncConnectionPool(
                url,
                min_size=1,
                max_size=settings.db_pool_size,
                kwargs={"autocommit": True},
                open=False,
                name=f"activity-page-{number}",
            )
            for number, url in urls.items()
        }
        for pool in pools.values():
            await pool.open()
            await _check_phone_key(pool, settings)
        if self.cells is None:
            self.queries = Queries(pools[0], cache_seconds=settings.web_cache_seconds)
        else:
            self.queries = CellQueries(pools, cache_seconds=settings.web_cache_seconds)
        self.gate = FastGate(
            settings.redis_url,
            limits=Limits(
                per_ip=settings.web_rate_per_ip,
                per_network=settings.web_rate_per_network,
                per_phone=settings.web_rate_per_phone,
                per_share=settings.web_rate_per_share,
                window_seconds=settings.web_rate_window_seconds,
            ),
            # Each cell's workers write their grants to their cell's Redis.
            cell_urls={c.number: c.redis_url for c in self.cells.cells} if self.cells is not None else None,
        )
        self.publisher = PublisherThread(self._publisher_factory, on_confirmed=self._remember_confirmed)
        self.publisher.start()
        try:
            yield
        finally:
            self.publisher.stop()
            await self.gate.close()
            for pool in pools.values():
                await pool.close()

    def _remember_confirmed(self, messages: list[Message]) -> None:
        key = self.phone_keys.current
        self.gate.remember_accepted(
            [
                (m.claim_id, m.activity, phone_digest(m.phone, key))
                for m in messages
                if isinstance(m, ClaimRequested)
            ]
        )

    # -- the page -----------------------------------------------------------

    async def page(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        texts = page_texts(request)
        if not SLUG.fullmatch(slug):
            return HTMLResponse(render_not_found(texts), 404, headers=VARY)
        try:
            activity = await self.queries.activity(slug)
        except Exception as exc:
            log.warning("activity %s cannot be read: %s", slug, exc)
            return HTMLResponse(render_error(503, texts), 503, headers={"retry-after": "2", **VARY})
        if activity is None:
            return HTMLResponse(render_not_found(texts), 404, headers=VARY)
        share = _share_param(request.query_params.get("share"))
        # Share opens are a funnel and fraud signal: a script opening made-up
        # share IDs from one address stops counting after a few a minute.
        if share is not None and not await self.gate.over_limit(
            "share-open",
            _client_ip(request),
            self.settings.web_share_opens_per_ip,
            self.settings.web_rate_window_seconds,
        ):
            self.publisher.publish_nowait(
                ShareOpened(event_id=uuid.uuid4(), share_id=share, opened_at=utcnow())
            )
        html = render_page(
            activity,
            share=str(share) if share else "",
            now=utcnow(),
            texts=texts,
            app_url=self.settings.app_url,
            credit_hours=self.settings.credit_promise_seconds // 3600,
        )
        return HTMLResponse(html, headers=VARY)

    # -- claims -------------------------------------------------------------

    async def request_claim(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            return _invalid("send the claim as application/json", 415)
        if not same_site(request, self.trusted, self.own_hosts):
            return JSON(
                {"status": "forbidden", "message": "claims are taken from the activity page only"}, 403
            )
        try:
            form = ClaimForm.parse(orjson.loads(await request.body()))
        except BodyTooLarge:
            return _invalid("the request is too large", 413)
        except ClientDisconnect:
            # The client went away mid-body: nobody reads the answer.
            log.debug("claim request abandoned by the client mid-body")
            return _invalid("the request was not received whole", 400)
        except orjson.JSONDecodeError:
            return _invalid("the body is not JSON", 400)
        except InvalidForm as exc:
            return _invalid(str(exc), 422)
        try:
            activity = await self.queries.activity(form.activity)
        except Exception as exc:
            log.warning("activity %s cannot be read: %s", form.activity, exc)
            return JSON({"status": "busy", "message": BUSY}, 503, headers={"retry-after": "2"})
        if activity is None:
            return _refused(Refusal.UNKNOWN_ACTIVITY, 404)
        try:
            e164 = normalize_phone(form.phone, self.settings.default_region)
        except InvalidPhone:
            return _refused(Refusal.BAD_PHONE, 422)
        if self.allowed_regions and region_of(e164) not in self.allowed_regions:
            return JSON(
                {
                    "status": "refused",
                    "reason": REGION_REASON,
                    "message": "this activity is open only to mobile numbers of "
                    + ", ".join(sorted(self.allowed_regions)),
                },
                422,
            )
        now = utcnow()
        refusal = window_refusal(activity.rules, now)
        if refusal is not None:
            return _refused(refusal)
        if activity.regions and outside(activity.regions, e164):
            # The page says which regions the activity is open to.
            message = f"{Refusal.OUTSIDE_REGION.text}: {', '.join(activity.regions)}"
            return JSON(
                {"status": "refused", "reason": Refusal.OUTSIDE_REGION.value, "message": message}, 200
            )
        challenged = await self._challenge(request, form, e164)
        if challenged is not None:
            return challenged
        return await self._gate_and_publish(request, form, activity, e164, now)

    async def _challenge(self, request: Request, form: ClaimForm, e164: str) -> Response | None:
        """None when the claim may go on; else the answer that stops it."""
        if not self.challenge.required():
            return None
        if not form.challenge:
            return JSON({"status": "challenge", "message": CHALLENGE_NEEDED}, 403)
        try:
            passed = await asyncio.to_thread(
                self.challenge.verifier.verify,
                answer=form.challenge,
                phone=e164,
                client_ip=_client_ip(request),
            )
        except VerifierUnavailable as exc:
            log.warning("claim not taken, the challenge cannot be checked: %s", exc)
            return JSON({"status": "busy", "message": str(exc)}, 503, headers={"retry-after": "60"})
        if not passed:
            return JSON({"status": "challenge", "message": CHALLENGE_NEEDED}, 403)
        return None

    async def _gate_and_publish(
        self, request: Request, form: ClaimForm, activity: ActivityPage, e164: str, now: datetime
    ) -> Response:
        (_, digest), *older = phone_digests(e164, self.phone_keys.secrets)
        claim_id = form.claim_id or new_claim_id()
        cell = self.cells.cell_for_phone(e164).number if self.cells is not None else None
        verdict = await self.gate.check_claim(
            client_ip=_client_ip(request),
            activity=activity.slug,
            group=activity.exclusivity_group,
            digest=digest,
            older_digests=[d for _, d in older],
            claim_id=claim_id,
            remaining=activity.remaining,
            share_id=form.share_id,
            cell=cell,
        )
        if verdict in RATE_VERDICTS:
            log.info("claim attempts limited (%s) for %s", verdict.value, mask_phone(e164))
            return _limited(self.settings.web_rate_window_seconds)
        if verdict in VERDICT_REFUSALS:
            return _refused(VERDICT_REFUSALS[verdict])
        if verdict is Verdict.CONFLICT:
            return _invalid("this claim ID was already used for another number", 409)
        if verdict is Verdict.DUPLICATE:  # a re-send of an accepted claim: not published twice
            return self._accepted(claim_id, cell)
        message = ClaimRequested(
            claim_id=claim_id,
            activity=activity.slug,
            phone=e164,
            requested_at=now,
            share_id=form.share_id,
            channel=form.channel,
        )
        try:
            await self.publisher.publish(message)
        except PublishError as exc:
            log.warning("claim %s for %s not queued: %s", claim_id, mask_phone(e164), exc)
            if verdict is Verdict.OK:
                await self.gate.give_back(activity.slug)
            return JSON({"status": "busy", "message": BUSY}, 503, headers={"retry-after": "2"})
        log.debug("claim %s accepted for %s in %s", claim_id, mask_phone(e164), activity.slug)
        return self._accepted(claim_id, cell)

    def _accepted(self, claim_id: uuid.UUID, cell: int | None) -> JSON:
        body = {
            "status": "accepted",
            "claim_id": str(claim_id),
            "status_token": status_token(self.status_keys[0], claim_id, cell),
            "message": self.accepted_text,
        }
        return JSON(body, 202)

    async def claim_status(self, request: Request) -> Response:
        settings = self.settings
        if await self.gate.over_limit(
            "status", _client_ip(request), settings.web_status_rate_per_ip, settings.web_rate_window_seconds
        ):
            return _limited(settings.web_rate_window_seconds)
        try:
            claim_id = uuid.UUID(request.path_params["claim_id"])
        except ValueError:
            return JSON({"status": "unknown", "message": NO_SUCH_CLAIM}, 404)
        token = request.query_params.get("token") or request.headers.get(TOKEN_HEADER)
        if not any(token_matches(key, claim_id, token) for key in self.status_keys):
            # The same answer as an unknown claim: a stranger learns nothing,
            # not even that the claim exists.
            return JSON({"status": "unknown", "message": NO_SUCH_CLAIM}, 404)
        try:
            found = await self.queries.claim_status(claim_id, token_cell(token))
        except Exception as exc:
            log.warning("claim status cannot be read: %s", exc)
            return JSON({"status": "unknown", "message": BUSY}, 503, headers={"retry-after": "2"})
        body: dict[str, Any] = {"claim_id": str(claim_id)}
        if found is None:
            if await self.gate.was_accepted(claim_id) is False:
                return JSON({**body, "status": "unknown", "message": NO_SUCH_CLAIM}, 404)
            # Queued, or Redis cannot tell: the worker has not recorded it yet.
            return JSON({**body, "status": "accepted", "message": self.accepted_text})
        if found.status == "refused" and found.reason is not None:  # a constraint: refusals have a reason
            reason = Refusal(found.reason)
            return JSON({**body, "status": "refused", "reason": reason.value, "message": reason.text})
        if found.status == "bound":
            held = {"held": True} if found.held else {}  # credited once the member registers
            return JSON({**body, "status": "bound", "message": "your coupons are being credited", **held})
        message = "your coupons are in your wallet"
        return JSON({**body, "status": "credited", "message": message, "coupons": list(found.coupons)})

    async def openapi(self, _request: Request) -> Response:
        return Response(OPENAPI_BYTES, media_type="application/json")

    async def health(self, _request: Request) -> Response:
        return JSON({"status": "ok"})


VARY = {"vary": "Accept-Language"}
RATE_VERDICTS = frozenset((Verdict.RATE_IP, Verdict.RATE_NETWORK, Verdict.RATE_PHONE, Verdict.RATE_SHARE))


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def page_texts(request: Request) -> Texts:
    """The page's language: ``?lang=zh-CN|en``, else the browser's, else Chinese."""
    return Texts(choose_language(request.query_params.get("lang"), request.headers.get("accept-language")))


async def not_found(request: Request, _exc: Exception) -> Response:
    """An unknown path: the envelope's 404 page for browsers, JSON for the API."""
    if request.url.path.startswith("/api/"):
        return JSON({"status": "unknown", "message": "not found"}, 404)
    return HTMLResponse(render_not_found(page_texts(request)), 404, headers=VARY)


async def server_error(request: Request, _exc: Exception) -> Response:
    """An unexpected error: the envelope's "busy, try again" page (JSON for the API)."""
    if request.url.path.startswith("/api/"):
        return JSON({"status": "busy", "message": BUSY}, 500)
    return HTMLResponse(render_error(500, page_texts(request)), 500, headers=VARY)


async def _check_phone_key(pool: AsyncConnectionPool[Any], settings: Settings) -> None:
    """Refuse to start with another phone key than the workers'. If the
    database cannot be reached now, the page starts: the workers, which do
    the hashing that counts, check their key before they take a claim."""
    try:
        async with pool.connection(timeout=5) as conn:
            await check_phone_key_async(conn, settings)
    except PhoneKeyError as exc:
        log.critical("cannot start: %s", exc)
        raise
    except (psycopg.Error, PoolTimeout) as exc:
        log.warning("phone key not checked, the database is unavailable: %s", exc)


def _share_param(value: str | None) -> uuid.UUID | None:
    if value is None or len(value) != 36:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def create_app(
    settings: Settings | None = None,
    *,
    publisher_factory: Callable[[], Publisher] | None = None,
    challenge_verifier: Verifier | None = None,
) -> Starlette:
    """The ASGI app. ``publisher_factory`` builds the process's publisher
    (RabbitMQ from the settings by default); ``challenge_verifier`` checks
    challenge answers when ``ISSUANCE_WEB_CHALLENGE`` is on (none: every
    challenged claim is refused, saying no provider is configured)."""
    settings = settings or load_settings()
    require_phone_keys(settings)
    challenge = Challenge(ChallengePolicy.parse(settings.web_challenge), challenge_verifier)
    page = ActivityPageApp(settings, publisher_factory, challenge)
    routes = [
        Route("/a/{slug}", page.page, methods=["GET"]),
        Route(CLAIMS_PATH, page.request_claim, methods=["POST"]),
        Route("/api/claims/{claim_id}", page.claim_status, methods=["GET"]),
        Route("/openapi.json", page.openapi, methods=["GET"]),
        Route("/healthz", page.health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes, lifespan=page.lifespan, exception_handlers={404: not_found, 500: server_error}
    )
    # A path that does not match is a 404, never a redirect to a guessed one.
    app.router.redirect_slashes = False
    claims = next(r for r in routes if isinstance(r, Route) and r.path == CLAIMS_PATH)
    app.add_middleware(PageEdge, claims=(page.request_claim, claims))
    return app


async def metrics(_: Request) -> Response:
    """Prometheus metrics of every process of this server."""
    body, content_type = metrics_response()
    return Response(body, media_type=content_type)
