"""The bus seam on the in-process bus (`LocalBus`), under the autojump clock.

Two or three relays in one ``trio.run``, each with its own `SqliteBackend` on one shared data
dir and all on one `LocalBus`, play the nodes of a cluster: what one node stores, every node
pushes, with the same ``seq``; a client resumes on any node; a broker that loses its history
or stops answering has the answers docs/scaling.md promises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from trio_relay import (
    Bus,
    BusError,
    BusEvent,
    CloseCode,
    EchoAgent,
    EpochChanged,
    LocalBus,
    Position,
    RelayConfig,
    RelayError,
    ResourceKey,
    open_sqlite_backend,
)
from trio_relay.testing import (
    Frame,
    MemoryBackend,
    MemoryRelay,
    TestClient,
    open_memory_relay,
)

CHAT = ResourceKey("chat", "welcome")
# The nodes run on the real clock: SQLite works in worker threads, and while one runs the
# autojump clock would jump to the next deadline (an auth timeout, say). The bus itself is
# tested under the autojump clock.


@asynccontextmanager
async def open_nodes(
    data_dir: Path, bus: Bus | str, count: int = 2, config: RelayConfig | None = None,
    chunk_delay: float = 0.001,
) -> AsyncIterator[list[MemoryRelay]]:
    """``count`` relays sharing one data dir and one bus (a `Bus`, or a broker URL each
    connects to), as processes of a cluster would."""
    async with AsyncExitStack() as stack:
        nodes = []
        for _ in range(count):
            backend = await stack.enter_async_context(
                open_sqlite_backend(data_dir, agent=EchoAgent(chunk_delay=chunk_delay))
            )
            nodes.append(
                await stack.enter_async_context(
                    open_memory_relay(backend, broker=bus, config=config, client_timeout=10)
                )
            )
        yield nodes


async def agent_reply(client: TestClient) -> list[Frame]:
    """The pushes of one agent reply, up to its stored message."""
    pushes = []
    while True:
        push = await client.next_push()
        pushes.append(push)
        data = push["data"]
        if data.get("type") == "message" and data["message"]["role"] == "assistant":
            return pushes


# --- the LocalBus itself ------------------------------------------------------------------------


async def test_the_bus_numbers_each_resource_and_replays_what_it_keeps(
    autojump_clock: trio.abc.Clock,
) -> None:
    bus = LocalBus(replay_size=3, replay_max_age=60)
    start = await bus.head(CHAT)
    assert start.seq == 0
    for n in range(5):
        bus.forward(CHAT, {"n": n})
    assert await bus.head(CHAT) == Position(start.epoch, 5)
    assert await bus.read(CHAT, start.epoch, 2, 5) == [
        BusEvent(3, {"n": 2}), BusEvent(4, {"n": 3}), BusEvent(5, {"n": 4})
    ]
    assert await bus.read(CHAT, start.epoch, 1, 5) is None  # seq 2 was trimmed
    assert await bus.read(CHAT, "another epoch", 4, 5) is None
    await trio.sleep(61)
    assert await bus.read(CHAT, start.epoch, 4, 5) is None  # too old
    assert (await bus.head(ResourceKey("chat", "other"))).seq == 0  # numbered apart


async def test_a_follower_gets_what_it_missed_then_live_events_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    bus = LocalBus()
    start = await bus.head(CHAT)
    bus.forward(CHAT, "before")
    async with bus.follow(CHAT, start) as events:
        bus.forward(CHAT, "after")
        assert [await events.__anext__(), await events.__anext__()] == [
            BusEvent(1, "before"), BusEvent(2, "after")
        ]
        bus.lose()
        with pytest.raises(EpochChanged):
            await events.__anext__()
    with pytest.raises(EpochChanged):
        async with bus.follow(CHAT, start):
            pass  # pragma: no cover


async def test_a_failed_bus_refuses_every_call_until_it_recovers(
    autojump_clock: trio.abc.Clock,
) -> None:
    bus = LocalBus()
    bus.fail()
    assert not bus.healthy
    with pytest.raises(BusError, match="unreachable"):
        await bus.head(CHAT)
    with pytest.raises(BusError):
        await bus.publish(CHAT, "x")
    bus.recover()
    assert (await bus.publish(CHAT, "x")).seq == 1


# --- relays on one bus --------------------------------------------------------------------------


async def test_a_message_sent_on_one_node_reaches_every_node_with_the_same_seq(
    tmp_path: Path,
) -> None:
    bus = LocalBus()
    async with open_nodes(tmp_path, bus, count=3) as nodes:
        clients = [await node.connect(authenticate=True) for node in nodes]
        replies = [await client.subscribe("chat", "welcome") for client in clients]
        assert len({(r["epoch"], r["seq"]) for r in replies}) == 1
        await clients[0].send_message("welcome", "hello from node 0")
        streams = [await agent_reply(client) for client in clients]
        assert streams[0] == streams[1] == streams[2]
        seqs = [push["seq"] for push in streams[0]]
        assert seqs == list(range(replies[0]["seq"] + 1, replies[0]["seq"] + 1 + len(seqs)))
        assert streams[0][0]["data"]["message"]["content"] == "hello from node 0"
        # The agent answered once, on the node that took the message.
        for client in clients:
            await client.assert_no_push()
        history = await nodes[2].backend.get_history("welcome")
        assert [m["role"] for m in history.items[-2:]] == ["user", "assistant"]
        assert sum(m["role"] == "assistant" for m in history.items) == 2  # welcome + reply


async def test_a_chat_created_on_one_node_is_pushed_on_the_others(
    tmp_path: Path,
) -> None:
    bus = LocalBus()
    async with open_nodes(tmp_path, bus) as (a, b):
        watcher = await b.connect(authenticate=True)
        await watcher.subscribe("project", "demo")
        creator = await a.connect(authenticate=True)
        reply = await creator.request(
            "create", resource="chat", resourceId="demo", message={"title": "From A"}
        )
        assert reply["type"] == "data", reply
        push = await watcher.next_push()
        assert push["data"]["type"] == "chat_created"
        assert push["data"]["chat"] == reply["data"]["chat"]


async def test_a_client_resumes_on_another_node_with_what_it_missed(
    tmp_path: Path,
) -> None:
    bus = LocalBus()
    async with open_nodes(tmp_path, bus) as (a, b):
        client = await a.connect(authenticate=True)
        subscribed = await client.subscribe("chat", "welcome")
        await client.abort()
        sender = await b.connect(authenticate=True)
        await sender.subscribe("chat", "welcome")
        await sender.send_message("welcome", "while you were away")
        sent = await agent_reply(sender)
        back = await b.connect(authenticate=True)
        resumed = await back.subscribe(
            "chat", "welcome", since_seq=subscribed["seq"], epoch=subscribed["epoch"]
        )
        assert resumed.get("resumed") is True and resumed["seq"] == subscribed["seq"], resumed
        missed = await back.next_pushes(len(sent))
        assert missed == sent
        assert [p["seq"] for p in missed] == list(
            range(subscribed["seq"] + 1, subscribed["seq"] + 1 + len(sent))
        )
        assert missed[0]["data"]["message"]["content"] == "while you were away"


async def test_a_reply_is_stopped_from_another_relay(tmp_path: Path) -> None:
    bus = LocalBus()
    async with open_nodes(tmp_path, bus, chunk_delay=0.2) as (a, b):
        on_a = await a.connect(authenticate=True)
        await on_a.subscribe("chat", "welcome")
        await on_a.send_message("welcome", "a long answer to stop")
        while (await on_a.next_push())["data"].get("type") != "chunk":
            pass  # the answer is streaming, on relay a
        on_b = await b.connect(authenticate=True)
        reply = await on_b.request("cancel", resource="chat", resourceId="welcome")
        # Not running on b: b says so, and asks every relay to stop it.
        assert reply["data"] == {"cancelled": False}, reply
        while (push := await on_a.next_push())["data"].get("type") != "cancelled":
            pass
        stored = await on_a.next_push()
        assert stored["data"]["type"] == "message"
        assert stored["data"]["message"]["content"].endswith("(stopped)")
        assert stored["seq"] == push["seq"] + 1


async def test_a_relay_restart_keeps_resume_working_on_the_bus(
    tmp_path: Path,
) -> None:
    bus = LocalBus()
    async with open_nodes(tmp_path, bus, count=1) as (node,):
        client = await node.connect(authenticate=True)
        subscribed = await client.subscribe("chat", "welcome")
        await client.send_message("welcome", "before the restart")
        last = (await agent_reply(client))[-1]
    async with open_nodes(tmp_path, bus, count=1) as (node,):
        client = await node.connect(authenticate=True)
        resumed = await client.subscribe(
            "chat", "welcome", since_seq=subscribed["seq"], epoch=subscribed["epoch"]
        )
        assert "reset" not in resumed, resumed
        missed = await client.next_pushes(last["seq"] - subscribed["seq"])
        assert missed[-1] == last


async def test_a_broker_that_lost_its_history_closes_clients_to_a_reset(
    tmp_path: Path,
) -> None:
    bus = LocalBus()
    async with open_nodes(tmp_path, bus) as (a, b):
        client = await a.connect(authenticate=True)
        subscribed = await client.subscribe("chat", "welcome")
        bus.lose()
        code, reason = await client.wait_closed()
        assert code == CloseCode.SERVICE_RESTART
        assert reason and "history" in reason
        back = await b.connect(authenticate=True)
        resumed = await back.subscribe(
            "chat", "welcome", since_seq=subscribed["seq"], epoch=subscribed["epoch"]
        )
        assert resumed.get("reset") is True
        assert resumed["epoch"] != subscribed["epoch"]
        assert resumed["data"]["messages"], "a reset carries a fresh snapshot"


async def test_an_unreachable_broker_refuses_writes_and_turns_health_red(
    tmp_path: Path,
) -> None:
    bus = LocalBus()
    async with open_nodes(tmp_path, bus, count=1) as (node,):
        client = await node.connect(authenticate=True)
        await client.subscribe("chat", "welcome")
        before = await node.backend.get_history("welcome")
        bus.fail()
        view = node.relay._metrics_view()
        assert view.degraded == "broker unreachable"
        reply = await client.request(
            "send", resource="chat", resourceId="welcome", message="lost?"
        )
        assert reply["type"] == "error" and "broker" in reply["error"], reply
        reply = await client.request(
            "create", resource="chat", resourceId="demo", message={"title": "lost?"}
        )
        assert reply["type"] == "error" and "broker" in reply["error"], reply
        with pytest.raises(RelayError, match="broker"):
            await node.relay.send("welcome", "from the host")
        assert await node.backend.get_history("welcome") == before  # nothing stored
        bus.recover()
        assert node.relay._metrics_view().degraded is None
        await client.send_message("welcome", "back")
        assert (await client.next_push())["data"]["message"]["content"] == "back"


async def test_a_broker_needs_a_backend_that_publishes_through_a_hub(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Bare:  # a Backend in every way that matters here, but with no ``hub``
        pass

    with pytest.raises(RelayError, match="ChangeHub"):
        async with open_memory_relay(Bare(), broker=LocalBus()):  # type: ignore[arg-type]
            pass  # pragma: no cover
    backend = MemoryBackend()
    async with open_memory_relay(backend, broker=LocalBus()):
        assert backend.hub.outlet is not None
    assert backend.hub.outlet is None  # the relay hands the hub back as it found it


# --- one relay on the in-process bus, under the autojump clock -----------------------------------


async def test_pushes_carry_the_bus_numbering_and_resume_across_relays(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = MemoryBackend()
    backend.add_project("p1")
    backend.add_chat("p1", "c1")
    bus = LocalBus()
    key = ResourceKey("chat", "c1")
    async with open_memory_relay(backend, broker=bus) as relay:
        client = await relay.connect(authenticate=True)
        subscribed = await client.subscribe("chat", "c1")
        head = await bus.head(key)
        assert (subscribed["epoch"], subscribed["seq"]) == (head.epoch, head.seq)
        backend.add_message("c1", "one")
        push = await client.next_push()
        assert push["seq"] == head.seq + 1 == (await bus.head(key)).seq
        await client.abort()
        backend.add_message("c1", "two")  # nobody watches here; the bus numbers it anyway
    # Another relay (a restart, or another node): the history is the bus's.
    async with open_memory_relay(backend, broker=bus) as relay:
        client = await relay.connect(authenticate=True)
        resumed = await client.subscribe(
            "chat", "c1", since_seq=push["seq"], epoch=subscribed["epoch"]
        )
        assert resumed.get("resumed") is True, resumed
        missed = await client.next_push()
        assert (missed["seq"], missed["data"]["message"]["content"]) == (push["seq"] + 1, "two")
        bus.lose()
        code, _ = await client.wait_closed()
        assert code == CloseCode.SERVICE_RESTART
        back = await relay.connect(authenticate=True)
        fresh = await back.subscribe(
            "chat", "c1", since_seq=missed["seq"], epoch=subscribed["epoch"]
        )
        assert fresh.get("reset") is True and fresh["epoch"] != subscribed["epoch"]
        assert [m["content"] for m in fresh["data"]["messages"]] == ["one", "two"]
        # Nothing of the bus stays behind when the relay's last client leaves.
        await back.close()
        stats = await relay.quiet_statistics()
        assert (stats.broadcasters, stats.lingering, stats.kept_histories) == (0, 0, 0)
