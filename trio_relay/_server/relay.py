"""`open_relay`: the relay as an object that owns a nursery, for embedding in a Trio program.

    open_relay nursery ........................ the relay's lifetime
    ├── broadcaster (own cancel scope)*        one per watched resource (`_registry`)
    ├── forget kept histories                  frees replay buffers after resume_grace
    ├── timers                                 auth deadlines and pings (`_timers`)
    ├── serve (own cancel scope)*              accepts streams; cancelled first on exit
    └── connections nursery
        └── stream task*                       HTTP and the handshake (`_edge`), then
            └── connection nursery             the WebSocket (`_connection`)

Leaving ``async with open_relay(...)`` stops accepting, closes every client with 1001 (within
``shutdown_timeout``), then cancels the broadcasters, whose feeds close on the way out.

With a broker (``broker=``: a `Bus`, or a ``redis://`` URL the relay opens and closes itself)
the backend's changes are forwarded to the bus through its `ChangeHub`, and the broadcasters
follow the bus, so that several relays share one numbering per resource (docs/scaling.md).
"""

from __future__ import annotations

import inspect
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, Final

import trio
from loguru import logger

from .._config import CloseCode, RelayConfig, RelayStatistics
from .._errors import raise_single
from .._store.backend import Backend
from .._store.hub import ChangeHub
from .._stream.broadcaster import SubscribeFailed
from .._stream.bus import Bus, BusError
from .._stream.registry import BroadcasterRegistry
from .._wire.protocol import JSON, RESOURCES, ResourceKey
from .connection import Connection, ConnectionContext
from .counters import RelayCounters
from .edge import Edge
from .http import MetricsView, WebFiles
from .limits import PinGuard
from .listener import (
    Listener,
    ListenerSubscriber,
    RelayError,
    SubscriptionError,
    Update,
)
from .nonces import RecentNonces
from .pairing import DeviceStore
from .timers import ConnectionTimers
from .websocket import ServerWebSocket

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["STOP_KEY", "Relay", "open_broker", "open_relay"]

