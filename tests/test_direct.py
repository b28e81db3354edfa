"""Direct writes (`trio_relay._direct`): pushes framed once and written straight into sockets.

The bytes a client reads are parsed by a wsproto client of our own, so a frame cut short, or
a pong or close frame written into the middle of a data frame, fails the parse. Small socket
buffers (`MemorySocketStream`) make the kernel take part of a frame, or refuse it.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio_websocket
import trustme
from trio.testing import MockClock
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from trio_relay import CloseCode, RelayConfig
from trio_relay import _direct as direct
from trio_relay._connection import Connection
from trio_relay._direct import DirectPath, Written, frame_text, nonblocking_sender
from trio_relay._memory import memory_socket_pair
from trio_relay._transport import OwnedStream
from trio_relay.testing import (
    MemoryBackend,
    MemoryRelay,
    open_loopback_client,
    open_memory_relay,
)

PIN = "424242"
BIG = "x" * 3000  # a push of about 3 KB: far more than the small buffers below


# --- framing and the start-up check -------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_push_is_framed_as_wsproto_frames_it(size: int) -> None:
    text = "é" * (size // 2) + "y" * (size % 2)
    wsproto_frame = FrameProtocol(client=False, extensions=[]).send_data(text, fin=True)
    assert frame_text(text.encode()) == bytes(wsproto_frame)


def test_the_internals_are_as_expected_here() -> None:
    assert direct.check_internals() is None


def test_unexpected_internals_turn_the_direct_path_off_with_a_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lines: list[str] = []
    from loguru import logger

    handler = logger.add(lines.append, level="WARNING", format="{message}")
    logger.enable("trio_relay")
    try:
        monkeypatch.setattr(direct, "_checked", False)
        monkeypatch.setattr(direct, "_off_because", None)
        monkeypatch.setattr(trio_websocket, "__version__", "0.99.0")
        reason = direct.check_internals()
        assert reason == "trio_websocket 0.99.0 is not a checked release (0.12)"
        assert direct.check_internals() == reason  # checked once, logged once
        assert lines == [f"direct writes off, every frame goes through trio-websocket: {reason}\n"]
        ours = memory_socket_pair()[0]
        assert nonblocking_sender(ours) is None
        stream = OwnedStream(ours, nonblocking_sender(ours))
        assert DirectPath.open(_FakeWs(), stream) is None  # type: ignore[arg-type]
    finally:
        logger.disable("trio_relay")
        logger.remove(handler)


@attrs.define
class _FakeProto:
    extensions: list[Any] = attrs.Factory(list)
    _outbound_opcode: Any = None


@attrs.define
class _FakeWsproto:
    connection: Any = attrs.Factory(_FakeProto)


class _FakeWs:
    def __init__(self, proto: _FakeProto | None = None) -> None:
        self._wsproto = _FakeWsproto(type("C", (), {"_proto": proto or _FakeProto()})())
        self._close_reason: Any = None


def _path(proto: _FakeProto | None = None, buffer: int = 1 << 16) -> tuple[
        DirectPath, _FakeWs, OwnedStream, trio.abc.Stream]:
    ws = _FakeWs(proto)
    ours, theirs = memory_socket_pair(buffer)
    stream = OwnedStream(ours, nonblocking_sender(ours))
    path = DirectPath.open(ws, stream)  # type: ignore[arg-type]
    assert path is not None
    return path, ws, stream, theirs


def test_where_the_direct_path_is_not_used() -> None:
    # Negotiated extensions (compression): the bytes differ per client.
    socket_end = memory_socket_pair()[0]
    ours = OwnedStream(socket_end, nonblocking_sender(socket_end))
    assert DirectPath.open(_FakeWs(_FakeProto([object()])), ours) is None  # type: ignore[arg-type]
    # Streams that cannot take a write without blocking: TLS, trio's memory streams.
    for stream in (trio.testing.memory_stream_pair()[0], trio.testing.lockstep_stream_pair()[0]):
        assert nonblocking_sender(stream) is None
        owned = OwnedStream(stream, nonblocking_sender(stream))
        assert DirectPath.open(_FakeWs(), owned) is None  # type: ignore[arg-type]


async def test_a_write_is_refused_while_another_is_under_way_or_closing() -> None:
    frame = frame_text(b"hello")
    path, ws, stream, _ = _path()
    assert path.write(frame) is Written.ALL
    # Mid fragmented message (trio-websocket never sends one, but wsproto could).
    path._proto._outbound_opcode = object()
    assert path.write(frame) is Written.NONE
    path._proto._outbound_opcode = None
    # While trio-websocket (or the writer) is writing, or waiting for its turn to.
    async with stream._write_lock:
        assert path.write(frame) is Written.NONE
    assert path.write(frame) is Written.ALL
    # Once the closing handshake has begun.
    ws._close_reason = object()
    assert path.write(frame) is Written.NONE


async def test_a_partial_write_is_owed_and_written_first() -> None:
    path, _, stream, theirs = _path(buffer=4)
    first, second = frame_text(b"0123456789"), frame_text(b"abc")
    assert path.write(first) is Written.PART
    assert stream.busy
    assert path.write(second) is Written.NONE  # nothing may overtake what is owed
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, second)
        received = b""
        while len(received) < len(first) + len(second):
            received += await theirs.receive_some()
    assert received == first + second
    assert not stream.busy


async def test_a_cancelled_write_leaves_exactly_the_rest_owed(autojump_clock: MockClock) -> None:
    ours, theirs = memory_socket_pair(4)
    stream = OwnedStream(ours, nonblocking_sender(ours))
    frame, ping = frame_text(b"0123456789" * 10), b"\x89\x00"
    with trio.move_on_after(1):  # the reader reads nothing: the write is cancelled halfway
        await stream.send_all(frame)
    assert stream.busy  # the rest is owed
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, ping)
        received = b""
        while len(received) < len(frame) + len(ping):
            received += await theirs.receive_some()
    assert received == frame + ping  # nothing written twice, nothing cut short
    assert not stream.busy


async def test_a_write_cancelled_without_a_nonblocking_send_tears_the_stream(
    autojump_clock: MockClock,
) -> None:
    ours, _theirs = trio.testing.lockstep_stream_pair()  # like TLS: no send_nowait
    stream = OwnedStream(ours, nonblocking_sender(ours))
    with trio.move_on_after(1):
        await stream.send_all(b"x" * 100)
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"more")


@pytest.mark.parametrize("yields", [0, 1, 2])
async def test_a_ping_timing_out_while_a_frame_is_half_sent_leaves_it_whole(
    memory_backend: MemoryBackend, autojump_clock: MockClock, yields: int
) -> None:
    memory_backend.add_chat("p1", "c1")
    config = RelayConfig(ping_interval=1000, ping_timeout=5, close_timeout=30)
    text = "big " + "".join(f"{i:04d}" for i in range(750))
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        async with raw_client(memory, buffer=64) as client:
            connection = connection_of(memory)
            connection.ping()  # the ping takes the write lock, or is about to
            for _ in range(yields):
                await trio.lowlevel.checkpoint()
            connection.push(text)  # some bytes go at once, the rest is owed or queued
            await trio.testing.wait_all_tasks_blocked()
            data = await client.stream.receive_some()
            client.ws.receive_data(bytes(data))
            client.events.extend(client.ws.events())
            await trio.sleep(6)  # the client stalls past ping_timeout: closed with 1011
            events = await client.read_until(
                lambda events: any(isinstance(e, CloseConnection) for e in events))
    texts = [e.data for e in events if isinstance(e, TextMessage)]
    assert "".join(texts) == text  # whole (in one or more pieces), never torn or doubled
    close = events[-1]
    assert isinstance(close, CloseConnection) and close.code == CloseCode.INTERNAL_ERROR


async def test_a_peer_that_is_gone_is_left_to_the_writer() -> None:
    path, _, _, theirs = _path()
    await theirs.aclose()
    path._send = _raise_broken
    assert path.write(frame_text(b"x")) is Written.NONE


def _raise_broken(data: memoryview) -> int:
    raise trio.BrokenResourceError("gone")


# --- whole connections, read by a client of our own ----------------------------------------------


class RawClient:
    """A WebSocket client on wsproto that reads only when told to."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []
        self._text = ""

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def request(self, **frame: Any) -> None:
        await self.send(TextMessage(json.dumps(frame)))

    async def read_until(self, done: Any) -> list[Event]:
        """Read until ``done(events)``; returns the events read (texts joined, in order)."""
        while not done(self.events):
            data = await self.stream.receive_some()
            if not data:
                break
            self.ws.receive_data(bytes(data))
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._text += event.data
                    if event.message_finished:
                        self.events.append(TextMessage(self._text))
                        self._text = ""
                else:
                    self.events.append(event)
        return self.events

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(e.data) for e in self.events if isinstance(e, TextMessage)]

    async def replies(self, count: int) -> list[dict[str, Any]]:
        await self.read_until(lambda events: len(self.frames()) >= count)
        return self.frames()


