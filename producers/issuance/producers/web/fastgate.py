"""The page's side of the Redis gate: one script call per claim, the calls of
concurrent claims sent together, one pipeline per round trip.

A Lua script counts the attempt against the rate limits (per client
address, per client network, per number and activity, per share), looks
the number up in the sets the workers fill after they commit
(``issuance.shared.gate``: already received, similar activity), and takes
one package from the activity's budget counter. The counter is seeded from PostgreSQL's
count of granted packages and re-seeded every ``BUDGET_SYNC_SECONDS``: between
seeds it also counts claims still in the queue, so a flood past the budget is
answered "all packages are gone" at once instead of queueing.

With cells (``ISSUANCE_CELLS``) each cell's workers write their grants to
their cell's Redis. The page keeps its rate counters, budget counters and
accepted markers in its own Redis, but looks a number up in the grant sets
of the Redis of the cell the number routes to: one pipeline per cell and
round trip, before the script, whose answer it is given.

Redis is an optimisation, not the truth: when it is unreachable the rules
are left to the workers (they enforce every one again), the rate limits to
an in-process limiter (``limits.LocalLimiter``), and Redis is left alone for
a second, so an outage costs one timeout per second, not one per request,
and a bot cannot drain a budget while Redis is down.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis
from issuance.producers.web.limits import Limit, LocalLimiter, network_of
from issuance.shared import gate
from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger(__name__)

BUDGET_SYNC_SECONDS = 5
ACCEPTED_TTL_SECONDS = 2 * 86_400
BACKOFF_SECONDS = 1.0


class Verdict(enum.StrEnum):
    OK = "ok"
    RATE_IP = "rate_ip"
    RATE_NETWORK = "rate_network"
    RATE_PHONE = "rate_phone"
    RATE_SHARE = "rate_share"
    ALREADY_RECEIVED = "already_received"
    SIMILAR_ACTIVITY = "similar_activity"
    SOLD_OUT = "sold_out"
    DUPLICATE = "duplicate"  # this claim ID was already accepted for this number
    CONFLICT = "conflict"  # this claim ID was already used for another number
    UNCHECKED = "unchecked"  # Redis is unavailable: the workers decide


# KEYS: the rate counters (address, network, number, share), the
# activity's and the group's "received" sets, the budget, the accepted marker,
# then the number's rate counters under its older phone keys.
# ARGV: the number's digest, the four limits, the window, the budget seed and
# its lifetime, the accepted fingerprint; what the grant sets of the number's
# cell said when they are in another Redis ('' none: look them up here, '-'
# not received, else the verdict); then, while a phone key rotation is rolled
# out (deploy/SECURITY.md), the count n of older keys, the digests under them
# and the fingerprints with them: a number counts and is found under every
# key the page knows. A limit of 0 is not counted (a claim without a share).
CHECK_CLAIM = """
local function hit(key, limit, window)
  if tonumber(limit) == 0 then return false end
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('EXPIRE', key, window) end
  return n > tonumber(limit)
end
local older = tonumber(ARGV[11] or '0')
local function received(key)
  if redis.call('SISMEMBER', key, ARGV[1]) == 1 then return true end
  for i = 1, older do
    if redis.call('SISMEMBER', key, ARGV[11 + i]) == 1 then return true end
  end
  return false
end
local window = ARGV[6]
if hit(KEYS[1], ARGV[2], window) then return 'rate_ip' end
if hit(KEYS[2], ARGV[3], window) then return 'rate_network' end
local phone = hit(KEYS[3], ARGV[4], window)
for i = 1, older do
  if hit(KEYS[8 + i], ARGV[4], window) then phone = true end
end
if phone then return 'rate_phone' end
if hit(KEYS[4], ARGV[5], window) then return 'rate_share' end
local seen = redis.call('GET', KEYS[8])
if seen then
  if seen == ARGV[9] then return 'duplicate' end
  for i = 1, older do
    if seen == ARGV[11 + older + i] then return 'duplicate' end
  end
  return 'conflict'
end
local elsewhere = ARGV[10] or ''
if elsewhere == '' then
  if received(KEYS[5]) then return 'already_received' end
  if received(KEYS[6]) then return 'similar_activity' end
elseif elsewhere ~= '-' then
  return elsewhere
end
redis.call('SET', KEYS[7], ARGV[7], 'NX', 'EX', ARGV[8])
if redis.call('DECR', KEYS[7]) < 0 then return 'sold_out' end
return 'ok'
"""

# One counter: over the limit or not (status reads, share opens).
HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return n > tonumber(ARGV[1]) and 1 or 0
"""

LIMIT_VERDICTS = {
    "ip": Verdict.RATE_IP,
    "network": Verdict.RATE_NETWORK,
    "phone": Verdict.RATE_PHONE,
    "share": Verdict.RATE_SHARE,
}


