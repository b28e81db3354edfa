"""``trio-relay chat``: the terminal client, in process over memory streams (mock time) and end
to end against ``trio-relay serve`` with the command's own stdin (real time, each wait bounded).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_relay._chat_cli import add_chat_command, run_chat
from trio_relay._echo_agent import EchoAgent
from trio_relay._protocol import ResourceKey
from trio_relay.testing import MemoryBackend, MemoryRelay, open_memory_relay

PIN = "1234"
URL = "ws://relay.test/ws"
WAIT = 10.0


class EchoBackend(MemoryBackend):
    """A memory backend that answers every message as the default backend's echo agent
    does: ``reply_started``, the answer in timed chunks, then the stored message."""

    def __init__(self) -> None:
        super().__init__()
        self.nursery: trio.Nursery | None = None
        self.agent = EchoAgent(chunk_delay=0.05)
        self.reply_lock = trio.Lock()  # one reply at a time, as the default backend does

    async def send_message(self, chat_id: str, message: Any, *, sender: Any = None) -> None:
        await super().send_message(chat_id, message, sender=sender)
        assert self.nursery is not None
        self.nursery.start_soon(self._reply, chat_id, self.messages[chat_id][-1]["content"])

    async def _reply(self, chat_id: str, content: str) -> None:
        message_id = f"reply-{len(self.messages[chat_id])}"
        async with self.reply_lock:
            await self._stream_reply(chat_id, message_id, content)

    async def _stream_reply(self, chat_id: str, message_id: str, content: str) -> None:
        self.emit("chat", chat_id, {"type": "reply_started", "messageId": message_id})
        def chunk(piece: str) -> None:
            self.emit("chat", chat_id, {"type": "chunk", "messageId": message_id, "text": piece})

        text = await self.agent.reply(content, chunk)
        message = {"id": message_id, "chatId": chat_id, "role": "assistant", "content": text}
        self.messages[chat_id].append(message)
        self.hub.publish(ResourceKey("chat", chat_id), {"type": "message", "message": message})


class Screen(io.StringIO):
    """stdout, remembering when each piece was written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((trio.current_time(), text))
        return super().write(text)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trio-relay")
    add_chat_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["chat", *argv])


@asynccontextmanager
async def echo_relay() -> AsyncIterator[tuple[EchoBackend, MemoryRelay]]:
    backend = EchoBackend()
    backend.add_project("p1", "Project one")
    backend.add_chat("p1", "c1", title="First chat")
    backend.add_message("c1", "Welcome!", role="assistant")
    backend.add_chat("p1", "c2", title="Second chat")
    async with trio.open_nursery() as nursery:
        backend.nursery = nursery
        async with open_memory_relay(backend, pin=PIN) as relay:
            yield backend, relay
        nursery.cancel_scope.cancel()


