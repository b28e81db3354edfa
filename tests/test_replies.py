"""The reply runner (`trio_relay._store.replies`) on a fake store, in mock time.

What a chat's subscribers would see is what the fake store records: every event the runner
publishes and every reply it asks the store to keep (published as ``message``, as a real store
does), in order, on one channel the tests read.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from trio_relay._agents.agent import Agent, AgentError, Emit, HistoryItem
from trio_relay._agents.silent import SilentAgent
from trio_relay._store.backend import NotFound
from trio_relay._store.replies import (
    STOPPED_NOTE,
    Replies,
    ReplyJob,
    open_replies,
    reply_message_id,
)
from trio_relay._wire.protocol import JSON

Event = tuple[str, dict[str, Any]]


@attrs.define(eq=False)
class Scripted:
    """Emits ``pieces`` one per second, then fails with ``error`` or returns them joined."""

    pieces: Sequence[str] = ("Hel", "lo")
    error: BaseException | None = None
    started: list[str] = attrs.Factory(list)

    async def reply(self, content: str, emit: Emit) -> str:
        self.started.append(content)
        for piece in self.pieces:
            await trio.sleep(1)
            emit(piece)
        if self.error is not None:
            raise self.error
        return "".join(self.pieces)


@attrs.define(eq=False)
class WithHistory:
    """An agent that asks for the chat's history and answers with how long it was."""

    wants_history = True
    seen: list[Sequence[HistoryItem]] = attrs.Factory(list)

    async def reply(self, content: str, emit: Emit, history: Sequence[HistoryItem] = ()) -> str:
        self.seen.append(history)
        await trio.lowlevel.checkpoint()
        return f"{len(history)} earlier"


@attrs.define(eq=False)
class Canned(Scripted):
    """An agent of the host's that keeps something else under ``answers``."""

    answers: dict[str, str] = attrs.Factory(dict)


