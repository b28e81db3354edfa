"""Three `trio-relay serve` processes on one real Redis and one shared data dir: the cluster
of docs/scaling.md, end to end, with real clients over loopback.

Each node is started as a user would (``--broker redis://... --port 0 --data-dir <shared>
--pin <same>``) and found through the lines it prints. Faults are real: a node killed with
SIGKILL, Redis restarted empty, Redis frozen with SIGSTOP, Redis absent at start. Real time
here: every wait is bounded, and what another process does is waited for through what it
prints, its socket, or its ``/healthz`` (polled, bounded), never by sleeping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
import trio
from _helpers import Frame
from _processes import WAIT, alive, read_line
from _redis import RedisServer, find_redis_server, free_port, redis_server

from trio_relay import CloseCode
from trio_relay.client import (
    Backoff,
    ConnectionState,
    Event,
    MessageAdded,
    RelayClient,
    Reset,
    open_relay_client,
)
from trio_relay.testing import TestClient, open_loopback_client

__all__ = ["redis_server"]  # the fixture, for pytest

pytestmark = pytest.mark.e2e

PIN = "424242"
CHAT = "welcome"  # the demo chat of a fresh data dir, answered by the echo agent
# A frozen Redis is noticed within broker_timeout; subscribers wait broker_grace for it.
TIMEOUT, GRACE = 0.5, 2.0
FAST = ["--broker-timeout", str(TIMEOUT), "--broker-grace", str(GRACE)]
# The library clients reconnect at once (the default backoff is for real networks).
QUICK = Backoff(initial=0.05, maximum=0.2)


# --- the nodes --------------------------------------------------------------------------------


@attrs.define
class Node:
    """One `trio-relay serve` process and what it printed."""

    name: str
    process: trio.Process
    port: int
    stderr: Path
    #: What it printed on starting, line by line.
    printed: list[str]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def logs(self) -> str:
        return self.stderr.read_text(errors="replace")


def _environ() -> dict[str, str]:
    # Only what the command line says: no TRIO_RELAY_* of whoever runs the tests.
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_")}


def _serve_command(
    broker: str | None, data_dir: Path, *extra: str, database: str | None = None
) -> list[str]:
    """`trio-relay serve` on a free port; the broker given by flag unless None; on the
    PostgreSQL ``database`` if given (else the data dir's SQLite file)."""
    return [sys.executable, "-m", "trio_relay", "serve",
            *(["--broker", broker] if broker is not None else []),
            *(["--database", database] if database is not None else []), "--port", "0",
            "--data-dir", str(data_dir), "--pin", PIN, *extra]


def database_shown(dsn: str) -> str:
    """How `serve` names a ``postgresql://`` database: host, port and name, no password."""
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port}, database {parts.path.lstrip('/')!r}"


async def _start_node(
    name: str, broker: str, data_dir: Path, logs: Path, extra: Sequence[str],
    started: list[trio.Process], broker_from_env: bool = False, database: str | None = None,
) -> Node:
    stderr = logs / f"{name}.log"
    with stderr.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            _serve_command(None if broker_from_env else broker, data_dir, *extra,
                           database=database),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sink,
            env={**_environ(), "TRIO_RELAY_BROKER": broker} if broker_from_env else _environ(),
        )
    started.append(process)
    assert process.stdout is not None
    buffer = bytearray()
    try:
        lines = 5 if database is None else 6
        printed = [await read_line(process.stdout, buffer) for _ in range(lines)]
    except (AssertionError, trio.TooSlowError) as exc:
        raise AssertionError(f"node {name} did not start ({exc}); its log:\n"
                             f"{stderr.read_text()}") from None
    first = printed[0]
    assert first.startswith("trio-relay serving ws://127.0.0.1:"), printed
    port = int(first.rsplit(":", 1)[1].split("/")[0])
    assert printed[1:] == [
        f"PIN: {PIN}", f"data: {data_dir}",
        *([] if database is None else [f"database: {database_shown(database)}"]),
        f"broker: {redacted(broker)}",
        f"web client: http://127.0.0.1:{port}/",  # the last line: it listens
    ], printed
    return Node(name, process, port, stderr, printed)


