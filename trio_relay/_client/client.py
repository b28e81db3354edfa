"""The Trio client: its public face, and the loop that keeps it connected.

    open_relay_client nursery ......................... the client's lifetime
    └── supervisor                                      connects, reconnects with backoff
        └── link nursery (one per connection: Connector.run)
            ├── trio-websocket's reader                 bytes in, pings answered
            ├── reader                                  feeds every frame to the session
            ├── writer                                  the only task that writes frames
            ├── keepalive                               pings; no pong in time: reconnect
            └── resubscription retries*                 transient refusals, with backoff

What the client knows (subscriptions, their ``seq`` and ``epoch``, pending requests, what to
resubscribe after a reconnect, how to sign in) is a sans-IO `ClientSession`; a `Link`
(`transport.py`) is one WebSocket connection that feeds it, and the `Connector`
(`connector.py`) brings each one up (sign in, resubscribe). This module waits: for a
connection, for replies, and between reconnection attempts (the backoff policy).
"""

from __future__ import annotations

import copy
import ssl
import sys
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, NoReturn
from urllib.parse import urlsplit

import trio

from .._errors import raise_single
from .connector import Connect, Connector
from .errors import (
    AuthFailed,
    ConnectionLost,
    RelayClientError,
    RequestRejected,
    RequestTimeout,
    rejection,
)
from .events import JSON, key_of
from .session import (
    ClientSession,
    Device,
    Frame,
    Join,
    Purpose,
    Resnapshot,
)
from .state import Backoff, ClientStatistics, ConnectionState, StateWatcher
from .subscription import Subscription
from .transport import CLOSE_TIMEOUT, CloseInfo, Link, LinkLost, open_stream

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DEFAULT_BUFFER",
    "TERMINAL_CLOSE_CODES",
    "Backoff",
    "ClientStatistics",
    "Connect",
    "ConnectionState",
    "RelayClient",
    "Subscription",
    "open_relay_client",
]

