"""Cleanup proofs: however a client or listener leaves, the relay returns exactly to idle.

Each test takes a footprint once the relay is serving and before any client connects: the
relay's `statistics()`, the backend's open feeds, and the number of tasks in the whole run (the
relay's ``tasks`` statistic counts only its own nursery, not the connection tasks, so the
run-wide count is what catches a leaked connection, reader, writer or subscription task).
After the clients leave, in every way a client can leave, the footprint must be the same
again, and the fake backend must have closed every upstream feed it ever opened.

Everything runs in memory under ``autojump_clock``; a quiet point is reached with
`trio.testing.wait_all_tasks_blocked`, so "at once" below means "with no mock time passing".
"""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing
from _helpers import PIN, count_tasks_in_run
from trio_websocket import ConnectionClosed

from trio_relay import CloseCode, RelayConfig, RelayStatistics
from trio_relay._wire.protocol import ResourceKey
from trio_relay.testing import (
    HANG,
    MemoryBackend,
    MemoryRelay,
    TestClient,
    open_memory_relay,
)

# --- footprints -----------------------------------------------------------------------------------


@attrs.frozen
class Footprint:
    stats: RelayStatistics
    open_feeds: dict[ResourceKey, int]
    tasks_in_run: int

    def unkept(self) -> Footprint:
        """The same, not counting replay buffers kept for resuming (freed after a grace)."""
        return attrs.evolve(self, stats=attrs.evolve(self.stats, kept_histories=0))


async def footprint(relay: MemoryRelay, backend: MemoryBackend) -> Footprint:
    stats = await relay.quiet_statistics()
    return Footprint(stats, dict(backend.open_feeds), count_tasks_in_run())


def assert_same_but_lingering(baseline: Footprint, now: Footprint, backend: MemoryBackend) -> None:
    """``now`` is ``baseline``, but for the replay buffers kept for resuming, and for the
    broadcasters whose last subscriber dropped: each lingers (one task, one open feed) for
    resume_grace. One that was left, or ended, is gone at once."""
    lingering = now.stats.lingering
    unkept = attrs.evolve(
        now.stats, kept_histories=baseline.stats.kept_histories, lingering=0,
        broadcasters=now.stats.broadcasters - lingering, tasks=now.stats.tasks - lingering,
    )
    assert unkept == baseline.stats, f"now {now.stats}, at first {baseline.stats}"
    assert sum(now.open_feeds.values()) - lingering == sum(baseline.open_feeds.values())
    assert now.tasks_in_run - lingering == baseline.tasks_in_run, "tasks were left running"
    assert backend.feeds_closed + lingering == backend.feeds_opened


async def assert_back_after_grace(
    baseline: Footprint, relay: MemoryRelay, backend: MemoryBackend
) -> None:
    """Once resume_grace is over, all is exactly as it was: no lingering broadcaster, feed or
    kept replay buffer is left."""
    await trio.sleep(relay.relay.config.resume_grace + 1)
    later = await footprint(relay, backend)
    assert later.stats == baseline.stats, "a replay buffer outlived its grace period"
    assert later.open_feeds == baseline.open_feeds
    assert later.tasks_in_run == baseline.tasks_in_run
    assert backend.feeds_closed == backend.feeds_opened


async def assert_back_to(
    baseline: Footprint, relay: MemoryRelay, backend: MemoryBackend, *, since: float
) -> None:
    """At a quiet point with no mock time passed since ``since``, all is as it was, but for
    what is kept for resuming (`assert_same_but_lingering`), which goes when its grace period
    ends."""
    assert_same_but_lingering(baseline, await footprint(relay, backend), backend)
    assert trio.current_time() == since, "cleanup waited for a timeout"
    await assert_back_after_grace(baseline, relay, backend)


@pytest.fixture
def memory_backend() -> MemoryBackend:
    """Chats c0, c1 and c2 of project p1, and a model profile."""
    backend = MemoryBackend()
    backend.add_project("p1")
    for i in range(3):
        backend.add_chat("p1", f"c{i}")
    backend.set_model_profiles([{"id": "echo", "name": "Echo"}])
    return backend