async def test_prints_history_then_the_streamed_reply_to_a_line(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with echo_relay() as (backend, relay):
        keyboard, stdin = trio.testing.memory_stream_one_way_pair()
        await keyboard.send_all(b"hello there\n")
        await keyboard.aclose()  # end of input after one line
        screen, errors = Screen(), io.StringIO()
        status = await run_chat(parse(URL, "--pin", PIN), stdin=stdin, stdout=screen,
                                stderr=errors, connect=relay.connector())
        assert status == 0, errors.getvalue()
        assert screen.getvalue().splitlines() == [
            "Projects:",
            "  Project one (p1)",
            "    First chat (c1)",
            "    Second chat (c2)",
            "-- First chat (c1); type a message and press Enter, end of input or Ctrl-C to leave",
            "[assistant] Welcome!",
            "[user] hello there",
            "[assistant] Echo: hello there",
        ]
        assert backend.sent == [("c1", "hello there")]
        # The reply was printed piece by piece, as the agent produced it.
        start = next(i for i, (_, text) in enumerate(screen.writes) if text == "[assistant] ")
        pieces = [(t, text) for t, text in screen.writes[start + 1:] if text != "\n"]
        assert "".join(text for _, text in pieces) == "Echo: hello there"
        assert len(pieces) > 1
        assert len({t for t, _ in pieces}) == len(pieces)  # each at its own time
        assert errors.getvalue() == ""
        assert (await relay.quiet_statistics()).connections == 0


async def test_chooses_a_chat_interactively_and_takes_the_pin_from_the_environment(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with echo_relay() as (backend, relay):
        keyboard, stdin = trio.testing.memory_stream_one_way_pair()
        await keyboard.send_all(b"7\n2\nfirst\nsecond\n")  # typed ahead: replies overlap
        await keyboard.aclose()
        screen = Screen()
        status = await run_chat(parse(URL), stdin=stdin, stdout=screen, stderr=io.StringIO(),
                                connect=relay.connector(), environ={"TRIO_RELAY_PIN": PIN},
                                interactive=True)
        assert status == 0
        output = screen.getvalue()
        assert "  2) Second chat (c2) in Project one\n" in output
        assert "No chat '7'." in output
        lines = output.splitlines()
        # (the answers to the prompt are not echoed: the input is not a terminal)
        start = next(i for i, line in enumerate(lines) if line.endswith(
            "-- Second chat (c2); type a message and press Enter, end of input or Ctrl-C to"
            " leave"))
        # The second message broke into the first reply's line: that reply is printed whole
        # once stored, and the second streams on a line of its own.
        assert lines[start + 1] == "[user] first"
        assert lines[start + 2].startswith("[assistant] ")
        assert lines[start + 3:] == ["[user] second", "[assistant] Echo: first",
                                     "[assistant] Echo: second"]
        assert backend.sent == [("c2", "first"), ("c2", "second")]


async def test_reports_a_lost_connection_and_carries_on(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (_, relay):
        transport = relay.connector()
        keyboard, stdin = trio.testing.memory_stream_one_way_pair()
        screen, errors = Screen(), io.StringIO()

        async def type_and_cut() -> None:
            await keyboard.send_all(b"before\n")
            await trio.sleep(0.12)  # mid-reply
            await transport.cut()
            await trio.sleep(5)
            await keyboard.send_all(b"after\n")
            await keyboard.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(type_and_cut)
            status = await run_chat(parse(URL, "--pin", PIN, "--chat", "c1"), stdin=stdin,
                                    stdout=screen, stderr=errors, connect=transport)
        assert status == 0
        assert errors.getvalue().startswith("-- connection lost (1006")
        assert errors.getvalue().endswith("; reconnecting\n-- reconnected\n")
        lines = screen.getvalue().splitlines()
        assert lines[-2:] == ["[user] after", "[assistant] Echo: after"]
        assert "[user] before" in lines
        # The first reply, interrupted on screen, completed meanwhile: resumed, it goes on.
        assert any(line.startswith("[assistant] Echo") and "before" in line for line in lines)


async def test_failures_exit_1_with_a_message(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (_, relay):
        errors = io.StringIO()
        status = await run_chat(parse(URL, "--pin", "0000"),
                                stdin=trio.testing.MemoryReceiveStream(), stdout=io.StringIO(),
                                stderr=errors, connect=relay.connector())
        assert status == 1
        assert "authentication failed: Invalid PIN" in errors.getvalue()
        errors = io.StringIO()
        status = await run_chat(parse(URL, "--pin", PIN, "--chat", "nope"),
                                stdin=trio.testing.MemoryReceiveStream(), stdout=io.StringIO(),
                                stderr=errors, connect=relay.connector())
        assert status == 1
        assert "not_found" in errors.getvalue()
    errors = io.StringIO()
    assert await run_chat(parse("http://x/ws", "--pin", PIN), stderr=errors) == 1
    assert "ws://" in errors.getvalue()
    errors = io.StringIO()
    assert await run_chat(parse(URL), environ={}, stderr=errors,
                          stdin=trio.testing.MemoryReceiveStream()) == 1
    assert "no PIN" in errors.getvalue()


# --- end to end -------------------------------------------------------------------------------


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    with trio.fail_after(WAIT):
        while b"\n" not in buffer:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"exited early; output so far: {bytes(buffer)!r}")
            buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


@asynccontextmanager
async def serve_subprocess(data_dir: Path) -> AsyncIterator[str]:
    """`trio-relay serve` in a subprocess; yields the URL it printed."""
    env = {**os.environ, "TRIO_RELAY_PIN": PIN}
    command = [sys.executable, "-m", "trio_relay", "serve", "--port", "0",
               "--data-dir", str(data_dir)]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(
            trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, check=False))
        assert process.stdout is not None
        url = (await _read_line(process.stdout, bytearray())).split()[-1]
        try:
            yield url
        finally:
            process.terminate()
            with trio.fail_after(WAIT):
                await process.wait()


@pytest.mark.e2e
async def test_the_command_against_trio_relay_serve(tmp_path: Path) -> None:
    """The real command, its stdin a pipe, over loopback TCP to the real default backend."""
    async with serve_subprocess(tmp_path) as url:
        env = {**os.environ, "TRIO_RELAY_PIN": PIN}
        with trio.fail_after(WAIT):
            result = await trio.run_process(
                [sys.executable, "-m", "trio_relay", "chat", url, "--chat", "welcome"],
                stdin=b"ping\n", capture_stdout=True, capture_stderr=True, env=env,
                check=False)
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "  Demo project (demo)\n    Welcome (welcome)\n" in output
    lines = output.splitlines()
    history = lines.index("-- Welcome (welcome); type a message and press Enter, end of input"
                          " or Ctrl-C to leave")
    assert lines[history + 1].startswith("[assistant] Welcome to trio-relay!")
    assert lines[-2:] == ["[user] ping", "[assistant] Echo: ping"]
