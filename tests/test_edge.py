"""Bad input at the server's edge (`trio_relay._server.edge`, `trio_relay._server.websocket`):
HTTP/1.1 and RFC 6455 abuse, as a hostile client would send it, byte by byte.

Each case must get the standard answer (an HTTP status, or a close frame with the code RFC
6455 names), a log line, and nothing else: no traceback, no hung task, no leaked connection
(the relay's statistics return to what they were). In memory, under the autojump clock.
"""

from __future__ import annotations

import base64
import re
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from _helpers import still_serves, wait_until
from _rawws import (
    BINARY,
    CLOSE,
    CONTINUATION,
    MASK,
    PING,
    PONG,
    TEXT,
    RawClient,
    close_payload,
    frame,
    raw_client,
    read_to_end,
    upgrade_request,
)
from loguru import logger
from trio.testing import MockClock
from wsproto.events import CloseConnection, Pong, Request, TextMessage

from trio_relay import CloseCode, RelayConfig, open_relay
from trio_relay._config import RelayStatistics
from trio_relay._server.edge import MAX_HEAD
from trio_relay.testing import MemoryBackend, MemoryRelay, open_memory_relay

PIN = "424242"
MAX_MESSAGE = 1000
CONFIG = RelayConfig(handshake_timeout=10, close_timeout=5, auth_timeout=30,
                     max_message_size=MAX_MESSAGE)


@pytest.fixture
async def memory(memory_backend: MemoryBackend) -> AsyncIterator[MemoryRelay]:
    memory_backend.add_chat("p1", "c1")
    async with open_memory_relay(memory_backend, pin=PIN, config=CONFIG) as relay:
        yield relay


async def assert_idle(memory: MemoryRelay, baseline: RelayStatistics) -> None:
    """The relay holds what it held before: no connection, task or subscription left, and
    no stream counted against its address (the per-address cap)."""
    assert await memory.quiet_statistics() == baseline
    assert memory.relay._edge.per_address == {}


def assert_no_traceback(records: list[Any]) -> None:
    bad = [r["message"] for r in records
           if r["exception"] is not None or r["level"].no >= logger.level("ERROR").no]
    assert not bad, f"errors logged: {bad}"


def logged(records: list[Any], text: str) -> list[str]:
    """The messages of every line logged that holds ``text``."""
    return [r["message"] for r in records if text in r["message"]]


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match, f"not an HTTP answer: {answer[:80]!r}"
    return int(match[1])


def headers_of(answer: bytes) -> dict[str, str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in head)}


KEY_16 = base64.b64encode(b"0123456789abcdef").decode()

#: (raw request, status, header that must be in the answer)
REFUSALS = [
    pytest.param(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, None,
                 id="request-line-too-large"),
    pytest.param(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431,
                 None, id="header-too-large"),
    pytest.param(b"GET /ws HTTP/1.1\r\nHost: x\r\n"
                 + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(200)) + b"\r\n",
                 431, None, id="too-many-headers"),
    pytest.param(b"GET /" + b"a" * 40_000, 431, None, id="request-line-without-end"),
    pytest.param(upgrade_request(ws_version="8"), 426, ("sec-websocket-version", "13"),
                 id="websocket-version-8"),
    pytest.param(upgrade_request(ws_version=None), 426, ("sec-websocket-version", "13"),
                 id="websocket-version-missing"),
    pytest.param(upgrade_request(ws_version="13, 8"), 426, ("sec-websocket-version", "13"),
                 id="websocket-version-list"),
    pytest.param(upgrade_request(key=base64.b64encode(b"too short").decode()), 400, None,
                 id="key-9-bytes"),
    pytest.param(upgrade_request(key=base64.b64encode(b"x" * 17).decode()), 400, None,
                 id="key-17-bytes"),
    pytest.param(upgrade_request(key="!!!!not base64!!!!!!!!=="), 400, None,
                 id="key-not-base64"),
    pytest.param(upgrade_request(key=KEY_16[:-2]), 400, None, id="key-without-padding"),
    pytest.param(upgrade_request(key=""), 400, None, id="key-empty"),
    pytest.param(upgrade_request(key=None), 400, None, id="key-missing"),
    pytest.param(upgrade_request(method="POST"), 400, None, id="post-upgrade"),
    pytest.param(upgrade_request(method="PUT"), 400, None, id="put-upgrade"),
    pytest.param(upgrade_request(version="HTTP/1.0"), 400, None, id="http-1.0-upgrade"),
    pytest.param(upgrade_request(connection="keep-alive"), 400, None,
                 id="connection-without-upgrade"),
    pytest.param(upgrade_request(connection=None), 400, None, id="connection-missing"),
    pytest.param(upgrade_request(version="HTTP/2.0"), 505, None, id="http-2-upgrade",),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n", 400,
                 None, id="unparsable-body"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 400, None,
                 id="tls-client-hello"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, None, id="no-host"),
    pytest.param(upgrade_request(extra=("Origin: http://evil.example",)), 403, None,
                 id="foreign-origin"),
]


