"""The checkout API: an ASGI app (Starlette) that answers the order system
synchronously. Endpoints only parse and validate (strictly: exactly the
schemas of issuance.producers.checkout.openapi), run one operation of
issuance.producers.checkout.service in a worker thread, and render its answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import orjson
from issuance.producers.checkout import service
from issuance.producers.checkout.openapi import (
    CODE_PATTERN,
    MAX_BIGINT,
    MAX_CODES,
    MAX_ITEMS,
    MAX_LEVEL,
    MAX_LINES,
    MAX_WHY,
    NAME_PATTERN,
    ORDER_ID_PATTERN,
    SPEC,
)
from issuance.producers.checkout.service import CheckoutAnswer
from issuance.shared.db.promo_store import WriteOffAnswer
from issuance.shared.domain.checkout import Cart, CartLine, CouponOption, best
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.settings import Settings, checkout_clients, load_settings
from issuance.shared.wire.messages import utcnow
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Endpoint = Callable[[Request], Awaitable[Response]]
MAX_BODY = 16 * 1024
ORDER_ID = re.compile(ORDER_ID_PATTERN)
CODE = re.compile(CODE_PATTERN)
NAME = re.compile(NAME_PATTERN)
DIGITS = re.compile(r"^[0-9]{1,19}$")
REFUND_FIELDS = frozenset(("refunded_by", "fulfilled"))
MEMBER_FIELDS = frozenset(("member_id", "app_member_id"))
CART_REQUIRED = frozenset(("amount_cents", "items"))
CART_OPTIONAL = frozenset(("lines", "store", "member_level", "promotions"))
LINE_FIELDS = frozenset(("product", "category", "amount_cents", "quantity"))
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


@dataclasses.dataclass(frozen=True, slots=True)
class Buyer:
    """The member a request names: by the member ID or by the app's."""

    member_id: int | None
    app_member_id: int | None


def cart_request(body: dict[str, Any]) -> tuple[Buyer, Cart, list[str]]:
    """(buyer, cart at the server's time, codes) from a CartRequest body."""
    buyer, cart = cart_query(body, extra=frozenset(("codes",)))
    codes = body["codes"]
    if (
        not isinstance(codes, list)
        or not 1 <= len(codes) <= MAX_CODES
        or not all(isinstance(c, str) and CODE.match(c) for c in codes)
        or len(set(codes)) != len(codes)
    ):
        raise BadRequest(f"codes must be 1 to {MAX_CODES} distinct codes matching {CODE_PATTERN}")
    return buyer, cart, codes


def cart_query(body: dict[str, Any], *, extra: frozenset[str] = frozenset()) -> tuple[Buyer, Cart]:
    """(buyer, cart at the server's time) from a CartQuery body (with the
    ``extra`` fields required too)."""
    required = CART_REQUIRED | extra
    unknown = sorted(set(body) - required - CART_OPTIONAL - MEMBER_FIELDS)
    missing = sorted(required - set(body))
    if unknown or missing:
        raise BadRequest(f"unknown fields {unknown}, missing fields {missing}")
    named = [name for name in sorted(MEMBER_FIELDS) if name in body]
    if len(named) != 1:
        raise BadRequest("name the buyer by exactly one of member_id and app_member_id")
    ids = {name: _integer(body[name], name, low=1, high=MAX_BIGINT) for name in named}
    promotions = body.get("promotions", False)
    if type(promotions) is not bool:
        raise BadRequest("promotions must be true or false")
    cart = Cart(
        amount_cents=_integer(body["amount_cents"], "amount_cents", low=0, high=MAX_BIGINT),
        items=_integer(body["items"], "items", low=0, high=MAX_ITEMS),
        at=utcnow(),
        lines=_lines(body.get("lines", [])),
        store=None if body.get("store") is None else _name(body["store"], "store"),
        member_level=_integer(body.get("member_level", 0), "member_level", low=0, high=MAX_LEVEL),
        promotions=promotions,
    )
    return Buyer(ids.get("member_id"), ids.get("app_member_id")), cart


