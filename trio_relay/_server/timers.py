"""`ConnectionTimers`: every connection's auth deadline and keepalive pings, in one task.

A sleeping task per connection and per timer would cost memory on every idle connection.
Every connection has the same ``auth_timeout``, ``ping_interval`` and ``ping_timeout``, so
each timer's schedule is a deque in the order connections arrived (appending keeps it
sorted), and one task sleeps until the earliest entry of any of them.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from typing import Protocol

import trio

from .._config import CloseCode, RelayConfig

__all__ = ["ConnectionTimers", "Timed"]


class Timed(Protocol):
    """What the timers need of a connection."""

    @property
    def authenticated(self) -> bool: ...

    @property
    def pinged_at(self) -> float | None:
        """When the ping still waiting for its pong was sent; None if none is waiting."""
        ...

    def ping(self, now: float) -> bool:
        """Send a keepalive ping (unless one is waiting); False once the connection is over."""
        ...

    def close(self, code: int, reason: str) -> None: ...


_Schedule = deque[tuple[float, "weakref.ref[Timed]"]]

_FIRST_SWEEP = 1024


class ConnectionTimers:
    """Holds each scheduled connection to its auth deadline and pings it while it lasts."""

    def __init__(self, config: RelayConfig) -> None:
        self._config = config
        self._auth: _Schedule = deque()
        self._pings: _Schedule = deque()
        self._pongs: _Schedule = deque()
        self._wait = trio.CancelScope()
        # Entries of connections that have ended stay until their time comes, which with a
        # long ping_interval is long after many connections have come and gone: past this
        # many, the schedules are swept of them (then it doubles the number still there).
        self._sweep_at = _FIRST_SWEEP

    def schedule(self, connection: Timed) -> None:
        """Start ``connection``'s auth deadline and ping cycle, from now."""
        now = trio.current_time()
        ref: weakref.ref[Timed] = weakref.ref(connection)
        self._auth.append((now + self._config.auth_timeout, ref))
        self._pings.append((now + self._config.ping_interval, ref))
        if len(self._auth) + len(self._pings) + len(self._pongs) > self._sweep_at:
            self._sweep()
        self._wait.deadline = min(self._wait.deadline, self._next())

    def _sweep(self) -> None:
        """Drop the entries of connections that are gone (in order, so still sorted)."""
        kept = 0
        for schedule in (self._auth, self._pings, self._pongs):
            alive = [entry for entry in schedule if entry[1]() is not None]
            schedule.clear()
            schedule.extend(alive)
            kept += len(alive)
        self._sweep_at = max(_FIRST_SWEEP, 2 * kept)

    def _next(self) -> float:
        return min(queue[0][0] if queue else math.inf
                   for queue in (self._auth, self._pings, self._pongs))

    async def run(self) -> None:
        """The timers' task; runs for the relay's lifetime."""
        config = self._config
        while True:
            with self._wait:
                await trio.sleep_forever()
            now = trio.current_time()
            while self._auth and self._auth[0][0] <= now:
                connection = self._auth.popleft()[1]()
                if connection is not None and not connection.authenticated:
                    connection.close(CloseCode.POLICY_VIOLATION, "authentication timed out")
            while self._pongs and self._pongs[0][0] <= now:
                due, ref = self._pongs.popleft()
                connection = ref()
                if connection is None:
                    continue
                pinged_at = connection.pinged_at
                if pinged_at is not None and pinged_at <= due - config.ping_timeout:
                    connection.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            while self._pings and self._pings[0][0] <= now:
                _, ref = self._pings.popleft()
                connection = ref()
                if connection is None:
                    continue
                waiting = connection.pinged_at is not None
                if connection.ping(now):
                    self._pings.append((now + config.ping_interval, ref))
                    if not waiting:
                        self._pongs.append((now + config.ping_timeout, ref))
            self._wait = trio.CancelScope(deadline=self._next())
