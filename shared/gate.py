"""The fast gate in Redis: what the activity page may answer at once.

PostgreSQL stays the truth; the workers write here after they commit, and any
Redis failure is logged and ignored (the workers enforce every rule again).
Keys hold phone digests (hex of the HMAC), never numbers.
"""

from __future__ import annotations

import logging
import time

import redis

from shared.domain import Refusal

log = logging.getLogger(__name__)
# After a failure the gate is left alone for a while, so that a Redis outage
# costs the workers one timeout, not one per batch.
PAUSE_AFTER_FAILURE_SECONDS = 5.0
_paused_until = 0.0


def _available() -> bool:
    return time.monotonic() >= _paused_until


def _failed(exc: Exception) -> None:
    global _paused_until  # noqa: PLW0603 - one pause per process
    _paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_SECONDS
    log.warning("gate skipped for %.0fs, Redis unavailable: %s", PAUSE_AFTER_FAILURE_SECONDS, exc)


KEY_PREFIX = "issuance:gate"
# Long enough to outlive any activity; the sets are re-derivable from PostgreSQL.
TTL_SECONDS = 90 * 86_400


def activity_key(activity: str) -> str:
    return f"{KEY_PREFIX}:activity:{activity}"


def group_key(group: str) -> str:
    return f"{KEY_PREFIX}:group:{group}"


def remember_grants(client: redis.Redis, grants: list[tuple[str, str, bytes]]) -> None:
    """Record that numbers hold these activities' packages (and so their
    groups'): (activity slug, group, phone digest) each, in one round trip."""
    if not _available():
        return
    try:
        pipe = client.pipeline(transaction=False)
        for activity, group, digest in grants:
            for key in (activity_key(activity), group_key(group)):
                pipe.sadd(key, digest.hex())
                pipe.expire(key, TTL_SECONDS)
        pipe.execute()
    except redis.RedisError as exc:
        _failed(exc)


def remember_grant(client: redis.Redis, *, activity: str, group: str, digest: bytes) -> None:
    """Record one grant (see remember_grants)."""
    remember_grants(client, [(activity, group, digest)])


def known_refusal(client: redis.Redis, *, activity: str, group: str, digest: bytes) -> Refusal | None:
    """A refusal the gate already knows, or None (then the workers decide)."""
    member = digest.hex()
    try:
        pipe = client.pipeline(transaction=False)
        pipe.sismember(activity_key(activity), member)
        pipe.sismember(group_key(group), member)
        in_activity, in_group = pipe.execute()
    except redis.RedisError as exc:
        log.warning("gate check skipped, Redis unavailable: %s", exc)
        return None
    if in_activity:
        return Refusal.ALREADY_RECEIVED
    if in_group:
        return Refusal.SIMILAR_ACTIVITY
    return None
