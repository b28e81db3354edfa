"""`BroadcasterRegistry`: one broadcaster per watched resource, and the histories kept after.

The registry starts each resource's `Broadcaster` in the relay's nursery when its first
subscriber (a web client or an in-process listener) joins, and forgets it when its last one
leaves. A broadcaster that ends with its stream intact leaves its `StreamHistory` behind for
``resume_grace`` seconds, so that a lone subscriber who drops and comes back still resumes;
one permanent task frees each kept history when its grace period is over, by the deadline of
a cancel scope. With a bus nothing is kept here: the bus keeps each resource's history.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from .._config import RelayConfig
from .._store.backend import Backend, Feed, Snapshot
from .._wire.protocol import ErrorCode, ResourceKey
from .broadcaster import Broadcaster, StreamHistory, SubscribeFailed, Subscriber, Synced
from .bus import Bus

__all__ = ["BroadcasterRegistry"]


class BroadcasterRegistry:
    """The broadcasters of one relay, keyed by resource; their tasks run in ``nursery``."""

    def __init__(
        self, backend: Backend, config: RelayConfig, nursery: trio.Nursery, bus: Bus | None = None
    ) -> None:
        self._backend = backend
        self._bus = bus
        self._config = config
        self._nursery = nursery
        self._broadcasters: dict[ResourceKey, Broadcaster] = {}
        # Histories whose broadcaster ended, with the time they are forgotten (resume_grace).
        self._kept: dict[ResourceKey, tuple[StreamHistory, float]] = {}
        self._kept_changed = trio.Event()
        self._closing = False

    @property
    def broadcasters(self) -> int:
        return len(self._broadcasters)

    @property
    def lingering(self) -> int:
        return sum(b.lingering for b in self._broadcasters.values())

    @property
    def kept_histories(self) -> int:
        return len(self._kept)

    def get(self, key: ResourceKey) -> Broadcaster | None:
        """The resource's live broadcaster, if any (for tests and statistics)."""
        return self._broadcasters.get(key)

    def close(self) -> None:
        """No new subscriptions from now on, and nothing more is kept (the relay is closing)."""
        self._closing = True

    def join(self, key: ResourceKey, subscriber: Subscriber) -> Broadcaster:
        """Register ``subscriber`` with the resource's broadcaster, starting one if need be.

        The caller must `Broadcaster.sync` it next and `Broadcaster.remove` it when done."""
        if self._closing:
            raise SubscribeFailed(ErrorCode.BACKEND_ERROR, "the relay is closing")
        broadcaster = self._broadcasters.get(key)
        if broadcaster is None or broadcaster.done:  # (done: its linger ran out just now)
            open_feed, read_snapshot = self._upstream(key)
            kept = self._kept.pop(key, None)
            config = self._config
            broadcaster = Broadcaster(
                key,
                open_feed=open_feed,
                read_snapshot=read_snapshot,
                backend_timeout=config.backend_timeout,
                max_pending=config.max_pending_changes,
                replay_size=config.replay_buffer_size,
                replay_max_age=config.replay_max_age,
                on_done=self._done,
                continues=kept[0] if kept is not None else None,
                # On a bus, the bus's kept history is the window for resuming.
                linger=config.resume_grace if self._bus is None else 0.0,
                bus=self._bus,
            )
            if kept is not None:
                broadcaster.kept_until = kept[1]
            self._broadcasters[key] = broadcaster
            self._nursery.start_soon(broadcaster.run, name=f"broadcaster {key}")
        broadcaster.add(subscriber)
        return broadcaster

    @asynccontextmanager
    async def subscription(
        self,
        key: ResourceKey,
        subscriber: Subscriber,
        since_seq: int | None = None,
        epoch: str | None = None,
        max_replay: int | None = None,
    ) -> AsyncIterator[Synced]:
        """Join (or start) the resource's broadcaster for the duration of the block."""
        broadcaster = self.join(key, subscriber)
        try:
            yield await broadcaster.sync(subscriber, since_seq, epoch, max_replay)
        finally:
            broadcaster.remove(subscriber)

    def _done(self, broadcaster: Broadcaster) -> None:
        if self._broadcasters.get(broadcaster.key) is broadcaster:
            del self._broadcasters[broadcaster.key]
        if self._closing or self._bus is not None or broadcaster.key in self._broadcasters:
            return  # closing, on a bus, or a newer broadcaster has the resource already
        if broadcaster.resumable:
            # Its last subscriber left: keep its history a while for clients that come back.
            expiry = trio.current_time() + self._config.resume_grace
            self._kept[broadcaster.key] = (broadcaster.history, expiry)
            self._kept_changed.set()
        elif broadcaster.unstarted_history is not None and broadcaster.key not in self._kept:
            # It failed (or was cancelled) before continuing a kept history: keep that
            # history again, until the end of its original grace period.
            self._kept[broadcaster.key] = (broadcaster.unstarted_history, broadcaster.kept_until)
            self._kept_changed.set()

    async def forget_kept_histories(self) -> None:
        """Free each kept history (its replay buffer) once its grace period is over; runs
        for the relay's lifetime."""
        while True:
            self._kept_changed = trio.Event()
            next_expiry = min((expiry for _, expiry in self._kept.values()), default=math.inf)
            with trio.move_on_at(next_expiry):
                await self._kept_changed.wait()
            now = trio.current_time()
            for key in [k for k, (_, expiry) in self._kept.items() if expiry <= now]:
                del self._kept[key]

    def _upstream(
        self, key: ResourceKey
    ) -> tuple[Callable[[], Feed], Callable[[], Awaitable[Snapshot]]]:
        """The seam where a broadcaster meets its source (a backend today, a bus tomorrow)."""
        backend, rid = self._backend, key.resource_id
        if key.resource == "project":
            return (lambda: backend.watch_project(rid)), (lambda: backend.list_chats(rid))
        if key.resource == "chat":
            return (lambda: backend.watch_chat(rid)), (lambda: backend.get_history(rid))
        return backend.watch_model_profiles, backend.get_model_profiles
