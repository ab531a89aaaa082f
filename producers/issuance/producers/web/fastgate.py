"""The page's side of the Redis gate: one script call per claim, the calls of
concurrent claims sent together, one pipeline per round trip.

A Lua script counts the attempt against the per-IP and per-number rate
limits, looks the number up in the sets the workers fill after they commit
(``issuance.shared.gate``: already received, similar activity), and takes one package
from the activity's budget counter. The counter is seeded from PostgreSQL's
count of granted packages and re-seeded every ``BUDGET_SYNC_SECONDS``: between
seeds it also counts claims still in the queue, so a flood past the budget is
answered "all packages are gone" at once instead of queueing.

Redis is an optimisation, not the truth: when it is unreachable every check
is skipped (the workers enforce every rule again) and Redis is left alone for
a second, so an outage costs one timeout per second, not one per request.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis
from issuance.shared import gate
from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger(__name__)

BUDGET_SYNC_SECONDS = 5
ACCEPTED_TTL_SECONDS = 2 * 86_400
BACKOFF_SECONDS = 1.0


class Verdict(enum.StrEnum):
    OK = "ok"
    RATE_IP = "rate_ip"
    RATE_PHONE = "rate_phone"
    ALREADY_RECEIVED = "already_received"
    SIMILAR_ACTIVITY = "similar_activity"
    SOLD_OUT = "sold_out"
    DUPLICATE = "duplicate"  # this claim ID was already accepted for this number
    CONFLICT = "conflict"  # this claim ID was already used for another number
    UNCHECKED = "unchecked"  # Redis is unavailable: the workers decide


CHECK_CLAIM = """
local function hit(key, limit, window)
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('EXPIRE', key, window) end
  return n > tonumber(limit)
end
if hit(KEYS[1], ARGV[2], ARGV[4]) then return 'rate_ip' end
if hit(KEYS[2], ARGV[3], ARGV[4]) then return 'rate_phone' end
local seen = redis.call('GET', KEYS[6])
if seen then
  if seen == ARGV[7] then return 'duplicate' end
  return 'conflict'
end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 'already_received' end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return 'similar_activity' end
redis.call('SET', KEYS[5], ARGV[5], 'NX', 'EX', ARGV[6])
if redis.call('DECR', KEYS[5]) < 0 then return 'sold_out' end
return 'ok'
"""


# Only into a live counter: an INCR on an expired one would create a counter
# without expiry, holding 1, and every claim after it would read "all
# packages are gone" until someone deleted it.
GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCR', KEYS[1]) end
return false
"""


def rate_key(kind: str, value: str) -> str:
    return f"{gate.KEY_PREFIX}:rate:{kind}:{value}"


def budget_key(activity: str) -> str:
    return f"{gate.KEY_PREFIX}:budget:{activity}"


def accepted_key(claim_id: uuid.UUID) -> str:
    return f"{gate.KEY_PREFIX}:accepted:{claim_id}"


def fingerprint(activity: str, digest: bytes) -> str:
    """What a claim ID is bound to once accepted (no number in clear)."""
    return hashlib.sha256(activity.encode() + b"\0" + digest).hexdigest()[:32]


