"""The client's exactly-once promise, which rests on the relay's resume (``sinceSeq``, ``epoch``).

Whatever happens to the connection, the caller of ``client.subscribe`` sees every event once,
in order, or an explicit `Reset` carrying the whole state; never a silent gap, never a
duplicate. Hypothesis cuts the transport at random points of a stream of pushes; each example
runs in its own ``trio.run`` under a `MockClock`, so no real time passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal

import pytest
import trio
import trio.testing
from _helpers import PIN, one_chat, run_relay
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_relay import RelayConfig, RelayStatistics
from trio_relay.client import (
    Backoff,
    ConnectionState,
    Event,
    MessageAdded,
    RelayClient,
    Reset,
    Subscription,
    open_relay_client,
)
from trio_relay.testing import (
    MEMORY_URL,
    MemoryBackend,
    MemoryConnector,
    MemoryRelay,
    open_memory_relay,
)

#: Store a message (pushed), drop the connection, let a second pass, let every task settle.
Step = Literal["emit", "cut", "settle", "quiet"]


memory_backend = pytest.fixture(one_chat, name="memory_backend")


@asynccontextmanager
async def client_of(transport: MemoryConnector) -> AsyncIterator[RelayClient]:
    # A fixed draw keeps reconnect times (and so every interleaving) reproducible.
    async with open_relay_client(MEMORY_URL, pin=PIN, connect=transport,
                                 backoff=Backoff(random=lambda: 0.5)) as client:
        yield client


class Collector:
    """Reads a subscription in the background, as an application would."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.base = list(subscription.snapshot)
        self.events: list[Event] = []
        self._lot = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        async for event in self.subscription:
            self.events.append(event)
            self._lot.unpark_all()

    async def wait_for_content(self, content: str) -> None:
        with trio.fail_after(600):
            while content not in [m.get("content") for m in self.state()]:
                await self._lot.park()

    def state(self) -> list[Any]:
        """The chat's messages as the caller rebuilds them: events applied, resets taken."""
        messages = list(self.base)
        for event in self.events:
            if isinstance(event, Reset):
                messages = list(event.snapshot)
            elif isinstance(event, MessageAdded):
                messages.append(event.message)
        return messages

    @property
    def resets(self) -> list[Reset]:
        return [e for e in self.events if isinstance(e, Reset)]


def contents(messages: list[Any]) -> list[str]:
    return [m["content"] for m in messages]


def assert_exact(collector: Collector, base_seq: int) -> None:
    """No reset: the events are consecutive in seq from the snapshot's, none twice."""
    assert collector.resets == []
    seqs = [e.seq for e in collector.events]
    assert seqs == list(range(base_seq + 1, base_seq + 1 + len(seqs)))


def idle(stats: RelayStatistics) -> tuple[int, int, int, int]:
    return (stats.connections, stats.subscriptions, stats.broadcasters, stats.kept_histories)


# --- hypothesis: cut anywhere -----------------------------------------------------------------


async def _cut_anywhere(steps: list[Step], keeper: bool) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as relay, AsyncExitStack() as stack:
        if keeper:
            # Another subscriber keeps the broadcaster (and its numbering) alive throughout.
            await stack.enter_async_context(relay.relay.listen("chat", "c1"))
        transport = relay.connector()
        async with client_of(transport) as client, trio.open_nursery() as nursery:
            async with client.subscribe("chat", "c1") as chat:
                assert chat.seq is not None
                base = chat.seq
                collector = Collector(chat)
                nursery.start_soon(collector.run)
                emitted = 0
                for step in steps:
                    if step == "emit":
                        backend.add_message("c1", f"m{emitted}")
                        emitted += 1
                    elif step == "cut":
                        await transport.cut()
                    elif step == "settle":
                        await trio.sleep(1)
                    else:
                        await trio.testing.wait_all_tasks_blocked()
                backend.add_message("c1", "end")
                await collector.wait_for_content("end")
                assert contents(collector.state()) == [f"m{n}" for n in range(emitted)] + ["end"]
                # Every gap was replayed from the relay's buffer: no reset at all. Without
                # a keeper too: the lone subscriber's broadcaster lingers while it is away
                # (its reconnects come well within resume_grace) and records what changed.
                assert_exact(collector, base)
                assert contents([e.message for e in collector.events
                                 if isinstance(e, MessageAdded)]) == contents(
                    backend.messages["c1"])
                nursery.cancel_scope.cancel()
            assert client.state is ConnectionState.CONNECTED
        assert (await relay.quiet_statistics()).connections == 0


