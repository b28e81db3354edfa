"""A consumer's queue of events: the sans-IO half of a `Subscription`.

Bounded: a consumer that falls more than its buffer behind stops getting events and is given
a fresh snapshot (a `Reset`) once it has read what it holds, so it costs bounded memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from .errors import SubscriptionFailed
from .events import JSON, Event, Key, Reset

__all__ = ["END", "End", "Inbox"]


def _nothing() -> None:
    pass


class End:
    """The marker for a subscription that ended normally (after `Completed`)."""


END: Final = End()


class Inbox:
    """One consumer's events, in order, at most ``buffer`` of them unread.

    ``wake`` is called whenever there is something new to look at (an event, the end, an
    overflow); the Trio `Subscription` wakes its reader with it.
    """

    def __init__(self, key: Key, buffer: int, wake: Callable[[], object] = _nothing) -> None:
        self.key = key
        self.wake = wake
        #: The items of the last snapshot handed out, and the ``seq`` of the last event.
        self.snapshot: list[JSON] = []
        self.seq: int | None = None
        self.queue: deque[Event] = deque()
        #: How the stream ended: `END`, or the error to raise once the queue is read.
        self.final: BaseException | End | None = None
        #: Fell more than ``buffer`` behind: events are dropped until a fresh snapshot.
        self.overflowed = False
        self.closed = False
        self._buffer = buffer

    def pop(self) -> Event | None:
        """The next event (and note its seq, or its snapshot), or None."""
        if not self.queue or self.closed:
            return None
        event = self.queue.popleft()
        if event.seq is not None:
            self.seq = event.seq
        if isinstance(event, Reset):
            self.snapshot = event.snapshot
        return event

    def start(self, items: list[JSON], seq: int | None) -> None:
        self.snapshot = items
        self.seq = seq

    def put(self, event: Event) -> None:
        if self.closed or self.final is not None:
            return
        if self.overflowed:
            if isinstance(event, Reset):  # a fresh snapshot is exactly what it was waiting for
                self.overflowed = False
                self.queue.append(event)
                self.wake()
            return
        if len(self.queue) >= self._buffer:
            self.overflowed = True
        else:
            self.queue.append(event)
        self.wake()

    def reset(self, items: list[JSON], seq: int | None) -> None:
        self.overflowed = False
        self.queue.append(Reset(items, seq=seq))
        self.wake()

    def finish(self, final: BaseException | End) -> None:
        if self.final is not None:
            return
        if self.overflowed and isinstance(final, End):
            final = SubscriptionFailed(
                "client_overflow",
                "the consumer fell more than its buffer behind and the stream ended before"
                " it could catch up",
            )
        self.final = final
        self.wake()

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        self.wake()
