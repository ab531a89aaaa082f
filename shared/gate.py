"""The fast gate in Redis: what the activity page may answer at once.

PostgreSQL stays the truth; the workers write here after they commit, and any
Redis failure is logged and ignored (the workers enforce every rule again).
Keys hold phone digests (hex of the HMAC), never numbers.
"""

from __future__ import annotations

import logging

import redis

from shared.domain import Refusal

log = logging.getLogger(__name__)
KEY_PREFIX = "issuance:gate"
# Long enough to outlive any activity; the sets are re-derivable from PostgreSQL.
TTL_SECONDS = 90 * 86_400


def activity_key(activity: str) -> str:
    return f"{KEY_PREFIX}:activity:{activity}"


def group_key(group: str) -> str:
    return f"{KEY_PREFIX}:group:{group}"


def remember_grant(client: redis.Redis, *, activity: str, group: str, digest: bytes) -> None:
    """Record that a number holds this activity's package (and so its group's)."""
    member = digest.hex()
    try:
        pipe = client.pipeline(transaction=False)
        for key in (activity_key(activity), group_key(group)):
            pipe.sadd(key, member)
            pipe.expire(key, TTL_SECONDS)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("gate update skipped, Redis unavailable: %s", exc)


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
