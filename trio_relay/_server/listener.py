"""In-process subscriptions (`Relay.listen`): a `Listener` is a bounded memory channel its
resource's broadcaster fills, and the errors the relay raises to the host application."""

from __future__ import annotations

import attrs
import trio

from .._errors import CodedError
from .._stream.broadcaster import Push, Synced
from .._wire.protocol import JSON, ResourceKey

__all__ = [
    "Listener", "ListenerOverflow", "ListenerSubscriber", "RelayError", "SubscriptionError",
    "Update", "UpstreamError",
]


class RelayError(Exception):
    """Base of the errors the relay raises to the embedding application."""


class SubscriptionError(CodedError, RelayError):
    """`Relay.listen` could not subscribe; ``code`` is the wire error code."""


class UpstreamError(RelayError):
    """The resource's upstream feed failed; the listener ends with this."""


class ListenerOverflow(RelayError):
    """A listener fell more than its buffer behind and was dropped so others could go on."""


@attrs.frozen
class Update:
    """One push, as an in-process listener receives it (the same as web clients get)."""

    resource: str
    resource_id: str
    seq: int
    data: JSON


class ListenerSubscriber:
    def __init__(self, send: trio.MemorySendChannel[Update]) -> None:
        self._send = send
        self.overflowed = False
        self.error: str | None = None

    def deliver(self, push: Push) -> None:
        try:
            self._send.send_nowait(
                Update(push.key.resource, push.key.resource_id, push.seq, push.data)
            )
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
        except trio.ClosedResourceError:
            pass

    def end(self, push: Push) -> None:
        if push.error is not None:
            self.error = push.error
        else:
            self.deliver(push)
        self._send.close()


class Listener:
    """An in-process subscription: the snapshot, then every update, as an async iterator.

    Iteration ends after the ``{"completed": True}`` update when the upstream completes; it
    raises `UpstreamError` if the upstream failed and `ListenerOverflow` if this listener fell
    more than its buffer behind.
    """

    def __init__(
        self,
        key: ResourceKey,
        synced: Synced,
        receive: trio.MemoryReceiveChannel[Update],
        subscriber: ListenerSubscriber,
    ) -> None:
        self.resource = key.resource
        self.resource_id = key.resource_id
        assert synced.snapshot is not None  # listeners never resume
        #: The items of the snapshot: chats, messages or model profiles.
        self.snapshot: list[JSON] = synced.snapshot.items
        #: The sequence's epoch: a client holding this and ``seq`` could resume.
        self.epoch = synced.epoch
        #: The seq the snapshot is current to; updates continue from seq + 1.
        self.seq = synced.seq
        self._receive = receive
        self._subscriber = subscriber

    def __aiter__(self) -> Listener:
        return self

    async def __anext__(self) -> Update:
        try:
            update = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._subscriber.overflowed:
                raise ListenerOverflow(
                    f"listener on {self.resource} fell behind by more than its buffer"
                ) from None
            if self._subscriber.error is not None:
                raise UpstreamError(self._subscriber.error) from None
            raise StopAsyncIteration from None
        self.seq = update.seq
        return update