#: Where a relay with a broker asks the others to stop a reply it does not run itself.
STOP_KEY: Final = ResourceKey("stop", "")


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
        bus: Bus | None = None,
    ) -> None:
        self.backend = backend
        #: The broker the relay shares its resources' streams through, if any.
        self.bus = bus
        #: The paired devices (`trio_relay.DeviceStore`); revoke with `revoke_device`.
        self.devices = devices if devices is not None else DeviceStore()
        if not (pin or self.devices.pin):
            raise ValueError("pin must not be empty")
        self._pin = pin
        # Backends written before senders existed take no ``sender``: asked once, here.
        self._sender_accepted = _accepts_keyword(backend.send_message, "sender")
        # Those written before nonces existed cannot dedupe a retried send: the relay does.
        self._nonce_accepted = _accepts_keyword(backend.send_message, "nonce")
        self._nonces = RecentNonces()
        self.config = config
        self.pin_guard = PinGuard(config)
        #: What the relay has counted since it started (`/metrics`).
        self.counters = RelayCounters()
        self._nursery = nursery
        self._connections_nursery = connections_nursery
        self._connections: set[Connection] = set()
        self._registry = BroadcasterRegistry(backend, config, nursery, bus)
        self._timers = ConnectionTimers(config)
        self._context = ConnectionContext(
            config=config, backend=backend, counters=self.counters, registry=self._registry,
            timers=self._timers, pin_guard=self.pin_guard, devices=self.devices,
            current_pin=lambda: self.pin, send_message=self._send_message,
            writes_refused=self._writes_refused, cancel_reply=self._cancel_reply,
        )
        self._edge = Edge(
            config, self.counters,
            web=WebFiles.load() if config.web_client else None,
            metrics=self._metrics_view,
            serve_websocket=self._serve_websocket,
        )
        self._serve_scopes: set[trio.CancelScope] = set()
        self._listeners = 0
        self._closing = False
        self._started_at = trio.current_time()

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

    def _writes_refused(self) -> str | None:
        if self.bus is not None and not self.bus.healthy:
            return "the relay cannot reach its broker; nothing was stored, try again"
        return None

    async def _send_message(
        self, chat_id: str, message: JSON, sender: JSON, nonce: str | None = None
    ) -> None:
        extra: dict[str, Any] = {"sender": sender} if self._sender_accepted else {}
        if nonce is not None and self._nonce_accepted:
            extra["nonce"] = nonce
        send = partial(self.backend.send_message, chat_id, message, **extra)
        if nonce is not None and not self._nonce_accepted:
            await self._nonces.once(chat_id, nonce, send)
        else:
            await send()
        if self.bus is not None:
            # Answered once the broker has numbered the message (within broker_timeout: it
            # is stored, and the bus publishes it when the broker answers again), so that an
            # acknowledged message is on the bus even if this relay dies the next instant,
            # and a client that waits for each answer does not run ahead of its pushes.
            with trio.move_on_after(self.config.broker_timeout):
                await self.bus.flush()

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
                            self._edge.handle_stream,
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

    async def _serve_websocket(self, socket: ServerWebSocket, peer: str) -> None:
        connection = Connection(socket, peer, self._context)
        self._connections.add(connection)
        try:
            if self._closing:
                connection.close(CloseCode.GOING_AWAY, "relay shutting down")
            await connection.run()
        finally:
            self._connections.discard(connection)
            self.counters.connections_closed += 1

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
        subscriber = ListenerSubscriber(send)
        with send, receive:
            try:
                async with self._registry.subscription(key, subscriber) as synced:
                    listener = Listener(key, synced, receive, subscriber)
                    synced.go_live()
                    self._listeners += 1
                    try:
                        yield listener
                    finally:
                        self._listeners -= 1
            except SubscribeFailed as exc:
                raise SubscriptionError(exc.code, str(exc)) from None

    async def send(
        self, chat_id: str, message: JSON, *, sender: str = "Host", nonce: str | None = None
    ) -> None:
        """Send a message to a chat as the host; every subscriber sees it, web and in-process.

        It is stored with the sender ``{"name": sender}`` (by a backend that keeps senders).
        A send retried with the same ``nonce`` is stored and answered once.
        """
        self._check_writable()
        with trio.fail_after(self.config.backend_timeout):
            await self._send_message(chat_id, message, {"name": sender}, nonce)

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the agent's reply running in a chat, as the host; True if one was running
        here (with a broker, one running on another relay is stopped too)."""
        with trio.fail_after(self.config.backend_timeout):
            return await self._cancel_reply(chat_id)

    async def _cancel_reply(self, chat_id: str) -> bool:
        cancelled = await self.backend.cancel_reply(chat_id)
        if not cancelled and self.bus is not None:
            # The reply may run on the relay that took its message: every relay hears the
            # stop and stops it if it runs there; the chat's subscribers see `cancelled`.
            self.bus.forward(STOP_KEY, {"chatId": chat_id})
        return bool(cancelled)

    async def _hear_stops(self, bus: Bus) -> None:
        """Stop, here, the replies other relays were asked to stop (see `_cancel_reply`);
        runs for the relay's lifetime, following the bus again after a failure."""
        while True:
            try:
                async with bus.follow(STOP_KEY, await bus.head(STOP_KEY)) as stops:
                    async for stop in stops:
                        chat_id = stop.data.get("chatId") if isinstance(stop.data, dict) else None
                        if isinstance(chat_id, str):
                            await self._stop_here(chat_id)
            except BusError as exc:
                logger.debug("following stops on the bus: {}; again in a second", exc)
            await trio.sleep(1.0)  # a bus that failed: retried at a steady, modest pace

    async def _stop_here(self, chat_id: str) -> None:
        try:
            with trio.fail_after(self.config.backend_timeout):
                if await self.backend.cancel_reply(chat_id):
                    logger.info("stopped the reply in chat {} as another relay asked", chat_id)
        except Exception as exc:  # an unknown chat, a backend failing: this stop only
            logger.debug("could not stop a reply in chat {}: {!r}", chat_id, exc)

    async def create_chat(
        self, project_id: str, title: str | None = None, model_profile_id: str | None = None
    ) -> JSON:
        """Create a chat as the host; the project's subscribers get a push."""
        self._check_writable()
        with trio.fail_after(self.config.backend_timeout):
            return await self.backend.create_chat(project_id, title, model_profile_id)

    def _check_writable(self) -> None:
        reason = self._writes_refused()
        if reason is not None:
            raise RelayError(reason)

    def statistics(self) -> RelayStatistics:
        """What the relay holds right now; after every client has left it returns to idle."""
        return RelayStatistics(
            connections=len(self._connections),
            authenticated_connections=sum(c.authenticated for c in self._connections),
            subscriptions=sum(len(c.subscriptions) for c in self._connections),
            listeners=self._listeners,
            broadcasters=self._registry.broadcasters,
            kept_histories=self._registry.kept_histories,
            lingering=self._registry.lingering,
            tasks=_count_tasks(self._nursery) + _count_tasks(self._connections_nursery),
        )

    @property
    def uptime(self) -> float:
        return trio.current_time() - self._started_at

    def _metrics_view(self) -> MetricsView:
        degraded = None
        if self.bus is not None and not self.bus.healthy:
            degraded = "broker unreachable"
        elif not getattr(self.backend, "healthy", True):  # a store that can say so
            degraded = "database unreachable"
        return MetricsView(
            self.statistics(), self.counters, self.uptime, self._closing, degraded
        )

    # --- shutdown ---------------------------------------------------------------------------

    def _begin_shutdown(self) -> None:
        self._closing = True
        self._registry.close()
        for scope in list(self._serve_scopes):
            scope.cancel()
        self._edge.shutdown()
        for connection in list(self._connections):
            connection.close(CloseCode.GOING_AWAY, "relay shutting down")


