"""`WebSubscription`: a web connection's membership in one resource's broadcaster.

Not a task: an entry in the broadcaster's set and in its connection's dict, from the
``subscribed`` reply until it is left, the upstream ends or the connection does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .._config import CloseCode
from .._stream.broadcaster import Push
from .._wire.protocol import ResourceKey
from .counters import RelayCounters

__all__ = ["Subscriber", "WebSubscription"]


class Subscriber(Protocol):
    """What a subscription needs of its connection."""

    def push(self, frame: bytes) -> None: ...

    def forget(self, subscription: WebSubscription) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


def _nothing(linger: bool = False) -> None:
    pass


class WebSubscription:
    """A connection's membership in one broadcaster."""

    __slots__ = ("connection", "counters", "key", "leave")

    def __init__(self, connection: Subscriber, key: ResourceKey, counters: RelayCounters) -> None:
        self.connection = connection
        self.key = key
        self.counters = counters
        #: Leaves the broadcaster (idempotent); set once the subscription is live.
        self.leave: Callable[[bool], None] = _nothing

    def detach(self, linger: bool = False) -> None:
        """Leave the broadcaster now (idempotent); ``linger``: the connection dropped, so a
        lone subscriber's broadcaster waits for it to come back and resume."""
        leave, self.leave = self.leave, _nothing
        leave(linger)  # ``leave`` refers to this object: dropping it frees it without the GC

    def deliver(self, push: Push) -> None:
        self.counters.pushes_sent += 1
        self.connection.push(push.frame)

    def end(self, push: Push) -> None:
        self.leave = _nothing  # the broadcaster has removed it
        if push.restart:
            # Reconnecting is the client's way back: it resumes, or gets a fresh snapshot.
            self.connection.close(CloseCode.SERVICE_RESTART, push.error or "service restart")
            return
        self.connection.push(push.frame)
        self.connection.forget(self)
