"""The client's connection state for UIs, its reconnect policy, and its statistics."""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Callable

import attrs
import trio

from .._errors import positive

__all__ = ["Backoff", "ClientStatistics", "ConnectionState", "StateWatcher"]


@attrs.frozen
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` (from 0) waits a uniformly random
    time in ``[0, min(maximum, initial * multiplier ** n))``.

    ``random`` returns a float in ``[0, 1)``; pass your own for reproducible schedules (a
    function returning 1.0 gives the caps themselves).
    """

    initial: float = attrs.field(default=0.5, validator=positive)
    maximum: float = attrs.field(default=30.0, validator=positive)
    multiplier: float = attrs.field(default=2.0, validator=positive)
    random: Callable[[], float] = attrs.field(default=random.random, eq=False, repr=False)

    def cap(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt``."""
        try:
            grown = self.initial * self.multiplier**attempt
        except OverflowError:
            grown = math.inf
        return min(self.maximum, grown)

    def delay(self, attempt: int) -> float:
        return self.random() * self.cap(attempt)


class ConnectionState(enum.Enum):
    """Where the client is, for UIs: watch it with `RelayClient.state_changes`."""

    #: Opening the first connection.
    CONNECTING = "connecting"
    #: Authenticated, every subscription live.
    CONNECTED = "connected"
    #: The connection was lost; retrying with backoff. Subscriptions wait, losing nothing.
    RECONNECTING = "reconnecting"
    #: For good: closed by you, or terminally by the relay (see `RelayClient.error`).
    CLOSED = "closed"


@attrs.frozen(kw_only=True)
class ClientStatistics:
    """What the client holds right now (`RelayClient.statistics`)."""

    state: ConnectionState
    #: Connections tried, and how many of them got as far as authenticating.
    connection_attempts: int
    connections: int
    #: Live `Subscription` objects, and the relay resources they watch.
    subscriptions: int
    resources: int
    #: Requests on the current connection still waiting for their reply.
    pending_requests: int
    #: Events received but not yet read, over all subscriptions.
    buffered_events: int


class StateWatcher:
    """One `RelayClient.state_changes` iterator: the state it started in, then each change."""

    def __init__(self, state: ConnectionState) -> None:
        self._states: deque[ConnectionState] = deque([state], maxlen=64)
        self._lot = trio.lowlevel.ParkingLot()
        self._done = False

    def _push(self, state: ConnectionState) -> None:
        self._states.append(state)
        self._lot.unpark_all()

    def __aiter__(self) -> StateWatcher:
        return self

    async def __anext__(self) -> ConnectionState:
        while not self._states:
            if self._done:
                raise StopAsyncIteration
            await self._lot.park()
        state = self._states.popleft()
        if state is ConnectionState.CLOSED:
            self._done = True
        await trio.lowlevel.checkpoint()
        return state