class _Mapped:
    """A task_status that reports ``convert(value)`` to the task_status it wraps."""

    def __init__(self, inner: trio.TaskStatus[Any], convert: Callable[[Any], Any]) -> None:
        self._inner = inner
        self._convert = convert

    def started(self, value: Any = None) -> None:
        self._inner.started(self._convert(value))


def _describe(listener: trio.abc.Listener[Any]) -> str:
    listener = getattr(listener, "transport_listener", listener)  # through TLS
    socket = getattr(listener, "socket", None)
    if socket is not None:
        host, port = socket.getsockname()[:2]
        return f"{host}:{port}"
    return type(listener).__name__


def _accepts_keyword(send_message: Callable[..., Any], name: str) -> bool:
    """Whether a backend's ``send_message`` takes ``name=`` (by name, or ``**kwargs``)."""
    try:
        parameters = inspect.signature(send_message).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the older call is safe
        return False
    return any(
        (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
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
    broker: Bus | str | None = None,
) -> AsyncIterator[Relay]:
    """Run a relay for the duration of the block.

    ``pin`` is what clients sign in with (None: the one ``devices`` keeps, as a
    `FileDeviceStore` does). ``devices`` holds the paired devices: an in-memory
    `DeviceStore` unless you give one. ``broker`` scales the relay out: a ``redis://`` URL
    (with the extra ``trio-relay[redis]``) or a `Bus`; the backend must then publish its
    changes through a `ChangeHub` in its ``hub`` attribute, as the built-in backends do.

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
        async with AsyncExitStack() as stack:
            bus = await _open_broker(stack, broker, backend, config)
            async with _serve_relay(backend, pin, config, devices, bus) as relay:
                yield relay
    except BaseExceptionGroup as group:
        raise_single(group)


def open_broker(url: str, config: RelayConfig) -> AbstractAsyncContextManager[Bus]:
    """The bus of a broker URL (``redis://``), with the limits of ``config``: what
    `open_relay` opens for ``broker=url`` (``trio-relay serve`` opens it first, before it
    writes anything)."""
    from .._stream.redis_bus import open_redis_bus  # only with trio-relay[redis]

    return open_redis_bus(
        url, replay_size=config.replay_buffer_size, replay_max_age=config.replay_max_age,
        timeout=config.broker_timeout, grace=config.broker_grace,
    )


async def _open_broker(
    stack: AsyncExitStack, broker: Bus | str | None, backend: Backend, config: RelayConfig
) -> Bus | None:
    """Open the broker (for a URL), and forward the backend's changes to it until the end."""
    if broker is None:
        return None
    hub = getattr(backend, "hub", None)
    if not isinstance(hub, ChangeHub):
        raise RelayError(
            "a relay with a broker needs a backend that publishes its changes through a"
            " ChangeHub in its `hub` attribute (as the built-in backends do)"
        )
    bus = (
        await stack.enter_async_context(open_broker(broker, config))
        if isinstance(broker, str) else broker
    )
    forward = bus.forward

    def outlet(key: Hashable, data: JSON) -> None:
        if isinstance(key, ResourceKey):  # a store's keys are (`_store.backend.chat_key`)
            forward(key, data)

    hub.outlet, hub.flusher = outlet, bus.flush
    stack.callback(setattr, hub, "outlet", None)
    stack.callback(setattr, hub, "flusher", None)
    return bus


@asynccontextmanager
async def _serve_relay(
    backend: Backend, pin: str | None, config: RelayConfig, devices: DeviceStore | None,
    bus: Bus | None,
) -> AsyncIterator[Relay]:
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as connections_nursery:
            relay = Relay(
                backend,
                pin=pin,
                config=config,
                nursery=nursery,
                connections_nursery=connections_nursery,
                devices=devices,
                bus=bus,
            )
            nursery.start_soon(relay._registry.forget_kept_histories,
                               name="forget kept histories")
            nursery.start_soon(relay._timers.run, name="auth deadlines and pings")
            if bus is not None:
                nursery.start_soon(relay._hear_stops, bus, name="stops from other relays")
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
