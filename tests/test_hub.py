"""`ChangeHub`: versioned, bounded, never-blocking in-process change feeds."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from trio_relay._store.backend import Change
from trio_relay._store.hub import ChangeHub, FeedOverflow
from trio_relay._wire.protocol import ResourceKey

KEY = ResourceKey("chat", "c1")


async def collect(feed: AsyncIterator[Change], into: list[Change], n: int | None = None) -> None:
    async for change in feed:
        into.append(change)
        if n is not None and len(into) == n:
            return


async def test_versions_count_up_by_one_per_publish() -> None:
    hub = ChangeHub()
    assert hub.version(KEY) == 0
    async with hub.open_feed(KEY) as feed:
        assert hub.version(KEY) == 0
        published = [hub.publish(KEY, {"n": n}) for n in range(5)]
        assert [c.version for c in published] == [1, 2, 3, 4, 5]
        assert hub.version(KEY) == 5
        received: list[Change] = []
        await collect(feed, received, 5)
        assert received == published
        assert received == [Change({"n": n}, n + 1) for n in range(5)]
        change = hub.publish(KEY, "six")
        assert change == Change("six", 6)
        assert hub.version(KEY) == change.version


async def test_keys_have_their_own_versions() -> None:
    hub = ChangeHub()
    other = ResourceKey("project", "p1")
    async with hub.open_feed(KEY) as chat_feed, hub.open_feed(other) as project_feed:
        hub.publish(KEY, "a")
        hub.publish(KEY, "b")
        hub.publish(other, "x")
        assert hub.version(KEY) == 2
        assert hub.version(other) == 1
        chat: list[Change] = []
        project: list[Change] = []
        await collect(chat_feed, chat, 2)
        await collect(project_feed, project, 1)
        assert chat == [Change("a", 1), Change("b", 2)]
        assert project == [Change("x", 1)]


async def test_publish_with_no_watcher_does_not_raise() -> None:
    hub = ChangeHub()
    change = hub.publish(KEY, "nobody listens")
    assert change.data == "nobody listens"
    # Still counted: a relay watching later can tell that something happened meanwhile.
    assert hub.version(KEY) == change.version == 1
    assert hub.watching(KEY) == 0
    # A feed opened afterwards does not see it.
    async with hub.open_feed(KEY) as feed:
        hub.publish(KEY, "now someone does")
        received: list[Change] = []
        await collect(feed, received, 1)
        assert received == [Change("now someone does", 2)]


async def test_two_feeds_on_one_key_both_get_every_change_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = ChangeHub(feed_buffer=8)
    n = 200
    first: list[Change] = []
    second: list[Change] = []
    with trio.fail_after(60):
        async with hub.open_feed(KEY) as feed_a, hub.open_feed(KEY) as feed_b:
            assert hub.watching(KEY) == 2
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, feed_a, first, n)
                nursery.start_soon(collect, feed_b, second, n)
                for i in range(n):
                    hub.publish(KEY, i)
                    if i % 5 == 4:  # let the readers keep up with the small buffers
                        await trio.testing.wait_all_tasks_blocked()
    expected = [Change(i, i + 1) for i in range(n)]
    assert first == expected
    assert second == expected


async def test_closing_a_feed_stops_its_delivery_and_versions_go_on() -> None:
    hub = ChangeHub()
    async with hub.open_feed(KEY) as staying:
        async with hub.open_feed(KEY) as leaving:
            assert hub.watching(KEY) == 2
            hub.publish(KEY, "both")
            got: list[Change] = []
            await collect(leaving, got, 1)
            assert got == [Change("both", 1)]
        assert hub.watching(KEY) == 1
        hub.publish(KEY, "one")  # the closed feed is simply skipped
        got = []
        await collect(staying, got, 2)
        assert got == [Change("both", 1), Change("one", 2)]
    assert hub.watching(KEY) == 0
    # Versions go on counting with nobody watching, so continuity can be judged later.
    assert hub.version(KEY) == 2
    hub.publish(KEY, "after")  # no watcher: fine, and counted
    async with hub.open_feed(KEY) as again:
        assert hub.publish(KEY, "fresh") == Change("fresh", 4)
        got = []
        await collect(again, got, 1)
        assert got == [Change("fresh", 4)]


async def test_a_feed_closed_with_unread_changes_is_freed() -> None:
    hub = ChangeHub()
    async with hub.open_feed(KEY):
        for i in range(10):
            hub.publish(KEY, i)
    assert hub.watching(KEY) == 0
    hub.publish(KEY, "later")


async def test_overflow_delivers_what_it_holds_then_raises(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = ChangeHub(feed_buffer=3)
    with trio.fail_after(10):
        async with hub.open_feed(KEY) as slow, hub.open_feed(KEY) as fast:
            fast_got: list[Change] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, fast, fast_got, 10)
                start = trio.current_time()
                for i in range(10):
                    hub.publish(KEY, i)  # never blocks, however far behind ``slow`` is
                    await trio.testing.wait_all_tasks_blocked()
                assert trio.current_time() == start
            # The reader that kept up got everything; the slow one is unaffected until read.
            assert fast_got == [Change(i, i + 1) for i in range(10)]
            assert hub.version(KEY) == 10
            hub.publish(KEY, "more")  # publishing past an overflowed feed is still fine
            slow_got: list[Change] = []
            with pytest.raises(FeedOverflow):
                await collect(slow, slow_got)
            assert slow_got == [Change(0, 1), Change(1, 2), Change(2, 3)]
            # Once overflowed, it stays failed.
            with pytest.raises(FeedOverflow):
                await slow.__anext__()
    assert hub.watching(KEY) == 0


async def test_overflow_wakes_a_waiting_reader_only_after_the_buffer(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = ChangeHub(feed_buffer=2)
    async with hub.open_feed(KEY) as feed:
        for i in range(2):
            hub.publish(KEY, i)
        # Exactly full is not an overflow.
        got: list[Change] = []
        await collect(feed, got, 2)
        assert got == [Change(0, 1), Change(1, 2)]
        for i in range(3):
            hub.publish(KEY, i)
        got = []
        with pytest.raises(FeedOverflow, match="2"):
            await collect(feed, got)
        assert [c.version for c in got] == [3, 4]


async def test_end_completes_feeds_after_what_they_hold() -> None:
    hub = ChangeHub()
    async with hub.open_feed(KEY) as feed_a, hub.open_feed(KEY) as feed_b:
        hub.publish(KEY, "a")
        hub.publish(KEY, "b")
        hub.end(KEY)
        assert [c async for c in feed_a] == [Change("a", 1), Change("b", 2)]
        assert [c async for c in feed_b] == [Change("a", 1), Change("b", 2)]
        # An ended feed stays ended.
        assert [c async for c in feed_a] == []


async def test_end_wakes_a_waiting_reader(autojump_clock: trio.abc.Clock) -> None:
    hub = ChangeHub()
    got: list[Change] = []
    with trio.fail_after(10):
        async with hub.open_feed(KEY) as feed, trio.open_nursery() as nursery:
            nursery.start_soon(collect, feed, got)
            await trio.testing.wait_all_tasks_blocked()
            hub.publish(KEY, "x")
            await trio.testing.wait_all_tasks_blocked()  # the reader took it, and waits again
            hub.end(KEY)
    assert got == [Change("x", 1)]


async def test_end_with_error_raises_it_after_the_buffered_changes() -> None:
    hub = ChangeHub()
    failure = RuntimeError("upstream failed")
    async with hub.open_feed(KEY) as feed:
        hub.publish(KEY, 1)
        hub.publish(KEY, 2)
        hub.end(KEY, failure)
        got: list[Change] = []
        with pytest.raises(RuntimeError) as info:
            await collect(feed, got)
        assert info.value is failure
        assert got == [Change(1, 1), Change(2, 2)]


async def test_end_only_touches_its_key() -> None:
    hub = ChangeHub()
    other = ResourceKey("chat", "c2")
    hub.end(KEY)  # nothing open: nothing happens
    async with hub.open_feed(KEY) as feed, hub.open_feed(other) as other_feed:
        hub.end(other)
        hub.publish(KEY, "still live")
        got: list[Change] = []
        await collect(feed, got, 1)
        assert got == [Change("still live", 1)]
        assert [c async for c in other_feed] == []


async def test_publish_after_end_does_not_raise() -> None:
    # A backend may end a resource's feeds and change it again before every reader has left
    # its feed (the broadcaster closes the feed only when it next runs). `publish` must
    # neither raise into the backend nor keep the change from feeds opened since.
    hub = ChangeHub()
    async with hub.open_feed(KEY) as ended:
        hub.publish(KEY, "before")
        hub.end(KEY)
        hub.publish(KEY, "after")
        async with hub.open_feed(KEY) as newer:
            hub.publish(KEY, "for the newer feed")
            got: list[Change] = []
            await collect(newer, got, 1)
            assert got[0].data == "for the newer feed"
        assert [c.data async for c in ended] == ["before"]
