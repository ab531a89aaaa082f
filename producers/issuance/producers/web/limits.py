"""What the page counts a request against, and the in-process limiter it
falls back on when Redis is down.

Limits apply per client address, per network (/24 for IPv4, /64 for IPv6: a
script rotating addresses inside one allocation is still one client), per
(number, activity) and per share (a share link posted to a bot). Redis holds
the shared counters; when it is unreachable each page process keeps token
buckets of its own, so an outage loosens the limits by the number of page
processes instead of switching them off.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import ipaddress
import threading
import time
from collections.abc import Callable


@functools.lru_cache(maxsize=4096)
def network_of(address: str) -> str:
    """The client's network: the /24 of an IPv4 address, the /64 of an IPv6
    one (an IPv4-mapped IPv6 address counts as IPv4); an unparsable address
    (a test client, a unix socket) stands for itself. Remembered for the
    last few thousand addresses: a client's address repeats, its parse need not."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """At most ``count`` attempts per ``window_seconds`` for one key."""

    kind: str
    count: int
    window_seconds: int


class LocalLimiter:
    """Token buckets in process memory, at most ``max_keys`` of them.

    A bucket holds ``count`` tokens and refills at ``count / window`` per
    second, so it allows what the Redis window allows on average. The least
    recently used bucket is dropped when the table is full: a flood of fresh
    keys costs bounded memory, and the dropped bucket was the one least
    likely to be limiting anybody."""

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: collections.OrderedDict[tuple[str, str], tuple[float, float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, checks: list[tuple[Limit, str]]) -> Limit | None:
        """Take one token from each bucket; the first limit that has none
        left, or None. Nothing is taken when any check fails."""
        now = self._clock()
        with self._lock:
            levels = []
            for limit, value in checks:
                key = (limit.kind, value)
                tokens, at = self._buckets.get(key, (float(limit.count), now))
                tokens = min(float(limit.count), tokens + (now - at) * limit.count / limit.window_seconds)
                if tokens < 1.0:
                    return limit
                levels.append((key, tokens))
            for key, tokens in levels:
                self._buckets[key] = (tokens - 1.0, now)
                self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return None
