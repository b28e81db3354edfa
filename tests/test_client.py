"""The Trio client library (`trio_relay.client`) against a real relay over memory streams.

Every test runs a real relay (`open_memory_relay`) and the real client, whose ``connect``
hands it the client end of an in-memory stream: the WebSocket handshake and framing are the
production ones, time is the autojump clock's, and "quiet" means every task is blocked.
The tests here hold whether or not the relay can resume; `test_client_resume.py` checks the
exactly-once promise that resuming adds.
"""

from __future__ import annotations

import itertools
import math
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from _helpers import PIN, PROFILES, demo_chats, run_relay

from trio_relay import RelayConfig, open_relay
from trio_relay._store.sqlite import open_sqlite_backend
from trio_relay.client import (
    AgentError,
    AuthFailed,
    Backoff,
    ChatCreated,
    ChatDeleted,
    ChatRenamed,
    Chunk,
    Completed,
    ConnectionLost,
    ConnectionState,
    Event,
    MessageAdded,
    ModelProfilesChanged,
    Other,
    RelayClient,
    ReplyCancelled,
    ReplyStarted,
    RequestRejected,
    RequestTimeout,
    Reset,
    Subscription,
    SubscriptionFailed,
    open_mirror,
    open_relay_client,
    parse_event,
)
from trio_relay.testing import (
    HANG,
    MEMORY_URL,
    MemoryBackend,
    MemoryConnector,
    MemoryRelay,
    open_memory_relay,
)

memory_backend = pytest.fixture(demo_chats, name="memory_backend")


@asynccontextmanager
async def client_of(
    relay: MemoryRelay, transport: MemoryConnector | None = None, **kwargs: Any
) -> AsyncIterator[RelayClient]:
    transport = transport or relay.connector()
    async with open_relay_client(MEMORY_URL, pin=PIN, connect=transport, **kwargs) as client:
        yield client


async def next_event(subscription: Subscription) -> Event:
    with trio.fail_after(60):
        return await subscription.__anext__()


def fold(messages: list[Any], event: Event) -> list[Any]:
    """A chat's messages after ``event``: what a caller rebuilds from events and resets."""
    if isinstance(event, Reset):
        return list(event.snapshot)
    if isinstance(event, MessageAdded):
        return [*messages, event.message]
    return messages


async def quiet() -> None:
    await trio.testing.wait_all_tasks_blocked()


# --- connecting -------------------------------------------------------------------------------


async def test_entering_connects_authenticates_and_exposes_initial_data(
    autojump_clock: trio.abc.Clock,
    memory_relay: MemoryRelay,
) -> None:
    async with client_of(memory_relay) as client:
        assert client.state is ConnectionState.CONNECTED
        assert [p["id"] for p in client.projects] == ["p1", "p2"]
        assert client.model_profiles == PROFILES
        assert client.error is None
        assert memory_relay.relay.statistics().authenticated_connections == 1
        left_at = trio.current_time()
    assert trio.current_time() == left_at  # the closing handshake completed at once
    assert client.statistics().state is ConnectionState.CLOSED
    await quiet()
    assert memory_relay.relay.statistics().connections == 0


async def test_wrong_pin_raises_auth_failed_and_never_retries(
    autojump_clock: trio.abc.Clock,
    memory_relay: MemoryRelay,
) -> None:
    transport = memory_relay.connector()
    with pytest.raises(AuthFailed) as failed:
        async with open_relay_client(MEMORY_URL, pin="0000", connect=transport):
            pytest.fail("entered with a wrong PIN")  # pragma: no cover
    assert failed.value.error == "Invalid PIN"
    await trio.sleep(120)  # mock time: two minutes without a retry
    assert len(transport.attempts) == 1


async def test_first_connection_failure_raises_connection_lost(
    autojump_clock: trio.abc.Clock,
) -> None:
    transport = MemoryConnector(None)
    with pytest.raises(ConnectionLost, match="could not connect") as lost:
        async with open_relay_client(MEMORY_URL, pin=PIN, connect=transport):
            pytest.fail("entered without a relay")  # pragma: no cover
    assert lost.value.close_code is None
    assert len(transport.attempts) == 1


