"""The server's edge: every accepted stream, from its first byte to the WebSocket handshake.

Each stream is read here with h11, once: plain HTTP requests (the web client, ``/healthz``,
``/metrics``) are answered by `trio_relay._server.http.route`, as many as the client makes on a
kept-alive connection; a WebSocket upgrade is checked (RFC 6455 4.2.1, then the relay's own
rules: the per-address cap and the origin allowlist) and either refused with an HTTP status or
accepted with a ``101`` written by h11. The bytes after the request head go to wsproto's
`Connection`, and the open WebSocket (`trio_relay._server.websocket.ServerWebSocket`) is handed to
the relay.

Nothing that goes wrong with one stream reaches the others: bad input gets the standard HTTP
answer and a log line, a stream that stalls is dropped after ``handshake_timeout``, and the
stream is always closed on the way out.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

import attrs
import h11
import trio
from loguru import logger
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.utilities import generate_accept_token

from .._config import RelayConfig
from .counters import RelayCounters
from .http import COMMON_HEADERS, HttpResponse, MetricsView, WebFiles, route, text_response
from .websocket import ServerWebSocket

if TYPE_CHECKING:
    from loguru import Logger

__all__ = ["Edge", "MAX_HEAD", "check_upgrade", "peer_of", "refusal"]

#: Longest request head read; a longer one is answered 431.
MAX_HEAD: Final = 16 * 1024
#: Requests answered on one kept-alive connection before it is closed.
MAX_REQUESTS_PER_CONNECTION: Final = 100


@attrs.frozen
class _Upgrade:
    """A request to open a WebSocket, read and not yet answered."""

    target: str
    headers: Mapping[str, str]  # lower-case names
    conn: h11.Connection


def check_upgrade(method: bytes, http_version: bytes, headers: Mapping[str, str]) -> \
        HttpResponse | None:
    """The refusal an upgrade request earns by RFC 6455 (section 4.2.1), or None if valid."""
    if method != b"GET" or http_version != b"1.1":
        return text_response(400, "bad request: a WebSocket upgrade is a GET over HTTP/1.1\n")
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    if "upgrade" not in connection:
        return text_response(400, "bad request: Connection must include Upgrade\n")
    try:
        key = base64.b64decode(headers.get("sec-websocket-key", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        return text_response(400, "bad request: Sec-WebSocket-Key must be 16 bytes in base64\n")
    if headers.get("sec-websocket-version", "").strip() != "13":
        return text_response(426, "WebSocket version 13 only\n",
                             ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"))
    return None


def refusal(headers: Mapping[str, str], config: RelayConfig, from_address: int) -> \
        HttpResponse | None:
    """The relay's own rules for a valid upgrade request: the refusal, or None to accept."""
    if from_address > config.max_connections_per_address:
        return text_response(429, "too many connections from this address")
    origin = headers.get("origin")
    if origin is not None and not _origin_allowed(
        origin, headers.get("host", ""), config.allowed_origins
    ):
        # A browser page from another site: refused before any frame, so a hostile page
        # cannot ride on the user's network position (cross-site WebSocket hijacking).
        return text_response(403, "origin not allowed")
    return None


def _origin_allowed(origin: str, host: str, allowed: tuple[str, ...]) -> bool:
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in (a.rstrip("/").lower() for a in allowed):
        return True
    # The relay's own pages: an origin whose host[:port] is the one the client connected to.
    _, _, origin_host = origin.partition("://")
    return bool(host) and origin_host == host.strip().lower()


def peer_of(stream: trio.abc.Stream) -> str:
    """``host:port`` of the client, through TLS if need be; in-memory streams may name one."""
    named = getattr(stream, "peer", None)
    if isinstance(named, str):
        return named
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(transport, trio.SocketStream):
        try:
            host, port = transport.socket.getpeername()[:2]
        except OSError:  # already reset by the peer
            return "unknown"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "memory"