def redacted(url: str) -> str:
    """How a broker URL is shown: its password (if any) as ``***``."""
    _, at, tail = url.partition("@")
    return f"redis://:***@{tail}" if at else url


async def _stop_all(processes: list[trio.Process]) -> list[trio.Process]:
    """SIGTERM, then SIGKILL whatever has not exited within WAIT; reaps every one. Returns
    those that were still running."""
    running = [process for process in processes if process.returncode is None]
    with trio.CancelScope(shield=True):
        for process in running:
            process.terminate()
        for process in processes:
            with trio.move_on_after(WAIT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
    assert not [p.pid for p in processes if alive(p.pid)], "a relay process outlived its test"
    return running


@asynccontextmanager
async def open_cluster(
    tmp_path: Path, redis: RedisServer, count: int = 3, extra: Sequence[str] = FAST,
    broker_from_env: bool = False,
) -> AsyncIterator[list[Node]]:
    """``count`` nodes on ``redis``, sharing one data dir, started at once (as a deploy
    would), given the broker by flag (or by $TRIO_RELAY_BROKER); each is stopped
    afterwards, whatever the test did."""
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    started: list[trio.Process] = []
    nodes: list[Node | None] = [None] * count

    async def start(index: int) -> None:
        nodes[index] = await _start_node(
            "abcdefgh"[index], redis.url, data_dir, logs, extra, started, broker_from_env)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(start, index)
        yield [node for node in nodes if node is not None]
    except BaseException:
        await _stop_all(started)
        raise
    # Whatever Redis went through, a running node still shuts down cleanly on SIGTERM.
    stopped = await _stop_all(started)
    assert [p.returncode for p in stopped] == [0] * len(stopped), [
        (node.name, node.process.returncode, node.logs()[-2000:])
        for node in nodes if node is not None and node.process in stopped]


# --- HTTP and clients -------------------------------------------------------------------------


async def health(node: Node) -> tuple[int, dict[str, Any]]:
    """``GET /healthz``: the status code and the JSON body, within WAIT."""
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n"
                                  b"Connection: close\r\n\r\n")
            received = b""
            while chunk := await stream.receive_some():
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def wait_health(nodes: Sequence[Node], status: int, within: float) -> float:
    """Poll every node's /healthz until each answers ``status``; returns the seconds taken."""
    start = trio.current_time()
    with trio.fail_after(within):
        for node in nodes:
            # Another process's state: nothing to wait on but its answer.
            while (await health(node))[0] != status:  # noqa: ASYNC110
                await trio.sleep(0.02)
    return trio.current_time() - start


@asynccontextmanager
async def open_subscribers(nodes: Sequence[Node]) -> AsyncIterator[list[TestClient]]:
    """A raw protocol client on each node, signed in and subscribed to the chat."""
    async with AsyncExitStack() as stack:
        clients = []
        for node in nodes:
            client = await stack.enter_async_context(open_loopback_client(node.url))
            await client.authenticate(PIN)
            clients.append(client)
        yield clients


async def agent_reply(client: TestClient, text: str) -> list[Frame]:
    """The pushes up to the stored answer to ``text`` (the echo agent repeats it)."""
    pushes = []
    while True:
        push = await client.next_push()
        pushes.append(push)
        data = push["data"]
        if (data.get("type") == "message" and data["message"]["role"] == "assistant"
                and text in data["message"]["content"]):
            return pushes


async def history(node: Node) -> list[dict[str, Any]]:
    """The chat's stored messages, as a new subscriber on ``node`` gets them."""
    async with open_loopback_client(node.url) as client:
        await client.authenticate(PIN)
        messages: list[dict[str, Any]] = (await client.subscribe("chat", CHAT))["data"]["messages"]
        return messages


async def send_once(client: TestClient, text: str, nonce: str) -> None:
    """A ``send`` with a ``clientNonce``; asserts it was accepted."""
    reply = await client.request("send", resourceId=CHAT, message=text, clientNonce=nonce)
    assert reply["type"] == "data" and reply["data"] == {"sent": True}, reply


