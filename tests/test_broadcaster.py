"""The fan-out's guarantees: exact joins, one snapshot for a crowd, slow subscribers dropped alone.

`trio_relay._stream.broadcaster` (and its registry), through a relay over memory streams.

The setup race is built deterministically: `RacingBackend` runs a script inside ``get_history``
(the snapshot read), so events are published while a subscription is being set up, before and
after the moment the snapshot is taken, with or without checkpoints in between. Whatever the
interleaving, each subscriber must see each event exactly once, in its snapshot or as a push,
and its pushes must continue at the ``subscribed`` reply's ``seq`` + 1 without a gap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio
import trio.testing
from _helpers import PIN, Frame, one_chat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from trio_relay import (
    CloseCode,
    ListenerOverflow,
    RelayConfig,
    Snapshot,
    SubscriptionError,
    UpstreamError,
)
from trio_relay._wire.protocol import ResourceKey
from trio_relay.testing import (
    HANG,
    MemoryBackend,
    MemoryRelay,
    TestClient,
    next_update,
    open_memory_relay,
)

#: Bound on waiting for an in-process listener (mock time), so a lost update fails, not hangs.
LISTENER_WAIT = 5.0

memory_backend = pytest.fixture(one_chat, name="memory_backend")


# --- a backend whose snapshot read races with events ----------------------------------------------

Step = Callable[["RacingBackend", str], Awaitable[None]]


def message(text: str) -> Step:
    """Store a message (the chat's subscribers get a ``message`` event)."""

    async def step(backend: RacingBackend, chat_id: str) -> None:
        backend.add_message(chat_id, text)

    return step


def chunk(text: str) -> Step:
    """Emit streamed output (an event that changes no stored state)."""

    async def step(backend: RacingBackend, chat_id: str) -> None:
        backend.emit("chat", chat_id, {"type": "chunk", "text": text})

    return step


async def checkpoint(backend: RacingBackend, chat_id: str) -> None:
    """Yield once: other tasks get one turn each."""
    await trio.lowlevel.checkpoint()


async def settle(backend: RacingBackend, chat_id: str) -> None:
    """Let every other task run until all are blocked (the broadcaster has read its feed)."""
    await trio.testing.wait_all_tasks_blocked()


#: What happens between two events of a script: nothing, one checkpoint, or a quiet point.
PAUSES: dict[str, list[Step]] = {"atomic": [], "checkpoint": [checkpoint], "settle": [settle]}


def wait_for(event: trio.Event) -> Step:
    async def step(backend: RacingBackend, chat_id: str) -> None:
        await event.wait()

    return step


@attrs.define
class Script:
    before: list[Step] = attrs.Factory(list)
    after: list[Step] = attrs.Factory(list)


class RacingBackend(MemoryBackend):
    """`MemoryBackend` whose ``get_history`` runs the next `Script` around its snapshot read.

    The snapshot itself is read with no checkpoint, like a backend reading its state and its
    version atomically; ``on_snapshot`` sees each snapshot just before it is returned.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scripts: deque[Script] = deque()
        self.history_calls = 0
        self.on_snapshot: Callable[[Snapshot], None] | None = None

    async def get_history(self, chat_id: str) -> Snapshot:
        self.history_calls += 1
        await self._fault("get_history")
        script = self.scripts.popleft() if self.scripts else Script()
        for step in script.before:
            await step(self, chat_id)
        snapshot = Snapshot(
            list(self.messages[chat_id]), self.hub.version(ResourceKey("chat", chat_id))
        )
        for step in script.after:
            await step(self, chat_id)
        if self.on_snapshot is not None:
            self.on_snapshot(snapshot)
        return snapshot


def contents(messages: list[Frame]) -> list[str]:
    return [m["content"] for m in messages]


def describe(push: Frame) -> str:
    """A push as one comparable string: ``message:<content>`` or ``chunk:<text>``."""
    data = push["data"]
    if data.get("type") == "message":
        return f"message:{data['message']['content']}"
    return f"{data.get('type')}:{data.get('text')}"


async def pushes(client: TestClient, count: int) -> list[Frame]:
    """The next ``count`` pushes, and then no more."""
    got = await client.next_pushes(count)
    await client.assert_no_push()
    return got


def assert_gapless(frames: list[Frame], after: int) -> None:
    assert [f["seq"] for f in frames] == list(range(after + 1, after + 1 + len(frames)))


# --- the setup race, deterministically ------------------------------------------------------------


@pytest.mark.parametrize("pause", list(PAUSES))
async def test_event_during_a_join_arrives_exactly_once(
    autojump_clock: trio.abc.Clock, pause: str
) -> None:
    backend = RacingBackend()
    backend.add_chat("p1", "c1")
    backend.add_message("c1", "old")
    gap = PAUSES[pause]
    async with open_memory_relay(backend, pin=PIN) as relay:
        alice = await relay.connect(authenticate=PIN)
        reply = await alice.subscribe("chat", "c1")
        assert (contents(reply["data"]["messages"]), reply["seq"]) == (["old"], 0)
        # A change since the broadcaster's first snapshot: Bob must read a fresh one.
        backend.emit("chat", "c1", {"type": "chunk", "text": "warm-up"})
        assert (await alice.next_push())["seq"] == 1

        backend.scripts.append(Script(
            before=[message("m1"), *gap, message("m2"), *gap, chunk("c1"), *gap],
            after=[message("m3"), *gap, chunk("c2"), *gap],
        ))
        bob = await relay.connect(authenticate=PIN)
        reply = await bob.subscribe("chat", "c1")
        assert backend.history_calls == 2
        # Bob's snapshot holds everything published before it was read, and says so.
        assert contents(reply["data"]["messages"]) == ["old", "m1", "m2"]
        assert reply["seq"] == 4  # warm-up, m1, m2, c1
        backend.emit("chat", "c1", {"type": "chunk", "text": "live"})

        bob_pushes = await pushes(bob, 3)
        assert_gapless(bob_pushes, after=reply["seq"])
        assert [describe(p) for p in bob_pushes] == ["message:m3", "chunk:c2", "chunk:live"]
        alice_pushes = await pushes(alice, 6)
        assert_gapless(alice_pushes, after=1)
        assert [describe(p) for p in alice_pushes] == [
            "message:m1", "message:m2", "chunk:c1", "message:m3", "chunk:c2", "chunk:live",
        ]
        # Both see the same numbering.
        assert bob_pushes == alice_pushes[3:]


async def test_snapshot_ahead_of_the_feed_waits_for_the_feed(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The change is published and in the snapshot, but the broadcaster has not read it from its
    # feed yet when the snapshot returns: the join must wait for it and not deliver it again.
    backend = RacingBackend()
    backend.add_chat("p1", "c1")
    key = ResourceKey("chat", "c1")
    async with open_memory_relay(backend, pin=PIN) as relay:
        alice = await relay.connect(authenticate=PIN)
        await alice.subscribe("chat", "c1")
        backend.emit("chat", "c1", {"type": "chunk", "text": "warm-up"})
        await alice.next_push()

        behind: list[tuple[int | None, int | None]] = []

        def probe(snapshot: Snapshot) -> None:
            broadcaster = relay.relay._registry.get(key)
            assert broadcaster is not None
            behind.append((broadcaster.version, snapshot.version))

        backend.on_snapshot = probe
        backend.scripts.append(Script(before=[message("m1"), chunk("c1"), message("m2")]))
        bob = await relay.connect(authenticate=PIN)
        reply = await bob.subscribe("chat", "c1")
        (feed_version, snapshot_version), = behind
        assert feed_version is not None and snapshot_version is not None
        assert feed_version < snapshot_version, "the scenario did not put the snapshot ahead"

        assert contents(reply["data"]["messages"]) == ["m1", "m2"]
        assert reply["seq"] == 4
        backend.emit("chat", "c1", {"type": "chunk", "text": "next"})
        push, = await pushes(bob, 1)
        assert (push["seq"], describe(push)) == (5, "chunk:next")
        assert [describe(p) for p in await pushes(alice, 4)] == [
            "message:m1", "chunk:c1", "message:m2", "chunk:next",
        ]


async def test_snapshot_the_feed_never_reaches_fails_the_join_within_backend_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    class AheadBackend(RacingBackend):
        async def get_history(self, chat_id: str) -> Snapshot:
            snapshot = await super().get_history(chat_id)
            if self.history_calls == 1:
                return snapshot
            assert snapshot.version is not None
            return Snapshot(snapshot.items, snapshot.version + 5)

    backend = AheadBackend()
    backend.add_chat("p1", "c1")
    config = RelayConfig(backend_timeout=2.0)
    async with open_memory_relay(backend, pin=PIN, config=config) as relay:
        alice = await relay.connect(authenticate=PIN)
        await alice.subscribe("chat", "c1")
        backend.emit("chat", "c1", {"type": "chunk", "text": "warm-up"})
        await alice.next_push()
        bob = await relay.connect(authenticate=PIN)
        start = trio.current_time()
        reply = await bob.request("subscribe", resource="chat", resourceId="c1")
        assert trio.current_time() - start == pytest.approx(config.backend_timeout)
        assert (reply["type"], reply["code"]) == ("error", "backend_error")
        assert (await relay.quiet_statistics()).subscriptions == 1
        # Alice goes on; Bob's connection stays usable.
        backend.emit("chat", "c1", {"type": "chunk", "text": "after"})
        assert (await alice.next_push())["seq"] == 2
        await bob.assert_no_push()
        reply = await bob.request("subscribe", resource="project", resourceId="p1")
        assert reply["type"] == "subscribed"


async def test_join_that_misses_more_than_max_pending_changes_fails_cleanly(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = RacingBackend()
    backend.add_chat("p1", "c1")
    config = RelayConfig(max_pending_changes=3)
    async with open_memory_relay(backend, pin=PIN, config=config) as relay:
        alice = await relay.connect(authenticate=PIN)
        await alice.subscribe("chat", "c1")
        backend.emit("chat", "c1", {"type": "chunk", "text": "warm-up"})
        await alice.next_push()
        bob = await relay.connect(authenticate=PIN)
        alice_only = await relay.quiet_statistics()  # bob connected, only alice subscribed
        backend.scripts.append(Script(before=[chunk(f"x{n}") for n in range(5)]))
        reply = await bob.request("subscribe", resource="chat", resourceId="c1")
        assert (reply["type"], reply["code"]) == ("error", "backend_error")
        assert "try again" in reply["error"]
        stats = await relay.quiet_statistics()
        assert (stats.subscriptions, stats.broadcasters, stats.tasks) == (
            alice_only.subscriptions, alice_only.broadcasters, alice_only.tasks,
        )
        assert len(await pushes(alice, 5)) == 5
        # Trying again works.
        reply = await bob.subscribe("chat", "c1")
        assert reply["seq"] == 6
        await bob.assert_no_push()


@pytest.mark.parametrize("pause", list(PAUSES))
async def test_first_subscribers_own_snapshot_races_with_events(
    autojump_clock: trio.abc.Clock, pause: str
) -> None:
    backend = RacingBackend()
    backend.add_chat("p1", "c1")
    backend.add_message("c1", "old")
    gap = PAUSES[pause]
    backend.scripts.append(Script(
        before=[message("m1"), *gap, chunk("c1"), *gap],
        after=[message("m2"), *gap, chunk("c2"), *gap],
    ))
    async with open_memory_relay(backend, pin=PIN) as relay:
        alice = await relay.connect(authenticate=PIN)
        reply = await alice.subscribe("chat", "c1")
        assert contents(reply["data"]["messages"]) == ["old", "m1"]
        assert reply["seq"] == 0
        got = await pushes(alice, 2)
        assert_gapless(got, after=0)
        assert [describe(p) for p in got] == ["message:m2", "chunk:c2"]


async def test_joiner_arriving_while_the_first_snapshot_loads_sees_each_event_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = RacingBackend()
    backend.add_chat("p1", "c1")
    bob_waiting = trio.Event()
    backend.scripts.append(Script(
        before=[message("m1"), settle, wait_for(bob_waiting)],
        after=[chunk("c1"), settle, message("m2")],
    ))
    async with open_memory_relay(backend, pin=PIN) as relay:
        alice = await relay.connect(authenticate=PIN)
        bob = await relay.connect(authenticate=PIN)
        replies: dict[str, Frame] = {}

        async def subscribe(name: str, client: TestClient) -> None:
            replies[name] = await client.subscribe("chat", "c1")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscribe, "alice", alice)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(subscribe, "bob", bob)
            await trio.testing.wait_all_tasks_blocked()
            bob_waiting.set()
        backend.emit("chat", "c1", {"type": "chunk", "text": "live"})
        for name, client in (("alice", alice), ("bob", bob)):
            reply = replies[name]
            messages = contents(reply["data"]["messages"])
            rest = await pushes(client, 3 - reply["seq"])
            assert_gapless(rest, after=reply["seq"])
            seen = [f"message:{m}" for m in messages] + [describe(p) for p in rest]
            # Every stored message exactly once, then everything streamed after the snapshot.
            assert seen == ["message:m1", "chunk:c1", "message:m2", "chunk:live"], name


# --- the setup race, with hypothesis --------------------------------------------------------------

events = st.lists(st.sampled_from(["message", "chunk"]), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    earlier=events,
    before=events,
    after=events,
    later=events,
    pause=st.sampled_from(list(PAUSES)),
    joiner=st.booleans(),
)
def test_setup_race_property(
    earlier: list[str],
    before: list[str],
    after: list[str],
    later: list[str],
    pause: str,
    joiner: bool,
) -> None:
    """Events before, during (both sides of the snapshot) and after a subscription is set up:
    each arrives exactly once, in the snapshot (messages only) or as a gapless push."""
    counter = iter(range(1000))

    def steps(kinds: list[str]) -> list[tuple[str, Step]]:
        made: list[tuple[str, Step]] = []
        for kind in kinds:
            text = f"e{next(counter)}"
            made.append((f"{kind}:{text}", message(text) if kind == "message" else chunk(text)))
        return made

    async def scenario() -> None:
        backend = RacingBackend()
        backend.add_chat("p1", "c1")
        gap = PAUSES[pause]
        # A joiner reads a fresh snapshot only if something changed since the last one.
        early = steps(["chunk", *earlier] if joiner else earlier)
        during_before, during_after, late = steps(before), steps(after), steps(later)
        script = Script(
            before=[s for _, step in during_before for s in (step, *gap)],
            after=[s for _, step in during_after for s in (step, *gap)],
        )
        async with open_memory_relay(backend, pin=PIN) as relay:
            watcher: TestClient | None = None
            if joiner:
                watcher = await relay.connect(authenticate=PIN)
                await watcher.subscribe("chat", "c1")
            for _, step in early:
                await step(backend, "c1")
            backend.scripts.append(script)
            client = await relay.connect(authenticate=PIN)
            reply = await client.subscribe("chat", "c1")
            assert not backend.scripts, "the subscription did not read a snapshot"
            for _, step in late:
                await step(backend, "c1")

            # Every event lands exactly once: up to some cut it is covered by the snapshot
            # (stored messages in it; transient chunks superseded), after the cut it is a
            # gapless push. Events during the snapshot read may fall on either side; events
            # before it never come as pushes, events after it always do.
            events = [name for name, _ in early + during_before + during_after + late]
            got = await client.frames_until_quiet(1)  # every push until a (mock) second passes
            assert all(frame["id"] is None for frame in got), got
            cut = len(events) - len(got)
            assert len(early + during_before) <= cut <= len(early + during_before + during_after)
            assert [describe(p) for p in got] == events[cut:]
            assert_gapless(got, after=reply["seq"])
            stored = [n for n in events[:cut] if n.startswith("message:")]
            assert [f"message:{m}" for m in contents(reply["data"]["messages"])] == stored
            if watcher is None:
                # Numbering starts when the broadcaster does, after the early events; changes
                # its first snapshot already holds are never numbered.
                assert 0 <= reply["seq"] <= cut - len(early)
            else:
                # The joiner's numbering is the one every subscriber sees.
                assert reply["seq"] == cut
                everything = await pushes(watcher, cut + len(got))
                assert_gapless(everything, after=0)
                assert everything[cut:] == got

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# --- one snapshot for a crowd ---------------------------------------------------------------------


async def test_first_subscribers_share_the_broadcasters_first_snapshot(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = RacingBackend()
    backend.add_chat("p1", "c1")
    backend.add_message("c1", "hello")
    async with open_memory_relay(backend, pin=PIN) as relay:
        clients = [await relay.connect(authenticate=PIN) for _ in range(10)]
        # Half join one after another, half all at once.
        for client in clients[:5]:
            reply = await client.subscribe("chat", "c1")
            assert (contents(reply["data"]["messages"]), reply["seq"]) == (["hello"], 0)
        async with trio.open_nursery() as nursery:
            for client in clients[5:]:
                nursery.start_soon(client.subscribe, "chat", "c1")
        async with relay.relay.listen("chat", "c1") as updates:
            assert updates.seq == 0
            assert backend.history_calls == 1

            # After a change, the next joiner reads once, and the ones after it reuse that.
            backend.add_message("c1", "again")
            await trio.testing.wait_all_tasks_blocked()
            late = [await relay.connect(authenticate=PIN) for _ in range(5)]
            for client in late:
                reply = await client.subscribe("chat", "c1")
                assert (contents(reply["data"]["messages"]), reply["seq"]) == (
                    ["hello", "again"], 1,
                )
            assert backend.history_calls == 2


async def test_a_crowd_joining_a_fresh_broadcaster_at_once_costs_one_read(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = RacingBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as relay:
        clients = [await relay.connect(authenticate=PIN) for _ in range(20)]
        for i, client in enumerate(clients):
            await client.send(
                {"id": f"s{i}", "type": "subscribe", "resource": "chat", "resourceId": "c1"}
            )
        for i, client in enumerate(clients):
            reply = await client.reply_to(f"s{i}")
            assert (reply["type"], reply["seq"]) == ("subscribed", 0)
        assert backend.history_calls == 1


# --- a slow client never slows the others ---------------------------------------------------------


async def test_slow_client_is_closed_alone_and_the_fast_one_gets_everything(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(outbound_queue_size=8)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        fast = await relay.connect(authenticate=PIN)
        await fast.subscribe("chat", "c1")
        slow = await relay.connect(lockstep=True, authenticate=PIN)
        await slow.subscribe("chat", "c1")
        start = trio.current_time()
        for n in range(100):
            memory_backend.emit("chat", "c1", {"n": n})
            # The upstream does not burst: each event is out before the next one comes.
            await trio.testing.wait_all_tasks_blocked()
        got = await pushes(fast, 100)
        assert [p["data"]["n"] for p in got] == list(range(100))
        assert_gapless(got, after=0)
        assert trio.current_time() == start
        assert relay.relay.counters.slow_closes == 1

        # The slow client reads at last: what was already on its way, in order, then the close.
        code, reason = await slow.wait_closed()
        assert code == CloseCode.SLOW_CONSUMER
        assert reason is not None and "slow" in reason
        received = slow.held
        assert received, "not even the frames in flight arrived"
        assert [p["data"]["n"] for p in received] == list(range(len(received)))
        assert_gapless(received, after=0)
        stats = await relay.quiet_statistics()
        assert (stats.connections, stats.subscriptions, stats.broadcasters) == (1, 1, 1)


async def test_a_burst_as_large_as_the_queue_reaches_a_prompt_client(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    # The queue bounds how far behind a client may fall, so it also bounds a burst that the
    # upstream publishes at once: up to outbound_queue_size, a client that reads is not "slow".
    config = RelayConfig(outbound_queue_size=8)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await relay.connect(authenticate=PIN)
        await client.subscribe("chat", "c1")
        for n in range(config.outbound_queue_size):
            memory_backend.emit("chat", "c1", {"n": n})
        got = await pushes(client, config.outbound_queue_size)
        assert [p["data"]["n"] for p in got] == list(range(config.outbound_queue_size))
        assert relay.relay.counters.slow_closes == 0


async def test_slow_client_that_never_reads_is_dropped_within_close_timeout(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(outbound_queue_size=8, close_timeout=4.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        fast = await relay.connect(authenticate=PIN)
        await fast.subscribe("chat", "c1")
        fast_only = (await relay.quiet_statistics(), dict(memory_backend.open_feeds))
        slow = await relay.connect(lockstep=True, authenticate=PIN)
        await slow.subscribe("chat", "c1")
        for n in range(100):
            memory_backend.emit("chat", "c1", {"n": n})
            await trio.testing.wait_all_tasks_blocked()
        assert relay.relay.counters.slow_closes == 1
        assert [p["data"]["n"] for p in await pushes(fast, 100)] == list(range(100))
        await trio.sleep(config.close_timeout)
        assert (await relay.quiet_statistics(), dict(memory_backend.open_feeds)) == fast_only
        # The fast client goes on, with the same upstream.
        memory_backend.emit("chat", "c1", {"n": 100})
        push, = await pushes(fast, 1)
        assert (push["seq"], push["data"]) == (101, {"n": 100})
        assert memory_backend.feeds_opened == 1
        with pytest.raises(ConnectionClosed):
            while True:
                await slow.ws.get_message()


# --- in-process listeners -------------------------------------------------------------------------


async def test_listener_past_its_buffer_overflows_and_web_clients_are_unaffected(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    web = await memory_relay.connect(authenticate=PIN)
    await web.subscribe("chat", "c1")
    async with memory_relay.relay.listen("chat", "c1", buffer=4) as updates:
        async with memory_relay.relay.listen("chat", "c1", buffer=4) as keeping_up:
            seen: list[int] = []
            for n in range(10):
                memory_backend.emit("chat", "c1", {"n": n})
                seen.append((await next_update(keeping_up)).seq)
            assert seen == list(range(1, 11))
        got = []
        with trio.fail_after(LISTENER_WAIT), pytest.raises(ListenerOverflow):
            async for update in updates:
                got.append(update.seq)
        # What it did get before the overflow is in order and without a gap.
        assert got == list(range(1, len(got) + 1))
        assert len(got) <= 4
    assert [p["data"]["n"] for p in await pushes(web, 10)] == list(range(10))
    memory_backend.emit("chat", "c1", {"n": 10})
    assert (await web.next_push())["seq"] == 11
    assert (await memory_relay.quiet_statistics()).listeners == 0


async def test_listener_ends_after_completed(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    memory_backend.add_message("c1", "hi")
    async with memory_relay.relay.listen("chat", "c1") as updates:
        assert (updates.resource, updates.resource_id, updates.seq) == ("chat", "c1", 0)
        assert [m["content"] for m in updates.snapshot] == ["hi"]
        memory_backend.emit("chat", "c1", {"n": 1})
        memory_backend.end_feeds("chat", "c1")
        with trio.fail_after(LISTENER_WAIT):
            got = [(u.seq, u.data) async for u in updates]
        assert got == [(1, {"n": 1}), (2, {"completed": True})]
        assert updates.seq == 2
        # Iteration stays ended.
        with pytest.raises(StopAsyncIteration):
            await next_update(updates)


async def test_listener_raises_upstream_error_when_the_upstream_fails(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    web = await memory_relay.connect(authenticate=PIN)
    await web.subscribe("chat", "c1")
    async with memory_relay.relay.listen("chat", "c1") as updates:
        memory_backend.emit("chat", "c1", {"n": 1})
        memory_backend.end_feeds("chat", "c1", RuntimeError("the agent crashed"))
        assert (await next_update(updates)).data == {"n": 1}
        with pytest.raises(UpstreamError):
            await next_update(updates)
    assert (await web.next_push())["data"] == {"n": 1}
    error = await web.next_push()
    assert (error["type"], error["code"], error["resourceId"]) == (
        "error", "backend_error", "c1",
    )
    # Internal details stay out of what web clients see.
    assert "agent crashed" not in error["error"]


async def test_listen_to_a_missing_chat_raises_not_found(autojump_clock: trio.abc.Clock) -> None:
    backend = MemoryBackend()
    async with open_memory_relay(backend, pin=PIN) as relay:
        with pytest.raises(SubscriptionError) as info:
            async with relay.relay.listen("chat", "nope"):
                raise AssertionError("must not start")
        assert info.value.code == "not_found"
        stats = await relay.quiet_statistics()
        assert (stats.listeners, stats.broadcasters) == (0, 0)
        assert dict(backend.open_feeds) == {}
        assert backend.feeds_closed == backend.feeds_opened


# --- a failing or hanging backend -----------------------------------------------------------------


async def assert_usable(client: TestClient, backend: MemoryBackend) -> None:
    """The connection still serves requests, and a subscription made now works."""
    backend.faults.clear()
    reply = await client.subscribe("chat", "c1")
    assert reply["seq"] == 0
    backend.emit("chat", "c1", {"n": "ok"})
    assert (await client.next_push())["data"] == {"n": "ok"}


@pytest.mark.parametrize(
    ("fault", "value"),
    [
        ("watch_chat", RuntimeError("feed failed to open")),
        ("get_history", RuntimeError("history failed")),
        ("get_history", HANG),
        ("watch_chat", HANG),
    ],
    ids=["feed-raises", "snapshot-raises", "snapshot-hangs", "feed-hangs"],
)
async def test_backend_failing_a_first_subscribe(
    autojump_clock: trio.abc.Clock,
    fault: str,
    value: BaseException | str,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(backend_timeout=3.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await relay.connect(authenticate=PIN)
        idle = await relay.quiet_statistics()  # connected, nothing subscribed
        memory_backend.faults[fault] = value
        start = trio.current_time()
        reply = await client.request("subscribe", resource="chat", resourceId="c1")
        elapsed = trio.current_time() - start
        assert (reply["type"], reply["code"]) == ("error", "backend_error")
        assert reply["resourceId"] == "c1"
        assert elapsed == (config.backend_timeout if value == HANG else 0)
        stats = await relay.quiet_statistics()
        assert (stats.subscriptions, stats.broadcasters, stats.tasks) == (0, 0, idle.tasks)
        assert dict(memory_backend.open_feeds) == {}
        assert memory_backend.feeds_closed == memory_backend.feeds_opened
        await assert_usable(client, memory_backend)


async def test_listener_on_a_failing_backend_gets_subscription_error(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    memory_backend.faults["watch_chat"] = RuntimeError("feed failed to open")
    with pytest.raises(SubscriptionError) as info:
        async with memory_relay.relay.listen("chat", "c1"):
            raise AssertionError("must not start")
    assert info.value.code == "backend_error"
    assert memory_relay.relay.statistics().broadcasters == 0


async def test_failure_of_a_joiners_snapshot_leaves_the_broadcaster_to_the_others(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(backend_timeout=3.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        alice = await relay.connect(authenticate=PIN)
        await alice.subscribe("chat", "c1")
        memory_backend.emit("chat", "c1", {"n": 1})
        await alice.next_push()
        memory_backend.faults["get_history"] = HANG
        bob = await relay.connect(authenticate=PIN)
        start = trio.current_time()
        reply = await bob.request("subscribe", resource="chat", resourceId="c1")
        assert trio.current_time() - start == config.backend_timeout
        assert (reply["type"], reply["code"]) == ("error", "backend_error")
        # Alice's broadcaster and upstream were never disturbed.
        memory_backend.emit("chat", "c1", {"n": 2})
        push, = await pushes(alice, 1)
        assert (push["seq"], push["data"]) == (2, {"n": 2})
        assert memory_backend.feeds_opened == 1
        await bob.assert_no_push()
        memory_backend.faults.clear()
        reply = await bob.subscribe("chat", "c1")
        assert reply["seq"] == 2


async def test_pushes_to_a_project_and_model_profiles_are_numbered_per_resource(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    await client.subscribe("project", "p1")
    await client.subscribe("chat", "c1")
    await client.subscribe("modelProfiles")
    memory_backend.add_chat("p1", "c2")
    memory_backend.emit("chat", "c1", {"n": 1})
    memory_backend.set_model_profiles([{"id": "m"}])
    memory_backend.emit("chat", "c1", {"n": 2})
    got = await pushes(client, 4)
    by_resource: dict[str, list[int]] = {}
    for push in got:
        by_resource.setdefault(push["resource"], []).append(push["seq"])
    assert by_resource == {"project": [1], "chat": [1, 2], "modelProfiles": [1]}
