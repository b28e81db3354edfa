"""The built-in stores: storage, seeding, the echo agent's streamed replies, and exact feeds.

Every test that takes ``backend`` or ``open_store`` runs against both stores, SQLite and
PostgreSQL (a real server, tests/_postgres.py); the ones on ``sqlite_backend`` or
``open_sqlite_backend`` are about SQLite's own machinery. PostgreSQL's own behaviour (leases,
the outbox, faults) is in test_postgres.py.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from _helpers import OpenStore, Store, wait_until
from trio.testing import MockClock, wait_all_tasks_blocked

from trio_relay._agents.echo import EchoAgent
from trio_relay._agents.silent import SilentAgent
from trio_relay._store import sqlite, sqlite_schema, sqlite_sql
from trio_relay._store.backend import Backend, BackendError, Change, NotFound
from trio_relay._store.sqlite import (
    DATABASE_NAME,
    SqliteBackend,
    open_sqlite_backend,
)

SEEDED_PROFILES = [
    {"id": "echo", "name": "Echo", "agent": "echo"},
    {"id": "echo-fast", "name": "Echo (fast)", "agent": "echo"},
    {"id": "echo-slow", "name": "Echo (slow)", "agent": "echo"},
]


@pytest.fixture
async def backend(open_store: OpenStore) -> AsyncIterator[Store]:
    async with open_store() as backend:
        yield backend


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    async with open_sqlite_backend(tmp_path / "data") as backend:
        yield backend


def is_timestamp(value: object) -> bool:
    # Python 3.10's fromisoformat does not read "Z".
    assert isinstance(value, str) and value.endswith("Z")
    return datetime.fromisoformat(value[:-1] + "+00:00").tzinfo is not None


def is_new_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 32 and int(value, 16) >= 0


def is_final(change: Change) -> bool:
    data = change.data
    return bool(data["type"] == "message" and data["message"]["role"] == "assistant")


async def read_until(feed: AsyncIterator[Change], done: int = 1) -> list[Change]:
    """Changes up to and including the ``done``-th stored reply or agent error."""
    changes: list[Change] = []
    async for change in feed:
        changes.append(change)
        if is_final(change) or change.data["type"] == "error":
            done -= 1
            if done == 0:
                break
    return changes


def types(changes: list[Change]) -> list[str]:
    return [c.data["type"] for c in changes]


def all_tasks() -> list[trio.lowlevel.Task]:
    tasks: list[trio.lowlevel.Task] = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        assert task is not None
        tasks.append(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


# --- opening, seeding, re-opening ----------------------------------------------------------


async def test_fresh_database_is_seeded(tmp_path: Path, autojump_clock: MockClock) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    async with open_sqlite_backend(data_dir) as backend:
        assert isinstance(backend, Backend)
        projects = await backend.list_projects()
        assert [{k: p[k] for k in ("id", "name")} for p in projects] == [
            {"id": "demo", "name": "Demo project"}
        ]
        chats = (await backend.list_chats("demo")).items
        assert len(chats) == 1
        assert chats[0]["id"] == "welcome"
        assert chats[0]["title"] == "Welcome"
        history = (await backend.get_history("welcome")).items
        assert len(history) == 1
        assert history[0]["role"] == "assistant"
        assert "Welcome" in history[0]["content"] and "type" in history[0]["content"].lower()
        profiles = await backend.get_model_profiles()
        assert profiles.items == SEEDED_PROFILES == list(sqlite_schema.SEED_MODEL_PROFILES)
        assert profiles.version == 0
    path = data_dir / DATABASE_NAME
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert {"projects", "chats", "messages", "model_profiles"} <= tables


async def test_reopen_keeps_history_and_does_not_reseed(
    open_store: OpenStore, autojump_clock: MockClock
) -> None:
    profiles = [{"id": "only", "name": "Only", "agent": "echo"}]
    async with open_store(agent=EchoAgent(chunk_delay=0.01)) as backend:
        chat = await backend.create_chat("demo", "Kept")
        async with backend.watch_chat(chat["id"]) as feed:
            await backend.send_message(chat["id"], "remember me")
            await read_until(feed)
        await backend.rename_chat("welcome", "Hello again")
        await backend.set_model_profiles(profiles)
        before = (await backend.get_history(chat["id"])).items
        projects = await backend.list_projects()
    async with open_store() as backend:
        assert await backend.list_projects() == projects
        chats = (await backend.list_chats("demo")).items
        assert [c["title"] for c in chats] == ["Hello again", "Kept"]
        assert (await backend.get_history(chat["id"])).items == before
        assert [m["content"] for m in before] == ["remember me", "Echo: remember me"]
        assert len((await backend.get_history("welcome")).items) == 1
        assert (await backend.get_model_profiles()).items == profiles


async def test_wire_shapes(backend: Store, autojump_clock: MockClock) -> None:
    (project,) = await backend.list_projects()
    assert set(project) == {"id", "name", "createdAt"}
    assert is_timestamp(project["createdAt"])

    chat = await backend.create_chat("demo", "Shapes")
    assert set(chat) == {"id", "projectId", "title", "modelProfileId", "createdAt"}
    assert is_new_id(chat["id"])
    assert chat["projectId"] == "demo"
    assert chat["title"] == "Shapes"
    assert chat["modelProfileId"] == "echo"
    assert is_timestamp(chat["createdAt"])
    assert (await backend.list_chats("demo")).items[-1] == chat

    async with backend.watch_chat(chat["id"]) as feed:
        await backend.send_message(chat["id"], "hi")
        await read_until(feed)
    user, reply = (await backend.get_history(chat["id"])).items
    for message in (user, reply):
        assert set(message) == {"id", "chatId", "role", "content", "createdAt"}
        assert is_new_id(message["id"])
        assert message["chatId"] == chat["id"]
        assert is_timestamp(message["createdAt"])
    assert (user["role"], user["content"]) == ("user", "hi")
    assert (reply["role"], reply["content"]) == ("assistant", "Echo: hi")

    for profile in (await backend.get_model_profiles()).items:
        assert set(profile) == {"id", "name", "agent"}


async def test_chats_are_listed_in_creation_order(
    backend: Store, autojump_clock: MockClock
) -> None:
    titles = ["a", "b", "c", "d"]
    for title in titles:
        await backend.create_chat("demo", title)
    listed = (await backend.list_chats("demo")).items
    assert [c["title"] for c in listed] == ["Welcome", *titles]
    assert [c["createdAt"] for c in listed] == sorted(c["createdAt"] for c in listed)


async def test_create_chat_titles(backend: Store, autojump_clock: MockClock) -> None:
    assert (await backend.create_chat("demo", None))["title"] == "New chat"
    assert (await backend.create_chat("demo", "   "))["title"] == "New chat"
    assert (await backend.create_chat("demo", "  Plans "))["title"] == "Plans"
    with pytest.raises(BackendError):
        await backend.create_chat("demo", 42)  # type: ignore[arg-type]


# --- errors ----------------------------------------------------------------------------------


async def test_unknown_project_or_chat(backend: Store, autojump_clock: MockClock) -> None:
    with pytest.raises(NotFound):
        await backend.list_chats("nope")
    with pytest.raises(NotFound):
        await backend.create_chat("nope", "x")
    with pytest.raises(NotFound):
        await backend.get_history("nope")
    with pytest.raises(NotFound):
        await backend.send_message("nope", "hi")
    with pytest.raises(NotFound):
        await backend.rename_chat("nope", "x")
    with pytest.raises(NotFound):
        await backend.delete_chat("nope")
    # Nothing was stored on the way.
    assert len((await backend.list_chats("demo")).items) == 1


@pytest.mark.parametrize(
    "message",
    ["", None, 5, [], {}, ["hi"], {"text": ""}, {"text": 3}, {"title": "hi"}, {"text": None}],
)
async def test_bad_messages_are_refused(
    backend: Store, message: Any, autojump_clock: MockClock
) -> None:
    with pytest.raises(BackendError, match="non-empty string"):
        await backend.send_message("welcome", message)
    assert len((await backend.get_history("welcome")).items) == 1


@pytest.mark.parametrize(
    "message",
    ["hi", {"text": "hi"}, {"content": "hi"}, {"message": "hi"}, {"text": "", "content": "hi"}],
)
async def test_message_forms(
    backend: Store, message: Any, autojump_clock: MockClock
) -> None:
    async with backend.watch_chat("welcome") as feed:
        await backend.send_message("welcome", message)
        changes = await read_until(feed)
    assert changes[0].data["message"]["content"] == "hi"
    assert changes[-1].data["message"]["content"] == "Echo: hi"


async def test_rename_rejects_empty_title(
    backend: Store, autojump_clock: MockClock
) -> None:
    with pytest.raises(BackendError):
        await backend.rename_chat("welcome", "  ")


async def test_calls_after_close_are_refused(
    open_store: OpenStore, autojump_clock: MockClock
) -> None:
    async with open_store() as backend:
        pass
    with pytest.raises(BackendError, match="closed"):
        await backend.list_projects()


async def test_error_in_the_block_propagates_unwrapped(
    open_store: OpenStore, autojump_clock: MockClock
) -> None:
    with pytest.raises(KeyError) as info:
        async with open_store():
            raise KeyError("mine")
    assert type(info.value) is KeyError
    assert info.value.__context__ is None  # not chained to the nursery's exception group


# --- sending and streaming -------------------------------------------------------------------


async def test_send_streams_the_reply_in_order(
    backend: Store, autojump_clock: MockClock
) -> None:
    async with backend.watch_chat("welcome") as feed:
        await backend.send_message("welcome", "hello streaming world")
        changes = await read_until(feed)

    user, started, *chunks, final = changes
    assert user.data["type"] == "message"
    assert user.data["message"]["role"] == "user"
    assert user.data["message"]["content"] == "hello streaming world"
    assert started.data == {"type": "reply_started", "messageId": started.data["messageId"]}
    message_id = started.data["messageId"]
    assert len(chunks) == backend.agent.chunks
    assert all(set(c.data) == {"type", "messageId", "text"} for c in chunks)
    assert {c.data["type"] for c in chunks} == {"chunk"}
    assert {c.data["messageId"] for c in chunks} == {message_id}
    reply = final.data["message"]
    assert final.data == {"type": "message", "message": reply}
    assert reply["id"] == message_id
    assert "".join(c.data["text"] for c in chunks) == reply["content"]
    assert reply["content"] == "Echo: hello streaming world"
    # One version per change, counting up from the first one this feed saw.
    assert [c.version for c in changes] == list(range(1, len(changes) + 1))
    assert (await backend.get_history("welcome")).items[-2:] == [user.data["message"], reply]


async def test_snapshots_match_versions_on_a_project(
    backend: Store, autojump_clock: MockClock
) -> None:
    async with backend.watch_project("demo") as feed:
        snapshot = await backend.list_chats("demo")
        assert (snapshot.version, len(snapshot.items)) == (0, 1)
        for expected in (1, 2, 3):
            chat = await backend.create_chat("demo", f"chat {expected}")
            change = await feed.__anext__()
            assert change == Change({"type": "chat_created", "chat": chat}, expected)
            snapshot = await backend.list_chats("demo")
            assert snapshot.version == expected
            assert snapshot.items[-1] == chat
            assert len(snapshot.items) == 1 + expected


async def test_snapshots_hold_exactly_the_changes_up_to_their_version(
    backend: Store, autojump_clock: MockClock
) -> None:
    """Snapshots taken while replies stream include a stored message iff its version is <=."""
    stored: dict[str, int] = {}  # message id -> version of its change
    snapshots = []
    async with backend.watch_chat("welcome") as feed:
        await backend.send_message("welcome", "one two three")
        await backend.send_message("welcome", "four five six")
        done = 0
        async for change in feed:
            assert change.version is not None
            if change.data["type"] == "message":
                stored[change.data["message"]["id"]] = change.version
            snapshots.append(await backend.get_history("welcome"))
            done += is_final(change)
            if done == 2:
                break
    assert len(stored) == 4
    for snapshot in snapshots:
        assert snapshot.version is not None
        held = {m["id"] for m in snapshot.items[1:]}  # past the seeded welcome
        assert held == {mid for mid, version in stored.items() if version <= snapshot.version}


async def test_two_sends_reply_in_order_without_interleaving(
    backend: Store, autojump_clock: MockClock
) -> None:
    async with backend.watch_chat("welcome") as feed:
        for text in ("first", "second", "third"):
            await backend.send_message("welcome", text)
        changes = await read_until(feed, done=3)
    users = [c.data["message"]["content"] for c in changes if c.data["type"] == "message"]
    assert [u for u in users if not u.startswith("Echo")] == ["first", "second", "third"]
    # The agent's output: started, chunks, final, then the next reply, never mixed.
    replies: list[list[Change]] = []
    for change in changes:
        if change.data["type"] == "reply_started":
            replies.append([])
        if change.data["type"] in ("reply_started", "chunk") or is_final(change):
            replies[-1].append(change)
    assert [r[-1].data["message"]["content"] for r in replies] == [
        "Echo: first",
        "Echo: second",
        "Echo: third",
    ]
    for reply in replies:
        message_id = reply[0].data["messageId"]
        assert types(reply) == ["reply_started"] + ["chunk"] * (len(reply) - 2) + ["message"]
        assert {c.data.get("messageId", c.data.get("message", {}).get("id")) for c in reply} == {
            message_id
        }
    # Each user message is published before its reply starts.
    positions = {id(c): i for i, c in enumerate(changes)}
    user_changes = [c for c in changes if c.data["type"] == "message" and not is_final(c)]
    for user, reply in zip(user_changes, replies, strict=True):
        assert positions[id(user)] < positions[id(reply[0])]
    # Nothing is kept for an idle chat.
    assert not backend._replies.active_chats


@attrs.frozen
class GatedAgent(EchoAgent):
    """Replies only once its gate opens, and records who is waiting."""

    gate: trio.Event = attrs.Factory(trio.Event)
    waiting: list[str] = attrs.Factory(list)
    both_waiting: trio.Event = attrs.Factory(trio.Event)

    async def reply(self, content: str, emit: Any) -> str:
        self.waiting.append(content)
        if len(self.waiting) == 2:
            self.both_waiting.set()
        await self.gate.wait()
        emit(content)
        return content


async def test_chats_reply_concurrently(open_store: OpenStore) -> None:
    # Decided by who is waiting, not by timing, and on the real clock: mock time jumps while
    # sqlite threads work, so durations (and fail_after) would be flaky under autojump. If
    # replies ran one chat after another, the second agent could not start while the first
    # is held at its gate.
    agent = GatedAgent()
    async with open_store(agent=agent) as backend:
        other = await backend.create_chat("demo", None)
        async with (
            backend.watch_chat("welcome") as feed_a,
            backend.watch_chat(other["id"]) as feed_b,
        ):
            await backend.send_message("welcome", "to a")
            await backend.send_message(other["id"], "to b")
            with trio.fail_after(5):
                await agent.both_waiting.wait()
            assert sorted(agent.waiting) == ["to a", "to b"]
            agent.gate.set()
            for feed in (feed_a, feed_b):
                with trio.fail_after(5):
                    async for change in feed:
                        if is_final(change):
                            break


async def test_model_profiles_pace_the_agent(
    sqlite_backend: SqliteBackend, autojump_clock: MockClock
) -> None:
    # Timed on the mock clock: SQLite only (PostgreSQL's lease upkeep has deadlines of its
    # own that the autojump clock jumps to while a worker thread runs).
    agent, agent_for = sqlite_backend.agent, sqlite_backend.agent_for
    assert agent_for("echo") is agent
    assert agent_for("unknown") is agent
    assert agent_for("echo-fast") == attrs.evolve(agent, chunk_delay=0.01)
    assert agent_for("echo-slow") == attrs.evolve(agent, chunk_delay=0.3)
    chat = await sqlite_backend.create_chat("demo", "slow", model_profile_id="echo-slow")
    assert chat["modelProfileId"] == "echo-slow"
    async with sqlite_backend.watch_chat(chat["id"]) as feed:
        start = trio.current_time()
        await sqlite_backend.send_message(chat["id"], "take your time")
        await read_until(feed)
    assert trio.current_time() - start == pytest.approx(sqlite_backend.agent.chunks * 0.3)


@attrs.frozen
class FailingAgent(EchoAgent):
    async def reply(self, content: str, emit: Any) -> str:
        emit("partial ")
        raise RuntimeError("the model fell over")


async def test_a_silent_profiles_chats_get_no_reply(
    backend: Store, autojump_clock: MockClock
) -> None:
    profiles = [{"id": "quiet", "name": "Quiet", "agent": "silent"}]
    await backend.set_model_profiles(profiles, agents={"quiet": SilentAgent()})
    chat = await backend.create_chat("demo", "notes", "quiet")
    async with backend.watch_chat(chat["id"]) as feed:
        for text in ("one", "two", "three"):
            await backend.send_message(chat["id"], text)
        # Every send is exactly one push, and no reply is even queued.
        assert not backend._replies.active_chats
        changes = [await feed.__anext__() for _ in range(3)]
    assert types(changes) == ["message"] * 3
    assert [c.data["message"]["content"] for c in changes] == ["one", "two", "three"]
    history = (await backend.get_history(chat["id"])).items
    assert [m["role"] for m in history] == ["user"] * 3


async def test_agent_failure_is_reported_and_logged(
    open_store: OpenStore, log_lines: list[str], autojump_clock: MockClock
) -> None:
    async with open_store(agent=FailingAgent()) as backend:
        async with backend.watch_chat("welcome") as feed:
            for _ in range(2):  # the backend keeps going after a failure
                await backend.send_message("welcome", "top secret words")
                changes = await read_until(feed)
                assert types(changes) == ["message", "reply_started", "chunk", "error"]
                message_id = changes[1].data["messageId"]
                assert changes[-1].data == {
                    "type": "error",
                    "messageId": message_id,
                    "error": "agent failed",
                }
        history = (await backend.get_history("welcome")).items
        assert [m["role"] for m in history] == ["assistant", "user", "user"]
    assert any(line.startswith("ERROR|agent failed") for line in log_lines)
    # Message contents never reach the log above DEBUG.
    assert not any("secret" in line for line in log_lines if not line.startswith("DEBUG"))


# --- host-side changes -----------------------------------------------------------------------


async def test_create_rename_and_delete_are_pushed(
    backend: Store, autojump_clock: MockClock
) -> None:
    async with backend.watch_project("demo") as feed:
        chat = await backend.create_chat("demo", None)
        assert (await feed.__anext__()).data == {"type": "chat_created", "chat": chat}

        renamed = await backend.rename_chat(chat["id"], "Renamed")
        assert renamed == {**chat, "title": "Renamed"}
        change = await feed.__anext__()
        assert change == Change({"type": "chat_renamed", "chat": renamed}, 2)

        async with backend.watch_chat(chat["id"]) as chat_feed:
            await backend.send_message(chat["id"], "soon gone")
            await read_until(chat_feed)
        await backend.delete_chat(chat["id"])
        change = await feed.__anext__()
        assert change == Change({"type": "chat_deleted", "chatId": chat["id"]}, 3)

        snapshot = await backend.list_chats("demo")
        assert snapshot.version == 3
        assert [c["id"] for c in snapshot.items] == ["welcome"]
    with pytest.raises(NotFound):
        await backend.get_history(chat["id"])


async def test_deleting_a_chat_stops_its_replies(
    sqlite_backend: SqliteBackend, mock_clock: MockClock
) -> None:
    # A clock that moves only when told: an autojump clock would run the whole reply while
    # the test waits on sqlite's thread, and nothing would be left to stop.
    chat = await sqlite_backend.create_chat("demo", None)
    seen: list[Change] = []

    async def collect(feed: AsyncIterator[Change]) -> None:
        async for change in feed:
            seen.append(change)

    async with sqlite_backend.watch_chat(chat["id"]) as feed, trio.open_nursery() as nursery:
        nursery.start_soon(collect, feed)
        await sqlite_backend.send_message(chat["id"], "first of many")
        await sqlite_backend.send_message(chat["id"], "second of many")
        mock_clock.jump(sqlite_backend.agent.chunk_delay)
        await wait_all_tasks_blocked()
        assert sorted(types(seen)) == ["chunk", "message", "message", "reply_started"]

        await sqlite_backend.delete_chat(chat["id"])
        assert not sqlite_backend._replies.active_chats
        for _ in range(10):
            mock_clock.jump(1.0)
            await wait_all_tasks_blocked()
        assert len(seen) == 4
        nursery.cancel_scope.cancel()


async def test_set_model_profiles_is_pushed(
    backend: Store, autojump_clock: MockClock
) -> None:
    profiles = [
        {"id": "b", "name": "B", "agent": "echo", "extra": "dropped"},
        {"id": "a", "name": "A", "agent": "echo"},
    ]
    expected = [
        {"id": "b", "name": "B", "agent": "echo"},
        {"id": "a", "name": "A", "agent": "echo"},
    ]
    async with backend.watch_model_profiles() as feed:
        await backend.set_model_profiles(profiles)
        assert await feed.__anext__() == Change({"modelProfiles": expected}, 1)
        snapshot = await backend.get_model_profiles()
        assert (snapshot.items, snapshot.version) == (expected, 1)


@pytest.mark.parametrize(
    "profiles",
    [
        ["echo"],
        [{"id": "x", "name": "X"}],
        [{"id": "", "name": "X", "agent": "echo"}],
        [{"id": "x", "name": "X", "agent": "echo"}, {"id": "x", "name": "Y", "agent": "echo"}],
    ],
)
async def test_set_model_profiles_checks_them(
    backend: Store, profiles: Any, autojump_clock: MockClock
) -> None:
    with pytest.raises(ValueError):
        await backend.set_model_profiles(profiles)
    assert (await backend.get_model_profiles()).items == SEEDED_PROFILES


# --- shutdown --------------------------------------------------------------------------------


async def test_leaving_cancels_a_reply_and_leaves_no_task(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    tasks_before = len(all_tasks())
    nurseries_before = list(trio.lowlevel.current_task().child_nurseries)
    agent = EchoAgent(chunk_delay=1.0, chunks=5)
    async with open_sqlite_backend(tmp_path, agent=agent) as backend:
        async with backend.watch_chat("welcome") as feed:
            await backend.send_message("welcome", "never answered")
            async for change in feed:
                if change.data["type"] == "chunk":
                    break
        assert len(all_tasks()) > tasks_before
        assert backend._replies.active_chats
    assert len(all_tasks()) == tasks_before
    assert trio.lowlevel.current_task().child_nurseries == nurseries_before
    async with open_sqlite_backend(tmp_path) as backend:
        history = (await backend.get_history("welcome")).items
    # The user's message was kept; the cancelled reply was never stored.
    assert [(m["role"], m["content"][:5]) for m in history[1:]] == [("user", "never")]


async def test_projects_and_profiles_are_read_once_and_kept_current(
    sqlite_backend: SqliteBackend, autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    projects = await sqlite_backend.list_projects()
    profiles = await sqlite_backend.get_model_profiles()
    projects[0]["name"] = "changed by a caller"  # what a caller does to its copy stays there
    profiles.items.clear()
    reads: list[object] = []
    run = sqlite_backend._run

    async def counting(fn: Any) -> Any:
        reads.append(fn)
        return await run(fn)

    monkeypatch.setattr(sqlite_backend, "_run", counting)
    assert (await sqlite_backend.list_projects())[0]["name"] == "Demo project"
    assert [p["id"] for p in (await sqlite_backend.get_model_profiles()).items] == [
        "echo", "echo-fast", "echo-slow"]
    assert reads == []  # both from memory
    await sqlite_backend.set_model_profiles([{"id": "only", "name": "Only", "agent": "echo"}])
    after = await sqlite_backend.get_model_profiles()
    assert [p["id"] for p in after.items] == ["only"]
    assert (after.version or 0) > (profiles.version or 0)


async def test_concurrent_sends_are_stored_in_one_batch(
    sqlite_backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    run_batch = sqlite_sql.run_batch

    def counting(writes: list[Any], conn: sqlite3.Connection) -> Any:
        batches.append(len(writes))
        return run_batch(writes, conn)

    monkeypatch.setattr(sqlite_sql, "run_batch", counting)
    failures: list[BaseException] = []

    async def send(chat_id: str, text: str) -> None:
        try:
            await sqlite_backend.send_message(chat_id, text)
        except NotFound as exc:
            failures.append(exc)

    with trio.fail_after(10):
        async with sqlite_backend.watch_chat("welcome") as feed:
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(send, "welcome", f"batched {i}")
                nursery.start_soon(send, "no-such-chat", "lost")
            # One transaction for all eleven writes (the first may go alone, before the rest
            # queue up behind it).
            assert sum(batches) == 11 and len(batches) <= 2
            # The unknown chat failed alone; the others were stored and pushed in the order
            # they were stored, once each.
            assert len(failures) == 1
            pushed: list[str] = []
            while len(pushed) < 10:
                change = await feed.__anext__()
                if change.data["type"] == "message" and change.data["message"]["role"] == "user":
                    pushed.append(change.data["message"]["content"])
        history = (await sqlite_backend.get_history("welcome")).items
    stored = [m["content"] for m in history if m["role"] == "user"]
    assert sorted(stored) == sorted(f"batched {i}" for i in range(10))
    assert pushed == stored


async def test_writes_waiting_for_a_closing_backend_fail_cleanly(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with open_sqlite_backend(tmp_path) as backend:
            async def send(i: int) -> None:
                try:
                    await backend.send_message("welcome", f"late {i}")
                except BackendError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                async with backend._lock:  # hold the batch up, then close under it
                    for i in range(3):
                        nursery.start_soon(send, i)
                    await trio.testing.wait_all_tasks_blocked()
                    backend._closed = True  # what leaving open_sqlite_backend does first
    assert [str(e) for e in errors] == ["backend is closed"] * 3


async def test_the_log_is_checkpointed_in_the_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "CHECKPOINT_EVERY", 5)
    threads: list[bool] = []
    checkpoint = sqlite_sql.wal_checkpoint

    def recording(conn: sqlite3.Connection) -> None:
        threads.append(threading.current_thread() is threading.main_thread())
        checkpoint(conn)

    monkeypatch.setattr(sqlite_sql, "wal_checkpoint", recording)
    with trio.fail_after(10):
        async with open_sqlite_backend(tmp_path) as backend:
            for i in range(12):
                await backend.send_message("welcome", f"message {i}")
            await wait_until(lambda: not backend._checkpointing)  # in a worker thread
    assert threads == [False, False]  # two checkpoints, neither on the event loop
    async with open_sqlite_backend(tmp_path) as backend:
        history = (await backend.get_history("welcome")).items
    assert [m["content"] for m in history[1:]] == [f"message {i}" for i in range(12)]


async def test_a_locked_database_is_waited_for_in_the_worker_thread(tmp_path: Path) -> None:
    # Real time: another connection (an operator's shell, a backup) holds the write lock.
    async with open_sqlite_backend(tmp_path) as backend:
        other = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            written = trio.Event()

            async def write() -> None:
                await backend.send_message("welcome", "waited for the lock")
                written.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                # The write has the worker thread and waits there for the lock, while this
                # task goes on: the event loop is not held up.
                await wait_until(lambda: backend._limiter.borrowed_tokens == 1, 1)
                assert not written.is_set()
                other.rollback()
        finally:
            other.close()
        history = (await backend.get_history("welcome")).items
    assert history[-1]["content"] == "waited for the lock"


def test_a_batch_that_sqlite_rolls_back_stores_nothing(tmp_path: Path) -> None:
    conn = sqlite_schema.connect(tmp_path / DATABASE_NAME)

    def insert(text: str) -> Any:
        return partial(sqlite_sql.insert_message, "welcome", text, "user", text)

    def disk_full(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # what SQLite does by itself on SQLITE_FULL or an I/O error
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(BackendError, match="rolled the transaction back"):
        sqlite_sql.run_batch([insert("one"), disk_full, insert("three")], conn)
    assert not conn.in_transaction
    contents = [row[0] for row in conn.execute("SELECT content FROM messages")]
    assert "one" not in contents and "three" not in contents
    # The connection is usable, and a write outside a batch still commits on its own.
    sqlite_sql.insert_message("welcome", "four", "user", "four", conn)
    assert not conn.in_transaction
    conn.close()


async def test_a_failing_checkpoint_is_logged_and_the_backend_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]
) -> None:
    monkeypatch.setattr(sqlite, "CHECKPOINT_EVERY", 2)

    def failing(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_sql, "wal_checkpoint", failing)
    with trio.fail_after(10):
        async with open_sqlite_backend(tmp_path) as backend:
            for i in range(3):
                await backend.send_message("welcome", f"message {i}")
            await wait_until(lambda: not backend._checkpointing)  # in a worker thread
            await backend.send_message("welcome", "still here")
    assert any(line.startswith("ERROR|checkpoint of the write-ahead log failed")
               for line in log_lines)


# --- exactly once: a send's nonce --------------------------------------------------------------


async def test_a_retried_send_is_stored_and_answered_once(
    backend: Store, autojump_clock: MockClock
) -> None:
    async with backend.watch_chat("welcome") as feed:
        await backend.send_message("welcome", "only once", nonce="n-1")
        await backend.send_message("welcome", "only once", nonce="n-1")  # the retry
        await backend.send_message("welcome", "again, new nonce", nonce="n-2")
        await backend.send_message("welcome", "no nonce")
        await backend.send_message("welcome", "no nonce")
        changes = await read_until(feed, done=4)
    history = (await backend.get_history("welcome")).items[1:]
    by_role = {
        role: [m["content"] for m in history if m["role"] == role]
        for role in ("user", "assistant")
    }
    assert by_role["user"] == ["only once", "again, new nonce", "no nonce", "no nonce"]
    assert by_role["assistant"] == [f"Echo: {text}" for text in by_role["user"]]
    assert types(changes).count("reply_started") == 4
    assert all("nonce" not in m for m in history)  # never shown to clients
    # The same nonce in another chat is another message.
    other = await backend.create_chat("demo", None)
    await backend.send_message(other["id"], "elsewhere", nonce="n-1")
    assert [m["content"] for m in (await backend.get_history(other["id"])).items] == [
        "elsewhere"
    ]


@pytest.mark.parametrize("nonce", ["", 5, "x" * 201, ["n"]])
async def test_a_bad_nonce_is_refused(
    backend: Store, nonce: Any, autojump_clock: MockClock
) -> None:
    with pytest.raises(BackendError, match="clientNonce"):
        await backend.send_message("welcome", "hi", nonce=nonce)
    assert len((await backend.get_history("welcome")).items) == 1


async def test_an_older_sqlite_file_gains_the_nonce_column(tmp_path: Path) -> None:
    path = tmp_path / DATABASE_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in sqlite_schema.SCHEMA:  # version 2: no nonce column, no nonce index
        if "messages_by_nonce" not in statement:
            conn.execute(statement.replace(",\n        nonce TEXT", ""))
    conn.execute("INSERT INTO projects VALUES ('p', 'P', '2026-01-01T00:00:00.000Z')")
    conn.execute("INSERT INTO chats VALUES ('c', 'p', 'C', 'echo', '2026-01-01T00:00:00.000Z')")
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    async with open_sqlite_backend(tmp_path) as backend:
        for _ in range(2):
            await backend.send_message("c", "hi", nonce="n")
        assert [m["content"] for m in (await backend.get_history("c")).items] == ["hi"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    conn.close()