class Edge:
    """Takes each accepted stream through HTTP to an open WebSocket, then hands it on."""

    def __init__(
        self,
        config: RelayConfig,
        counters: RelayCounters,
        *,
        web: WebFiles | None,
        metrics: Callable[[], MetricsView],
        serve_websocket: Callable[[ServerWebSocket, str], Awaitable[None]],
    ) -> None:
        self._config = config
        self._counters = counters
        self._web = web
        self._metrics = metrics
        self._serve_websocket = serve_websocket
        #: Open streams per client address (the per-address cap counts them all).
        self.per_address: dict[str, int] = {}
        self._handshakes: set[trio.CancelScope] = set()
        self._closing = False

    def shutdown(self) -> None:
        """Drop streams still in their handshake, or idle between plain HTTP requests, at
        once (only WebSocket clients get a grace period), and accept no more upgrades."""
        self._closing = True
        for scope in list(self._handshakes):
            scope.cancel()

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """One accepted stream, start to end (a handler for `trio.serve_listeners`)."""
        peer = peer_of(stream)
        address = peer.rpartition(":")[0] or peer
        self.per_address[address] = self.per_address.get(address, 0) + 1
        try:
            socket = await self._open_websocket(stream, peer, address)
            if socket is None:
                return
            self._counters.connections_accepted += 1
            await self._serve_websocket(socket, peer)
        except Exception as exc:  # including groups; Cancelled and KeyboardInterrupt pass
            logger.bind(peer=peer).opt(exception=exc).error("connection failed")
        finally:
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]
            with trio.CancelScope(shield=True):
                await _close(stream, self._config.close_timeout)

    async def _open_websocket(
        self, stream: trio.abc.Stream, peer: str, address: str
    ) -> ServerWebSocket | None:
        """Plain HTTP requests, then the handshake, under ``handshake_timeout``: the open
        WebSocket, or None. (Its own frame: what it needed is freed before the WebSocket is
        served, rather than kept for the connection's life.)"""
        log = logger.bind(peer=peer)
        with trio.move_on_after(self._config.handshake_timeout) as handshake:
            self._handshakes.add(handshake)
            if self._closing:
                handshake.cancel()
            try:
                return await self._handshake(stream, address, handshake, log)
            finally:
                self._handshakes.discard(handshake)
        self._counters.handshakes_failed += 1
        log.debug("dropped: no request or upgrade within the handshake timeout")
        return None

    async def _handshake(
        self, stream: trio.abc.Stream, address: str, deadline: trio.CancelScope,
        log: Logger,
    ) -> ServerWebSocket | None:
        upgrade = await self._serve_http(stream, deadline, log)
        if upgrade is None:
            return None
        answer = refusal(upgrade.headers, self._config, self.per_address[address])
        if answer is not None:
            self._counters.handshakes_failed += 1
            log.warning("handshake refused: {} {}", answer.status, answer.body.decode().strip())
            await _send(stream, upgrade.conn, "GET", answer, close=True)
            return None
        key = upgrade.headers["sec-websocket-key"].strip().encode("ascii")
        data = upgrade.conn.send(h11.InformationalResponse(status_code=101, headers=[
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", generate_accept_token(key)),
        ]))
        try:
            await stream.send_all(data or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        config = self._config
        return ServerWebSocket(
            stream,
            WSConnection(ConnectionType.SERVER, trailing_data=upgrade.conn.trailing_data[0]),
            max_message_size=config.max_message_size,
            max_backlog=config.outbound_queue_size,
            close_timeout=config.close_timeout,
            write_at_once=config.direct_writes,
        )

    async def _serve_http(
        self, stream: trio.abc.Stream, deadline: trio.CancelScope,
        log: Logger,
    ) -> _Upgrade | None:
        """Answer plain HTTP requests until the client asks for a valid WebSocket upgrade
        (returned), closes, or breaks the protocol (None).

        ``deadline`` bounds the wait for each request: it is moved ``handshake_timeout``
        ahead after every answer, so an idle kept-alive connection is dropped.
        """
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        for answered in range(MAX_REQUESTS_PER_CONNECTION):
            received = 0  # bytes of this request's head
            try:
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    # Fed as it arrives, so h11 refuses garbage (a TLS hello, binary) at once.
                    try:
                        data = await stream.receive_some(MAX_HEAD)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        if not answered and not received:
                            # Nothing was read: on TLS, a failed handshake (plain HTTP or
                            # garbage on the TLS port); else a reset before the first byte.
                            self._counters.handshakes_failed += 1
                            log.info("dropped before a request: {}", exc.__cause__ or exc)
                        return None
                    received += len(data)
                    conn.receive_data(bytes(data))  # b"": the client closed
                    event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._refuse(stream, log, status, "request head too large\n"
                                   if status == 431 else "bad request\n", exc)
                return None
            if not isinstance(event, h11.Request):  # the client closed between requests
                return None
            # h11 bounds only a head still incomplete; one that arrived whole in one read
            # may be longer.
            if received - len(conn.trailing_data[0]) > MAX_HEAD:
                await self._refuse(stream, log, 431, "request head too large\n")
                return None
            if event.http_version not in (b"1.0", b"1.1"):
                await self._refuse(stream, log, 505, "HTTP/1.1 only\n")
                return None
            headers = {name.decode("latin-1"): value.decode("latin-1")
                       for name, value in event.headers}
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("latin-1")
            if "websocket" in (token.strip().lower()
                               for token in headers.get("upgrade", "").split(",")):
                invalid = check_upgrade(event.method, event.http_version, headers)
                if invalid is None:
                    return _Upgrade(target, headers, conn)
                self._counters.handshakes_failed += 1
                log.info("bad upgrade request: {} {}", invalid.status,
                         invalid.body.decode().strip())
                await _send(stream, conn, method, invalid, close=True)
                return None
            try:
                has_body = not isinstance(conn.next_event(), h11.EndOfMessage)
            except h11.RemoteProtocolError as exc:  # a body that does not even parse
                await self._refuse(stream, log, 400, "bad request\n", exc)
                return None
            response = (
                text_response(413, "request bodies are not accepted\n") if has_body
                else route(method, target, headers, web=self._web, metrics=self._metrics)
            )
            log.debug("HTTP {} {} {}", method, target.partition("?")[0], response.status)
            # The last answer on this connection says so, for a client that pipelined more.
            last = has_body or answered == MAX_REQUESTS_PER_CONNECTION - 1
            if not await _send(stream, conn, method, response, close=last):
                return None
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return None  # the client asked to close, or sent a body we did not read
            conn.start_next_cycle()
            deadline.deadline = trio.current_time() + self._config.handshake_timeout
        return None

    async def _refuse(
        self, stream: trio.abc.Stream, log: Logger, status: int, text: str,
        why: Exception | None = None,
    ) -> None:
        """Answer a request that could not be read (counted and logged), then close."""
        self._counters.handshakes_failed += 1
        log.info("bad HTTP request: {} {}", status, why if why is not None else text.strip())
        await _send_error(stream, status, text)


async def _send(
    stream: trio.abc.Stream, conn: h11.Connection, method: str, response: HttpResponse,
    *, close: bool = False,
) -> bool:
    headers = [*COMMON_HEADERS, *response.headers]
    if response.status != 304:
        headers.append(("Content-Length", str(len(response.body))))
    if close:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(
        status_code=response.status, headers=headers,
        reason=HTTPStatus(response.status).phrase.encode(),
    )) or b""
    if method != "HEAD" and response.body:
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _send_error(stream: trio.abc.Stream, status: int, text: str) -> None:
    """Answer a request that could not be read, then close; written by hand, since h11 answers
    only requests it has parsed."""
    body = text.encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            *(f"{name}: {value}" for name, value in COMMON_HEADERS),
            "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
            "Connection: close"]
    try:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _close(stream: trio.abc.Stream, grace: float) -> None:
    """Close the stream, at most ``grace`` seconds for a graceful close (TLS close_notify)."""
    with trio.move_on_after(grace) as scope:
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)
