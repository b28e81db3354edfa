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

import itertools
import json
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import urlsplit

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from ._backend import Backend
from ._config import RelayConfig, RelayStatistics
from ._errors import raise_single
from ._memory_backend import HANG, MemoryBackend
from ._memory_streams import MemoryListener
from ._server.pairing import DeviceStore
from ._server.relay import Listener, Relay, Update, open_relay

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DEFAULT_PIN",
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

Frame = dict[str, Any]

#: The PIN of `open_memory_relay` and of the pytest plugin's relay, unless you choose one.
DEFAULT_PIN: Final = "1234"
#: The URL to give `trio_relay.client.open_relay_client` along with `MemoryRelay.connector`;
#: only its path and host reach the relay (in the handshake), nothing resolves it.
MEMORY_URL: Final = "ws://relay.test/ws"

# Any key will do: the relay unmasks whatever a client picked.
_MASK: Final = bytes([0x37, 0xFA, 0x21, 0x3D])


class TestClient:
    """A WebSocket client of a relay, speaking the wire protocol frame by frame.

    Every wait is bounded by ``timeout`` seconds (mock seconds under ``autojump_clock``), so
    a frame that never comes fails the test instead of hanging it.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, ws: WebSocketConnection, stream: trio.abc.Stream, timeout: float) -> None:
        self.ws = ws
        self.stream = stream
        self.timeout = timeout
        self._ids = itertools.count(1)
        # Frames read but not yet returned: pushes that arrived while waiting for a reply,
        # and whatever wait_closed read before the close. `receive` returns these first.
        self._held: deque[Frame] = deque()

    @property
    def held(self) -> list[Frame]:
        """The frames read but not yet returned, oldest first: pushes that arrived while a
        reply was awaited, and every frame `wait_closed` read before the close."""
        return list(self._held)

    # --- sending ----------------------------------------------------------------------------

    async def send(self, frame: Frame | str) -> None:
        """Send one frame: a dict is encoded as JSON, a str is sent as it is."""
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def send_raw_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """Write one masked WebSocket frame, built by hand, straight to the stream.

        For what a well-behaved client library would refuse to send: invalid UTF-8 in a text
        frame (``opcode`` 0x1), a ping at an awkward moment (0x9), a fragment (``fin=False``).
        ``opcode`` may be a `wsproto.frame_protocol.Opcode`.
        """
        header = bytearray([(0x80 if fin else 0) | opcode])
        size = len(payload)
        if size < 126:
            header.append(0x80 | size)
        elif size < 1 << 16:
            header += bytes([0x80 | 126]) + size.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + size.to_bytes(8, "big")
        masked = bytes(byte ^ _MASK[i % 4] for i, byte in enumerate(payload))
        await self.stream.send_all(bytes(header) + _MASK + masked)

    async def request_nowait(self, type: str, **fields: Any) -> str:
        """Send a request with a fresh id and return the id; read the reply with `reply_to`."""
        request_id = f"r{next(self._ids)}"
        await self.send({"id": request_id, "type": type, **fields})
        return request_id

    async def request(self, type: str, **fields: Any) -> Frame:
        """Send a request with a fresh id and return its reply; pushes meanwhile are held."""
        return await self.reply_to(await self.request_nowait(type, **fields))

    # --- receiving --------------------------------------------------------------------------

    async def receive(self) -> Frame:
        """The next frame, in arrival order (held frames first)."""
        if self._held:
            return self._held.popleft()
        with trio.fail_after(self.timeout):
            text = await self.ws.get_message()
        assert isinstance(text, str), "the relay sent a binary frame"
        frame: Frame = json.loads(text)
        return frame

    async def reply_to(self, request_id: Any) -> Frame:
        """The reply to ``request_id``; frames that arrive before it are held."""
        with trio.fail_after(self.timeout):
            while True:
                text = await self.ws.get_message()
                assert isinstance(text, str)
                frame: Frame = json.loads(text)
                if frame.get("id") == request_id and frame.get("id") is not None:
                    return frame
                self._held.append(frame)

    async def next_push(self) -> Frame:
        """The next frame, which must answer no request (``id`` null)."""
        frame = await self.receive()
        assert frame.get("id") is None, f"expected a push, got a reply: {frame}"
        return frame

    async def next_pushes(self, count: int) -> list[Frame]:
        """The next ``count`` frames, each of which must be a push."""
        return [await self.next_push() for _ in range(count)]

    async def frames_until_quiet(self, quiet: float = 0.001) -> list[Frame]:
        """Every frame (held ones first) until none arrives for ``quiet`` seconds.

        Under ``autojump_clock`` the default means "until every task is blocked": mock time
        only moves on once nothing else can happen.
        """
        frames: list[Frame] = []
        while True:
            with trio.move_on_after(quiet):
                frames.append(await self.receive())
                continue
            return frames

    async def assert_no_push(self) -> None:
        """Assert that no frame arrives before every task is blocked (no time passes).

        Only meaningful in memory: over a real socket, tasks block on the kernel too.
        """
        assert not self._held, f"unexpected frame: {self._held[0]}"
        arrived: list[str | bytes] = []

        async def grab() -> None:
            try:
                arrived.append(await self.ws.get_message())
            except ConnectionClosed:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grab)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert not arrived, f"unexpected frame: {arrived[0]!r}"

    # --- the protocol's requests ------------------------------------------------------------

    async def authenticate(
        self, pin: str | None = None, *, token: str | None = None, device_name: str | None = None
    ) -> Frame:
        """Read ``auth_required`` if it has not been read, then sign in with the PIN (pairing
        this client as ``device_name`` if given) or a device ``token``; asserts success and
        returns the reply (``reply["data"]["device"]`` holds a paired device's token)."""
        fields: dict[str, Any] = {"pin": pin} if token is None else {"token": token}
        if device_name is not None:
            fields["deviceName"] = device_name
        reply = await self.request("auth", **fields)
        if self._held and self._held[0].get("type") == "auth_required":
            self._held.popleft()
        assert reply["type"] == "auth_success", reply
        return reply

    async def subscribe(
        self,
        resource: str,
        resource_id: str | None = None,
        *,
        since_seq: int | None = None,
        epoch: str | None = None,
        **extra: Any,
    ) -> Frame:
        """Subscribe (resuming from ``since_seq`` of ``epoch`` if given); asserts the reply is
        ``subscribed`` and returns it."""
        fields: dict[str, Any] = {"resource": resource, **extra}
        if resource_id is not None:
            fields["resourceId"] = resource_id
        if since_seq is not None:
            fields["sinceSeq"] = since_seq
        if epoch is not None:
            fields["epoch"] = epoch
        reply = await self.request("subscribe", **fields)
        assert reply["type"] == "subscribed", reply
        return reply

    async def unsubscribe(self, resource: str, resource_id: str | None = None) -> bool:
        """Unsubscribe; returns whether there was a subscription to end."""
        fields: dict[str, Any] = {"resource": resource}
        if resource_id is not None:
            fields["resourceId"] = resource_id
        reply = await self.request("unsubscribe", **fields)
        assert reply["type"] == "data", reply
        unsubscribed: bool = reply["data"]["unsubscribed"]
        return unsubscribed

    async def send_message(self, chat_id: str, message: Any) -> Frame:
        """Send a message to a chat (a ``send`` request); asserts it was accepted."""
        reply = await self.request("send", resourceId=chat_id, message=message)
        assert reply["type"] == "data" and reply["data"] == {"sent": True}, reply
        return reply

    # --- closing ----------------------------------------------------------------------------

    async def close(self, code: int = 1000) -> None:
        """Close cleanly, with the closing handshake."""
        await self.ws.aclose(code)

    async def abort(self) -> None:
        """Drop the stream without a closing handshake, as a vanished client would."""
        await self.stream.aclose()

    async def wait_closed(self) -> tuple[int, str | None]:
        """Read until the relay closes the connection; returns its close code and reason.

        The frames read on the way are kept, in order, in `held`.
        """
        with trio.fail_after(self.timeout):
            while True:
                try:
                    text = await self.ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    return exc.reason.code, exc.reason.reason
                self._held.append(json.loads(text))


class GatedStream(trio.abc.Stream):
    """A client's stream whose reads can be held back: a client that stops reading, or a
    network path on which nothing from the relay gets through (no pong either)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._gate = trio.Event()
        self._gate.set()

    def pause_reading(self) -> None:
        """Hold back what the relay sends until `resume_reading` (a read in progress too)."""
        if self._gate.is_set():
            self._gate = trio.Event()

    def resume_reading(self) -> None:
        self._gate.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self._gate.wait()
        data = await self.inner.receive_some(max_bytes)
        # A read already waiting when the gate closed holds its data back too.
        await self._gate.wait()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._gate.set()
        await self.inner.aclose()


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
) -> AsyncIterator[MemoryRelay]:
    """A relay on an in-memory listener; ``client_timeout`` bounds every client wait.

    ``devices`` is the relay's device store (`open_relay`'s): a fresh in-memory one unless
    given. Choose ``client_timeout`` longer than any relay timer a test waits out (the PIN
    backoff, ``resume_grace``, ...), or the client gives up first.
    """
    listener = MemoryListener()
    try:
        # The clients' nursery encloses the relay, so that on the way out the relay closes
        # them (1001) while they can still answer, as real clients would.
        async with trio.open_nursery() as client_nursery:
            async with open_relay(backend, pin=pin, config=config, devices=devices) as relay:
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
