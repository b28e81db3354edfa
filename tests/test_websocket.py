"""The relay's open WebSockets (`trio_relay._server.websocket.ServerWebSocket`): pushes framed once
and written straight into each client's stream, what the kernel does not take queued whole.

The bytes a client reads are parsed by a wsproto client of our own (`tests/_rawws.py`), so a
frame cut short or doubled, or a pong or close frame written into the middle of a data frame,
fails the parse. Small buffers (`memory_socket_pair`) make the "kernel" take part of a frame,
or refuse it. A few tests use real loopback sockets, for what only they can do.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from _helpers import wait_until
from _rawws import BINARY, CLOSE, TEXT, RawClient, close_payload, frame, raw_client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from trio_relay import CloseCode, RelayConfig
from trio_relay._memory_streams import MemorySocketStream, memory_socket_pair
from trio_relay._server.connection import Connection as RelayConnection
from trio_relay._server.websocket import ServerWebSocket, nonblocking_writer
from trio_relay._wire.framing import frame_text
from trio_relay.testing import (
    MemoryBackend,
    MemoryRelay,
    open_loopback_client,
    open_memory_relay,
)

PIN = "424242"
BIG = "x" * 3000  # a push of about 3 KB: far more than the small buffers below


# --- framing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_push_is_framed_as_wsproto_frames_it(size: int) -> None:
    text = "é" * (size // 2) + "y" * (size % 2)
    by_wsproto = Connection(ConnectionType.SERVER).send(TextMessage(text))
    assert frame_text(text.encode()) == by_wsproto


def test_which_streams_take_writes_at_once() -> None:
    # The in-memory socket (and a real one) take what fits without waiting; trio's memory
    # streams and TLS streams cannot, so every frame goes through the writer task.
    assert nonblocking_writer(memory_socket_pair()[0]) is not None
    for stream in (trio.testing.memory_stream_pair()[0],
                   trio.testing.lockstep_stream_pair()[0]):
        assert nonblocking_writer(stream) is None


# --- one ServerWebSocket, on a memory socket ------------------------------------------------------


def _server(stream: trio.abc.Stream, *, max_backlog: int = 8, write_at_once: bool = True,
            close_timeout: float = 5) -> ServerWebSocket:
    return ServerWebSocket(stream, Connection(ConnectionType.SERVER),
                           max_message_size=1 << 16, max_backlog=max_backlog,
                           close_timeout=close_timeout, write_at_once=write_at_once)


async def _nothing() -> None:
    pass


async def _read_bytes(stream: trio.abc.Stream, count: int) -> bytes:
    received = b""
    while len(received) < count:
        chunk = await stream.receive_some()
        assert chunk, f"the stream ended after {len(received)} of {count} bytes"
        received += chunk
    return received


@pytest.mark.parametrize("write_at_once", [True, False])
async def test_a_partial_write_is_queued_and_written_first_and_whole(
    autojump_clock: MockClock, write_at_once: bool
) -> None:
    ours, theirs = memory_socket_pair(4)
    server = _server(ours, write_at_once=write_at_once)
    first, second = frame_text(b"0123456789"), frame_text(b"abc")
    assert server.send_frame(first)
    assert server.backlog == 1  # the rest of it (all of it, through the writer)
    assert server.send_frame(second)  # nothing may overtake what is queued
    assert server.backlog == 2
    client = RawClient(theirs, opened=True)
    async with trio.open_nursery() as nursery:
        # The writer starts with the reader: what was queued before goes first.
        nursery.start_soon(server.read, nursery, lambda text: _nothing(), _nothing)
        assert await _read_bytes(theirs, len(first) + len(second)) == first + second
        assert server.backlog == 0
        await client.send(CloseConnection(1000))
        close = await client.closed()
    assert close.code == 1000 and server.closed == (1000, "")


async def test_past_the_backlog_limit_a_frame_is_refused_whole(autojump_clock: MockClock) -> None:
    ours, theirs = memory_socket_pair(4)
    server = _server(ours, max_backlog=3)
    frames = [frame_text(f"frame {i}".encode()) for i in range(4)]
    client = RawClient(theirs, opened=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read, nursery, lambda text: _nothing(), _nothing)
        await trio.testing.wait_all_tasks_blocked()
        assert [server.send_frame(f) for f in frames] == [True, True, True, False]
        # Control frames are never refused: a ping and a close still go after the backlog.
        server.ping(trio.current_time())
        assert server.backlog == 4
        server.close(CloseCode.SLOW_CONSUMER, "slow", drop_backlog=True)
        assert server.closing
        assert server.send_frame(frames[1])  # ignored once closing, never refused
        close = await client.closed()
    # The frame already half written went out whole; the rest of the backlog was dropped.
    assert [type(e).__name__ for e in client.events] == ["TextMessage", "CloseConnection"]
    assert [e.data for e in client.events if isinstance(e, TextMessage)] == ["frame 0"]
    assert (close.code, close.reason) == (CloseCode.SLOW_CONSUMER, "slow")
    assert server.closed == (CloseCode.SLOW_CONSUMER, "slow")


async def test_dropping_the_backlog_before_reading_keeps_the_half_written_frame(
    autojump_clock: MockClock,
) -> None:
    ours, theirs = memory_socket_pair(4)
    server = _server(ours)
    assert server.send_frame(frame_text(b"half written"))  # 4 bytes out, the rest queued
    server.close(CloseCode.SLOW_CONSUMER, "slow", drop_backlog=True)
    client = RawClient(theirs, opened=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read, nursery, lambda text: _nothing(), _nothing)
        close = await client.closed()
    # Today: the client's parser reads the close frame as the rest of the text frame.
    assert [e.data for e in client.events if isinstance(e, TextMessage)] == ["half written"]
    assert close.code == CloseCode.SLOW_CONSUMER


class _GoneStream(MemorySocketStream):
    """A socket whose peer has vanished: reads wait forever (a half-open connection), writes
    fail as the kernel's would once it knows (EPIPE, ECONNRESET)."""

    gone = False

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        if self.gone:
            raise trio.BrokenResourceError("connection reset by peer")
        return super().send_nowait(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.gone:
            raise trio.BrokenResourceError("connection reset by peer")
        await super().send_all(data)


def _gone_pair(buffer: int = 1 << 16) -> tuple[_GoneStream, MemorySocketStream]:
    ours, theirs = memory_socket_pair(buffer)
    gone = _GoneStream(ours._out, ours._in)
    return gone, theirs


@pytest.mark.parametrize("write_at_once", [True, False])
async def test_a_failed_write_ends_the_reader(
    autojump_clock: MockClock, write_at_once: bool
) -> None:
    ours, _theirs = _gone_pair()
    server = _server(ours, write_at_once=write_at_once)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read, nursery, lambda text: _nothing(), _nothing)
        await trio.testing.wait_all_tasks_blocked()
        ours.gone = True
        start = trio.current_time()
        assert server.send_frame(frame_text(b"into the void"))  # no exception for the caller
    assert trio.current_time() == start  # the reader stopped at once, no timeout waited for
    assert server.closed == (1006, "")
    assert server.backlog == 0
    server.send_frame(frame_text(b"more"))  # once broken, writes are dropped quietly