async def subscribed_client(relay: MemoryRelay, *chats: str, lockstep: bool = False) -> TestClient:
    client = await relay.connect(lockstep=lockstep, authenticate=PIN)
    for chat in chats:
        await client.subscribe("chat", chat)
    return client


# --- one client, each way of leaving --------------------------------------------------------------


async def test_clean_close_releases_everything(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    client = await subscribed_client(memory_relay, "c0", "c1")
    await client.subscribe("project", "p1")
    await client.subscribe("modelProfiles")
    held = await footprint(memory_relay, memory_backend)
    assert held.stats.connections == 1
    assert held.stats.subscriptions == 4
    assert held.stats.broadcasters == 4
    assert sum(held.open_feeds.values()) == 4
    start = trio.current_time()
    await client.close()
    assert client.ws.closed is not None
    assert client.ws.closed.code == CloseCode.NORMAL
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_abrupt_stream_close_releases_everything(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    client = await subscribed_client(memory_relay, "c0", "c1")
    memory_backend.emit("chat", "c0", {"type": "chunk", "text": "in flight"})
    start = trio.current_time()
    await client.abort()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_abort_before_authenticating_releases_everything(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    client = await memory_relay.connect()
    assert (await memory_relay.quiet_statistics()).connections == 1
    start = trio.current_time()
    await client.abort()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_last_unsubscribe_stops_only_that_broadcaster(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    c0, c1 = ResourceKey("chat", "c0"), ResourceKey("chat", "c1")
    baseline = await footprint(memory_relay, memory_backend)
    alice = await subscribed_client(memory_relay, "c0", "c1")
    bob = await subscribed_client(memory_relay, "c1")
    both = await footprint(memory_relay, memory_backend)
    assert both.stats.broadcasters == 2
    assert both.open_feeds == {c0: 1, c1: 1}

    # Alice was c0's only subscriber: its broadcaster and upstream go, c1's stay.
    reply = await alice.request("unsubscribe", resource="chat", resourceId="c0")
    assert reply["data"] == {"unsubscribed": True}
    after = await footprint(memory_relay, memory_backend)
    assert after.stats.broadcasters == 1
    assert after.stats.subscriptions == 2
    assert after.open_feeds == {c1: 1}
    # c0's broadcaster task is gone (a subscription is not a task).
    assert after.stats.tasks == both.stats.tasks - 1
    assert memory_backend.feeds_closed == 1

    # c1 still flows to both of its subscribers.
    memory_backend.emit("chat", "c1", {"type": "chunk", "text": "still here"})
    assert (await alice.next_push())["data"]["text"] == "still here"
    assert (await bob.next_push())["data"]["text"] == "still here"

    # Alice leaves c1 too, but Bob is still on it: nothing more closes.
    reply = await alice.request("unsubscribe", resource="chat", resourceId="c1")
    assert reply["data"] == {"unsubscribed": True}
    assert dict(memory_backend.open_feeds) == {c1: 1}
    assert memory_relay.relay.statistics().broadcasters == 1

    # Bob's unsubscribe is the last one out.
    start = trio.current_time()
    reply = await bob.request("unsubscribe", resource="chat", resourceId="c1")
    assert reply["data"] == {"unsubscribed": True}
    idle = await footprint(memory_relay, memory_backend)
    assert idle.stats.subscriptions == 0
    assert idle.stats.broadcasters == 0
    assert idle.open_feeds == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 2
    await alice.close()
    await bob.close()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_abort_during_send_releases_everything_at_once(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    client = await subscribed_client(memory_relay, "c0")
    memory_backend.faults["send_message"] = HANG
    await client.send({"id": "s1", "type": "send", "resourceId": "c0", "message": "hi"})
    await trio.testing.wait_all_tasks_blocked()
    assert memory_backend.sent == []  # the send is hanging in the backend
    start = trio.current_time()
    await client.abort()
    # The client is gone: its hanging request, subscription and upstream must go with it,
    # not linger until backend_timeout ends the request.
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_abort_during_first_subscribe_releases_everything_at_once(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    client = await memory_relay.connect(authenticate=PIN)
    memory_backend.faults["get_history"] = HANG
    await client.send({"id": "s1", "type": "subscribe", "resource": "chat", "resourceId": "c0"})
    await trio.testing.wait_all_tasks_blocked()
    assert dict(memory_backend.open_feeds) == {ResourceKey("chat", "c0"): 1}
    start = trio.current_time()
    await client.abort()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_abort_while_joining_a_live_broadcaster_leaves_it_to_the_others(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    alice = await subscribed_client(memory_relay, "c0")
    alice_only = await footprint(memory_relay, memory_backend)
    # A change since the broadcaster's snapshot, so the joiner must read a fresh one.
    memory_backend.emit("chat", "c0", {"type": "chunk", "text": "one"})
    assert (await alice.next_push())["seq"] == 1
    memory_backend.faults["get_history"] = HANG
    bob = await memory_relay.connect(authenticate=PIN)
    await bob.send({"id": "s1", "type": "subscribe", "resource": "chat", "resourceId": "c0"})
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    await bob.abort()
    now = await footprint(memory_relay, memory_backend)
    assert now.stats == alice_only.stats, f"now {now.stats}, before Bob {alice_only.stats}"
    assert now == alice_only
    assert trio.current_time() == start
    # Alice's subscription goes on undisturbed.
    memory_backend.emit("chat", "c0", {"type": "chunk", "text": "two"})
    push = await alice.next_push()
    assert (push["seq"], push["data"]["text"]) == (2, "two")
    await alice.close()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_hanging_request_is_released_by_backend_timeout_after_abort(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    # The outer bound, whatever happens to the prompt release above: backend_timeout.
    config = RelayConfig(backend_timeout=3.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        baseline = await footprint(relay, memory_backend)
        client = await subscribed_client(relay, "c0")
        memory_backend.faults["send_message"] = HANG
        await client.send({"id": "s1", "type": "send", "resourceId": "c0", "message": "hi"})
        await trio.testing.wait_all_tasks_blocked()
        await client.abort()
        await trio.sleep(config.backend_timeout)
        now = await footprint(relay, memory_backend)
        # Only c0's broadcaster is left, lingering for the client that dropped.
        assert now.stats.lingering == 1
        assert_same_but_lingering(baseline, now, memory_backend)
        await assert_back_after_grace(baseline, relay, memory_backend)


# --- in-process listeners -------------------------------------------------------------------------


async def test_listener_leaving_releases_everything(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    async with memory_relay.relay.listen("chat", "c0") as updates:
        held = await footprint(memory_relay, memory_backend)
        assert held.stats.listeners == 1
        assert held.stats.broadcasters == 1
        assert held.open_feeds == {ResourceKey("chat", "c0"): 1}
        memory_backend.emit("chat", "c0", {"type": "chunk", "text": "x"})
        with trio.fail_after(5):
            update = await updates.__anext__()
        assert (update.seq, update.data) == (1, {"type": "chunk", "text": "x"})
    start = trio.current_time()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_listener_left_by_an_exception_releases_everything(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:

    class Boom(Exception):
        pass

    baseline = await footprint(memory_relay, memory_backend)
    web = await subscribed_client(memory_relay, "c0")
    with_web = await footprint(memory_relay, memory_backend)
    with pytest.raises(Boom):
        async with memory_relay.relay.listen("chat", "c0") as updates:
            async with memory_relay.relay.listen("chat", "c1"):
                memory_backend.emit("chat", "c0", {"n": 1})
                with trio.fail_after(5):
                    async for _ in updates:
                        raise Boom
    start = trio.current_time()
    # c1's broadcaster (the listener's alone) is gone; c0's stays for the web client.
    assert (await footprint(memory_relay, memory_backend)).unkept() == with_web.unkept()
    assert trio.current_time() == start
    memory_backend.emit("chat", "c0", {"n": 2})
    assert (await web.next_push())["data"] == {"n": 1}
    assert (await web.next_push())["data"] == {"n": 2}
    await web.close()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_listener_cancelled_while_subscribing_releases_everything(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    memory_backend.faults["get_history"] = HANG
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def listen() -> None:
                async with memory_relay.relay.listen("chat", "c0"):
                    raise AssertionError("the subscription cannot have started")

            nursery.start_soon(listen)
            await trio.testing.wait_all_tasks_blocked()
            assert dict(memory_backend.open_feeds) == {ResourceKey("chat", "c0"): 1}
            scope.cancel()
    start = trio.current_time()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


# --- an upstream that ends ------------------------------------------------------------------------


async def test_completed_upstream_removes_its_broadcaster_and_a_new_one_starts(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    client = await subscribed_client(memory_relay, "c0")
    async with memory_relay.relay.listen("chat", "c0") as updates:
        assert memory_backend.feeds_opened == 1
        live = await footprint(memory_relay, memory_backend)
        memory_backend.emit("chat", "c0", {"n": 1})
        memory_backend.end_feeds("chat", "c0")
        with trio.fail_after(5):
            got = [u.data async for u in updates]
        assert got == [{"n": 1}, {"completed": True}]
        push = await client.next_push()
        assert (push["seq"], push["data"]) == (1, {"n": 1})
        push = await client.next_push()
        assert (push["seq"], push["data"]) == (2, {"completed": True})
        ended = await footprint(memory_relay, memory_backend)
        # The broadcaster, its task and its upstream are gone; the web subscription with
        # them; the listener block is still open (it ended its iteration).
        assert ended.stats.broadcasters == 0
        assert ended.stats.subscriptions == 0
        # Its broadcaster task is gone (a subscription is not a task).
        assert ended.stats.tasks == live.stats.tasks - 1
        assert ended.stats.listeners == 1
        assert ended.open_feeds == {}
        assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1

    # A new subscriber starts a fresh broadcaster with a fresh upstream.
    reply = await client.subscribe("chat", "c0")
    assert reply["seq"] == 0
    assert memory_backend.feeds_opened == 2
    assert memory_relay.relay.statistics().broadcasters == 1
    memory_backend.emit("chat", "c0", {"n": 3})
    push = await client.next_push()
    assert (push["seq"], push["data"]) == (1, {"n": 3})
    start = trio.current_time()
    await client.close()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


async def test_failed_upstream_removes_its_broadcaster(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    baseline = await footprint(memory_relay, memory_backend)
    client = await subscribed_client(memory_relay, "c0")
    live = await footprint(memory_relay, memory_backend)
    memory_backend.end_feeds("chat", "c0", RuntimeError("upstream broke"))
    push = await client.next_push()
    assert push["type"] == "error"
    assert push["code"] == "backend_error"
    assert push["resourceId"] == "c0"
    failed = await footprint(memory_relay, memory_backend)
    assert failed.stats.broadcasters == 0
    assert failed.stats.subscriptions == 0
    # Its broadcaster task is gone (a subscription is not a task).
    assert failed.stats.tasks == live.stats.tasks - 1
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1
    start = trio.current_time()
    await client.close()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


# --- many clients ---------------------------------------------------------------------------------


async def test_many_clients_leaving_in_mixed_ways_return_to_baseline(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    for chat in ("c3", "c4"):  # five chats here
        memory_backend.add_chat("p1", chat)
    baseline = await footprint(memory_relay, memory_backend)
    clients: list[TestClient] = []
    for i in range(50):
        # c0 is shared by all (subscribed twice by some); the other chat varies.
        client = await subscribed_client(memory_relay, "c0", f"c{(i // 5) % 5}")
        if i % 7 == 0:
            await client.subscribe("project", "p1")
        if i % 11 == 0:
            await client.subscribe("modelProfiles")
        clients.append(client)

    # Some in-process listeners beside them, on shared and on their own resources.
    listeners_done = trio.Event()
    listening = 0

    async def listen(chat: str, task_status: trio.TaskStatus[None]) -> None:
        nonlocal listening
        async with memory_relay.relay.listen("chat", chat):
            listening += 1
            task_status.started()
            await listeners_done.wait()

    async with trio.open_nursery() as nursery:
        for chat in ("c0", "c3", "c0"):
            await nursery.start(listen, chat)
        held = await footprint(memory_relay, memory_backend)
        assert held.stats.connections == 50
        assert held.stats.listeners == 3
        assert held.stats.broadcasters == 5 + 1 + 1  # chats, p1, modelProfiles
        assert sum(held.open_feeds.values()) == held.stats.broadcasters

        # Every subscriber of c0 gets the same push, once.
        memory_backend.emit("chat", "c0", {"type": "chunk", "text": "all"})
        for client in clients:
            push = await client.next_push()
            assert (push["resourceId"], push["seq"]) == ("c0", 1)
            await client.assert_no_push()

        for i, client in enumerate(clients):
            way = i % 5
            if way == 0:
                await client.close()
            elif way == 1:
                await client.abort()
            elif way == 2:
                for chat in {"c0", f"c{(i // 5) % 5}"}:
                    reply = await client.request("unsubscribe", resource="chat",
                                                 resourceId=chat)
                    assert reply["data"] == {"unsubscribed": True}
                await client.close()
            elif way == 3:
                # Resubscribing does not double anything, and aborting still cleans up.
                await client.subscribe("chat", "c0")
                await client.abort()
            else:
                await client.close(CloseCode.GOING_AWAY)
            if i == 25:
                listeners_done.set()
    assert listening == 3
    start = trio.current_time()
    await assert_back_to(baseline, memory_relay, memory_backend, since=start)


# --- the relay shutting down ----------------------------------------------------------------------


async def test_shutdown_closes_clients_with_1001_and_all_feeds(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    async with open_memory_relay(memory_backend, pin=PIN) as relay:
        alice = await subscribed_client(relay, "c0", "c1")
        bob = await subscribed_client(relay, "c1")
        async with relay.relay.listen("chat", "c2"):
            pass
        await trio.testing.wait_all_tasks_blocked()
        assert sum(memory_backend.open_feeds.values()) == 2
        inner = relay.relay
    for client in (alice, bob):
        assert client.ws.closed is not None, "the client never saw the relay's close frame"
        assert client.ws.closed.code == CloseCode.GOING_AWAY
    assert dict(memory_backend.open_feeds) == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 3
    stats = inner.statistics()
    assert (stats.connections, stats.subscriptions, stats.broadcasters, stats.tasks) == (0, 0, 0, 0)


async def test_shutdown_sends_1001_to_clients_that_watch_it(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(shutdown_timeout=2.0)
    closes: dict[str, tuple[int, str | None]] = {}

    async def wait_closed(name: str, client: TestClient) -> None:
        closes[name] = await client.wait_closed()

    # The watcher lives outside the relay, so that it sees the relay shut down.
    async with trio.open_nursery() as watchers:
        async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
            alice = await subscribed_client(relay, "c0", "c1")
            # A client that never reads: its closing handshake cannot complete.
            await subscribed_client(relay, "c1", lockstep=True)
            watchers.start_soon(wait_closed, "alice", alice)
            await trio.testing.wait_all_tasks_blocked()
            assert sum(memory_backend.open_feeds.values()) == 2
            start = trio.current_time()
    assert trio.current_time() - start <= config.shutdown_timeout
    assert closes["alice"] == (CloseCode.GOING_AWAY, "relay shutting down")
    assert dict(memory_backend.open_feeds) == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 2


async def test_shutdown_drops_a_client_that_does_not_read_within_shutdown_timeout(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(shutdown_timeout=2.0, close_timeout=60.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        await subscribed_client(relay, "c0", lockstep=True)
        # Fill what the client's stream and its WebSocket queue take, so it reads no more.
        for n in range(20):
            memory_backend.emit("chat", "c0", {"n": n})
            await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
    assert trio.current_time() - start <= config.shutdown_timeout
    assert dict(memory_backend.open_feeds) == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1


async def test_relay_cancelled_from_outside_with_clients_connected(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    # The host application's nursery is cancelled (a sibling crashed, Ctrl-C, ...) while web
    # clients are connected: the relay must go away quietly and close every upstream.
    with trio.CancelScope() as scope:
        async with open_memory_relay(memory_backend, pin=PIN) as relay:
            await subscribed_client(relay, "c0")
            await subscribed_client(relay, "c0", "c1")
            inner = relay.relay
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert dict(memory_backend.open_feeds) == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 2
    # The clients' drops left c0 and c1 lingering; cancelled with the relay, they are gone
    # from its statistics too.
    stats = inner.statistics()
    assert (stats.broadcasters, stats.lingering, stats.tasks) == (0, 0, 0)


# --- what `statistics().tasks` sees ---------------------------------------------------------------


async def test_statistics_tasks_include_connection_tasks(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    # A connection runs a reader, a writer and a task per subscription; a leak of any of them
    # should show in the relay's own task count, which is what the relay offers for this.
    baseline = await footprint(memory_relay, memory_backend)
    client = await subscribed_client(memory_relay, "c0")
    held = await footprint(memory_relay, memory_backend)
    relay_tasks_added = held.stats.tasks - baseline.stats.tasks
    run_tasks_added = held.tasks_in_run - baseline.tasks_in_run
    client_side = 2  # the test client: its task and trio-websocket's reader under it
    assert relay_tasks_added == run_tasks_added - client_side, (
        f"statistics().tasks grew by {relay_tasks_added} while the relay started"
        f" {run_tasks_added - client_side} tasks for one subscribed connection"
    )
    await client.close()


async def test_slow_client_dropped_at_close_timeout_releases_everything(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(outbound_queue_size=4, close_timeout=3.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        baseline = await footprint(relay, memory_backend)
        slow = await subscribed_client(relay, "c0", "c1", lockstep=True)
        for n in range(20):
            memory_backend.emit("chat", "c0", {"n": n})
            await trio.testing.wait_all_tasks_blocked()
        assert relay.relay.counters.slow_closes == 1
        await trio.sleep(config.close_timeout)
        now = await footprint(relay, memory_backend)
        # The relay's side is free, but for c0 and c1 lingering for the client to come back.
        assert now.stats.lingering == 2
        lingering = now.stats.lingering
        assert attrs.evolve(
            now.stats, kept_histories=0, lingering=0, broadcasters=0,
            tasks=now.stats.tasks - lingering,
        ) == baseline.stats
        assert sum(now.open_feeds.values()) == lingering
        assert memory_backend.feeds_closed + lingering == memory_backend.feeds_opened
        # The client reads at last: it finds the relay gone, and its own task ends.
        with pytest.raises(ConnectionClosed):
            while True:
                await slow.ws.get_message()
        assert_same_but_lingering(baseline, await footprint(relay, memory_backend),
                                  memory_backend)
        await assert_back_after_grace(baseline, relay, memory_backend)


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_a_finished_connection_is_freed_without_the_garbage_collector(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay,
    how: str,
) -> None:
    # trio-relay serve collects cyclic garbage rarely: nothing of a connection may wait for it.
    import gc
    import weakref

    memory_backend.add_chat("p1", "c1")
    client = await subscribed_client(memory_relay, "c1")
    (connection,) = memory_relay.relay._connections
    ref = weakref.ref(connection)
    del connection
    gc.disable()
    try:
        await (client.close() if how == "close" else client.abort())
        await memory_relay.quiet_statistics()
        assert ref() is None
    finally:
        gc.enable()
