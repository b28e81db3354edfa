"""Resuming a subscription with ``sinceSeq`` and ``epoch``: exactly the missed pushes, or a
fresh snapshot marked ``reset``; never a partial replay. In memory, under the mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _helpers import PIN, Frame, one_chat

from trio_relay import BackendError, RelayConfig
from trio_relay.testing import (
    MemoryBackend,
    MemoryRelay,
    TestClient,
    open_memory_relay,
)

memory_backend = pytest.fixture(one_chat, name="memory_backend")


async def _resume(memory: MemoryRelay, since: int, epoch: str | None) -> tuple[TestClient, Frame]:
    """A new connection that resumes c1 from ``since`` of ``epoch``."""
    client = await memory.connect(authenticate=PIN)
    return client, await client.subscribe("chat", "c1", since_seq=since, epoch=epoch)


def _numbers(pushes: list[Frame]) -> list[int]:
    return [p["data"]["n"] for p in pushes]


async def test_subscribed_carries_seq_and_epoch(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    a = await memory_relay.connect(authenticate=PIN)
    b = await memory_relay.connect(authenticate=PIN)
    first, second = await a.subscribe("chat", "c1"), await b.subscribe("chat", "c1")
    assert isinstance(first["epoch"], str) and first["epoch"]
    assert second["epoch"] == first["epoch"]  # one sequence per resource
    assert "reset" not in first and "resumed" not in first


async def test_reconnect_resumes_with_exactly_the_missed_pushes(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    watcher = await memory_relay.connect(authenticate=PIN)
    await watcher.subscribe("chat", "c1")  # keeps the broadcaster alive
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    for n in range(3):
        memory_backend.emit("chat", "c1", {"n": n})
    seen = await client.next_pushes(3)
    last_seq, epoch = seen[-1]["seq"], reply["epoch"]
    await client.abort()  # a blip
    for n in range(3, 8):
        memory_backend.emit("chat", "c1", {"n": n})
    again, resumed = await _resume(memory_relay, last_seq, epoch)
    assert resumed == {"id": resumed["id"], "type": "subscribed", "resource": "chat",
                       "resourceId": "c1", "seq": last_seq, "epoch": epoch,
                       "resumed": True}
    memory_backend.emit("chat", "c1", {"n": 8})
    missed = await again.next_pushes(6)
    assert _numbers(missed) == [3, 4, 5, 6, 7, 8]
    assert [p["seq"] for p in missed] == list(range(last_seq + 1, last_seq + 7))
    await again.assert_no_push()
    # The very same frames the uninterrupted subscriber got.
    assert missed == (await watcher.next_pushes(9))[3:]


async def test_the_lone_subscriber_blip_resumes(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    baseline = await memory_relay.quiet_statistics()
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    memory_backend.emit("chat", "c1", {"n": 0})
    seq = (await client.next_push())["seq"]
    await client.abort()
    # The broadcaster lingers for the client's return: its upstream stays open.
    lingering = await memory_relay.quiet_statistics()
    assert (lingering.broadcasters, lingering.lingering) == (1, 1)
    assert lingering.tasks == baseline.tasks + 1
    assert lingering.kept_histories == 0
    assert sum(memory_backend.open_feeds.values()) == 1
    await trio.sleep(5)  # a short blip, well inside resume_grace
    again, resumed = await _resume(memory_relay, seq, reply["epoch"])
    assert resumed.get("resumed") is True and resumed["epoch"] == reply["epoch"]
    assert memory_backend.feeds_opened == 1  # the same upstream, never closed
    assert (await memory_relay.quiet_statistics()).lingering == 0
    memory_backend.emit("chat", "c1", {"n": 1})
    push = await again.next_push()
    assert (push["seq"], push["data"]) == (seq + 1, {"n": 1})
    await again.assert_no_push()


async def test_a_change_while_the_lone_subscriber_was_away_is_replayed(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    await client.abort()
    await trio.testing.wait_all_tasks_blocked()
    # Stored while nobody watched: the lingering broadcaster numbers and records it.
    message = memory_backend.add_message("c1", "written during the blip")
    memory_backend.emit("chat", "c1", {"n": 1})
    await trio.sleep(memory_relay.relay.config.resume_grace - 1)
    again, resumed = await _resume(memory_relay, reply["seq"], reply["epoch"])
    assert resumed.get("resumed") is True and "reset" not in resumed
    assert resumed["epoch"] == reply["epoch"] and resumed["seq"] == reply["seq"]
    missed = await again.next_pushes(2)
    assert [p["seq"] for p in missed] == [reply["seq"] + 1, reply["seq"] + 2]
    assert missed[0]["data"]["message"] == message
    assert missed[1]["data"] == {"n": 1}
    await again.assert_no_push()


async def test_a_change_after_the_linger_ran_out_means_a_reset(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await memory_relay.quiet_statistics()
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    await client.abort()
    await trio.sleep(memory_relay.relay.config.resume_grace + 1)
    # The linger is over: its broadcaster, its upstream and its history are gone.
    assert await memory_relay.quiet_statistics() == baseline
    assert memory_backend.open_feeds == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1
    # Stored while no feed was open: the relay could not have recorded it as a push.
    message = memory_backend.add_message("c1", "written after the grace")
    _, fresh = await _resume(memory_relay, reply["seq"], reply["epoch"])
    assert fresh["reset"] is True
    assert fresh["epoch"] != reply["epoch"]
    assert fresh["data"] == {"messages": [message]}
    assert "resumed" not in fresh


async def test_an_unsubscribe_frees_the_broadcaster_at_once_and_a_change_means_a_reset(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await memory_relay.quiet_statistics()
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    left = await client.request("unsubscribe", resource="chat", resourceId="c1")
    assert left["data"] == {"unsubscribed": True}
    await client.abort()
    # Left on purpose: nothing lingers, the upstream is closed at once, and only the history
    # is kept (as data, not as a task) for resume_grace.
    now = await memory_relay.quiet_statistics()
    assert (now.broadcasters, now.lingering, now.kept_histories) == (0, 0, 1)
    assert now.tasks == baseline.tasks
    assert memory_backend.open_feeds == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1
    # Stored while no feed was open: the relay could not have recorded it as a push.
    message = memory_backend.add_message("c1", "written while nobody watched")
    _, fresh = await _resume(memory_relay, reply["seq"], reply["epoch"])
    assert fresh["reset"] is True
    assert fresh["epoch"] != reply["epoch"]
    assert fresh["data"] == {"messages": [message]}
    assert "resumed" not in fresh


@pytest.mark.parametrize(("code", "lingers"), [(1000, False), (1001, True), (4000, True)])
async def test_a_clean_1000_close_is_done_while_any_other_close_lingers(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
    code: int,
    lingers: bool,
) -> None:
    """1000 says the client is done (the client library closes so when you leave it); a
    page being reloaded goes away with 1001 and comes back to resume."""
    baseline = await memory_relay.quiet_statistics()
    client = await memory_relay.connect(authenticate=PIN)
    await client.subscribe("chat", "c1")
    await client.close(code)
    now = await memory_relay.quiet_statistics()
    assert (now.connections, now.subscriptions) == (0, 0)
    assert (now.broadcasters, now.lingering) == ((1, 1) if lingers else (0, 0))
    assert sum(memory_backend.open_feeds.values()) == int(lingers)
    await trio.sleep(memory_relay.relay.config.resume_grace + 1)
    assert await memory_relay.quiet_statistics() == baseline


async def test_an_unsubscribe_with_no_change_since_still_resumes(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    memory_backend.emit("chat", "c1", {"n": 0})
    seq = (await client.next_push())["seq"]
    await client.request("unsubscribe", resource="chat", resourceId="c1")
    await client.close()
    again, resumed = await _resume(memory_relay, seq, reply["epoch"])
    assert resumed.get("resumed") is True and resumed["epoch"] == reply["epoch"]
    assert memory_backend.feeds_opened == 2  # a fresh upstream, continuing the old numbering
    memory_backend.emit("chat", "c1", {"n": 1})
    push = await again.next_push()
    assert (push["seq"], push["data"]) == (seq + 1, {"n": 1})
    assert memory_relay.relay.statistics().kept_histories == 0


async def test_a_subscriber_joining_a_lingering_broadcaster_lifts_its_deadline(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    grace = memory_relay.relay.config.resume_grace
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    await client.abort()
    await trio.sleep(grace / 2)
    again, resumed = await _resume(memory_relay, reply["seq"], reply["epoch"])
    assert resumed.get("resumed") is True
    # Well past the deadline it had while lingering, it runs on for its subscriber.
    await trio.sleep(grace * 2)
    now = await memory_relay.quiet_statistics()
    assert (now.broadcasters, now.lingering) == (1, 0)
    assert memory_backend.feeds_opened == 1 and memory_backend.feeds_closed == 0
    memory_backend.emit("chat", "c1", {"n": 1})
    push = await again.next_push()
    assert (push["seq"], push["data"]) == (reply["seq"] + 1, {"n": 1})
    # A second drop lingers anew, for a whole resume_grace from then.
    await again.abort()
    await trio.sleep(grace - 1)
    assert (await memory_relay.quiet_statistics()).lingering == 1
    await trio.sleep(2)
    assert (await memory_relay.quiet_statistics()).broadcasters == 0
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1


async def test_a_lingering_broadcaster_whose_upstream_ends_is_gone_at_once(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    memory_relay: MemoryRelay,
) -> None:
    baseline = await memory_relay.quiet_statistics()
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    await client.abort()
    assert (await memory_relay.quiet_statistics()).lingering == 1
    start = trio.current_time()
    memory_backend.end_feeds("chat", "c1")  # e.g. the chat was deleted
    # Nobody waits for resume_grace: the broadcaster, its task and its feed go now, and its
    # numbering ended with the upstream, so nothing is kept.
    assert await memory_relay.quiet_statistics() == baseline
    assert trio.current_time() == start
    assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1
    _, fresh = await _resume(memory_relay, reply["seq"], reply["epoch"])
    assert fresh["reset"] is True and fresh["epoch"] != reply["epoch"]


async def test_unknown_epoch_or_unserviceable_seq_gets_a_fresh_snapshot(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(replay_buffer_size=4)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        watcher = await memory.connect(authenticate=PIN)
        epoch = (await watcher.subscribe("chat", "c1"))["epoch"]
        for n in range(10):
            memory_backend.emit("chat", "c1", {"n": n})
        await watcher.next_pushes(10)
        cases = [
            (9, "not-this-epoch"),  # a restarted relay, another resource's epoch, ...
            (9, None),  # sinceSeq without an epoch: nothing to vouch for
            (2, epoch),  # older than the 4 pushes still buffered
            (11, epoch),  # from the future
        ]
        for since, claimed in cases:
            client, reply = await _resume(memory, since, claimed)
            assert reply["reset"] is True, (since, claimed)
            assert reply["epoch"] == epoch  # the current sequence, from its current point
            assert reply["seq"] == 10
            assert reply["data"] == {"messages": []}
            await client.assert_no_push()  # never a partial replay
        # The oldest seq still buffered resumes exactly.
        client, reply = await _resume(memory, 6, epoch)
        assert reply.get("resumed") is True
        assert _numbers(await client.next_pushes(4)) == [6, 7, 8, 9]


async def test_pushes_older_than_replay_max_age_are_not_replayed(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    config = RelayConfig(replay_max_age=60, ping_interval=1000, ping_timeout=1000)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        watcher = await memory.connect(authenticate=PIN)
        epoch = (await watcher.subscribe("chat", "c1"))["epoch"]
        memory_backend.emit("chat", "c1", {"n": 0})
        await trio.sleep(61)
        memory_backend.emit("chat", "c1", {"n": 1})
        await watcher.next_pushes(2)
        _, reply = await _resume(memory, 0, epoch)
        assert reply["reset"] is True
        client, reply = await _resume(memory, 1, epoch)
        assert reply.get("resumed") is True
        assert _numbers(await client.next_pushes(1)) == [1]
        await client.assert_no_push()


@pytest.mark.parametrize("how", ["unsubscribe", "drop"])
async def test_what_is_kept_for_resuming_is_freed_after_the_grace_period(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
    how: str,
) -> None:
    config = RelayConfig(resume_grace=30)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        baseline = await memory.quiet_statistics()
        client = await memory.connect(authenticate=PIN)
        reply = await client.subscribe("chat", "c1")
        memory_backend.emit("chat", "c1", {"n": 0})
        seq = (await client.next_push())["seq"]
        if how == "unsubscribe":
            await client.request("unsubscribe", resource="chat", resourceId="c1")
            await client.close()
        else:
            await client.abort()
        kept = await memory.quiet_statistics()
        if how == "unsubscribe":
            assert (kept.kept_histories, kept.lingering) == (1, 0)
            assert kept.tasks == baseline.tasks  # kept by data and a deadline, not by a task
        else:
            # A drop: the broadcaster itself lingers, one task and one feed, no more.
            assert (kept.kept_histories, kept.lingering, kept.broadcasters) == (0, 1, 1)
            assert kept.tasks == baseline.tasks + 1
        await trio.sleep(29.5)
        assert memory.relay.statistics() != baseline  # not before resume_grace is over
        await trio.sleep(1)
        assert memory.relay.statistics() == baseline
        assert memory_backend.feeds_closed == memory_backend.feeds_opened == 1
        # Too late: the client gets a fresh snapshot in a new epoch, not a silent gap.
        _, fresh = await _resume(memory, seq, reply["epoch"])
        assert fresh["reset"] is True and fresh["epoch"] != reply["epoch"]


async def test_a_completed_upstream_is_not_resumed(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    memory_backend.end_feeds("chat", "c1")
    final = await client.next_push()
    assert final["data"] == {"completed": True}
    assert (await memory_relay.quiet_statistics()).kept_histories == 0
    _, fresh = await _resume(memory_relay, reply["seq"], reply["epoch"])
    assert fresh["reset"] is True and fresh["epoch"] != reply["epoch"]


async def test_many_reconnects_leave_nothing_behind(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    baseline = await memory_relay.quiet_statistics()
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    seq, epoch, received = reply["seq"], reply["epoch"], []
    for n in range(50):
        memory_backend.emit("chat", "c1", {"n": n})
        push = await client.next_push()
        received.append(push["data"]["n"])
        seq = push["seq"]
        if n % 5 == 4:
            await client.abort()
            client, resumed = await _resume(memory_relay, seq, epoch)
            assert resumed.get("resumed") is True
    assert received == list(range(50))
    await client.close()
    await trio.sleep(memory_relay.relay.config.resume_grace + 1)
    assert memory_relay.relay.statistics() == baseline
    assert memory_backend.open_feeds == {}
    assert memory_backend.feeds_closed == memory_backend.feeds_opened


async def test_the_seed_client_is_unaffected(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    # The seed's client sends no sinceSeq and reads only data; extra fields cost it nothing.
    client = await memory_relay.connect(authenticate=PIN)
    await client.send({"id": "sub-chat-1", "type": "subscribe", "resource": "chat",
                       "resourceId": "c1"})
    reply = await client.reply_to("sub-chat-1")
    assert reply["data"] == {"messages": []}
    assert "reset" not in reply and "resumed" not in reply


async def test_a_replay_larger_than_the_outbound_queue_is_a_reset(
    autojump_clock: trio.abc.Clock,
    memory_backend: MemoryBackend,
) -> None:
    # Otherwise the replay itself would overflow the queue: 1013 on every reconnect.
    config = RelayConfig(outbound_queue_size=8)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as memory:
        watcher = await memory.connect(authenticate=PIN)
        epoch = (await watcher.subscribe("chat", "c1"))["epoch"]
        for n in range(12):
            memory_backend.emit("chat", "c1", {"n": n})
            await watcher.next_push()
        client, reply = await _resume(memory, 0, epoch)  # 12 missed: more than fit
        assert reply["reset"] is True and reply["seq"] == 12
        await client.assert_no_push()
        client, reply = await _resume(memory, 6, epoch)  # 6 missed: they fit
        assert reply.get("resumed") is True
        assert _numbers(await client.next_pushes(6)) == [6, 7, 8, 9, 10, 11]


async def test_a_failed_restart_keeps_the_history_for_resuming(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    # A broadcaster that was to continue a kept history but could not start (the backend
    # failed once) must not throw that history away.
    alice = await memory_relay.connect(authenticate=PIN)
    first = await alice.subscribe("chat", "c1")
    memory_backend.emit("chat", "c1", {"n": 0})
    seq = (await alice.next_push())["seq"]
    # Left on purpose, so that the history is kept while no broadcaster runs.
    await alice.request("unsubscribe", resource="chat", resourceId="c1")
    await alice.abort()
    assert (await memory_relay.quiet_statistics()).kept_histories == 1
    memory_backend.faults["watch_chat"] = BackendError("down for a moment")
    bob = await memory_relay.connect(authenticate=PIN)
    refused = await bob.request("subscribe", resource="chat", resourceId="c1")
    assert (refused["type"], refused["code"]) == ("error", "backend_error")
    assert (await memory_relay.quiet_statistics()).kept_histories == 1
    del memory_backend.faults["watch_chat"]
    again = await memory_relay.connect(authenticate=PIN)
    reply = await again.subscribe("chat", "c1", since_seq=seq, epoch=first["epoch"])
    assert reply.get("resumed") is True
    # And it is still freed when its original grace period ends.
    await again.close()
    await trio.sleep(memory_relay.relay.config.resume_grace + 1)
    assert (await memory_relay.quiet_statistics()).kept_histories == 0