# Only into a live counter: an INCR on an expired one would create a counter
# without expiry, holding 1, and every claim after it would read "all
# packages are gone" until someone deleted it.
GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCR', KEYS[1]) end
return false
"""

# The accepted markers of one confirmed batch, in one call: KEYS the markers,
# ARGV their fingerprints, then their lifetime. One reply for the batch
# instead of one per claim, read by the publishing thread.
REMEMBER = """
local ttl = ARGV[#KEYS + 1]
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i], 'EX', ttl) end
return #KEYS
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


class Limits(NamedTuple):
    """Attempts allowed per rate window (0: not limited)."""

    per_ip: int
    per_network: int
    per_phone: int
    per_share: int
    window_seconds: int


class _Check(NamedTuple):
    keys: list[str]
    args: list[str | int]
    local: list[tuple[Limit, str]]
    future: asyncio.Future[Verdict]
    # The cell whose Redis holds this number's grants, when it is not the page's.
    cell: int | None = None


# Where a number is found in its cell's grant sets: the activity's set
# first, as the script looks (received before similar).
GRANT_VERDICTS = ("already_received", "similar_activity")
NOT_RECEIVED = "-"


class FastGate:
    """Asynchronous checks against the gate: the rules fail open to the
    workers, the rate limits to the in-process limiter."""

    def __init__(
        self,
        url: str,
        *,
        limits: Limits,
        timeout: float = 0.5,
        max_connections: int = 64,
        local: LocalLimiter | None = None,
        cell_urls: Mapping[int, str] | None = None,
    ) -> None:
        """``cell_urls``: the Redis of each cell (by cell number) whose
        workers write their grants elsewhere than ``url``."""
        # At most ``max_connections`` calls at once: a burst of requests waits
        # its turn here instead of opening hundreds of connections, whose
        # connect timeouts would trip the fail-open backoff and switch the
        # gate off in the very burst it is for.
        self._slots = asyncio.Semaphore(max_connections)
        self.client = aioredis.Redis.from_url(
            url, max_connections=max_connections, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.sync_client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.limits = limits
        # The in-process limits (ip, network, phone, share), made once; None: not limited.
        self._local_limits = [
            Limit(kind=kind, count=count, window_seconds=limits.window_seconds) if count > 0 else None
            for kind, count in (
                ("ip", limits.per_ip),
                ("network", limits.per_network),
                ("phone", limits.per_phone),
                ("share", limits.per_share),
            )
        ]
        self.local = local or LocalLimiter()
        self._sha = hashlib.sha1(CHECK_CLAIM.encode()).hexdigest()  # noqa: S324  # nosec B324 - Redis names scripts by SHA-1
        self._queued: list[_Check] = []
        self._drainer: asyncio.Task[None] | None = None
        self._give_back = self.client.register_script(GIVE_BACK)
        self._hit = self.client.register_script(HIT)
        self._remember = self.sync_client.register_script(REMEMBER)
        self._down_until = 0.0
        self.cells = {
            number: aioredis.Redis.from_url(
                cell_url, max_connections=8, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            for number, cell_url in (cell_urls or {}).items()
            if cell_url and cell_url != url
        }
        self._cell_down_until = dict.fromkeys(self.cells, 0.0)

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
        share_id: uuid.UUID | None = None,
        older_digests: Sequence[bytes] = (),
        cell: int | None = None,
    ) -> Verdict:
        """Count the attempt and answer what Redis already knows.
        ``older_digests``: the number under the older phone keys still
        configured (a rotation in progress), counted and looked up too.
        ``cell``: the number of the cell the number routes to (its grants
        are looked up in that cell's Redis)."""
        member = digest.hex()
        limits = self.limits
        window = limits.window_seconds
        network = network_of(client_ip)
        # Per number and activity: posts with a victim's number on one
        # activity cannot lock the victim out of every other one.
        phone = f"{activity}:{member}"
        share = str(share_id) if share_id is not None else ""
        per_share = limits.per_share if share_id is not None else 0
        local = [
            (limit, value)
            for limit, value in zip(
                self._local_limits,
                (client_ip, network, phone, share if share_id is not None else None),
                strict=True,
            )
            if limit is not None and value is not None
        ]
        if not self._available():
            return self._limit_locally(local)
        keys = [
            rate_key("ip", client_ip),
            rate_key("net", network),
            rate_key("phone", phone),
            rate_key("share", share),
            gate.activity_key(activity),
            gate.group_key(group),
            budget_key(activity),
            accepted_key(claim_id),
            *(rate_key("phone", f"{activity}:{d.hex()}") for d in older_digests),
        ]
        args: list[str | int] = [
            member,
            limits.per_ip,
            limits.per_network,
            limits.per_phone,
            per_share,
            window,
            max(remaining, 0),
            BUDGET_SYNC_SECONDS,
            fingerprint(activity, digest),
            "",  # the grants are looked up here, unless the cell's Redis is another (_drain)
        ]
        if older_digests:
            args += [len(older_digests), *(d.hex() for d in older_digests)]
            args += [fingerprint(activity, d) for d in older_digests]
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        elsewhere = cell if cell in self.cells else None
        self._queued.append(_Check(keys, args, local, future, elsewhere))
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
                await self._look_up_grants(batch)
                verdicts = await self._check_batch([(check.keys, check.args) for check in batch])
                for check, answer in zip(batch, verdicts, strict=True):
                    verdict = self._limit_locally(check.local) if answer is Verdict.UNCHECKED else answer
                    if not check.future.done():
                        check.future.set_result(verdict)
        finally:
            self._drainer = None
            for check in self._queued:  # only left behind if this task was cancelled
                if not check.future.done():
                    check.future.set_result(self._limit_locally(check.local))
            self._queued = []

    async def _look_up_grants(self, batch: list[_Check]) -> None:
        """Fill in, for the checks whose number's cell keeps its grants in
        another Redis, what that cell's grant sets say: one pipeline per
        cell, all cells at once. A cell whose Redis fails is left to its
        workers (not received), and left alone for a second."""
        by_cell: dict[int, list[_Check]] = {}
        for check in batch:
            if check.cell is not None:
                by_cell.setdefault(check.cell, []).append(check)
        if by_cell:
            await asyncio.gather(*(self._cell_grants(cell, checks) for cell, checks in by_cell.items()))

    async def _cell_grants(self, cell: int, checks: list[_Check]) -> None:
        found: list[str] = [NOT_RECEIVED] * len(checks)
        if time.monotonic() >= self._cell_down_until[cell]:
            try:
                found = await self._grant_verdicts(self.cells[cell], checks)
            except RedisError as exc:
                self._cell_down_until[cell] = time.monotonic() + BACKOFF_SECONDS
                log.warning("grants of cell %s not looked up, its Redis is unavailable: %s", cell, exc)
        for check, verdict in zip(checks, found, strict=True):
            check.args[GRANTS_ARG] = verdict

    async def _grant_verdicts(self, client: aioredis.Redis, checks: list[_Check]) -> list[str]:
        pipe = client.pipeline(transaction=False)
        sizes = []
        for check in checks:
            digests = [str(check.args[0]), *_older_digests(check.args)]
            sizes.append(len(digests))
            for key in (check.keys[4], check.keys[5]):  # the activity's set, then the group's
                for digest in digests:
                    pipe.sismember(key, digest)
        answers = iter(await pipe.execute())
        verdicts = []
        for size in sizes:
            # Every answer is read (no short cut): the next check's follow.
            found = [any([bool(next(answers)) for _ in range(size)]) for _ in GRANT_VERDICTS]
            hits = [verdict for verdict, hit in zip(GRANT_VERDICTS, found, strict=True) if hit]
            verdicts.append(hits[0] if hits else NOT_RECEIVED)
        return verdicts

    def _limit_locally(self, checks: list[tuple[Limit, str]]) -> Verdict:
        """The rate limits without Redis: this process's token buckets."""
        over = self.local.allow(checks)
        return Verdict.UNCHECKED if over is None else LIMIT_VERDICTS[over.kind]

    async def over_limit(self, kind: str, value: str, count: int, window_seconds: int) -> bool:
        """Count one request against ``count`` per window for ``value``;
        whether it is over (in Redis, else in this process)."""
        limit = Limit(kind=kind, count=count, window_seconds=window_seconds)
        if self._available():
            try:
                async with self._slots:
                    return bool(await self._hit(keys=[rate_key(kind, value)], args=[count, window_seconds]))
            except RedisError as exc:
                self._failed(f"{kind} limit", exc)
        return self.local.allow([(limit, value)]) is not None

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
        keys = [accepted_key(claim_id) for claim_id, _, _ in claims]
        args: list[str | int] = [fingerprint(activity, digest) for _, activity, digest in claims]
        try:
            self._remember(keys=keys, args=[*args, ACCEPTED_TTL_SECONDS])
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
        for client in self.cells.values():
            await client.aclose(close_connection_pool=True)
        self.sync_client.close()


# Where the script's arguments hold the cell's grant verdict, and the older
# digests (after their count).
GRANTS_ARG = 9


def _older_digests(args: list[str | int]) -> list[str]:
    older = int(args[GRANTS_ARG + 1]) if len(args) > GRANTS_ARG + 1 else 0
    return [str(a) for a in args[GRANTS_ARG + 2 : GRANTS_ARG + 2 + older]]