steps_strategy = st.lists(st.sampled_from(["emit", "emit", "cut", "settle", "quiet"]), max_size=40)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(steps=steps_strategy, keeper=st.booleans())
def test_cutting_the_transport_anywhere_loses_and_repeats_nothing(
    steps: list[Step], keeper: bool
) -> None:
    trio.run(_cut_anywhere, steps, keeper, clock=trio.testing.MockClock(autojump_threshold=0))


# --- named cases ------------------------------------------------------------------------------


async def test_a_lone_subscribers_blip_resumes_without_a_reset(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    transport = memory_relay.connector()
    async with client_of(transport) as client, client.subscribe("chat", "c1") as chat:
        memory_backend.add_message("c1", "before")
        first = await anext(chat)
        assert isinstance(first, MessageAdded) and first.seq is not None
        await transport.cut()
        held = await memory_relay.quiet_statistics()  # its broadcaster waits for our return
        assert (held.connections, held.broadcasters, held.lingering) == (0, 1, 1)
        await client.wait_state(ConnectionState.CONNECTED)
        assert len(transport.attempts) == 2
        memory_backend.add_message("c1", "after")
        second = await anext(chat)
        assert isinstance(second, MessageAdded)  # not a Reset
        assert second.message["content"] == "after"
        assert second.seq == first.seq + 1


async def test_a_change_while_the_client_was_away_is_replayed(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    transport = memory_relay.connector()
    async with client_of(transport) as client, client.subscribe("chat", "c1") as chat:
        seq = chat.seq
        assert seq is not None
        transport.refusing = True  # away for a while
        await transport.cut()
        away_since = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()  # the relay saw the drop; we wait
        assert client.state is ConnectionState.RECONNECTING
        memory_backend.add_message("c1", "while nobody watched")
        # Its backoff brings it back within resume_grace (15.75 s in, with this backoff).
        await trio.sleep(memory_relay.relay.config.resume_grace / 3)
        transport.refusing = False
        event = await anext(chat)
        assert isinstance(event, MessageAdded)  # not a Reset
        assert event.message["content"] == "while nobody watched"
        assert event.seq == seq + 1
        assert client.statistics().state is ConnectionState.CONNECTED
        assert trio.current_time() - away_since > 10


async def test_a_change_after_resume_grace_comes_back_as_a_reset(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    transport = memory_relay.connector()
    async with client_of(transport) as client, client.subscribe("chat", "c1") as chat:
        transport.refusing = True  # away for longer than the relay waits
        await transport.cut()
        await trio.sleep(memory_relay.relay.config.resume_grace + 1)
        assert client.state is ConnectionState.RECONNECTING
        stats = await memory_relay.quiet_statistics()
        assert (stats.broadcasters, stats.lingering, stats.kept_histories) == (0, 0, 0)
        memory_backend.add_message("c1", "while nobody watched")
        transport.refusing = False
        event = await anext(chat)
        assert event == Reset(memory_backend.messages["c1"], seq=event.seq)
        assert chat.snapshot == memory_backend.messages["c1"]
        assert client.statistics().state is ConnectionState.CONNECTED


async def test_a_relay_restart_gives_a_reset_not_a_silent_gap(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    transport = MemoryConnector()

    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        transport.relay = await nursery.start(run_relay, memory_backend, stop)
        async with client_of(transport) as client, client.subscribe("chat", "c1") as chat:
            memory_backend.add_message("c1", "one")
            assert isinstance(await anext(chat), MessageAdded)
            # The restarted relay numbers from scratch under a new epoch, even if nothing
            # changed: the old seq means nothing to it, so the client must start over.
            stop.set()
            await client.wait_state(ConnectionState.RECONNECTING)
            transport.relay = None
            await trio.sleep(3)
            stop = trio.Event()
            transport.relay = await nursery.start(run_relay, memory_backend, stop)
            reset = await anext(chat)
            assert reset == Reset(memory_backend.messages["c1"], seq=reset.seq)
            memory_backend.add_message("c1", "two")
            added = await anext(chat)
            assert isinstance(added, MessageAdded) and reset.seq is not None
            assert added.seq == reset.seq + 1
        stop.set()


async def test_a_slow_consumer_comes_back_with_a_reset(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    config = RelayConfig(outbound_queue_size=4)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        transport = relay.connector(lockstep=True)
        async with client_of(transport) as client, trio.open_nursery() as nursery:
            async with client.subscribe("chat", "c1") as chat:
                collector = Collector(chat)
                # Emitting without a checkpoint between outruns even a prompt reader.
                for n in range(12):
                    memory_backend.add_message("c1", f"m{n}")
                nursery.start_soon(collector.run)
                memory_backend.add_message("c1", "end")
                await collector.wait_for_content("end")
                assert contents(collector.state()) == contents(memory_backend.messages["c1"])
                # More pushes were missed than the relay can queue, so they cannot be
                # replayed: the client is told so with a reset (after one more 1013 at most).
                assert client.last_close is not None and client.last_close.code == 1013
                assert len(collector.resets) == 1
                assert relay.relay.counters.slow_closes in (1, 2)
                nursery.cancel_scope.cancel()


async def test_many_reconnects_leave_nothing_behind(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend
) -> None:
    memory_backend.set_model_profiles([{"id": "echo"}])
    config = RelayConfig(resume_grace=30)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        baseline = await relay.quiet_statistics()
        transport = relay.connector()
        async with client_of(transport) as client:
            async with client.subscribe("chat", "c1") as chat, \
                    client.subscribe("project", "p1") as project, \
                    client.subscribe("modelProfiles") as profiles:
                connected = await relay.quiet_statistics()
                assert (connected.connections, connected.subscriptions,
                        connected.broadcasters) == (1, 3, 3)
                changes = client.state_changes()
                assert await anext(changes) is ConnectionState.CONNECTED
                for n in range(25):
                    await transport.cut()
                    memory_backend.add_message("c1", f"m{n}")  # sometimes replayed, else a reset
                    with trio.fail_after(60):
                        assert [await anext(changes), await anext(changes)] == [
                            ConnectionState.RECONNECTING, ConnectionState.CONNECTED]
                    await trio.testing.wait_all_tasks_blocked()
                assert relay.relay.statistics() == connected
                stats = client.statistics()
                assert (stats.resources, stats.subscriptions, stats.pending_requests) == (3, 3, 0)
                assert stats.connections == 26
                for subscription in (chat, project, profiles):
                    while True:
                        try:
                            subscription.receive_nowait()
                        except trio.WouldBlock:
                            break
                assert client.statistics().buffered_events == 0
        await trio.testing.wait_all_tasks_blocked()
        left = relay.relay.statistics()
        assert idle(left)[:2] == (0, 0)
        # Leaving the subscribe blocks unsubscribes, and the client writes those before it
        # closes: nothing is left to linger for a return that will not come.
        assert (left.broadcasters, left.lingering) == (0, 0)
        await trio.sleep(relay.config.resume_grace + 1)  # mock time: kept histories expire
        assert relay.relay.statistics() == baseline
        assert idle(baseline) == (0, 0, 0, 0)
