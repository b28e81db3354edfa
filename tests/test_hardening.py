"""Hardening: origins, per-address limits, keepalive, handshake limits and faults.

In memory under the autojump clock where timing matters; over real loopback sockets where
only a real socket can do it (a TCP reset).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing
from _helpers import PIN, one_chat, still_serves, wait_until
from trio_websocket import ConnectionRejected, wrap_client_stream
from wsproto.frame_protocol import Opcode

from trio_relay import CloseCode, RelayConfig, open_relay
from trio_relay._server.connection import Connection
from trio_relay.testing import (
    MemoryBackend,
    MemoryRelay,
    TestClient,
    open_memory_relay,
)

memory_backend = pytest.fixture(one_chat, name="memory_backend")


# --- origin allowlist -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed_origins", "accepted"),
    [
        (None, (), True),  # not a browser
        ("http://relay.test", (), True),  # the relay's own page (Host: relay.test)
        ("https://relay.test", (), True),
        ("http://evil.example", (), False),
        ("null", (), False),  # sandboxed frames and file:// pages
        ("http://relay.test.evil.example", (), False),
        ("http://app.example:8080", ("http://app.example:8080",), True),
        ("HTTP://APP.EXAMPLE:8080/", ("http://app.example:8080",), True),
        ("http://app.example:9090", ("http://app.example:8080",), False),
        ("http://anything.example", ("*",), True),
    ],
)
async def test_origin_allowlist(
    autojump_clock: trio.abc.Clock,
    origin: str | None,
    allowed_origins: tuple[str, ...],
    accepted: bool,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(allowed_origins=allowed_origins)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        headers = [("Origin", origin)] if origin is not None else []
        if accepted:
            client = await memory.connect(headers=headers, authenticate=PIN)
            await client.close()
        else:
            with pytest.raises(ConnectionRejected) as refused:
                await memory.connect(headers=headers)
            assert refused.value.status_code == 403
            assert refused.value.body == b"origin not allowed"
        assert (await memory.quiet_statistics()).connections == 0


# --- connections per address ------------------------------------------------------------------


async def test_connections_per_address_are_capped(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    config = RelayConfig(max_connections_per_address=2)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        first = await memory.connect(peer="10.0.0.1:1000", authenticate=PIN)
        await memory.connect(peer="10.0.0.1:1001", authenticate=PIN)
        with pytest.raises(ConnectionRejected) as refused:
            await memory.connect(peer="10.0.0.1:1002")
        assert refused.value.status_code == 429
        # Another address is not affected, and a freed slot can be used again.
        await memory.connect(peer="10.0.0.2:1000", authenticate=PIN)
        await first.close()
        await trio.testing.wait_all_tasks_blocked()
        await memory.connect(peer="10.0.0.1:1003", authenticate=PIN)
        assert memory.relay.statistics().connections == 3


# --- keepalive --------------------------------------------------------------------------------


async def test_an_hour_of_keepalive_pings_keeps_a_live_client(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    await client.subscribe("chat", "c1")
    start = trio.current_time()
    # The client's trio-websocket reader answers every ping; nothing else happens.
    await trio.sleep(3600)
    assert trio.current_time() - start == 3600
    memory_backend.emit("chat", "c1", {"still": "here"})
    assert (await client.next_push())["data"] == {"still": "here"}
    assert memory_relay.relay.statistics().connections == 1


async def test_a_peer_that_stops_answering_pings_is_closed_and_freed(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(ping_interval=20, ping_timeout=20, close_timeout=5)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        baseline = await memory.quiet_statistics()
        # A client that stops reading: its trio-websocket reader blocks on its full message
        # queue, so it answers no ping, just like a peer behind a dead network path.
        silent = await memory.connect()
        await silent.send({"id": "a", "type": "auth", "pin": PIN})
        await silent.send({"id": "s", "type": "subscribe", "resource": "chat",
                           "resourceId": "c1"})
        for n in range(3):
            memory_backend.emit("chat", "c1", {"n": n})
        assert (await memory.quiet_statistics()).connections == 1
        start = trio.current_time()
        with trio.fail_after(20 + 20 + 5 + 5):
            while memory.relay.statistics().connections:  # noqa: ASYNC110 - polls stats
                await trio.sleep(1)
        assert trio.current_time() - start >= 40  # not before a ping went unanswered
        # Its broadcaster lingers in case it comes back; after resume_grace all is gone.
        lingering = await memory.quiet_statistics()
        assert (lingering.subscriptions, lingering.broadcasters, lingering.lingering) == (0, 1, 1)
        assert sum(memory_backend.open_feeds.values()) == 1
        await trio.sleep(memory.relay.config.resume_grace + 1)
        assert await memory.quiet_statistics() == baseline
        assert memory_backend.open_feeds == {}


# --- the handshake ----------------------------------------------------------------------------


async def test_a_client_that_never_completes_the_handshake_is_dropped(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(handshake_timeout=10)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        baseline = await memory.quiet_statistics()
        stream = await memory.listener.connect()
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: relay.test\r\n")  # never finished
        start = trio.current_time()
        assert await stream.receive_some() == b""  # the relay closed it
        assert trio.current_time() - start == pytest.approx(10)
        assert await memory.quiet_statistics() == baseline
        await still_serves(memory)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"POST /ws HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 2\r\n\r\n{}",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello
        b"\x00\xff\xfe garbage \r\n\r\n",
    ],
    ids=["no-host", "post", "tls-hello", "bytes"],
)
async def test_plain_http_and_garbage_are_refused_at_once(
    autojump_clock: trio.abc.Clock, garbage: bytes, memory_relay: MemoryRelay
) -> None:
    baseline = await memory_relay.quiet_statistics()
    stream = await memory_relay.listener.connect()
    await stream.send_all(garbage)
    start = trio.current_time()
    received = b""
    while chunk := await stream.receive_some():
        received += chunk
    assert received.startswith(b"HTTP/1.1 4")  # a 4xx answer, then the stream closes
    assert trio.current_time() == start  # at once, not after the handshake timeout
    assert await memory_relay.quiet_statistics() == baseline
    await still_serves(memory_relay)


# --- faults -----------------------------------------------------------------------------------


async def test_a_ping_that_arrives_while_the_relay_closes(
    autojump_clock: trio.abc.Clock,
    memory_relay: MemoryRelay,
) -> None:
    # trio-websocket issue #184: answering a ping once the closing handshake has begun.
    baseline = await memory_relay.quiet_statistics()
    client = await memory_relay.connect()
    # The client reads nothing, so its trio-websocket reader stalls on its full queue
    # and does not answer the relay's close frame: the relay stays in its closing state.
    await client.send({"id": "a", "type": "auth", "pin": PIN})
    await client.ws.send_message(b"binary")  # the relay closes with 1003 ...
    await trio.testing.wait_all_tasks_blocked()
    # ... and before the client answers the close frame, a ping reaches the relay.
    await client.send_raw_frame(Opcode.PING, b"late ping")
    await trio.testing.wait_all_tasks_blocked()
    code, _ = await client.wait_closed()
    assert code == CloseCode.UNSUPPORTED_DATA
    assert await memory_relay.quiet_statistics() == baseline
    await still_serves(memory_relay)


async def test_a_bug_in_a_handler_closes_that_connection_1011_only(
    autojump_clock: trio.abc.Clock,
    monkeypatch: pytest.MonkeyPatch,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    dispatch = Connection._dispatch

    async def buggy(self: Connection, request: Any) -> None:
        if request.type == "create":
            raise ZeroDivisionError("a bug")
        await dispatch(self, request)

    monkeypatch.setattr(Connection, "_dispatch", buggy)
    bystander = await memory_relay.connect(authenticate=PIN)
    await bystander.subscribe("chat", "c1")
    victim = await memory_relay.connect(authenticate=PIN)
    reply = await victim.request("create", resource="chat", resourceId="p1")
    assert (reply["type"], reply["code"]) == ("error", "internal_error")
    code, _ = await victim.wait_closed()
    assert code == CloseCode.INTERNAL_ERROR == 1011
    memory_backend.emit("chat", "c1", {"after": "the bug"})
    assert (await bystander.next_push())["data"] == {"after": "the bug"}
    await still_serves(memory_relay)


async def test_shutdown_closes_every_client_with_1001(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    codes: list[int] = []

    async def watch(client: TestClient) -> None:
        code, _ = await client.wait_closed()
        codes.append(code)

    async with trio.open_nursery() as watchers:
        async with open_memory_relay(memory_backend, pin=PIN) as memory:
            for _ in range(10):
                client = await memory.connect(authenticate=PIN)
                await client.subscribe("chat", "c1")
                watchers.start_soon(watch, client)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
        assert trio.current_time() - start < 1  # nobody waited for a timeout
    assert codes == [CloseCode.GOING_AWAY] * 10  # and nobody saw 1006
    assert memory_backend.feeds_closed == memory_backend.feeds_opened


# --- TCP resets over real loopback ------------------------------------------------------------


async def _reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@pytest.mark.parametrize("when", ["before-handshake", "mid-handshake", "after-handshake",
                                  "after-auth", "mid-stream"])
async def test_tcp_reset_at_any_point_leaves_nothing_behind(
    when: str, memory_backend: MemoryBackend
) -> None:
    # A reset is a drop: the chat's broadcaster lingers for resume_grace (real time here).
    config = RelayConfig(resume_grace=0.5)
    async with open_relay(memory_backend, pin=PIN, config=config) as relay:
        port = await relay.start_serving("127.0.0.1", 0)
        await trio.testing.wait_all_tasks_blocked()
        baseline = relay.statistics()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            # Each case waits until the relay is at the point being tested (a real socket:
            # nothing to wait on but what the relay reports).
            if when in ("before-handshake", "mid-handshake"):
                if when == "mid-handshake":
                    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
                await wait_until(lambda: relay.statistics().tasks > baseline.tasks, 5)
            else:
                ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/ws")
                await wait_until(lambda: relay.statistics().connections == 1, 5)
                if when in ("after-auth", "mid-stream"):
                    await ws.send_message(json.dumps({"id": 1, "type": "auth", "pin": PIN}))
                    await ws.send_message(json.dumps({"id": 2, "type": "subscribe",
                                                      "resource": "chat", "resourceId": "c1"}))
                    await wait_until(lambda: relay.statistics().subscriptions == 1, 5)
                if when == "mid-stream":
                    for n in range(200):
                        memory_backend.emit("chat", "c1", {"n": n, "pad": "x" * 1000})
                    with trio.fail_after(5):  # the first push is here: the rest are on the way
                        while "n" not in (json.loads(await ws.get_message()).get("data") or {}):
                            pass
            await _reset(stream)
            nursery.cancel_scope.cancel()
        # Everything goes, the lingering broadcaster and its upstream after resume_grace.
        await wait_until(lambda: relay.statistics() == baseline, 5)
        assert memory_backend.open_feeds == {}
        assert memory_backend.feeds_closed == memory_backend.feeds_opened
        # The relay is unharmed: the next client is served.
        async with trio.open_nursery() as nursery:
            fresh = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                ws = await wrap_client_stream(nursery, fresh, "127.0.0.1", "/ws")
                assert json.loads(await ws.get_message())["type"] == "auth_required"
                await ws.aclose()
            finally:
                await fresh.aclose()
