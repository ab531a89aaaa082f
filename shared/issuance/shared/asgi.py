"""The base of the web apps' pure ASGI middleware (the back office's and,
for the page, any that wants it)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


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
