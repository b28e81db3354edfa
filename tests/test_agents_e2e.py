"""`trio-relay serve --config` with command agents, in a subprocess, over real loopback sockets:
chunks stream while the command runs, cancel and shutdown leave no process behind.

Real time; every wait is bounded.
"""

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
from _processes import HANGING, WAIT, alive, read_line, wait_for_file, wait_gone

from trio_relay.testing import TestClient, open_loopback_client

pytestmark = pytest.mark.e2e

PIN = "86420"

# Writes a line, waits for the file $GATE, writes another: the first line can only be seen by
# a client while the command is still running.
GATED = f"""#!{sys.executable}
import os, sys, time
sys.stdout.write("first\\n"); sys.stdout.flush()
deadline = time.monotonic() + 10
while not os.path.exists(os.environ["GATE"]) and time.monotonic() < deadline:
    time.sleep(0.01)
sys.stdout.write("second: " + sys.stdin.read() + "\\n"); sys.stdout.flush()
"""


def _config(tmp_path: Path) -> Path:
    agents = tmp_path / "agents"
    agents.mkdir()
    gated = agents / "gated.py"
    gated.write_text(GATED)
    gated.chmod(0o755)
    config = tmp_path / "relay.toml"
    config.write_text(f"""
data_dir = "data"
log_level = "DEBUG"

[[model_profiles]]
id = "gated"
name = "Gated"
agent = "command"
argv = ["agents/gated.py"]
env = {{ GATE = "gate" }}
cwd = "."

[[model_profiles]]
id = "hang"
name = "Hang"
agent = "command"
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(HANGING)}]
env = {{ PIDS = {json.dumps(str(tmp_path / "pids"))} }}

[[model_profiles]]
id = "ghost"
name = "Ghost"
agent = "command"
argv = ["no-such-agent-program-xyz"]
""")
    return config


async def _read_pids(path: Path) -> list[int]:
    await wait_for_file(path)
    return [int(pid) for pid in (await trio.Path(path).read_text()).split()]


async def pushes_until(client: TestClient, kind: str) -> list[Frame]:
    """Chat pushes up to the first of type ``kind`` (a user's message does not count)."""
    seen = []
    while True:
        frame = await client.receive()  # pushes held while a reply was awaited come first
        seen.append(frame)
        data = frame["data"]
        if data.get("type") == kind and not (
            kind == "message" and data["message"]["role"] == "user"
        ):
            return seen


@asynccontextmanager
async def _serve(config: Path, log: Path) -> AsyncIterator[tuple[trio.Process, str]]:
    """`trio-relay serve --config` in a subprocess; yields it and its URL."""
    env = {**os.environ, "TRIO_RELAY_PIN": PIN}
    command = [sys.executable, "-m", "trio_relay", "serve", "--config", str(config),
               "--port", "0"]
    with log.open("wb") as stderr:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=stderr,
                        env=env, check=False)
            )
            assert process.stdout is not None
            buffer = bytearray()
            first = await read_line(process.stdout, buffer)
            assert first.startswith("trio-relay serving ws://127.0.0.1:"), first
            try:
                yield process, first.split()[-1]
            finally:
                if process.returncode is None:
                    process.kill()


async def _open_chat(client: TestClient, profile: str) -> str:
    created = await client.request("create", resource="chat", resourceId="demo",
                                   message={"title": profile, "modelProfileId": profile})
    chat = created["data"]["chat"]
    assert chat["modelProfileId"] == profile
    subscribed = await client.request("subscribe", resource="chat", resourceId=chat["id"])
    assert subscribed["type"] == "subscribed", subscribed
    chat_id: str = chat["id"]
    return chat_id


async def test_serve_config_streams_a_command_cancels_it_and_cleans_up(tmp_path: Path) -> None:
    config = _config(tmp_path)
    log = tmp_path / "relay.log"
    async with _serve(config, log) as (process, url), open_loopback_client(url) as client:
        assert await client.receive() == {"id": None, "type": "auth_required"}
        auth = await client.request("auth", pin=PIN)
        assert auth["type"] == "auth_success"
        # The config's profiles replaced the seeded ones; clients never see the commands.
        assert auth["data"]["modelProfiles"] == [
            {"id": "gated", "name": "Gated", "agent": "command"},
            {"id": "hang", "name": "Hang", "agent": "command"},
            {"id": "ghost", "name": "Ghost", "agent": "command"},
        ]

        # Chunks arrive while the command runs: it cannot finish before we open its gate.
        chat_id = await _open_chat(client, "gated")
        sent = await client.request("send", resourceId=chat_id, message="hello")
        assert sent["data"] == {"sent": True}
        before = await pushes_until(client, "chunk")
        assert [p["data"]["type"] for p in before] == ["message", "reply_started", "chunk"]
        assert before[-1]["data"]["text"] == "first\n"
        (tmp_path / "gate").touch()
        after = await pushes_until(client, "message")
        chunks = "".join(p["data"]["text"] for p in [*before, *after]
                         if p["data"]["type"] == "chunk")
        final = after[-1]["data"]["message"]
        assert final["content"] == chunks == "first\nsecond: hello\n"
        assert final["id"] == before[1]["data"]["messageId"]

        # A missing program: an error in the chat, and the relay goes on.
        ghost = await _open_chat(client, "ghost")
        await client.request("send", resourceId=ghost, message="boo")
        error = (await pushes_until(client, "error"))[-1]["data"]
        assert error["error"] == "agent could not start: program 'no-such-agent-program-xyz'" \
            " not found"

        # cancel from a client kills the command's whole process group.
        hang = await _open_chat(client, "hang")
        await client.request("send", resourceId=hang, message="wait")
        started = await pushes_until(client, "chunk")
        pids = await _read_pids(tmp_path / "pids")
        assert all(alive(pid) for pid in pids)
        cancel = await client.request("cancel", resourceId=hang)
        assert cancel["data"] == {"cancelled": True}
        cancelled = (await pushes_until(client, "cancelled"))[-1]["data"]
        assert cancelled == {"type": "cancelled", "messageId": started[1]["data"]["messageId"]}
        await wait_gone(pids)

        # A shutdown with a command running leaves nothing behind either.
        (tmp_path / "pids").unlink()
        await client.request("send", resourceId=hang, message="wait again")
        await pushes_until(client, "chunk")
        pids = await _read_pids(tmp_path / "pids")
        assert all(alive(pid) for pid in pids)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
        await wait_gone(pids)

    logs = log.read_text()
    assert "model profiles replaced (3 profiles)" in logs
    assert f"WARNING | {config}: model_profiles[2].argv: program 'no-such-agent-program-xyz'" \
        " not found on PATH" in logs
    assert "ERROR   | resource=chat:" in logs
    assert "agent failed: ghost: could not start: program 'no-such-agent-program-xyz'" \
        " not found" in logs
    assert "reply cancelled" in logs
    assert PIN not in logs
    assert "hello" not in logs  # message contents are never logged