# --- whole connections --------------------------------------------------------------------------


@pytest.fixture
async def memory(memory_backend: MemoryBackend) -> AsyncIterator[MemoryRelay]:
    memory_backend.add_chat("p1", "c1")
    config = RelayConfig(outbound_queue_size=8)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        yield relay


def connection_of(memory: MemoryRelay) -> RelayConnection:
    (connection,) = memory.relay._connections
    return connection


def contents(events: list[Any]) -> list[str]:
    return [json.loads(e.data)["data"]["message"]["content"]
            for e in events if isinstance(e, TextMessage)]


async def test_memory_connections_write_at_once(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    client = await memory.connect(authenticate=PIN)
    assert nonblocking_writer(connection_of(memory).socket.stream) is not None
    await client.subscribe("chat", "c1")
    await client.close()


async def test_without_direct_writes_every_frame_goes_through_the_writer(
    memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    memory_backend.add_chat("p1", "c1")
    config = RelayConfig(direct_writes=False, outbound_queue_size=8)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        baseline = await memory.quiet_statistics()
        client = await memory.connect(authenticate=PIN)
        await client.subscribe("chat", "c1")
        memory_backend.add_message("c1", "plain")
        assert (await client.next_push())["data"]["message"]["content"] == "plain"
        await client.close()
        # Small buffers: the writer's frames arrive whole and in order too.
        async with raw_client(memory, buffer=7, pin=PIN, subscribe="c1") as raw:
            for i in range(5):
                memory_backend.add_message("c1", f"{i}:{BIG}")
            await raw.replies(5)
            assert contents(raw.events) == [f"{i}:{BIG}" for i in range(5)]
            await raw.send(CloseConnection(1000))
            assert (await raw.closed()).code == 1000
        await trio.sleep(memory.config.resume_grace)
        assert await memory.quiet_statistics() == baseline


async def test_frames_cut_by_a_small_buffer_arrive_whole_and_in_order(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    async with raw_client(memory, buffer=7, pin=PIN, subscribe="c1") as client:
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
    async with raw_client(memory, buffer=64, pin=PIN, subscribe="c1") as client:
        memory_backend.add_message("c1", "first " + BIG)  # the kernel takes 64 bytes of it
        await trio.testing.wait_all_tasks_blocked()
        assert connection_of(memory).socket.backlog == 1  # the rest is queued
        await client.send(Ping(b"are you there"))  # the relay answers with a pong ...
        await trio.testing.wait_all_tasks_blocked()
        memory_backend.add_message("c1", "second")  # ... and a push follows it
        events = await client.read_until(lambda events: len(events) >= 3)
    assert [type(e).__name__ for e in events] == ["TextMessage", "Pong", "TextMessage"]
    first, pong, second = events
    assert isinstance(pong, Pong) and pong.payload == b"are you there"
    assert contents([first]) == ["first " + BIG]
    assert contents([second]) == ["second"]


@pytest.mark.parametrize("push_at", [0, 10, 12])
async def test_a_ping_timing_out_while_a_frame_is_half_sent_leaves_it_whole(
    memory_backend: MemoryBackend, autojump_clock: MockClock, push_at: float
) -> None:
    """The relay pings at 10 s; unanswered, it closes with 1011 at 15 s. A push half
    written before the ping, at the same instant, or after it: each frame goes out whole,
    the ping and the close between frames, never inside one."""
    memory_backend.add_chat("p1", "c1")
    config = RelayConfig(ping_interval=10, ping_timeout=5, close_timeout=30)
    text = "big " + "".join(f"{i:04d}" for i in range(750))
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        baseline = await memory.quiet_statistics()
        async with raw_client(memory, buffer=64, pin=PIN, subscribe="c1") as client:
            start = trio.current_time()
            await trio.sleep_until(start + push_at)
            memory_backend.add_message("c1", text)  # 64 bytes go at once, the rest is queued
            await trio.testing.wait_all_tasks_blocked()
            assert connection_of(memory).socket.backlog >= 1
            await trio.sleep_until(start + 16)  # the client read nothing: no pong
            close = await client.closed()
        await trio.sleep(memory.config.resume_grace)
        assert await memory.quiet_statistics() == baseline
    assert contents(client.events) == [text]  # whole, never torn or doubled
    kinds = [type(e).__name__ for e in client.events]
    assert sorted(kinds[:2]) == ["Ping", "TextMessage"] and kinds[2:] == ["CloseConnection"]
    assert close.code == CloseCode.INTERNAL_ERROR


async def test_a_close_during_a_half_sent_frame(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory, buffer=64, pin=PIN, subscribe="c1") as client:
        memory_backend.add_message("c1", "first " + BIG)
        await trio.testing.wait_all_tasks_blocked()
        await client.send(CloseConnection(code=1000, reason="bye"))
        close = await client.closed()
    assert [type(e).__name__ for e in client.events] == ["TextMessage", "CloseConnection"]
    assert contents(client.events) == ["first " + BIG]
    assert (close.code, close.reason) == (1000, "bye")
    await trio.sleep(memory.config.resume_grace)  # the chat's history is kept that long
    assert await memory.quiet_statistics() == baseline


async def test_a_client_whose_kernel_refuses_writes_is_closed_alone_as_slow(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    baseline = await memory.quiet_statistics()
    watcher = await memory.connect(authenticate=PIN)
    await watcher.subscribe("chat", "c1")
    async with raw_client(memory, buffer=64, pin=PIN, subscribe="c1") as slow:
        # The slow client reads nothing: its buffer fills, then its queue (8), then it is out.
        for i in range(12):
            memory_backend.add_message("c1", f"{i}:{BIG}")
        await trio.testing.wait_all_tasks_blocked()
        # The other subscriber got every push.
        pushes = await watcher.next_pushes(12)
        assert [p["data"]["message"]["content"] for p in pushes] == [
            f"{i}:{BIG}" for i in range(12)]
        close = await slow.closed()
        assert close.code == CloseCode.SLOW_CONSUMER
        # What it got before the close is whole, in order, a prefix of the pushes.
        got = contents(slow.events)
        assert got == [f"{i}:{BIG}" for i in range(len(got))]
        assert memory.relay.counters.slow_closes == 1
    await watcher.close()
    await trio.sleep(memory.config.resume_grace)
    assert await memory.quiet_statistics() == baseline


async def test_a_slow_client_that_never_answers_the_close_is_dropped(
    memory: MemoryRelay, memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory, buffer=64, pin=PIN, subscribe="c1"):
        # It reads nothing at all: not even the close frame gets through.
        for i in range(12):
            memory_backend.add_message("c1", f"{i}:{BIG}")
        await trio.testing.wait_all_tasks_blocked()
        assert memory.relay.counters.slow_closes == 1
        await trio.sleep(memory.config.close_timeout - 0.1)
        assert (await memory.quiet_statistics()).connections == 1
        await trio.sleep(0.2)  # close_timeout is up: the stream is dropped
        assert (await memory.quiet_statistics()).connections == 0
    await trio.sleep(memory.config.resume_grace)
    assert await memory.quiet_statistics() == baseline


async def test_a_peer_that_is_gone_ends_the_connection_and_frees_everything(
    memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    """The kernel reports the peer gone on a write (a reset): the push that found out ends
    the connection at once, its subscriptions and tasks go, and the other clients go on."""
    memory_backend.add_chat("p1", "c1")

    class Listener(trio.abc.Listener[trio.abc.Stream]):
        def __init__(self) -> None:
            self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](1)

        async def accept(self) -> trio.abc.Stream:
            return await self.receive.receive()

        async def aclose(self) -> None:
            self.receive.close()
            await trio.lowlevel.checkpoint()

    async with open_memory_relay(memory_backend, pin=PIN) as memory:
        listener = Listener()
        await memory.relay._nursery.start(memory.relay.serve_listeners, [listener])
        watcher = await memory.connect(authenticate=PIN)
        await watcher.subscribe("chat", "c1")
        baseline = await memory.quiet_statistics()
        ours, theirs = _gone_pair()
        await listener.send.send(ours)
        client = RawClient(theirs)
        await client.handshake()
        await client.request(id="a", type="auth", pin=PIN)
        await client.request(id="s", type="subscribe", resource="chat", resourceId="c1")
        await client.replies(3)
        assert (await memory.quiet_statistics()).subscriptions == 2
        ours.gone = True
        start = trio.current_time()
        memory_backend.add_message("c1", "after the reset")
        assert (await watcher.next_push())["data"]["message"]["content"] == "after the reset"
        assert await memory.quiet_statistics() == baseline
        assert trio.current_time() == start  # at once, not after a ping timeout


# --- real sockets ------------------------------------------------------------------------------


@asynccontextmanager
async def open_relay_on_loopback(
    backend: MemoryBackend, config: RelayConfig, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Any, int]]:
    from trio_relay import open_relay

    async with open_relay(backend, pin=PIN, config=config) as relay:
        port = await relay.start_serving("127.0.0.1", 0, ssl_context=ssl_context)
        yield relay, port


async def test_a_loopback_client_that_stops_reading_is_closed_as_slow() -> None:
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
        await client.handshake()
        await client.request(id="a", type="auth", pin=PIN)
        await client.request(id="s", type="subscribe", resource="chat", resourceId="c1")
        await client.replies(3)
        client.events.clear()
        (connection,) = relay._connections
        assert nonblocking_writer(connection.socket.stream) is not None  # os.write on the fd
        with trio.fail_after(10):
            for i in range(2000):
                backend.add_message("c1", f"{i}:{BIG}")
                await trio.lowlevel.checkpoint()
                if relay.counters.slow_closes:
                    break
        assert relay.counters.slow_closes == 1
        # Reading now: whole frames in order, then the close, then the end.
        with trio.fail_after(10):
            close = await client.closed()
        assert close.code == CloseCode.SLOW_CONSUMER
        got = contents(client.events)
        assert got == [f"{i}:{BIG}" for i in range(len(got))]
        await stream.aclose()
        await wait_until(lambda: not relay.statistics().connections)


async def test_tls_connections_work_through_the_writer() -> None:
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
            assert isinstance(connection.socket.stream, trio.SSLStream)
            assert nonblocking_writer(connection.socket.stream) is None
            await ws.send({"id": "s", "type": "subscribe", "resource": "chat",
                           "resourceId": "c1"})
            await ws.reply_to("s")
            for i in range(20):
                backend.add_message("c1", f"{i}:{BIG}")
            pushes = [p for p in await ws.next_pushes(21) if p["type"] != "auth_required"]
            assert [p["data"]["message"]["content"] for p in pushes[:20]] == [
                f"{i}:{BIG}" for i in range(20)]
        await wait_until(lambda: not relay.statistics().connections)


async def test_shutdown_during_a_half_sent_frame_finishes_it_then_closes_1001(
    memory_backend: MemoryBackend, autojump_clock: MockClock
) -> None:
    memory_backend.add_chat("p1", "c1")
    async with trio.open_nursery() as nursery:
        async with open_memory_relay(memory_backend, pin=PIN) as memory:
            stream = await memory.listener.connect(buffer=64)
            client = RawClient(stream)
            await client.handshake()
            await client.request(id="a", type="auth", pin=PIN)
            await client.request(id="s", type="subscribe", resource="chat", resourceId="c1")
            await client.replies(3)
            client.events.clear()
            memory_backend.add_message("c1", "last " + BIG)
            await trio.testing.wait_all_tasks_blocked()
            assert connection_of(memory).socket.backlog == 1
            closed: list[CloseConnection] = []

            async def read() -> None:
                closed.append(await client.closed())

            nursery.start_soon(read)  # reads while the relay shuts down
            start = trio.current_time()
        assert trio.current_time() - start < 1  # the client answered: no timeout waited
    assert contents(client.events) == ["last " + BIG]
    assert closed[0].code == CloseCode.GOING_AWAY


async def test_a_tls_client_that_stops_reading_is_closed_as_slow_and_freed() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    config = RelayConfig(outbound_queue_size=4, close_timeout=0.5)
    async with open_relay_on_loopback(backend, config, server_context) as (relay, port):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SSLStream(trio.SocketStream(sock), client_context,
                                server_hostname="127.0.0.1")
        client = RawClient(stream)
        await client.handshake()
        await client.request(id="a", type="auth", pin=PIN)
        await client.request(id="s", type="subscribe", resource="chat", resourceId="c1")
        await client.replies(3)
        with trio.fail_after(10):
            for i in range(2000):
                backend.add_message("c1", f"{i}:{BIG}")
                await trio.lowlevel.checkpoint()
                if relay.counters.slow_closes:
                    break
        assert relay.counters.slow_closes == 1
        # It never reads again: the relay gives up on the close after close_timeout.
        await wait_until(lambda: not relay.statistics().connections)
        assert relay.statistics().subscriptions == 0
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize(("data", "code"), [
    (frame(TEXT, b"{}", rsv=4), CloseCode.PROTOCOL_ERROR),
    (frame(TEXT, b"\xff"), CloseCode.INVALID_PAYLOAD),
    (frame(BINARY, b"\x00"), CloseCode.UNSUPPORTED_DATA),
    (frame(CLOSE, close_payload(1000, b"bye")), 1000),
], ids=["rsv", "utf8", "binary", "client-close"])
async def test_a_bad_frame_over_tls_gets_its_close_through_the_writer(
    data: bytes, code: int
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with open_relay_on_loopback(MemoryBackend(), RelayConfig(), server_context) as (
            relay, port):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port,
                                                     ssl_context=client_context)
        client = RawClient(stream)
        await client.handshake()
        await client.send_raw(data)
        with trio.fail_after(10):
            close = await client.closed()
            await client.read_until(lambda events: False)
        assert close.code == code and client.ended
        await trio.aclose_forcefully(stream)
        await wait_until(lambda: not relay.statistics().connections)


# --- every interleaving of writes, with hypothesis ----------------------------------------------

_ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(0, 400)),
    st.tuples(st.just("ping"), st.just(0)),
    st.tuples(st.just("client-ping"), st.just(0)),
    st.tuples(st.just("read"), st.integers(1, 200)),
    st.tuples(st.just("yield"), st.integers(0, 3)),
    st.tuples(st.just("close"), st.sampled_from([1000, 1013])),
), max_size=25)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, buffer=st.sampled_from([1, 7, 64, 1000]), write_at_once=st.booleans(),
       max_backlog=st.sampled_from([2, 8]))
