"""`trio_relay.testing` and its pytest plugin: the fixtures, the helpers, and an hour of relay
life in mock time.

The fixtures here come from the installed plugin (the ``pytest11`` entry point), exactly as
an application's tests get them; nothing in this repository defines them for the tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from importlib.metadata import entry_points

import pytest
import trio
import trio.testing
from wsproto.frame_protocol import Opcode

import trio_relay.pytest_plugin
from trio_relay import Backend, CloseCode, RelayConfig
from trio_relay.client import (
    Backoff,
    ConnectionState,
    Event,
    MessageAdded,
    RequestTimeout,
    Reset,
    Subscription,
    open_relay_client,
)
from trio_relay.testing import (
    DEFAULT_PIN,
    HANG,
    MEMORY_URL,
    MemoryBackend,
    MemoryConnector,
    MemoryRelay,
    TestClient,
    next_update,
    open_loopback_client,
)


async def next_event(subscription: Subscription) -> Event:
    with trio.fail_after(120):
        return await subscription.__anext__()


# --- the plugin ---------------------------------------------------------------------------------


def test_the_plugin_is_registered_through_its_entry_point(request: pytest.FixtureRequest) -> None:
    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "trio_relay"]
    assert entry.value == "trio_relay.pytest_plugin"
    # pytest loaded it under the entry point's name: no conftest or -p option did.
    assert request.config.pluginmanager.get_plugin("trio_relay") is trio_relay.pytest_plugin


def test_the_plain_fixtures(
    memory_backend: MemoryBackend, relay_backend: Backend, relay_config: RelayConfig,
    relay_pin: str,
) -> None:
    assert relay_backend is memory_backend
    assert (memory_backend.projects, memory_backend.chats) == ({}, {})
    assert relay_config == RelayConfig()
    assert relay_pin == DEFAULT_PIN == "1234"


async def test_memory_relay_serves_those(
    memory_relay: MemoryRelay, memory_backend: MemoryBackend, relay_config: RelayConfig,
    relay_pin: str,
) -> None:
    assert memory_relay.backend is memory_backend
    assert memory_relay.config is relay_config
    assert memory_relay.pin == relay_pin
    assert (await memory_relay.quiet_statistics()).connections == 0


async def test_relay_client_is_authenticated(
    relay_client: TestClient, memory_relay: MemoryRelay, memory_backend: MemoryBackend
) -> None:
    stats = await memory_relay.quiet_statistics()
    assert (stats.connections, stats.authenticated_connections) == (1, 1)
    assert relay_client.held == []  # auth_required and auth_success were read
    memory_backend.add_chat("p1", "c1")
    assert (await relay_client.subscribe("chat", "c1"))["data"] == {"messages": []}


async def test_the_fixtures_run_under_the_autojump_clock(
    autojump_clock: trio.testing.MockClock, relay_client: TestClient, memory_relay: MemoryRelay
) -> None:
    start = trio.current_time()
    silent = await memory_relay.connect()
    assert await silent.wait_closed() == (CloseCode.POLICY_VIOLATION, "authentication timed out")
    assert trio.current_time() - start == pytest.approx(memory_relay.config.auth_timeout)


class TestOverridingFixtures:
    """A module, class or conftest.py overrides a fixture by defining one of the same name."""

    @pytest.fixture
    def relay_config(self) -> RelayConfig:
        return RelayConfig(auth_timeout=3.0, max_subscriptions=1)

    @pytest.fixture
    def relay_pin(self) -> str:
        return "424242"

    @pytest.fixture
    def memory_backend(self) -> MemoryBackend:
        backend = MemoryBackend()
        backend.add_chat("p1", "c1")
        return backend

    async def test_the_relay_uses_the_overrides(
        self, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay,
        relay_client: TestClient,
    ) -> None:
        assert memory_relay.pin == "424242"
        await relay_client.subscribe("chat", "c1")
        reply = await relay_client.request("subscribe", resource="modelProfiles")
        assert reply["code"] == "too_many_subscriptions"
        start = trio.current_time()
        assert (await (await memory_relay.connect()).wait_closed())[0] == 1008
        assert trio.current_time() - start == pytest.approx(3.0)


class TestTeardown:
    """Leaving the test shuts the relay down: clients are closed with 1001, feeds closed."""

    @pytest.fixture
    def seen(self) -> list[TestClient]:
        return []

    @pytest.fixture
    def relay_backend(
        self, memory_backend: MemoryBackend, seen: list[TestClient]
    ) -> Iterator[Backend]:
        # memory_relay depends on this fixture, so the code after the yield runs once the
        # relay has shut down.
        yield memory_backend
        assert memory_backend.feeds_opened == 1
        assert memory_backend.feeds_closed == memory_backend.feeds_opened
        (client,) = seen
        assert client.ws.closed is not None
        assert client.ws.closed.code == CloseCode.GOING_AWAY

    async def test_a_subscribed_client(
        self, relay_client: TestClient, memory_backend: MemoryBackend, seen: list[TestClient]
    ) -> None:
        memory_backend.add_chat("p1", "c1")
        await relay_client.subscribe("chat", "c1")
        seen.append(relay_client)


# --- TestClient ---------------------------------------------------------------------------------


@pytest.fixture
def chat_backend(memory_backend: MemoryBackend) -> MemoryBackend:
    memory_backend.add_chat("p1", "c1")
    return memory_backend


async def test_requests_pushes_and_what_is_held(
    autojump_clock: trio.testing.MockClock, chat_backend: MemoryBackend, relay_client: TestClient
) -> None:
    reply = await relay_client.subscribe("chat", "c1")
    chat_backend.emit("chat", "c1", {"n": 1})
    request_id = await relay_client.request_nowait("unsubscribe", resource="modelProfiles")
    # The push came first: reading the reply holds it for later.
    assert (await relay_client.reply_to(request_id))["data"] == {"unsubscribed": False}
    assert [frame["data"] for frame in relay_client.held] == [{"n": 1}]
    chat_backend.emit("chat", "c1", {"n": 2})
    pushes = await relay_client.next_pushes(2)
    assert [p["seq"] for p in pushes] == [reply["seq"] + 1, reply["seq"] + 2]
    assert relay_client.held == []
    await relay_client.assert_no_push()
    await relay_client.send_message("c1", "hello")
    assert chat_backend.sent == [("c1", "hello")]
    frames = await relay_client.frames_until_quiet()
    assert [f["data"]["message"]["content"] for f in frames] == ["hello"]
    assert await relay_client.unsubscribe("chat", "c1") is True
    assert await relay_client.unsubscribe("chat", "c1") is False


async def test_subscribe_resumes_with_since_seq_and_epoch(
    autojump_clock: trio.testing.MockClock, chat_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    keeper = await memory_relay.connect(authenticate=True)
    first = await keeper.subscribe("chat", "c1")
    chat_backend.emit("chat", "c1", {"n": 1})
    await keeper.next_push()
    client = await memory_relay.connect(authenticate=True)
    reply = await client.subscribe("chat", "c1", since_seq=first["seq"], epoch=first["epoch"])
    assert reply["resumed"] is True
    assert (await client.next_push())["data"] == {"n": 1}


async def test_frames_until_quiet_waits_as_long_as_asked(
    autojump_clock: trio.testing.MockClock, chat_backend: MemoryBackend, relay_client: TestClient
) -> None:
    await relay_client.subscribe("chat", "c1")

    async def emit_later() -> None:
        for n in range(3):
            await trio.sleep(0.5)
            chat_backend.emit("chat", "c1", {"n": n})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(emit_later)
        assert await relay_client.frames_until_quiet() == []  # nothing comes at once
        frames = await relay_client.frames_until_quiet(1.0)
    assert [f["data"] for f in frames] == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_wait_closed_keeps_what_it_read_in_held(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    await client.send({"id": "x", "type": "frobnicate"})
    await client.send_raw_frame(Opcode.BINARY, b"\x00")
    code, reason = await client.wait_closed()
    assert (code, reason) == (CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
    assert [(f["id"], f["type"]) for f in client.held] == [
        (None, "auth_required"), ("x", "error")]


@pytest.mark.parametrize("size", [125, 126, 65535, 65536])
async def test_send_raw_frame_encodes_every_length(
    autojump_clock: trio.testing.MockClock, relay_client: TestClient, size: int
) -> None:
    """7-bit, 16-bit and 64-bit payload lengths; 65536 is the relay's default size limit."""
    frame = b'{"id":"raw","type":"unsubscribe","resource":"modelProfiles"}'
    padded = frame[:-1] + b" " * (size - len(frame)) + b"}"  # JSON allows the whitespace
    assert len(padded) == size
    await relay_client.send_raw_frame(Opcode.TEXT, padded)
    assert (await relay_client.reply_to("raw"))["data"] == {"unsubscribed": False}