async def test_an_error_in_the_block_comes_out_as_itself(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    with pytest.raises(ValueError, match="boom"):
        async with client_of(memory_relay):
            raise ValueError("boom")


def test_the_public_module_exports_the_whole_api() -> None:
    import trio_relay._client
    import trio_relay.client

    exported = set(trio_relay.client.__all__)
    assert exported == set(trio_relay._client.__all__)
    for name in exported:
        assert getattr(trio_relay.client, name) is getattr(trio_relay._client, name)


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="ws://"):
        RelayClient("http://x/ws", pin=PIN, request_timeout=1, backoff=Backoff(), connect=None,
                    ssl_context=None)
    with pytest.raises(ValueError, match="request_timeout"):
        RelayClient(MEMORY_URL, pin=PIN, request_timeout=0, backoff=Backoff(), connect=None,
                    ssl_context=None)
    with pytest.raises(ValueError, match="positive"):
        Backoff(initial=0)


@pytest.mark.parametrize("field", ["initial", "maximum", "multiplier"])
@pytest.mark.parametrize("value", [0, -1.5, math.nan, math.inf])
def test_backoff_takes_finite_positive_numbers_only(field: str, value: float) -> None:
    fields: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        Backoff(**fields)


# --- typed events -----------------------------------------------------------------------------


def test_parse_event_types_each_known_shape_and_passes_the_rest_through() -> None:
    message = {"id": "m1", "content": "hi"}
    chat = {"id": "c2", "title": "T"}
    assert parse_event("chat", {"type": "message", "message": message}, 4) == MessageAdded(
        message, seq=4)
    assert parse_event("chat", {"type": "reply_started", "messageId": "m"}) == ReplyStarted("m")
    assert parse_event("chat", {"type": "chunk", "messageId": "m", "text": "t"}) == Chunk("m", "t")
    assert parse_event("chat", {"type": "error", "messageId": "m", "error": "agent failed"}) == (
        AgentError("m", "agent failed"))
    assert parse_event("project", {"type": "chat_created", "chat": chat}) == ChatCreated(chat)
    assert parse_event("project", {"type": "chat_renamed", "chat": chat}) == ChatRenamed(chat)
    assert parse_event("project", {"type": "chat_deleted", "chatId": "c2"}) == ChatDeleted("c2")
    assert parse_event("modelProfiles", {"modelProfiles": PROFILES}) == ModelProfilesChanged(
        PROFILES)
    assert parse_event("chat", {"completed": True}, 9) == Completed(seq=9)
    for resource, data in [("chat", {"type": "chunk", "messageId": 1}), ("chat", [1]),
                           ("project", {"type": "message", "message": message}),
                           ("chat", {"n": 1}), ("modelProfiles", {"modelProfiles": "x"})]:
        assert parse_event(resource, data, 2) == Other(data, seq=2)