def count(messages: list[dict[str, Any]], role: str, text: str) -> int:
    return sum(m["role"] == role and text in m["content"] for m in messages)


class Tapped(trio.abc.Stream):
    """A client's TCP stream with two ways to pull the plug at an exact moment.

    ``before_next_write`` runs (once) just before the next write goes out: the node killed
    then never reads what the client sent. While ``lost`` is set, whatever arrives is lost:
    once it fires, the stream breaks, as a path to a node that died on the way would.
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.before_next_write: Callable[[], None] | None = None
        self.lost: trio.Event | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        action, self.before_next_write = self.before_next_write, None
        if action is not None:
            action()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.lost is not None:
            await self.lost.wait()
            raise trio.BrokenResourceError("lost with the node")
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define
class Landing:
    """Where a library client's connection attempts landed, and their streams."""

    node: Node
    stream: Tapped


@attrs.define
class Route:
    """A library client's way in (its ``connect``): the first of ``nodes`` that accepts, as a
    client given a list of addresses (or a load balancer) would. ``landed`` records each
    connection; while ``held`` is set and not yet fired, a new connection waits for it."""

    nodes: Sequence[Node]
    landed: list[Landing] = attrs.Factory(list)
    held: trio.Event | None = None

    async def connect(self) -> trio.abc.Stream:
        if self.held is not None:
            await self.held.wait()
        refused = []
        for node in self.nodes:
            try:
                stream = Tapped(await trio.open_tcp_stream("127.0.0.1", node.port))
            except OSError as exc:
                refused.append(f"{node.name}: {exc}")
                continue
            self.landed.append(Landing(node, stream))
            return stream
        raise OSError(f"no node accepted: {refused}")

    def names(self) -> list[str]:
        return [landing.node.name for landing in self.landed]


@asynccontextmanager
async def open_client(route: Route) -> AsyncIterator[RelayClient]:
    async with open_relay_client(
        route.nodes[0].url, pin=PIN, connect=route.connect, backoff=QUICK, request_timeout=WAIT,
    ) as client:
        yield client


@attrs.define
class Recorder:
    """Every event of one library subscription to the chat, in order, as it arrives."""

    events: list[Event] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)

    async def run(self, client: RelayClient, task_status: trio.TaskStatus[Any]) -> None:
        async with client.subscribe("chat", CHAT) as sub:
            task_status.started(sub.snapshot)
            async for event in sub:
                self.events.append(event)
                self.changed.set()
                self.changed = trio.Event()

    def answered(self, text: str) -> bool:
        return any(isinstance(e, MessageAdded) and e.message["role"] == "assistant"
                   and text in e.message["content"] for e in self.events)

    async def wait_answer(self, text: str) -> None:
        with trio.fail_after(WAIT):
            while not self.answered(text):
                await self.changed.wait()

    def seqs(self) -> list[int]:
        seqs = [e.seq for e in self.events if not isinstance(e, Reset)]
        assert None not in seqs, self.events  # every push is numbered
        return [seq for seq in seqs if seq is not None]


# --- 1. one stream, on every node ---------------------------------------------------------------


