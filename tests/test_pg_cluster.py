"""Three `trio-relay serve` processes on one real PostgreSQL database and one real Redis, each
with a data dir of its own: the cluster of docs/postgres.md, as on three machines that share
only the database and the broker.

Each node is started as a user would (``--database postgresql://... --broker redis://...
--data-dir <its own> --pin <same> --config <same>``) and found through the lines it prints.
Faults are real: a node killed with SIGKILL mid-reply, the database server stopped and
started again, a database that is not there, a wrong password. Real time here: every wait
is bounded, and what another process does is waited for through what it prints, its socket,
its ``/healthz`` (polled, bounded) or what its clients receive, never by sleeping.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _helpers import Frame
from _postgres import PostgresServer
from _processes import WAIT
from _redis import RedisServer, free_port, redis_server
from test_cluster import (
    PIN,
    Node,
    _environ,
    _serve_command,
    _start_node,
    _stop_all,
    agent_reply,
    count,
    database_shown,
    health,
    wait_health,
)

from trio_relay._store.postgres import DEFAULT_CALL_TIMEOUT, RETRY_WAIT
from trio_relay._store.postgres_sql import INTERRUPTED_NOTE
from trio_relay.testing import TestClient, open_loopback_client

__all__ = ["redis_server"]  # the fixture, for pytest (conftest gives the PostgreSQL ones)

pytestmark = pytest.mark.e2e

PROJECT, CHAT = "demo", "welcome"  # what the relay seeds a new database with
SLOW_DELAY = 2.0  # seconds between the slow profile's pieces: a reply is mid-stream for 8 s
# Every node reads the same config file, as a deploy would give it: the quick echo of the
# seeded chat, and a slow one whose reply is still streaming when its node is killed.
CONFIG = f"""
[[model_profiles]]
id = "echo"
name = "Echo"
agent = "echo"
chunk_delay = 0.01

[[model_profiles]]
id = "slow"
name = "Slow echo"
agent = "echo"
chunk_delay = {SLOW_DELAY}
"""
# A short lease (--database-lease) keeps the takeover quick: a dead node's reply is closed at
# the first look (every third of a lease) after its lease ran out.
LEASE = 3.0
TAKEOVER = LEASE + LEASE / 3


# --- the nodes --------------------------------------------------------------------------------


@asynccontextmanager
async def open_pg_cluster(
    tmp_path: Path, redis: RedisServer, dsn: str, count: int = 3, extra: Sequence[str] = (),
) -> AsyncIterator[list[Node]]:
    """``count`` nodes on the database ``dsn`` and on ``redis``, each with a data dir of its
    own, started at once (as a deploy would: they migrate and set the config's profiles at
    the same moment); each is stopped afterwards, whatever the test did."""
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[trio.Process] = []
    nodes: list[Node | None] = [None] * count

    async def start(index: int) -> None:
        name = "abcdefgh"[index]
        nodes[index] = await _start_node(
            name, redis.url, tmp_path / f"data-{name}", logs,
            ["--config", str(config), "--database-lease", str(LEASE), *extra],
            started, database=dsn)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(start, index)
        yield [node for node in nodes if node is not None]
    except BaseException:
        await _stop_all(started)
        raise
    # Whatever the database went through, a running node still shuts down cleanly.
    stopped = await _stop_all(started)
    assert [p.returncode for p in stopped] == [0] * len(stopped), [
        (node.name, node.process.returncode, node.logs()[-2000:])
        for node in nodes if node is not None and node.process in stopped]


@asynccontextmanager
async def open_clients(
    nodes: Sequence[Node], client_timeout: float = WAIT
) -> AsyncIterator[list[TestClient]]:
    """A raw protocol client on each node, signed in; every wait bounded by ``client_timeout``."""
    async with AsyncExitStack() as stack:
        clients = []
        for node in nodes:
            client = await stack.enter_async_context(
                open_loopback_client(node.url, client_timeout=client_timeout))
            await client.authenticate(PIN)
            clients.append(client)
        yield clients


async def create_chat(client: TestClient, **fields: Any) -> dict[str, Any]:
    """A ``create`` in the demo project; asserts it succeeded and returns the new chat."""
    reply = await client.request("create", resource="chat", resourceId=PROJECT, message=fields)
    assert reply["type"] == "data", reply
    chat: dict[str, Any] = reply["data"]["chat"]
    return chat


async def send(client: TestClient, chat_id: str, text: str, nonce: str) -> Frame:
    """A ``send`` with a ``clientNonce``; returns the reply, whatever it is."""
    return await client.request("send", resourceId=chat_id, message=text, clientNonce=nonce)


async def history(node: Node, chat_id: str) -> list[dict[str, Any]]:
    """The chat's stored messages, as a new subscriber on ``node`` gets them."""
    async with open_clients([node]) as (client,):
        messages: list[dict[str, Any]] = (await client.subscribe("chat", chat_id))["data"][
            "messages"]
        return messages


