"""The checkout API: an ASGI app (Starlette) that answers the order system
synchronously. Endpoints only parse and validate (strictly: exactly the
schemas of issuance.producers.checkout.openapi), run one operation of
issuance.producers.checkout.service in a worker thread, and render its answer.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import orjson
from issuance.producers.checkout import service
from issuance.producers.checkout.openapi import CODE_PATTERN, MAX_BIGINT, MAX_CODES, ORDER_ID_PATTERN, SPEC
from issuance.producers.checkout.service import CheckoutAnswer
from issuance.shared.domain.checkout import Cart, CouponOption, best
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.settings import Settings, load_settings
from issuance.shared.wire.messages import utcnow
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Endpoint = Callable[[Request], Awaitable[Response]]
MAX_BODY = 16 * 1024
MAX_ITEMS = 100_000
ORDER_ID = re.compile(ORDER_ID_PATTERN)
CODE = re.compile(CODE_PATTERN)
DIGITS = re.compile(r"^[0-9]{1,19}$")
CART_FIELDS = frozenset(("member_id", "amount_cents", "items", "codes"))
REFUND_FIELDS = frozenset(("refunded_by", "fulfilled"))
OPENAPI_BYTES = orjson.dumps(SPEC)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class BadRequest(ValueError):
    """The request is not what the API describes; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _integer(value: object, name: str, *, low: int, high: int) -> int:
    # bool is an int in Python, never in this API.
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value


