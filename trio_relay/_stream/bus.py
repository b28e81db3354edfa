"""The bus seam: where a resource's events are numbered, kept for replay, and fanned out.

In one process the relay needs no bus: each broadcaster numbers the changes of its backend
feed itself and keeps its `StreamHistory` in memory (``broadcaster``). Across processes every
change must go through one engine that numbers it once for everybody: a `Bus`. A relay with a
bus forwards every change its backend makes to `Bus.forward` (through the backend's
`ChangeHub`), and each broadcaster follows its resource on the bus instead of the backend, so
every node delivers the same events with the same ``seq`` in the same order.

A `Bus` numbers the events of each resource from 1 within an ``epoch``; the epoch changes only
when the bus lost that resource's history (its engine restarted empty, the key was evicted),
so a client that resumes with an old epoch gets a fresh snapshot, never a wrong replay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import attrs

from .._wire.protocol import JSON, ResourceKey

__all__ = ["Bus", "BusError", "BusEvent", "EpochChanged", "Position"]


class BusError(Exception):
    """The bus cannot be reached or did not answer in time; ``str()`` is safe to show."""


class EpochChanged(BusError):
    """A followed resource's history was lost on the bus: its numbering started over."""


@attrs.frozen(slots=True)
class Position:
    """Where a resource's stream stands: its epoch and the ``seq`` of its last event."""

    epoch: str
    seq: int


@attrs.frozen(slots=True)
class BusEvent:
    """One event of a resource as the bus numbered it."""

    seq: int
    data: JSON


class Bus(Protocol):
    """What the relay needs of a bus; every method raises `BusError` when the bus fails."""

    @property
    def healthy(self) -> bool:
        """False while the bus is unreachable or frozen (``/healthz`` answers 503)."""
        ...

    def forward(self, key: ResourceKey, data: JSON) -> None:
        """Queue a change the local backend made, to be published in order; never blocks.

        Changes are published in batches by a task of the bus, in the order forwarded."""
        ...

    async def flush(self) -> None:
        """Return once every change forwarded before the call is published (a store's
        outbox deletes its rows only then, so that a crash loses nothing)."""
        ...

    async def publish(self, key: ResourceKey, data: JSON) -> Position:
        """Publish one event now and return the position it was given."""
        ...

    async def head(self, key: ResourceKey) -> Position:
        """The resource's current position (epoch created, seq 0, if it has none yet)."""
        ...

    async def read(
        self, key: ResourceKey, epoch: str, after: int, until: int
    ) -> list[BusEvent] | None:
        """The events with ``after < seq <= until``, or None if the epoch is not current or
        any of them is no longer kept (too old or trimmed)."""
        ...

    def follow(
        self, key: ResourceKey, start: Position
    ) -> AbstractAsyncContextManager[AsyncIterator[BusEvent]]:
        """The resource's live events after ``start``: every one, once, in ``seq`` order
        (a gap on the live channel is filled from the kept history first).

        The iterator raises `EpochChanged` if the history was lost, and `BusError` if the bus
        stayed unreachable for longer than the bus's grace period."""
        ...