def test_frames_are_never_torn_whatever_the_interleaving(
    ops: list[tuple[str, int]], buffer: int, write_at_once: bool, max_backlog: int
) -> None:
    """Pushes, pings, pongs and closes, written while the client reads a few bytes at a
    time: the client parses every byte, gets the pushes that were taken in order (all of
    them, or a prefix when a slow close dropped the backlog), and one close frame last."""
    accepted: list[str] = []
    received: list[Any] = []
    dropped = False

    async def scenario() -> None:
        nonlocal dropped
        ours, theirs = memory_socket_pair(buffer)
        server = _server(ours, max_backlog=max_backlog, write_at_once=write_at_once)
        client = Connection(ConnectionType.CLIENT)
        sending = trio.Lock()
        pieces: list[str] = []

        async def serve() -> None:
            async with trio.open_nursery() as nursery:
                await server.read(nursery, lambda text: _nothing(), _nothing)
                await server.flush()
                nursery.cancel_scope.cancel()
            await ours.aclose()

        async def read(max_bytes: int | None = None) -> bool:
            data = await theirs.receive_some(max_bytes)
            if not data:
                return False
            client.receive_data(bytes(data))
            for event in client.events():
                if isinstance(event, TextMessage):  # a frame arrives in pieces: join them
                    pieces.append(event.data)
                    if not event.message_finished:
                        continue
                    event = TextMessage("".join(pieces))
                    pieces.clear()
                received.append(event)
                if isinstance(event, CloseConnection) and (
                        client.state is ConnectionState.REMOTE_CLOSING):
                    async with sending:
                        await theirs.send_all(client.send(event.response()))
            return True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            # Reading first, as a Connection does (a close before it is the strict xfail
            # above).
            await trio.testing.wait_all_tasks_blocked()
            for number, (op, value) in enumerate(ops):
                if op == "push":
                    text = f"{number}:" + "p" * value
                    was_open = not server.closing
                    if server.send_frame(frame_text(text.encode())) and was_open:
                        accepted.append(text)
                elif op == "ping":
                    server.ping(trio.current_time())
                elif op == "client-ping" and client.state is ConnectionState.OPEN:
                    async with sending:
                        await theirs.send_all(client.send(Ping(b"c")))
                elif op == "read":
                    with trio.move_on_after(1):
                        await read(value)
                elif op == "yield":
                    for _ in range(value):
                        await trio.lowlevel.checkpoint()
                elif op == "close":
                    dropped = dropped or (value == 1013 and not server.closing)
                    server.close(value, drop_backlog=value == 1013)
            server.close(1000)
            with trio.fail_after(60):
                while await read():
                    pass

    trio.run(scenario, clock=MockClock(autojump_threshold=0))
    closes = [e for e in received if isinstance(e, CloseConnection)]
    assert len(closes) == 1 and received[-1] is closes[0], received
    assert closes[0].code in (1000, 1013)
    texts = [e.data for e in received if isinstance(e, TextMessage)]
    assert all(isinstance(e, (TextMessage, Ping, Pong, CloseConnection)) for e in received)
    if dropped:
        assert texts == accepted[:len(texts)]
    else:
        assert texts == accepted
