"""`open_relay`: the relay as an object that owns a nursery, for embedding in a Trio program.

    open_relay nursery ........................ the relay's lifetime
    ├── broadcaster (own cancel scope)*        one per watched resource
    ├── serve (own cancel scope)*              accepts connections; cancelled first on exit
    └── connections nursery
        └── connection nursery*                see trio_relay._connection

Leaving ``async with open_relay(...)`` stops accepting, closes every client with 1001 (within
``shutdown_timeout``), then cancels the broadcasters, whose feeds close on the way out.
"""

from __future__ import annotations

import inspect
import math
import ssl
import sys
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final, NoReturn

import attrs
import trio
from loguru import logger
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ._backend import Backend, Feed, Snapshot
from ._broadcaster import Broadcaster, Push, StreamHistory, SubscribeFailed, Subscriber, Synced
from ._config import CloseCode, RelayConfig, RelayStatistics
from ._connection import Connection
from ._direct import check_internals, nonblocking_sender
from ._http import MetricsView, WebFiles, serve_http
from ._limits import PinGuard
from ._pairing import DeviceStore
from ._protocol import JSON, RESOURCES, ErrorCode, ResourceKey
from ._transport import OwnedStream

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "ListenerOverflow",
    "Relay",
    "RelayError",
    "SubscriptionError",
    "Update",
    "UpstreamError",
    "open_relay",
]

# trio-websocket's default of 1 would stop its reader (and so pong replies) whenever one
# request is being handled; a small queue keeps pings flowing while bounding memory.
_MESSAGE_QUEUE_SIZE: Final = 8
# Close codes wsproto reports for frames it cannot parse, which trio-websocket then fails to
# send: the relay sends them itself.
_OWED_CLOSES: Final = frozenset({CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_PAYLOAD})


class RelayError(Exception):
    """Base of the errors the relay raises to the embedding application."""


class SubscriptionError(RelayError):
    """`Relay.listen` could not subscribe; ``code`` is the wire error code."""

    def __init__(self, code: str, error: str) -> None:
        super().__init__(error)
        self.code = code


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


class _ListenerSubscriber:
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
        subscriber: _ListenerSubscriber,
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


