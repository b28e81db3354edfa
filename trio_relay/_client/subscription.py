"""A `Subscription`: one ``client.subscribe`` block's events, read with ``async for``."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable

import trio

from .events import JSON, Event, Key
from .inbox import End, Inbox

__all__ = ["Subscription"]


class Subscription:
    """One ``client.subscribe`` block: the snapshot, then every event, in order, once.

    ``async for event in sub`` waits through reconnects; it ends after `Completed`, and raises
    `SubscriptionFailed` when the relay ends the subscription with an error, or the client's
    terminal error (`ConnectionLost` with close code 1008, `AuthFailed`). Events received
    before any of these are always yielded first.
    """

    def __init__(
        self, refill: Callable[[Subscription], Awaitable[None]], key: Key, buffer: int
    ) -> None:
        # Fetches a fresh snapshot once the consumer, fallen behind, has read its buffer.
        self._refill = refill
        self.resource, self.resource_id = key
        self._lot = trio.lowlevel.ParkingLot()
        self._inbox = Inbox(key, buffer, self._lot.unpark_all)

    @property
    def key(self) -> Key:
        return (self.resource, self.resource_id)

    @property
    def snapshot(self) -> list[JSON]:
        """The items of the last snapshot handed out: the one `subscribe` returned with, or
        the latest `Reset`'s once it has been yielded."""
        return self._inbox.snapshot

    @property
    def seq(self) -> int | None:
        """The ``seq`` of the last event yielded (or of the snapshot)."""
        return self._inbox.seq

    def __repr__(self) -> str:
        name = f"{self.resource}:{self.resource_id}" if self.resource_id else self.resource
        return f"<Subscription {name} seq={self.seq}>"

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        inbox = self._inbox
        while True:
            if inbox.closed:
                raise trio.ClosedResourceError("the subscription is closed")
            event = inbox.pop()
            if event is not None:
                await trio.lowlevel.checkpoint()
                return event
            if isinstance(inbox.final, End):
                raise StopAsyncIteration
            if inbox.final is not None:
                raise copy.copy(inbox.final)
            if inbox.overflowed:
                # Everything buffered has been read: now fetch the state we could not follow.
                await self._refill(self)
                continue
            await self._lot.park()

    def receive_nowait(self) -> Event:
        """The next buffered event, or `trio.WouldBlock`."""
        event = self._inbox.pop()
        if event is None:
            raise trio.WouldBlock
        return event