#: Events a subscription holds for a consumer that has not read them yet; past this it is
#: given a fresh snapshot (a `Reset`) instead, so a stalled consumer costs bounded memory.
DEFAULT_BUFFER: Final = 4096
#: Close codes after which reconnecting cannot help: the relay has judged this client
#: (auth timeout, PIN lockout, abuse). Every other close, and no close frame at all, reconnects.
TERMINAL_CLOSE_CODES: Final = frozenset({1008})
_SLOW_CONSUMER: Final = 1013


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
        self._session = ClientSession(pin=pin, token=token, device_name=device_name)
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
        host_header = parts.netloc.rpartition("@")[2]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._request_timeout = request_timeout
        self._backoff = backoff
        self._ssl_context = ssl_context
        self._connector = Connector(
            self._session, connect=connect or self._open_transport, host=host_header,
            path=path, timeout=request_timeout, backoff=backoff,
        )
        self.state = ConnectionState.CONNECTING
        #: The terminal error once ``state`` is CLOSED by the relay (None if you closed it).
        self.error: RelayClientError | None = None
        self._state_lot = trio.lowlevel.ParkingLot()
        self._watchers: weakref.WeakSet[StateWatcher] = weakref.WeakSet()
        self._closed = False

    def __repr__(self) -> str:
        return f"<RelayClient {self.url} {self.state.value}>"

    @property
    def last_close(self) -> CloseInfo | None:
        """How the last connection ended, for UIs (None while the first one lives)."""
        return self._connector.last_close

    @property
    def _link(self) -> Link | None:
        return self._connector.link

    @property
    def device(self) -> Device | None:
        """This client as a paired device, once signed in with a token, or with the PIN and
        a ``device_name`` (then it reconnects with the token it got); None otherwise."""
        return self._session.device

    @property
    def projects(self) -> list[JSON]:
        """The projects sent on authenticating (refreshed on reconnect)."""
        return self._session.projects

    @property
    def model_profiles(self) -> list[JSON]:
        """The model profiles sent on authenticating (refreshed on reconnect)."""
        return self._session.model_profiles

    # --- state ------------------------------------------------------------------------------

    def state_changes(self) -> AsyncIterator[ConnectionState]:
        """The current state, then each change; ends after CLOSED.

        Each iterator keeps the last 64 changes it has not yielded yet.
        """
        watcher = StateWatcher(self.state)
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
        session = self._session
        return ClientStatistics(
            state=self.state,
            connection_attempts=self._connector.attempts,
            connections=self._connector.connections,
            subscriptions=len(session.inboxes),
            resources=len(session.wires),
            pending_requests=len(session.pending),
            buffered_events=sum(len(inbox.queue) for inbox in session.inboxes),
        )

    # --- requests ---------------------------------------------------------------------------

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the agent's reply running in a chat; True if one was running. Its
        subscribers get `ReplyCancelled`."""
        reply = await self._request({"type": "cancel", "resourceId": chat_id}, retry=False)
        data = self._expect_data(reply)
        return bool(isinstance(data, dict) and data.get("cancelled"))

    async def send(self, chat_id: str, message: JSON, *, nonce: str | None = None) -> None:
        """Send a message to a chat; returns once the backend accepted it.

        The message and the agent's answer arrive through the chat's subscription. It goes
        with a ``clientNonce`` (``nonce``, else a fresh random one), so that after a lost
        connection it is sent again on the next one and the relay stores it once.
        """
        fields: Frame = {
            "type": "send", "resourceId": chat_id, "message": message,
            "clientNonce": nonce or uuid.uuid4().hex,
        }
        reply = await self._request(fields, retry=True)
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
        raise rejection(reply)

    async def _request(
        self, fields: Frame, *, retry: bool, purpose: Purpose = None
    ) -> Frame:
        """Send a request once connected and return its reply (an ``error`` reply too).

        Within ``request_timeout`` overall: waiting for a connection, then for the reply. With
        ``retry`` (idempotent requests) a request whose connection drops is sent again on the
        next one. ``purpose`` says what the session makes of the reply.
        """
        deadline = trio.current_time() + self._request_timeout
        while True:
            link: Link | None = None
            with trio.move_on_at(deadline):
                link = await self._connected_link()
            if link is None:
                raise ConnectionLost(
                    f"not connected to the relay within {self._request_timeout:g} s",
                    self.last_close.code if self.last_close else None,
                )
            try:
                with trio.move_on_at(deadline):
                    return await link.request(fields, purpose)
                raise RequestTimeout(
                    f"no reply to {fields['type']!r} within {self._request_timeout:g} s"
                )
            except LinkLost:
                if self.state is ConnectionState.CLOSED:
                    self._raise_closed()
                if not retry:
                    close = link.close or CloseInfo(None, "connection lost")
                    raise ConnectionLost(
                        f"connection lost before the reply to {fields['type']!r}"
                        + (f": {close.reason}" if close.reason else ""),
                        close.code,
                    ) from None

    async def _connected_link(self) -> Link:
        while True:
            if self.state is ConnectionState.CLOSED:
                self._raise_closed()
            link = self._link
            if self.state is ConnectionState.CONNECTED and link is not None and link.alive:
                await trio.lowlevel.checkpoint()
                return link
            await self._state_lot.park()

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
        key = key_of(resource, resource_id)
        if self.state is ConnectionState.CLOSED:
            self._raise_closed()
        subscription = Subscription(self._resnapshot, key, buffer)
        inbox = subscription._inbox
        self._session.open(inbox)
        try:
            try:
                reply = await self._request(
                    ClientSession.subscribe_fields(key), retry=True, purpose=Join(inbox)
                )
            finally:
                self._session.opened(inbox)
            if reply.get("type") != "subscribed":
                raise rejection(reply)
        except BaseException:
            self._detach(subscription)
            raise
        try:
            yield subscription
        finally:
            self._detach(subscription)

    def _detach(self, subscription: Subscription) -> None:
        self._session.detach(subscription._inbox)
        self._flush()

    def _flush(self) -> None:
        link = self._link
        if link is not None:
            link.flush()
        else:
            self._session.take_actions()  # nothing is sent without a live connection

    async def _resnapshot(self, subscription: Subscription) -> None:
        """A consumer fell behind its buffer: get it a fresh snapshot, delivered as `Reset`."""
        inbox = subscription._inbox
        reply = await self._request(
            ClientSession.subscribe_fields(inbox.key), retry=True,
            purpose=Resnapshot(inbox),
        )
        if reply.get("type") != "subscribed":
            raise rejection(reply)

    # --- connecting -------------------------------------------------------------------------

    async def _open_transport(self) -> trio.abc.Stream:
        return await open_stream(self._hostname, self._port, self._tls, self._ssl_context)

    async def _supervise(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Connect; on every loss reconnect with backoff, until terminal or cancelled."""
        attempt = 0
        started = False

        def ready() -> None:
            nonlocal started
            self._set_state(ConnectionState.CONNECTED)
            if not started:
                started = True
                task_status.started()

        while not self._closed:
            end = await self._connector.run(ready, lambda: self._closed)
            if not started:
                raise end.error  # the first connection failed: `open_relay_client` raises
            if end.ready:
                attempt = 0
            if isinstance(end.error, AuthFailed) or (
                isinstance(end.error, ConnectionLost)
                and end.error.close_code in TERMINAL_CLOSE_CODES
            ):
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
                self._session.forget_positions()
            self._set_state(ConnectionState.RECONNECTING)
            await trio.sleep(self._backoff.delay(attempt))
            attempt += 1

    def _terminate(self, error: RelayClientError) -> None:
        self.error = error
        self._session.end_all(error)
        self._set_state(ConnectionState.CLOSED)

    def _close(self) -> None:
        """You left the client's block: everything still open ends."""
        self._closed = True
        self._session.end_all(trio.ClosedResourceError("the relay client is closed"))
        self._set_state(ConnectionState.CLOSED)


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
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                        # The unsubscribes just queued go first: without them the relay
                        # takes the close for a drop and keeps the resources for a return.
                        await link.drain()
                        await link.ws.aclose(1000, "client closing")
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)

