"""Deterministic in-memory relays and clients, for this project's tests and for yours.

`open_memory_relay` runs a real relay whose clients connect through `trio.testing` memory
streams: the WebSocket handshake, framing and connection code are the ones production runs,
but there is no socket and, under trio's ``autojump_clock``, no real time.

::

    async def test_echo(autojump_clock):
        backend = MemoryBackend()
        chat = backend.add_chat("p1", "c1")
        async with open_memory_relay(backend, pin="1234") as relay:
            client = await relay.connect()
            await client.authenticate("1234")
            await client.subscribe("chat", "c1")
            backend.emit("chat", "c1", {"type": "chunk", "text": "hi"})
            assert (await client.next_push())["data"] == {"type": "chunk", "text": "hi"}

With pytest, the fixtures of `trio_relay.pytest_plugin` (``memory_backend``,
``memory_relay``, ``relay_client``, ...) do the setting up; see ``docs/testing.md``.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final
from urllib.parse import urlsplit

import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

from ._config import RelayConfig, RelayStatistics
from ._errors import raise_single
from ._memory_streams import MemoryListener
from ._server.listener import Listener, Update
from ._server.pairing import DeviceStore
from ._server.relay import Relay, open_relay
from ._store.backend import Backend
from ._store.memory import HANG, MemoryBackend
from ._stream.bus import Bus
from ._testing_client import Frame, GatedStream, TestClient

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DEFAULT_PIN",
    "Frame",
    "HANG",
    "MEMORY_URL",
    "GatedStream",
    "MemoryBackend",
    "MemoryConnector",
    "MemoryRelay",
    "TestClient",
    "next_update",
    "open_loopback_client",
    "open_memory_relay",
]

#: The PIN of `open_memory_relay` and of the pytest plugin's relay, unless you choose one.
DEFAULT_PIN: Final = "1234"
#: The URL to give `trio_relay.client.open_relay_client` along with `MemoryRelay.connector`;
#: only its path and host reach the relay (in the handshake), nothing resolves it.
MEMORY_URL: Final = "ws://relay.test/ws"

# Any key will do: the relay unmasks whatever a client picked.
class MemoryConnector:
    """The ``connect`` of `trio_relay.client.open_relay_client`, over memory streams.

    Each call opens a connection to ``relay`` and records it, so that a test can break the
    transport under a client and watch it reconnect: `cut` drops the current connection, and
    while `refusing` is set (or ``relay`` is None, a relay that is down) every attempt fails
    with `OSError`. Point ``relay`` at another `MemoryRelay` to restart the relay.
    """

    def __init__(
        self, relay: MemoryRelay | None = None, *, lockstep: bool = False, peer: str | None = None
    ) -> None:
        self.relay = relay
        self.lockstep = lockstep
        self.peer = peer
        #: Set to refuse every connection attempt until it is cleared.
        self.refusing = False
        #: The time (``trio.current_time()``) of every attempt, refused ones too.
        self.attempts: list[float] = []
        #: Every connection opened, oldest first; ``streams[-1]`` is the current one.
        self.streams: list[GatedStream] = []
        self._attempted = trio.lowlevel.ParkingLot()

    async def __call__(self) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        refused = self.refusing or self.relay is None
        self._attempted.unpark_all()
        await trio.lowlevel.checkpoint()
        if refused or self.relay is None:
            raise OSError("connection refused")
        stream = GatedStream(
            await self.relay.listener.connect(lockstep=self.lockstep, peer=self.peer)
        )
        self.streams.append(stream)
        return stream

    async def wait_attempts(self, count: int) -> None:
        """Wait until ``count`` attempts in all have been made (at most ten minutes)."""
        with trio.fail_after(600):
            while len(self.attempts) < count:
                await self._attempted.park()

    async def cut(self) -> None:
        """Drop the current connection without a closing handshake (a network failure)."""
        await self.streams[-1].inner.aclose()


class MemoryRelay:
    """A relay served over in-memory streams: `connect` opens a `TestClient`, `connector` a
    ``connect`` for `trio_relay.client`."""

    #: See `MEMORY_URL`.
    url: Final = MEMORY_URL

    def __init__(self, relay: Relay, listener: MemoryListener, nursery: trio.Nursery,
                 timeout: float) -> None:
        self.relay = relay
        self.listener = listener
        self._nursery = nursery
        self._timeout = timeout

    @property
    def pin(self) -> str:
        return self.relay.pin

    @property
    def backend(self) -> Backend:
        return self.relay.backend

    @property
    def config(self) -> RelayConfig:
        return self.relay.config

    @property
    def devices(self) -> DeviceStore:
        """The relay's paired devices (`Relay.revoke_device` unpairs one)."""
        return self.relay.devices

    @property
    def timeout(self) -> float:
        """What bounds every wait of this relay's `TestClient`s."""
        return self._timeout

    def statistics(self) -> RelayStatistics:
        """`Relay.statistics`: what the relay holds right now."""
        return self.relay.statistics()

    async def quiet_statistics(self) -> RelayStatistics:
        """The relay's statistics once every task is blocked (no mock time passes)."""
        await trio.testing.wait_all_tasks_blocked()
        return self.relay.statistics()

    async def connect(
        self,
        *,
        lockstep: bool = False,
        authenticate: str | bool | None = None,
        peer: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> TestClient:
        """Open a client connection.

        ``authenticate``: a PIN to authenticate with, or True for the relay's own. ``lockstep``:
        the relay's writes wait for our reads (a slow consumer). ``peer``: the ``host:port``
        the relay sees. ``headers``: extra handshake headers (e.g. Origin).
        """
        stream = await self.listener.connect(lockstep=lockstep, peer=peer)
        extra = [(name.encode(), value.encode()) for name, value in headers or ()]
        # A refused handshake (403, 429) raises ConnectionRejected here, not in the nursery.
        ws = await self._nursery.start(_run_client, stream, extra)
        client = TestClient(ws, stream, self._timeout)
        if authenticate is True:
            authenticate = self.pin
        if isinstance(authenticate, str):
            await client.authenticate(authenticate)
        return client

    def connector(self, *, lockstep: bool = False, peer: str | None = None) -> MemoryConnector:
        """A ``connect`` for `trio_relay.client.open_relay_client` (with `url`)::

            connector = memory_relay.connector()
            async with open_relay_client(memory_relay.url, pin=memory_relay.pin,
                                         connect=connector) as client:
                await connector.cut()  # and the client reconnects
        """
        return MemoryConnector(self, lockstep=lockstep, peer=peer)


async def _run_client(
    stream: trio.abc.Stream,
    headers: list[tuple[bytes, bytes]],
    *,
    task_status: trio.TaskStatus[WebSocketConnection],
) -> None:
    """A client connection in a nursery of its own, so that trio-websocket's reader, which
    raises a refused handshake, fails only this start and not every client."""
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]  # hinted as a socket stream; any Stream works
                "relay.test",
                "/ws",
                extra_headers=headers,
            )
            task_status.started(ws)
    except BaseExceptionGroup as group:
        raise_single(group)


