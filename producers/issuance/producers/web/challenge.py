"""The challenge an operator can put in front of claims: an SMS code or a
CAPTCHA, checked by a pluggable verifier before a claim counts.

``ISSUANCE_WEB_CHALLENGE`` chooses when: ``off`` (the default), ``always``,
or ``above:N`` (when this page process has taken more than N claims in the
last minute: a flood). The client sends its answer in the claim's
``challenge`` field. The project ships no provider: :class:`NotConfigured`
refuses every claim with a message saying so, so turning the challenge on
without a provider is visible at once instead of silently letting claims
through. deploy/SECURITY.md shows how to plug a provider in.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Protocol

WINDOW_SECONDS = 60.0


class ChallengeSettingError(ValueError):
    """``ISSUANCE_WEB_CHALLENGE`` is not off, always or above:N."""


class Verifier(Protocol):
    """Checks a client's answer to the challenge. An SMS provider checks
    the code sent to the number; a CAPTCHA provider checks the token its
    widget gave the browser. Raise :class:`VerifierUnavailable` when the
    provider cannot be asked: the claim is answered "busy", not refused."""

    def verify(self, *, answer: str, phone: str, client_ip: str) -> bool: ...


class VerifierUnavailable(RuntimeError):
    """The challenge provider cannot be reached or is not configured."""


class NotConfigured:
    """The verifier when none is plugged in: honest about it."""

    message = "the challenge is turned on but no challenge provider is configured on this server"

    def verify(self, *, answer: str, phone: str, client_ip: str) -> bool:
        raise VerifierUnavailable(self.message)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChallengePolicy:
    """When a claim must pass the challenge: never (``above`` None and not
    ``always``), always, or above ``above`` claims a minute."""

    always: bool = False
    above: int | None = None

    @classmethod
    def parse(cls, raw: str) -> ChallengePolicy:
        value = raw.strip().lower()
        if value in ("", "off"):
            return cls()
        if value == "always":
            return cls(always=True)
        kind, _, count = value.partition(":")
        if kind == "above" and count.isdigit():
            return cls(above=int(count))
        raise ChallengeSettingError(f"ISSUANCE_WEB_CHALLENGE must be off, always or above:N, got {raw!r}")

    @property
    def enabled(self) -> bool:
        return self.always or self.above is not None


class ClaimRate:
    """Claims this process took in the last minute (a sliding window of
    timestamps, bounded by the threshold it is compared with)."""

    def __init__(self, keep: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=max(keep, 1) + 1)
        self._clock = clock
        self._lock = threading.Lock()

    def record(self) -> int:
        """Count one claim; how many this window holds now."""
        now = self._clock()
        with self._lock:
            self._times.append(now)
            while self._times and self._times[0] <= now - WINDOW_SECONDS:
                self._times.popleft()
            return len(self._times)


class Challenge:
    """The policy, the verifier and the rate it watches, as the page uses them."""

    def __init__(self, policy: ChallengePolicy, verifier: Verifier | None = None) -> None:
        self.policy = policy
        self.verifier: Verifier = verifier or NotConfigured()
        self.rate = ClaimRate(policy.above or 0)

    def required(self) -> bool:
        """Count this claim; whether it must pass the challenge."""
        if self.policy.always:
            return True
        if self.policy.above is None:
            return False
        return self.rate.record() > self.policy.above
