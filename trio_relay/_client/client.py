"""A Trio client of the relay that reconnects, resumes, and never loses an event.

    open_relay_client nursery ......................... the client's lifetime
    └── supervisor                                      connects, reconnects with backoff
        └── link nursery (one per WebSocket connection)
            ├── trio-websocket's reader                 bytes in, pings answered
            ├── reader                                  routes every frame, in wire order
            ├── writer                                  the only task that writes frames
            ├── keepalive                               pings; no pong in time: reconnect
            └── resubscription retries*                 transient refusals, with backoff

A *link* is one WebSocket connection. One reader task routes each reply to its request by
``id`` and each push to its subscription by ``(resource, resourceId)``, synchronously and in
the order the frames arrived, so a ``subscribed`` reply and the pushes after it can never be
seen out of order. Every frame goes out through one writer task, so a request that is
cancelled half way never leaves half a frame on the wire.

Each subscribed resource has a *wire*: the client's side of the relay's subscription, which
remembers the resource's ``epoch`` and the ``seq`` of the last push it received. Any number of
`Subscription` objects (one per ``client.subscribe``) share a wire and each gets every event in
its own bounded queue. After a reconnect every wire is subscribed again with ``sinceSeq`` and
``epoch``: the relay then sends exactly the missed pushes, or a fresh snapshot that the client
hands to each subscription as an explicit `Reset`. Pushes at or below the last ``seq`` are
dropped, so nothing is delivered twice; a gap (which the relay promises never to leave) makes
the client start that resource over from a fresh snapshot rather than pass the gap on.
"""

from __future__ import annotations

import copy
import enum
import itertools
import json
import math
import random
import ssl
import sys
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn, TypeAlias
from urllib.parse import urlsplit

import attrs
import trio
import wsproto.utilities
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "AgentError",
    "AuthFailed",
    "Backoff",
    "Chunk",
    "ChatCreated",
    "ChatDeleted",
    "ChatRenamed",
    "ClientStatistics",
    "CloseInfo",
    "Completed",
    "ConnectionLost",
    "ConnectionState",
    "Device",
    "Event",
    "LockedOut",
    "MessageAdded",
    "ModelProfilesChanged",
    "Other",
    "RelayClient",
    "RelayClientError",
    "ReplyCancelled",
    "ReplyStarted",
    "RequestRejected",
    "RequestTimeout",
    "Reset",
    "Subscription",
    "SubscriptionFailed",
    "SyncedMirror",
    "TokenInvalid",
    "open_mirror",
    "open_relay_client",
    "parse_event",
]

#: Any JSON value, as the standard library's `json` module produces it.
JSON: TypeAlias = Any
Frame: TypeAlias = dict[str, Any]
#: Opens a connected stream to the relay (TCP, TLS, or in-memory in tests).
Connect: TypeAlias = Callable[[], Awaitable[trio.abc.Stream]]
_Key: TypeAlias = tuple[str, str]  # (resource, resourceId); modelProfiles has id ""

RESOURCES: Final = ("project", "chat", "modelProfiles")
_SNAPSHOT_FIELDS: Final = {"project": "chats", "chat": "messages", "modelProfiles": "modelProfiles"}
#: Events a subscription holds for a consumer that has not read them yet; past this it is
#: given a fresh snapshot (a `Reset`) instead, so a stalled consumer costs bounded memory.
DEFAULT_BUFFER: Final = 4096
# trio-websocket's default (1 MiB) is smaller than a long chat's history in one `subscribed`
# reply; a frame over the limit would close the connection (1009) on every reconnect.
_MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024
# Our reader never blocks, so a small queue keeps trio-websocket's reader (and so its pong
# replies to the relay's keepalive pings) flowing.
_MESSAGE_QUEUE_SIZE: Final = 16
#: The client pings the relay this often, and drops a connection whose pong takes longer than
#: the timeout: a half-open TCP connection (the relay's host vanished) looks alive forever.
_PING_INTERVAL: Final = 20.0
_PING_TIMEOUT: Final = 20.0
#: How long leaving the client waits for the relay to finish the closing handshake.
_CLOSE_TIMEOUT: Final = 2.0
#: Close codes after which reconnecting cannot help: the relay has judged this client
#: (auth timeout, PIN lockout, abuse). Every other close, and no close frame at all, reconnects.
TERMINAL_CLOSE_CODES: Final = frozenset({1008})
_SLOW_CONSUMER: Final = 1013
#: Refusals of a resubscription worth retrying on the same connection, with backoff.
_TRANSIENT_CODES: Final = frozenset({"rate_limited", "backend_error"})


# --- errors -----------------------------------------------------------------------------------


class RelayClientError(Exception):
    """Base of every error the client raises (besides `trio.ClosedResourceError` after you
    closed it yourself)."""


class AuthFailed(RelayClientError):
    """The relay refused the PIN or token. Terminal: the client does not retry (with the same
    secret it would only feed the lockout); ask the user.

    ``code`` is the wire's: ``auth_failed`` (a wrong PIN; this class), ``token_invalid``
    (`TokenInvalid`) or ``locked_out`` (`LockedOut`). ``close_code`` is the WebSocket close
    code when the relay also closed the connection, else None.
    """

    def __init__(
        self, error: str, close_code: int | None = None, *, code: str = "auth_failed"
    ) -> None:
        super().__init__(error, close_code)
        self.error = error
        self.close_code = close_code
        self.code = code

    def __str__(self) -> str:
        suffix = f" (close code {self.close_code})" if self.close_code is not None else ""
        return f"authentication failed: {self.error}{suffix}"


class TokenInvalid(AuthFailed):
    """The device token is unknown or revoked: forget it and sign in with the PIN."""


class LockedOut(AuthFailed):
    """Too many failed attempts from this address: nothing is compared for ``retry_after``
    seconds (the relay's count, rounded up), not even the right PIN."""

    def __init__(
        self, error: str, close_code: int | None = None, *, retry_after: int | None = None
    ) -> None:
        super().__init__(error, close_code, code="locked_out")
        self.retry_after = retry_after


class RequestTimeout(RelayClientError):
    """A request was sent but not answered within ``request_timeout``."""


class RequestRejected(RelayClientError):
    """The relay answered a request with an error; ``code`` is the wire's stable error code
    (``not_found``, ``backend_error``, ``rate_limited``, ...), ``error`` its text."""

    def __init__(self, code: str, error: str) -> None:
        super().__init__(code, error)
        self.code = code
        self.error = error

    def __str__(self) -> str:
        return f"{self.error} ({self.code})"


class SubscriptionFailed(RelayClientError):
    """A subscription ended with an error: the relay's last push of a failed upstream
    (``backend_error``), or a resubscription after a reconnect that was refused (for
    example ``not_found``: the chat was deleted meanwhile)."""

    def __init__(self, code: str, error: str) -> None:
        super().__init__(code, error)
        self.code = code
        self.error = error

    def __str__(self) -> str:
        return f"{self.error} ({self.code})"