async def test_a_message_sent_on_one_node_reaches_every_node_identically(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_cluster(tmp_path, redis_server) as nodes, \
            open_subscribers(nodes) as (on_a, on_b, on_c):
        subscribed = [await c.subscribe("chat", CHAT) for c in (on_a, on_b, on_c)]
        assert len({(s["epoch"], s["seq"]) for s in subscribed}) == 1, subscribed
        assert subscribed[0]["data"] == subscribed[1]["data"] == subscribed[2]["data"]

        await on_a.send_message(CHAT, "first, from a")
        first = [await agent_reply(c, "first, from a") for c in (on_a, on_b, on_c)]
        await on_c.send_message(CHAT, "second, from c")
        second = [await agent_reply(c, "second, from c") for c in (on_a, on_b, on_c)]

        streams = [one + two for one, two in zip(first, second, strict=True)]
        assert streams[0] == streams[1] == streams[2]  # the very same frames, seq and all
        start = subscribed[0]["seq"] + 1
        assert [p["seq"] for p in streams[0]] == list(range(start, start + len(streams[0])))
        assert any(p["data"]["type"] == "chunk" for p in first[0])  # streamed, not only stored

        # Each answer was produced once (by the node that took the send), not once per node.
        for node in nodes:
            messages = await history(node)
            for text in ("first, from a", "second, from c"):
                assert count(messages, "user", text) == 1
                assert count(messages, "assistant", text) == 1


# --- 2. a node killed -------------------------------------------------------------------------


async def test_a_client_of_a_killed_node_resumes_on_another_without_loss_or_duplicates(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_cluster(tmp_path, redis_server) as (a, b, c), \
            open_subscribers([c]) as (sender,):
        await sender.subscribe("chat", CHAT)
        # The moving client prefers a, then b, then c; the staying one is on b only.
        route = Route([a, b, c])
        async with open_client(route) as moving, open_client(Route([b])) as staying, \
                trio.open_nursery() as nursery:
            assert route.names() == ["a"]
            on_moving, on_staying = Recorder(), Recorder()
            snapshots = [await nursery.start(on_moving.run, moving),
                         await nursery.start(on_staying.run, staying)]
            assert snapshots[0] == snapshots[1]

            await moving.send(CHAT, "before the kill")
            await on_moving.wait_answer("before the kill")
            await on_staying.wait_answer("before the kill")

            # Last words: a send on its way out when its node dies (SIGKILL: no goodbye).
            route.landed[0].stream.before_next_write = a.process.kill
            route.held = trio.Event()  # the client stays away until the chat has moved on
            last_words = trio.Event()

            async def send_last_words() -> None:
                await moving.send(CHAT, "last words")  # sent again on the next connection
                last_words.set()

            nursery.start_soon(send_last_words)
            with trio.fail_after(WAIT):
                await a.process.wait()
            await sender.send_message(CHAT, "while away")
            await on_staying.wait_answer("while away")
            assert not on_moving.answered("while away")
            route.held.set()
            with trio.fail_after(WAIT):
                await last_words.wait()  # sent again on b, and accepted there
                await moving.wait_state(ConnectionState.CONNECTED)
            assert route.names() == ["a", "b"]
            await sender.send_message(CHAT, "after the kill")
            for text in ("last words", "after the kill"):
                await on_moving.wait_answer(text)
                await on_staying.wait_answer(text)

            # Every event once, in order, as the client that stayed saw them; no Reset.
            assert on_moving.events == on_staying.events
            assert not any(isinstance(e, Reset) for e in on_moving.events)
            seqs = on_moving.seqs()
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert moving.last_close is not None and moving.last_close.code == 1006

            # The last words are stored once, though sent to two nodes, and answered once.
            assert sum(isinstance(e, MessageAdded) and e.message["content"] == "last words"
                       for e in on_moving.events) == 1
            messages = await history(b)
            for text in ("before the kill", "last words", "while away", "after the kill"):
                assert count(messages, "user", text) == 1
                assert count(messages, "assistant", text) == 1
            nursery.cancel_scope.cancel()


async def test_a_send_whose_reply_died_with_its_node_is_stored_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The node stores the send, then dies before its reply reaches the client, which sends
    # it again (with its nonce) to the next node: docs/protocol.md promises one message.
    async with open_cluster(tmp_path, redis_server, count=2) as (a, b), \
            open_subscribers([b]) as (watcher,):
        await watcher.subscribe("chat", CHAT)
        route = Route([a, b])
        async with open_client(route) as client, trio.open_nursery() as nursery:
            route.landed[0].stream.lost = lost = trio.Event()
            sent = trio.Event()

            async def send() -> None:
                await client.send(CHAT, "reply lost")
                sent.set()

            nursery.start_soon(send)
            while True:  # a stored it: its push reached b
                data = (await watcher.next_push())["data"]
                if data.get("type") == "message" and data["message"]["content"] == "reply lost":
                    break
            a.process.kill()
            with trio.fail_after(WAIT):
                await a.process.wait()
            lost.set()
            with trio.fail_after(WAIT):
                await sent.wait()  # sent again, to b, which accepted it
            assert route.names() == ["a", "b"]
        assert count(await history(b), "user", "reply lost") == 1


# --- 3. Redis restarted empty ----------------------------------------------------------------


async def test_redis_restarted_empty_resets_every_client_and_sends_work_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_cluster(tmp_path, redis_server) as (a, b, c), \
            open_subscribers([a, b]) as (on_a, on_b):
        before = [await client.subscribe("chat", CHAT) for client in (on_a, on_b)]
        await on_a.send_message(CHAT, "before the restart")
        seen = await agent_reply(on_b, "before the restart")
        last = seen[-1]
        assert await agent_reply(on_a, "before the restart") == seen
        async with open_client(Route([c])) as library, trio.open_nursery() as nursery:
            recorder = Recorder()
            await nursery.start(recorder.run, library)

            redis_server.restart()  # empty: every resource's history is gone
            for client in (on_a, on_b):
                code, reason = await client.wait_closed()
                assert code == CloseCode.SERVICE_RESTART, (code, reason)
            with trio.fail_after(WAIT):
                while not any(isinstance(e, Reset) for e in recorder.events):
                    await recorder.changed.wait()
            assert library.last_close is not None
            assert library.last_close.code == CloseCode.SERVICE_RESTART
            reset = next(e for e in recorder.events if isinstance(e, Reset))
            assert count(reset.snapshot, "assistant", "before the restart") == 1  # the store's
            await wait_health([a, b, c], 200, within=WAIT)

            # A raw client resuming from where it was gets a fresh snapshot, never a replay of
            # another history under the old numbering.
            async with open_subscribers([b]) as (back,):
                resumed = await back.subscribe(
                    "chat", CHAT, since_seq=last["seq"], epoch=before[1]["epoch"])
                assert resumed.get("reset") is True and "resumed" not in resumed, resumed
                assert resumed["epoch"] != before[1]["epoch"]
                assert count(resumed["data"]["messages"], "assistant", "before the restart") == 1

                # Sends work again, without restarting any relay, on every node alike.
                async with open_subscribers([a]) as (again,):
                    await again.subscribe("chat", CHAT)
                    await again.send_message(CHAT, "after the restart")
                    fresh = await agent_reply(again, "after the restart")
                    assert await agent_reply(back, "after the restart") == fresh
                    assert [p["seq"] for p in fresh] == list(
                        range(resumed["seq"] + 1, resumed["seq"] + 1 + len(fresh)))
            await recorder.wait_answer("after the restart")
            after_reset = recorder.events[
                max(i for i, e in enumerate(recorder.events) if isinstance(e, Reset)) + 1:]
            assert [e.seq for e in after_reset] == [p["seq"] for p in fresh]
            nursery.cancel_scope.cancel()


# --- 4. Redis frozen --------------------------------------------------------------------------


async def test_a_frozen_redis_turns_every_node_degraded_then_service_resumes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with open_cluster(tmp_path, redis_server) as nodes, \
            open_subscribers(nodes) as subscribers:
        for client in subscribers:
            await client.subscribe("chat", CHAT)
        await wait_health(nodes, 200, within=WAIT)
        async with open_client(Route([nodes[1]])) as library, trio.open_nursery() as nursery:
            recorder = Recorder()
            await nursery.start(recorder.run, library)
            await library.send(CHAT, "before the freeze")
            await recorder.wait_answer("before the freeze")
            for client in subscribers:
                await agent_reply(client, "before the freeze")

            redis_server.freeze()
            frozen_at = trio.current_time()
            try:
                # Each node's PING goes unanswered: degraded within about broker_timeout.
                took = await wait_health(nodes, 503, within=WAIT)
                assert took < TIMEOUT + 2.0, took
                for node in nodes:
                    status, body = await health(node)
                    assert (status, body["status"]) == (503, "degraded"), body
                    assert "broker" in body["reason"], body
                # A send is refused at once with a clear error frame; nothing hangs.
                with trio.fail_after(2 * TIMEOUT + 2):
                    reply = await subscribers[0].request(
                        "send", resourceId=CHAT, message="into the void")
                assert reply["type"] == "error" and "broker" in reply["error"], reply
                assert reply["code"] == "backend_error", reply  # a client may try again
                # Past broker_grace the subscribers are told to come back: 1012.
                for client in subscribers:
                    code, reason = await client.wait_closed()
                    assert code == CloseCode.SERVICE_RESTART, (code, reason)
                assert trio.current_time() - frozen_at >= GRACE
                # A node stopped meanwhile (a deploy during the outage) does not hang on it.
                nodes[2].process.terminate()
                with trio.fail_after(2 * TIMEOUT + 3):
                    assert await nodes[2].process.wait() == 0
            finally:
                redis_server.thaw()

            nodes = nodes[:2]
            await wait_health(nodes, 200, within=WAIT)
            with trio.fail_after(WAIT):
                await library.wait_state(ConnectionState.CONNECTED)
            async with open_subscribers([nodes[0]]) as (sender,):
                await sender.subscribe("chat", CHAT)
                await sender.send_message(CHAT, "after the thaw")
                await agent_reply(sender, "after the thaw")
            await recorder.wait_answer("after the thaw")
            # The library client resumed where it was: every event once, no Reset.
            assert library.last_close is not None
            assert library.last_close.code == CloseCode.SERVICE_RESTART
            assert not any(isinstance(e, Reset) for e in recorder.events), recorder.events
            seqs = recorder.seqs()
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            for node in nodes:  # refused, and so not stored
                assert count(await history(node), "user", "into the void") == 0
            nursery.cancel_scope.cancel()


# --- 5. the CLI's broker faults ---------------------------------------------------------------


def _run_serve(broker: str, data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_serve_command(broker, data_dir, *extra), capture_output=True,
                          text=True, timeout=WAIT * 3, env=_environ(), check=False)


def test_an_unreachable_broker_at_start_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    data = tmp_path / "data"
    started = time.monotonic()
    result = _run_serve(f"redis://:hunter2@127.0.0.1:{port}/0", data)
    took = time.monotonic() - started
    assert result.returncode == 1, result
    assert took < WAIT, took  # the default broker_timeout (5 s) bounds it
    assert result.stdout == ""  # nothing announced: it never served
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"trio-relay: cannot reach Redis at redis://127.0.0.1:{port}/0"), last
    assert "hunter2" not in result.stdout + result.stderr
    assert not data.exists()  # reached before anything is written, as a busy port is


async def test_a_broker_password_is_never_printed_or_logged(tmp_path: Path) -> None:
    secret = "s3cret-broker-password"
    server = RedisServer(find_redis_server(), tmp_path, password=secret)
    server.start()
    try:
        assert secret in server.url
        async with open_cluster(tmp_path, server, count=1, broker_from_env=True,
                                extra=[*FAST, "--log-level", "DEBUG"]) as (node,):
            async with open_subscribers([node]) as (client,):
                await client.subscribe("chat", CHAT)
                await client.send_message(CHAT, "with a password")
                await agent_reply(client, "with a password")
            # Redis away and back: what is logged then (its errors too) shows no password.
            server.kill()
            await wait_health([node], 503, within=WAIT)
            server.start()
            await wait_health([node], 200, within=WAIT)
        logs = node.logs()
        assert f"Redis at redis://127.0.0.1:{server.port}/0 is unreachable: " in logs
        assert f"Redis at redis://127.0.0.1:{server.port}/0 answers again" in logs
        assert secret not in logs
        assert secret not in "\n".join(node.printed)

        # A wrong password: refused at start, and neither password shown.
        wrong = server.url.replace(secret, "not-the-password")
        result = _run_serve(wrong, tmp_path / "other")
        assert result.returncode == 1, result
        assert f"cannot reach Redis at redis://127.0.0.1:{server.port}/0" in result.stderr
        assert "not-the-password" not in result.stdout + result.stderr
        assert not (tmp_path / "other").exists()
    finally:
        server.kill()
