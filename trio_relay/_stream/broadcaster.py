"""One broadcaster per watched resource: one upstream feed, fanned out to every subscriber.

A `Broadcaster` runs as one task in the relay's nursery, inside its own cancel scope. It opens
the backend's feed, reads the first snapshot, then numbers each change (``seq``), encodes it to
text once, and hands it to every subscriber with a call that never blocks: a web connection
puts the text into its bounded outbound queue, an in-process listener into its own bounded
channel, and either closes itself when full. So a slow subscriber can never hold up the others.

When the last subscriber leaves, the scope is cancelled: leaving the feed's ``async with``
closes the upstream, and nothing else holds the broadcaster, so its buffers go with it. When
the last one leaves by dropping (its connection ended, it did not unsubscribe) the broadcaster
lingers instead: its scope gets a deadline ``linger`` seconds away, and it goes on numbering
and recording changes, so a client that comes back within that time resumes with exactly what
it missed. A new subscriber lifts the deadline.

Joining a live broadcaster is exact thanks to versions (`_store.backend`). A joiner is
registered first, so it sees every change from then on in a pending list; then it reads a
snapshot; once the feed has caught up with the snapshot's version, the pending changes the
snapshot already holds are dropped and the reply carries the ``seq`` the snapshot is current to.

Resuming rests on a `StreamHistory`: a resource's ``epoch``, its numbering and a bounded buffer
of its recent pushes. A client that comes back with ``sinceSeq`` and the same epoch gets exactly
the pushes it missed from that buffer. The history outlives its broadcaster for a grace
period (the relay keeps it), and a new broadcaster continues it only if the backend's version
shows that nothing changed while nobody watched; otherwise it starts a new epoch, and
resuming clients get a fresh snapshot marked ``reset``.

With a `Bus` (``bus``) the broadcaster numbers nothing itself: it reads the bus's position of
its resource before each snapshot (the snapshot holds every event up to it, as the backend
writes before it publishes), follows the resource on the bus from there, and takes each
event's ``seq`` and the bus's epoch as its own, so every relay process delivers the same
numbering. A client resuming with pushes this broadcaster never saw (it reconnected to
another process, or after a restart) gets them from the bus's kept history. If the bus lost
that history or stayed unreachable, the broadcaster ends with a final push marked
``restart``: its web clients are closed with 1012 and come back to a fresh snapshot.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Protocol

import attrs
import trio
from loguru import logger

from .._errors import CodedError
from .._store.backend import BackendError, Change, Feed, NotFound, Snapshot
from .._wire.framing import frame_text
from .._wire.protocol import JSON, DataReply, ErrorCode, ErrorReply, ResourceKey, encode
from .bus import Bus, BusError, Position

__all__ = ["Broadcaster", "Push", "StreamHistory", "Subscriber", "SubscribeFailed", "Synced"]


@attrs.frozen(slots=True)
class Push:
    """One change as every subscriber receives it: numbered, and encoded once for the wire."""

    key: ResourceKey
    seq: int
    data: JSON
    text: str
    version: int | None = None
    #: True for the last push of a broadcaster: the upstream completed or failed.
    final: bool = False
    #: For a final push after a failure: why the upstream ended.
    error: str | None = None
    #: For a final push: the bus lost this resource's history or stayed unreachable, so its
    #: subscribers should reconnect and start again (web clients are closed with 1012).
    restart: bool = False
    #: ``text`` as one WebSocket frame, the same bytes for every web client (`_framing`).
    frame: bytes = attrs.field(init=False, eq=False, repr=False)

    @frame.default
    def _frame(self) -> bytes:
        return frame_text(self.text.encode())


class Subscriber(Protocol):
    """What a broadcaster delivers to. Neither method may block or raise."""

    def deliver(self, push: Push) -> None: ...

    def end(self, push: Push) -> None:
        """The upstream is over; ``push`` is its final push. The subscriber is already removed."""
        ...


class SubscribeFailed(CodedError):
    """A subscription could not be set up; ``code`` and ``str(self)`` go into the error reply."""


@attrs.define(eq=False)
class StreamHistory:
    """A resource's numbering, and its recent pushes for clients that resume."""

    max_size: int
    max_age: float
    #: Changes whenever continuity cannot be vouched for: a client never mistakes a new
    #: numbering for the old one.
    epoch: str = attrs.Factory(lambda: secrets.token_urlsafe(9))
    #: seq of the last push; 0 before the first.
    seq: int = 0
    #: Backend version of the last change seen (or of the first snapshot); None: unversioned.
    version: int | None = None
    _recent: deque[tuple[float, Push]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._recent = deque(maxlen=self.max_size)

    def record(self, push: Push, now: float) -> None:
        self._recent.append((now, push))
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = now - self.max_age
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()

    def between(self, after: int, until: int, now: float) -> list[Push] | None:
        """Every push with ``after < seq <= until``, or None if any of them is gone."""
        self._expire(now)
        if not 0 <= after <= until <= self.seq:
            return None
        if after == until:
            return []
        if not self._recent or self._recent[0][1].seq > after + 1:
            return None
        return [push for _, push in self._recent if after < push.seq <= until]

    @property
    def buffered(self) -> int:
        return len(self._recent)


@attrs.frozen
class Synced:
    """A subscription's starting point: a snapshot (or a resume) and the ``seq`` it is at."""

    #: The snapshot, or None when the subscription resumed (no snapshot is needed).
    snapshot: Snapshot | None
    seq: int
    epoch: str
    #: The client asked to resume but the relay could not vouch for the gap.
    reset: bool
    #: Deliver from here on (the missed or pending changes after ``seq`` first). Call it
    #: right after queuing the reply, with no ``await`` in between.
    go_live: Callable[[], None]
    #: Leave the broadcaster (idempotent); ``leave(True)``: by dropping, so that a lone
    #: subscriber's broadcaster lingers for its return.
    leave: Callable[[bool], None]


@attrs.define(eq=False)
class _Pending:
    registered_at_seq: int
    pushes: list[Push] = attrs.Factory(list)
    overflowed: bool = False


class Broadcaster:
    """Shares one upstream feed of one resource among all its subscribers."""

    def __init__(
        self,
        key: ResourceKey,
        *,
        open_feed: Callable[[], Feed],
        read_snapshot: Callable[[], Awaitable[Snapshot]],
        backend_timeout: float,
        max_pending: int,
        replay_size: int,
        replay_max_age: float,
        on_done: Callable[[Broadcaster], None],
        continues: StreamHistory | None = None,
        linger: float = 0.0,
        bus: Bus | None = None,
    ) -> None:
        self.key = key
        self._open_feed = open_feed
        self._read_snapshot = read_snapshot
        self._timeout = backend_timeout
        self._max_pending = max_pending
        self._on_done = on_done
        self._cancel_scope = trio.CancelScope()
        self._live: set[Subscriber] = set()
        self._pending: dict[Subscriber, _Pending] = {}
        self._started = trio.Event()
        self._start_error: SubscribeFailed | None = None
        self._final: Push | None = None
        self._advanced = trio.Event()
        self._continues = continues
        self._linger = linger
        self._bus = bus
        #: Its last subscriber dropped: it runs until its scope's deadline, unless one joins.
        self.lingering = False
        self._lingered_out = False
        self._ended = False  # its task is over, whichever way
        #: When the history it continues would have been forgotten (set by the relay).
        self.kept_until = math.inf
        #: This resource's numbering (replaced once started, unless it continues a kept one).
        self.history = StreamHistory(replay_size, replay_max_age)
        # The newest snapshot and the seq it is current to, reused while no change happens so
        # that a crowd joining at once costs one backend read, not one each.
        self._cached: tuple[Snapshot, int] | None = None

    @property
    def seq(self) -> int:
        """seq of the last push; 0 until the first change."""
        return self.history.seq

    @property
    def version(self) -> int | None:
        """Version of the last change seen (or of the first snapshot); None if unversioned."""
        return self.history.version

    @property
    def unstarted_history(self) -> StreamHistory | None:
        """The kept history it was to continue, if it never got to (its start failed or was
        cancelled): the relay keeps it again rather than lose resumability."""
        return self._continues

    @property
    def resumable(self) -> bool:
        """Started and not ended: its history may be continued by the next broadcaster."""
        return (
            self._started.is_set() and self._start_error is None and self._final is None
            and not self._lingered_out
        )

    @property
    def done(self) -> bool:
        """Ended or cancelled: new subscribers must start a fresh broadcaster."""
        return self._final is not None or self._start_error is not None or (
            self._cancel_scope.cancel_called
        )

    # --- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The broadcaster's task; it never raises but for cancellation."""
        try:
            with self._cancel_scope:
                try:
                    final = await self._pump()
                except BusError as exc:
                    if not self._started.is_set():
                        self._fail_start(exc)
                        return
                    logger.bind(resource=str(self.key)).warning(
                        "bus feed of {resource} ended: {error}", resource=str(self.key),
                        error=exc,
                    )
                    final = self._final_push(error=f"{exc}; reconnect to resume", restart=True)
                except Exception as exc:
                    if not self._started.is_set():
                        self._fail_start(exc)
                        return
                    logger.opt(exception=exc).bind(resource=str(self.key)).error(
                        "upstream of {resource} failed", resource=str(self.key)
                    )
                    final = self._final_push(error="upstream failed")
                self._finish(final)
        finally:
            # Also when the relay's nursery is cancelled (shutdown): no subscriber is left to
            # remove a lingering broadcaster from the registry, and none may start lingering.
            self._ended = True
            if self.lingering:
                # Nobody came back in time: its history has had its grace, so it is not kept.
                self.lingering = False
                self._lingered_out = True
                self._on_done(self)

    async def _pump(self) -> Push:
        if self._bus is not None:
            return await self._pump_bus(self._bus)
        async with AsyncExitStack() as stack:
            with trio.fail_after(self._timeout):
                feed = await stack.enter_async_context(self._open_feed())
                snapshot = await self._read_snapshot()
            self._begin_history(snapshot)
            self._cached = (snapshot, self.seq)
            self._started.set()
            logger.bind(resource=str(self.key)).debug("broadcaster for {} started", self.key)
            async for change in feed:
                self._publish(change)
        return self._final_push(error=None)

    async def _pump_bus(self, bus: Bus) -> Push:
        with trio.fail_after(self._timeout):
            snapshot, position = await self._bus_snapshot(bus)
        history = self.history
        history.epoch, history.seq, history.version = position.epoch, position.seq, position.seq
        for pending in self._pending.values():
            pending.registered_at_seq = self.seq
        self._cached = (snapshot, self.seq)
        self._started.set()
        logger.bind(resource=str(self.key)).debug("broadcaster for {} follows the bus", self.key)
        async with bus.follow(self.key, position) as events:
            async for event in events:
                if event.data == _COMPLETED:  # the backend ended the resource (a deleted chat)
                    break
                self._publish(Change(event.data, event.seq))
        return self._final_push(error=None)

    async def _bus_snapshot(self, bus: Bus) -> tuple[Snapshot, Position]:
        """A snapshot versioned by the bus: the position first, then the backend's rows."""
        position = await bus.head(self.key)
        snapshot = await self._read_snapshot()
        return Snapshot(snapshot.items, position.seq), position

    def _begin_history(self, snapshot: Snapshot) -> None:
        kept = self._continues
        self._continues = None
        if kept is not None and snapshot.version is not None and kept.version == snapshot.version:
            # Nothing changed while nobody watched: the old numbering, and its buffer of recent
            # pushes, still describe this resource exactly.
            self.history = kept
        else:
            self.history.version = snapshot.version
        for pending in self._pending.values():
            pending.registered_at_seq = self.seq

    def _publish(self, change: Change) -> None:
        if self._cancel_scope.cancel_called:
            return  # its history may already be kept for, or continued by, another
        history = self.history
        if change.version is not None:
            if history.version is not None and change.version <= history.version:
                return  # already part of the first snapshot
            history.version = change.version
        # On a bus, the bus numbered it (and the feed delivers each seq once, in order).
        seq = history.seq + 1 if self._bus is None or change.version is None else change.version
        push = self._push_of(seq, change.data, change.version)
        if push is None:
            logger.bind(resource=str(self.key)).error(
                "dropped a change of {} that is not JSON-serializable", self.key
            )
            return
        history.seq = seq
        history.record(push, trio.current_time())
        for subscriber in self._live:
            subscriber.deliver(push)
        for pending in self._pending.values():
            if len(pending.pushes) < self._max_pending:
                pending.pushes.append(push)
            else:
                pending.overflowed = True
        self._wake()

    def _wake(self) -> None:
        self._advanced.set()
        self._advanced = trio.Event()

    def _final_push(self, *, error: str | None, restart: bool = False) -> Push:
        resource_id = self.key.resource_id or None
        if error is None:
            data: JSON = {"completed": True}
            text = encode(
                DataReply(
                    id=None, resource=self.key.resource, resource_id=resource_id, data=data,
                    seq=self.seq + 1,
                )
            )
        else:
            data = None
            text = encode(
                ErrorReply(
                    id=None, error=error, code=ErrorCode.BACKEND_ERROR,
                    resource=self.key.resource, resource_id=resource_id, seq=self.seq + 1,
                )
            )
        return Push(
            self.key, self.seq + 1, data, text, final=True, error=error, restart=restart
        )

    def _finish(self, final: Push) -> None:
        self._final = final
        self._on_done(self)
        subscribers = list(self._live)
        self._live.clear()
        for subscriber in subscribers:
            subscriber.end(final)
        self._wake()  # pending joiners see the end and fail their subscribe

    def _fail_start(self, exc: Exception) -> None:
        self._start_error = _as_subscribe_failed(exc, self.key)
        self._on_done(self)
        self._started.set()

    # --- subscribers ------------------------------------------------------------------------

    def add(self, subscriber: Subscriber) -> None:
        """Register a joiner: it collects changes until `sync` makes it live."""
        if self.lingering:
            self.lingering = False
            self._cancel_scope.deadline = math.inf
        self._pending[subscriber] = _Pending(self.seq)

    def remove(self, subscriber: Subscriber, linger: bool = False) -> None:
        """Unregister (idempotent); the last one out cancels the broadcaster, or, if it
        dropped (``linger``), leaves it running for ``linger`` seconds."""
        self._live.discard(subscriber)
        self._pending.pop(subscriber, None)
        if not self._live and not self._pending and not self.done and not self.lingering:
            if linger and self._linger > 0 and self.resumable and not self._ended:
                self.lingering = True
                self._cancel_scope.deadline = trio.current_time() + self._linger
                return
            self._cancel_scope.cancel()
            self._on_done(self)

    async def sync(
        self,
        subscriber: Subscriber,
        since_seq: int | None = None,
        epoch: str | None = None,
        max_replay: int | None = None,
    ) -> Synced:
        """Line the joiner up with the stream: resume it after ``since_seq`` if its history
        still holds every push since (and they are at most ``max_replay``: the room the
        subscriber has for them), else read a snapshot (see the module docstring)."""
        await self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        pending = self._pending[subscriber]
        if since_seq is not None and epoch == self.history.epoch:
            missed = self.history.between(
                since_seq, pending.registered_at_seq, trio.current_time()
            )
            if missed is None and self._bus is not None:
                missed = await self._missed_on_bus(self._bus, since_seq, pending)
            room = math.inf if max_replay is None else max_replay
            if missed is not None and len(missed) + len(pending.pushes) <= room:
                return Synced(
                    None, since_seq, self.history.epoch, reset=False,
                    go_live=lambda: self._go_live(subscriber, since_seq, missed),
                    leave=partial(self.remove, subscriber),
                )
        cached = self._cached
        if cached is not None and cached[1] == self.seq:
            snapshot, seq = cached
        else:
            snapshot = await self._fresh_snapshot()
            seq = await self._seq_of(snapshot, pending)
            if seq == self.seq:
                self._cached = (snapshot, seq)
        if self._final is not None:
            raise SubscribeFailed(ErrorCode.BACKEND_ERROR, "upstream ended while subscribing")
        if pending.overflowed:
            raise SubscribeFailed(
                ErrorCode.BACKEND_ERROR, "too many changes while subscribing; try again"
            )
        return Synced(
            snapshot, seq, self.history.epoch, reset=since_seq is not None,
            go_live=lambda: self._go_live(subscriber, seq),
            leave=partial(self.remove, subscriber),
        )

    async def _missed_on_bus(
        self, bus: Bus, since_seq: int, pending: _Pending
    ) -> list[Push] | None:
        """The pushes after ``since_seq`` from the bus's kept history (another process, or
        an earlier broadcaster, delivered them); None if the bus no longer has them all."""
        try:
            with trio.fail_after(self._timeout):
                events = await bus.read(
                    self.key, self.history.epoch, since_seq, pending.registered_at_seq
                )
        except (BusError, trio.TooSlowError):
            return None  # a fresh snapshot is the safe answer
        pushes = []
        for event in events or ():
            push = self._push_of(event.seq, event.data, event.seq)
            if push is None:
                return None
            pushes.append(push)
        return pushes if events is not None else None

    def _push_of(self, seq: int, data: JSON, version: int | None) -> Push | None:
        """``data`` as the push numbered ``seq``, encoded once; None if it is not JSON."""
        try:
            text = encode(
                DataReply(
                    id=None, resource=self.key.resource,
                    resource_id=self.key.resource_id or None, data=data, seq=seq,
                )
            )
        except (TypeError, ValueError):
            return None
        return Push(self.key, seq, data, text, version)

    async def _fresh_snapshot(self) -> Snapshot:
        try:
            with trio.fail_after(self._timeout):
                if self._bus is not None:
                    snapshot, position = await self._bus_snapshot(self._bus)
                    if position.epoch != self.history.epoch:
                        raise SubscribeFailed(
                            ErrorCode.BACKEND_ERROR, "the resource's stream restarted; try again"
                        )
                    return snapshot
                return await self._read_snapshot()
        except Exception as exc:
            raise _as_subscribe_failed(exc, self.key) from None

    async def _seq_of(self, snapshot: Snapshot, pending: _Pending) -> int:
        """The seq of the last change that ``snapshot`` includes."""
        target = snapshot.version
        if target is None or self.version is None:
            # Unversioned backend: deliver everything since registration (duplicates are
            # possible, losses are not).
            return pending.registered_at_seq
        # The snapshot may be ahead of the feed: wait for the feed to deliver up to it.
        with trio.move_on_after(self._timeout) as scope:
            while self.version < target and self._final is None:
                await self._advanced.wait()
        if scope.cancelled_caught:
            raise SubscribeFailed(
                ErrorCode.BACKEND_ERROR, "backend snapshot is ahead of its change feed"
            )
        seq = pending.registered_at_seq
        for push in pending.pushes:
            if push.version is not None and push.version <= target:
                seq = push.seq
        return seq

    def _go_live(
        self, subscriber: Subscriber, after_seq: int, missed: list[Push] | None = None
    ) -> None:
        pending = self._pending.pop(subscriber, None)
        if pending is None:
            return  # removed in the meantime
        for push in missed or ():
            subscriber.deliver(push)
        if self._final is not None:
            subscriber.end(self._final)
            return
        self._live.add(subscriber)
        for push in pending.pushes:
            if push.seq > after_seq:
                subscriber.deliver(push)


#: The data of a resource's final event on a bus: the backend ended it (as in-process, the
#: final push of a completed upstream).
_COMPLETED: JSON = {"completed": True}


def _as_subscribe_failed(exc: BaseException, key: ResourceKey) -> SubscribeFailed:
    if isinstance(exc, SubscribeFailed):
        return exc
    if isinstance(exc, BusError):
        return SubscribeFailed(ErrorCode.BACKEND_ERROR, str(exc) or "the broker failed")
    if isinstance(exc, NotFound):
        return SubscribeFailed(ErrorCode.NOT_FOUND, str(exc) or f"{key} not found")
    if isinstance(exc, BackendError):
        return SubscribeFailed(ErrorCode.BACKEND_ERROR, str(exc) or "backend error")
    if isinstance(exc, trio.TooSlowError):
        return SubscribeFailed(ErrorCode.BACKEND_ERROR, "backend timed out")
    logger.opt(exception=exc).error("backend failed while subscribing to {}", key)
    return SubscribeFailed(ErrorCode.BACKEND_ERROR, "backend error")