def _name(value: object, name: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise BadRequest(f"{name} must match {NAME_PATTERN}")
    return value


def _lines(value: object) -> tuple[CartLine, ...]:
    if not isinstance(value, list) or len(value) > MAX_LINES:
        raise BadRequest(f"lines must be a list of at most {MAX_LINES} cart lines")
    lines = []
    for line in value:
        if (
            not isinstance(line, dict)
            or set(line) - LINE_FIELDS
            or not {"product", "amount_cents"} <= set(line)
        ):
            raise BadRequest("each line is {product, amount_cents} with optional category and quantity")
        lines.append(
            CartLine(
                product=_name(line["product"], "product"),
                category=_name(line["category"], "category") if "category" in line else "",
                amount_cents=_integer(line["amount_cents"], "a line's amount_cents", low=0, high=MAX_BIGINT),
                quantity=_integer(line.get("quantity", 1), "a line's quantity", low=1, high=MAX_ITEMS),
            )
        )
    return tuple(lines)


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


def write_off_request(body: dict[str, Any]) -> tuple[str, str]:
    """(partner, reason) from a WriteOffRequest body."""
    if set(body) != {"partner", "reason"}:
        raise BadRequest("the body is exactly {partner, reason}")
    reason = body["reason"]
    if not isinstance(reason, str) or not 1 <= len(reason) <= MAX_WHY or not reason.strip():
        raise BadRequest(f"reason must be 1 to {MAX_WHY} characters")
    return _name(body["partner"], "partner"), reason


def write_off_response(code: str, answer: WriteOffAnswer) -> JSON:
    refusal = answer.refusal
    body = {
        "code": code,
        "outcome": "refused" if refusal else "written_off",
        "repeated": answer.repeated,
        "record": None if answer.record is None else answer.record.as_json(),
        "reason": None if refusal is None else refusal.value,
        "message": None if refusal is None else refusal.text,
    }
    status = 200 if refusal is None else 404 if refusal is LifecycleRefusal.UNKNOWN_CODE else 409
    return JSON(body, status_code=status)


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
        "rules": rules_json(option),
    }


def rules_json(option: CouponOption) -> dict[str, Any]:
    rules = option.coupon.rules
    return {
        "scope_products": sorted(rules.products),
        "scope_categories": sorted(rules.categories),
        "scope_stores": sorted(rules.stores),
        "min_items": rules.min_items,
        "min_member_level": rules.min_member_level,
        "stackable": rules.stackable,
        "priority": rules.priority,
        "per_person_limit": rules.per_person_limit,
    }


def listing(member_id: int, cart: Cart, options: list[CouponOption]) -> JSON:
    first = best(options)
    return JSON(
        {
            "member_id": member_id,
            "amount_cents": cart.amount_cents,
            "items": cart.items,
            "best": None if first is None else first.coupon.code,
            "coupons": [option_json(o) for o in options],
        }
    )


NOT_FOUND = frozenset((LifecycleRefusal.UNKNOWN_ORDER, LifecycleRefusal.UNKNOWN_MEMBER))


def answer_response(answer: service.CheckoutAnswer) -> JSON:
    status = 200
    if answer.outcome is service.Outcome.REFUSED:
        status = 404 if answer.reason in NOT_FOUND else 409
    return JSON(answer.as_json(), status_code=status)


def unknown_app_member(app_member_id: int | None) -> BadRequest:
    return BadRequest(f"no member is linked to app member {app_member_id}", 404)