async def test_a_fragmented_text_frame(
    autojump_clock: trio.testing.MockClock, relay_client: TestClient
) -> None:
    await relay_client.send_raw_frame(Opcode.TEXT, b'{"id":"f","type":"unsub', fin=False)
    await relay_client.send_raw_frame(Opcode.CONTINUATION, b'scribe","resource":"modelProfiles"}')
    assert (await relay_client.reply_to("f"))["data"] == {"unsubscribed": False}


async def test_next_update_reads_an_in_process_listener(
    autojump_clock: trio.testing.MockClock, chat_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    async with memory_relay.relay.listen("chat", "c1") as listener:
        chat_backend.emit("chat", "c1", {"n": 1})
        assert (await next_update(listener)).data == {"n": 1}
        with pytest.raises(trio.TooSlowError):
            await next_update(listener)


async def test_open_loopback_client_refuses_what_is_not_a_websocket_url() -> None:
    with pytest.raises(ValueError, match="not a ws:// or wss:// URL"):
        async with open_loopback_client("http://127.0.0.1:1/ws"):
            pass  # pragma: no cover


# --- MemoryConnector ----------------------------------------------------------------------------


async def test_the_connector_counts_refuses_and_cuts(
    autojump_clock: trio.testing.MockClock, chat_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    connector = memory_relay.connector()
    backoff = Backoff(random=lambda: 1.0)  # the caps: 0.5, 1, 2, ...
    async with open_relay_client(
        memory_relay.url, pin=memory_relay.pin, connect=connector, backoff=backoff
    ) as client:
        assert memory_relay.url == MEMORY_URL
        assert (len(connector.attempts), len(connector.streams)) == (1, 1)
        connector.refusing = True
        cut_at = trio.current_time()
        await connector.cut()
        await connector.wait_attempts(4)  # three refused
        assert [t - cut_at for t in connector.attempts[1:]] == pytest.approx([0.5, 1.5, 3.5])
        connector.refusing = False
        await client.wait_state(ConnectionState.CONNECTED)
        assert len(connector.streams) == 2
        assert (await memory_relay.quiet_statistics()).connections == 1


async def test_the_connector_with_no_relay_refuses() -> None:
    connector = MemoryConnector()
    with pytest.raises(OSError, match="connection refused"):
        await connector()
    assert len(connector.attempts) == 1


async def test_a_paused_stream_holds_back_everything_from_the_relay(
    autojump_clock: trio.testing.MockClock, chat_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    connector = memory_relay.connector()
    async with open_relay_client(
        memory_relay.url, pin=memory_relay.pin, connect=connector
    ) as client, client.subscribe("chat", "c1") as chat:
        connector.streams[-1].pause_reading()
        chat_backend.add_message("c1", "held back")
        await trio.sleep(5)
        with pytest.raises(trio.WouldBlock):
            chat.receive_nowait()
        connector.streams[-1].resume_reading()
        event = await next_event(chat)
        assert isinstance(event, MessageAdded)
        assert event.message["content"] == "held back"


# --- an hour of relay life ----------------------------------------------------------------------


async def test_an_hour_of_relay_life_in_mock_time(
    autojump_clock: trio.testing.MockClock, chat_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    """Every timer of the relay and of the client, driven by the mock clock: keepalive pings
    answered, an authentication timeout, PIN backoff, a dropped transport that resumes, a
    request timeout, an outage longer than the resume grace period (a Reset), an hour."""
    wall = time.perf_counter()
    start = trio.current_time()
    config = memory_relay.config
    # A web client that stays all hour; trio-websocket answers the relay's pings for it.
    watcher = await memory_relay.connect(authenticate=True)
    await watcher.subscribe("chat", "c1")
    connector = memory_relay.connector()
    async with open_relay_client(
        memory_relay.url, pin=memory_relay.pin, connect=connector,
        backoff=Backoff(random=lambda: 0.5), request_timeout=5.0,
    ) as client, client.subscribe("chat", "c1") as chat:
        # Ten quiet minutes: both sides ping every 20 s and answer each other's pings.
        await trio.sleep(600)
        assert (await memory_relay.quiet_statistics()).connections == 2
        assert client.statistics().connection_attempts == 1
        chat_backend.add_message("c1", "after ten minutes")
        event = await next_event(chat)
        assert isinstance(event, MessageAdded)
        seq = event.seq
        await watcher.next_push()

        # A connection that never authenticates is closed when auth_timeout runs out.
        silent = await memory_relay.connect()
        opened = trio.current_time()
        assert await silent.wait_closed() == (CloseCode.POLICY_VIOLATION,
                                              "authentication timed out")
        assert trio.current_time() - opened == pytest.approx(config.auth_timeout)
        assert silent.held == [{"id": None, "type": "auth_required"}]

        # Wrong PINs from one address are answered later and later.
        guesser = await memory_relay.connect(peer="203.0.113.9:4000")
        delays = []
        for _ in range(3):
            asked = trio.current_time()
            assert (await guesser.request("auth", pin="0000"))["type"] == "auth_failed"
            delays.append(trio.current_time() - asked)
        assert delays == pytest.approx([config.pin_backoff_initial * 2**n for n in range(3)])
        await guesser.close()

        # The transport drops; the client reconnects and resumes: the message it missed
        # arrives as itself, not as a Reset.
        await connector.cut()
        chat_backend.add_message("c1", "while the client was away")
        event = await next_event(chat)
        assert isinstance(event, MessageAdded)
        assert event.message["content"] == "while the client was away"
        assert seq is not None and event.seq == seq + 1
        assert len(connector.attempts) == 2
        await watcher.next_push()

        # A request the backend never answers times out in the client.
        chat_backend.faults["send_message"] = HANG
        asked = trio.current_time()
        with pytest.raises(RequestTimeout):
            await client.send("c1", "anyone there?")
        assert trio.current_time() - asked == pytest.approx(5.0)
        del chat_backend.faults["send_message"]

        # An outage longer than resume_grace, with nobody else watching the chat: the relay
        # has forgotten the chat's numbering, so the client gets the whole state (a Reset).
        await watcher.close()
        connector.refusing = True
        await connector.cut()
        await trio.sleep(config.resume_grace + 10)
        assert (await memory_relay.quiet_statistics()).kept_histories == 0
        connector.refusing = False
        event = await next_event(chat)
        assert isinstance(event, Reset)
        assert event.snapshot == chat_backend.messages["c1"]
        assert client.state is ConnectionState.CONNECTED

        # And on to the end of the hour.
        await trio.sleep_until(start + 3600)
        chat_backend.add_message("c1", "an hour later")
        event = await next_event(chat)
        assert isinstance(event, MessageAdded)
        assert event.message["content"] == "an hour later"
    assert trio.current_time() - start >= 3600
    elapsed = time.perf_counter() - wall
    print(f"an hour of relay life took {elapsed:.3f} s of wall time")
    assert elapsed < 5.0
