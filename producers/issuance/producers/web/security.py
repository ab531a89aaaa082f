"""Security headers, the request body limit, the cross-site check and the
claim status token. The page's ASGI layer (:mod:`.edge`) applies the
headers and the limit to every request.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Iterable
from urllib.parse import urlsplit

from issuance.shared.asgi import security_headers
from starlette.requests import Request
from starlette.types import Send

# Room for the claim and a challenge answer (a CAPTCHA token).
MAX_BODY_BYTES = 4096
# Domain separation: the status key is derived from the phone key, so it is
# no new secret to manage, yet a status token says nothing about a digest.
STATUS_KEY_CONTEXT = b"issuance/claim-status-token/v1"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' https: data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Share links carry the share ID: never hand it to another site.
SECURITY_HEADERS = security_headers(CONTENT_SECURITY_POLICY, referrer_policy=b"no-referrer")
NO_STORE = (b"cache-control", b"no-store")


def status_key(phone_key: str) -> bytes:
    """The key status tokens are made with, derived from the phone key."""
    return hmac.new(phone_key.encode(), STATUS_KEY_CONTEXT, hashlib.sha256).digest()


def status_token(key: bytes, claim_id: uuid.UUID, cell: int | None = None) -> str:
    """The token that lets the claimant, and only the claimant, read a
    claim's status: returned with the claim, required by the status read.

    With cells, it also names the cell the claim was sent to (``N.<mac>``,
    the number signed with the claim ID), so the status read goes to that
    cell's database alone. The cell number, not the ring slot: a claim stays
    in the database it was decided in even if its slot is later handed on."""
    if cell is None:
        return hmac.new(key, claim_id.bytes, hashlib.sha256).hexdigest()
    mac = hmac.new(key, claim_id.bytes + b"/cell/" + str(cell).encode(), hashlib.sha256).hexdigest()
    return f"{cell}.{mac}"


def token_cell(token: str | None) -> int | None:
    """The cell number a status token names (unchecked; None: no cell)."""
    if token is None:
        return None
    number, sep, _ = token.partition(".")
    if sep and 0 < len(number) <= 4 and number.isascii() and number.isdigit():
        return int(number)
    return None


def token_matches(key: bytes, claim_id: uuid.UUID, token: str | None) -> bool:
    """Whether ``token`` is the claim's status token (in constant time)."""
    if token is None:
        return False
    expected = status_token(key, claim_id, token_cell(token))
    return hmac.compare_digest(expected.encode(), token.encode(errors="replace"))


class BodyTooLarge(Exception):
    """The request body is larger than the page accepts."""


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def too_large(send: Send) -> None:
    body = b'{"status":"invalid","message":"the request is too large"}'
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def same_site(request: Request, trusted: frozenset[str], own_hosts: frozenset[str]) -> bool:
    """Whether a state-changing request comes from the page itself (or a
    trusted origin). Browsers send Origin with every POST from script and
    Sec-Fetch-Site with every request; a client without either (a server,
    a load tool) is no cross-site forgery risk.

    The page's own origin is the request's Host only when that host is one
    of the page's names (``own_hosts``): under DNS rebinding a hostile name
    resolves to the page, and Origin and Host then both name the attacker."""
    origin = request.headers.get("origin")
    if origin is not None:
        if origin in trusted:
            return True
        host = request.headers.get("host", "")
        return origin == f"{request.url.scheme}://{host}" and _hostname(host) in own_hosts
    fetch_site = request.headers.get("sec-fetch-site")
    return fetch_site in (None, "same-origin", "none")


# Loopback names always belong to the page: a browser on this machine is not
# a rebinding victim of them.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def own_hosts(activity_base_url: str, trusted: frozenset[str]) -> frozenset[str]:
    """The names the page answers to: the host of the activity URLs it is
    published under, the trusted origins' hosts and the loopback names."""
    names = {urlsplit(activity_base_url).hostname, *(urlsplit(o).hostname for o in trusted)}
    return LOOPBACK_HOSTS | {n for n in names if n}


def _hostname(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


def parse_origins(text: str) -> frozenset[str]:
    """Comma-separated origins, kept as scheme://host[:port]."""
    origins = set()
    for item in text.split(","):
        parts = urlsplit(item.strip())
        if parts.scheme and parts.netloc:
            origins.add(f"{parts.scheme}://{parts.netloc}")
    return frozenset(origins)