@asynccontextmanager
async def open_memory_relay(
    backend: Backend,
    *,
    pin: str = DEFAULT_PIN,
    config: RelayConfig | None = None,
    client_timeout: float = 30.0,
    devices: DeviceStore | None = None,
    broker: Bus | str | None = None,
) -> AsyncIterator[MemoryRelay]:
    """A relay on an in-memory listener; ``client_timeout`` bounds every client wait.

    ``devices`` is the relay's device store (`open_relay`'s): a fresh in-memory one unless
    given. ``broker`` is `open_relay`'s (a shared `LocalBus` lets several memory relays in
    one test play the nodes of a cluster). Choose ``client_timeout`` longer than any relay
    timer a test waits out (the PIN backoff, ``resume_grace``, ...), or the client gives up
    first.
    """
    listener = MemoryListener()
    try:
        # The clients' nursery encloses the relay, so that on the way out the relay closes
        # them (1001) while they can still answer, as real clients would.
        async with trio.open_nursery() as client_nursery:
            async with open_relay(
                backend, pin=pin, config=config, devices=devices, broker=broker
            ) as relay:
                await relay._nursery.start(relay.serve_listeners, [listener])
                yield MemoryRelay(relay, listener, client_nursery, client_timeout)
            client_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)


async def next_update(listener: Listener) -> Update:
    """The next update of an in-process listener (`Relay.listen`), within five seconds."""
    with trio.fail_after(5):
        return await listener.__anext__()


@asynccontextmanager
async def open_loopback_client(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    client_timeout: float = 10.0,
) -> AsyncIterator[TestClient]:
    """A `TestClient` over a real TCP (or, for ``wss://``, TLS) connection to ``url``.

    For end-to-end tests of a relay on a real port, in real time (``client_timeout`` bounds
    every wait). Unlike trio-websocket's own ``open_websocket_url``, it owns its stream and always
    closes it, also when the relay starts the closing handshake. The TLS handshake comes
    first, so a certificate the client does not trust raises `trio.BrokenResourceError` here.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream: trio.abc.Stream
    if parts.scheme == "wss":
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl_context or ssl.create_default_context(),
            https_compatible=True,
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        if isinstance(stream, trio.SSLStream):
            # trio-websocket's client would wait forever on a failed TLS handshake.
            await stream.do_handshake()
        try:
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(nursery, stream, host, resource)
                try:
                    yield TestClient(ws, stream, client_timeout)
                finally:
                    await ws.aclose()
        except BaseExceptionGroup as group:
            raise_single(group)
    finally:
        await stream.aclose()
