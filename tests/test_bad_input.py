"""The contract's "Bad input" rules, each through a real connection to a real relay.

Nothing a client sends may crash the relay, stall other clients or lose anyone's data: every
bad frame gets an error reply (or, for the transport-level ones, a documented close code), and
everything else keeps working. In-memory streams, autojump clock: all time here is mock time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from _helpers import PIN, Frame, demo_chats
from wsproto.frame_protocol import Opcode

from trio_relay import CloseCode, RelayConfig
from trio_relay.testing import (
    MemoryBackend,
    MemoryRelay,
    TestClient,
    open_memory_relay,
)

memory_backend = pytest.fixture(demo_chats, name="memory_backend")


async def connect(relay: MemoryRelay) -> TestClient:
    return await relay.connect(authenticate=PIN)


async def assert_usable(client: TestClient, backend: MemoryBackend) -> None:
    """A valid request still gets its normal reply, and pushes still flow."""
    reply = await client.request("subscribe", resource="chat", resourceId="c1")
    assert reply["type"] == "subscribed", reply
    assert reply["data"] == {"messages": backend.messages["c1"]}
    backend.emit("chat", "c1", {"type": "chunk", "text": "still here"})
    frame = await client.next_push()
    assert frame["data"] == {"type": "chunk", "text": "still here"}


def request(**fields: Any) -> str:
    return json.dumps(fields)


# --- malformed requests: an error reply, and the connection stays usable ----------------------

LONG_ID = "x" * 257

#: (case, frame text, id the error echoes, text the error must contain)
BAD_FRAMES: list[tuple[str, str, Any, str]] = [
    ("not JSON", "hello relay", None, "JSON"),
    ("truncated JSON", '{"id": "q", "type": "auth"', None, "JSON"),
    ("empty frame", "", None, "JSON"),
    ("NaN", '{"id": "q", "type": "auth", "pin": NaN}', None, "JSON"),
    ("Infinity", '{"id": "q", "type": "auth", "pin": Infinity}', None, "JSON"),
    ("huge number", '{"id": "q", "type": "send", "resourceId": "c1", "message": 1e999}',
     None, "JSON"),
    ("deep nesting", "[" * 20_000 + "]" * 20_000, None, "JSON"),
    ("not an object: array", '[{"id": "q", "type": "auth"}]', None, "object"),
    ("not an object: string", '"auth"', None, "object"),
    ("not an object: number", "42", None, "object"),
    ("not an object: null", "null", None, "object"),
    ("missing id", request(type="subscribe", resource="chat", resourceId="c1"), None, "'id'"),
    ("id null", request(id=None, type="auth", pin=PIN), None, "'id'"),
    ("id true", request(id=True, type="auth", pin=PIN), None, "'id'"),
    ("id empty", request(id="", type="auth", pin=PIN), None, "'id'"),
    ("id too long", request(id=LONG_ID, type="auth", pin=PIN), None, "'id'"),
    ("id float", request(id=1.5, type="auth", pin=PIN), None, "'id'"),
    ("id object", request(id={"n": 1}, type="auth", pin=PIN), None, "'id'"),
    ("id list", request(id=["q"], type="auth", pin=PIN), None, "'id'"),
    ("missing type", request(id="q"), "q", "'type'"),
    ("unknown type", request(id="q", type="frobnicate"), "q", "'type'"),
    ("type not a string", request(id=7, type=["auth"]), 7, "'type'"),
    ("type in wrong case", request(id="q", type="Subscribe"), "q", "'type'"),
    ("unknown resource", request(id="q", type="subscribe", resource="users", resourceId="u"),
     "q", "'resource'"),
    ("resource not a string", request(id="q", type="unsubscribe", resource=1, resourceId="c1"),
     "q", "'resource'"),
    ("missing resource", request(id="q", type="subscribe", resourceId="c1"), "q", "'resource'"),
    ("missing resourceId: subscribe chat", request(id="q", type="subscribe", resource="chat"),
     "q", "'resourceId'"),
    ("missing resourceId: unsubscribe project",
     request(id="q", type="unsubscribe", resource="project"), "q", "'resourceId'"),
    ("empty resourceId", request(id="q", type="subscribe", resource="chat", resourceId=""),
     "q", "'resourceId'"),
    ("missing resourceId: send", request(id="q", type="send", message="hi"), "q",
     "'resourceId'"),
    ("missing resourceId: create", request(id="q", type="create", resource="chat"), "q",
     "'resourceId'"),
    ("resourceId not a string",
     request(id="q", type="subscribe", resource="chat", resourceId=5), "q", "'resourceId'"),
    ("send without message", request(id="q", type="send", resourceId="c1"), "q", "'message'"),
    ("send with empty message", request(id="q", type="send", resourceId="c1", message=""),
     "q", "'message'"),
    ("pin missing", request(id="q", type="auth"), "q", "'pin'"),
    ("pin not a string", request(id="q", type="auth", pin=1234), "q", "'pin'"),
    ("sinceSeq not an integer", request(id="q", type="subscribe", resource="chat",
                                        resourceId="c1", sinceSeq="3"), "q", "'sinceSeq'"),
    ("sinceSeq negative", request(id="q", type="subscribe", resource="chat", resourceId="c1",
                                  sinceSeq=-1), "q", "'sinceSeq'"),
    ("sinceSeq boolean", request(id="q", type="subscribe", resource="chat", resourceId="c1",
                                 sinceSeq=True), "q", "'sinceSeq'"),
    ("create a project", request(id="q", type="create", resource="project", resourceId="p1"),
     "q", "'resource'"),
    ("create with a text message", request(id="q", type="create", resource="chat",
                                           resourceId="p1", message="Plans"), "q", "'message'"),
    ("create with a numeric title", request(id="q", type="create", resource="chat",
                                            resourceId="p1", message={"title": 5}),
     "q", "'message.title'"),
]


@pytest.mark.parametrize(("text", "echoed_id", "names"),
                         [case[1:] for case in BAD_FRAMES], ids=[case[0] for case in BAD_FRAMES])
async def test_bad_frame_gets_bad_request_and_the_connection_stays_usable(
    text: str, echoed_id: Any, names: str, memory_backend: MemoryBackend,
    autojump_clock: trio.testing.MockClock,
    memory_relay: MemoryRelay,
) -> None:
    client = await connect(memory_relay)
    chats_before, sent_before = dict(memory_backend.chats), list(memory_backend.sent)
    await client.send(text)
    reply = await client.receive()
    assert reply == {"id": echoed_id, "type": "error", "code": "bad_request",
                     "error": reply["error"]}
    assert names in reply["error"], reply["error"]
    await client.assert_no_push()
    # Nothing was done.
    assert (memory_backend.chats, memory_backend.sent) == (chats_before, sent_before)
    await assert_usable(client, memory_backend)


async def test_lone_surrogate_is_refused_and_the_connection_stays_usable(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    """Valid JSON that could never be sent back as UTF-8 must not reach the backend."""
    client = await connect(memory_relay)
    await client.send('{"id": "q", "type": "send", "resourceId": "c1", "message": "\\ud800"}')
    reply = await client.receive()
    assert reply == {"id": reply["id"], "type": "error", "code": "bad_request",
                     "error": reply["error"]}
    assert reply["id"] in (None, "q")
    assert memory_backend.sent == []
    await assert_usable(client, memory_backend)


async def test_bad_frames_before_auth_get_bad_request_and_auth_still_works(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    assert await client.receive() == {"id": None, "type": "auth_required"}
    await client.send("{{{")
    assert (await client.receive())["code"] == "bad_request"
    await client.send(request(id="a", type="auth", pin=None))
    reply = await client.receive()
    assert (reply["id"], reply["code"]) == ("a", "bad_request")
    await client.authenticate(PIN)
    await assert_usable(client, memory_backend)


async def test_unknown_fields_are_ignored(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    """Clients may send more than the relay reads (an old relay, a newer client)."""
    client = await connect(memory_relay)
    reply = await client.request("subscribe", resource="chat", resourceId="c1",
                                 trace={"span": 1}, priority="high")
    assert reply["type"] == "subscribed"


# --- transport-level abuse: the documented close codes ----------------------------------------


async def test_frame_over_the_size_limit_closes_1009_and_others_carry_on(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(max_message_size=1024)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        bystander = await connect(relay)
        client = await connect(relay)
        # A frame of exactly the limit is fine; one byte more closes the connection.
        def padded(request_id: str, size: int) -> str:
            bare = request(id=request_id, type="send", resourceId="c1", message="")
            text = request(id=request_id, type="send", resourceId="c1",
                           message="x" * (size - len(bare)))
            assert len(text.encode()) == size
            return text

        await client.send(padded("fits", 1024))
        assert (await client.reply_to("fits"))["data"] == {"sent": True}
        await client.send(padded("big", 1025))
        code, _ = await client.wait_closed()
        assert code == CloseCode.MESSAGE_TOO_BIG == 1009
        assert len(memory_backend.sent) == 1  # "fits" only
        await assert_usable(bystander, memory_backend)


async def test_binary_frame_closes_1003(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    bystander = await connect(memory_relay)
    client = await connect(memory_relay)
    await client.ws.send_message(json.dumps({"id": "b", "type": "subscribe",
                                             "resource": "modelProfiles"}).encode())
    code, reason = await client.wait_closed()
    assert code == CloseCode.UNSUPPORTED_DATA == 1003
    assert reason
    assert [frame for frame in client.held if frame.get("id") == "b"] == []
    await assert_usable(bystander, memory_backend)


async def test_a_hand_built_text_frame_is_served(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    """The hand-built frames of the invalid UTF-8 test are frames the relay accepts."""
    client = await connect(memory_relay)
    payload = b'{"id":"raw","type":"unsubscribe","resource":"modelProfiles"}'
    await client.send_raw_frame(Opcode.TEXT, payload)
    assert await client.reply_to("raw") == {
        "id": "raw", "type": "data", "resource": "modelProfiles",
        "data": {"unsubscribed": False},
    }


async def test_invalid_utf8_closes_1007(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    bystander = await connect(memory_relay)
    client = await connect(memory_relay)
    await client.send_raw_frame(Opcode.TEXT, b"\xff\xfe")
    code, _ = await client.wait_closed()
    await assert_usable(bystander, memory_backend)
    assert code == CloseCode.INVALID_PAYLOAD == 1007


# --- repeated abuse: strikes, floods, PIN guessing --------------------------------------------


async def test_many_bad_requests_close_1008_after_max_strikes(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(max_strikes=4)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await connect(relay)
        for n in range(config.max_strikes - 1):
            await client.send(request(id=f"bad-{n}", type="frobnicate"))
            reply = await client.receive()
            assert (reply["id"], reply["code"]) == (f"bad-{n}", "bad_request")
        await client.assert_no_push()  # still open one strike short of the limit
        await client.send("not JSON")
        code, reason = await client.wait_closed()
        assert code == CloseCode.POLICY_VIOLATION == 1008
        assert reason


async def test_the_request_that_reaches_max_strikes_still_gets_its_reply(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """Every request with an id gets exactly one reply, the last one before a close too."""
    config = RelayConfig(max_strikes=2)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await connect(relay)
        await client.send(request(id="bad-1", type="frobnicate"))
        await client.send(request(id="bad-2", type="frobnicate"))
        code, _ = await client.wait_closed()
        assert code == 1008
        assert [(f["id"], f["code"]) for f in client.held] == [
            ("bad-1", "bad_request"), ("bad-2", "bad_request")]


async def test_refused_but_well_formed_requests_are_not_strikes(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(max_strikes=2)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await connect(relay)
        for n in range(10):
            reply = await client.request("subscribe", resource="chat", resourceId=f"no-{n}")
            assert reply["code"] == "not_found"
            reply = await client.request("unsubscribe", resource="chat", resourceId=f"no-{n}")
            assert reply["data"] == {"unsubscribed": False}
        await assert_usable(client, memory_backend)


async def test_request_flood_is_rate_limited_then_closed_1008(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(request_rate=1.0, request_burst=5, max_strikes=3)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await connect(relay)  # auth takes one token of the burst
        for n in range(20):
            await client.send(request(id=n, type="unsubscribe", resource="chat",
                                      resourceId="c1"))
        code, reason = await client.wait_closed()
        assert code == CloseCode.POLICY_VIOLATION == 1008
        assert reason
        frames = client.held
        served, limited = frames[:4], frames[4:]
        assert served == [{"id": n, "type": "data", "resource": "chat", "resourceId": "c1",
                           "data": {"unsubscribed": False}} for n in range(4)]
        assert limited  # the rest of the flood is refused, then the connection closed
        assert limited == [{"id": 4 + n, "type": "error", "code": "rate_limited",
                            "error": limited[n]["error"], "resource": "chat",
                            "resourceId": "c1"} for n in range(len(limited))]


async def test_rate_limit_recovers_for_a_client_that_slows_down(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(request_rate=2.0, request_burst=3, max_strikes=10)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await connect(relay)
        codes = []
        for _ in range(4):
            reply = await client.request("unsubscribe", resource="modelProfiles")
            codes.append(reply.get("code"))
        assert codes == [None, None, "rate_limited", "rate_limited"]
        await trio.sleep(1.0)  # two tokens back at two per second
        for _ in range(2):
            reply = await client.request("unsubscribe", resource="modelProfiles")
            assert reply["data"] == {"unsubscribed": False}
        # Sustained requests at the allowed rate are never limited.
        for _ in range(20):
            await trio.sleep(0.5)
            reply = await client.request("unsubscribe", resource="modelProfiles")
            assert reply["type"] == "data"


PIN_CONFIG = RelayConfig(pin_backoff_initial=1.0, pin_backoff_max=8.0, pin_lockout_failures=3,
                         pin_failure_window=120.0, auth_timeout=1000.0)


async def test_failed_pin_replies_are_delayed_and_the_delay_doubles(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(pin_backoff_initial=0.5, pin_backoff_max=4.0, pin_lockout_failures=10,
                         auth_timeout=1000.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await relay.connect()
        delays = []
        for _ in range(6):
            start = trio.current_time()
            reply = await client.request("auth", pin="0000")
            delays.append(trio.current_time() - start)
            assert reply["type"] == "auth_failed"
        assert delays == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0])
        # A success is answered at once and clears the address's failures.
        start = trio.current_time()
        await client.authenticate(PIN)
        assert trio.current_time() == start
        other = await relay.connect()
        start = trio.current_time()
        assert (await other.request("auth", pin="0000"))["type"] == "auth_failed"
        assert trio.current_time() - start == pytest.approx(0.5)


async def test_failed_pins_back_off_across_connections_from_one_address(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """Reconnecting does not reset the backoff: it is per client address."""
    config = RelayConfig(pin_backoff_initial=1.0, pin_lockout_failures=10, auth_timeout=1000.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        delays = []
        for _ in range(3):
            client = await relay.connect()
            start = trio.current_time()
            assert (await client.request("auth", pin="0000"))["type"] == "auth_failed"
            delays.append(trio.current_time() - start)
            await client.close()
        assert delays == pytest.approx([1.0, 2.0, 4.0])


async def test_pin_lockout_closes_1008_and_refuses_new_connections_from_that_address(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN, config=PIN_CONFIG) as relay:
        client = await relay.connect()
        for _ in range(PIN_CONFIG.pin_lockout_failures - 1):
            assert (await client.request("auth", pin="0000"))["type"] == "auth_failed"
        await client.send({"id": "last", "type": "auth", "pin": "0000"})
        code, reason = await client.wait_closed()
        assert code == CloseCode.POLICY_VIOLATION == 1008
        assert reason
        # The right PIN from the same address is refused now, on a new connection.
        again = await relay.connect()
        await again.send({"id": "right", "type": "auth", "pin": PIN})
        code, _ = await again.wait_closed()
        assert code == 1008
        assert all(frame["type"] != "auth_success" for frame in again.held)
        # The lockout ends with the failure window.
        await trio.sleep(PIN_CONFIG.pin_failure_window)
        later = await relay.connect()
        await later.authenticate(PIN)
        await assert_usable(later, memory_backend)


async def test_global_pin_failure_cap_locks_everyone_out(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """Past ``pin_global_failures`` in the window, even the right PIN is refused (1008).

    In-memory connections all share one address, so this reaches the global cap before the
    per-address lockout only because the cap is set lower.
    """
    config = RelayConfig(pin_backoff_initial=0.1, pin_lockout_failures=50, pin_global_failures=3,
                         pin_failure_window=60.0, auth_timeout=1000.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        for _ in range(2):
            client = await relay.connect()
            assert (await client.request("auth", pin="0000"))["type"] == "auth_failed"
            await client.close()
        client = await relay.connect()
        await client.send({"id": "third", "type": "auth", "pin": "0000"})
        assert (await client.wait_closed())[0] == 1008
        refused = await relay.connect()
        await refused.send({"id": "right", "type": "auth", "pin": PIN})
        assert (await refused.wait_closed())[0] == 1008
        await trio.sleep(config.pin_failure_window)
        await (await relay.connect()).authenticate(PIN)


async def test_the_attempt_that_locks_out_still_gets_its_auth_failed_reply(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """Every request with an id gets exactly one reply, the last one before a close too."""
    async with open_memory_relay(memory_backend, pin=PIN, config=PIN_CONFIG) as relay:
        client = await relay.connect()
        for _ in range(PIN_CONFIG.pin_lockout_failures - 1):
            assert (await client.request("auth", pin="0000"))["type"] == "auth_failed"
        await client.send({"id": "last", "type": "auth", "pin": "0000"})
        assert (await client.wait_closed())[0] == 1008
        assert [(f["id"], f["type"]) for f in client.held] == [
            (None, "auth_required"), ("last", "auth_failed")]
        # And a refused attempt on a new connection is answered before the close.
        again = await relay.connect()
        await again.send({"id": "refused", "type": "auth", "pin": PIN})
        assert (await again.wait_closed())[0] == 1008
        assert [(f["id"], f["type"]) for f in again.held] == [
            (None, "auth_required"), ("refused", "auth_failed")]


async def test_client_that_never_authenticates_is_closed_1008_after_auth_timeout(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(auth_timeout=7.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        start = trio.current_time()
        silent = await relay.connect()
        trying = await relay.connect()  # a wrong PIN does not extend the deadline
        assert (await trying.request("auth", pin="0000"))["type"] == "auth_failed"
        authenticated = await connect(relay)
        for client in (silent, trying):
            code, reason = await client.wait_closed()
            assert code == CloseCode.POLICY_VIOLATION == 1008
            assert reason and "auth" in reason
            assert trio.current_time() - start == pytest.approx(config.auth_timeout)
        assert silent.held == [{"id": None, "type": "auth_required"}]
        # One that authenticated in time outlives the deadline.
        await trio.sleep(config.auth_timeout)
        await assert_usable(authenticated, memory_backend)
        assert relay.relay.statistics().connections == 1


async def test_too_many_subscriptions_are_refused_with_a_code(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    memory_backend.add_chat("p1", "c2")
    config = RelayConfig(max_subscriptions=2)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await connect(relay)
        await client.subscribe("chat", "c1")
        await client.subscribe("project", "p1")
        reply = await client.request("subscribe", resource="chat", resourceId="c2")
        assert reply == {"id": "r4", "type": "error", "code": "too_many_subscriptions",
                         "error": reply["error"], "resource": "chat", "resourceId": "c2"}
        await client.subscribe("chat", "c1")  # resubscribing is no new subscription
        await client.request("unsubscribe", resource="project", resourceId="p1")
        await client.subscribe("chat", "c2")


# --- no client crashes the relay or stalls another -------------------------------------------


async def test_abuse_never_stalls_a_healthy_client(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(max_message_size=2048, max_strikes=5, request_rate=5.0,
                         request_burst=10, pin_backoff_initial=1.0, pin_lockout_failures=50,
                         auth_timeout=20.0)
    events = 60
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        healthy = await connect(relay)
        start_seq = (await healthy.subscribe("chat", "c1"))["seq"]
        emitted_at: list[float] = []
        received: list[tuple[Frame, float]] = []

        async def flooder() -> None:
            client = await connect(relay)
            for n in range(100):
                await client.send(request(id=n, type="subscribe", resource="chat",
                                          resourceId="c1"))
            assert (await client.wait_closed())[0] == 1008

        async def garbage() -> None:
            client = await connect(relay)
            for text in ("}{", "[]", "null", '{"id": 1}', '{"id": "x", "type": "send"}',
                         "\x00" * 100):
                await client.send(text)
            assert (await client.wait_closed())[0] == 1008

        async def oversize() -> None:
            client = await connect(relay)
            await client.send("x" * 5000)
            assert (await client.wait_closed())[0] == 1009

        async def binary() -> None:
            client = await connect(relay)
            await client.ws.send_message(b"\x00\x01")
            assert (await client.wait_closed())[0] == 1003

        async def bad_utf8() -> None:
            client = await connect(relay)
            await client.send_raw_frame(Opcode.TEXT, b"\xc3\x28")
            await client.wait_closed()

        async def pin_guesser() -> None:
            client = await relay.connect()
            for guess in ("0000", "1111", "2222"):
                assert (await client.request("auth", pin=guess))["type"] == "auth_failed"
            await client.close()

        async def vanisher() -> None:
            client = await connect(relay)
            await client.subscribe("chat", "c1")
            await trio.sleep(1.0)
            await client.abort()

        async def silent() -> None:
            client = await relay.connect()
            assert (await client.wait_closed())[0] == 1008

        async def emitter() -> None:
            for n in range(events):
                await trio.sleep(0.25)
                emitted_at.append(trio.current_time())
                memory_backend.emit("chat", "c1", {"n": n})

        async def reader() -> None:
            for _ in range(events):
                frame = await healthy.next_push()
                received.append((frame, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for abuser in (flooder, garbage, oversize, binary, bad_utf8, pin_guesser, vanisher,
                           silent, emitter, reader):
                nursery.start_soon(abuser)

        assert [frame for frame, _ in received] == [
            {"id": None, "type": "data", "resource": "chat", "resourceId": "c1",
             "data": {"n": n}, "seq": start_seq + 1 + n} for n in range(events)]
        # Every push reached the healthy client at the instant it was emitted.
        assert [at for _, at in received] == emitted_at
        # Afterwards the relay serves as before: the abusers are gone, newcomers welcome.
        assert (await relay.quiet_statistics()).connections == 1
        newcomer = await connect(relay)
        await assert_usable(newcomer, memory_backend)
        assert (await healthy.next_push())["data"] == {"type": "chunk", "text": "still here"}
        assert memory_backend.feeds_opened == 1