@pytest.mark.parametrize(("raw", "status", "header"), REFUSALS)
async def test_a_bad_request_gets_its_status_a_log_line_and_a_close(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any],
    raw: bytes, status: int, header: tuple[str, str] | None,
) -> None:
    baseline = await memory.quiet_statistics()
    failed = memory.relay.counters.handshakes_failed
    records.clear()
    stream = await memory.listener.connect()
    await stream.send_all(raw)
    start = trio.current_time()
    answer = await read_to_end(stream)
    assert trio.current_time() == start  # answered and closed at once
    assert status_of(answer) == status
    headers = headers_of(answer)
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(answer.partition(b"\r\n\r\n")[2])
    if header is not None:
        assert headers[header[0]] == header[1]
    await assert_idle(memory, baseline)
    assert_no_traceback(records)
    assert memory.relay.counters.handshakes_failed == failed + 1
    assert logged(records, str(status)), "no log line names the refusal"


async def test_the_426_for_a_wrong_version_names_the_upgrade(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    stream = await memory.listener.connect()
    await stream.send_all(upgrade_request(ws_version="8"))
    headers = headers_of(await read_to_end(stream))
    assert headers["upgrade"].lower() == "websocket"


async def test_a_head_just_within_the_limit_is_served(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
    raw = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(raw) == MAX_HEAD
    stream = await memory.listener.connect()
    await stream.send_all(raw)
    assert (await stream.receive_some()).startswith(b"HTTP/1.1 200 ")
    await stream.aclose()


async def test_a_plain_request_to_the_websocket_path_gets_426(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any]
) -> None:
    baseline = await memory.quiet_statistics()
    stream = await memory.listener.connect()
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: relay.test\r\n\r\n")
    answer = bytes(await stream.receive_some())
    assert status_of(answer) == 426
    assert headers_of(answer)["upgrade"] == "websocket"
    assert logged(records, "426")
    # An ordinary answer on a kept-alive connection: the client may go on, here with the
    # upgrade it was asked for.
    client = RawClient(stream)
    await client.handshake()
    assert (await client.replies(1))[0]["type"] == "auth_required"
    await client.send(CloseConnection(1000))
    assert (await client.closed()).code == 1000
    await assert_idle(memory, baseline)
    assert_no_traceback(records)


@pytest.mark.parametrize("target", ["/ws", "/", "/anything?x=1"])
async def test_an_upgrade_on_any_path_is_accepted(
    memory: MemoryRelay, autojump_clock: MockClock, target: str
) -> None:
    # docs/protocol.md: the relay does not look at the path; /ws by convention.
    stream = await memory.listener.connect()
    await stream.send_all(upgrade_request(target))
    assert (await stream.receive_some()).startswith(b"HTTP/1.1 101 ")
    await stream.aclose()


@pytest.mark.parametrize("request_complete_at", [None, 11])
async def test_slowloris_headers_are_dropped_after_the_handshake_timeout(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any],
    request_complete_at: int | None,
) -> None:
    """A byte a second never completes the head (or completes it too late): the stream is
    dropped at handshake_timeout (10 s) without an answer, however steadily bytes come."""
    baseline = await memory.quiet_statistics()
    failed = memory.relay.counters.handshakes_failed
    stream = await memory.listener.connect()
    start = trio.current_time()
    raw = upgrade_request()
    if request_complete_at is None:
        raw = raw[:-4] + b"\r\nX-Slow: " + b"z" * 100  # never ends
    pieces = [raw[i:i + 1] for i in range(request_complete_at or 30)]
    pieces.append(raw[len(pieces):])
    answer = b""
    ended_at = 0.0

    async def reader() -> None:
        nonlocal answer, ended_at
        answer = await read_to_end(stream)
        ended_at = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for piece in pieces:
            await stream.send_all(piece)  # to a closed peer: taken, as TCP would
            await trio.sleep(1)
    assert answer == b""  # no answer at all
    await assert_idle(memory, baseline)
    assert memory.relay.counters.handshakes_failed == failed + 1
    assert ended_at - start == pytest.approx(CONFIG.handshake_timeout)
    assert len(logged(records, "handshake timeout")) == 1
    assert_no_traceback(records)
    await still_serves(memory)


