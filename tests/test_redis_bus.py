"""The bus on a real Redis (`trio_relay._stream.redis_bus`): numbering across nodes, batching,
replay bounds, gap repair, and what each Redis fault looks like (killed, restarted empty,
frozen, unreachable at start).

Each test starts its own `redis-server` (tests/_redis.py); two `RedisBus` in one `trio.run`
stand for two relay nodes. Timeouts are short so that the faults are met quickly; what another
process does (a server frozen or killed) sends no event here, so it is polled, bounded.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
from _helpers import wait_until
from _redis import RedisServer, find_redis_server, free_port, redis_server
from coredis.retry import NoRetryPolicy

from trio_relay._stream.bus import Bus, BusError, BusEvent, EpochChanged, Position
from trio_relay._stream.redis_bus import PUBLISH_LUA, RedisBus, open_redis_bus, redacted_url
from trio_relay._wire.protocol import ResourceKey

__all__ = ["redis_server"]  # the fixture, for pytest

CHAT = ResourceKey("chat", "c1")
OTHER = ResourceKey("chat", "c2")
FAST: dict[str, Any] = {"timeout": 0.5, "grace": 3.0}


@asynccontextmanager
async def raw(server: RedisServer) -> AsyncIterator[coredis.Redis[bytes]]:
    """A plain client, to look at or meddle with what the bus keeps."""
    client = coredis.Redis.from_url(server.url, retry_policy=NoRetryPolicy())
    async with client:
        yield client


async def take(events: AsyncIterator[BusEvent], count: int, within: float = 5.0) -> list[BusEvent]:
    found = []
    with trio.fail_after(within):
        for _ in range(count):
            found.append(await events.__anext__())
    return found


def as_bus(bus: RedisBus) -> Bus:
    return bus  # mypy checks that a RedisBus is a Bus


async def evalsha_calls(client: coredis.Redis[bytes]) -> int:
    stats = await client.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    return int(entry["calls"]) if isinstance(entry, dict) else 0


# --- numbering and fan-out ----------------------------------------------------------------


async def test_two_nodes_number_one_resource_once(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url) as a, open_redis_bus(redis_server.url) as b:
        assert as_bus(a).healthy
        start = await a.head(CHAT)
        assert start.seq == 0 and start == await b.head(CHAT)
        async with a.follow(CHAT, start) as on_a, b.follow(CHAT, start) as on_b:
            for i in range(40):
                # forward() on one node, publish() on the other, interleaved.
                a.forward(CHAT, {"from": "a", "i": i})
                await b.publish(CHAT, {"from": "b", "i": i})
            seen_a = await take(on_a, 80)
            seen_b = await take(on_b, 80)
        assert seen_a == seen_b
        assert [event.seq for event in seen_a] == list(range(1, 81))
        # Each node's own changes keep their order.
        for node in "ab":
            assert [e.data["i"] for e in seen_a if e.data["from"] == node] == list(range(40))
        assert (await b.head(CHAT)).seq == 80


async def test_forwarded_changes_go_in_batches(redis_server: RedisServer) -> None:
    async with raw(redis_server) as client, open_redis_bus(
            redis_server.url, batch_size=100) as bus:
        start = await bus.head(CHAT)
        await bus.read(CHAT, start.epoch, 0, 0)  # each script's first call loads it
        before = await evalsha_calls(client)
        async with bus.follow(CHAT, start) as events:
            for i in range(1000):
                bus.forward(CHAT if i % 2 else OTHER, i)
            await bus.flush()
            # 1000 changes for two resources in batches of 100: ten script calls, one each.
            assert await evalsha_calls(client) - before == 10
            seen = await take(events, 500)
        assert [e.data for e in seen] == list(range(1, 1000, 2))
        assert [e.seq for e in seen] == list(range(1, 501))
        assert (await bus.head(OTHER)).seq == 500


async def test_bad_data_fails_its_sender_not_the_batch(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url) as bus:
        with pytest.raises(ValueError):
            bus.forward(CHAT, math.nan)
        with pytest.raises(TypeError):
            bus.forward(CHAT, {"when": trio})
        with pytest.raises(UnicodeEncodeError):
            bus.forward(CHAT, "\ud800")
        bus.forward(CHAT, "fine")
        await bus.flush()
        assert (await bus.head(CHAT)).seq == 1


# --- replay ----------------------------------------------------------------------------------


async def test_read_gives_the_kept_events_or_none(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url, replay_size=10) as bus:
        for i in range(30):
            last = await bus.publish(CHAT, {"i": i})
        assert last.seq == 30
        kept = await bus.read(CHAT, last.epoch, 25, 30)
        assert kept == [BusEvent(seq, {"i": seq - 1}) for seq in range(26, 31)]
        assert await bus.read(CHAT, last.epoch, 20, 30) == [
            BusEvent(seq, {"i": seq - 1}) for seq in range(21, 31)]
        assert await bus.read(CHAT, last.epoch, 30, 30) == []
        # Past the replay size (whatever the trimming left), another epoch, a future seq.
        assert await bus.read(CHAT, last.epoch, 19, 30) is None
        assert await bus.read(CHAT, last.epoch, 0, 5) is None
        assert await bus.read(CHAT, "another", 25, 30) is None
        assert await bus.read(CHAT, last.epoch, 25, 31) is None
        assert await bus.read(OTHER, last.epoch, 0, 0) is None


async def test_read_refuses_events_older_than_the_max_age(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url, replay_max_age=0.2) as bus:
        first = await bus.publish(CHAT, "old")
        assert await bus.read(CHAT, first.epoch, 0, 1) == [BusEvent(1, "old")]
        # Time in Redis passes on its own: poll until the entry is too old, bounded.
        with trio.fail_after(5):
            while await bus.read(CHAT, first.epoch, 0, 1) is not None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        second = await bus.publish(CHAT, "new")
        assert await bus.read(CHAT, first.epoch, 1, 2) == [BusEvent(2, "new")]
        assert second == Position(first.epoch, 2)


# --- following -------------------------------------------------------------------------------


async def test_a_follower_that_starts_behind_catches_up(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url) as bus:
        for i in range(1, 6):
            epoch = (await bus.publish(CHAT, i)).epoch
        async with bus.follow(CHAT, Position(epoch, 2)) as events:
            assert [e.seq for e in await take(events, 3)] == [3, 4, 5]
            await bus.publish(CHAT, 6)
            assert await take(events, 1) == [BusEvent(6, 6)]


async def test_a_gap_on_the_live_channel_is_filled_from_the_stream(
    redis_server: RedisServer,
) -> None:
    async with raw(redis_server) as client, open_redis_bus(redis_server.url) as bus:
        start = await bus.head(CHAT)
        async with bus.follow(CHAT, start) as events:
            await bus.publish(CHAT, "one")
            assert await take(events, 1) == [BusEvent(1, "one")]
            # Seq 2 reaches the Stream but its live message is lost: the same script, told to
            # publish it on a channel nobody hears.
            base = "trio-relay:{chat:c1}"
            await client.eval(
                PUBLISH_LUA, [f"{base}:meta", f"{base}:stream", f"{base}:w:x"],
                ["1024", "120000", "", "1000", "nowhere", "e", "0", "1", '"two"'])
            await bus.publish(CHAT, "three")
            assert await take(events, 2) == [BusEvent(2, "two"), BusEvent(3, "three")]


async def test_repeats_on_the_live_channel_are_dropped(redis_server: RedisServer) -> None:
    async with raw(redis_server) as client, open_redis_bus(redis_server.url) as bus:
        start = await bus.head(CHAT)
        async with bus.follow(CHAT, start) as events:
            await bus.publish(CHAT, "one")
            await bus.publish(CHAT, "two")
            assert [e.data for e in await take(events, 2)] == ["one", "two"]
            channel = "trio-relay:{chat:c1}:live"
            await client.publish(channel, f'{start.epoch} 1 ["one","two"]')
            await client.publish(channel, f'{start.epoch} 2 ["two"]')
            await bus.publish(CHAT, "three")
            assert await take(events, 1) == [BusEvent(3, "three")]


async def test_an_unknown_epoch_at_the_start_is_refused(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url) as bus:
        await bus.publish(CHAT, "one")
        async with bus.follow(CHAT, Position("gone", 0)) as events:
            with pytest.raises(EpochChanged):
                await take(events, 1)


async def pubsub_clients(client: coredis.Redis[bytes]) -> int:
    listed = await client.client_list(type_=coredis.PureToken.PUBSUB)
    return len(listed)


async def test_one_pubsub_connection_serves_every_followed_resource(
    redis_server: RedisServer,
) -> None:
    keys = [ResourceKey("chat", f"c{i}") for i in range(5)]
    async with raw(redis_server) as client, open_redis_bus(redis_server.url) as bus:
        starts = [await bus.head(key) for key in keys]
        async with AsyncExitStack() as stack:
            followed = [await stack.enter_async_context(bus.follow(key, start))
                        for key, start in zip(keys, starts, strict=True)]
            assert await pubsub_clients(client) == 1
            for key in keys:
                await bus.publish(key, str(key))
            for key, events in zip(keys, followed, strict=True):
                assert await take(events, 1) == [BusEvent(1, str(key))]
            numbers = await client.pubsub_numsub(*[f"trio-relay:{{{k}}}:live" for k in keys])
            assert set(numbers.values()) == {1}
        # Leaving unsubscribes.
        numbers = await client.pubsub_numsub(*[f"trio-relay:{{{k}}}:live" for k in keys])
        assert set(numbers.values()) == {0}


async def test_a_lost_pubsub_connection_is_replaced_and_repaired(
    redis_server: RedisServer,
) -> None:
    async with raw(redis_server) as client, open_redis_bus(
            redis_server.url, **FAST) as bus, open_redis_bus(redis_server.url, **FAST) as other:
        start = await bus.publish(CHAT, 1)
        async with bus.follow(CHAT, start) as events:
            assert await client.client_kill(type_=coredis.PureToken.PUBSUB) == 1
            # Published while the follower's node has no subscription, or has it again.
            for i in range(2, 12):
                await other.publish(CHAT, i)
            assert [e.data for e in await take(events, 10)] == list(range(2, 12))
            await other.publish(CHAT, 12)
            assert await take(events, 1) == [BusEvent(12, 12)]
        assert bus.healthy


async def test_logs_name_the_redis_never_its_password(
    tmp_path_factory: pytest.TempPathFactory, records: list[Any],
) -> None:
    server = RedisServer(find_redis_server(), tmp_path_factory.mktemp("redis"), "s3cret-pw")
    server.start()
    try:
        async with open_redis_bus(server.url, timeout=0.3, grace=0.5) as bus:
            start = await bus.publish(CHAT, 1)
            async with bus.follow(CHAT, start) as events:
                server.kill()
                with pytest.raises(BusError) as caught, trio.fail_after(5):
                    await events.__anext__()
            assert "s3cret" not in str(caught.value)
            await wait_until(lambda: not bus.healthy)
            server.start()
            await wait_until(lambda: bus.healthy)
    finally:
        server.kill()
    where = f"redis://127.0.0.1:{server.port}/0"
    assert all("s3cret" not in str(record) for record in records)
    warnings = [r for r in records if r["level"].name == "WARNING"]
    assert any("unreachable" in r["message"] for r in warnings)
    assert all(r["extra"].get("broker") == where for r in warnings)


async def test_a_script_flushed_from_redis_is_loaded_again(redis_server: RedisServer) -> None:
    async with raw(redis_server) as client, open_redis_bus(redis_server.url) as bus:
        await bus.publish(CHAT, 1)
        await client.script_flush()
        assert (await bus.publish(CHAT, 2)).seq == 2


# --- faults ----------------------------------------------------------------------------------


async def test_unreachable_at_start_is_one_clear_error() -> None:
    port = free_port()
    with pytest.raises(BusError) as caught:
        async with open_redis_bus(f"redis://someone:hunter2@127.0.0.1:{port}/3", timeout=1):
            pass  # pragma: no cover
    assert type(caught.value) is BusError
    message = str(caught.value)
    assert message.startswith(f"cannot reach Redis at redis://127.0.0.1:{port}/3: ")
    assert "refused" in message
    assert "hunter2" not in message and "someone" not in message


async def test_a_frozen_redis_at_start_is_one_clear_error(redis_server: RedisServer) -> None:
    redis_server.freeze()
    with pytest.raises(BusError) as caught, trio.fail_after(2):
        async with open_redis_bus(redis_server.url, timeout=0.3):
            pass  # pragma: no cover
    assert type(caught.value) is BusError
    assert str(caught.value) == (
        f"cannot reach Redis at redis://127.0.0.1:{redis_server.port}/0: "
        "no answer within 0.3s")


async def test_errors_of_the_body_come_out_as_themselves(redis_server: RedisServer) -> None:
    with pytest.raises(KeyError):
        async with open_redis_bus(redis_server.url):
            raise KeyError("mine")


def test_without_redis_server_the_tests_skip_except_on_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        find_redis_server()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have it"):
        find_redis_server()


def test_urls_are_shown_without_credentials() -> None:
    assert redacted_url("redis://u:p@h:1/2") == "redis://h:1/2"
    assert redacted_url("rediss://:p@h") == "rediss://h:6379/0"
    assert redacted_url("redis://h?db=4&password=p") == "redis://h:6379/4"
    assert redacted_url("unix:///run/redis.sock?password=p") == "unix:///run/redis.sock"


async def test_bad_settings_are_refused(redis_server: RedisServer) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("http://127.0.0.1/", {}),
        (redis_server.url, {"prefix": "a{b}"}),
        (redis_server.url, {"replay_size": 0}),
        (redis_server.url, {"timeout": 0}),
        (redis_server.url, {"grace": -1}),
    ]
    for url, settings in cases:
        with pytest.raises(ValueError):
            async with open_redis_bus(url, **settings):
                pass  # pragma: no cover


async def test_redis_restarted_empty_means_a_new_epoch(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url, **FAST) as bus:
        old = await bus.publish(CHAT, "before")
        async with bus.follow(CHAT, old) as events:
            redis_server.restart()
            with pytest.raises(EpochChanged), trio.fail_after(5):
                await events.__anext__()
        await wait_until(lambda: bus.healthy)
        new = await bus.head(CHAT)
        assert new.epoch != old.epoch and new.seq == 0
        assert await bus.read(CHAT, old.epoch, 0, 1) is None


async def test_redis_killed_then_back_resumes_and_repairs(redis_server: RedisServer) -> None:
    async with raw(redis_server) as client, open_redis_bus(
            redis_server.url, **FAST) as bus, open_redis_bus(redis_server.url, **FAST) as other:
        start = await bus.publish(CHAT, 1)
        async with bus.follow(CHAT, start) as events:
            await client.save()  # what Redis keeps of its data across the crash
            redis_server.kill()
            await wait_until(lambda: not bus.healthy)
            with pytest.raises(BusError):
                await bus.publish(CHAT, "lost")
            bus.forward(CHAT, 2)  # kept while Redis is away
            redis_server.start(keep_data=True)
            await wait_until(lambda: bus.healthy)
            # Published by the other node while this one may not be subscribed yet.
            await other.publish(CHAT, 3)
            await bus.flush()
            await other.publish(CHAT, 4)
            seen = await take(events, 3)
        assert sorted(e.data for e in seen) == [2, 3, 4]
        assert [e.seq for e in seen] == [2, 3, 4]
        assert (await bus.head(CHAT)) == Position(start.epoch, 4)


async def test_frozen_redis_is_detected_by_the_timeout(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url, timeout=0.5, grace=10) as bus:
        start = await bus.publish(CHAT, 1)
        async with bus.follow(CHAT, start) as events:
            redis_server.freeze()
            before = trio.current_time()
            with pytest.raises(BusError, match="did not answer"):
                await bus.head(CHAT)
            assert trio.current_time() - before < 1.0
            await wait_until(lambda: not bus.healthy, within=2)
            for i in range(2, 6):
                bus.forward(CHAT, i)  # retried until Redis answers, each published once
            redis_server.thaw()
            await wait_until(lambda: bus.healthy)
            await bus.flush()
            assert [e.data for e in await take(events, 4)] == [2, 3, 4, 5]
        assert await bus.head(CHAT) == Position(start.epoch, 5)


async def test_a_batch_retried_after_a_lost_answer_is_published_once(
    redis_server: RedisServer, records: list[Any],
) -> None:
    async with open_redis_bus(redis_server.url, timeout=0.3, grace=10) as bus:
        start = await bus.publish(CHAT, 0)
        async with bus.follow(CHAT, start) as events:
            redis_server.freeze()
            bus.forward(CHAT, 1)  # its script call waits in the frozen Redis's socket
            await wait_until(lambda: any("failed, retrying" in r["message"] for r in records))
            redis_server.thaw()  # runs that first call, whose answer nobody awaits any more
            await bus.flush()
            bus.forward(CHAT, 2)
            assert await take(events, 2) == [BusEvent(2, 1), BusEvent(3, 2)]
        assert await bus.head(CHAT) == Position(start.epoch, 3)


async def test_a_slow_follower_catches_up_from_the_stream(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("trio_relay._stream.redis_bus.FOLLOWER_QUEUE", 3)
    async with open_redis_bus(redis_server.url) as bus:
        start = await bus.head(CHAT)
        async with bus.follow(CHAT, start) as events:
            assert await take(events, 0) == []
            for i in range(1, 11):
                await bus.publish(CHAT, i)  # ten live messages; three are kept
            assert [e.data for e in await take(events, 10)] == list(range(1, 11))
            await bus.publish(CHAT, 11)
            assert await take(events, 1) == [BusEvent(11, 11)]


async def test_followers_fail_after_the_grace(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url, timeout=0.3, grace=0.6) as bus:
        start = await bus.head(CHAT)
        async with bus.follow(CHAT, start) as events:
            redis_server.freeze()
            with pytest.raises(BusError, match="unreachable for more than"), trio.fail_after(5):
                await events.__anext__()
        redis_server.thaw()
        # Redis back: the same bus serves again, no restart.
        await wait_until(lambda: bus.healthy)
        again = await bus.head(CHAT)
        async with bus.follow(CHAT, again) as events:
            await bus.publish(CHAT, "back")
            assert await take(events, 1) == [BusEvent(again.seq + 1, "back")]


async def test_a_backlog_too_long_starts_a_new_epoch(redis_server: RedisServer) -> None:
    async with open_redis_bus(redis_server.url, max_backlog=5) as bus:
        old = await bus.publish(CHAT, 0)
        async with bus.follow(CHAT, old) as events:
            # Ten changes at once, the bus keeps five: the resource's history is broken.
            for i in range(1, 11):
                bus.forward(CHAT, i)
            await bus.flush()
            with pytest.raises(EpochChanged), trio.fail_after(5):
                await events.__anext__()
        new = await bus.head(CHAT)
        assert new.epoch != old.epoch and new.seq == 5
        assert [e.data for e in await bus.read(CHAT, new.epoch, 0, 5) or []] == [6, 7, 8, 9, 10]


async def test_a_resource_whose_changes_were_all_dropped_still_moves_on(
    redis_server: RedisServer,
) -> None:
    async with open_redis_bus(redis_server.url, max_backlog=5) as bus:
        old = await bus.publish(CHAT, 0)
        bus.forward(CHAT, 1)
        for i in range(5):
            bus.forward(OTHER, i)  # pushes CHAT's only change out
        await bus.flush()
        new = await bus.head(CHAT)
        assert new.epoch != old.epoch and new.seq == 0
