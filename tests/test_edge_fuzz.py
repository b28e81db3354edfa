"""Random byte streams and frame sequences, valid and not, into the relay's edge.

Hypothesis writes the bytes of one or two clients (HTTP garbage, requests with bent
headers, handshakes followed by any frames: good requests, pings, fragments, reserved
opcodes, bad close codes, invalid UTF-8, oversized messages, raw noise), cut at random
points with random pauses, over in-memory streams under the autojump clock. Whatever comes,
each connection must end properly:

- HTTP answers only, the last one closing the connection, or a drop exactly
  ``handshake_timeout`` after the last answer (or the connect) with no answer;
- or, after a ``101``, WebSocket frames the client can parse, ending with one valid close
  frame whose code is one the relay sends, or the echo of the client's own close;

and afterwards the relay holds nothing (its statistics are back to their idle value), and
nothing was logged as an error.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from typing import Any

import attrs
import trio
import trio.testing
from _rawws import (
    BINARY,
    CLOSE,
    CONTINUATION,
    KEY,
    PING,
    PONG,
    TEXT,
    close_payload,
    frame,
    upgrade_request,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import event as outcome
from hypothesis import strategies as st
from loguru import logger
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from trio_relay import RelayConfig
from trio_relay.testing import MemoryBackend, open_memory_relay

PIN = "424242"
CONFIG = RelayConfig(handshake_timeout=10, auth_timeout=30, close_timeout=5, ping_interval=20,
                     ping_timeout=20, max_message_size=512, pin_backoff_max=2)
#: Close codes the relay starts a close with (docs/protocol.md).
RELAY_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013})
#: No connection may take longer than this (mock seconds): auth_timeout + close_timeout +
#: the longest pause, with room to spare.
LIMIT = 300

# --- what the clients send ------------------------------------------------------------------------

json_requests = st.sampled_from([
    {"id": "a", "type": "auth", "pin": PIN},
    {"id": "w", "type": "auth", "pin": "000000"},
    {"id": "s", "type": "subscribe", "resource": "chat", "resourceId": "c1"},
    {"id": "n", "type": "subscribe", "resource": "chat", "resourceId": "nope"},
    {"id": "m", "type": "send", "resourceId": "c1", "message": "hi"},
    {"id": "u", "type": "unsubscribe", "resource": "chat", "resourceId": "c1"},
    {"id": 1, "type": "frobnicate"},
]).map(lambda request: json.dumps(request).encode())

close_codes = st.sampled_from(
    [0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1011, 1015, 1016, 2999,
     3000, 4999, 5000, 65535])


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame (or a fragmented message), well formed or not."""
    kind = draw(st.sampled_from([
        "request", "request", "text", "bad-utf8", "ping", "pong", "close", "empty-close",
        "binary", "fragmented", "continuation", "any", "too-big", "noise",
    ]))
    if kind == "request":
        return frame(TEXT, draw(json_requests))
    if kind == "text":
        return frame(TEXT, draw(st.text(max_size=40)).encode())
    if kind == "bad-utf8":
        return frame(TEXT, draw(st.binary(max_size=40)))
    if kind in ("ping", "pong"):
        return frame(PING if kind == "ping" else PONG, draw(st.binary(max_size=130)))
    if kind == "close":
        return frame(CLOSE, close_payload(draw(close_codes), draw(st.binary(max_size=20))))
    if kind == "empty-close":
        return frame(CLOSE)
    if kind == "binary":
        return frame(BINARY, draw(st.binary(max_size=40)))
    if kind == "fragmented":
        parts = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
        opcode = draw(st.sampled_from([TEXT, BINARY]))
        return b"".join(
            frame(opcode if i == 0 else CONTINUATION, part, fin=i == len(parts) - 1)
            for i, part in enumerate(parts))
    if kind == "continuation":
        return frame(CONTINUATION, draw(st.binary(max_size=20)), fin=draw(st.booleans()))
    if kind == "any":
        return frame(draw(st.integers(0, 15)), draw(st.binary(max_size=140)),
                     fin=draw(st.booleans()), rsv=draw(st.integers(0, 7)),
                     mask=draw(st.sampled_from([None, b"\x01\x02\x03\x04"])))
    if kind == "too-big":
        return frame(TEXT, b"x" * draw(st.integers(500, 2000)))
    return draw(st.binary(min_size=1, max_size=50))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request head with each part perhaps bent."""
    method = draw(st.sampled_from(["GET", "GET", "POST", "PUT", "G T"]))
    target = draw(st.sampled_from(["/ws", "/", "/healthz", "/metrics", "/nope", "*"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTP/1"]))
    headers = draw(st.lists(st.sampled_from([
        "Host: relay.test", "Host: relay.test", "Upgrade: websocket", "Upgrade: h2c",
        "Connection: Upgrade", "Connection: close", "Connection: keep-alive, Upgrade",
        f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Key: c2hvcnQ=", "Sec-WebSocket-Key: %%%",
        "Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8",
        "Origin: http://evil.example", "Origin: http://relay.test", "Content-Length: 3",
        "Transfer-Encoding: chunked", "X-Long: " + "l" * 17_000, "Bad Header",
    ]), max_size=8))
    end = draw(st.sampled_from(["\r\n\r\n", "\r\n\r\n", "\n\n", "\r\n"]))
    return ("\r\n".join([f"{method} {target} {version}", *headers]) + end).encode()


@attrs.frozen
class Plan:
    """One client: what it sends, in which pieces, with what pauses, and how it ends."""

    #: Sent alone first, the rest only once the relay answered it (else with the rest).
    head: bytes
    data: bytes
    cuts: list[int]
    pauses: list[float]
    abort: bool  # drop the stream after sending (else: read until the relay closes it)
    answer_close: bool  # answer the relay's close frame


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    opening = draw(st.sampled_from(["handshake", "handshake", "handshake", "request",
                                    "garbage"]))
    head = b""
    if opening == "handshake":
        data = b""
        if draw(st.booleans()):
            head = upgrade_request()  # as RFC 6455 4.1 has it: frames only after the 101
        else:
            data = upgrade_request()  # pipelined, as a hasty client might
        if draw(st.booleans()):  # authenticated first, so that later frames meet more code
            data += frame(TEXT, json.dumps({"id": "a", "type": "auth", "pin": PIN}).encode())
        data += b"".join(draw(st.lists(frames(), min_size=1, max_size=8)))
    elif opening == "request":
        data = b"".join(draw(st.lists(requests(), min_size=1, max_size=3)))
        data += b"".join(draw(st.lists(frames(), max_size=3)))
    else:
        data = draw(st.binary(max_size=300))
    cuts = sorted(draw(st.lists(st.integers(0, max(len(data), 1)), max_size=4)))
    pauses = draw(st.lists(st.sampled_from([0, 0, 0, 0.5, 3, 12]),
                           min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    return Plan(head, data, cuts, pauses, draw(st.booleans()) and draw(st.booleans()),
                draw(st.booleans()))


# --- what the relay must answer -------------------------------------------------------------------


@attrs.define
class Seen:
    """What one client received, and when."""

    data: bytearray = attrs.Factory(bytearray)
    #: (bytes received so far, mock time) after each read
    times: list[tuple[int, float]] = attrs.Factory(list)
    ended_at: float | None = None  # when the relay closed the stream


_HEAD = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n")


def _time_of(seen: Seen, offset: int) -> float:
    """When the byte at ``offset`` arrived."""
    return next(t for size, t in seen.times if size > offset)


def check_answers(plan: Plan, seen: Seen, connected_at: float) -> None:
    data = bytes(seen.data)
    position = 0
    window = connected_at  # the relay waits handshake_timeout for each request from here
    closing = False
    while position < len(data):
        match = _HEAD.match(data, position)
        assert match, f"not an HTTP answer at {position}: {data[position:position + 80]!r}"
        status = int(match[1])
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in match[2].splitlines()))
        if status == 101:
            check_websocket(plan, data[match.end():])
            return
        length = int(headers.get(b"content-length", b"0"))
        position = match.end() + length
        window = _time_of(seen, position - 1)
        closing = headers.get(b"connection") == b"close"
    assert seen.ended_at is not None
    outcome(f"HTTP answers, then {'closed' if closing else 'dropped'}")
    if not closing:  # no answer closed it: a drop, exactly handshake_timeout after the window
        dropped_after = seen.ended_at - window
        assert abs(dropped_after - CONFIG.handshake_timeout) < 1e-9, (window, seen.ended_at)


def check_websocket(plan: Plan, data: bytes) -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    events = list(client.events())
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert len(closes) == 1 and events[-1] is closes[0], events
    # A close frame, not a parse failure of ours (which would leave the state OPEN).
    assert client.state is ConnectionState.REMOTE_CLOSING, events
    for event in events[:-1]:
        assert isinstance(event, (TextMessage, Ping, Pong)), event
        if isinstance(event, TextMessage):
            json.loads(event.data)
    code = closes[0].code
    # The client's own close frames, which the relay echoes when it reads one first.
    echoes = {struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
              for payload in _client_closes(plan.data)}
    assert code in RELAY_CODES | echoes, (code, echoes)
    outcome(f"WebSocket closed with {code}")


def _client_closes(data: bytes) -> list[bytes]:
    """Every well-formed masked close frame in ``data`` (a superset of those the relay
    read: noise before one may hide it from the relay, which is fine here)."""
    found = []
    for start in range(len(data) - 5):
        if data[start] == 0x88 and data[start + 1] & 0x80 and (data[start + 1] & 0x7F) <= 125:
            size = data[start + 1] & 0x7F
            mask = data[start + 2:start + 6]
            payload = data[start + 6:start + 6 + size]
            if len(payload) == size and len(mask) == 4:
                found.append(bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return found


# --- the property ---------------------------------------------------------------------------------


async def run_client(memory: Any, plan: Plan) -> None:
    stream = await memory.listener.connect()
    connected_at = trio.current_time()
    seen = Seen()
    sending = trio.Lock()

    async def reader() -> None:
        client = Connection(ConnectionType.CLIENT)
        upgraded_at: int | None = None
        while True:
            try:
                data = await stream.receive_some()
            except trio.ClosedResourceError:  # we dropped it ourselves
                return
            if not data:
                seen.ended_at = trio.current_time()
                return
            seen.data += data
            seen.times.append((len(seen.data), trio.current_time()))
            if not plan.answer_close:
                continue
            if upgraded_at is None and seen.data.startswith(b"HTTP/1.1 101 "):
                upgraded_at = seen.data.find(b"\r\n\r\n") + 4
                data = seen.data[upgraded_at:]
            if upgraded_at is not None:
                client.receive_data(bytes(data))
                for event in client.events():
                    if isinstance(event, CloseConnection) and (
                            client.state is ConnectionState.REMOTE_CLOSING):
                        async with sending:
                            try:
                                await stream.send_all(frame(CLOSE, close_payload(1000)))
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        if plan.head:
            await stream.send_all(plan.head)
            await trio.testing.wait_all_tasks_blocked()  # the relay has answered
        bounds = [0, *plan.cuts, len(plan.data)]
        for (start, end), pause in zip(itertools.pairwise(bounds), plan.pauses, strict=True):
            async with sending:
                try:
                    await stream.send_all(plan.data[start:end])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
            await trio.sleep(pause)
        if plan.abort:
            await stream.aclose()
    if plan.abort:
        outcome("aborted by the client")
    else:
        check_answers(plan, seen, connected_at)
    await stream.aclose()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(clients=st.lists(plans(), min_size=1, max_size=2))
def test_any_input_ends_in_a_proper_close_and_leaves_nothing(clients: list[Plan]) -> None:
    errors: list[str] = []

    async def scenario() -> None:
        backend = MemoryBackend()
        backend.add_chat("p1", "c1")
        async with open_memory_relay(backend, pin=PIN, config=CONFIG) as memory:
            idle = await memory.quiet_statistics()
            with trio.fail_after(LIMIT):
                async with trio.open_nursery() as nursery:
                    for plan in clients:
                        nursery.start_soon(run_client, memory, plan)
            # Histories are kept for resume_grace after their last subscriber left.
            await trio.sleep(CONFIG.resume_grace + 1)
            assert await memory.quiet_statistics() == idle
            assert memory.relay._edge.per_address == {}  # nothing counts against the cap

    handler = logger.add(
        lambda message: errors.append(message.record["message"]), level="ERROR")
    logger.enable("trio_relay")
    try:
        trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.disable("trio_relay")
        logger.remove(handler)
    assert not errors, errors