@asynccontextmanager
async def raw_client(memory: MemoryRelay, buffer: int) -> AsyncIterator[RawClient]:
    stream = await memory.listener.connect(buffer=buffer)
    client = RawClient(stream)
    await client.send(Request(host="relay.test", target="/ws"))
    await client.read_until(lambda events: any(isinstance(e, AcceptConnection) for e in events))
    # auth_required may have come with the handshake's answer.
    client.events = [e for e in client.events if not isinstance(e, AcceptConnection)]
    await client.request(id="a", type="auth", pin=PIN)
    await client.request(id="s", type="subscribe", resource="chat", resourceId="c1")
    # auth_required, auth_success, subscribed
    assert [f["type"] for f in await client.replies(3)] == [
        "auth_required", "auth_success", "subscribed"]
    client.events.clear()
    try:
        yield client
    finally:
        await stream.aclose()


@pytest.fixture
async def memory(memory_backend: MemoryBackend) -> AsyncIterator[MemoryRelay]:
    memory_backend.add_chat("p1", "c1")
    config = RelayConfig(outbound_queue_size=8)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        yield relay


def connection_of(memory: MemoryRelay) -> Connection:
    (connection,) = memory.relay._connections
    return connection


async def test_memory_connections_take_the_direct_path(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    client = await memory.connect(authenticate=PIN)
    connection = connection_of(memory)
    assert connection.direct is not None
    # What wsproto kept of the opening handshake is freed once the connection is open.
    assert connection.ws._wsproto.handshake._h11_connection is None
    await client.subscribe("chat", "c1")
    await client.close()


async def test_without_direct_writes_every_frame_goes_through_trio_websocket(
    memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    memory_backend.add_chat("p1", "c1")
    config = RelayConfig(direct_writes=False)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        client = await memory.connect(authenticate=PIN)
        assert connection_of(memory).direct is None
        await client.subscribe("chat", "c1")
        memory_backend.add_message("c1", "plain")
        assert (await client.next_push())["data"]["message"]["content"] == "plain"


async def test_frames_cut_by_a_small_buffer_arrive_whole_and_in_order(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    async with raw_client(memory, buffer=7) as client:
        for i in range(5):
            memory_backend.add_message("c1", f"{i}:{BIG}")
        frames = await client.replies(5)
        assert [f["data"]["message"]["content"] for f in frames] == [
            f"{i}:{BIG}" for i in range(5)]
        seqs = [f["seq"] for f in frames]
        assert seqs == list(range(seqs[0], seqs[0] + 5))


async def test_a_pong_waits_for_the_half_sent_frame(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    async with raw_client(memory, buffer=64) as client:
        memory_backend.add_message("c1", "first " + BIG)  # the kernel takes 64 bytes of it
        await trio.testing.wait_all_tasks_blocked()
        owned = connection_of(memory)._stream
        assert owned is not None and owned.busy  # the rest is owed
        await client.send(Ping(b"are you there"))  # trio-websocket answers with a pong ...
        await trio.testing.wait_all_tasks_blocked()
        memory_backend.add_message("c1", "second")  # ... and a push follows it
        events = await client.read_until(lambda events: len(events) >= 3)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TextMessage", "Pong", "TextMessage"]
    first, pong, second = events
    assert isinstance(pong, Pong) and pong.payload == b"are you there"
    assert isinstance(first, TextMessage) and json.loads(first.data)["data"]["message"][
        "content"] == "first " + BIG
    assert isinstance(second, TextMessage) and "second" in second.data


async def test_a_close_during_a_half_sent_frame(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory, buffer=64) as client:
        memory_backend.add_message("c1", "first " + BIG)
        await trio.testing.wait_all_tasks_blocked()
        await client.send(CloseConnection(code=1000, reason="bye"))
        events = await client.read_until(
            lambda events: any(isinstance(e, CloseConnection) for e in events))
    assert [type(e).__name__ for e in events] == ["TextMessage", "CloseConnection"]
    close = events[1]
    assert isinstance(close, CloseConnection) and close.code == 1000
    await trio.sleep(memory.config.resume_grace)  # the chat's history is kept that long
    assert await memory.quiet_statistics() == baseline


async def test_a_client_whose_kernel_refuses_writes_is_closed_alone_as_slow(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    baseline = await memory.quiet_statistics()
    watcher = await memory.connect(authenticate=PIN)
    await watcher.subscribe("chat", "c1")
    async with raw_client(memory, buffer=64) as slow:
        # The slow client reads nothing: its buffer fills, then its queue (8), then it is out.
        for i in range(12):
            memory_backend.add_message("c1", f"{i}:{BIG}")
        await trio.testing.wait_all_tasks_blocked()
        # The other subscriber got every push.
        pushes = await watcher.next_pushes(12)
        assert [p["data"]["message"]["content"] for p in pushes] == [
            f"{i}:{BIG}" for i in range(12)]
        events = await slow.read_until(
            lambda events: any(isinstance(e, CloseConnection) for e in events))
        *texts, close = events
        assert isinstance(close, CloseConnection)
        assert close.code == CloseCode.SLOW_CONSUMER
        # What it got before the close is whole, in order, a prefix of the pushes.
        contents = [json.loads(t.data)["data"]["message"]["content"]
                    for t in texts if isinstance(t, TextMessage)]
        assert contents == [f"{i}:{BIG}" for i in range(len(contents))]
        assert memory.relay.counters.slow_closes == 1
    await watcher.close()
    await trio.sleep(memory.config.resume_grace)
    assert await memory.quiet_statistics() == baseline


# --- real sockets ------------------------------------------------------------------------------


async def test_a_loopback_client_that_stops_reading_is_closed_as_slow(tmp_path: Any) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    config = RelayConfig(outbound_queue_size=4, close_timeout=0.5)
    async with open_relay_on_loopback(backend, config) as (relay, port):
        # A raw socket with a small receive buffer that never reads after the handshake.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        client = RawClient(stream)
        await client.send(Request(host="relay.test", target="/ws"))
        await client.read_until(lambda ev: any(isinstance(e, AcceptConnection) for e in ev))
        await client.request(id="a", type="auth", pin=PIN)
        await client.request(id="s", type="subscribe", resource="chat", resourceId="c1")
        await client.replies(3)
        (connection,) = relay._connections
        assert connection.direct is not None
        with trio.fail_after(10):
            for i in range(2000):
                backend.add_message("c1", f"{i}:{BIG}")
                await trio.lowlevel.checkpoint()
                if relay.counters.slow_closes:
                    break
        assert relay.counters.slow_closes == 1
        await stream.aclose()
        with trio.fail_after(10):
            while relay.statistics().connections:  # noqa: ASYNC110  # no event to wait on
                await trio.sleep(0.01)


async def test_tls_connections_take_the_plain_path() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_relay_on_loopback(backend, RelayConfig(), server_context) as (relay, port):
        async with open_loopback_client(f"wss://127.0.0.1:{port}/ws",
                                        ssl_context=client_context) as ws:
            await ws.send({"id": "a", "type": "auth", "pin": PIN})
            assert (await ws.reply_to("a"))["type"] == "auth_success"
            (connection,) = relay._connections
            assert connection.direct is None
            await ws.send({"id": "s", "type": "subscribe", "resource": "chat",
                           "resourceId": "c1"})
            await ws.reply_to("s")
            backend.add_message("c1", "over tls")
            push = await ws.next_push()
            if push["type"] == "auth_required":  # held while waiting for the replies
                push = await ws.next_push()
            assert push["data"]["message"]["content"] == "over tls"


@asynccontextmanager
async def open_relay_on_loopback(
    backend: MemoryBackend, config: RelayConfig, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Any, int]]:
    from trio_relay import open_relay

    async with open_relay(backend, pin=PIN, config=config) as relay:
        port = await relay.start_serving("127.0.0.1", 0, ssl_context=ssl_context)
        yield relay, port


def test_pyproject_pins_the_releases_the_direct_path_checks() -> None:
    from pathlib import Path

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pins = {d.split(">")[0].replace("-", "_"): d for d in pyproject["project"]["dependencies"]}
    assert pins["trio_websocket"] == "trio-websocket>=0.12.2,<0.13"
    assert direct.SUPPORTED["trio_websocket"] == ("0.12",)
    assert pins["wsproto"] == "wsproto>=1.2,<1.4"
    assert direct.SUPPORTED["wsproto"] == ("1.2", "1.3")
