"""The fast gate in Redis: what the activity page may answer at once (read
by issuance.producers.web.fastgate in one Lua script).

PostgreSQL stays the truth; the workers write here after they commit, and any
Redis failure is logged and ignored (the workers enforce every rule again).
Keys hold phone digests (hex of the HMAC), never numbers.
"""

from __future__ import annotations

import logging
import time

import redis

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
    groups'): (activity slug, group, phone digest) each, in one round trip
    of one SADD and one EXPIRE per key (a batch's grants share a few keys)."""
    if not _available():
        return
    members: dict[str, list[str]] = {}
    for activity, group, digest in grants:
        for key in (activity_key(activity), group_key(group)):
            members.setdefault(key, []).append(digest.hex())
    try:
        pipe = client.pipeline(transaction=False)
        for key, digests in members.items():
            pipe.sadd(key, *digests)
            pipe.expire(key, TTL_SECONDS)
        pipe.execute()
    except redis.RedisError as exc:
        _failed(exc)
