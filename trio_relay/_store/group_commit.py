"""`GroupCommit`: writes that arrive while a batch commits go together into the next one.

Both stores keep each sent message with one transaction and one commit per batch rather than
per message. The first writer to arrive commits for everyone waiting; those who arrive while
it does wait for the next batch, which it commits too. A write is not undone by cancelling its
caller (the wait is shielded). A store gives `store`, which runs a batch and returns one
outcome per write, in order; `then` of each write that succeeded runs right after, under the
store's lock and in the order of the writes (the stores publish there).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, cast

import attrs
import outcome
import trio

from .backend import BackendError

__all__ = ["GroupCommit", "PendingWrite"]

C = TypeVar("C")  # what a write is run with: a store's connection
T = TypeVar("T")


@attrs.define(eq=False)
class PendingWrite(Generic[C]):
    """A write waiting for its batch."""

    write: Callable[[C], object]
    then: Callable[[object], None]
    #: It may run twice (a send with a nonce stores once however often it runs).
    retry: bool = False
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome[object] | None = None


class GroupCommit(Generic[C]):
    """The batches of one store; ``closed`` says when the store is closed."""

    def __init__(
        self,
        lock: trio.Lock,
        store: Callable[[list[PendingWrite[C]]], Awaitable[list[outcome.Outcome[object]]]],
        closed: Callable[[], bool],
        *,
        committed: Callable[[int], None] | None = None,
    ) -> None:
        self._lock = lock
        self._store = store
        self._closed = closed
        #: Told how many writes each batch committed (SQLite checkpoints after enough).
        self._committed = committed
        self._waiting: list[PendingWrite[C]] = []
        self._committing = False

    async def write(
        self, write: Callable[[C], T], then: Callable[[T], None], *, retry: bool = False
    ) -> T:
        """Run ``write`` in the next batch; its result once committed (after ``then``)."""
        if self._closed():
            raise BackendError("backend is closed")
        pending = PendingWrite[C](write, then, retry)  # type: ignore[arg-type]
        self._waiting.append(pending)
        with trio.CancelScope(shield=True):
            if self._committing:
                await pending.done.wait()
            else:
                await self._commit()
        assert pending.result is not None
        return cast(T, pending.result.unwrap())

    async def _commit(self) -> None:
        self._committing = True
        batch: list[PendingWrite[C]] = []
        try:
            while self._waiting and not self._closed():
                async with self._lock:
                    if self._closed():
                        break
                    # What queued up while the last batch was committed (or while the lock
                    # was held) goes in this one.
                    batch, self._waiting = self._waiting, []
                    results = await self._store(batch)
                    for pending, result in zip(batch, results, strict=True):
                        if isinstance(result, outcome.Value):
                            pending.then(result.value)
                        pending.result = result
                        pending.done.set()
                if self._committed is not None:
                    self._committed(len(batch))
                batch = []
        finally:
            self._committing = False
            # Closed (or failed) with writes still waiting: they will never be stored.
            for pending in (*batch, *self._waiting):
                if not pending.done.is_set():
                    pending.result = outcome.Error(BackendError("backend is closed"))
                    pending.done.set()
            self._waiting = []
