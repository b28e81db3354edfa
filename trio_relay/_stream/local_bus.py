"""`LocalBus`: a `Bus` in this process's memory.

It lets several relays in one Trio program share one numbering per resource, as relays in
several processes share Redis, and it is the bus of the seam's tests under the autojump clock:
`LocalBus.fail` and `LocalBus.lose` play a broker that is unreachable or restarted empty.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from .._wire.protocol import JSON, ResourceKey
from .bus import BusError, BusEvent, EpochChanged, Position

__all__ = ["LocalBus"]


@attrs.define(eq=False)
class _Topic:
    epoch: str = attrs.Factory(lambda: secrets.token_urlsafe(9))
    seq: int = 0
    #: (time, event) of the recent events, oldest first.
    recent: deque[tuple[float, BusEvent]] = attrs.Factory(deque)
    followers: set[_Follower] = attrs.Factory(set)


@attrs.define(eq=False)
class _Follower:
    send: trio.MemorySendChannel[BusEvent]
    error: BusError | None = None


class LocalBus:
    """Numbers, keeps and fans out each resource's events in memory."""

    def __init__(
        self, *, replay_size: int = 1024, replay_max_age: float = 120.0, buffer: int = 4096
    ) -> None:
        self._replay_size = replay_size
        self._replay_max_age = replay_max_age
        self._buffer = buffer
        self._topics: dict[ResourceKey, _Topic] = {}
        self._failed = False

    # --- faults, for tests ------------------------------------------------------------------

    def fail(self) -> None:
        """Play an unreachable broker: every call raises `BusError` until `recover`."""
        self._failed = True

    def recover(self) -> None:
        self._failed = False

    def lose(self) -> None:
        """Play a broker restarted empty: every history is gone; followers get EpochChanged."""
        topics, self._topics = self._topics, {}
        for topic in topics.values():
            for follower in topic.followers:
                follower.error = EpochChanged("the broker lost this resource's history")
                follower.send.close()

    # --- Bus --------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self._failed

    def forward(self, key: ResourceKey, data: JSON) -> None:
        self._append(key, data)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check()  # forwarded changes are published at once; a failed bus has none

    async def publish(self, key: ResourceKey, data: JSON) -> Position:
        await trio.lowlevel.checkpoint()
        self._check()
        return self._append(key, data)

    async def head(self, key: ResourceKey) -> Position:
        await trio.lowlevel.checkpoint()
        self._check()
        topic = self._topic(key)
        return Position(topic.epoch, topic.seq)

    async def read(
        self, key: ResourceKey, epoch: str, after: int, until: int
    ) -> list[BusEvent] | None:
        await trio.lowlevel.checkpoint()
        return self._read(key, epoch, after, until)

    def _read(self, key: ResourceKey, epoch: str, after: int, until: int) -> list[BusEvent] | None:
        self._check()
        topic = self._topics.get(key)
        if topic is None or topic.epoch != epoch or not 0 <= after <= until <= topic.seq:
            return None
        self._expire(topic)
        if after == until:
            return []
        if not topic.recent or topic.recent[0][1].seq > after + 1:
            return None
        return [event for _, event in topic.recent if after < event.seq <= until]

    @asynccontextmanager
    async def follow(
        self, key: ResourceKey, start: Position
    ) -> AsyncIterator[AsyncIterator[BusEvent]]:
        await trio.lowlevel.checkpoint()
        self._check()
        topic = self._topic(key)
        if topic.epoch != start.epoch:
            raise EpochChanged("the broker lost this resource's history")
        # No await from reading what was missed to registering: nothing slips in between.
        missed = self._read(key, start.epoch, start.seq, topic.seq)
        if missed is None:
            raise BusError("the events since the start are no longer kept")
        send, receive = trio.open_memory_channel[BusEvent](self._buffer + len(missed))
        for event in missed:
            send.send_nowait(event)
        follower = _Follower(send)
        topic.followers.add(follower)
        try:
            yield _Events(receive, follower)
        finally:
            topic.followers.discard(follower)
            send.close()
            receive.close()

    # --- inside -----------------------------------------------------------------------------

    def _check(self) -> None:
        if self._failed:
            raise BusError("the broker is unreachable")

    def _topic(self, key: ResourceKey) -> _Topic:
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = _Topic(recent=deque(maxlen=self._replay_size))
        return topic

    def _expire(self, topic: _Topic) -> None:
        horizon = trio.current_time() - self._replay_max_age
        while topic.recent and topic.recent[0][0] < horizon:
            topic.recent.popleft()

    def _append(self, key: ResourceKey, data: JSON) -> Position:
        self._check()
        topic = self._topic(key)
        topic.seq += 1
        event = BusEvent(topic.seq, data)
        topic.recent.append((trio.current_time(), event))
        for follower in list(topic.followers):
            try:
                follower.send.send_nowait(event)
            except trio.WouldBlock:
                follower.error = BusError("a follower fell too far behind")
                follower.send.close()
            except trio.ClosedResourceError:
                pass
        return Position(topic.epoch, topic.seq)


class _Events:
    def __init__(self, receive: trio.MemoryReceiveChannel[BusEvent], follower: _Follower) -> None:
        self._receive = receive
        self._follower = follower

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> BusEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._follower.error is not None:
                raise self._follower.error from None
            raise StopAsyncIteration from None
