"""End to end over real loopback sockets: trio-websocket's own client against the relay, and
against `trio-relay serve` started as a subprocess. Real time here, each wait bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from _helpers import Frame
from _processes import WAIT, read_line
from trio_websocket import ConnectionClosed

from trio_relay import open_relay
from trio_relay._store.sqlite import open_sqlite_backend
from trio_relay.testing import MemoryBackend, TestClient, open_loopback_client

pytestmark = pytest.mark.e2e



async def _login(ws: TestClient, pin: str) -> Frame:
    assert await ws.receive() == {"id": None, "type": "auth_required"}
    await ws.send({"id": "auth-1", "type": "auth", "pin": pin})
    return await ws.receive()


async def test_loopback_two_clients_see_the_same_stream() -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_relay(backend, pin="2468") as relay:
        port = await relay.start_serving("127.0.0.1", 0)
        url = f"ws://127.0.0.1:{port}/ws"
        async with open_loopback_client(url) as alice, open_loopback_client(url) as bob:
            for ws in (alice, bob):
                reply = await _login(ws, "2468")
                assert reply["type"] == "auth_success"
                assert reply["data"]["projects"] == [{"id": "p1", "name": "p1"}]
                await ws.send({"id": "s", "type": "subscribe", "resource": "chat",
                               "resourceId": "c1"})
                subscribed = await ws.receive()
                assert subscribed["type"] == "subscribed"
                assert subscribed["data"] == {"messages": []}
            await alice.send({"id": "send-1", "type": "send", "resourceId": "c1",
                              "message": "hello"})
            ack = await alice.reply_to("send-1")
            assert ack == {"id": "send-1", "type": "data", "resource": "chat",
                           "resourceId": "c1", "data": {"sent": True}}
            push = await alice.receive()  # read meanwhile, or the next frame
            assert push["data"]["message"]["content"] == "hello"
            assert await bob.receive() == push  # the very same frame, seq included
            assert relay.statistics().connections == 2


@asynccontextmanager
async def _serve_subprocess(data_dir: Path, pin: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """`trio-relay serve` in a subprocess; yields it and the URL it printed."""
    env = {**os.environ, "TRIO_RELAY_PIN": pin}
    command = [sys.executable, "-m", "trio_relay", "serve", "--port", "0",
               "--data-dir", str(data_dir)]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=env, check=False)
        )
        assert process.stdout is not None
        buffer = bytearray()
        first = await read_line(process.stdout, buffer)
        assert first.startswith("trio-relay serving ws://127.0.0.1:"), first
        assert await read_line(process.stdout, buffer) == "PIN: " + pin
        assert await read_line(process.stdout, buffer) == f"data: {data_dir}"
        port = first.rsplit(":", 1)[1].split("/")[0]
        assert await read_line(process.stdout, buffer) == f"web client: http://127.0.0.1:{port}/"
        try:
            yield process, first.split()[-1]
        finally:
            if process.returncode is None:
                process.kill()


async def _stop(process: trio.Process, signum: int) -> int:
    process.send_signal(signum)
    with trio.fail_after(WAIT):
        return await process.wait()


async def test_serve_subprocess_streams_echo_and_keeps_history(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with _serve_subprocess(data_dir, "97531") as (process, url):
        async with open_loopback_client(url) as ws:
            reply = await _login(ws, "97531")
            assert reply["type"] == "auth_success"
            assert [p["id"] for p in reply["data"]["projects"]] == ["demo"]
            assert {p["id"] for p in reply["data"]["modelProfiles"]} >= {"echo"}
            await ws.send({"id": "p", "type": "subscribe", "resource": "project",
                           "resourceId": "demo"})
            chats = (await ws.receive())["data"]["chats"]
            chat_id = chats[0]["id"]
            await ws.send({"id": "c", "type": "subscribe", "resource": "chat",
                           "resourceId": chat_id})
            history = (await ws.receive())["data"]["messages"]
            assert history and history[0]["role"] == "assistant"
            await ws.send({"id": "send-1", "type": "send", "resourceId": chat_id,
                           "message": "ping"})
            assert (await ws.reply_to("send-1"))["data"] == {"sent": True}
            pushes: list[Frame] = []
            # Streamed chunks arrive before the stored reply, all through the subscription.
            while not any(p["data"].get("type") == "message"
                          and p["data"]["message"]["role"] == "assistant" for p in pushes):
                pushes.append(await ws.receive())
            kinds = [p["data"]["type"] for p in pushes]
            assert kinds[0] == "message"  # the user's own message comes back first
            assert kinds.count("chunk") >= 2
            assert kinds.index("chunk") < kinds.index("message", 1)
            chunks = "".join(p["data"]["text"] for p in pushes if p["data"]["type"] == "chunk")
            final = pushes[-1]["data"]["message"]
            assert final["content"] == chunks
            assert "ping" in chunks
            seqs = [p["seq"] for p in pushes]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

            # SIGTERM: the client is closed with 1001 and the process exits 0.
            assert await _stop(process, signal.SIGTERM) == 0
            with pytest.raises(ConnectionClosed) as closed:
                await ws.receive()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1001

    # History survives a restart on the same data dir; Ctrl-C (SIGINT) stops it cleanly too.
    async with _serve_subprocess(data_dir, "97531") as (process, url):
        async with open_loopback_client(url) as ws:
            await _login(ws, "97531")
            await ws.send({"id": "c", "type": "subscribe", "resource": "chat",
                           "resourceId": chat_id})
            contents = [m["content"] for m in (await ws.receive())["data"]["messages"]]
            assert "ping" in contents
            assert final["content"] in contents
            assert await _stop(process, signal.SIGINT) == 0


async def _http_get(url: str, path: str) -> bytes:
    """One plain HTTP request over a real socket, the connection closed after it."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                              "Connection: close\r\n\r\n".encode())
        received = b""
        with trio.fail_after(WAIT):
            while chunk := await stream.receive_some():
                received += chunk
    return received