def _query_integer(params: Mapping[str, str], name: str, *, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or not DIGITS.match(raw):
        raise BadRequest(f"{name} is required, a non-negative integer")
    return _integer(int(raw), name, low=low, high=high)


def order_id_of(request: Request) -> str:
    order_id = str(request.path_params["order_id"])
    if not ORDER_ID.match(order_id):
        raise BadRequest(f"the order ID must match {ORDER_ID_PATTERN}")
    return order_id


async def body_of(request: Request, *, required: bool) -> dict[str, Any]:
    """The JSON object of the body (an empty object when none is required
    and none was sent)."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadRequest("the body is too large", 413)
    if not raw and not required:
        return {}
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise BadRequest("the body must be application/json", 415)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("the body is not JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def cart_request(body: dict[str, Any]) -> tuple[int, Cart, list[str]]:
    """(member, cart at the server's time, codes) from a CartRequest body."""
    unknown = sorted(set(body) - CART_FIELDS)
    missing = sorted(CART_FIELDS - set(body))
    if unknown or missing:
        raise BadRequest(f"unknown fields {unknown}, missing fields {missing}")
    member_id = _integer(body["member_id"], "member_id", low=1, high=MAX_BIGINT)
    amount = _integer(body["amount_cents"], "amount_cents", low=0, high=MAX_BIGINT)
    items = _integer(body["items"], "items", low=0, high=MAX_ITEMS)
    codes = body["codes"]
    if (
        not isinstance(codes, list)
        or not 1 <= len(codes) <= MAX_CODES
        or not all(isinstance(c, str) and CODE.match(c) for c in codes)
        or len(set(codes)) != len(codes)
    ):
        raise BadRequest(f"codes must be 1 to {MAX_CODES} distinct codes matching {CODE_PATTERN}")
    return member_id, Cart(amount_cents=amount, items=items, at=utcnow()), codes


def refund_request(body: dict[str, Any]) -> tuple[str, bool]:
    """(who refunds, whether the order was fulfilled) from a RefundRequest body."""
    unknown = sorted(set(body) - REFUND_FIELDS)
    if unknown:
        raise BadRequest(f"unknown fields {unknown}")
    refunded_by = body.get("refunded_by", "buyer")
    fulfilled = body.get("fulfilled", False)
    if refunded_by not in ("buyer", "merchant"):
        raise BadRequest("refunded_by must be buyer or merchant")
    if not isinstance(fulfilled, bool):
        raise BadRequest("fulfilled must be true or false")
    return refunded_by, fulfilled


def option_json(option: CouponOption) -> dict[str, Any]:
    c = option.coupon
    return {
        "code": c.code,
        "kind": c.kind,
        "value": c.value,
        "threshold_cents": c.threshold_cents,
        "status": c.status,
        "valid_from": None if c.valid_from is None else c.valid_from.isoformat(),
        "expires_at": None if c.expires_at is None else c.expires_at.isoformat(),
        "applicable": option.applicable,
        "discount_cents": option.discount_cents,
        "reason": None if option.reason is None else option.reason.value,
        "message": option.reason_text,
    }


def answer_response(answer: service.CheckoutAnswer) -> JSON:
    status = 200
    if answer.outcome is service.Outcome.REFUSED:
        status = 404 if answer.reason is LifecycleRefusal.UNKNOWN_ORDER else 409
    return JSON(answer.as_json(), status_code=status)


def create_app(
    settings: Settings | None = None,
    *,
    pool: ConnectionPool | None = None,
    hold: timedelta = service.DEFAULT_HOLD,
) -> Starlette:
    """The checkout app. With ``pool`` given, the caller owns it; otherwise
    the app opens one from the settings for its lifetime."""
    state: dict[str, ConnectionPool] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if pool is not None:
            state["pool"] = pool
            yield
            return
        from issuance.shared.db import database

        own = database.pool(settings or load_settings())
        state["pool"] = own
        try:
            yield
        finally:
            own.close()

    async def list_coupons(request: Request) -> Response:
        raw = str(request.path_params["member_id"])
        if not DIGITS.match(raw):
            raise BadRequest("the member ID must be a positive integer")
        member_id = _integer(int(raw), "member_id", low=1, high=MAX_BIGINT)
        if set(request.query_params) - {"amount_cents", "items"}:
            raise BadRequest("only amount_cents and items are accepted")
        amount = _query_integer(request.query_params, "amount_cents", low=0, high=MAX_BIGINT)
        items = _query_integer(request.query_params, "items", low=0, high=MAX_ITEMS)
        cart = Cart(amount_cents=amount, items=items, at=utcnow())
        options = await run_in_threadpool(service.list_coupons, state["pool"], member_id, cart)
        first = best(options)
        return JSON(
            {
                "member_id": member_id,
                "amount_cents": amount,
                "items": items,
                "best": None if first is None else first.coupon.code,
                "coupons": [option_json(o) for o in options],
            }
        )

    async def validate(request: Request) -> Response:
        order_id = order_id_of(request)
        member_id, cart, codes = cart_request(await body_of(request, required=True))
        answer = await run_in_threadpool(
            lambda: service.validate(state["pool"], order_id, member_id=member_id, cart=cart, codes=codes)
        )
        return answer_response(answer)

    async def reserve(request: Request) -> Response:
        order_id = order_id_of(request)
        member_id, cart, codes = cart_request(await body_of(request, required=True))
        answer = await run_in_threadpool(
            lambda: service.reserve(
                state["pool"], order_id, member_id=member_id, cart=cart, codes=codes, hold=hold
            )
        )
        return answer_response(answer)

    def order_step(name: str, step: Callable[..., CheckoutAnswer]) -> Endpoint:
        """An order operation that takes no fields: redeem, release."""

        async def endpoint(request: Request) -> Response:
            order_id = order_id_of(request)
            if await body_of(request, required=False):
                raise BadRequest(f"{name} takes no fields")
            answer = await run_in_threadpool(lambda: step(state["pool"], order_id, at=utcnow()))
            return answer_response(answer)

        return endpoint

    redeem = order_step("redeem", service.redeem)
    release = order_step("release", service.release)

    async def refund(request: Request) -> Response:
        order_id = order_id_of(request)
        refunded_by, fulfilled = refund_request(await body_of(request, required=False))
        answer = await run_in_threadpool(
            lambda: service.refund(
                state["pool"], order_id, at=utcnow(), refunded_by=refunded_by, fulfilled=fulfilled
            )
        )
        return answer_response(answer)

    async def openapi(request: Request) -> Response:
        return Response(OPENAPI_BYTES, media_type="application/json")

    def route(path: str, operation: Endpoint, method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                return await operation(request)
            except BadRequest as exc:
                return JSON({"error": str(exc)}, status_code=exc.status)

        return Route(path, endpoint, methods=[method])

    return Starlette(
        routes=[
            route("/api/members/{member_id}/coupons", list_coupons, "GET"),
            route("/api/orders/{order_id}/validate", validate, "POST"),
            route("/api/orders/{order_id}/reserve", reserve, "POST"),
            route("/api/orders/{order_id}/redeem", redeem, "POST"),
            route("/api/orders/{order_id}/release", release, "POST"),
            route("/api/orders/{order_id}/refund", refund, "POST"),
            Route("/api/openapi.json", openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
