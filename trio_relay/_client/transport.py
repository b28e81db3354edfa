"""One WebSocket connection to the relay (a *link*), over trio-websocket.

A link writes the frames the session queues (through one writer task, so a request cancelled
half way never leaves half a frame on the wire), pings the relay, and reads every message into
the session, in wire order. It knows nothing of subscriptions: that is `ClientSession`.
"""

from __future__ import annotations

import math
import ssl
from typing import Final

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

from .._errors import leaves
from .errors import ConnectionLost, RelayClientError
from .session import Abort, ClientSession, Frame, Pending, Purpose, Send

__all__ = ["CLOSE_TIMEOUT", "CloseInfo", "Link", "LinkLost", "link_error", "open_stream"]

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
CLOSE_TIMEOUT: Final = 2.0


@attrs.frozen
class CloseInfo:
    """How a connection ended: the close code (None: no close frame) and reason."""

    code: int | None
    reason: str


class LinkLost(Exception):
    """Internal: the link a request was sent on went away before the reply."""


async def open_stream(
    hostname: str, port: int, tls: bool, ssl_context: ssl.SSLContext | None
) -> trio.abc.Stream:
    """A TCP (or, with ``tls``, TLS) connection to the relay."""
    tcp = await trio.open_tcp_stream(hostname, port)
    if not tls:
        return tcp
    context = ssl_context or ssl.create_default_context()
    stream = trio.SSLStream(tcp, context, server_hostname=hostname, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


class Link:
    """One WebSocket connection, live inside the nursery that runs its tasks."""

    def __init__(
        self, ws: WebSocketConnection, cancel_scope: trio.CancelScope, session: ClientSession
    ) -> None:
        self.ws = ws
        self.cancel_scope = cancel_scope
        self.session = session
        self.number = session.connection_made()
        self.lost = trio.Event()
        self.close: CloseInfo | None = None
        self._out_send, self._out_receive = trio.open_memory_channel[str](math.inf)
        self._sending = False
        self._drained = trio.Event()

    @classmethod
    async def open(
        cls, nursery: trio.Nursery, stream: trio.abc.Stream, host: str, path: str,
        session: ClientSession,
    ) -> Link:
        """The WebSocket handshake on ``stream``; trio-websocket's reader runs in ``nursery``,
        and so do the link's own tasks (its reader, writer and keepalive)."""
        ws = await wrap_client_stream(
            nursery,
            stream,  # type: ignore[arg-type]  # hinted as sockets; any Stream
            host,
            path,
            message_queue_size=_MESSAGE_QUEUE_SIZE,
            max_message_size=_MAX_MESSAGE_SIZE,
        )
        link = cls(ws, nursery.cancel_scope, session)
        nursery.start_soon(link._reader)
        nursery.start_soon(link._writer)
        nursery.start_soon(link._keepalive)
        return link

    @property
    def alive(self) -> bool:
        return not self.lost.is_set()

    def flush(self) -> None:
        """Carry out what the session asked for; call after every change to the session."""
        for action in self.session.take_actions():
            if isinstance(action, Send):
                try:
                    self._out_send.send_nowait(action.text)
                except trio.ClosedResourceError:
                    pass  # lost meanwhile: the session has woken its pending requests
            elif isinstance(action, Abort):
                self.abort(action.reason)

    async def request(self, fields: Frame, purpose: Purpose = None) -> Frame:
        """Send a request on this link and wait for its reply (an ``error`` reply too)."""
        if not self.alive:
            raise LinkLost
        done = trio.Event()
        pending: Pending = self.session.request(fields, purpose, done.set)
        self.flush()
        # If cancelled here the session keeps the request until its reply, so that a late
        # reply still does its part (a late `subscribed` must be adopted or undone).
        await done.wait()
        if pending.reply is None:
            raise LinkLost
        return pending.reply

    def mark_lost(self, close: CloseInfo) -> None:
        if self.lost.is_set():
            return
        self.close = close
        self.lost.set()
        self._drained.set()
        self._out_send.close()
        self.session.connection_lost(self.number)

    def abort(self, reason: str) -> None:
        """Drop the connection from our side (a protocol anomaly); the client reconnects."""
        self.mark_lost(CloseInfo(None, reason))
        self.cancel_scope.cancel()

    async def _reader(self) -> None:
        try:
            while self.alive:
                self.session.receive(await self.ws.get_message())
                self.flush()
        except ConnectionClosed as exc:
            reason = exc.reason
            self.mark_lost(
                CloseInfo(int(reason.code), reason.reason or reason.name)
                if reason is not None else CloseInfo(1006, "connection lost")
            )

    async def _keepalive(self) -> None:
        while self.alive:
            await trio.sleep(_PING_INTERVAL)
            with trio.move_on_after(_PING_TIMEOUT) as waiting:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return  # the reader reports it
            if waiting.cancelled_caught:
                self.abort(f"no answer to a ping within {_PING_TIMEOUT:g} s")

    async def drain(self) -> None:
        """Wait until every frame queued so far is written (or the link is lost)."""
        while self.alive and (self._sending or self._out_receive.statistics().current_buffer_used):
            self._drained = trio.Event()
            await self._drained.wait()

    async def _writer(self) -> None:
        try:
            async for text in self._out_receive:
                self._sending = True
                try:
                    await self.ws.send_message(text)
                except ConnectionClosed:
                    return  # the reader sees the close and reports it
                finally:
                    self._sending = False
                    self._drained.set()
        finally:
            self._drained.set()


def link_error(exc: BaseException, link: Link | None) -> RelayClientError | None:
    """The client error a failed link stands for; None to re-raise ``exc`` (cancelled, or a
    bug)."""
    errors = [leaf for leaf in leaves(exc) if not isinstance(leaf, trio.Cancelled)]
    if not errors or any(not isinstance(leaf, Exception) for leaf in errors):
        return None
    first = errors[0]
    if isinstance(first, RelayClientError):
        return first
    if isinstance(first, LinkLost):
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
