"""`ChangeHub`: versioned in-process change feeds, so a backend gets exact subscriptions for free.

A backend changes its state and then, with no ``await`` in between, calls `ChangeHub.publish`.
Its snapshot methods read their state and `ChangeHub.version` with no ``await`` in between (or
under the same lock as the writes). That is all the relay needs to hand out snapshots and
pushes that neither overlap nor leave a gap.

`publish` never blocks a backend: each open feed has a bounded buffer, and a feed whose reader
falls that far behind fails with `FeedOverflow` instead of holding the publisher up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from .._wire.protocol import JSON
from .backend import MODEL_PROFILES_KEY, Change, Feed, chat_key, project_key

__all__ = ["ChangeHub", "FeedOverflow", "HubFeeds"]

DEFAULT_FEED_BUFFER: Final = 4096


class FeedOverflow(Exception):
    """A feed's reader fell more than its buffer behind, so changes would have been lost."""


@attrs.define(eq=False)
class _Watcher:
    send: trio.MemorySendChannel[Change]
    overflowed: bool = False
    ended: bool = False
    error: BaseException | None = None


@attrs.define(eq=False)
class _Topic:
    version: int = 0
    watchers: set[_Watcher] = attrs.Factory(set)


class ChangeHub:
    """Publish changes by key; each key's versions count up by one per change, from 0.

    Versions keep counting while nobody watches, so that a relay can tell, when a resource
    is watched again, whether anything happened in between (and resume clients if not).
    That costs one integer per key ever published or watched.
    """

    def __init__(self, *, feed_buffer: int = DEFAULT_FEED_BUFFER) -> None:
        self._feed_buffer = feed_buffer
        self._topics: dict[Hashable, _Topic] = {}
        #: Also hands every change to this (a relay on a bus forwards them to the bus). An
        #: ``end`` is handed on as ``{"completed": True}``.
        self.outlet: Callable[[Hashable, JSON], None] | None = None
        #: Waits until what went to the outlet is delivered beyond this process (the bus's
        #: `flush`); None: nothing to wait for.
        self.flusher: Callable[[], Awaitable[None]] | None = None

    async def flush(self) -> None:
        """Return once every change published so far has left through the outlet (at once
        without one): a store with an outbox deletes its rows after this."""
        if self.flusher is None:
            await trio.lowlevel.checkpoint()
        else:
            await self.flusher()

    def version(self, key: Hashable) -> int:
        """The version of the last change published for ``key`` (0 if none)."""
        topic = self._topics.get(key)
        return topic.version if topic is not None else 0

    def publish(self, key: Hashable, data: JSON) -> Change:
        """Deliver ``data`` to every open feed of ``key``, at once and without blocking."""
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = _Topic()
        topic.version += 1
        change = Change(data, topic.version)
        if self.outlet is not None:
            self.outlet(key, data)
        for watcher in topic.watchers:
            if watcher.overflowed or watcher.ended:
                continue
            try:
                watcher.send.send_nowait(change)
            except trio.WouldBlock:
                watcher.overflowed = True
                watcher.send.close()
            except trio.BrokenResourceError:  # the reader left; its feed is closing
                pass
        return change

    def end(self, key: Hashable, error: BaseException | None = None) -> None:
        """End every open feed of ``key``: they finish after what they hold, or raise
        ``error`` (the upstream completed, or it failed)."""
        if self.outlet is not None:
            self.outlet(key, {"completed": True})
        topic = self._topics.get(key)
        for watcher in topic.watchers if topic is not None else ():
            watcher.ended = True
            watcher.error = error
            watcher.send.close()

    def watching(self, key: Hashable) -> int:
        """How many feeds of ``key`` are open (for tests and statistics)."""
        topic = self._topics.get(key)
        return len(topic.watchers) if topic is not None else 0

    @asynccontextmanager
    async def open_feed(self, key: Hashable) -> AsyncIterator[AsyncIterator[Change]]:
        """A change feed for ``key``, as `Backend.watch_chat` and friends return."""
        send, receive = trio.open_memory_channel[Change](self._feed_buffer)
        watcher = _Watcher(send)
        topic = self._topics.setdefault(key, _Topic())
        topic.watchers.add(watcher)
        try:
            yield _FeedIterator(receive, watcher)
        finally:
            topic.watchers.discard(watcher)
            send.close()
            receive.close()


class HubFeeds:
    """The three feeds of the `Backend` protocol, for a store that publishes each change
    through its ``hub`` under the keys of `chat_key`, `project_key` and `MODEL_PROFILES_KEY`."""

    hub: ChangeHub

    def watch_project(self, project_id: str) -> Feed:
        return self.hub.open_feed(project_key(project_id))

    def watch_chat(self, chat_id: str) -> Feed:
        return self.hub.open_feed(chat_key(chat_id))

    def watch_model_profiles(self) -> Feed:
        return self.hub.open_feed(MODEL_PROFILES_KEY)


class _FeedIterator:
    """Iterates one feed; a plain class, not an async generator, so nothing needs finalizing."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Change], watcher: _Watcher) -> None:
        self._receive = receive
        self._watcher = watcher

    def __aiter__(self) -> _FeedIterator:
        return self

    async def __anext__(self) -> Change:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._watcher.overflowed:
                size = self._receive.statistics().max_buffer_size
                raise FeedOverflow(f"change feed fell more than {size} changes behind") from None
            if self._watcher.error is not None:
                raise self._watcher.error from None
            raise StopAsyncIteration from None
