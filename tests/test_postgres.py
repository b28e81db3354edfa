"""The PostgreSQL store's own behaviour: schema, exactly once across nodes, leases, the outbox,
and faults. Its behaviour in common with SQLite is tested on both in test_sqlite.py.

A real server (tests/_postgres.py), one per run, a fresh database per test; several backends
on one database play the nodes of a cluster. Real time throughout (the store works in worker
threads, and its leases are the database's clock), every wait bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import attrs
import psycopg
import pytest
import trio
from _helpers import wait_until
from _postgres import PostgresServer

from trio_relay import LocalBus
from trio_relay._agents.echo import EchoAgent
from trio_relay._agents.silent import SilentAgent
from trio_relay._store import postgres_sql
from trio_relay._store.backend import BackendError, Change, NotFound, chat_key
from trio_relay._store.postgres import (
    DatabaseUnavailable,
    PostgresBackend,
    open_postgres_backend,
)
from trio_relay._store.postgres_schema import SCHEMA_VERSION
from trio_relay._store.replies import STOPPED_NOTE
from trio_relay._wire.protocol import JSON
from trio_relay.testing import open_memory_relay

WAIT = 10.0
LEASE = 0.6  # seconds: short, so that takeovers happen within a test


def query(dsn: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


@attrs.frozen
class GatedAgent(EchoAgent):
    """Streams one piece, then answers only once its gate opens."""

    gate: trio.Event = attrs.Factory(trio.Event)
    started: trio.Event = attrs.Factory(trio.Event)

    async def reply(self, content: str, emit: Callable[[str], None]) -> str:
        emit("thinking")
        self.started.set()
        await self.gate.wait()
        return f"answer to {content}"


async def until_stored_reply(feed: AsyncIterator[Change]) -> JSON:
    with trio.fail_after(WAIT):
        async for change in feed:
            data = change.data
            if data["type"] == "message" and data["message"]["role"] == "assistant":
                return data["message"]
    raise AssertionError("the feed ended")


@asynccontextmanager
async def nodes(
    dsn: str, *agents: EchoAgent, **options: Any
) -> AsyncIterator[list[PostgresBackend]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_postgres_backend(dsn, agent=agent, **options))
            for agent in agents
        ]


# --- schema --------------------------------------------------------------------------------


async def test_a_new_database_is_created_seeded_and_versioned(postgres_dsn: str) -> None:
    async with open_postgres_backend(postgres_dsn) as backend:
        assert [p["id"] for p in await backend.list_projects()] == ["demo"]
        history = (await backend.get_history("welcome")).items
        assert len(history) == 1 and history[0]["role"] == "assistant"
    assert query(postgres_dsn, "SELECT version FROM trio_relay_schema") == [(SCHEMA_VERSION,)]
    tables = {row[0] for row in query(
        postgres_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    )}
    assert {"projects", "chats", "messages", "model_profiles", "reply_jobs", "outbox"} <= tables


async def test_relays_starting_at_once_migrate_once(postgres_dsn: str) -> None:
    opened: list[PostgresBackend] = []
    all_open = trio.Event()

    async def start() -> None:
        async with open_postgres_backend(postgres_dsn) as backend:
            opened.append(backend)
            if len(opened) == 4:
                all_open.set()
            await all_open.wait()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(start)
    # Seeded once: one project, one welcome message.
    assert query(postgres_dsn, "SELECT count(*) FROM projects") == [(1,)]
    assert query(postgres_dsn, "SELECT count(*) FROM messages") == [(1,)]
    async with open_postgres_backend(postgres_dsn) as backend:  # and again: nothing to do
        assert len((await backend.list_chats("demo")).items) == 1
    assert query(postgres_dsn, "SELECT version FROM trio_relay_schema") == [(SCHEMA_VERSION,)]


async def test_a_newer_schema_is_refused(postgres_dsn: str) -> None:
    async with open_postgres_backend(postgres_dsn):
        pass
    query(postgres_dsn, "UPDATE trio_relay_schema SET version = 99")
    with pytest.raises(BackendError, match="schema version 99"):
        async with open_postgres_backend(postgres_dsn):
            pass  # pragma: no cover


# --- exactly once across nodes -------------------------------------------------------------


async def test_a_retry_on_another_node_is_stored_and_answered_once(postgres_dsn: str) -> None:
    async with nodes(postgres_dsn, EchoAgent(chunk_delay=0), EchoAgent(chunk_delay=0)) as (a, b):
        async with a.watch_chat("welcome") as feed_a, b.watch_chat("welcome") as feed_b:
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    for node in (a, b, a, b):
                        nursery.start_soon(
                            partial(node.send_message, "welcome", "once", nonce="same")
                        )
            # Exactly one node stored it, and that node answers it.
            firsts = [a.hub.version(chat_key("welcome")), b.hub.version(chat_key("welcome"))]
            assert sorted(min(v, 1) for v in firsts) == [0, 1]
            storer = feed_a if firsts[0] else feed_b
            reply = await until_stored_reply(storer)
        assert reply["content"] == "Echo: once"
        history = (await b.get_history("welcome")).items
        assert [m["content"] for m in history[1:]] == ["once", "Echo: once"]
    assert query(postgres_dsn, "SELECT count(*), bool_and(done) FROM reply_jobs") == [(1, True)]


# --- reply jobs and their leases -----------------------------------------------------------


async def test_a_running_reply_keeps_its_job_past_the_lease(postgres_dsn: str) -> None:
    agent = GatedAgent()
    async with nodes(postgres_dsn, agent, EchoAgent(), lease=LEASE) as (a, b):
        async with a.watch_chat("welcome") as feed:
            await a.send_message("welcome", "slow")
            with trio.fail_after(WAIT):
                await agent.started.wait()
            await trio.sleep(LEASE * 3)  # real time: b looks for expired jobs meanwhile
            agent.gate.set()
            reply = await until_stored_reply(feed)
        assert reply["content"] == "answer to slow"
        contents = [m["content"] for m in (await b.get_history("welcome")).items]
    assert postgres_sql.INTERRUPTED_NOTE not in contents


async def test_a_node_that_dies_mid_reply_has_its_job_closed_by_another(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = GatedAgent()
    async with open_postgres_backend(postgres_dsn, agent=EchoAgent(), lease=LEASE) as b:
        async with b.watch_chat("welcome") as feed:
            # A dies: it neither releases its job nor clears its events on the way out.
            with monkeypatch.context() as patch:
                patch.setattr(postgres_sql, "release_jobs", lambda *args: None)
                async with open_postgres_backend(postgres_dsn, agent=agent, lease=LEASE) as a:
                    async with a.watch_chat("welcome") as on_a:
                        await a.send_message("welcome", "never finished")
                        with trio.fail_after(WAIT):
                            await agent.started.wait()
                        while (started := (await on_a.__anext__()).data)["type"] != (
                            "reply_started"
                        ):
                            pass
            note = await until_stored_reply(feed)
        assert note["content"] == postgres_sql.INTERRUPTED_NOTE
        # Under the id A's reply streamed under: a client sees that very reply end.
        assert note["id"] == started["messageId"]
        history = (await b.get_history("welcome")).items
    assert [(m["role"], m["content"]) for m in history[1:]] == [
        ("user", "never finished"), ("assistant", postgres_sql.INTERRUPTED_NOTE)
    ]
    assert query(postgres_dsn, "SELECT count(*) FROM reply_jobs WHERE NOT done") == [(0,)]


async def test_a_stopped_node_releases_its_jobs_to_the_next_start(postgres_dsn: str) -> None:
    agent = GatedAgent()
    async with open_postgres_backend(postgres_dsn, agent=agent, lease=60) as node:
        await node.send_message("welcome", "interrupted by a restart")
        with trio.fail_after(WAIT):
            await agent.started.wait()
    # The same node again (a new node id); a lease of 60 s, yet no wait: the job was released.
    async with open_postgres_backend(postgres_dsn, lease=60) as node:
        await wait_until(lambda: node.hub.version(chat_key("welcome")) == 1, WAIT)
        history = (await node.get_history("welcome")).items
    assert [m["content"] for m in history[1:]] == [
        "interrupted by a restart", postgres_sql.INTERRUPTED_NOTE
    ]


async def test_a_reply_finished_after_its_job_was_taken_over_is_not_stored(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = GatedAgent()
    async with nodes(postgres_dsn, agent, EchoAgent(), lease=LEASE) as (a, b):
        # A cannot renew its lease (cut off from the database for a while, say).
        monkeypatch.setattr(postgres_sql, "renew_leases", lambda *args: None)
        async with a.watch_chat("welcome") as feed_a, b.watch_chat("welcome") as feed_b:
            await a.send_message("welcome", "who answers?")
            with trio.fail_after(WAIT):
                await agent.started.wait()
            # Whichever node sees the lease run out first (A too, now that it cannot
            # renew) closes the job as interrupted.
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    async def first(feed: AsyncIterator[Change]) -> None:
                        notes.append(await until_stored_reply(feed))
                        nursery.cancel_scope.cancel()

                    notes: list[JSON] = []
                    nursery.start_soon(first, feed_a)
                    nursery.start_soon(first, feed_b)
            assert notes[0]["content"] == postgres_sql.INTERRUPTED_NOTE
            agent.gate.set()  # A's agent answers now: too late, the job is closed
        await wait_until(lambda: not a._replies.active_chats, WAIT)
        history = (await a.get_history("welcome")).items
    assert [m["content"] for m in history[1:]] == ["who answers?", postgres_sql.INTERRUPTED_NOTE]


async def test_a_reply_running_on_another_node_is_stopped_from_this_one(
    postgres_dsn: str,
) -> None:
    agent = GatedAgent()  # its gate never opens: only a stop ends the reply
    async with nodes(postgres_dsn, agent, EchoAgent(), lease=LEASE) as (a, b):
        async with a.watch_chat("welcome") as feed:
            await a.send_message("welcome", "stop me from b")
            with trio.fail_after(WAIT):
                await agent.started.wait()
            assert await b.cancel_reply("welcome") is True
            stopped = await until_stored_reply(feed)
        assert stopped["content"] == f"thinking\n\n{STOPPED_NOTE}"
        assert await b.cancel_reply("welcome") is False  # nothing runs any more
    assert query(postgres_dsn, "SELECT count(*) FROM reply_jobs WHERE NOT done") == [(0,)]


# --- the outbox ----------------------------------------------------------------------------


async def test_events_are_cleared_only_after_the_flush(postgres_dsn: str) -> None:
    async with open_postgres_backend(postgres_dsn) as backend:
        rows_at_flush: list[int] = []
        flushed = trio.Event()

        async def flusher() -> None:
            rows_at_flush.append(query(postgres_dsn, "SELECT count(*) FROM outbox")[0][0])
            flushed.set()

        backend.hub.flusher = flusher
        await backend.create_chat("demo", "flushed first")
        with trio.fail_after(WAIT):
            await flushed.wait()
        await wait_until(lambda: not backend._undeleted, WAIT)
    assert rows_at_flush == [1]
    assert query(postgres_dsn, "SELECT count(*) FROM outbox") == [(0,)]


async def test_events_forwarded_to_a_broker_now_gone_are_left_for_another_node(
    postgres_dsn: str,
) -> None:
    async with open_postgres_backend(postgres_dsn, lease=60) as backend:
        backend.hub.outlet = lambda key, data: None  # a broker that is then closed, unflushed
        await backend.create_chat("demo", "maybe never reached the broker")
        backend.hub.outlet = None
    # Not deleted: once its lease runs out, another node publishes it again.
    assert query(postgres_dsn, "SELECT kind, key, data->>'type' FROM outbox") == [
        ("project", "demo", "chat_created")
    ]


async def test_events_a_crashed_node_left_are_published_by_another(postgres_dsn: str) -> None:
    async with open_postgres_backend(postgres_dsn):
        pass  # the schema
    # A node stored these, crashed before publishing them, and its lease ran out.
    for n in (1, 2):
        query(
            postgres_dsn,
            "INSERT INTO outbox (owner, lease_until, kind, key, data)"
            " VALUES ('dead', now() - interval '1 second', 'chat', 'welcome', %s)",
            psycopg.types.json.Jsonb({"type": "note", "n": n}),
        )
    forwarded: list[tuple[Hashable, JSON]] = []
    async with open_postgres_backend(postgres_dsn, lease=LEASE) as backend:
        # What a relay with a broker sets: an outlet, and a flush that says the broker has
        # what went out (here, at once).
        backend.hub.outlet = lambda key, data: forwarded.append((key, data))
        backend.hub.flusher = trio.lowlevel.checkpoint
        async with backend.watch_chat("welcome") as feed:
            with trio.fail_after(WAIT):
                changes = [await feed.__anext__(), await feed.__anext__()]
        await wait_until(lambda: not backend._undeleted, WAIT)
    assert [c.data for c in changes] == [{"type": "note", "n": 1}, {"type": "note", "n": 2}]
    assert [data for _, data in forwarded] == [c.data for c in changes]
    assert query(postgres_dsn, "SELECT count(*) FROM outbox") == [(0,)]


async def test_two_relays_on_one_database_and_one_bus(postgres_dsn: str) -> None:
    bus = LocalBus()
    async with AsyncExitStack() as stack:
        relays = []
        for _ in range(2):
            backend = await stack.enter_async_context(
                open_postgres_backend(postgres_dsn, agent=EchoAgent(chunk_delay=0.001))
            )
            relays.append(await stack.enter_async_context(
                open_memory_relay(backend, broker=bus, client_timeout=10)
            ))
        watcher = await relays[1].connect(authenticate=True)
        await watcher.subscribe("project", "demo")
        creators = [await relay.connect(authenticate=True) for relay in relays]
        with trio.fail_after(WAIT):
            replies = [
                await creator.request(
                    "create", resource="chat", resourceId="demo", message={"title": f"n{i}"}
                )
                for i, creator in enumerate(creators)
            ]
            ids = {reply["data"]["chat"]["id"] for reply in replies}
            assert len(ids) == 2
            pushed = {(await watcher.next_push())["data"]["chat"]["id"] for _ in range(2)}
        assert pushed == ids
        chat_id = replies[0]["data"]["chat"]["id"]
        await watcher.subscribe("chat", chat_id)
        await creators[0].subscribe("chat", chat_id)
        await creators[0].send_message(chat_id, "from node a")
        with trio.fail_after(WAIT):
            while True:
                data = (await watcher.next_push())["data"]
                if data["type"] == "message" and data["message"]["role"] == "assistant":
                    break
        assert data["message"]["content"] == "Echo: from node a"
        for client in (watcher, *creators):
            await client.close()


# --- faults --------------------------------------------------------------------------------


async def test_an_unreachable_database_is_one_clear_error(postgres_dsn: str) -> None:
    dsn = "postgresql://relay:hunter2@127.0.0.1:1/chats"
    with pytest.raises(DatabaseUnavailable) as info:
        async with open_postgres_backend(dsn, call_timeout=2, statement_timeout=1):
            pass  # pragma: no cover
    message = str(info.value)
    assert "127.0.0.1:1" in message and "'chats'" in message
    assert "hunter2" not in message


async def test_a_database_restart_fails_calls_clearly_then_recovers(
    postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    opening = open_postgres_backend(postgres_dsn, call_timeout=2, statement_timeout=1)
    async with opening as backend:
        await backend.create_chat("demo", "before")
        await trio.to_thread.run_sync(postgres_server.stop)
        try:
            for call in (
                partial(backend.create_chat, "demo", "while down"),
                partial(backend.send_message, "welcome", "while down"),
                partial(backend.get_history, "welcome"),
            ):
                with pytest.raises(DatabaseUnavailable, match=f":{postgres_server.port}"):
                    await call()
            assert not backend.healthy
        finally:
            await trio.to_thread.run_sync(postgres_server.start)
        # Back without a restart of the backend; at most one more call finds a stale
        # connection, and the pool replaces them.
        async def created() -> bool:
            try:
                await backend.create_chat("demo", "after")
            except DatabaseUnavailable:
                return False
            return True

        with trio.fail_after(WAIT):
            while not await created():  # noqa: ASYNC110 - polls the database coming back
                await trio.sleep(0.1)
        assert backend.healthy
        titles = [c["title"] for c in (await backend.list_chats("demo")).items]
    assert titles == ["Welcome", "before", "after"]


async def test_a_reply_running_across_a_database_restart_is_stored(
    postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    agent = GatedAgent()
    async with open_postgres_backend(postgres_dsn, agent=agent) as backend:
        async with backend.watch_chat("welcome") as feed:
            await backend.send_message("welcome", "outlive a restart")
            with trio.fail_after(WAIT):
                await agent.started.wait()
            await trio.to_thread.run_sync(postgres_server.restart)
            agent.gate.set()  # its answer meets only stale connections: one retry
            reply = await until_stored_reply(feed)
            assert reply["content"] == "answer to outlive a restart"
            await trio.to_thread.run_sync(postgres_server.restart)
            # A send with a nonce is retried too (a retry stores nothing twice).
            await backend.send_message("welcome", "after another restart", nonce="r-1")
            assert (await until_stored_reply(feed))["content"] == (
                "answer to after another restart"
            )
    assert query(postgres_dsn, "SELECT count(*) FROM reply_jobs WHERE NOT done") == [(0,)]


async def test_a_statement_that_hangs_is_timed_out(postgres_dsn: str) -> None:
    async with open_postgres_backend(postgres_dsn, statement_timeout=0.3) as backend:
        with psycopg.connect(postgres_dsn) as locker:  # holds the chat's row lock
            locker.execute("SELECT * FROM chats WHERE id = 'welcome' FOR UPDATE")
            with trio.fail_after(WAIT), pytest.raises(BackendError, match="statement_timeout"):
                await backend.rename_chat("welcome", "blocked")
            locker.rollback()
        assert (await backend.rename_chat("welcome", "free"))["title"] == "free"


async def test_a_frozen_server_is_cut_off_after_the_call_timeout(
    postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    opening = open_postgres_backend(postgres_dsn, call_timeout=1, statement_timeout=0.5)
    async with opening as backend:
        await backend.get_history("welcome")
        postgres_server.freeze()
        try:
            with trio.fail_after(WAIT), pytest.raises(DatabaseUnavailable, match="did not answer"):
                await backend.get_history("welcome")
        finally:
            postgres_server.thaw()
        with trio.fail_after(WAIT):
            while True:
                try:
                    await backend.get_history("welcome")
                    break
                except DatabaseUnavailable:
                    await trio.sleep(0.1)


async def test_a_relay_answers_a_lost_database_with_an_error_frame(
    postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    async with (
        open_postgres_backend(postgres_dsn, call_timeout=3, statement_timeout=2) as backend,
        open_memory_relay(backend) as relay,
    ):
        client = await relay.connect(authenticate=True)
        await trio.to_thread.run_sync(postgres_server.stop)
        try:
            reply = await client.request(
                "send", resource="chat", resourceId="welcome", message="lost?"
            )
        finally:
            await trio.to_thread.run_sync(postgres_server.start)
        assert reply["type"] == "error", reply
        assert "database" in reply["error"] and "hunter" not in reply["error"], reply


async def test_nodes_creating_chats_at_once_get_distinct_ids(postgres_dsn: str) -> None:
    async with nodes(postgres_dsn, EchoAgent(), EchoAgent(), EchoAgent()) as backends:
        forwarded: list[JSON] = []
        for backend in backends:
            backend.hub.outlet = lambda key, data: forwarded.append(data)
            backend.hub.flusher = trio.lowlevel.checkpoint
        created: list[JSON] = []

        async def create(backend: PostgresBackend, n: int) -> None:
            created.append(await backend.create_chat("demo", f"chat {n}"))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for n in range(12):
                    nursery.start_soon(create, backends[n % 3], n)
        ids = {chat["id"] for chat in created}
        assert len(ids) == 12
        # Each creation went out once, from the node that made it.
        assert sorted(d["chat"]["id"] for d in forwarded) == sorted(ids)
        listed = (await backends[0].list_chats("demo")).items
        assert {c["id"] for c in listed[1:]} == ids


async def test_a_chat_whose_agent_answers_nothing_records_no_job(postgres_dsn: str) -> None:
    async with open_postgres_backend(postgres_dsn) as backend:
        await backend.set_model_profiles(
            [{"id": "quiet", "name": "Quiet", "agent": "silent"}], agents={"quiet": SilentAgent()}
        )
        chat = await backend.create_chat("demo", "notes", "quiet")
        await backend.send_message(str(chat["id"]), "just a note")
    assert query(postgres_dsn, "SELECT count(*) FROM reply_jobs") == [(0,)]


async def test_concurrent_sends_share_one_commit_and_fail_alone(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    run_batch = postgres_sql.run_batch

    def counting(writes: list[Any], conn: postgres_sql.Conn) -> Any:
        batches.append(len(writes))
        return run_batch(writes, conn)

    monkeypatch.setattr(postgres_sql, "run_batch", counting)
    failures: list[BaseException] = []

    async def send(backend: PostgresBackend, chat_id: str, text: str) -> None:
        try:
            await backend.send_message(chat_id, text)
        except NotFound as exc:
            failures.append(exc)

    async with open_postgres_backend(postgres_dsn) as backend:
        await backend.set_model_profiles(
            [{"id": "echo", "name": "Quiet", "agent": "silent"}], agents={"echo": SilentAgent()}
        )
        async with backend.watch_chat("welcome") as feed:
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    for i in range(10):
                        nursery.start_soon(send, backend, "welcome", f"batched {i}")
                    nursery.start_soon(send, backend, "no-such-chat", "lost")
                pushed = [(await feed.__anext__()).data["message"]["content"] for _ in range(10)]
        history = (await backend.get_history("welcome")).items
    assert sum(batches) == 11 and len(batches) <= 3
    assert len(failures) == 1
    stored = [m["content"] for m in history[1:]]
    assert sorted(stored) == sorted(f"batched {i}" for i in range(10))
    assert pushed == stored
