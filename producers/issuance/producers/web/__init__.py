"""The activity page (``issuance web``): an ASGI app on Starlette and uvicorn."""

from __future__ import annotations

from issuance.producers.web.app import create_app

__all__ = ["create_app"]