class ConnectionLost(RelayClientError):
    """The connection is gone and this operation cannot go on.

    Raised by a request that was in flight when the connection dropped (a ``send`` is never
    repeated, since it may have been delivered), by a request that found no connection within
    its timeout, when connecting fails at first, and by everything once the relay closed the
    connection for good (``close_code`` 1008). ``close_code`` is None when no close frame was
    received.
    """

    def __init__(self, reason: str, close_code: int | None = None) -> None:
        super().__init__(reason, close_code)
        self.reason = reason
        self.close_code = close_code

    def __str__(self) -> str:
        if self.close_code is None:
            return self.reason
        return f"{self.reason} (close code {self.close_code})"


class _LinkLost(Exception):
    """Internal: the link a request was sent on went away before the reply."""


# --- configuration and state ------------------------------------------------------------------


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` (from 0) waits a uniformly random
    time in ``[0, min(maximum, initial * multiplier ** n))``.

    ``random`` returns a float in ``[0, 1)``; pass your own for reproducible schedules (a
    function returning 1.0 gives the caps themselves).
    """

    initial: float = attrs.field(default=0.5, validator=_positive)
    maximum: float = attrs.field(default=30.0, validator=_positive)
    multiplier: float = attrs.field(default=2.0, validator=_positive)
    random: Callable[[], float] = attrs.field(default=random.random, eq=False, repr=False)

    def cap(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt``."""
        try:
            grown = self.initial * self.multiplier**attempt
        except OverflowError:
            grown = math.inf
        return min(self.maximum, grown)

    def delay(self, attempt: int) -> float:
        return self.random() * self.cap(attempt)


class ConnectionState(enum.Enum):
    """Where the client is, for UIs: watch it with `RelayClient.state_changes`."""

    #: Opening the first connection.
    CONNECTING = "connecting"
    #: Authenticated, every subscription live.
    CONNECTED = "connected"
    #: The connection was lost; retrying with backoff. Subscriptions wait, losing nothing.
    RECONNECTING = "reconnecting"
    #: For good: closed by you, or terminally by the relay (see `RelayClient.error`).
    CLOSED = "closed"


@attrs.frozen
class CloseInfo:
    """How a connection ended: the close code (None: no close frame) and reason."""

    code: int | None
    reason: str


@attrs.frozen(kw_only=True)
class ClientStatistics:
    """What the client holds right now (`RelayClient.statistics`)."""

    state: ConnectionState
    #: Connections tried, and how many of them got as far as authenticating.
    connection_attempts: int
    connections: int
    #: Live `Subscription` objects, and the relay resources they watch.
    subscriptions: int
    resources: int
    #: Requests on the current connection still waiting for their reply.
    pending_requests: int
    #: Events received but not yet read, over all subscriptions.
    buffered_events: int


@attrs.frozen
class Device:
    """This client as a paired device (`RelayClient.device`).

    ``token`` signs it in from now on: keep it somewhere private and pass it as
    ``open_relay_client(..., token=...)`` next time. Messages sent from this client carry
    ``sender.deviceId == id``: that is how a UI tells "You" from the others.
    """

    id: str
    name: str
    token: str = attrs.field(repr=False)


# --- events -----------------------------------------------------------------------------------


@attrs.frozen
class MessageAdded:
    """chat: a message was stored (the user's on send, the agent's once its answer is done)."""

    message: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ReplyStarted:
    """chat: the agent starts answering; its final message will have id ``message_id``."""

    message_id: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Chunk:
    """chat: a piece of the agent's answer; the pieces joined are the final content."""

    message_id: str
    text: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class AgentError:
    """chat: the agent failed, or its answer could not be stored."""

    message_id: str | None
    error: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ReplyCancelled:
    """chat: a ``cancel`` stopped the agent's reply; nothing is stored for it."""

    message_id: str | None
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ChatCreated:
    """project: a chat was created."""

    chat: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ChatRenamed:
    """project: a chat was renamed; ``chat`` has its new title."""

    chat: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ChatDeleted:
    """project: a chat and its messages were deleted."""

    chat_id: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ModelProfilesChanged:
    """modelProfiles: the whole new list."""

    profiles: list[JSON]
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Reset:
    """Events were lost to this subscription (the relay could not resume it, or the consumer
    fell behind): ``snapshot`` is the resource's whole state now. Replace yours with it;
    events from ``seq + 1`` follow."""

    snapshot: list[JSON]
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Completed:
    """The resource's upstream ended; this is the subscription's last event."""

    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Other:
    """A push this client does not recognise (another backend's events), passed through."""

    data: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


Event: TypeAlias = (
    MessageAdded | ReplyStarted | Chunk | AgentError | ReplyCancelled | ChatCreated
    | ChatRenamed | ChatDeleted | ModelProfilesChanged | Reset | Completed | Other
)


def parse_event(resource: str, data: JSON, seq: int | None = None) -> Event:
    """The typed event for one push's ``data``; `Other` when the shape is not recognised."""
    if not isinstance(data, dict):
        return Other(data, seq=seq)
    if data.get("completed") is True and "type" not in data:
        return Completed(seq=seq)
    kind = data.get("type")
    if resource == "chat":
        message_id = data.get("messageId")
        if kind == "message" and isinstance(data.get("message"), dict):
            return MessageAdded(data["message"], seq=seq)
        if kind == "reply_started" and isinstance(message_id, str):
            return ReplyStarted(message_id, seq=seq)
        if kind == "chunk" and isinstance(message_id, str) and isinstance(data.get("text"), str):
            return Chunk(message_id, data["text"], seq=seq)
        if kind == "error" and isinstance(data.get("error"), str) and (
            message_id is None or isinstance(message_id, str)
        ):
            return AgentError(message_id, data["error"], seq=seq)
        if kind == "cancelled" and (message_id is None or isinstance(message_id, str)):
            return ReplyCancelled(message_id, seq=seq)
    elif resource == "project":
        if kind == "chat_created" and isinstance(data.get("chat"), dict):
            return ChatCreated(data["chat"], seq=seq)
        if kind == "chat_renamed" and isinstance(data.get("chat"), dict):
            return ChatRenamed(data["chat"], seq=seq)
        if kind == "chat_deleted" and isinstance(data.get("chatId"), str):
            return ChatDeleted(data["chatId"], seq=seq)
    elif resource == "modelProfiles" and kind is None and isinstance(
        data.get("modelProfiles"), list
    ):
        return ModelProfilesChanged(data["modelProfiles"], seq=seq)
    return Other(data, seq=seq)


# --- subscriptions ----------------------------------------------------------------------------


class _End:
    """The marker for a subscription that ended normally (after `Completed`)."""


_END: Final = _End()


class Subscription:
    """One ``client.subscribe`` block: the snapshot, then every event, in order, once.

    ``async for event in sub`` waits through reconnects; it ends after `Completed`, and raises
    `SubscriptionFailed` when the relay ends the subscription with an error, or the client's
    terminal error (`ConnectionLost` with close code 1008, `AuthFailed`). Events received
    before any of these are always yielded first.
    """

    def __init__(self, client: RelayClient, key: _Key, buffer: int) -> None:
        self._client = client
        self.resource, self.resource_id = key
        #: The items of the last snapshot handed out: the one `subscribe` returned with, or the
        #: latest `Reset`'s once it has been yielded.
        self.snapshot: list[JSON] = []
        #: The ``seq`` of the last event yielded (or of the snapshot).
        self.seq: int | None = None
        self._buffer = buffer
        self._queue: deque[Event] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._final: BaseException | _End | None = None
        self._overflowed = False
        self._closed = False

    @property
    def key(self) -> _Key:
        return (self.resource, self.resource_id)

    def __repr__(self) -> str:
        name = f"{self.resource}:{self.resource_id}" if self.resource_id else self.resource
        return f"<Subscription {name} seq={self.seq}>"

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the subscription is closed")
            if self._queue:
                event = self._queue.popleft()
                if event.seq is not None:
                    self.seq = event.seq
                if isinstance(event, Reset):
                    self.snapshot = event.snapshot
                await trio.lowlevel.checkpoint()
                return event
            if isinstance(self._final, _End):
                raise StopAsyncIteration
            if self._final is not None:
                raise copy.copy(self._final)
            if self._overflowed:
                # Everything buffered has been read: now fetch the state we could not follow.
                await self._client._resnapshot(self)
                continue
            await self._lot.park()

    def receive_nowait(self) -> Event:
        """The next buffered event, or `trio.WouldBlock`."""
        if self._queue and not self._closed:
            event = self._queue.popleft()
            if event.seq is not None:
                self.seq = event.seq
            if isinstance(event, Reset):
                self.snapshot = event.snapshot
            return event
        raise trio.WouldBlock

    # --- fed by the client's reader (never blocks) ------------------------------------------

    def _start(self, items: list[JSON], seq: int | None) -> None:
        self.snapshot = items
        self.seq = seq

    def _put(self, event: Event) -> None:
        if self._closed or self._final is not None:
            return
        if self._overflowed:
            if isinstance(event, Reset):  # a fresh snapshot is exactly what it was waiting for
                self._overflowed = False
                self._queue.append(event)
                self._lot.unpark_all()
            return
        if len(self._queue) >= self._buffer:
            self._overflowed = True
            self._lot.unpark_all()
            return
        self._queue.append(event)
        self._lot.unpark_all()

    def _reset(self, items: list[JSON], seq: int | None) -> None:
        self._overflowed = False
        self._queue.append(Reset(items, seq=seq))
        self._lot.unpark_all()

    def _finish(self, final: BaseException | _End) -> None:
        if self._final is not None:
            return
        if self._overflowed and isinstance(final, _End):
            final = SubscriptionFailed(
                "client_overflow",
                "the consumer fell more than its buffer behind and the stream ended before"
                " it could catch up",
            )
        self._final = final
        self._lot.unpark_all()

    def _close(self) -> None:
        self._closed = True
        self._queue.clear()
        self._lot.unpark_all()


@attrs.define(eq=False)
class _Wire:
    """The client's half of the relay's subscription to one resource."""

    key: _Key
    consumers: list[Subscription] = attrs.Factory(list)
    epoch: str | None = None
    #: The seq of the last push received (or of the snapshot); None before the first reply,
    #: or after an anomaly, when the resource must start over from a fresh snapshot.
    seq: int | None = None
    #: The link the relay holds this subscription on.
    link: _Link | None = None
    #: Pushes are dropped until the next snapshot (after a gap or an unverifiable resume).
    stale: bool = False


@attrs.define(eq=False)
class _Pending:
    on_reply: Callable[[_Link, Frame], None] | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    reply: Frame | None = None


class _Link:
    """One WebSocket connection; lives inside `RelayClient._run_link`."""

    def __init__(self, ws: WebSocketConnection, cancel_scope: trio.CancelScope) -> None:
        self.ws = ws
        self.cancel_scope = cancel_scope
        self.pending: dict[str, _Pending] = {}
        self.lost = trio.Event()
        self.close: CloseInfo | None = None
        self._out_send, self._out_receive = trio.open_memory_channel[str](math.inf)

    @property
    def alive(self) -> bool:
        return not self.lost.is_set()

    def post(self, frame: Frame, pending: _Pending | None = None) -> None:
        """Queue one frame for the writer; never blocks."""
        if pending is not None:
            self.pending[frame["id"]] = pending
        try:
            self._out_send.send_nowait(json.dumps(frame, separators=(",", ":")))
        except trio.ClosedResourceError:
            pass  # lost meanwhile: the pending request is woken by mark_lost

    async def request(
        self, frame: Frame, on_reply: Callable[[_Link, Frame], None] | None = None
    ) -> Frame:
        if not self.alive:
            raise _LinkLost
        pending = _Pending(on_reply)
        self.post(frame, pending)
        # If cancelled here the entry stays until its reply, so that a late reply still runs
        # on_reply (a late `subscribed` must be adopted or unsubscribed, never ignored).
        await pending.done.wait()
        if pending.reply is None:
            raise _LinkLost
        return pending.reply

    def deliver(self, frame: Frame) -> bool:
        pending = self.pending.pop(frame["id"], None)
        if pending is None:
            return False
        if pending.on_reply is not None:
            pending.on_reply(self, frame)
        pending.reply = frame
        pending.done.set()
        return True

    def mark_lost(self, close: CloseInfo) -> None:
        if self.lost.is_set():
            return
        self.close = close
        self.lost.set()
        self._out_send.close()
        for pending in self.pending.values():
            pending.done.set()
        self.pending.clear()

    def abort(self, reason: str) -> None:
        """Drop the connection from our side (a protocol anomaly); the client reconnects."""
        self.mark_lost(CloseInfo(None, reason))
        self.cancel_scope.cancel()

    async def keepalive(self) -> None:
        while self.alive:
            await trio.sleep(_PING_INTERVAL)
            with trio.move_on_after(_PING_TIMEOUT) as waiting:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return  # the reader reports it
            if waiting.cancelled_caught:
                self.abort(f"no answer to a ping within {_PING_TIMEOUT:g} s")

    async def writer(self) -> None:
        async for text in self._out_receive:
            try:
                await self.ws.send_message(text)
            except ConnectionClosed:
                return  # the reader sees the close and reports it


@attrs.frozen
class _LinkEnd:
    error: RelayClientError
    ready: bool
    terminal: bool


class _StateWatcher:
    def __init__(self, client: RelayClient) -> None:
        self._client = client
        self._states: deque[ConnectionState] = deque([client.state], maxlen=64)
        self._lot = trio.lowlevel.ParkingLot()
        self._done = False

    def _push(self, state: ConnectionState) -> None:
        self._states.append(state)
        self._lot.unpark_all()

    def __aiter__(self) -> _StateWatcher:
        return self

    async def __anext__(self) -> ConnectionState:
        while not self._states:
            if self._done:
                raise StopAsyncIteration
            await self._lot.park()
        state = self._states.popleft()
        if state is ConnectionState.CLOSED:
            self._done = True
        await trio.lowlevel.checkpoint()
        return state


# --- the client -------------------------------------------------------------------------------


def _key(resource: str, resource_id: str | None) -> _Key:
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {', '.join(RESOURCES)}, not {resource!r}")
    if resource == "modelProfiles":
        return (resource, "")
    if not resource_id:
        raise ValueError(f"resource_id is required for {resource}")
    return (resource, resource_id)


def _target(key: _Key) -> Frame:
    resource, resource_id = key
    return {"resource": resource, "resourceId": resource_id} if resource_id else {
        "resource": resource
    }


def _snapshot_items(key: _Key, reply: Frame) -> list[JSON]:
    data = reply.get("data")
    items = data.get(_SNAPSHOT_FIELDS[key[0]]) if isinstance(data, dict) else None
    return list(items) if isinstance(items, list) else []


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _auth_error(reply: Frame) -> AuthFailed:
    code = str(reply.get("code") or "auth_failed")
    error = str(reply.get("error") or "Invalid PIN")
    if code == "token_invalid":
        return TokenInvalid(error, code=code)
    if code == "locked_out":
        retry_after = reply.get("retryAfter")
        return LockedOut(error, retry_after=retry_after if isinstance(retry_after, int)
                         and not isinstance(retry_after, bool) else None)
    return AuthFailed(error, code=code)


def _rejection(reply: Frame) -> RequestRejected:
    return RequestRejected(str(reply.get("code") or "error"), str(reply.get("error") or "error"))


class RelayClient:
    """A connection to the relay that survives disconnects; get one from `open_relay_client`.

    ``projects`` and ``model_profiles`` are what the relay sent on authenticating, refreshed
    on every reconnect. ``state`` is a `ConnectionState`; ``error`` the terminal error once
    the relay closed the client for good.
    """

    def __init__(
        self,
        url: str,
        *,
        pin: str | None,
        request_timeout: float,
        backoff: Backoff,
        connect: Connect | None,
        ssl_context: ssl.SSLContext | None,
        token: str | None = None,
        device_name: str | None = None,
    ) -> None:
        if (pin is None) == (token is None):
            raise ValueError("give exactly one of pin and token")
        if device_name is not None and not (1 <= len(device_name.strip()) <= 64):
            raise ValueError("device_name must be 1 to 64 characters")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"the relay URL must start with ws:// or wss://, not {url!r}")
        if not parts.hostname:
            raise ValueError(f"the relay URL has no host: {url!r}")
        if not request_timeout > 0:
            raise ValueError("request_timeout must be positive")
        self.url = url
        self._tls = parts.scheme == "wss"
        self._hostname = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._pin = pin
        self._token = token
        self._device_name = device_name
        #: This client as a paired device, once signed in with a token, or with the PIN and
        #: a ``device_name`` (then it reconnects with the token it got); None otherwise.
        self.device: Device | None = None
        self._request_timeout = request_timeout
        self._backoff = backoff
        self._connect: Connect = connect or self._open_transport
        self._ssl_context = ssl_context
        #: The projects and model profiles sent on authenticating (refreshed on reconnect).
        self.projects: list[JSON] = []
        self.model_profiles: list[JSON] = []
        self.state = ConnectionState.CONNECTING
        #: The terminal error once ``state`` is CLOSED by the relay (None if you closed it).
        self.error: RelayClientError | None = None
        #: How the last connection ended, for UIs (None while the first one lives).
        self.last_close: CloseInfo | None = None
        self._state_lot = trio.lowlevel.ParkingLot()
        self._watchers: weakref.WeakSet[_StateWatcher] = weakref.WeakSet()
        self._link: _Link | None = None
        self._wires: dict[_Key, _Wire] = {}
        self._joining: Counter[_Key] = Counter()
        self._subscriptions: set[Subscription] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self._attempts = 0
        self._connections = 0

    def __repr__(self) -> str:
        return f"<RelayClient {self.url} {self.state.value}>"

    # --- state ------------------------------------------------------------------------------

    def state_changes(self) -> AsyncIterator[ConnectionState]:
        """The current state, then each change; ends after CLOSED.

        Each iterator keeps the last 64 changes it has not yielded yet.
        """
        watcher = _StateWatcher(self)
        if self.state is not ConnectionState.CLOSED:
            self._watchers.add(watcher)
        return watcher

    async def wait_state(self, *states: ConnectionState) -> ConnectionState:
        """Wait until ``state`` is one of ``states``; return it.

        Raises the terminal error if the client closes for good while waiting for another
        state (`trio.ClosedResourceError` if you closed it).
        """
        while True:
            if self.state in states:
                await trio.lowlevel.checkpoint()
                return self.state
            if self.state is ConnectionState.CLOSED:
                self._raise_closed()
            await self._state_lot.park()

    def _set_state(self, state: ConnectionState) -> None:
        if state is self.state or self.state is ConnectionState.CLOSED:
            return
        self.state = state
        self._state_lot.unpark_all()
        for watcher in list(self._watchers):
            watcher._push(state)
        if state is ConnectionState.CLOSED:
            self._watchers.clear()

    def _raise_closed(self) -> NoReturn:
        if self.error is not None:
            raise copy.copy(self.error)
        raise trio.ClosedResourceError("the relay client is closed")

    def statistics(self) -> ClientStatistics:
        link = self._link
        return ClientStatistics(
            state=self.state,
            connection_attempts=self._attempts,
            connections=self._connections,
            subscriptions=len(self._subscriptions),
            resources=len(self._wires),
            pending_requests=len(link.pending) if link is not None else 0,
            buffered_events=sum(len(s._queue) for s in self._subscriptions),
        )

    # --- requests ---------------------------------------------------------------------------

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the agent's reply running in a chat; True if one was running. Its
        subscribers get `ReplyCancelled`."""
        reply = await self._request({"type": "cancel", "resourceId": chat_id}, retry=False)
        data = self._expect_data(reply)
        return bool(isinstance(data, dict) and data.get("cancelled"))

    async def send(self, chat_id: str, message: JSON) -> None:
        """Send a message to a chat; returns once the backend accepted it.

        The message and the agent's answer arrive through the chat's subscription. Never
        repeated after a lost connection (it may have arrived): that raises `ConnectionLost`.
        """
        reply = await self._request(
            {"type": "send", "resourceId": chat_id, "message": message}, retry=False
        )
        self._expect_data(reply)

    async def create_chat(
        self, project_id: str, title: str | None = None, model_profile_id: str | None = None
    ) -> JSON:
        """Create a chat in a project, answered by the agent of ``model_profile_id`` (None:
        the relay's default); returns the new chat object."""
        fields: Frame = {"type": "create", "resource": "chat", "resourceId": project_id}
        message: Frame = {}
        if title is not None:
            message["title"] = title
        if model_profile_id is not None:
            message["modelProfileId"] = model_profile_id
        if message:
            fields["message"] = message
        reply = await self._request(fields, retry=False)
        data = self._expect_data(reply)
        chat = data.get("chat") if isinstance(data, dict) else None
        if not isinstance(chat, dict):
            raise RequestRejected("bad_reply", "the relay's reply to create held no chat")
        return chat

    @staticmethod
    def _expect_data(reply: Frame) -> JSON:
        if reply.get("type") == "data":
            return reply.get("data")
        raise _rejection(reply)

    async def _request(
        self,
        fields: Frame,
        *,
        retry: bool,
        on_reply: Callable[[_Link, Frame], None] | None = None,
    ) -> Frame:
        """Send a request once connected and return its reply (an ``error`` reply too).

        Within ``request_timeout`` overall: waiting for a connection, then for the reply. With
        ``retry`` (idempotent requests) a request whose connection drops is sent again on the
        next one.
        """
        deadline = trio.current_time() + self._request_timeout
        while True:
            link: _Link | None = None
            with trio.move_on_at(deadline):
                link = await self._connected_link()
            if link is None:
                raise ConnectionLost(
                    f"not connected to the relay within {self._request_timeout:g} s",
                    self.last_close.code if self.last_close else None,
                )
            frame = {"id": self._next_id(), **fields}
            try:
                with trio.move_on_at(deadline):
                    return await link.request(frame, on_reply)
                raise RequestTimeout(
                    f"no reply to {fields['type']!r} within {self._request_timeout:g} s"
                )
            except _LinkLost:
                if self.state is ConnectionState.CLOSED:
                    self._raise_closed()
                if not retry:
                    close = link.close or CloseInfo(None, "connection lost")
                    raise ConnectionLost(
                        f"connection lost before the reply to {fields['type']!r}"
                        + (f": {close.reason}" if close.reason else ""),
                        close.code,
                    ) from None

    async def _connected_link(self) -> _Link:
        while True:
            if self.state is ConnectionState.CLOSED:
                self._raise_closed()
            link = self._link
            if self.state is ConnectionState.CONNECTED and link is not None and link.alive:
                await trio.lowlevel.checkpoint()
                return link
            await self._state_lot.park()

    def _next_id(self) -> str:
        return str(next(self._ids))

    # --- subscribing ------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self, resource: str, resource_id: str | None = None, *, buffer: int = DEFAULT_BUFFER
    ) -> AsyncIterator[Subscription]:
        """Subscribe for the duration of the block; yields a `Subscription`.

        ``resource`` is ``"project"``, ``"chat"`` or ``"modelProfiles"`` (which takes no id).
        Raises `RequestRejected` (``not_found``, ...) if the relay refuses, `RequestTimeout`;
        waits through reconnects within ``request_timeout``. Leaving the block unsubscribes.
        """
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        key = _key(resource, resource_id)
        if self.state is ConnectionState.CLOSED:
            self._raise_closed()
        subscription = Subscription(self, key, buffer)
        self._subscriptions.add(subscription)
        try:
            self._joining[key] += 1
            try:
                reply = await self._request(
                    {"type": "subscribe", **_target(key)},
                    retry=True,
                    on_reply=lambda link, frame: self._on_join_reply(subscription, link, frame),
                )
            finally:
                self._joining[key] -= 1
                if not self._joining[key]:
                    del self._joining[key]
            if reply.get("type") != "subscribed":
                raise _rejection(reply)
        except BaseException:
            self._detach(subscription)
            raise
        try:
            yield subscription
        finally:
            self._detach(subscription)

    def _on_join_reply(self, subscription: Subscription, link: _Link, reply: Frame) -> None:
        if reply.get("type") != "subscribed":
            return
        key = subscription.key
        wire = self._wires.get(key)
        if subscription._closed:  # the caller gave up (timeout, cancelled) before this reply
            if wire is not None and wire.consumers:
                self._apply_subscribed(link, wire, reply, None)
            elif self._unwanted(key):
                self._unsubscribe(link, key)
            return
        if wire is None:
            wire = self._wires[key] = _Wire(key)
        self._apply_subscribed(link, wire, reply, subscription)

    def _detach(self, subscription: Subscription) -> None:
        if subscription._closed:
            return
        subscription._close()
        self._subscriptions.discard(subscription)
        key = subscription.key
        wire = self._wires.get(key)
        if wire is None:
            return
        if subscription in wire.consumers:
            wire.consumers.remove(subscription)
        if wire.consumers or self._joining[key]:
            return
        del self._wires[key]
        # Queued behind everything already sent for this resource, so a later subscribe
        # (queued after it) cannot be undone by it.
        if wire.link is not None and wire.link is self._link and wire.link.alive:
            self._unsubscribe(wire.link, key)

    def _unwanted(self, key: _Key) -> bool:
        return key not in self._wires and not self._joining[key]

    def _unsubscribe(self, link: _Link, key: _Key) -> None:
        # The reply ({"unsubscribed": ...}) is not waited for: nothing depends on it.
        link.post({"id": self._next_id(), "type": "unsubscribe", **_target(key)})

    async def _resnapshot(self, subscription: Subscription) -> None:
        """A consumer fell behind its buffer: get it a fresh snapshot, delivered as `Reset`."""
        key = subscription.key

        def on_reply(link: _Link, reply: Frame) -> None:
            wire = self._wires.get(key)
            if reply.get("type") != "subscribed":
                return
            if wire is None or subscription not in wire.consumers:
                if self._unwanted(key):
                    self._unsubscribe(link, key)
                return
            self._apply_subscribed(link, wire, reply, subscription)

        reply = await self._request(
            {"type": "subscribe", **_target(key)}, retry=True, on_reply=on_reply
        )
        if reply.get("type") != "subscribed":
            raise _rejection(reply)

    # --- routing (the reader; nothing here blocks) ------------------------------------------

    async def _reader(self, link: _Link) -> None:
        try:
            while link.alive:
                message = await link.ws.get_message()
                if not isinstance(message, str):
                    continue  # the relay sends text only
                try:
                    frame = json.loads(message)
                except ValueError:
                    continue
                if isinstance(frame, dict):
                    self._route(link, frame)
        except ConnectionClosed as exc:
            reason = exc.reason
            link.mark_lost(
                CloseInfo(int(reason.code), reason.reason or reason.name)
                if reason is not None else CloseInfo(1006, "connection lost")
            )

    def _route(self, link: _Link, frame: Frame) -> None:
        request_id = frame.get("id")
        if request_id is not None:
            if isinstance(request_id, str):
                link.deliver(frame)
            return  # a late reply to a request given up on, or not ours
        if frame.get("type") in ("data", "error") and frame.get("resource") in RESOURCES:
            self._on_push(link, frame)
        # Otherwise auth_required, or an error about a frame the relay could not read.

    def _on_push(self, link: _Link, frame: Frame) -> None:
        resource = frame["resource"]
        resource_id = frame.get("resourceId")
        if resource == "modelProfiles" or not isinstance(resource_id, str):
            resource_id = ""
        key = (resource, resource_id)
        wire = self._wires.get(key)
        if wire is None or wire.link is not link or wire.stale:
            return  # no longer wanted, or waiting for a fresh snapshot
        seq = _int_or_none(frame.get("seq"))
        if seq is not None and wire.seq is not None:
            if seq <= wire.seq:
                return  # already delivered
            if seq != wire.seq + 1:
                self._anomaly(link, wire, f"{resource} push seq {seq} after {wire.seq}")
                return
        if seq is not None:
            wire.seq = seq
        if frame.get("type") == "error":
            self._end_wire(wire, SubscriptionFailed(
                str(frame.get("code") or "backend_error"), str(frame.get("error") or "failed")
            ))
            return
        event = parse_event(resource, frame.get("data"), seq)
        if isinstance(event, Completed):
            for consumer in wire.consumers:
                consumer._put(event)
            self._end_wire(wire, _END)
            return
        for consumer in wire.consumers:
            consumer._put(event)

    def _apply_subscribed(
        self, link: _Link, wire: _Wire, reply: Frame, requester: Subscription | None
    ) -> None:
        """Take a ``subscribed`` reply for ``wire``: line its pushes up with what each
        consumer has seen. ``requester`` asked for this snapshot (a join or an overflow)."""
        seq = _int_or_none(reply.get("seq"))
        epoch = reply.get("epoch") if isinstance(reply.get("epoch"), str) else None
        if reply.get("resumed") is True:
            if requester is None and epoch is not None and (epoch, seq) == (wire.epoch, wire.seq):
                wire.link = link  # the missed pushes follow, from wire.seq + 1
                return
            self._anomaly(link, wire, "the relay resumed a position this client did not ask for")
            return
        items = _snapshot_items(wire.key, reply)
        continuous = (
            reply.get("reset") is not True
            and not wire.stale
            and wire.seq is not None
            and seq == wire.seq
            and (
                (epoch is not None and epoch == wire.epoch)
                # A relay without epochs: only the same live connection proves continuity.
                or (epoch is None and wire.epoch is None and wire.link is link)
            )
        )
        wire.link, wire.seq, wire.epoch, wire.stale = link, seq, epoch, False
        if not continuous:
            for consumer in wire.consumers:
                if consumer is not requester:
                    consumer._put(Reset(items, seq=seq))
        if requester is not None:
            if requester in wire.consumers:
                requester._reset(items, seq)
            else:
                requester._start(items, seq)
                wire.consumers.append(requester)

    def _anomaly(self, link: _Link, wire: _Wire, why: str) -> None:
        """The relay broke its ordering promise: forget this resource's position (it starts
        over from a fresh snapshot, a `Reset`) and reconnect rather than pass on a gap."""
        wire.seq = wire.epoch = None
        wire.stale = True
        link.abort(f"protocol anomaly: {why}")

    def _end_wire(self, wire: _Wire, final: BaseException | _End) -> None:
        if self._wires.get(wire.key) is wire:
            del self._wires[wire.key]
        for consumer in wire.consumers:
            consumer._finish(final)
        wire.consumers.clear()

    # --- connecting -------------------------------------------------------------------------

    async def _open_transport(self) -> trio.abc.Stream:
        tcp = await trio.open_tcp_stream(self._hostname, self._port)
        if not self._tls:
            return tcp
        context = self._ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(tcp, context, server_hostname=self._hostname, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return tls

    async def _supervise(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Connect; on every loss reconnect with backoff, until terminal or cancelled."""
        attempt = 0
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while not self._closed:
            end = await self._run_link(ready)
            if not started:
                raise end.error  # the first connection failed: `open_relay_client` raises
            if end.ready:
                attempt = 0
            if end.terminal:
                self._terminate(end.error)
                return
            if self._closed:
                return
            if not end.ready and isinstance(end.error, ConnectionLost) and (
                end.error.close_code == _SLOW_CONSUMER
            ):
                # Closed as a slow consumer while catching up: the missed pushes were more
                # than the relay can queue for one connection, and would be again. Start every
                # resource over from a fresh snapshot (a Reset) instead.
                for wire in self._wires.values():
                    wire.seq = wire.epoch = None
            self._set_state(ConnectionState.RECONNECTING)
            await trio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _run_link(self, ready: Callable[[], None]) -> _LinkEnd:
        """One connection, from opening the stream to its end; never raises but Cancelled."""
        self._attempts += 1
        try:
            with trio.fail_after(self._request_timeout):
                stream = await self._connect()
        except trio.TooSlowError:
            return _LinkEnd(ConnectionLost("timed out connecting to the relay"), False, False)
        except Exception as exc:  # whatever `connect` raises: the attempt failed
            return _LinkEnd(
                ConnectionLost(f"could not connect to the relay: {exc or type(exc).__name__}"),
                False, False,
            )
        link: _Link | None = None
        is_ready = False
        try:
            try:
                async with trio.open_nursery() as nursery:
                    with trio.fail_after(self._request_timeout):
                        ws = await wrap_client_stream(
                            nursery,
                            stream,  # type: ignore[arg-type]  # hinted as sockets; any Stream
                            self._host_header,
                            self._path,
                            message_queue_size=_MESSAGE_QUEUE_SIZE,
                            max_message_size=_MAX_MESSAGE_SIZE,
                        )
                    link = _Link(ws, nursery.cancel_scope)
                    self._link = link
                    nursery.start_soon(self._reader, link)
                    nursery.start_soon(link.writer)
                    nursery.start_soon(link.keepalive)
                    await self._authenticate(link)
                    await self._resubscribe_all(link, nursery)
                    self._connections += 1
                    is_ready = True
                    self._set_state(ConnectionState.CONNECTED)
                    ready()
                    await link.lost.wait()
                    if self._closed:
                        # You are leaving: `open_relay_client` is finishing the closing
                        # handshake, which needs trio-websocket's reader; it cancels us after.
                        await trio.sleep_forever()
                    nursery.cancel_scope.cancel()
            except BaseException as exc:
                error = self._link_error(exc, link)
                if error is None:
                    raise
            else:
                assert link is not None and link.close is not None
                error = ConnectionLost("connection to the relay lost: " + link.close.reason,
                                       link.close.code)
        finally:
            if link is not None:
                link.mark_lost(CloseInfo(None, "connection closed"))
                if self._link is link:
                    self._link = None
                if is_ready:
                    self.last_close = link.close
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    await stream.aclose()
        terminal = isinstance(error, AuthFailed) or (
            isinstance(error, ConnectionLost) and error.close_code in TERMINAL_CLOSE_CODES
        )
        return _LinkEnd(error, is_ready, terminal)

    def _link_error(self, exc: BaseException, link: _Link | None) -> RelayClientError | None:
        """The client error a failed link stands for; None to re-raise ``exc`` (cancelled,
        or a bug)."""
        leaves = list(_leaves(exc))
        errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
        if not errors or any(not isinstance(leaf, Exception) for leaf in errors):
            return None
        first = errors[0]
        if isinstance(first, RelayClientError):
            return first
        if isinstance(first, _LinkLost):
            close = (link.close if link is not None else None) or CloseInfo(None, "")
            return ConnectionLost("connection to the relay lost: " + close.reason, close.code)
        if isinstance(first, trio.TooSlowError):
            return ConnectionLost("timed out opening the WebSocket connection")
        if isinstance(first, ConnectionRejected):
            return ConnectionLost(f"the relay refused the WebSocket handshake: HTTP "
                                  f"{first.status_code}")
        if isinstance(first, (HandshakeError, ConnectionClosed, trio.BrokenResourceError,
                              trio.ClosedResourceError, OSError,
                              wsproto.utilities.LocalProtocolError)):
            return ConnectionLost(f"connection to the relay failed: {first!r}")
        return None

    async def _link_request(
        self, link: _Link, fields: Frame, on_reply: Callable[[_Link, Frame], None] | None = None
    ) -> Frame:
        frame = {"id": self._next_id(), **fields}
        with trio.move_on_after(self._request_timeout):
            return await link.request(frame, on_reply)
        raise RequestTimeout(f"no reply to {fields['type']!r} within {self._request_timeout:g} s")

    async def _authenticate(self, link: _Link) -> None:
        # Once paired, the token: it outlives a change of PIN.
        token = self.device.token if self.device is not None else self._token
        fields: Frame = {"type": "auth"}
        if token is not None:
            fields["token"] = token
        else:
            fields["pin"] = self._pin
            if self._device_name is not None:
                fields["deviceName"] = self._device_name
        reply = await self._link_request(link, fields)
        kind = reply.get("type")
        if kind == "auth_success":
            data = reply.get("data")
            data = data if isinstance(data, dict) else {}
            projects, profiles = data.get("projects"), data.get("modelProfiles")
            self.projects = list(projects) if isinstance(projects, list) else []
            self.model_profiles = list(profiles) if isinstance(profiles, list) else []
            device = data.get("device")
            if isinstance(device, dict) and isinstance(device.get("id"), str):
                new_token = device.get("token")
                secret = new_token if isinstance(new_token, str) else token
                if secret is not None:
                    self.device = Device(str(device["id"]), str(device.get("name") or ""),
                                         secret)
            return
        if kind == "auth_failed":
            raise _auth_error(reply)
        raise _rejection(reply)

    async def _resubscribe_all(self, link: _Link, nursery: trio.Nursery) -> None:
        """Subscribe every live resource again, resuming where each left off.

        One at a time: the relay answers a connection's requests in order anyway, and this
        keeps a client with many subscriptions inside the relay's request burst.
        """
        for wire in list(self._wires.values()):
            if self._wires.get(wire.key) is not wire or not wire.consumers:
                continue
            if not await self._resubscribe(link, wire):
                nursery.start_soon(self._retry_resubscribe, link, wire)

    async def _resubscribe(self, link: _Link, wire: _Wire) -> bool:
        """One resubscription; False if refused for a reason worth retrying."""
        fields: Frame = {"type": "subscribe", **_target(wire.key)}
        if wire.seq is not None and wire.epoch is not None:
            fields["sinceSeq"] = wire.seq
            fields["epoch"] = wire.epoch
        retry = False

        def on_reply(link: _Link, reply: Frame) -> None:
            nonlocal retry
            key = wire.key
            if self._wires.get(key) is not wire:
                if reply.get("type") == "subscribed" and self._unwanted(key):
                    self._unsubscribe(link, key)
                return
            if reply.get("type") == "subscribed":
                self._apply_subscribed(link, wire, reply, None)
            elif reply.get("code") in _TRANSIENT_CODES:
                retry = True
            else:
                rejection = _rejection(reply)
                self._end_wire(wire, SubscriptionFailed(rejection.code, rejection.error))

        await self._link_request(link, fields, on_reply)
        return not retry

    async def _retry_resubscribe(self, link: _Link, wire: _Wire) -> None:
        for attempt in itertools.count():
            await trio.sleep(self._backoff.delay(attempt))
            if self._wires.get(wire.key) is not wire or wire.link is link or not link.alive:
                return  # gone, or made live by a newer subscribe meanwhile
            try:
                if await self._resubscribe(link, wire):
                    return
            except RequestTimeout:
                link.abort("no reply to a resubscription")
                return

    def _terminate(self, error: RelayClientError) -> None:
        self.error = error
        for wire in list(self._wires.values()):
            self._end_wire(wire, error)
        self._set_state(ConnectionState.CLOSED)

    def _close(self) -> None:
        """You left the client's block: everything still open ends."""
        self._closed = True
        closed = trio.ClosedResourceError("the relay client is closed")
        for wire in list(self._wires.values()):
            self._end_wire(wire, closed)
        self._set_state(ConnectionState.CLOSED)


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one real error of a group as itself (Cancelled aside)."""
    leaves = list(_leaves(group))
    errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)] or leaves
    if len(errors) == 1:
        raise errors[0] from errors[0].__cause__
    raise group


@asynccontextmanager
async def open_relay_client(
    url: str,
    *,
    pin: str | None = None,
    token: str | None = None,
    device_name: str | None = None,
    request_timeout: float = 10.0,
    backoff: Backoff | None = None,
    connect: Connect | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[RelayClient]:
    """Connect to the relay at ``url`` (``ws://`` or ``wss://``) for the duration of the block.

    Sign in with ``pin`` or with the ``token`` of a device paired before (exactly one). With
    ``pin`` and ``device_name`` the relay pairs this client as a device: ``client.device``
    then holds its id, name and token, and reconnects use the token.

    Entering connects and authenticates, raising `AuthFailed` (`TokenInvalid`, `LockedOut`
    with ``retry_after``), `ConnectionLost` (could not connect), `RequestTimeout` or
    `RequestRejected` if that first attempt fails. Afterwards the client reconnects by
    itself, with ``backoff``, and resumes every subscription; a refused sign-in, a revoked
    device (close 1008) or another 1008 close ends it for good instead.

    ``connect`` replaces opening the TCP (or TLS, with ``ssl_context`` or the system's
    defaults) connection: an async callable returning a connected trio Stream, for example
    over memory streams in tests. The client does the WebSocket handshake on it and closes it.
    Leaving the block closes the connection (1000) and ends every subscription.
    """
    client = RelayClient(  # a bad argument raises ValueError here, at once
        url, pin=pin, request_timeout=request_timeout, backoff=backoff or Backoff(),
        connect=connect, ssl_context=ssl_context, token=token, device_name=device_name,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._supervise)
            try:
                yield client
            finally:
                client._close()
                link = client._link
                if link is not None and link.alive:
                    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                        await link.ws.aclose(1000, "client closing")
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


# --- the mirror -------------------------------------------------------------------------------


class SyncedMirror:
    """The state of what you watch, kept current from pushes and resets (events folded in).

    All state is plain dicts and lists of the relay's JSON objects, readable at any time
    (between awaits it never changes):

    - ``projects``: the client's projects (refreshed on every reconnect).
    - ``model_profiles``: the model profiles (live if opened with ``model_profiles=True``).
    - ``chats[project_id]``: chat id → chat, for each watched project, in creation order.
    - ``messages[chat_id]``: the stored messages of each watched chat, oldest first.
    - ``streaming[chat_id]``: message id → the text streamed so far of each reply in
      progress; an entry goes when the reply's stored message (or an error) arrives. After
      a `Reset` during a reply, its text restarts from the next chunk.
    - ``agent_errors[chat_id]``: message id → error text of replies that failed.
    - ``failures``: (resource, id) → the `SubscriptionFailed` that ended a watch.

    ``version`` counts the changes applied; `wait_changed` and `wait_for` wait for more.
    A project's ``chat_deleted`` also stops watching that chat and drops its messages.
    """

    def __init__(self, client: RelayClient, nursery: trio.Nursery) -> None:
        self.client = client
        self.chats: dict[str, dict[str, JSON]] = {}
        self.messages: dict[str, list[JSON]] = {}
        self.streaming: dict[str, dict[str, str]] = {}
        self.agent_errors: dict[str, dict[str, str]] = {}
        self.failures: dict[_Key, SubscriptionFailed] = {}
        self.version = 0
        self._model_profiles: list[JSON] | None = None
        self._nursery = nursery
        self._watches: dict[_Key, trio.CancelScope] = {}
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def projects(self) -> list[JSON]:
        return self.client.projects

    @property
    def model_profiles(self) -> list[JSON]:
        if self._model_profiles is not None:
            return self._model_profiles
        return self.client.model_profiles

    @property
    def watching(self) -> set[_Key]:
        """The (resource, id) pairs watched now."""
        return set(self._watches)

    # --- watching ---------------------------------------------------------------------------

    async def watch_project(self, project_id: str) -> None:
        """Watch a project's chats; returns once ``chats[project_id]`` holds its snapshot."""
        await self._watch(("project", project_id))

    async def watch_chat(self, chat_id: str) -> None:
        """Watch a chat; returns once ``messages[chat_id]`` holds its history."""
        await self._watch(("chat", chat_id))

    async def watch_model_profiles(self) -> None:
        await self._watch(("modelProfiles", ""))

    def unwatch_project(self, project_id: str) -> None:
        """Stop watching; the project's chats are dropped."""
        self._unwatch(("project", project_id))
        self.chats.pop(project_id, None)
        self._changed()

    def unwatch_chat(self, chat_id: str) -> None:
        """Stop watching; the chat's messages are dropped."""
        self._unwatch(("chat", chat_id))
        self._drop_chat(chat_id)
        self._changed()

    async def _watch(self, key: _Key) -> None:
        if key in self._watches:
            await trio.lowlevel.checkpoint()
            return
        self.failures.pop(key, None)
        await self._nursery.start(self._follow, key)

    def _unwatch(self, key: _Key) -> None:
        scope = self._watches.pop(key, None)
        if scope is not None:
            scope.cancel()

    async def _follow(self, key: _Key, *, task_status: trio.TaskStatus[None]) -> None:
        scope = trio.CancelScope()
        with scope:
            self._watches[key] = scope
            try:
                async with self.client.subscribe(*key) as subscription:
                    self._apply_snapshot(key, subscription.snapshot)
                    task_status.started()
                    async for event in subscription:
                        self._apply(key, event)
            except SubscriptionFailed as exc:
                self.failures[key] = exc
                self._changed()
            except trio.ClosedResourceError:
                pass  # the client is closing
            finally:
                if self._watches.get(key) is scope:
                    del self._watches[key]

    # --- folding events in ------------------------------------------------------------------

    def _apply_snapshot(self, key: _Key, items: list[JSON]) -> None:
        resource, resource_id = key
        if resource == "project":
            self.chats[resource_id] = {
                chat["id"]: chat for chat in items
                if isinstance(chat, dict) and isinstance(chat.get("id"), str)
            }
        elif resource == "chat":
            self.messages[resource_id] = [m for m in items if isinstance(m, dict)]
            self.streaming[resource_id] = {}
            self.agent_errors.setdefault(resource_id, {})
        else:
            self._model_profiles = list(items)
        self._changed()

    def _apply(self, key: _Key, event: Event) -> None:
        resource_id = key[1]
        if isinstance(event, Reset):
            self._apply_snapshot(key, event.snapshot)
            return
        if isinstance(event, MessageAdded):
            self._add_message(resource_id, event.message)
        elif isinstance(event, ReplyStarted):
            self.streaming.setdefault(resource_id, {})[event.message_id] = ""
        elif isinstance(event, Chunk):
            streams = self.streaming.setdefault(resource_id, {})
            streams[event.message_id] = streams.get(event.message_id, "") + event.text
        elif isinstance(event, AgentError):
            if event.message_id is not None:
                self.streaming.get(resource_id, {}).pop(event.message_id, None)
                self.agent_errors.setdefault(resource_id, {})[event.message_id] = event.error
        elif isinstance(event, ReplyCancelled):
            streams = self.streaming.get(resource_id, {})
            if event.message_id is not None:
                streams.pop(event.message_id, None)
            else:  # a backend that does not say which: the chat runs one reply at a time
                streams.clear()
        elif isinstance(event, (ChatCreated, ChatRenamed)):
            chat_id = event.chat.get("id")
            if isinstance(chat_id, str):
                self.chats.setdefault(resource_id, {})[chat_id] = event.chat
        elif isinstance(event, ChatDeleted):
            self.chats.get(resource_id, {}).pop(event.chat_id, None)
            if ("chat", event.chat_id) in self._watches:
                self._unwatch(("chat", event.chat_id))
                self._drop_chat(event.chat_id)
        elif isinstance(event, ModelProfilesChanged):
            self._model_profiles = list(event.profiles)
        self._changed()

    def _add_message(self, chat_id: str, message: JSON) -> None:
        messages = self.messages.setdefault(chat_id, [])
        message_id = message.get("id")
        for index, existing in enumerate(messages):
            if message_id is not None and existing.get("id") == message_id:
                messages[index] = message
                break
        else:
            messages.append(message)
        if isinstance(message_id, str):
            self.streaming.get(chat_id, {}).pop(message_id, None)

    def _drop_chat(self, chat_id: str) -> None:
        self.messages.pop(chat_id, None)
        self.streaming.pop(chat_id, None)
        self.agent_errors.pop(chat_id, None)

    def _changed(self) -> None:
        self.version += 1
        self._lot.unpark_all()

    # --- waiting ----------------------------------------------------------------------------

    async def wait_changed(self, after: int | None = None) -> int:
        """Wait until ``version`` is past ``after`` (default: the current one); return it."""
        after = self.version if after is None else after
        while self.version <= after:
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        return self.version

    async def wait_for(self, predicate: Callable[[SyncedMirror], object]) -> None:
        """Wait until ``predicate(mirror)`` is true (checked now and after every change)."""
        while not predicate(self):
            await self._lot.park()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_mirror(
    client: RelayClient,
    *,
    project_ids: Iterable[str] = (),
    chat_ids: Iterable[str] = (),
    model_profiles: bool = False,
) -> AsyncIterator[SyncedMirror]:
    """A `SyncedMirror` watching the given projects and chats (and the model profiles) for
    the duration of the block; more can be watched with its ``watch_*`` methods.

    Entering returns once every initial snapshot is in. A watch the relay ends with an error
    is recorded in ``failures``; the client's terminal error (`ConnectionLost`, `AuthFailed`)
    ends the block and is raised from it.
    """
    try:
        async with trio.open_nursery() as nursery:
            mirror = SyncedMirror(client, nursery)
            for project_id in project_ids:
                await mirror.watch_project(project_id)
            for chat_id in chat_ids:
                await mirror.watch_chat(chat_id)
            if model_profiles:
                await mirror.watch_model_profiles()
            try:
                yield mirror
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)