def open_jobs(dsn: str) -> int:
    """The replies the database still records as running."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM reply_jobs WHERE NOT done").fetchone()
    assert row is not None
    return int(row[0])


async def until_message(client: TestClient) -> list[Frame]:
    """The pushes up to and including the next ``message`` push."""
    pushes = [await client.next_push()]
    while pushes[-1]["data"]["type"] != "message":
        pushes.append(await client.next_push())
    return pushes


def consecutive(frames: list[Frame]) -> bool:
    seqs = [frame["seq"] for frame in frames]
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# --- 1. one store, on every node --------------------------------------------------------------


async def test_every_node_shows_the_same_chats_and_messages(
    postgres_dsn: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_pg_cluster(tmp_path, redis_server, postgres_dsn) as nodes, \
            open_clients(nodes) as (on_a, on_b, on_c):
        clients = [on_a, on_b, on_c]
        projects = [await client.subscribe("project", PROJECT) for client in clients]
        assert projects[0]["data"] == projects[1]["data"] == projects[2]["data"]
        assert [chat["id"] for chat in projects[0]["data"]["chats"]] == [CHAT]  # seeded once
        assert len({(p["epoch"], p["seq"]) for p in projects}) == 1, projects

        # A chat created on a is pushed to the project's subscribers on every node alike.
        chat = await create_chat(on_a, title="Made on a")
        created = [await client.next_push() for client in clients]
        assert created[0] == created[1] == created[2]
        assert created[0]["data"] == {"type": "chat_created", "chat": chat}
        assert created[0]["seq"] == projects[0]["seq"] + 1
        for node in nodes:  # and a new subscriber anywhere lists it
            async with open_clients([node]) as (late,):
                listed = (await late.subscribe("project", PROJECT))["data"]["chats"]
                assert [c["id"] for c in listed] == [CHAT, chat["id"]], listed

        # A message sent on b: the same frames on a, b and c, seq and all.
        subscribed = [await client.subscribe("chat", chat["id"]) for client in clients]
        assert subscribed[0]["data"] == subscribed[1]["data"] == subscribed[2]["data"]
        assert len({(s["epoch"], s["seq"]) for s in subscribed}) == 1, subscribed
        assert (await send(on_b, chat["id"], "hello from b", "nonce-b-1"))["data"] == {
            "sent": True}
        streams = [await agent_reply(client, "hello from b") for client in clients]
        assert streams[0] == streams[1] == streams[2]
        assert consecutive(streams[0]) and streams[0][0]["seq"] == subscribed[0]["seq"] + 1
        kinds = [frame["data"]["type"] for frame in streams[0]]
        assert kinds[:2] == ["message", "reply_started"] and kinds[-1] == "message", kinds
        assert "chunk" in kinds  # streamed from b to every node, not only stored

        # The same send retried on c (its nonce taken): answered, stored and replied to once.
        assert (await send(on_c, chat["id"], "hello from b", "nonce-b-1"))["data"] == {
            "sent": True}
        assert (await send(on_c, chat["id"], "then c", "nonce-c-1"))["data"] == {"sent": True}
        after = [await agent_reply(client, "then c") for client in clients]
        assert after[0] == after[1] == after[2]
        assert after[0][0]["data"]["message"]["content"] == "then c"  # nothing before it
        assert after[0][0]["seq"] == streams[0][-1]["seq"] + 1

        # The history read on each node is the same, each message and reply in it once.
        histories = [await history(node, chat["id"]) for node in nodes]
        assert histories[0] == histories[1] == histories[2]
        assert [(m["role"], m["content"]) for m in histories[0]] == [
            ("user", "hello from b"), ("assistant", "Echo: hello from b"),
            ("user", "then c"), ("assistant", "Echo: then c")]
        assert open_jobs(postgres_dsn) == 0


# --- 2. chats created at the same moment ------------------------------------------------------


async def test_chats_created_on_every_node_at_once_get_distinct_ids_and_reach_everyone(
    postgres_dsn: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    rounds = 3
    async with open_pg_cluster(tmp_path, redis_server, postgres_dsn) as nodes, \
            open_clients(nodes) as watchers, open_clients(nodes) as creators:
        for watcher in watchers:
            await watcher.subscribe("project", PROJECT)
        made: list[dict[str, Any]] = []
        for round_ in range(rounds):
            go = trio.Event()

            async def create(creator: TestClient, title: str, go: trio.Event = go) -> None:
                await go.wait()
                made.append(await create_chat(creator, title=title))

            async with trio.open_nursery() as nursery:
                for name, creator in zip("abc", creators, strict=True):
                    nursery.start_soon(create, creator, f"round {round_} on {name}")
                await trio.testing.wait_all_tasks_blocked()
                go.set()  # the three creates leave together

        ids = [chat["id"] for chat in made]
        assert len(set(ids)) == len(ids) == rounds * len(nodes), ids
        # Every node's subscribers get every creation once, in the same order, same frames.
        pushes = [await watcher.next_pushes(len(ids)) for watcher in watchers]
        assert pushes[0] == pushes[1] == pushes[2]
        assert consecutive(pushes[0])
        assert sorted(p["data"]["chat"]["id"] for p in pushes[0]) == sorted(ids)
        assert all(p["data"]["type"] == "chat_created" for p in pushes[0])
        by_id = {chat["id"]: chat for chat in made}
        assert all(p["data"]["chat"] == by_id[p["data"]["chat"]["id"]] for p in pushes[0])
        for node in nodes:
            async with open_clients([node]) as (late,):
                listed = (await late.subscribe("project", PROJECT))["data"]["chats"]
            assert sorted(c["id"] for c in listed) == sorted([CHAT, *ids])


# --- 3. a node killed mid-reply -----------------------------------------------------------------


async def test_a_reply_whose_node_is_killed_is_closed_as_interrupted_by_another(
    postgres_dsn: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    # The clients wait through a whole lease: their bound is the takeover's, plus margin.
    async with open_pg_cluster(tmp_path, redis_server, postgres_dsn) as (a, b, c), \
            open_clients([a, b, c], client_timeout=TAKEOVER + WAIT) as (on_a, on_b, on_c):
        chat = await create_chat(on_a, title="Slow", modelProfileId="slow")
        for client in (on_a, on_b, on_c):
            await client.subscribe("chat", chat["id"])
        assert (await send(on_a, chat["id"], "a long question", "nonce-slow"))["data"] == {
            "sent": True}
        # a stored it, so a runs its reply: wait until its first piece reached b and c.
        seen = []
        for client in (on_b, on_c):
            pushes = [await client.next_push() for _ in range(3)]
            assert [p["data"]["type"] for p in pushes] == ["message", "reply_started", "chunk"]
            seen.append(pushes)
        assert seen[0] == seen[1]
        user, started = seen[0][0]["data"]["message"], seen[0][1]["data"]

        a.process.kill()  # mid-reply: the rest of its pieces are SLOW_DELAY apart
        with trio.fail_after(WAIT):
            await a.process.wait()
        killed_at = trio.current_time()
        # After its lease ran out, b or c closes the reply: the same note on both, ending the
        # very reply that was streaming (same id). Before it, at most a piece a streamed
        # just before it died.
        rest = [await until_message(on_b), await until_message(on_c)]
        took = trio.current_time() - killed_at
        assert rest[0] == rest[1]
        assert all(p["data"]["type"] == "chunk" for p in rest[0][:-1]), rest[0]
        assert consecutive(seen[0] + rest[0])
        note = rest[0][-1]["data"]
        assert note["type"] == "message", note
        assert note["message"]["role"] == "assistant"
        assert note["message"]["id"] == started["messageId"]
        assert note["message"]["content"] == INTERRUPTED_NOTE
        assert "interrupted" in INTERRUPTED_NOTE
        assert took <= TAKEOVER + 5, took  # a lease, a look, and a loaded machine

        # Once, on every surviving node, and nothing is left running: a cancel finds
        # nothing to stop, and the database records no running reply.
        histories = [await history(node, chat["id"]) for node in (b, c)]
        assert histories[0] == histories[1]
        assert [(m["id"], m["role"], m["content"]) for m in histories[0]] == [
            (user["id"], "user", "a long question"),
            (started["messageId"], "assistant", INTERRUPTED_NOTE)]
        for client in (on_b, on_c):
            reply = await client.request("cancel", resourceId=chat["id"])
            assert reply["data"] == {"cancelled": False}, reply
        assert open_jobs(postgres_dsn) == 0


# --- 4. the database restarted ----------------------------------------------------------------


async def test_a_database_restart_fails_sends_clearly_then_service_resumes_without_restarts(
    postgres_server: PostgresServer, postgres_dsn: str, redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    # A send with a nonce that finds its pooled connection dead is tried once more on a fresh
    # one, which it waits for RETRY_WAIT (2 s): a database that is gone fails it then. The
    # bound here is the whole call timeout, what a send can take at most.
    first_failure = DEFAULT_CALL_TIMEOUT + 5
    async with open_pg_cluster(tmp_path, redis_server, postgres_dsn) as nodes, \
            open_clients(nodes, client_timeout=first_failure) as clients:
        for client in clients:
            await client.subscribe("chat", CHAT)
        await wait_health(nodes, 200, within=WAIT)
        assert (await send(clients[0], CHAT, "before the restart", "n-before"))["data"] == {
            "sent": True}
        for client in clients:
            await agent_reply(client, "before the restart")

        await trio.to_thread.run_sync(postgres_server.stop)  # a fast shutdown
        try:
            # A send on each node is refused with a clear error frame; nothing hangs.
            refused: dict[str, tuple[Frame, float]] = {}

            async def send_into_the_void(name: str, client: TestClient) -> None:
                start = trio.current_time()
                reply = await send(client, CHAT, f"into the void, {name}", f"n-void-{name}")
                refused[name] = reply, trio.current_time() - start

            async with trio.open_nursery() as nursery:
                for name, client in zip("abc", clients, strict=True):
                    nursery.start_soon(send_into_the_void, name, client)
            for reply, took in refused.values():
                # The retry on a fresh connection waits RETRY_WAIT, not the call timeout.
                assert took < RETRY_WAIT + 3, refused
                assert reply["type"] == "error", reply
                assert reply["code"] == "backend_error", reply  # a client may try again
                assert f"the database at {database_shown(postgres_dsn)}" in reply["error"]
            # Every node knows it now: 503, and the next send fails at once.
            await wait_health(nodes, 503, within=WAIT)
            for node in nodes:
                status, body = await health(node)
                assert (status, body["status"]) == (503, "degraded"), body
                assert body["reason"] == "database unreachable", body
            start = trio.current_time()
            reply = await send(clients[0], CHAT, "into the void again", "n-void-again")
            assert reply["type"] == "error" and reply["code"] == "backend_error", reply
            assert trio.current_time() - start < 3, refused  # a second of waiting, no more
        finally:
            await trio.to_thread.run_sync(postgres_server.start)

        # Back without restarting any relay: healthy again (at the next look at the leases),
        # and sends work on every node, each stored once and pushed to all.
        await wait_health(nodes, 200, within=LEASE / 3 + WAIT)
        assert all(node.process.returncode is None for node in nodes)
        for name, sender in zip("abc", clients, strict=True):
            text = f"after the restart, from {name}"
            assert (await send(sender, CHAT, text, f"n-after-{name}"))["data"] == {"sent": True}
            streams = [await agent_reply(client, text) for client in clients]
            assert streams[0] == streams[1] == streams[2]
            assert consecutive(streams[0])
        histories = [await history(node, CHAT) for node in nodes]
        assert histories[0] == histories[1] == histories[2]
        for text in ("before the restart", *(f"after the restart, from {n}" for n in "abc")):
            assert count(histories[0], "user", text) == 1
            assert count(histories[0], "assistant", text) == 1
        assert count(histories[0], "user", "into the void") == 0  # refused, so not stored


# --- 5. the CLI's database faults -------------------------------------------------------------


def _run_serve(database: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _serve_command(None, data_dir, database=database), capture_output=True, text=True,
        timeout=WAIT * 3, env=_environ(), check=False)


def test_an_unreachable_database_at_start_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    data = tmp_path / "data"
    started = time.monotonic()
    result = _run_serve(f"postgresql://relay:hunter2@127.0.0.1:{port}/relaydb", data)
    took = time.monotonic() - started
    assert result.returncode == 1, result
    assert took < WAIT, took
    assert result.stdout == ""  # nothing announced: it never served
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"trio-relay: cannot reach the database at 127.0.0.1:{port}, database 'relaydb'"), lines
    assert "hunter2" not in result.stdout + result.stderr
    assert not data.exists()  # refused before anything is written


@pytest.fixture
def password_server(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own that asks for passwords over TCP (the session's
    trusts everyone), with the role ``relay`` (password ``right-password``) owning the
    database ``relaydb``."""
    server = PostgresServer(postgres_server.bindir)
    hba = server.data / "pg_hba.conf"
    hba.write_text("local all all trust\n"
                   f"host all postgres {server.host}/32 trust\n"  # the harness's own checks
                   f"host all all {server.host}/32 scram-sha-256\n")
    try:
        server.start()
        with psycopg.connect(server.dsn(), autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE ROLE relay LOGIN PASSWORD 'right-password'")
            conn.execute("CREATE DATABASE relaydb OWNER relay")
        yield server
    finally:
        server.close()


async def test_a_database_password_is_never_printed_or_logged(
    password_server: PostgresServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    where = f"127.0.0.1:{password_server.port}/relaydb"
    # A wrong password: refused at start, one clear line, and neither password shown.
    result = _run_serve(f"postgresql://relay:wrong-password@{where}", tmp_path / "refused")
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    shown = f"127.0.0.1:{password_server.port}, database 'relaydb'"
    assert lines[0].startswith(f"trio-relay: cannot reach the database at {shown}"), lines
    assert "password authentication failed" in lines[0], lines
    assert "wrong-password" not in result.stderr
    assert not (tmp_path / "refused").exists()

    # The right one: served, and neither printed nor logged, even at DEBUG, even when the
    # database goes away and comes back.
    dsn = f"postgresql://relay:right-password@{where}"
    async with open_pg_cluster(tmp_path, redis_server, dsn, count=1,
                               extra=["--log-level", "DEBUG"]) as (node,):
        async with open_clients([node]) as (client,):
            await client.subscribe("chat", CHAT)
            await send(client, CHAT, "with a password", "n-pw")
            await agent_reply(client, "with a password")
        await trio.to_thread.run_sync(password_server.stop)
        await wait_health([node], 503, within=WAIT)
        await trio.to_thread.run_sync(password_server.start)
        await wait_health([node], 200, within=WAIT)
    assert node.printed[3] == f"database: {shown}"
    for text in (node.logs(), "\n".join(node.printed)):
        assert "right-password" not in text
    assert f"lost the database at {shown}" in node.logs()