async def test_a_frame_started_and_never_finished_is_closed_at_the_auth_timeout(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any]
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory) as client:
        start = trio.current_time()
        await client.send_raw(frame(TEXT, b"{}")[:3])  # a frame started, never finished
        close = await client.closed()
        assert close.code == CloseCode.POLICY_VIOLATION
        assert trio.current_time() - start == pytest.approx(CONFIG.auth_timeout)
        await assert_idle(memory, baseline)
    assert logged(records, "authentication timed out")
    assert_no_traceback(records)


# --- RFC 6455 frames ----------------------------------------------------------------------------

TOO_BIG = b"x" * (MAX_MESSAGE + 1)
#: (bytes after the handshake, the close code the relay must answer with)
BAD_FRAMES = [
    pytest.param(frame(TEXT, b"{}", mask=None), 1002, id="unmasked-text"),
    pytest.param(frame(PING, b"", mask=None), 1002, id="unmasked-ping"),
    *(pytest.param(frame(TEXT, b"{}", rsv=rsv), 1002, id=f"rsv-{rsv}") for rsv in range(1, 8)),
    *(pytest.param(frame(op, b""), 1002, id=f"reserved-opcode-{op:#x}")
      for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)),
    pytest.param(frame(PING, b"p" * 126), 1002, id="ping-over-125"),
    pytest.param(frame(PONG, b"p" * 126), 1002, id="pong-over-125"),
    pytest.param(frame(CLOSE, close_payload(1000, b"r" * 124)), 1002, id="close-over-125"),
    pytest.param(frame(PING, b"p", fin=False), 1002, id="fragmented-ping"),
    pytest.param(frame(CONTINUATION, b"x"), 1002, id="continuation-without-start"),
    pytest.param(frame(CONTINUATION, b"x", fin=False), 1002, id="unfinished-continuation"),
    pytest.param(frame(TEXT, b"{", fin=False) + frame(TEXT, b"}"), 1002,
                 id="new-message-inside-a-fragmented-one"),
    pytest.param(frame(CLOSE, b"\x03"), 1002, id="close-1-byte"),
    *(pytest.param(frame(CLOSE, close_payload(code)), 1002, id=f"close-code-{code}")
      for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)),
    pytest.param(frame(CLOSE, close_payload(1000, b"\xff\xfe")), 1007, id="close-reason-not-utf8"),
    pytest.param(frame(TEXT, b"\xff"), 1007, id="text-not-utf8"),
    pytest.param(frame(TEXT, b"\xed\xa0\x80"), 1007, id="text-surrogate"),
    pytest.param(frame(TEXT, b"\xc0\xaf"), 1007, id="text-overlong"),
    pytest.param(frame(TEXT, b"\xe2\x82", fin=False) + frame(CONTINUATION, b"("), 1007,
                 id="text-not-utf8-across-fragments"),
    pytest.param(frame(TEXT, b"ok \xe2\x82"), 1007, id="text-ends-mid-character"),
    pytest.param(frame(TEXT, TOO_BIG), 1009, id="too-big"),
    pytest.param(frame(TEXT, b"x" * 600, fin=False) + frame(CONTINUATION, b"x" * 600), 1009,
                 id="too-big-in-fragments"),
    pytest.param(frame(TEXT, "é".encode() * (MAX_MESSAGE // 2) + b"x"), 1009,
                 id="too-big-in-bytes-not-characters"),
    pytest.param(frame(BINARY, b"\x00\x01"), 1003, id="binary"),
    pytest.param(frame(BINARY, b"\x00", fin=False) + frame(CONTINUATION, b"\x01"), 1003,
                 id="binary-fragmented"),
    pytest.param(bytes([0x81, 0x80 | 126, 0, 5]) + MASK + b"hello", 1002,
                 id="length-16-bit-for-5-bytes"),
    pytest.param(bytes([0x81, 0x80 | 127]) + (200).to_bytes(8, "big") + MASK, 1002,
                 id="length-64-bit-for-200-bytes"),
    pytest.param(bytes([0x81, 0x80 | 127]) + (1 << 63 | 1 << 20).to_bytes(8, "big") + MASK,
                 1002, id="length-64-bit-msb-set"),
]


@pytest.mark.parametrize(("data", "code"), BAD_FRAMES)
async def test_a_bad_frame_closes_with_its_code_and_a_log_line(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any],
    data: bytes, code: int,
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory) as client:
        records.clear()
        start = trio.current_time()
        await client.send_raw(data)
        close = await client.closed()
        assert close.code == code
        await client.read_until(lambda events: False)  # then the relay closes the stream
        assert client.ended
        assert trio.current_time() == start
    await assert_idle(memory, baseline)
    assert logged(records, f"disconnected: {code}")
    assert_no_traceback(records)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
