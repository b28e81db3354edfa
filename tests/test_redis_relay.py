"""Relays on a real Redis: two relays in one ``trio.run``, each with its own `SqliteBackend`
on one data dir, both with ``broker="redis://..."`` (the nodes of a cluster, in one process).

The three-process end-to-end test (tests/test_cluster.py) runs `trio-relay serve` itself.
"""

from __future__ import annotations

from pathlib import Path

from _helpers import wait_until
from _redis import RedisServer, redis_server
from test_bus import agent_reply, open_nodes

from trio_relay import CloseCode, RedisBus, RelayConfig, ResourceKey

__all__ = ["redis_server"]  # the fixture, for pytest

# A frozen or lost Redis is noticed within broker_timeout; clients are closed after
# broker_grace: both short, so that the faults play out in seconds (the grace is longer than
# the time to notice a freeze, so a send is refused before the clients are closed).
FAST = RelayConfig(broker_timeout=0.5, broker_grace=3.0)


async def test_two_relays_on_redis_push_the_same_stream(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_nodes(tmp_path, redis_server.url, config=FAST) as (a, b):
        on_a = await a.connect(authenticate=True)
        on_b = await b.connect(authenticate=True)
        sub_a = await on_a.subscribe("chat", "welcome")
        sub_b = await on_b.subscribe("chat", "welcome")
        assert (sub_a["epoch"], sub_a["seq"]) == (sub_b["epoch"], sub_b["seq"])
        await on_b.send_message("welcome", "from b")
        stream_a, stream_b = await agent_reply(on_a), await agent_reply(on_b)
        assert stream_a == stream_b
        assert [p["seq"] for p in stream_a] == list(
            range(sub_a["seq"] + 1, sub_a["seq"] + 1 + len(stream_a))
        )
        history = await a.backend.get_history("welcome")
        assert sum(m["role"] == "assistant" for m in history.items) == 2  # answered once


async def test_a_client_resumes_on_the_other_relay_and_across_a_restart(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_nodes(tmp_path, redis_server.url, config=FAST) as (a, b):
        client = await a.connect(authenticate=True)
        subscribed = await client.subscribe("chat", "welcome")
        await client.abort()
        sender = await a.connect(authenticate=True)
        await sender.subscribe("chat", "welcome")
        await sender.send_message("welcome", "while you were away")
        missed_pushes = await agent_reply(sender)
        back = await b.connect(authenticate=True)
        resumed = await back.subscribe(
            "chat", "welcome", since_seq=subscribed["seq"], epoch=subscribed["epoch"]
        )
        assert resumed.get("resumed") is True, resumed
        assert await back.next_pushes(len(missed_pushes)) == missed_pushes
    # Every relay restarted; the history is in Redis.
    async with open_nodes(tmp_path, redis_server.url, count=1, config=FAST) as (c,):
        again = await c.connect(authenticate=True)
        resumed = await again.subscribe(
            "chat", "welcome", since_seq=subscribed["seq"], epoch=subscribed["epoch"]
        )
        assert resumed.get("resumed") is True, resumed
        assert await again.next_pushes(len(missed_pushes)) == missed_pushes


async def test_redis_restarted_empty_closes_clients_to_a_reset(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_nodes(tmp_path, redis_server.url, config=FAST) as (a, b):
        client = await a.connect(authenticate=True)
        subscribed = await client.subscribe("chat", "welcome")
        redis_server.restart()
        code, _ = await client.wait_closed()
        assert code == CloseCode.SERVICE_RESTART
        await wait_until(lambda: b.relay.bus is not None and b.relay.bus.healthy)
        back = await b.connect(authenticate=True)
        resumed = await back.subscribe(
            "chat", "welcome", since_seq=subscribed["seq"], epoch=subscribed["epoch"]
        )
        assert resumed.get("reset") is True, resumed
        assert resumed["epoch"] != subscribed["epoch"]


async def test_a_frozen_redis_refuses_sends_then_serves_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_nodes(tmp_path, redis_server.url, count=1, config=FAST) as (node,):
        client = await node.connect(authenticate=True)
        await client.subscribe("chat", "welcome")
        bus = node.relay.bus
        assert bus is not None
        redis_server.freeze()
        try:
            await wait_until(lambda: not bus.healthy, within=5)
            assert node.relay._metrics_view().degraded == "broker unreachable"
            reply = await client.request(
                "send", resource="chat", resourceId="welcome", message="lost?"
            )
            assert reply["type"] == "error" and "broker" in reply["error"], reply
            # Past broker_grace the subscription's clients are told to come back: 1012.
            code, _ = await client.wait_closed()
            assert code == CloseCode.SERVICE_RESTART
        finally:
            redis_server.thaw()
        await wait_until(lambda: bus.healthy)
        again = await node.connect(authenticate=True)
        await again.subscribe("chat", "welcome")
        await again.send_message("welcome", "back")
        assert (await again.next_push())["data"]["message"]["content"] == "back"


async def test_a_send_is_answered_once_the_broker_numbered_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_nodes(tmp_path, redis_server.url, count=1, config=FAST) as (node,):
        bus = node.relay.bus
        assert isinstance(bus, RedisBus)
        chat = ResourceKey("chat", "welcome")
        start = await bus.head(chat)
        await node.relay.send("welcome", "numbered before the answer")
        # The answer alone says the message is on the bus (the agent's reply may still be
        # queued), so a relay that died now would lose nothing of it.
        events = await bus.read(chat, start.epoch, start.seq, start.seq + 1)
        assert events, "the message was not on the bus when send returned"
        assert events[0].data["message"]["content"] == "numbered before the answer"


async def test_a_reply_is_stopped_from_the_other_relay(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_nodes(tmp_path, redis_server.url, config=FAST, chunk_delay=0.2) as (a, b):
        on_a = await a.connect(authenticate=True)
        await on_a.subscribe("chat", "welcome")
        await on_a.send_message("welcome", "a long answer to stop")
        while (await on_a.next_push())["data"].get("type") != "chunk":
            pass  # the answer is streaming, on relay a
        on_b = await b.connect(authenticate=True)
        await on_b.subscribe("chat", "welcome")
        reply = await on_b.request("cancel", resource="chat", resourceId="welcome")
        assert reply["data"] == {"cancelled": False}, reply
        for client in (on_a, on_b):
            while (await client.next_push())["data"].get("type") != "cancelled":
                pass
            stored = await client.next_push()
            assert stored["data"]["message"]["content"].endswith("(stopped)")
