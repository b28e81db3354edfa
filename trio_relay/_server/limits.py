"""Rate limits and PIN brute-force protection, as plain state machines with the clock passed in.

Nothing here sleeps or reads a clock: callers pass ``now`` (``trio.current_time()``), so the
rules are tested synchronously and, inside the relay, follow trio's mock clock in tests.
"""

from __future__ import annotations

import hmac
import math
from collections import deque

import attrs

from .._config import RelayConfig

__all__ = ["PinCheck", "PinGuard", "TokenBucket", "locked_out_text", "pin_matches"]


def pin_matches(candidate: str, pin: str) -> bool:
    """Compare in constant time, so response timing tells nothing about the PIN."""
    return hmac.compare_digest(candidate.encode("utf-8"), pin.encode("utf-8"))


@attrs.define
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; each request takes one."""

    rate: float
    burst: float
    #: Starts full.
    tokens: float = attrs.field(
        default=attrs.Factory(lambda self: float(self.burst), takes_self=True)
    )
    updated: float = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@attrs.frozen
class PinCheck:
    """What to do with one auth attempt: wait ``delay`` seconds before answering; if
    ``locked``, refuse without comparing and close the connection: the lockout ends
    ``retry_after`` seconds from now."""

    delay: float
    locked: bool
    retry_after: float = 0.0


@attrs.define
class _Failures:
    times: deque[float] = attrs.Factory(deque)


class PinGuard:
    """Failed PINs back off exponentially per client address and are capped globally.

    - Each failure from an address doubles the delay before its next failure is answered,
      from ``pin_backoff_initial`` up to ``pin_backoff_max``.
    - ``pin_lockout_failures`` failures from an address within ``pin_failure_window`` lock
      it out until the oldest of them leaves the window.
    - ``pin_global_failures`` failures from all addresses within the window lock everyone
      out the same way, so that many addresses cannot share the guessing.
    A success clears the address's failures.
    """

    def __init__(self, config: RelayConfig) -> None:
        self._config = config
        self._by_address: dict[str, _Failures] = {}
        self._all: deque[float] = deque()

    def _expire(self, now: float) -> None:
        horizon = now - self._config.pin_failure_window
        while self._all and self._all[0] <= horizon:
            self._all.popleft()
        for address in [a for a, f in self._by_address.items() if f.times[-1] <= horizon]:
            del self._by_address[address]
        for failures in self._by_address.values():
            while failures.times and failures.times[0] <= horizon:
                failures.times.popleft()

    def check(self, address: str, now: float) -> PinCheck:
        """Before comparing: is this address (or everyone) locked out?"""
        self._expire(now)
        failures = self._by_address.get(address)
        count = len(failures.times) if failures else 0
        locked = (
            count >= self._config.pin_lockout_failures
            or len(self._all) >= self._config.pin_global_failures
        )
        return PinCheck(delay=self._delay(count) if locked else 0.0, locked=locked,
                        retry_after=self._retry_after(failures, now) if locked else 0.0)

    def failed(self, address: str, now: float) -> PinCheck:
        """After a wrong PIN: how long to wait before answering, and whether to lock out."""
        self._expire(now)
        failures = self._by_address.setdefault(address, _Failures())
        failures.times.append(now)
        self._all.append(now)
        count = len(failures.times)
        locked = (
            count >= self._config.pin_lockout_failures
            or len(self._all) >= self._config.pin_global_failures
        )
        return PinCheck(delay=self._delay(count), locked=locked,
                        retry_after=self._retry_after(failures, now) if locked else 0.0)

    def _retry_after(self, failures: _Failures | None, now: float) -> float:
        """Seconds until an attempt from this address is compared again: until enough of
        the failures that lock it (its own, or everyone's) have left the window."""
        window = self._config.pin_failure_window
        ends = now
        times = failures.times if failures is not None else deque()
        over = len(times) - self._config.pin_lockout_failures
        if over >= 0:
            ends = max(ends, times[over] + window)
        over = len(self._all) - self._config.pin_global_failures
        if over >= 0:
            ends = max(ends, self._all[over] + window)
        return ends - now

    def succeeded(self, address: str) -> None:
        self._by_address.pop(address, None)

    def _delay(self, count: int) -> float:
        if count <= 0:
            return 0.0
        initial = self._config.pin_backoff_initial
        return float(min(self._config.pin_backoff_max, initial * 2 ** min(count - 1, 32)))

    def tracked_addresses(self) -> int:
        return len(self._by_address)


def locked_out_text(seconds: int) -> str:
    """The ``locked_out`` error text: how long to wait, in minutes from two minutes up."""
    if seconds >= 120:
        wait = f"{math.ceil(seconds / 60)} minutes"
    else:
        wait = f"{seconds} second{'s' * (seconds != 1)}"
    return f"Too many failed attempts; try again in {wait}"