async def test_a_valid_close_from_the_client_is_echoed(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any], code: int
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory) as client:
        await client.send_raw(frame(CLOSE, close_payload(code, "ciao ✓".encode())))
        close = await client.closed()
        assert (close.code, close.reason) == (code, "ciao ✓")
        await client.read_until(lambda events: False)
        assert client.ended
    await assert_idle(memory, baseline)
    assert logged(records, f"disconnected: {code} ciao ✓")


async def test_an_empty_close_is_answered_with_an_empty_close(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    async with raw_client(memory) as client:
        await client.send_raw(frame(CLOSE))
        received = await read_to_end(client.stream)
    assert received.endswith(b"\x88\x00")  # a close frame without a code (RFC 6455 5.5.1)


async def test_requests_before_a_bad_frame_are_answered_before_the_close(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    async with raw_client(memory) as client:
        auth = frame(TEXT, b'{"id": "a", "type": "auth", "pin": "%s"}' % PIN.encode())
        await client.send_raw(auth + frame(TEXT, b"{}", rsv=4))
        close = await client.closed()
    assert close.code == CloseCode.PROTOCOL_ERROR
    assert [f["type"] for f in client.frames()] == ["auth_required", "auth_success"]


@pytest.mark.parametrize("pieces", [[MAX_MESSAGE], [400, 600], [1, MAX_MESSAGE - 2, 1]])
async def test_a_message_of_exactly_the_limit_is_read(
    memory: MemoryRelay, autojump_clock: MockClock, pieces: list[int]
) -> None:
    async with raw_client(memory) as client:
        data = b""
        for i, size in enumerate(pieces):
            data += frame(TEXT if i == 0 else CONTINUATION, b" " * size,
                          fin=i == len(pieces) - 1)
        await client.send_raw(data)
        frames = await client.replies(2)  # auth_required, then the answer to it
        assert frames[1]["type"] == "error" and frames[1]["code"] == "bad_request"
        assert not any(isinstance(e, CloseConnection) for e in client.events)


async def test_a_client_that_never_answers_the_close_is_dropped_after_close_timeout(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any]
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory) as client:
        start = trio.current_time()
        await client.send_raw(frame(BINARY, b"\x00"))
        events = await client.read_until(lambda events: False)  # never answers
        assert client.ended
        assert isinstance(events[-1], CloseConnection) and events[-1].code == 1003
        assert trio.current_time() - start == pytest.approx(CONFIG.close_timeout)
    await assert_idle(memory, baseline)
    assert_no_traceback(records)


async def test_frames_after_the_close_are_ignored(
    memory: MemoryRelay, autojump_clock: MockClock, records: list[Any]
) -> None:
    baseline = await memory.quiet_statistics()
    async with raw_client(memory) as client:
        await client.send_raw(frame(CLOSE, close_payload(1000)) + frame(TEXT, b"late")
                              + frame(PING, b"late") + b"\xff\xff garbage")
        close = await client.closed()
        await client.read_until(lambda events: False)
    assert close.code == 1000
    assert not [e for e in client.events if isinstance(e, TextMessage) and "late" in e.data]
    await assert_idle(memory, baseline)
    assert_no_traceback(records)


async def test_frames_that_came_with_the_upgrade_request_are_read_at_once(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    stream = await memory.listener.connect()
    client = RawClient(stream)
    head = client.ws.send(Request(host="relay.test", target="/ws"))
    auth = b'{"id": "a", "type": "auth", "pin": "%s"}' % PIN.encode()
    await stream.send_all(head + frame(TEXT, auth))  # in one write: one read for the relay
    with trio.move_on_after(1):
        await client.replies(2)
    await stream.aclose()
    assert [f["type"] for f in client.frames()] == ["auth_required", "auth_success"]


# --- TLS, over real loopback ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    return context


async def _tls_attempt(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    try:
        if data:
            await stream.send_all(data)
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                received += chunk
    except trio.BrokenResourceError:  # a reset: as good as a close here
        pass
    finally:
        await stream.aclose()
    return received


@pytest.mark.parametrize("data", [
    b"",  # connects, says nothing: dropped at the handshake timeout
    b"\x16\x03\x01\x02\x00",  # a TLS record header, then nothing
    b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP to the TLS port
    b"\x00" * 64,
], ids=["silent", "partial-hello", "plain-http", "zeros"])
async def test_tls_garbage_and_stalls_are_dropped_and_leave_nothing(
    server_context: ssl.SSLContext, records: list[Any], data: bytes
) -> None:
    config = RelayConfig(handshake_timeout=0.5)
    async with open_relay(MemoryBackend(), pin=PIN, config=config) as relay:
        port = await relay.start_serving("127.0.0.1", 0, ssl_context=server_context)
        await trio.testing.wait_all_tasks_blocked()
        baseline = relay.statistics()
        assert await _tls_attempt(port, data) == b""  # nothing in clear text, ever
        await wait_until(lambda: relay.statistics() == baseline, 5)
    assert_no_traceback(records)


async def test_a_failed_tls_handshake_is_logged_and_counted(
    server_context: ssl.SSLContext, records: list[Any]
) -> None:
    async with open_relay(MemoryBackend(), pin=PIN, config=CONFIG) as relay:
        port = await relay.start_serving("127.0.0.1", 0, ssl_context=server_context)
        await trio.testing.wait_all_tasks_blocked()
        baseline = relay.statistics()
        records.clear()
        await _tls_attempt(port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: relay.statistics() == baseline, 5)
        assert relay.counters.handshakes_failed == 1
    assert [r for r in records if r["extra"].get("peer", "").startswith("127.0.0.1:")]


# --- cost -----------------------------------------------------------------------------------------


async def _seconds_to_read_fragments(limit: int, fragments: int) -> float:
    """CPU seconds from sending a text message of ``fragments`` one-byte frames (before
    auth: anyone may) to its answer, on a relay whose max_message_size is ``limit``.

    Process time, not wall time: other processes on the machine do not count."""
    data = b"".join(frame(TEXT if i == 0 else CONTINUATION, b" ", fin=i == fragments - 1)
                    for i in range(fragments))
    config = RelayConfig(max_message_size=limit)
    async with open_memory_relay(MemoryBackend(), pin=PIN, config=config) as memory:
        async with raw_client(memory) as client:
            start = time.process_time()
            await client.send_raw(data)
            await client.replies(2)  # auth_required, then bad_request for " " * fragments
            return time.process_time() - start


async def test_a_message_in_many_tiny_fragments_costs_linear_time() -> None:
    fragments = 16384
    # The same message, read under a limit it is far from (no byte counting at all; the
    # best of three, so that a collection of the garbage collector does not count) ...
    unbounded = min([await _seconds_to_read_fragments(1 << 24, fragments) for _ in range(3)])
    # ... and under a limit it just fits, where every fragment past a quarter is counted.
    # Today about 6 times as long; counting each fragment's bytes once, about the same.
    bounded = await _seconds_to_read_fragments(fragments, fragments)
    assert bounded < 2.5 * unbounded + 0.2, (bounded, unbounded)


# --- valid but unusual ----------------------------------------------------------------------------


async def test_control_frames_between_fragments_are_answered_and_the_message_read(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    auth = b'{"id": "a", "type": "auth", "pin": "%s"}' % PIN.encode()
    async with raw_client(memory) as client:
        await client.send_raw(frame(TEXT, auth[:10], fin=False) + frame(PING, b"mid")
                              + frame(CONTINUATION, auth[10:20], fin=False) + frame(PONG)
                              + frame(CONTINUATION, auth[20:]))
        frames = await client.replies(2)
    assert [f["type"] for f in frames] == ["auth_required", "auth_success"]
    assert [e.payload for e in client.events if isinstance(e, Pong)] == [b"mid"]


async def test_a_ping_flood_from_a_client_that_reads_nothing_stays_bounded(
    memory_backend: MemoryBackend, autojump_clock: MockClock, records: list[Any]
) -> None:
    config = RelayConfig(outbound_queue_size=8, close_timeout=5)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        baseline = await memory.quiet_statistics()
        stream = await memory.listener.connect(buffer=256)
        client = RawClient(stream)
        await client.handshake()
        (connection,) = memory.relay._connections
        for _ in range(200):  # 20 KB of pongs owed, 256 bytes of buffer to put them in
            await client.send_raw(frame(PING, b"p" * 100))
        await trio.testing.wait_all_tasks_blocked()
        assert connection.socket.backlog <= config.outbound_queue_size
        # It still gets a close, whole, after whatever pongs went out whole.
        await client.send_raw(frame(CLOSE, close_payload(1000)))
        close = await client.closed()
        assert close.code == 1000
        assert [f["type"] for f in client.frames()] == ["auth_required"]
        assert all(isinstance(e, (TextMessage, Pong, CloseConnection)) for e in client.events)
        await stream.aclose()
        await assert_idle(memory, baseline)
    assert_no_traceback(records)


async def test_the_last_answer_on_a_kept_alive_connection_says_so(
    memory: MemoryRelay, autojump_clock: MockClock
) -> None:
    stream = await memory.listener.connect()
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 101)
    answers = (await read_to_end(stream)).split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 100
    assert b"\r\nconnection: close\r\n" in answers[-1].lower()