def create_app(
    settings: Settings | None = None,
    *,
    pool: ConnectionPool | None = None,
    hold: timedelta = service.DEFAULT_HOLD,
    clients: Mapping[str, str] | None = None,
) -> Starlette:
    """The checkout app. With ``pool`` given, the caller owns it; otherwise
    the app opens one from the settings for its lifetime. ``clients``
    ({token: name}, by default ``ISSUANCE_CHECKOUT_TOKENS``): when any, every
    operation needs ``Authorization: Bearer <token>``, and a partner writes
    off codes only under its own name."""
    state: dict[str, ConnectionPool] = {}
    if clients is None:
        clients = checkout_clients(settings) if settings is not None else {}
    tokens = dict(clients)

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

    async def member_of(buyer: Buyer) -> int | None:
        if buyer.member_id is not None:
            return buyer.member_id
        assert buyer.app_member_id is not None
        return await run_in_threadpool(service.member_of_app, state["pool"], buyer.app_member_id)

    def path_id(request: Request, name: str) -> int:
        raw = str(request.path_params[name])
        if not DIGITS.match(raw):
            raise BadRequest(f"the {name.replace('_', ' ')} must be a positive integer")
        return _integer(int(raw), name, low=1, high=MAX_BIGINT)

    async def list_for(request: Request, buyer: Buyer) -> Response:
        if set(request.query_params) - {"amount_cents", "items"}:
            raise BadRequest("only amount_cents and items are accepted")
        amount = _query_integer(request.query_params, "amount_cents", low=0, high=MAX_BIGINT)
        items = _query_integer(request.query_params, "items", low=0, high=MAX_ITEMS)
        member_id = await member_of(buyer)
        if member_id is None:
            raise unknown_app_member(buyer.app_member_id)
        cart = Cart(amount_cents=amount, items=items, at=utcnow())
        options = await run_in_threadpool(service.list_coupons, state["pool"], member_id, cart)
        return listing(member_id, cart, options)

    async def list_coupons(request: Request) -> Response:
        return await list_for(request, Buyer(path_id(request, "member_id"), None))

    async def list_app_member_coupons(request: Request) -> Response:
        return await list_for(request, Buyer(None, path_id(request, "app_member_id")))

    async def list_for_cart(request: Request) -> Response:
        buyer, cart = cart_query(await body_of(request, required=True))
        member_id = await member_of(buyer)
        if member_id is None:
            raise unknown_app_member(buyer.app_member_id)
        options = await run_in_threadpool(service.list_coupons, state["pool"], member_id, cart)
        return listing(member_id, cart, options)

    async def validate(request: Request) -> Response:
        order_id = order_id_of(request)
        buyer, cart, codes = cart_request(await body_of(request, required=True))
        member_id = await member_of(buyer)
        if member_id is None:
            return answer_response(service.unknown_member(order_id))
        answer = await run_in_threadpool(
            lambda: service.validate(state["pool"], order_id, member_id=member_id, cart=cart, codes=codes)
        )
        return answer_response(answer)

    async def reserve(request: Request) -> Response:
        order_id = order_id_of(request)
        buyer, cart, codes = cart_request(await body_of(request, required=True))
        member_id = await member_of(buyer)
        if member_id is None:
            return answer_response(service.unknown_member(order_id))
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

    async def write_off(request: Request) -> Response:
        code = str(request.path_params["code"])
        if not CODE.match(code):
            raise BadRequest(f"the code must match {CODE_PATTERN}")
        partner, reason = write_off_request(await body_of(request, required=True))
        caller = request.scope.get("checkout_client")
        if caller is not None and caller != partner:
            raise BadRequest(f"a write-off is made in the caller's own name ({caller})", 403)
        answer = await run_in_threadpool(
            lambda: service.write_off(state["pool"], code, partner=partner, reason=reason, at=utcnow())
        )
        return write_off_response(code, answer)

    async def openapi(request: Request) -> Response:
        return Response(OPENAPI_BYTES, media_type="application/json")

    def caller_of(request: Request) -> str | None:
        """The client a bearer token names; None when it names none."""
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        found = None
        for token, name in tokens.items():  # every token compared, in constant time each
            if hmac.compare_digest(token.encode(), presented.strip().encode()):
                found = name
        return found

    def route(path: str, operation: Endpoint, method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            if tokens:
                caller = caller_of(request)
                if caller is None:
                    return JSON(
                        {"error": "a bearer token of ISSUANCE_CHECKOUT_TOKENS is required"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                request.scope["checkout_client"] = caller
            try:
                return await operation(request)
            except BadRequest as exc:
                return JSON({"error": str(exc)}, status_code=exc.status)

        return Route(path, endpoint, methods=[method])

    return Starlette(
        routes=[
            route("/api/members/{member_id}/coupons", list_coupons, "GET"),
            route("/api/app-members/{app_member_id}/coupons", list_app_member_coupons, "GET"),
            route("/api/carts/coupons", list_for_cart, "POST"),
            route("/api/orders/{order_id}/validate", validate, "POST"),
            route("/api/orders/{order_id}/reserve", reserve, "POST"),
            route("/api/orders/{order_id}/redeem", redeem, "POST"),
            route("/api/orders/{order_id}/release", release, "POST"),
            route("/api/orders/{order_id}/refund", refund, "POST"),
            route("/api/codes/{code}/write-off", write_off, "POST"),
            Route("/api/openapi.json", openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
