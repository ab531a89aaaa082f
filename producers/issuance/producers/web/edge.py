"""The page's one ASGI layer, around every request: the security headers,
``no-store`` on API answers, the request body limit and the request metrics.

One plain ASGI class instead of a middleware per concern, because it runs
on every request of the hot path: one wrapped ``send`` per request, headers
and metric children prepared once, no per-request task or copy of the body.

The claim endpoint (``POST /api/claims``) is called directly, past the
router and Starlette's exception middleware (it raises no HTTP exception
and has no path parameters); its answer is sent as two ASGI messages with
the prepared headers appended. Every other request goes through the app.
An exception of the claim endpoint still reaches the server error handler
outside this layer, as before.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from issuance.producers.web.security import (
    MAX_BODY_BYTES,
    NO_STORE,
    SECURITY_HEADERS,
    BodyTooLarge,
    content_length,
    too_large,
)
from issuance.shared.metrics import WEB_REQUEST_SECONDS, WEB_REQUESTS
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLAIMS_PATH = "/api/claims"
PAGE_HEADERS = list(SECURITY_HEADERS)
API_HEADERS = [*SECURITY_HEADERS, NO_STORE]
Endpoint = Callable[[Request], Awaitable[Response]]


class RouteMetrics:
    """The request counter's and duration histogram's children, by route
    template and status, resolved once each (``labels()`` takes a lock and
    builds a key on every call). Route templates keep the labels bounded."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    def observe(self, template: str, status: int, seconds: float) -> None:
        counter = self._counters.get((template, status))
        if counter is None:
            counter = self._counters[template, status] = WEB_REQUESTS.labels(template, str(status))
        counter.inc()
        duration = self._durations.get(template)
        if duration is None:
            duration = self._durations[template] = WEB_REQUEST_SECONDS.labels(template)
        duration.observe(seconds)


class PageEdge:
    """Security headers, body limit and metrics for every HTTP request;
    ``claims`` (the claim endpoint and its route) served directly."""

    def __init__(self, app: ASGIApp, *, claims: tuple[Endpoint, Any], max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.claim_endpoint, self.claim_route = claims
        self.max_body = max_body
        self.metrics = RouteMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        extra = API_HEADERS if path.startswith("/api/") else PAGE_HEADERS
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            declared = content_length(scope["headers"])
            if declared is not None and declared > self.max_body:
                await too_large(send_with_headers)
                return
            limited = self._limited(receive)
            if path == CLAIMS_PATH and scope["method"] == "POST":
                status = await self._claim(scope, limited, send)
            else:
                await self.app(scope, limited, send_with_headers)
        finally:
            route = scope.get("route")
            self.metrics.observe(getattr(route, "path", "other"), status, time.perf_counter() - started)

    async def _claim(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Serve a claim past the router; the answer's status."""
        scope["route"] = self.claim_route
        scope["path_params"] = {}
        response = await self.claim_endpoint(Request(scope, receive, send))
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [*response.raw_headers, *API_HEADERS],
            }
        )
        await send({"type": "http.response.body", "body": response.body})
        return response.status_code

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that raises BodyTooLarge past ``max_body`` bytes
        (a body streamed without a declared length)."""
        received = 0
        max_body = self.max_body

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise BodyTooLarge
            return message

        return limited_receive