class FastGate:
    """Asynchronous checks against the gate, failing open."""

    def __init__(
        self,
        url: str,
        *,
        per_ip: int,
        per_phone: int,
        window_seconds: int,
        timeout: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        # At most ``max_connections`` calls at once: a burst of requests waits
        # its turn here instead of opening hundreds of connections, whose
        # connect timeouts would trip the fail-open backoff and switch the
        # gate off in the very burst it is for.
        self._slots = asyncio.Semaphore(max_connections)
        self.client = aioredis.Redis.from_url(
            url, max_connections=max_connections, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.sync_client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.per_ip = per_ip
        self.per_phone = per_phone
        self.window_seconds = window_seconds
        self._sha = hashlib.sha1(CHECK_CLAIM.encode()).hexdigest()  # noqa: S324  # nosec B324 - Redis names scripts by SHA-1
        self._queued: list[tuple[list[str], list[str | int], asyncio.Future[Verdict]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._give_back = self.client.register_script(GIVE_BACK)
        self._down_until = 0.0

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: Exception) -> None:
        self._down_until = time.monotonic() + BACKOFF_SECONDS
        log.warning("%s skipped, Redis unavailable: %s", what, exc)

    async def check_claim(
        self,
        *,
        client_ip: str,
        activity: str,
        group: str,
        digest: bytes,
        claim_id: uuid.UUID,
        remaining: int,
    ) -> Verdict:
        """Count the attempt and answer what Redis already knows."""
        if not self._available():
            return Verdict.UNCHECKED
        member = digest.hex()
        keys = [
            rate_key("ip", client_ip),
            # Per number and activity: posts with a victim's number on one
            # activity cannot lock the victim out of every other one.
            rate_key("phone", f"{activity}:{member}"),
            gate.activity_key(activity),
            gate.group_key(group),
            budget_key(activity),
            accepted_key(claim_id),
        ]
        args: list[str | int] = [
            member,
            self.per_ip,
            self.per_phone,
            self.window_seconds,
            max(remaining, 0),
            BUDGET_SYNC_SECONDS,
            fingerprint(activity, digest),
        ]
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, future))
        if self._drainer is None:
            # Started on the next loop turn: the requests that arrived with
            # this one join its batch, and more gather while it is in flight.
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Send the queued checks as one pipeline per round trip."""
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                verdicts = await self._check_batch([(keys, args) for keys, args, _ in batch])
                for (_, _, future), verdict in zip(batch, verdicts, strict=True):
                    if not future.done():
                        future.set_result(verdict)
        finally:
            self._drainer = None
            for _, _, future in self._queued:  # only left behind if this task was cancelled
                if not future.done():
                    future.set_result(Verdict.UNCHECKED)
            self._queued = []

    async def _check_batch(self, batch: list[tuple[list[str], list[str | int]]]) -> list[Verdict]:
        answers: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        try:
            async with self._slots:
                for attempt in range(2):
                    pipe = self.client.pipeline(transaction=False)
                    for i in todo:
                        keys, args = batch[i]
                        pipe.evalsha(self._sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                    for i, result in zip(todo, results, strict=True):
                        answers[i] = result
                    todo = [i for i in todo if isinstance(answers[i], NoScriptError)]
                    if not todo or attempt:
                        break
                    # Redis restarted and lost the script: load it, run those again.
                    await self.client.script_load(CHECK_CLAIM)
        except RedisError as exc:
            self._failed("claim check", exc)
            return [Verdict.UNCHECKED] * len(batch)
        verdicts = []
        for answer in answers:
            if isinstance(answer, bytes):
                verdicts.append(Verdict(answer.decode()))
            else:  # an error reply for this one check: the workers decide
                log.warning("claim check failed: %s", answer)
                verdicts.append(Verdict.UNCHECKED)
        return verdicts

    async def give_back(self, activity: str) -> None:
        """Return the package taken by a claim that could not be published."""
        if not self._available():
            return
        try:
            async with self._slots:
                await self._give_back(keys=[budget_key(activity)])
        except RedisError as exc:
            self._failed("budget release", exc)

    def remember_accepted(self, claims: list[tuple[uuid.UUID, str, bytes]]) -> None:
        """Remember published claims (claim ID, activity, phone digest): their
        status reads "accepted" until a worker records them, and a re-sent
        claim ID is not published twice. Called by the publishing thread for
        each confirmed batch (one round trip per batch, not per request)."""
        if not claims or not self._available():
            return
        try:
            pipe = self.sync_client.pipeline(transaction=False)
            for claim_id, activity, digest in claims:
                pipe.set(accepted_key(claim_id), fingerprint(activity, digest), ex=ACCEPTED_TTL_SECONDS)
            pipe.execute()
        except RedisError as exc:
            self._failed("accepted markers", exc)

    async def was_accepted(self, claim_id: uuid.UUID) -> bool | None:
        """True or False; None when Redis cannot tell."""
        if not self._available():
            return None
        try:
            async with self._slots:
                return bool(await self.client.exists(accepted_key(claim_id)))
        except RedisError as exc:
            self._failed("claim lookup", exc)
            return None

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)
        self.sync_client.close()
