"""The back office's protections that no endpoint has to remember: security
headers on every answer, and the CSRF check of every state-changing request.

CSRF: a signed double submit, written here rather than taken from
starlette-csrf. The token is a random value kept in the session, which
Starlette's SessionMiddleware signs with itsdangerous, and echoed in every
form as the hidden field ``csrf_token`` (or the ``X-CSRF-Token`` header of a
script). A request whose token does not match is refused with 403 before it
reaches an endpoint. starlette-csrf reads its token from a header only, so
every plain HTML form would need script to post, and its cookie is a second
unsigned cookie beside the session; the session already gives a signed,
per-user place to keep the token. The Origin header, when a browser sends
one, must be the back office's own as well.

The middleware reads the body of a POST to find the form field (forms are
small: over MAX_BODY_BYTES is refused) and hands the same bytes on. It reads
the field of URL-encoded forms, which every form here is; any other body
must carry the header.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import parse_qs

from issuance.shared.asgi import HttpMiddleware, security_headers
from starlette.types import Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = b"x-csrf-token"
SESSION_KEY = "csrf"

# Banners are previewed from the CDN they live on (https); charts and the
# style sheet come from the back office itself; nothing may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' https:;"
    " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = (
    *security_headers(CONTENT_SECURITY_POLICY, referrer_policy=b"same-origin"),
    # Pages show members' coupons and orders: no copy in any cache.
    (b"cache-control", b"no-store"),
)


def csrf_token(session: dict[str, Any]) -> str:
    """The session's token, made on first use."""
    token = session.get(SESSION_KEY)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[SESSION_KEY] = token
    return token


class HeadersMiddleware(HttpMiddleware):
    """Adds :data:`HEADERS` to every response."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *(header for header in HEADERS if header[0] not in names),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CsrfMiddleware(HttpMiddleware):
    """Refuses (403) every state-changing request without the session's
    token; runs inside SessionMiddleware (it needs ``scope["session"]``)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await _refuse(send, 413, "the form is too large")
                return
        expected = scope["session"].get(SESSION_KEY)
        given = headers.get(CSRF_HEADER, b"").decode("latin-1") or _form_token(headers, body)
        if not _same_origin(scope, headers):
            await _refuse(send, 403, "this form was sent from another site")
            return
        if not isinstance(expected, str) or not given or not hmac.compare_digest(given, expected):
            await _refuse(send, 403, "this form has expired: reload the page and try again")
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _form_token(headers: dict[bytes, bytes], body: bytes) -> str:
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip()
    if content_type != b"application/x-www-form-urlencoded":
        return ""
    values = parse_qs(body.decode("latin-1"), max_num_fields=200).get(CSRF_FIELD, [""])
    return values[0]


def _same_origin(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    origin = headers.get(b"origin")
    if origin is None:
        return True
    host = headers.get(b"host", b"").decode("latin-1")
    return bool(origin.decode("latin-1") == f"{scope.get('scheme', 'http')}://{host}")


async def _refuse(send: Send, status: int, text: str) -> None:
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Refused</title>"
        f"<main><h1>Refused</h1><p>{text}</p></main></html>"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