async def test_serve_answers_the_page_health_and_metrics_on_its_port(tmp_path: Path) -> None:
    async with _serve_subprocess(tmp_path / "data", "24680") as (process, url):
        page = await _http_get(url, "/")
        assert page.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/html; charset=utf-8\r\n" in page
        assert b'<script type="module"' in page
        health = await _http_get(url, "/healthz")
        assert health.startswith(b"HTTP/1.1 200 OK\r\n")
        assert json.loads(health.partition(b"\r\n\r\n")[2])["status"] == "ok"
        async with open_loopback_client(url) as ws:
            assert (await _login(ws, "24680"))["type"] == "auth_success"
            metrics = (await _http_get(url, "/metrics")).decode()
            assert "\ntrio_relay_connections 1\n" in metrics
            assert "\ntrio_relay_authenticated_connections 1\n" in metrics
        assert (await _http_get(url, "/nothing")).startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert await _stop(process, signal.SIGTERM) == 0


async def test_serve_generates_a_pin_when_none_is_given(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRIO_RELAY_PIN"}
    command = [sys.executable, "-m", "trio_relay", "serve", "--port", "0",
               "--data-dir", str(tmp_path)]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=env, check=False)
        )
        assert process.stdout is not None
        buffer = bytearray()
        url = (await read_line(process.stdout, buffer)).split()[-1]
        pin_line = await read_line(process.stdout, buffer)
        pin = pin_line.split()[1]
        assert pin.isdigit() and len(pin) == 6
        async with open_loopback_client(url) as ws:
            assert (await _login(ws, pin))["type"] == "auth_success"
        assert await _stop(process, signal.SIGTERM) == 0
        assert process.stderr is not None
        logs = (await process.stderr.receive_some(1 << 20)).decode()
        assert pin not in logs  # printed once on stdout, never logged


async def test_sqlite_backend_in_process_over_loopback(tmp_path: Path) -> None:
    async with open_sqlite_backend(tmp_path) as backend:
        async with open_relay(backend, pin="1111") as relay:
            port = await relay.start_serving("127.0.0.1", 0)
            async with relay.listen("chat", "welcome") as host_view:
                async with open_loopback_client(f"ws://127.0.0.1:{port}/ws") as ws:
                    await _login(ws, "1111")
                    await ws.send({"id": "c", "type": "subscribe", "resource": "chat",
                                   "resourceId": "welcome"})
                    assert (await ws.receive())["seq"] == host_view.seq
                    await relay.send("welcome", "from the host")
                    web = await ws.receive()
                    with trio.fail_after(WAIT):
                        host = await host_view.__anext__()
                    assert web["data"] == host.data
                    assert web["seq"] == host.seq
                    assert host.data["message"]["content"] == "from the host"


def test_serve_tunes_the_garbage_collector() -> None:
    import gc

    from trio_relay._settings.cli import GC_THRESHOLDS, tune_garbage_collector

    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