class FakeStore:
    """A `ChatStore` in memory: agents by profile, and every event in one channel."""

    def __init__(self, **agents: Agent) -> None:
        self.agents: dict[str, Agent] = dict(agents)
        self.history: list[HistoryItem] = [{"role": "user", "content": "before"}]
        self.history_reads = 0
        self.store_error: BaseException | None = None
        self.stored: list[tuple[str, str, str]] = []
        self.failed: list[ReplyJob] = []
        self._send, self.events = trio.open_memory_channel[Event](math.inf)

    def agent_for(self, model_profile_id: str) -> Agent:
        return self.agents[model_profile_id]

    def publish(self, chat_id: str, data: JSON) -> None:
        assert isinstance(data, dict)
        self._send.send_nowait((chat_id, data))

    async def earlier_messages(self, chat_id: str, message_id: str) -> Sequence[HistoryItem]:
        await trio.lowlevel.checkpoint()
        self.history_reads += 1
        return list(self.history)

    async def store_reply(self, job: ReplyJob, message_id: str, content: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.store_error is not None:
            raise self.store_error
        self.stored.append((job.chat_id, message_id, content))
        self.publish(job.chat_id, {"type": "message", "id": message_id, "content": content})

    async def reply_failed(self, job: ReplyJob) -> None:
        await trio.lowlevel.checkpoint()
        self.failed.append(job)

    async def next(self) -> Event:
        return await self.events.receive()

    async def types(self, count: int) -> list[str]:
        return [(await self.next())[1]["type"] for _ in range(count)]


def job(chat_id: str, content: str = "hi", profile: str = "p") -> ReplyJob:
    return ReplyJob(chat_id, content, profile, f"user-{content}")


@pytest.fixture
async def store() -> FakeStore:
    return FakeStore(p=Scripted())


@pytest.fixture
async def replies(store: FakeStore) -> AsyncIterator[Replies]:
    async with open_replies(store, store.publish) as replies:
        yield replies


async def test_a_reply_streams_then_is_stored(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    assert replies.queue(job("c1"))
    chat, started = await store.next()
    assert (chat, started["type"]) == ("c1", "reply_started")
    message_id = started["messageId"]
    # Derived from the user's message: any store can name this reply (an interrupted note).
    assert message_id == reply_message_id("user-hi") != reply_message_id("user-ho")
    assert len(message_id) == 32 and int(message_id, 16) >= 0
    chunks = [await store.next() for _ in range(2)]
    assert [data for _, data in chunks] == [
        {"type": "chunk", "messageId": message_id, "text": "Hel"},
        {"type": "chunk", "messageId": message_id, "text": "lo"},
    ]
    assert (await store.next())[1] == {"type": "message", "id": message_id, "content": "Hello"}
    await wait_all_tasks_blocked()
    assert not replies.active_chats  # nothing kept for an idle chat


async def test_one_reply_at_a_time_per_chat_and_chats_at_once(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    start = trio.current_time()
    for text in ("one", "two"):
        replies.queue(job("a", text))
    replies.queue(job("b", "three"))
    assert replies.active_chats == {"a", "b"}
    stored: list[tuple[str, str]] = []
    while len(stored) < 3:
        chat, data = await store.next()
        if data["type"] == "message":
            stored.append((chat, data["content"]))
    agent = store.agents["p"]
    assert isinstance(agent, Scripted)
    # b's reply did not wait for a's; a's second waited for its first.
    assert sorted(agent.started[:2]) == ["one", "three"] and agent.started[2] == "two"
    assert trio.current_time() - start == 4  # a's two replies, 2 s each, one after the other
    assert sorted(stored[:2]) == [("a", "Hello"), ("b", "Hello")] and stored[2][0] == "a"


async def test_cancel_stores_the_reply_as_far_as_it_got(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    store.agents["p"] = Scripted(pieces=("partial", " more", " never"))
    replies.queue(job("c1", "first"))
    replies.queue(job("c1", "second"))
    assert not replies.cancel("other")  # nothing runs there
    _, started = await store.next()
    assert (await store.next())[1]["text"] == "partial"
    assert replies.cancel("c1")
    message_id = started["messageId"]
    assert (await store.next())[1] == {"type": "cancelled", "messageId": message_id}
    assert (await store.next())[1] == {
        "type": "message", "id": message_id, "content": f"partial\n\n{STOPPED_NOTE}"}
    # The message queued behind it still gets its answer.
    _, next_started = await store.next()
    assert next_started["type"] == "reply_started"
    assert next_started["messageId"] != message_id


async def test_a_reply_stopped_before_its_first_piece_stores_only_the_note(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    replies.queue(job("c1"))
    _, started = await store.next()
    assert replies.cancel("c1")
    assert await store.types(2) == ["cancelled", "message"]
    assert store.stored == [("c1", started["messageId"], STOPPED_NOTE)]
    await wait_all_tasks_blocked()
    assert not replies.cancel("c1")  # stopped and stored: nothing runs any more


async def test_forget_drops_a_deleted_chats_replies_silently(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    replies.queue(job("gone", "one"))
    replies.queue(job("gone", "two"))
    assert (await store.next())[1]["type"] == "reply_started"
    replies.forget("gone")
    replies.queue(job("kept"))
    # No `cancelled`, nothing stored, and the queued reply never starts.
    assert [chat for chat, _ in [await store.next() for _ in range(4)]] == ["kept"] * 4
    assert [chat for chat, _, _ in store.stored] == ["kept"]
    await wait_all_tasks_blocked()
    assert not replies.active_chats


@pytest.mark.parametrize(
    ("error", "told"),
    [
        (AgentError("agent exited with status 1", "p: 'x' exited with status 1"),
         "agent exited with status 1"),
        (RuntimeError("the model fell over"), "agent failed"),
    ],
)
async def test_a_failing_agent_is_reported_and_nothing_is_stored(
    autojump_clock: MockClock, store: FakeStore, replies: Replies, error: Exception, told: str
) -> None:
    store.agents["p"] = Scripted(pieces=("half",), error=error)
    replies.queue(job("c1"))
    _, started = await store.next()
    assert (await store.next())[1]["type"] == "chunk"  # what streamed has reached the chat
    assert (await store.next())[1] == {
        "type": "error", "messageId": started["messageId"], "error": told}
    await wait_all_tasks_blocked()
    assert store.stored == []
    assert store.failed == [job("c1")]  # the store closes the job (PostgreSQL's lease)


async def test_a_reply_that_cannot_be_stored_is_reported(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    store.store_error = OSError("disk full")
    replies.queue(job("c1"))
    assert await store.types(4) == ["reply_started", "chunk", "chunk", "error"]
    await wait_all_tasks_blocked()
    assert store.failed == [job("c1")]
    store.store_error = NotFound("chat 'c1' not found")  # deleted meanwhile: nothing to tell
    replies.queue(job("c1"))
    assert await store.types(3) == ["reply_started", "chunk", "chunk"]
    await wait_all_tasks_blocked()
    assert store.events.statistics().current_buffer_used == 0
    assert store.failed == [job("c1")]  # a deleted chat's job went with it


async def test_an_agent_that_does_not_answer_gets_no_reply(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    store.agents["quiet"] = SilentAgent()
    assert not replies.queue(job("c1", profile="quiet"))
    assert not replies.active_chats
    await wait_all_tasks_blocked()
    assert store.events.statistics().current_buffer_used == 0


async def test_only_an_answers_of_false_silences_an_agent(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    # A host's agent may hold anything under that name: only False means "never answers".
    store.agents["p"] = Canned()
    assert replies.queue(job("c1"))
    assert await store.types(4) == ["reply_started", "chunk", "chunk", "message"]


async def test_history_is_read_only_for_an_agent_that_wants_it(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    replies.queue(job("c1"))
    await store.types(4)
    assert store.history_reads == 0
    store.agents["p"] = agent = WithHistory()
    replies.queue(job("c1"))
    assert await store.types(2) == ["reply_started", "message"]
    assert store.history_reads == 1
    assert agent.seen == [store.history]
    assert store.stored[-1][2] == "1 earlier"


async def test_the_agent_is_the_one_configured_when_the_reply_starts(
    autojump_clock: MockClock, store: FakeStore, replies: Replies
) -> None:
    replies.queue(job("c1", "first"))
    replies.queue(job("c1", "second"))
    assert (await store.next())[1]["type"] == "reply_started"
    store.agents["p"] = Scripted(pieces=("new",))  # the running reply keeps its agent
    contents: list[str] = []
    while len(contents) < 2:
        _, data = await store.next()
        if data["type"] == "message":
            contents.append(data["content"])
    assert contents == ["Hello", "new"]


async def test_leaving_stops_the_replies_and_an_error_comes_out_as_itself(
    autojump_clock: MockClock, store: FakeStore
) -> None:
    with pytest.raises(KeyError) as info:
        async with open_replies(store, store.publish) as replies:
            replies.queue(job("c1"))
            assert (await store.next())[1]["type"] == "reply_started"
            raise KeyError("mine")
    assert info.value.__context__ is None  # not chained to the nursery's group
    await wait_all_tasks_blocked()
    # Stopped by the shutdown, not by a cancel: no `cancelled`, nothing stored.
    assert store.stored == []
    assert store.events.statistics().current_buffer_used == 0