async def test_chat_events_arrive_typed_with_their_seq(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with client.subscribe("chat", "c1") as chat:
            assert chat.snapshot == memory_backend.messages["c1"]
            base = chat.seq
            assert base is not None
            await client.send("c1", "hi")
            added = await next_event(chat)
            assert added == MessageAdded(memory_backend.messages["c1"][-1], seq=base + 1)
            assert added.message["content"] == "hi"
            memory_backend.emit("chat", "c1", {"type": "reply_started", "messageId": "r1"})
            memory_backend.emit("chat", "c1", {"type": "chunk", "messageId": "r1", "text": "Ec"})
            memory_backend.emit("chat", "c1", {"type": "chunk", "messageId": "r1", "text": "ho"})
            memory_backend.emit("chat", "c1", {"type": "error", "messageId": "r1",
                                        "error": "agent failed"})
            memory_backend.emit("chat", "c1", {"something": "else"})
            assert [await next_event(chat) for _ in range(5)] == [
                ReplyStarted("r1", seq=base + 2),
                Chunk("r1", "Ec", seq=base + 3),
                Chunk("r1", "ho", seq=base + 4),
                AgentError("r1", "agent failed", seq=base + 5),
                Other({"something": "else"}, seq=base + 6),
            ]
            assert chat.seq == base + 6


async def test_project_events_and_create_chat(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with client.subscribe("project", "p1") as project:
            assert [c["id"] for c in project.snapshot] == ["c1"]
            chat = await client.create_chat("p1", title="Ideas")
            assert chat["title"] == "Ideas" and chat["projectId"] == "p1"
            assert (await next_event(project)) == ChatCreated(chat, seq=project.seq)
            untitled = await client.create_chat("p1")
            assert untitled["title"] == "New chat"
            assert await next_event(project) == ChatCreated(untitled, seq=project.seq)
            renamed = {**chat, "title": "Better ideas"}
            memory_backend.emit("project", "p1", {"type": "chat_renamed", "chat": renamed})
            memory_backend.emit("project", "p1", {"type": "chat_deleted", "chatId": chat["id"]})
            assert isinstance(await next_event(project), ChatRenamed)
            assert (await next_event(project)) == ChatDeleted(chat["id"], seq=project.seq)


async def test_model_profiles_subscription(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with client.subscribe("modelProfiles") as profiles:
            assert profiles.snapshot == PROFILES
            assert (profiles.resource, profiles.resource_id) == ("modelProfiles", "")
            new = [*PROFILES, {"id": "slow", "name": "Slow"}]
            memory_backend.set_model_profiles(new)
            assert await next_event(profiles) == ModelProfilesChanged(new, seq=profiles.seq)


async def test_send_reaches_the_backend_and_every_subscriber(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    async with client_of(memory_relay) as alice, client_of(memory_relay) as bob:
        async with bob.subscribe("chat", "c1") as chat:
            await alice.send("c1", {"text": "from alice"})
            assert memory_backend.sent == [("c1", {"text": "from alice"})]
            event = await next_event(chat)
            assert isinstance(event, MessageAdded)
            assert event.message["content"] == "from alice"


# --- failures of requests ---------------------------------------------------------------------


async def test_a_hanging_backend_gives_request_timeout(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    memory_backend.faults["send_message"] = HANG
    # The relay's own bound on the backend is longer, or the reply would be backend_error.
    config = RelayConfig(backend_timeout=30)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        async with client_of(relay, request_timeout=2.0) as client:
            start = trio.current_time()
            with pytest.raises(RequestTimeout, match="'send'"):
                await client.send("c1", "hi")
            assert trio.current_time() - start == pytest.approx(2.0)
            assert client.state is ConnectionState.CONNECTED


async def test_refusals_raise_request_rejected_with_the_wire_code(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        with pytest.raises(RequestRejected) as rejected:
            await client.send("nope", "hi")
        assert rejected.value.code == "not_found"
        with pytest.raises(RequestRejected) as rejected:
            await client.create_chat("nope")
        assert rejected.value.code == "not_found"
        with pytest.raises(RequestRejected) as rejected:
            async with client.subscribe("chat", "nope"):
                pytest.fail("subscribed to a missing chat")  # pragma: no cover
        assert rejected.value.code == "not_found"
        memory_backend.faults["send_message"] = RuntimeError("disk on fire")
        with pytest.raises(RequestRejected) as rejected:
            await client.send("c1", "hi")
        assert (rejected.value.code, rejected.value.error) == ("backend_error", "backend error")
        # None of this hurt the connection.
        assert client.statistics().connection_attempts == 1
        async with client.subscribe("chat", "c1") as chat:
            assert chat.snapshot == memory_backend.messages["c1"]
        with pytest.raises(ValueError, match="resource"):
            async with client.subscribe("chats", "c1"):
                pass  # pragma: no cover


async def test_a_send_in_flight_when_the_connection_drops_is_sent_again_and_stored_once(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    memory_backend.faults["send_message"] = HANG
    config = RelayConfig(backend_timeout=30)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        transport = relay.connector()
        async with client_of(relay, transport) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, "c1", "maybe delivered")
                await trio.testing.wait_all_tasks_blocked()  # it hangs in the backend
                del memory_backend.faults["send_message"]
                await transport.cut()
            # It returned: sent again, with its clientNonce, on the next connection.
            assert memory_backend.sent == [("c1", "maybe delivered")]
            await client.send("c1", "after")
            assert memory_backend.sent == [("c1", "maybe delivered"), ("c1", "after")]


async def test_a_request_finds_no_connection_in_time(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    transport = memory_relay.connector()
    async with client_of(memory_relay, transport, request_timeout=5.0) as client:
        transport.refusing = True
        await transport.cut()
        await client.wait_state(ConnectionState.RECONNECTING)
        start = trio.current_time()
        with pytest.raises(ConnectionLost, match="not connected") as lost:
            await client.send("c1", "hi")
        assert trio.current_time() - start == pytest.approx(5.0)
        assert lost.value.close_code == 1006


# --- reconnecting -----------------------------------------------------------------------------


def test_backoff_caps_and_full_jitter() -> None:
    caps = Backoff()
    assert [caps.cap(n) for n in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert caps.cap(10_000) == 30  # no overflow
    draws = iter([0.5, 0.25, 0.0, 0.999])
    jittered = Backoff(initial=1, maximum=5, multiplier=3, random=lambda: next(draws))
    assert [jittered.delay(n) for n in range(4)] == [0.5, 0.75, 0.0, 0.999 * 5]


async def test_reconnect_delays_follow_the_backoff_schedule(
    autojump_clock: trio.abc.Clock,
    memory_relay: MemoryRelay,
) -> None:
    transport = memory_relay.connector()
    backoff = Backoff(random=lambda: 1.0)  # the caps themselves: 0.5, 1, 2, ... 30
    async with client_of(memory_relay, transport, backoff=backoff) as client:
        transport.refusing = True
        cut_at = trio.current_time()
        await transport.cut()
        await transport.wait_attempts(1 + 9)  # nine refused
        transport.refusing = False
        await client.wait_state(ConnectionState.CONNECTED)
        times = [cut_at, *transport.attempts[1:]]
        delays = [round(b - a, 6) for a, b in itertools.pairwise(times)]
        assert delays[:9] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
        # Success starts the schedule over.
        count = len(transport.attempts)
        cut_at = trio.current_time()
        await transport.cut()
        await client.wait_state(ConnectionState.RECONNECTING)
        await client.wait_state(ConnectionState.CONNECTED)
        assert len(transport.attempts) == count + 1
        assert transport.attempts[-1] - cut_at == pytest.approx(0.5)


async def test_jittered_delays_come_from_the_injected_random(
    autojump_clock: trio.abc.Clock,
    memory_relay: MemoryRelay,
) -> None:
    draws = iter([0.5, 0.1, 0.75, 0.3])
    transport = memory_relay.connector()
    backoff = Backoff(initial=2, maximum=10, multiplier=2, random=lambda: next(draws))
    async with client_of(memory_relay, transport, backoff=backoff) as client:
        transport.refusing = True
        cut_at = trio.current_time()
        await transport.cut()
        await transport.wait_attempts(4)  # three refused
        transport.refusing = False
        await client.wait_state(ConnectionState.CONNECTED)
        times = [cut_at, *transport.attempts[1:]]
        assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [
            1.0, 0.4, 6.0, 3.0]  # 0.5 * 2, 0.1 * 4, 0.75 * 8, 0.3 * 10 (the cap)


async def _reconnect_keeps_the_chat_whole(
    relay: MemoryRelay, backend: MemoryBackend, transport: MemoryConnector,
    drop: Callable[[], Any], expected_close: int | None,
) -> None:
    """Messages before, during and after a lost connection all reach the caller, as events
    or inside a Reset, in order; the client says why the connection ended."""
    async with client_of(relay, transport, backoff=Backoff(random=lambda: 0.5)) as client:
        changes = client.state_changes()
        async with client.subscribe("chat", "c1") as chat:
            messages = list(chat.snapshot)
            backend.add_message("c1", "before")
            messages = fold(messages, await next_event(chat))
            await drop()
            backend.add_message("c1", "while away")
            with trio.fail_after(60):
                assert [await anext(changes) for _ in range(3)] == [
                    ConnectionState.CONNECTED, ConnectionState.RECONNECTING,
                    ConnectionState.CONNECTED]
            assert client.last_close is not None
            assert client.last_close.code == expected_close
            backend.add_message("c1", "after")
            while not messages or messages[-1]["content"] != "after":
                messages = fold(messages, await next_event(chat))
            assert messages == backend.messages["c1"]


async def test_reconnects_after_an_abrupt_close(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    transport = memory_relay.connector()
    await _reconnect_keeps_the_chat_whole(
        memory_relay, memory_backend, transport, transport.cut, 1006)


async def test_reconnects_after_1011(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    # A relay whose keepalive pings find no answer closes with 1011: a client that stopped
    # reading looks exactly like that.
    config = RelayConfig(ping_interval=5, ping_timeout=5)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        transport = relay.connector()

        async def stop_reading() -> None:
            stream = transport.streams[-1]
            stream.pause_reading()
            await trio.sleep(11)
            stream.resume_reading()

        await _reconnect_keeps_the_chat_whole(relay, memory_backend, transport, stop_reading, 1011)


async def test_a_relay_that_stops_answering_is_dropped_and_reconnected(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    # Only the client's own keepalive can notice here: the relay's pings are far apart.
    config = RelayConfig(ping_interval=1000, ping_timeout=1000)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        transport = relay.connector()

        async def go_silent() -> None:  # nothing from the relay gets through: no pong either
            stream = transport.streams[-1]
            stream.pause_reading()
            await trio.sleep(45)
            stream.resume_reading()

        async with client_of(relay, transport) as client:
            changes = client.state_changes()
            assert await anext(changes) is ConnectionState.CONNECTED
            async with trio.open_nursery() as nursery:
                nursery.start_soon(go_silent)
                start = trio.current_time()
                assert await anext(changes) is ConnectionState.RECONNECTING
                assert trio.current_time() - start == pytest.approx(40)  # a ping, then 20 s
                assert client.last_close is not None
                assert client.last_close.code is None
                assert "ping" in client.last_close.reason
                assert await anext(changes) is ConnectionState.CONNECTED


async def test_slow_consumer_1013_reconnects(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    config = RelayConfig(outbound_queue_size=4)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        transport = relay.connector(lockstep=True)

        async def fall_behind() -> None:
            stream = transport.streams[-1]
            stream.pause_reading()
            for n in range(10):
                memory_backend.emit("chat", "c1", {"n": n})
                await quiet()
            stream.resume_reading()

        await _reconnect_keeps_the_chat_whole(relay, memory_backend, transport, fall_behind, 1013)
        # Ten missed pushes are more than this relay can queue (4): resuming would overflow
        # again, so after a second 1013 the client starts over from a fresh snapshot.
        assert relay.relay.counters.slow_closes in (1, 2)
        assert len(transport.attempts) == 1 + relay.relay.counters.slow_closes


async def test_relay_restart_1001_reconnects_with_a_reset(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    transport = MemoryConnector()

    async with trio.open_nursery() as nursery:
        stop_first = trio.Event()
        transport.relay = await nursery.start(run_relay, memory_backend, stop_first)
        async with open_relay_client(MEMORY_URL, pin=PIN, connect=transport) as client:
            async with client.subscribe("chat", "c1") as chat:
                stop_first.set()
                await client.wait_state(ConnectionState.RECONNECTING)
                assert client.last_close is not None and client.last_close.code == 1001
                memory_backend.add_message("c1", "while the relay was down")
                await trio.sleep(5)  # a few refused attempts
                stop_second = trio.Event()
                transport.relay = await nursery.start(run_relay, memory_backend, stop_second)
                await client.wait_state(ConnectionState.CONNECTED)
                event = await next_event(chat)
                assert event == Reset(memory_backend.messages["c1"], seq=event.seq)
                memory_backend.add_message("c1", "on the new relay")
                added = await next_event(chat)
                assert isinstance(added, MessageAdded)
                assert added.message["content"] == "on the new relay"
                assert event.seq is not None and added.seq == event.seq + 1
        assert len(transport.attempts) > 2
        stop_second.set()


async def test_policy_close_1008_is_terminal(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    # A client that floods the relay is closed with 1008: after auth and one subscribe, the
    # next request is rate limited and, at the first strike, the connection is closed.
    config = RelayConfig(request_burst=2, request_rate=0.001, max_strikes=1)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        transport = relay.connector()
        async with client_of(relay, transport) as client:
            async with client.subscribe("chat", "c1") as chat:
                with pytest.raises(RequestRejected) as rejected:
                    await client.send("c1", "one too many")
                assert rejected.value.code == "rate_limited"
                with pytest.raises(ConnectionLost) as lost:
                    await next_event(chat)
                assert lost.value.close_code == 1008
                assert client.state is ConnectionState.CLOSED
                assert isinstance(client.error, ConnectionLost)
                with pytest.raises(ConnectionLost) as lost:
                    await client.send("c1", "again")
                assert lost.value.close_code == 1008
                with pytest.raises(ConnectionLost):
                    await client.wait_state(ConnectionState.CONNECTED)
            with pytest.raises(ConnectionLost):
                async with client.subscribe("chat", "c1"):
                    pass  # pragma: no cover
            await trio.sleep(120)  # mock time: two minutes without a retry
            assert len(transport.attempts) == 1


async def test_a_pin_refused_on_reconnect_is_terminal(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    transport = memory_relay.connector()
    async with client_of(memory_relay, transport) as client:
        async with client.subscribe("chat", "c1") as chat:
            memory_relay.relay.pin = "5678"  # the host changed its PIN
            await transport.cut()
            with pytest.raises(AuthFailed):
                await next_event(chat)
            with pytest.raises(AuthFailed):
                await client.send("c1", "hi")
        assert client.state is ConnectionState.CLOSED
        await trio.sleep(120)  # mock time: two minutes without a retry
        assert len(transport.attempts) == 2


async def test_state_changes_are_observable(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    transport = memory_relay.connector()
    seen: list[ConnectionState] = []

    async def watch(client: RelayClient) -> None:
        async for state in client.state_changes():
            seen.append(state)

    async with trio.open_nursery() as nursery:
        async with client_of(memory_relay, transport) as client:
            nursery.start_soon(watch, client)
            await quiet()
            await transport.cut()
            assert await client.wait_state(ConnectionState.RECONNECTING) is (
                ConnectionState.RECONNECTING)
            await client.wait_state(ConnectionState.CONNECTED)
    assert seen == [ConnectionState.CONNECTED, ConnectionState.RECONNECTING,
                    ConnectionState.CONNECTED, ConnectionState.CLOSED]
    with pytest.raises(trio.ClosedResourceError):
        await client.wait_state(ConnectionState.CONNECTED)
    assert [s async for s in client.state_changes()] == [ConnectionState.CLOSED]


# --- subscriptions ----------------------------------------------------------------------------


async def test_subscriptions_of_one_resource_share_one_relay_subscription(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with client.subscribe("chat", "c1") as first:
            memory_backend.add_message("c1", "one")
            async with client.subscribe("chat", "c1") as second:
                assert second.snapshot == memory_backend.messages["c1"]
                await quiet()
                assert relay.relay.statistics().subscriptions == 1
                memory_backend.add_message("c1", "two")
                assert [fold([], await next_event(first))[0]["content"],
                        fold([], await next_event(first))[0]["content"]] == ["one", "two"]
                assert fold([], await next_event(second))[0]["content"] == "two"
            with pytest.raises(trio.ClosedResourceError):
                await second.__anext__()
            await quiet()
            assert relay.relay.statistics().subscriptions == 1
            memory_backend.add_message("c1", "three")
            assert fold([], await next_event(first))[0]["content"] == "three"
        await quiet()
        assert relay.relay.statistics().subscriptions == 0
        assert client.statistics().resources == client.statistics().subscriptions == 0


async def test_two_chats_are_routed_by_resource_id(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    memory_backend.add_chat("p1", "c2")
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with client.subscribe("chat", "c1") as one, client.subscribe("chat", "c2") as two:
            memory_backend.add_message("c2", "for two")
            memory_backend.add_message("c1", "for one")
            assert fold([], await next_event(one))[0]["content"] == "for one"
            assert fold([], await next_event(two))[0]["content"] == "for two"
            with pytest.raises(trio.WouldBlock):
                one.receive_nowait()


async def test_a_consumer_that_falls_behind_gets_a_reset(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with client.subscribe("chat", "c1", buffer=3) as chat, \
                client.subscribe("chat", "c1") as steady:
            for n in range(6):
                memory_backend.add_message("c1", f"m{n}")
            await quiet()
            assert client.statistics().buffered_events == 3 + 6
            got = [await next_event(chat) for _ in range(4)]
            assert [e.message["content"] for e in got[:3] if isinstance(e, MessageAdded)] == [
                "m0", "m1", "m2"]
            assert got[3] == Reset(memory_backend.messages["c1"], seq=got[3].seq)
            assert chat.snapshot == memory_backend.messages["c1"]
            memory_backend.add_message("c1", "next")
            assert fold([], await next_event(chat))[0]["content"] == "next"
            # The other consumer of the resource saw everything, once, with no reset.
            contents = [fold([], await next_event(steady))[0]["content"] for _ in range(7)]
            assert contents == [f"m{n}" for n in range(6)] + ["next"]


async def test_completed_and_failed_upstreams_end_the_subscription(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    memory_backend.add_chat("p1", "c2")
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with client.subscribe("chat", "c1") as chat:
            memory_backend.add_message("c1", "last words")
            memory_backend.end_feeds("chat", "c1")
            events = [event async for event in chat]
            assert isinstance(events[0], MessageAdded)
            assert events[1] == Completed(seq=events[0].seq + 1 if events[0].seq else None)
        async with client.subscribe("chat", "c2") as chat:
            memory_backend.end_feeds("chat", "c2", RuntimeError("upstream broke"))
            with pytest.raises(SubscriptionFailed) as failed:
                await next_event(chat)
            assert failed.value.code == "backend_error"
        await quiet()
        assert client.statistics().resources == 0
        assert relay.relay.statistics().subscriptions == 0


async def test_a_resource_gone_while_disconnected_fails_its_subscription(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    transport = memory_relay.connector()
    async with client_of(memory_relay, transport) as client:
        async with client.subscribe("chat", "c1") as chat, \
                client.subscribe("project", "p1") as project:
            await transport.cut()
            # Deleted as a backend does it (SQLiteBackend.delete_chat): its feeds complete, so
            # the broadcaster that lingered for this client ends, and a new one finds nothing.
            del memory_backend.chats["c1"]
            memory_backend.end_feeds("chat", "c1")
            with pytest.raises(SubscriptionFailed) as failed:
                await next_event(chat)
            assert failed.value.code == "not_found"
            memory_backend.add_chat("p1", "c3")
            event = await next_event(project)
            assert isinstance(event, (ChatCreated, Reset))
            assert client.state is ConnectionState.CONNECTED


# --- the mirror -------------------------------------------------------------------------------


async def test_mirror_folds_pushes_into_state(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay, client_of(relay) as client:
        async with open_mirror(client, project_ids=["p1"], chat_ids=["c1"],
                               model_profiles=True) as mirror:
            assert mirror.projects == client.projects
            assert list(mirror.chats["p1"]) == ["c1"]
            assert mirror.messages["c1"] == memory_backend.messages["c1"]
            assert mirror.model_profiles == PROFILES
            assert mirror.watching == {("project", "p1"), ("chat", "c1"), ("modelProfiles", "")}

            await client.send("c1", "question")
            await mirror.wait_for(lambda m: len(m.messages["c1"]) == 2)
            memory_backend.emit("chat", "c1", {"type": "reply_started", "messageId": "r1"})
            memory_backend.emit("chat", "c1", {"type": "chunk", "messageId": "r1", "text": "ans"})
            memory_backend.emit("chat", "c1", {"type": "chunk", "messageId": "r1", "text": "wer"})
            await mirror.wait_for(lambda m: m.streaming["c1"].get("r1") == "answer")
            memory_backend.messages["c1"].append(
                {"id": "r1", "chatId": "c1", "role": "assistant", "content": "answer"})
            memory_backend.emit(
                "chat", "c1", {"type": "message", "message": memory_backend.messages["c1"][-1]})
            await mirror.wait_for(lambda m: "r1" not in m.streaming["c1"])
            assert mirror.messages["c1"] == memory_backend.messages["c1"]
            memory_backend.emit("chat", "c1", {"type": "reply_started", "messageId": "r2"})
            memory_backend.emit("chat", "c1", {"type": "error", "messageId": "r2",
                                        "error": "agent failed"})
            await mirror.wait_for(lambda m: m.agent_errors["c1"] == {"r2": "agent failed"})
            assert mirror.streaming["c1"] == {}

            version = mirror.version
            created = await client.create_chat("p1", "Second")
            assert await mirror.wait_changed(version) > version
            await mirror.wait_for(lambda m: created["id"] in m.chats["p1"])
            memory_backend.set_model_profiles([])
            await mirror.wait_for(lambda m: m.model_profiles == [])

            await mirror.watch_chat(created["id"])
            assert mirror.messages[created["id"]] == []
            memory_backend.emit("project", "p1", {"type": "chat_deleted", "chatId": created["id"]})
            await mirror.wait_for(lambda m: created["id"] not in m.chats["p1"])
            assert created["id"] not in mirror.messages
            assert ("chat", created["id"]) not in mirror.watching

            mirror.unwatch_chat("c1")
            assert "c1" not in mirror.messages
            mirror.unwatch_project("p1")
            assert mirror.chats == {}
            await quiet()
            assert relay.relay.statistics().subscriptions == 1  # modelProfiles
        await quiet()
        assert relay.relay.statistics().subscriptions == 0


async def test_mirror_takes_a_reset_and_records_failures(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    memory_backend.add_chat("p1", "c2")
    transport = MemoryConnector()

    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        transport.relay = await nursery.start(run_relay, memory_backend, stop)
        async with open_relay_client(MEMORY_URL, pin=PIN, connect=transport) as client:
            async with open_mirror(client, chat_ids=["c1", "c2"]) as mirror:
                stop.set()
                await client.wait_state(ConnectionState.RECONNECTING)
                memory_backend.add_message("c1", "written while the relay was down")
                memory_backend.end_feeds("chat", "c2")
                del memory_backend.chats["c2"]
                stop = trio.Event()
                transport.relay = await nursery.start(run_relay, memory_backend, stop)
                await mirror.wait_for(lambda m: len(m.messages["c1"]) == 2)
                assert mirror.messages["c1"] == memory_backend.messages["c1"]
                await mirror.wait_for(lambda m: ("chat", "c2") in m.failures)
                assert mirror.failures[("chat", "c2")].code == "not_found"
                assert mirror.watching == {("chat", "c1")}
                with pytest.raises(RequestRejected):
                    await mirror.watch_chat("c2")
        stop.set()


# --- over real sockets, and the documentation's programs --------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def _documented_code() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)


def _load(source: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(source, str(DOCS), "exec"), namespace)
    return namespace


@pytest.mark.e2e
async def test_default_transport_over_loopback_tcp_and_tls(memory_backend: MemoryBackend) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with trio.fail_after(10):
        async with open_relay(memory_backend, pin=PIN) as relay:
            port = await relay.start_serving("127.0.0.1", 0)
            tls_port = await relay.start_serving("127.0.0.1", 0, ssl_context=server_context)
            for url, context in [(f"ws://127.0.0.1:{port}/ws", None),
                                 (f"wss://127.0.0.1:{tls_port}/ws", client_context)]:
                async with open_relay_client(url, pin=PIN, ssl_context=context) as client:
                    async with client.subscribe("chat", "c1") as chat:
                        await client.send("c1", url)
                        event = await anext(chat)
                        assert isinstance(event, MessageAdded)
                        assert event.message["content"] == url
            # A certificate nobody vouched for: the first connection fails, as ConnectionLost.
            with pytest.raises(ConnectionLost, match="could not connect"):
                async with open_relay_client(f"wss://127.0.0.1:{tls_port}/ws", pin=PIN):
                    pass  # pragma: no cover


@pytest.mark.e2e
async def test_the_documented_programs_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            ) -> None:
    """docs/client.md's programs, against the default backend that `trio-relay serve` runs."""
    programs = [code for code in _documented_code() if "trio.run(main" in code]
    assert len(programs) == 2
    with trio.fail_after(10):
        async with open_sqlite_backend(tmp_path) as backend:
            async with open_relay(backend, pin="123456") as relay:
                port = await relay.start_serving("127.0.0.1", 0)
                for code in programs:
                    main = _load(code.rpartition("trio.run(")[0])["main"]
                    await main(f"ws://127.0.0.1:{port}/ws", "123456")
    output = capsys.readouterr().out
    assert "projects: ['Demo project']" in output
    assert "Echo: hello from Python\n" in output
    assert "streaming: Echo: ping" in output
    assert output.endswith("[user] ping\n[assistant] Echo: ping\n")


def test_the_documented_test_and_helpers_run() -> None:
    code = _documented_code()
    test = _load(next(c for c in code if "async def test_" in c))["test_my_bot_sees_messages"]
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(test, clock, clock=clock)
    apply = _load(next(c for c in code if "def apply(" in c))["apply"]
    assert apply([{"id": 1}], Reset([{"id": 2}])) == [{"id": 2}]
    assert apply([], MessageAdded({"id": 3})) == [{"id": 3}]
    for name in ("send_or_explain", "show_connection"):
        assert callable(_load(next(c for c in code if f"def {name}(" in c))[name])


async def test_a_cancelled_reply_is_typed_and_leaves_the_mirror(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin="1234") as relay:
        async with open_relay_client(relay.url, pin="1234", connect=relay.connector()) as client:
            async with client.subscribe("chat", "c1") as chat, open_mirror(
                client, chat_ids=["c1"]
            ) as mirror:
                backend.emit("chat", "c1", {"type": "reply_started", "messageId": "m1"})
                backend.emit("chat", "c1", {"type": "chunk", "messageId": "m1", "text": "par"})
                backend.emit("chat", "c1", {"type": "cancelled", "messageId": "m1"})
                events = [await chat.__anext__() for _ in range(3)]
                assert events[-1] == ReplyCancelled("m1", seq=events[-1].seq)
                await mirror.wait_for(lambda m: not m.streaming.get("c1"))


async def test_cancel_reply_and_create_with_a_profile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    backend.add_project("p1")
    backend.set_model_profiles([{"id": "echo"}, {"id": "slow"}])
    async with open_memory_relay(backend, pin="1234") as relay:
        async with open_relay_client(relay.url, pin="1234", connect=relay.connector()) as client:
            chat = await client.create_chat("p1", "T", model_profile_id="slow")
            assert chat["modelProfileId"] == "slow"
            assert await client.cancel_reply(chat["id"]) is False
            backend.replying.add(chat["id"])
            assert await client.cancel_reply(chat["id"]) is True
            with pytest.raises(RequestRejected) as refused:
                await client.cancel_reply("nope")
            assert refused.value.code == "not_found"
