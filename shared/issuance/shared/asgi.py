"""What the project's web apps share: the security headers and the base
of their pure ASGI middleware."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


def security_headers(
    content_security_policy: str, *, referrer_policy: bytes
) -> tuple[tuple[bytes, bytes], ...]:
    """The headers every page of the project's web apps carries: its own
    CSP, no sniffing, no framing, no device APIs, its own browsing context."""
    return (
        (b"content-security-policy", content_security_policy.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", referrer_policy),
        (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-origin"),
    )


class HttpMiddleware:
    """A pure ASGI middleware that concerns HTTP requests only: anything
    else (lifespan, websockets) goes straight to the app, and each HTTP
    request to :meth:`handle`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request (``self.app`` is the app inside)."""
        raise NotImplementedError