class Relay:
    """A running relay; get one from `open_relay`."""

    def __init__(
        self,
        backend: Backend,
        *,
        pin: str | None,
        config: RelayConfig,
        nursery: trio.Nursery,
        connections_nursery: trio.Nursery,
        devices: DeviceStore | None = None,
    ) -> None:
        self.backend = backend
        #: The paired devices (`trio_relay.DeviceStore`); revoke with `revoke_device`.
        self.devices = devices if devices is not None else DeviceStore()
        if not (pin or self.devices.pin):
            raise ValueError("pin must not be empty")
        self._pin = pin
        # Backends written before senders existed take no ``sender``: asked once, here.
        self._sender_accepted = _accepts_sender(backend.send_message)
        self.config = config
        self.pin_guard = PinGuard(config)
        self._nursery = nursery
        self._connections_nursery = connections_nursery
        self._connections: set[Connection] = set()
        self._per_address: dict[str, int] = {}  # open streams per client address
        self._broadcasters: dict[ResourceKey, Broadcaster] = {}
        # Histories whose broadcaster ended, with the time they are forgotten (resume_grace).
        self._kept: dict[ResourceKey, tuple[StreamHistory, float]] = {}
        self._kept_changed = trio.Event()
        self._serve_scopes: set[trio.CancelScope] = set()
        self._handshakes: set[trio.CancelScope] = set()
        # When each connection's auth deadline falls, and when it is pinged next, in order:
        # every connection has the same timeout and interval, so appending keeps them sorted
        # (see `_run_timers`).
        self._auth_deadlines: deque[tuple[float, weakref.ref[Connection]]] = deque()
        self._pings: deque[tuple[float, weakref.ref[Connection]]] = deque()
        self._timers_wait = trio.CancelScope()
        self._listeners = 0
        self._closing = False
        self._started_at = trio.current_time()
        self.counters: dict[str, int] = {
            "pushes_sent": 0, "slow_closes": 0, "failed_pins": 0, "backend_errors": 0,
        }
        self._web_files = WebFiles.load() if config.web_client else None

    def __repr__(self) -> str:
        return f"<Relay connections={len(self._connections)}>"

    @property
    def pin(self) -> str:
        """The PIN clients sign in with: the one given to `open_relay`, else the device
        store's (which may change while the relay runs, as ``trio-relay pin --new`` does)."""
        return self._pin or self.devices.pin or ""

    @pin.setter
    def pin(self, pin: str) -> None:
        """Change the PIN from now on (connections signed in stay so)."""
        if not pin:
            raise ValueError("pin must not be empty")
        self._pin = pin

    # --- devices ----------------------------------------------------------------------------

    def revoke_device(self, device_id: str) -> bool:
        """Unpair a device: its token stops working and its open connections are closed at
        once (1008 ``device revoked``). True if the store knew the device."""
        known = self.devices.revoke(device_id) is not None
        closed = 0
        for connection in list(self._connections):
            if connection.device_id == device_id:
                connection.close(CloseCode.POLICY_VIOLATION, "device revoked")
                closed += 1
        logger.info("device {} revoked; {} connections closed", device_id, closed)
        return known

    async def _watch_devices(self, interval: float) -> None:
        """Read the device store again every ``interval`` seconds (``pairing.json`` changes
        under ``trio-relay devices --revoke``) and close the connections of devices gone."""
        try:
            while True:
                await trio.sleep(interval)
                try:
                    gone = self.devices.reload()
                except Exception as exc:  # a broken file must not stop the relay
                    logger.opt(exception=exc).error("could not read the device store")
                    continue
                for device_id in gone:
                    self.revoke_device(device_id)
        finally:
            try:  # last-seen times not written yet (synchronous: cancellation cannot cut it)
                self.devices.flush()
            except Exception as exc:
                logger.opt(exception=exc).error("could not write the device store")

    async def _send_message(self, chat_id: str, message: JSON, sender: JSON) -> None:
        if self._sender_accepted:
            await self.backend.send_message(chat_id, message, sender=sender)
        else:
            await self.backend.send_message(chat_id, message)

    # --- serving ----------------------------------------------------------------------------

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve WebSocket clients on ``host``:``port`` until cancelled or the relay closes.

        With ``await nursery.start(relay.serve, host, port)`` it returns the bound port once
        listening (``port=0`` picks a free one). With ``ssl_context`` it serves ``wss://``.
        """
        tcp = await trio.open_tcp_listeners(port, host=host)
        bound: int = tcp[0].socket.getsockname()[1]
        listeners: Sequence[trio.abc.Listener[Any]] = tcp
        if ssl_context is not None:
            # https_compatible: WebSocket has its own closing handshake, and browsers, like
            # HTTPS clients, often drop the connection without a TLS close_notify.
            listeners = [
                trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in tcp
            ]
        await self.serve_listeners(listeners, task_status=_Mapped(task_status, lambda _: bound))

    async def serve_listeners(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[Sequence[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on trio listeners you opened (TCP, TLS, or in-memory ones in tests).

        Returns when the relay closes; the listeners are closed on the way out.
        """
        if self._closing:
            raise RelayError("the relay is closing")
        with trio.CancelScope() as scope:
            self._serve_scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        partial(
                            trio.serve_listeners,
                            self._handle_stream,
                            list(listeners),
                            handler_nursery=self._connections_nursery,
                        )
                    )
                    logger.info("relay listening on {}", ", ".join(map(_describe, listeners)))
                    task_status.started(listeners)
            finally:
                self._serve_scopes.discard(scope)

    async def start_serving(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Start `serve` in the relay's own nursery; return the bound port once listening.

        It serves until the relay closes (stopping first, before clients are closed).
        """
        return int(
            await self._nursery.start(partial(self.serve, host, port, ssl_context=ssl_context))
        )

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """One accepted stream: the WebSocket handshake, then the connection, in one nursery.

        The relay, not trio-websocket, closes the stream, however the connection ends (see
        `trio_relay._transport`). Nothing that goes wrong with one stream, in the relay's code
        or in trio-websocket's, reaches the other connections: it is logged and that
        connection is dropped.
        """
        peer = _peer_of(stream)
        address = peer.rpartition(":")[0] or peer
        self._per_address[address] = self._per_address.get(address, 0) + 1
        owned = OwnedStream(stream, nonblocking_sender(stream))
        ws: WebSocketConnection | None = None
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(self.config.handshake_timeout) as handshake:
                    # A bad handshake makes trio-websocket answer 400 and close: stop waiting.
                    owned.on_close = handshake.cancel
                    # Shutting down drops streams still in their handshake, or idle between
                    # plain HTTP requests, at once: only WebSocket clients get the grace.
                    self._handshakes.add(handshake)
                    if self._closing:
                        handshake.cancel()
                    try:
                        ws = await self._handshake(nursery, owned, address, handshake)
                    finally:
                        self._handshakes.discard(handshake)
                owned.on_close = None
                if ws is not None:
                    await self._serve_connection(ws, peer, owned)
                # Stops trio-websocket's reader task, whatever state it was left in.
                nursery.cancel_scope.cancel()
        except Exception as exc:  # including groups; Cancelled and KeyboardInterrupt pass
            logger.opt(exception=exc).bind(peer=peer).error("connection failed")
        finally:
            self._per_address[address] -= 1
            if not self._per_address[address]:
                del self._per_address[address]
            closed = ws.closed if ws is not None else None
            owed = closed.code if closed is not None and closed.code in _OWED_CLOSES else None
            with trio.CancelScope(shield=True):  # bounded inside by close_timeout
                await owned.close_for_real(
                    owed, (closed.reason or "") if closed else "", self.config.close_timeout
                )

    async def _handshake(
        self, nursery: trio.Nursery, stream: OwnedStream, address: str, deadline: trio.CancelScope
    ) -> WebSocketConnection | None:
        """Answer plain HTTP requests (the page, health, metrics) until the client asks for a
        WebSocket upgrade; accept that unless a rule refuses it with HTTP."""
        log = logger.bind(peer=address)
        upgrade = await serve_http(
            stream, web=self._web_files, metrics=self._metrics_view, deadline=deadline,
            request_timeout=self.config.handshake_timeout,
            log=lambda method, target, status: log.debug(
                "HTTP {} {} {}", method, target.partition("?")[0], status),
        )
        if upgrade is None:
            return None
        try:
            request = await wrap_server_stream(
                nursery, stream, _MESSAGE_QUEUE_SIZE, self.config.max_message_size
            )
            # trio-websocket's `request.headers` leave out Host, which the origin check needs.
            headers = {name.encode("latin-1"): value.encode("latin-1")
                       for name, value in upgrade.items()}
            refusal = _refuse(headers, self.config, self._per_address[address])
            if refusal is not None:
                status, why = refusal
                logger.bind(peer=address).warning("handshake refused: {} {}", status, why)
                await request.reject(status, body=why.encode())
                return None
            return await request.accept()
        except ConnectionClosed:
            return None

    async def _serve_connection(
        self, ws: WebSocketConnection, peer: str, stream: OwnedStream | None = None
    ) -> None:
        connection = Connection(self, ws, peer, stream)
        self._connections.add(connection)
        try:
            if self._closing:
                connection.close(CloseCode.GOING_AWAY, "relay shutting down")
            await connection.run()
        finally:
            self._connections.discard(connection)

    # --- in-process use ---------------------------------------------------------------------

    @asynccontextmanager
    async def listen(
        self, resource: str, resource_id: str = "", *, buffer: int | None = None
    ) -> AsyncIterator[Listener]:
        """Watch a resource from inside the host application, beside the web clients.

        Shares the resource's broadcaster with every web subscriber; raises
        `SubscriptionError` (with the wire ``code``, e.g. ``not_found``) if it cannot start.
        """
        if resource not in RESOURCES:
            raise ValueError(f"resource must be one of {', '.join(RESOURCES)}")
        if resource == "modelProfiles":
            resource_id = ""
        elif not resource_id:
            raise ValueError(f"resource_id is required for {resource}")
        key = ResourceKey(resource, resource_id)
        send, receive = trio.open_memory_channel[Update](buffer or self.config.listener_buffer)
        subscriber = _ListenerSubscriber(send)
        with send, receive:
            try:
                async with self._subscription(key, subscriber) as synced:
                    listener = Listener(key, synced, receive, subscriber)
                    synced.go_live()
                    self._listeners += 1
                    try:
                        yield listener
                    finally:
                        self._listeners -= 1
            except SubscribeFailed as exc:
                raise SubscriptionError(exc.code, str(exc)) from None

    async def send(self, chat_id: str, message: JSON, *, sender: str = "Host") -> None:
        """Send a message to a chat as the host; every subscriber sees it, web and in-process.

        It is stored with the sender ``{"name": sender}`` (by a backend that keeps senders).
        """
        with trio.fail_after(self.config.backend_timeout):
            await self._send_message(chat_id, message, {"name": sender})

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the agent's reply running in a chat, as the host; True if one was running."""
        with trio.fail_after(self.config.backend_timeout):
            return await self.backend.cancel_reply(chat_id)

    async def create_chat(
        self, project_id: str, title: str | None = None, model_profile_id: str | None = None
    ) -> JSON:
        """Create a chat as the host; the project's subscribers get a push."""
        with trio.fail_after(self.config.backend_timeout):
            return await self.backend.create_chat(project_id, title, model_profile_id)

    def statistics(self) -> RelayStatistics:
        """What the relay holds right now; after every client has left it returns to idle."""
        return RelayStatistics(
            connections=len(self._connections),
            authenticated_connections=sum(c.authenticated for c in self._connections),
            subscriptions=sum(len(c.subscriptions) for c in self._connections),
            listeners=self._listeners,
            broadcasters=len(self._broadcasters),
            kept_histories=len(self._kept),
            tasks=_count_tasks(self._nursery) + _count_tasks(self._connections_nursery),
        )

    @property
    def uptime(self) -> float:
        return trio.current_time() - self._started_at

    # --- broadcasters -----------------------------------------------------------------------

    @asynccontextmanager
    async def _subscription(
        self,
        key: ResourceKey,
        subscriber: Subscriber,
        since_seq: int | None = None,
        epoch: str | None = None,
        max_replay: int | None = None,
    ) -> AsyncIterator[Synced]:
        """Join (or start) the resource's broadcaster for the duration of the block."""
        if self._closing:
            raise SubscribeFailed(ErrorCode.BACKEND_ERROR, "the relay is closing")
        broadcaster = self._broadcasters.get(key)
        if broadcaster is None:
            open_feed, read_snapshot = self._upstream(key)
            kept = self._kept.pop(key, None)
            broadcaster = Broadcaster(
                key,
                open_feed=open_feed,
                read_snapshot=read_snapshot,
                backend_timeout=self.config.backend_timeout,
                max_pending=self.config.max_pending_changes,
                replay_size=self.config.replay_buffer_size,
                replay_max_age=self.config.replay_max_age,
                on_done=self._broadcaster_done,
                continues=kept[0] if kept is not None else None,
            )
            if kept is not None:
                broadcaster.kept_until = kept[1]
            self._broadcasters[key] = broadcaster
            self._nursery.start_soon(broadcaster.run, name=f"broadcaster {key}")
        broadcaster.add(subscriber)
        try:
            yield await broadcaster.sync(subscriber, since_seq, epoch, max_replay)
        finally:
            broadcaster.remove(subscriber)

    def _broadcaster_done(self, broadcaster: Broadcaster) -> None:
        if self._broadcasters.get(broadcaster.key) is broadcaster:
            del self._broadcasters[broadcaster.key]
        if self._closing:
            return
        if broadcaster.resumable:
            # Its last subscriber left: keep its history a while for clients that come back.
            expiry = trio.current_time() + self.config.resume_grace
            self._kept[broadcaster.key] = (broadcaster.history, expiry)
            self._kept_changed.set()
        elif broadcaster.unstarted_history is not None and broadcaster.key not in self._kept:
            # It failed (or was cancelled) before continuing a kept history: keep that
            # history again, until the end of its original grace period.
            self._kept[broadcaster.key] = (broadcaster.unstarted_history, broadcaster.kept_until)
            self._kept_changed.set()

    def _schedule_connection(self, connection: Connection) -> None:
        """Hold ``connection`` to its auth deadline and ping it every ``ping_interval``, from
        now on, while it lasts."""
        now = trio.current_time()
        ref = weakref.ref(connection)
        self._auth_deadlines.append((now + self.config.auth_timeout, ref))
        self._pings.append((now + self.config.ping_interval, ref))
        self._timers_wait.deadline = min(self._timers_wait.deadline, self._next_timer())

    def _next_timer(self) -> float:
        return min(self._auth_deadlines[0][0] if self._auth_deadlines else math.inf,
                   self._pings[0][0] if self._pings else math.inf)

    async def _run_timers(self) -> None:
        """One task keeps every connection's auth deadline and starts its keepalive pings
        (each ping runs in its connection's nursery), rather than sleeping tasks per
        connection. Every connection has the same timeout and interval, so a deque in
        connect order is each timer's schedule."""
        interval = self.config.ping_interval
        while True:
            with self._timers_wait:
                await trio.sleep_forever()
            now = trio.current_time()
            while self._auth_deadlines and self._auth_deadlines[0][0] <= now:
                connection = self._auth_deadlines.popleft()[1]()
                if connection is not None and not connection.authenticated:
                    connection.close(CloseCode.POLICY_VIOLATION, "authentication timed out")
            while self._pings and self._pings[0][0] <= now:
                _, ref = self._pings.popleft()
                connection = ref()
                if connection is not None and connection.ping():
                    self._pings.append((now + interval, ref))
            self._timers_wait = trio.CancelScope(deadline=self._next_timer())

    async def _forget_kept_histories(self) -> None:
        """Frees each kept history (its replay buffer) once its grace period is over, by the
        deadline of a cancel scope."""
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
        """The seam where a broadcaster meets its source (a backend today, Redis tomorrow)."""
        backend, rid = self.backend, key.resource_id
        if key.resource == "project":
            return (lambda: backend.watch_project(rid)), (lambda: backend.list_chats(rid))
        if key.resource == "chat":
            return (lambda: backend.watch_chat(rid)), (lambda: backend.get_history(rid))
        return backend.watch_model_profiles, backend.get_model_profiles

    # --- counters for metrics ---------------------------------------------------------------

    def _metrics_view(self) -> MetricsView:
        return MetricsView(self.statistics(), dict(self.counters), self.uptime, self._closing)

    def _count_slow_close(self) -> None:
        self.counters["slow_closes"] += 1

    def _count_failed_pin(self) -> None:
        self.counters["failed_pins"] += 1

    def _count_backend_error(self) -> None:
        self.counters["backend_errors"] += 1

    # --- shutdown ---------------------------------------------------------------------------

    def _begin_shutdown(self) -> None:
        self._closing = True
        for scope in list(self._serve_scopes):
            scope.cancel()
        for scope in list(self._handshakes):
            scope.cancel()
        for connection in list(self._connections):
            connection.close(CloseCode.GOING_AWAY, "relay shutting down")


class _Mapped:
    """A task_status that reports ``convert(value)`` to the task_status it wraps."""

    def __init__(self, inner: trio.TaskStatus[Any], convert: Callable[[Any], Any]) -> None:
        self._inner = inner
        self._convert = convert

    def started(self, value: Any = None) -> None:
        self._inner.started(self._convert(value))


def _refuse(
    headers: dict[bytes, bytes], config: RelayConfig, from_address: int
) -> tuple[int, str] | None:
    """The HTTP status and reason to refuse an upgrade request with, or None to accept it."""
    if from_address > config.max_connections_per_address:
        return 429, "too many connections from this address"
    origin = headers.get(b"origin")
    if origin is not None and not _origin_allowed(
        origin.decode("latin-1"), headers.get(b"host", b"").decode("latin-1"),
        config.allowed_origins,
    ):
        # A browser page from another site: refused before any frame, so a hostile page
        # cannot ride on the user's network position (cross-site WebSocket hijacking).
        return 403, "origin not allowed"
    return None


def _origin_allowed(origin: str, host: str, allowed: tuple[str, ...]) -> bool:
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in (a.rstrip("/").lower() for a in allowed):
        return True
    # The relay's own pages: an origin whose host[:port] is the one the client connected to.
    _, _, origin_host = origin.partition("://")
    return bool(host) and origin_host == host.strip().lower()


def _peer_of(stream: trio.abc.Stream) -> str:
    """``host:port`` of the client, through TLS if need be; in-memory streams may name one."""
    named = getattr(stream, "peer", None)
    if isinstance(named, str):
        return named
    transport = getattr(stream, "transport_stream", stream)
    socket = getattr(transport, "socket", None)
    if socket is not None:
        try:
            host, port = socket.getpeername()[:2]
        except OSError:  # already reset by the peer
            return "unknown"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "memory"


def _describe(listener: trio.abc.Listener[Any]) -> str:
    listener = getattr(listener, "transport_listener", listener)  # through TLS
    socket = getattr(listener, "socket", None)
    if socket is not None:
        host, port = socket.getsockname()[:2]
        return f"{host}:{port}"
    return type(listener).__name__


def _accepts_sender(send_message: Callable[..., Any]) -> bool:
    """Whether a backend's ``send_message`` takes ``sender=`` (by name, or ``**kwargs``)."""
    try:
        parameters = inspect.signature(send_message).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the older call is safe
        return False
    return any(
        (p.name == "sender" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        or p.kind is p.VAR_KEYWORD
        for p in parameters
    )


def _count_tasks(nursery: trio.Nursery) -> int:
    count = 0
    for task in nursery.child_tasks:
        count += 1
        for child in task.child_nurseries:
            count += _count_tasks(child)
    return count



@asynccontextmanager
async def open_relay(
    backend: Backend,
    *,
    pin: str | None = None,
    config: RelayConfig | None = None,
    devices: DeviceStore | None = None,
) -> AsyncIterator[Relay]:
    """Run a relay for the duration of the block.

    ``pin`` is what clients sign in with (None: the one ``devices`` keeps, as a
    `FileDeviceStore` does). ``devices`` holds the paired devices: an in-memory
    `DeviceStore` unless you give one.

    ::

        async with trio_relay.open_relay(backend, pin="123456") as relay:
            port = await relay.start_serving("127.0.0.1", 8765)
            async with relay.listen("chat", chat_id) as updates:
                await relay.send(chat_id, "hello from the host")
                async for update in updates:
                    ...

    A single error from inside is raised as itself, never wrapped in an exception group.
    """
    config = config or RelayConfig()
    try:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as connections_nursery:
                relay = Relay(
                    backend,
                    pin=pin,
                    config=config,
                    nursery=nursery,
                    connections_nursery=connections_nursery,
                    devices=devices,
                )
                # The direct path's start-up check: one log line now if it is off.
                check_internals()
                nursery.start_soon(relay._forget_kept_histories, name="forget kept histories")
                nursery.start_soon(relay._run_timers, name="auth deadlines and pings")
                if relay.devices.watch_interval is not None:
                    nursery.start_soon(relay._watch_devices, relay.devices.watch_interval,
                                       name="device store")
                try:
                    yield relay
                finally:
                    relay._begin_shutdown()
                    # Clients get shutdown_timeout to finish their closing handshakes.
                    connections_nursery.cancel_scope.deadline = (
                        trio.current_time() + config.shutdown_timeout
                    )
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                collect(sub)
        else:
            leaves.append(exc)

    collect(group)
    if len(leaves) == 1:
        raise leaves[0] from leaves[0].__cause__
    raise group
