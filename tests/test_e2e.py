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
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from trio_relay import open_relay
from trio_relay._sqlite_backend import open_sqlite_backend
from trio_relay.testing import MemoryBackend

pytestmark = pytest.mark.e2e

Frame = dict[str, Any]
WAIT = 10.0  # generous bound on any single wait; the tests finish in well under it


@asynccontextmanager
async def open_websocket_url(url: str) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client that owns its TCP stream.

    trio-websocket's own `open_websocket_url` leaves the client's socket open when the server
    starts the closing handshake (its `aclose` returns early once a close reason is set), which
    pytest reports as an unclosed socket; closing the stream ourselves avoids that.
    """
    host_port, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = host_port.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, host, "/" + path)
            try:
                yield ws
            finally:
                await ws.aclose()
    finally:
        await stream.aclose()


async def _send(ws: WebSocketConnection, frame: Frame) -> None:
    await ws.send_message(json.dumps(frame))


async def _receive(ws: WebSocketConnection) -> Frame:
    with trio.fail_after(WAIT):
        text = await ws.get_message()
    assert isinstance(text, str)
    frame: Frame = json.loads(text)
    return frame


async def _reply(ws: WebSocketConnection, request_id: str, pushes: list[Frame]) -> Frame:
    """Read until the reply to ``request_id``; pushes read meanwhile go into ``pushes``."""
    while True:
        frame = await _receive(ws)
        if frame["id"] == request_id:
            return frame
        pushes.append(frame)


async def _login(ws: WebSocketConnection, pin: str) -> Frame:
    assert await _receive(ws) == {"id": None, "type": "auth_required"}
    await _send(ws, {"id": "auth-1", "type": "auth", "pin": pin})
    return await _receive(ws)


async def test_loopback_two_clients_see_the_same_stream() -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_relay(backend, pin="2468") as relay:
        port = await relay.start_serving("127.0.0.1", 0)
        url = f"ws://127.0.0.1:{port}/ws"
        async with open_websocket_url(url) as alice, open_websocket_url(url) as bob:
            for ws in (alice, bob):
                reply = await _login(ws, "2468")
                assert reply["type"] == "auth_success"
                assert reply["data"]["projects"] == [{"id": "p1", "name": "p1"}]
                await _send(ws, {"id": "s", "type": "subscribe", "resource": "chat",
                                 "resourceId": "c1"})
                subscribed = await _receive(ws)
                assert subscribed["type"] == "subscribed"
                assert subscribed["data"] == {"messages": []}
            await _send(alice, {"id": "send-1", "type": "send", "resourceId": "c1",
                                "message": "hello"})
            pushes: list[Frame] = []
            ack = await _reply(alice, "send-1", pushes)
            assert ack == {"id": "send-1", "type": "data", "resource": "chat",
                           "resourceId": "c1", "data": {"sent": True}}
            push = pushes[0] if pushes else await _receive(alice)
            assert push["data"]["message"]["content"] == "hello"
            assert await _receive(bob) == push  # the very same frame, seq included
            assert relay.statistics().connections == 2


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    with trio.fail_after(WAIT):
        while b"\n" not in buffer:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"relay exited early; output so far: {bytes(buffer)!r}")
            buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


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
        first = await _read_line(process.stdout, buffer)
        assert first.startswith("trio-relay serving ws://127.0.0.1:"), first
        assert await _read_line(process.stdout, buffer) == "PIN: " + pin
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
        async with open_websocket_url(url) as ws:
            reply = await _login(ws, "97531")
            assert reply["type"] == "auth_success"
            assert [p["id"] for p in reply["data"]["projects"]] == ["demo"]
            assert {p["id"] for p in reply["data"]["modelProfiles"]} >= {"echo"}
            await _send(ws, {"id": "p", "type": "subscribe", "resource": "project",
                             "resourceId": "demo"})
            chats = (await _receive(ws))["data"]["chats"]
            chat_id = chats[0]["id"]
            await _send(ws, {"id": "c", "type": "subscribe", "resource": "chat",
                             "resourceId": chat_id})
            history = (await _receive(ws))["data"]["messages"]
            assert history and history[0]["role"] == "assistant"
            await _send(ws, {"id": "send-1", "type": "send", "resourceId": chat_id,
                             "message": "ping"})
            pushes: list[Frame] = []
            assert (await _reply(ws, "send-1", pushes))["data"] == {"sent": True}
            # Streamed chunks arrive before the stored reply, all through the subscription.
            while not any(p["data"].get("type") == "message"
                          and p["data"]["message"]["role"] == "assistant" for p in pushes):
                pushes.append(await _receive(ws))
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
                await _receive(ws)
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1001

    # History survives a restart on the same data dir; Ctrl-C (SIGINT) stops it cleanly too.
    async with _serve_subprocess(data_dir, "97531") as (process, url):
        async with open_websocket_url(url) as ws:
            await _login(ws, "97531")
            await _send(ws, {"id": "c", "type": "subscribe", "resource": "chat",
                             "resourceId": chat_id})
            contents = [m["content"] for m in (await _receive(ws))["data"]["messages"]]
            assert "ping" in contents
            assert final["content"] in contents
            assert await _stop(process, signal.SIGINT) == 0


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
        url = (await _read_line(process.stdout, buffer)).split()[-1]
        pin_line = await _read_line(process.stdout, buffer)
        pin = pin_line.split()[1]
        assert pin.isdigit() and len(pin) == 6
        async with open_websocket_url(url) as ws:
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
                async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                    await _login(ws, "1111")
                    await _send(ws, {"id": "c", "type": "subscribe", "resource": "chat",
                                     "resourceId": "welcome"})
                    assert (await _receive(ws))["seq"] == host_view.seq
                    await relay.send("welcome", "from the host")
                    web = await _receive(ws)
                    with trio.fail_after(WAIT):
                        host = await host_view.__anext__()
                    assert web["data"] == host.data
                    assert web["seq"] == host.seq
                    assert host.data["message"]["content"] == "from the host"
