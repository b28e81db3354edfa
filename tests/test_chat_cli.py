"""``trio-relay chat``: the terminal client.

In process over memory streams (mock time), with input as from a pipe; then the real command
end to end against ``trio-relay serve``: with a pipe as stdin, and in a pseudo-terminal whose
screen is rendered by a terminal emulator (pyte), as a person at a terminal sees it. Real
time there, every wait bounded, and no sleep guessing how long something takes: tests wait
for what the screen shows.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyte
import pytest
import trio
import trio.testing
import wcwidth

from trio_relay._agents.echo import EchoAgent
from trio_relay._chat import add_chat_command, run_chat
from trio_relay._wire.protocol import ResourceKey
from trio_relay.client import open_relay_client
from trio_relay.testing import MemoryBackend, MemoryRelay, open_memory_relay

PIN = "1234"
URL = "ws://relay.test/ws"
WAIT = 10.0
HEADER = ": type a message and press Enter; /help for commands"


class EchoBackend(MemoryBackend):
    """A memory backend that answers every message as the default backend's echo agent
    does: ``reply_started``, the answer in timed chunks, then the stored message. A reply
    can be stopped (``cancel_reply``)."""

    def __init__(self) -> None:
        super().__init__()
        self.nursery: trio.Nursery | None = None
        self.agent = EchoAgent(chunk_delay=0.05)
        self.reply_lock = trio.Lock()  # one reply at a time, as the default backend does
        self.running: dict[str, tuple[trio.CancelScope, str]] = {}
        self.first_chunk = trio.Event()

    async def send_message(self, chat_id: str, message: Any, *, sender: Any = None) -> None:
        await super().send_message(chat_id, message, sender=sender)
        assert self.nursery is not None
        self.nursery.start_soon(self._reply, chat_id, self.messages[chat_id][-1]["content"])

    async def _reply(self, chat_id: str, content: str) -> None:
        message_id = f"reply-{len(self.messages[chat_id])}"
        async with self.reply_lock:
            with trio.CancelScope() as scope:
                self.running[chat_id] = (scope, message_id)
                try:
                    await self._stream_reply(chat_id, message_id, content)
                finally:
                    del self.running[chat_id]

    async def _stream_reply(self, chat_id: str, message_id: str, content: str) -> None:
        self.emit("chat", chat_id, {"type": "reply_started", "messageId": message_id})

        def chunk(piece: str) -> None:
            self.first_chunk.set()
            self.emit("chat", chat_id, {"type": "chunk", "messageId": message_id, "text": piece})

        text = await self.agent.reply(content, chunk)
        message = {"id": message_id, "chatId": chat_id, "role": "assistant", "content": text}
        self.messages[chat_id].append(message)
        self.hub.publish(ResourceKey("chat", chat_id), {"type": "message", "message": message})

    async def cancel_reply(self, chat_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        if chat_id not in self.running:
            return False
        scope, message_id = self.running[chat_id]
        scope.cancel()
        self.emit("chat", chat_id, {"type": "cancelled", "messageId": message_id})
        return True


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


async def piped(relay: MemoryRelay, *argv: str, typed: bytes = b"", pin: str | None = PIN,
                **options: Any) -> tuple[int, str, str]:
    """Run the command with ``typed`` as its whole input (and ``--pin``, unless None); its
    status, stdout and stderr."""
    keyboard, stdin = trio.testing.memory_stream_one_way_pair()
    await keyboard.send_all(typed)
    await keyboard.aclose()
    screen, errors = Screen(), io.StringIO()
    pin_option = ("--pin", pin) if pin is not None else ()
    status = await run_chat(parse(URL, *pin_option, *argv), stdin=stdin, stdout=screen,
                            stderr=errors, connect=relay.connector(), **options)
    return status, screen.getvalue(), errors.getvalue()


@pytest.fixture(autouse=True)
def _config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Device tokens go to a folder of the test's own, never to the user's."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return home


LISTING = [
    "Projects:",
    "  Project one (p1)",
    "    1) First chat (c1)",
    "    2) Second chat (c2)",
]


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
            *LISTING,
            "-- First chat (c1)" + HEADER,
            "Agent: Welcome!",
            "You: hello there",
            "Agent: Echo: hello there",
        ]
        assert backend.sent == [("c1", "hello there")]
        # The reply was printed piece by piece, as the agent produced it.
        start = next(i for i, (_, text) in enumerate(screen.writes)
                     if text == "Agent: " and "hello there" in screen.writes[i - 1][1])
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
        assert "\n    2) Second chat (c2)\n" in output
        # (the answers to the question are not echoed: the input is not a terminal)
        assert "Chat [1-2, default 1]: No chat '7'.\nChat [1-2, default 1]: " in output
        lines = output.splitlines()
        start = next(i for i, line in enumerate(lines) if line.endswith(
            "-- Second chat (c2)" + HEADER))
        # The second message came before the first reply's first piece: that reply is
        # printed whole once stored, and the second streams on a line of its own.
        assert lines[start + 1:] == ["You: first", "You: second", "Agent: Echo: first",
                                     "Agent: Echo: second"]
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
        assert lines[-2:] == ["You: after", "Agent: Echo: after"]
        assert "You: before" in lines
        # The first reply, interrupted on screen, completed meanwhile: resumed, it goes on.
        assert any(line.startswith("Agent: Echo") and "before" in line for line in lines)


async def test_failures_exit_1_with_a_message(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (_, relay):
        status, _, errors = await piped(relay, "--pin", "0000")
        assert status == 1
        assert "authentication failed: Invalid PIN" in errors
        status, _, errors = await piped(relay, "--chat", "nope")
        assert status == 1
        assert "not_found" in errors
    stderr = io.StringIO()
    assert await run_chat(parse("http://x/ws", "--pin", PIN), stderr=stderr) == 1
    assert "ws://" in stderr.getvalue()
    stderr = io.StringIO()
    assert await run_chat(parse(URL), environ={}, stderr=stderr,
                          stdin=trio.testing.MemoryReceiveStream()) == 1
    assert "no PIN" in stderr.getvalue()


def _in_order(lines: list[str], *expected: str) -> None:
    """Each of ``expected`` is a line of ``lines``, in this order (others may come between)."""
    position = 0
    for line in expected:
        assert line in lines[position:], f"{line!r} missing after line {position}: {lines}"
        position = lines.index(line, position) + 1


async def test_commands(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (backend, relay):
        status, output, errors = await piped(relay, typed=(
            b"/help\n/chats\n/open 2\n/open 9\n/open\n/open nope\n/bogus thing\n/\n"
            b"//slash\n/stop\n/new Fresh start\n/open c1\n/QUIT\nnever sent\n"
        ))
        assert status == 0, errors
    lines = output.splitlines()
    fresh = next(c for c in backend.chats.values() if c["title"] == "Fresh start")
    _in_order(
        lines,
        *LISTING,
        "-- First chat (c1)" + HEADER,
        "Agent: Welcome!",
        "-- commands:",
        "--   /chats         list the projects and their chats, numbered",
        "--   /open N|ID     open chat number N of that list, or the chat with that id",
        "--   /new [TITLE]   create a chat in this chat's project and open it",
        "--   /stop          stop the agent's reply in progress",
        "--   /quit          leave (as do Ctrl-C, and Ctrl-D on an empty line)",
        "--   /help          this list",
        "-- Any other line is sent to the chat; to send one starting with /, type //.",
        "Projects:",
        "  Project one (p1)",
        "    1) First chat (c1)  <- open",
        "    2) Second chat (c2)",
        "-- Second chat (c2)" + HEADER,
        "-- no chat number 9: /chats lists them",
        "-- /open N or /open ID: N from /chats, or a chat's id",
        "-- cannot open nope: chat 'nope' not found (not_found)",
        "-- unknown command /bogus (nothing was sent): /help lists the commands; // sends a"
        " line starting with /",
        "-- unknown command / (nothing was sent): /help lists the commands; // sends a line"
        " starting with /",
        "You: /slash",
    )
    # (/stop came while the echo agent was answering /slash)
    _in_order(lines, "You: /slash", "-- reply stopped",
              f"-- Fresh start ({fresh['id']})" + HEADER, "-- First chat (c1)" + HEADER)
    # Only the line that was meant to be sent was; nothing after /quit.
    assert backend.sent == [("c2", "/slash")]
    assert fresh["projectId"] == "p1"
    assert "never sent" not in output


async def test_a_relay_without_chats(autojump_clock: trio.abc.Clock) -> None:
    backend = EchoBackend()
    backend.add_project("p1", "Project one")
    async with trio.open_nursery() as nursery:
        backend.nursery = nursery
        async with open_memory_relay(backend, pin=PIN) as relay:
            status, output, errors = await piped(relay, typed=b"hello\n/new First\nhello\n")
        nursery.cancel_scope.cancel()
    assert status == 0, errors
    chat_id = next(iter(backend.chats))
    assert output.splitlines() == [
        "Projects:",
        "  Project one (p1)",
        "-- no chats yet: /new TITLE creates one",
        "-- no chat is open: /chats and /open to choose one",
        f"-- First ({chat_id})" + HEADER,
        "You: hello",
        "Agent: Echo: hello",
    ]
    assert backend.sent == [(chat_id, "hello")]


async def test_stop_ends_the_reply_in_progress(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (backend, relay):
        keyboard, stdin = trio.testing.memory_stream_one_way_pair()

        async def type_lines() -> None:
            await keyboard.send_all(b"a long question\n")
            await backend.first_chunk.wait()
            await keyboard.send_all(b"/stop\n")
            await keyboard.aclose()

        screen = Screen()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(type_lines)
            start = trio.current_time()
            status = await run_chat(parse(URL, "--pin", PIN, "--chat", "c1"), stdin=stdin,
                                    stdout=screen, stderr=io.StringIO(),
                                    connect=relay.connector())
            took = trio.current_time() - start
        assert status == 0
        lines = screen.getvalue().splitlines()
        assert lines[-3] == "You: a long question"
        assert lines[-2].startswith("Agent: Echo")  # its line, as far as it had come
        assert lines[-2] != "Agent: Echo: a long question"
        assert lines[-1] == "-- reply stopped"
        assert [m["role"] for m in backend.messages["c1"]] == ["assistant", "user"]
        assert took < 1  # no --linger wait for a reply that was stopped


async def test_labels_who_wrote_what(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (backend, relay):
        senders: list[Any] = [
            None,  # from before senders existed
            {"deviceId": "d_0123456789ab", "name": "Firefox on Android"},
            {"name": "Desktop app"},
            {"name": "   "},
        ]
        for number, sender in enumerate(senders):
            message = backend.add_message("c2", f"message {number}", role="user")
            if sender is not None:
                message["sender"] = sender
        backend.add_message("c2", "evil \x1b[2J\x1b]0;title\x07 text\rback", role="assistant")
        status, output, _ = await piped(relay, "--chat", "c2")
        assert status == 0
    assert output.splitlines()[-5:] == [
        "You: message 0",
        "Firefox on Android: message 1",
        "Desktop app: message 2",
        "You: message 3",
        # A message cannot drive the terminal: control characters are shown, not obeyed.
        "Agent: evil ^[[2J^[]0;title^G text^Mback",
    ]


async def test_pairs_once_then_signs_in_with_its_token_and_knows_its_own_messages(
    autojump_clock: trio.abc.Clock, _config_home: Path,
) -> None:
    async with echo_relay() as (backend, relay):
        # Another device wrote first.
        async with open_relay_client(relay.url, pin=PIN, device_name="Firefox on Android",
                                     connect=relay.connector()) as phone:
            await phone.send("c2", "from the phone")
        status, output, errors = await piped(relay, "--chat", "c2", "--name", "Laptop",
                                             typed=b"from the laptop\n")
        assert status == 0, errors
        assert errors == ""
        lines = output.splitlines()
        _in_order(lines, "Firefox on Android: from the phone", "You: from the laptop",
                  "Agent: Echo: from the laptop")
        assert [d.name for d in relay.devices.devices()] == ["Firefox on Android", "Laptop"]
        laptop = relay.devices.devices()[1]
        mine = next(m for m in backend.messages["c2"] if m["content"] == "from the laptop")
        assert mine["sender"] == {"deviceId": laptop.id, "name": "Laptop"}
        # The token is kept for this relay, readable by this user alone.
        path = _config_home / "trio-relay" / "chat-devices.json"
        assert path.stat().st_mode & 0o777 == 0o600
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        kept = json.loads(path.read_text())["relays"][URL]
        assert (kept["id"], kept["name"]) == (laptop.id, "Laptop")
        # The next run needs no PIN, pairs nothing new, and its own messages are still You.
        environ = {"XDG_CONFIG_HOME": str(_config_home)}  # no PIN
        status, output, errors = await piped(relay, "--chat", "c2", pin=None, environ=environ,
                                             typed=b"again\n")
        assert status == 0, errors
        assert errors == ""
        _in_order(output.splitlines(), "Firefox on Android: from the phone",
                  "You: from the laptop", "Agent: Echo: from the laptop", "You: again")
        assert len(relay.devices.devices()) == 2
        # Revoked: the token is forgotten and the PIN asked for (here there is none).
        assert relay.relay.revoke_device(laptop.id)
        status, _, errors = await piped(relay, "--chat", "c2", pin=None, environ=environ)
        assert status == 1
        assert errors == (
            "trio-relay chat: the relay no longer knows this device (revoked, or its pairings"
            " were reset): sign in with the PIN to pair it again\n"
            "trio-relay chat: no PIN: pass --pin or set $TRIO_RELAY_PIN\n")
        assert json.loads(path.read_text())["relays"] == {}
        # With the PIN it pairs again (the host name by default).
        status, _, errors = await piped(relay, "--chat", "c2")
        assert status == 0, errors
        assert [d.name for d in relay.devices.devices()] == [
            "Firefox on Android", socket.gethostname()]


async def test_a_device_revoked_meanwhile(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (backend, relay):
        keyboard, stdin = trio.testing.memory_stream_one_way_pair()
        errors = io.StringIO()

        async def revoke() -> None:
            await keyboard.send_all(b"hello\n")
            await backend.first_chunk.wait()  # signed in, paired, answered
            relay.relay.revoke_device(relay.devices.devices()[0].id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(revoke)
            status = await run_chat(parse(URL, "--pin", PIN, "--chat", "c1"), stdin=stdin,
                                    stdout=io.StringIO(), stderr=errors,
                                    connect=relay.connector())
        assert status == 1
        # (the keyboard is still open: the relay ended the session)
        assert errors.getvalue() == ("\ntrio-relay chat: connection to the relay lost: device"
                                     " revoked (close code 1008)\n")


async def test_bad_names(autojump_clock: trio.abc.Clock) -> None:
    async with echo_relay() as (_, relay):
        for name in ("x" * 65, "tab\there", "   "):
            status, _, errors = await piped(relay, "--name", name)
            if name.strip():
                assert status == 1
                assert errors == ("trio-relay chat: --name must be 1 to 64 characters, without"
                                  " control characters\n")
            else:  # blank: the host name
                assert status == 0, errors


# --- end to end -------------------------------------------------------------------------------

# An agent for the terminal tests: it says what it works on, then waits until the test
# creates the file of that name in the gates folder, then says it is done. So a reply can be
# seen half way for as long as a test needs, and stopped there.
GATED = """
import pathlib, sys, time
name = sys.stdin.read().strip()
sys.stdout.write(f"working on {name}..."); sys.stdout.flush()
gate = pathlib.Path(sys.argv[1]) / name
deadline = time.monotonic() + 20
while not gate.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
sys.stdout.write(" done\\n"); sys.stdout.flush()
"""


class Relay:
    """`trio-relay serve` in a subprocess: the demo chat ``welcome`` answered by the echo
    agent, and new chats by the gated agent (its profile is the first)."""

    def __init__(self, root: Path) -> None:
        self.gates = root / "gates"
        self.gates.mkdir()
        config = root / "relay.toml"
        config.write_text(f"""
data_dir = {json.dumps(str(root / "data"))}

[[model_profiles]]
id = "gated"
name = "Worker"
agent = "command"
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(GATED)}, {json.dumps(str(self.gates))}]

[[model_profiles]]
id = "echo"
name = "Echo"
agent = "echo"
""")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trio_relay", "serve", "--config", str(config),
             "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env())
        assert self.process.stdout is not None
        line = _bounded_readline(self.process.stdout.fileno())
        assert line.startswith("trio-relay serving ws://"), line
        self.url = line.split()[-1]

    @staticmethod
    def env() -> dict[str, str]:
        """For a command: the PIN, and this test's folder for device tokens."""
        return {**os.environ, "TRIO_RELAY_PIN": PIN}

    def open(self, gate: str) -> None:
        (self.gates / gate).touch()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(WAIT)
        assert self.process.stdout is not None
        self.process.stdout.close()


def _bounded_readline(fd: int) -> str:
    import select

    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], WAIT)
        assert ready, f"no line within {WAIT} s; so far: {line!r}"
        chunk = os.read(fd, 1)
        assert chunk, f"ended early; so far: {line!r}"
        line += chunk
    return line.decode()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    served = Relay(tmp_path_factory.mktemp("relay"))
    try:
        yield served
    finally:
        served.close()


@pytest.mark.e2e
async def test_the_command_with_piped_input(relay: Relay) -> None:
    """Input from a pipe, as in scripts: each line sent, the answers waited for."""
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_relay", "chat", relay.url, "--chat", "welcome"],
            stdin=b"ping\n/nope\n", capture_stdout=True, capture_stderr=True, env=relay.env(),
            check=False)
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "  Demo project (demo)\n    1) Welcome (welcome)\n" in output
    lines = output.splitlines()
    history = lines.index("-- Welcome (welcome)" + HEADER)
    assert lines[history + 1].startswith("Echo: Welcome to trio-relay!")
    _in_order(lines, "You: ping", "Echo: Echo: ping")
    assert "-- unknown command /nope (nothing was sent): /help lists the commands; // sends a"\
        " line starting with /" in lines
    assert "You: /nope" not in lines


ROWS, COLUMNS = 24, 80


class Terminal:
    """The real ``trio-relay chat`` in a pseudo-terminal of 80x24, its output rendered by a
    terminal emulator: `rows` is the screen as a person sees it, `frames` every screen
    shown so far (one per read of the output)."""

    def __init__(self, process: trio.Process, master: trio.lowlevel.FdStream,
                 master_fd: int) -> None:
        self.process = process
        self._master = master
        self.master_fd = master_fd
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self._stream = pyte.ByteStream(self.screen)
        self.frames: list[list[str]] = []
        self.closed = trio.Event()
        self._changed = trio.lowlevel.ParkingLot()

    @property
    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    @property
    def text(self) -> str:
        return "\n".join(self.rows)

    @property
    def input_row(self) -> str:
        """The row the cursor is on: where what is typed shows."""
        return self.rows[self.screen.cursor.y]

    async def read(self) -> None:
        try:
            while data := await self._master.receive_some():
                self._stream.feed(data)
                self.frames.append(self.rows)
                self._changed.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # EIO: the command has exited and closed the terminal
        self.closed.set()
        self._changed.unpark_all()

    async def until(self, what: str, predicate: Callable[[], bool]) -> None:
        """Wait (bounded) until ``predicate()`` holds for the screen."""
        with trio.move_on_after(WAIT):
            while not predicate():
                if self.closed.is_set():
                    break
                await self._changed.park()
            else:
                return
        raise AssertionError(f"never saw {what}; the screen:\n{self.text}")

    async def shows(self, text: str) -> None:
        await self.until(repr(text), lambda: text in self.text)

    async def prompt(self, prompt: str, typed: str = "") -> None:
        """Wait until the cursor's row is ``prompt`` then ``typed``, the cursor after it."""
        await self.until(
            f"the input row {prompt + typed!r}",
            lambda: self.input_row == (prompt + typed).rstrip()
            and self.screen.cursor.x == wcwidth.wcswidth(prompt + typed))

    async def type(self, keys: str) -> None:
        await self._master.send_all(keys.encode())

    def count(self, text: str) -> int:
        return self.text.count(text)


# Runs the command with the terminal as its controlling terminal, as a shell would (Ctrl-C at
# the PIN prompt is then a SIGINT, and getpass finds /dev/tty).
CONTROLLING = """
import fcntl, os, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
os.execv(sys.executable, [sys.executable, "-m", "trio_relay", "chat", *sys.argv[1:]])
"""


@asynccontextmanager
async def terminal(relay: Relay, *argv: str, pin: bool = True) -> AsyncIterator[Terminal]:
    master_fd, slave_fd = os.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {**relay.env(), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    if not pin:
        del env["TRIO_RELAY_PIN"]
    command = [sys.executable, "-c", CONTROLLING, relay.url, *argv]
    try:
        process = await trio.lowlevel.open_process(
            command, stdin=slave_fd, stdout=slave_fd, stderr=slave_fd, env=env,
            start_new_session=True)
    finally:
        os.close(slave_fd)
    master = trio.lowlevel.FdStream(master_fd)  # it owns (and closes) master_fd
    term = Terminal(process, master, master_fd)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(term.read)
            try:
                yield term
            except BaseException:
                process.kill()  # a failed test: no waiting for it to leave
                raise
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(WAIT):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        await master.aclose()


async def exit_time(term: Terminal, keys: str) -> float:
    """Seconds from typing ``keys`` to the command's exit."""
    start = trio.current_time()
    await term.type(keys)
    with trio.fail_after(WAIT):
        await term.process.wait()
    return trio.current_time() - start


@pytest.mark.e2e
async def test_terminal_prompt_single_echo_and_a_reply_above_a_half_typed_line(
    relay: Relay, tmp_path: Path,
) -> None:
    async with terminal(relay, "--chat", "welcome") as term:
        await term.prompt("Welcome> ")
        assert "-- Welcome (welcome)" + HEADER in term.text
        assert any(row.startswith("Echo: Welcome to trio-relay!") for row in term.rows)

        # What you send is shown once, labelled You; the echo agent's reply follows.
        await term.type("hello there")
        await term.prompt("Welcome> ", "hello there")
        await term.type("\r")
        await term.shows("Echo: Echo: hello there")
        await term.prompt("Welcome> ")
        assert term.count("hello there") == 2  # "You: hello there" and the reply
        assert "You: hello there" in term.rows

        # A reply streams in above a line being typed, which stays as it was.
        await term.type("/new Side\r")
        await term.prompt("Side> ")
        await term.type("job-1\r")
        await term.shows("You: job-1")
        await term.until("the reply streaming", lambda: "Worker: working on job-1..." in
                         term.rows)
        await term.type("half typ")
        await term.prompt("Side> ", "half typ")
        relay.open("job-1")
        await term.until("the reply done", lambda: "Worker: working on job-1... done" in
                         term.rows)
        await term.prompt("Side> ", "half typ")  # intact, the cursor after it
        rows = term.rows
        reply = rows.index("Worker: working on job-1... done")
        assert rows[reply - 1] == "You: job-1"
        assert rows[reply + 1] == "Side> half typ"
        assert term.count("working on") == 1  # the streamed reply, not printed again
        # While it streamed, the line being typed stayed on the row under it.
        halfway = [frame for frame in term.frames
                   if "Worker: working on job-1..." in frame and "Side> half typ" in frame]
        assert halfway
        assert all(frame.index("Side> half typ") == frame.index("Worker: working on job-1...")
                   + 1 for frame in halfway)
        # The line typed goes on as if nothing had happened.
        await term.type("ed\r")
        await term.shows("You: half typed")
        await term.prompt("Side> ")
        relay.open("half typed")
        await term.shows("Worker: working on half typed... done")
        await term.type("/quit\r")
        with trio.fail_after(WAIT):
            assert await term.process.wait() == 0


@pytest.mark.e2e
async def test_terminal_commands(relay: Relay) -> None:
    async with terminal(relay, "--chat", "welcome") as term:
        await term.prompt("Welcome> ")
        await term.type("/help\r")
        await term.shows("--   /stop          stop the agent's reply in progress")
        await term.prompt("Welcome> ")
        await term.type("/chats\r")
        await term.shows("    1) Welcome (welcome)  <- open")
        await term.type("/bogus\r")
        await term.shows("-- unknown command /bogus (nothing was sent)")
        await term.type("//slash\r")
        await term.shows("You: /slash")
        await term.shows("Echo: Echo: /slash")
        assert "You: /bogus" not in term.text
        assert "You: /help" not in term.text
        await term.type("/stop\r")
        await term.shows("-- no reply is running")
        await term.type("/new Stoppable\r")
        await term.prompt("Stoppable> ")
        await term.type("never\r")
        await term.until("the reply streaming", lambda: "Worker: working on never..." in
                         term.rows)
        await term.type("/stop\r")
        await term.shows("-- reply stopped")
        rows = term.rows
        assert rows.index("-- reply stopped") == rows.index("Worker: working on never...") + 1
        await term.type("/open 1\r")
        await term.prompt("Welcome> ")
        await term.type("/chats\r")
        await term.until("the new chat listed", lambda: any(
            row.startswith("    ") and "Stoppable (" in row for row in term.rows))
        await term.type("/quit\r")
        with trio.fail_after(WAIT):
            assert await term.process.wait() == 0


def _mode(fd: int) -> int:
    return int(termios.tcgetattr(fd)[3])


@pytest.mark.e2e
@pytest.mark.parametrize(("key", "status"), [("\x03", 130), ("\x04", 0)],
                         ids=["ctrl-c", "ctrl-d"])
async def test_terminal_exits_at_once(relay: Relay, key: str, status: int) -> None:
    async with terminal(relay, "--chat", "welcome") as term:
        await term.prompt("Welcome> ")
        took = await exit_time(term, key)
        assert term.process.returncode == status
        assert took < 0.5, f"took {took:.2f} s to exit"
        # The terminal is given back as it was: echo and line editing on again.
        assert _mode(term.master_fd) & termios.ECHO
        assert _mode(term.master_fd) & termios.ICANON


@pytest.mark.e2e
async def test_terminal_line_editing_long_lines_and_other_devices(relay: Relay) -> None:
    left, right, up = "\x1b[D", "\x1b[C", "\x1b[A"
    async with terminal(relay, "--chat", "welcome", "--name", "Laptop") as term:
        await term.prompt("Welcome> ")
        # Fix typos in place: Home and Right, End and Left, inserting where the cursor is.
        await term.type("helo wrld")
        await term.prompt("Welcome> ", "helo wrld")
        await term.type("\x01" + right * 3 + "l" + "\x05" + left * 3 + "o")
        await term.until("the edited line", lambda: term.input_row == "Welcome> hello world"
                         and term.screen.cursor.x == len("Welcome> hello wo"))
        await term.type("\r")
        await term.shows("You: hello world")
        await term.prompt("Welcome> ")
        # Up brings back what was sent; Ctrl-U clears, Ctrl-W deletes a word, Backspace a
        # character.
        await term.type(up)
        await term.prompt("Welcome> ", "hello world")
        await term.type("\x15one two three\x17\x7f")
        await term.prompt("Welcome> ", "one two")
        await term.type("\x15")
        await term.prompt("Welcome> ")
        # Tab completes a command's name.
        await term.type("/he\t")
        await term.prompt("Welcome> ", "/help ")
        await term.type("\x15/\t")  # several would do: nothing
        await term.prompt("Welcome> ", "/")
        await term.type("\x15")
        await term.prompt("Welcome> ")

        # Another device writes while a line is being typed: its name, above the line.
        await term.type("draft ünïcödé 日本")
        await term.prompt("Welcome> ", "draft ünïcödé 日本")
        async with open_relay_client(relay.url, pin=PIN, device_name="Firefox on Android",
                                     ) as phone:
            await phone.send("welcome", "hi from the phone")
        await term.shows("Firefox on Android: hi from the phone")
        await term.shows("Echo: Echo: hi from the phone")
        assert term.input_row == "Welcome> draft ünïcödé 日本"
        assert term.screen.cursor.x == len("Welcome> draft ünïcödé 日本") + 2  # 2 wide ones
        await term.type("\x15")

        # A line longer than the terminal scrolls sideways as it is typed, the cursor on
        # screen; sent, it is shown whole, wrapped.
        long = " ".join(f"word{n:02}" for n in range(25))  # 174 characters
        await term.type(long)
        await term.until("the end of the long line", lambda: term.input_row.startswith(
            "Welcome> ") and term.input_row.endswith("word24"))
        assert term.screen.cursor.x < COLUMNS
        assert len(term.input_row) < COLUMNS
        await term.type("\r")
        await term.until("the whole reply", lambda: term.count("word24") == 2
                         and term.rows[term.screen.cursor.y - 1].endswith("word24"))
        rows = term.rows
        first = next(i for i, row in enumerate(rows) if row.startswith("You: word00"))
        assert " ".join(rows[first:first + 3]) == f"You: {long}"
        # The reply, streamed row by row, reads the same (cut at spaces, as printed whole).
        assert " ".join(rows[first + 3:first + 6]) == f"Echo: Echo: {long}"
        assert rows[first + 6] == "Welcome>"
        await term.type("\x04")
        with trio.fail_after(WAIT):
            assert await term.process.wait() == 0


@pytest.mark.e2e
async def test_terminal_pin_prompt_then_the_token(relay: Relay) -> None:
    # Ctrl-C at the PIN prompt leaves at once, the terminal as it was.
    async with terminal(relay, "--chat", "welcome", pin=False) as term:
        await term.prompt("PIN: ")
        took = await exit_time(term, "\x03")
        assert term.process.returncode == 130
        assert took < 0.5, f"took {took:.2f} s to exit"
        assert _mode(term.master_fd) & termios.ECHO
    # A wrong PIN typed is asked for again; the right one (not shown) pairs this terminal...
    async with terminal(relay, "--chat", "welcome", "--name", "Typist", pin=False) as term:
        await term.prompt("PIN: ")
        await term.type("000000\r")
        await term.shows("trio-relay chat: Invalid PIN; try again")
        await term.prompt("PIN: ")
        await term.type(PIN + "\r")
        await term.prompt("Welcome> ")
        assert PIN not in term.text
        assert "000000" not in term.text
        await term.type("paired\r")
        await term.shows("Echo: Echo: paired")
        await term.type("\x04")
        with trio.fail_after(WAIT):
            assert await term.process.wait() == 0
    # ...and the next run signs in with its token: no PIN asked, its messages still "You".
    async with terminal(relay, "--chat", "welcome", pin=False) as term:
        await term.prompt("Welcome> ")
        assert "You: paired" in term.rows
        assert "PIN" not in term.text
        await term.type("\x04")
        with trio.fail_after(WAIT):
            assert await term.process.wait() == 0


@pytest.mark.e2e
async def test_terminal_chooses_a_chat(relay: Relay) -> None:
    async with open_relay_client(relay.url, pin=PIN) as client:
        chat = await client.create_chat("demo", title="A chat with a title too long for it")
    async with terminal(relay) as term:
        await term.until("the question", lambda: term.input_row.startswith("Chat [1-"))
        question = term.input_row + " "
        listed = next(row for row in term.rows if f"({chat['id']})" in row)
        number = listed.split(")")[0].strip()
        await term.type("99\r")
        await term.shows("No chat '99'.")
        await term.prompt(question)
        await term.type(number + "\r")
        # The prompt names the chat, shortened to leave room for typing.
        await term.prompt("A chat with a title too\N{HORIZONTAL ELLIPSIS}> ")
        assert f"-- A chat with a title too long for it ({chat['id']})" + HEADER in " ".join(
            term.rows)  # (wrapped at a space)
        await term.type("\x04")
        with trio.fail_after(WAIT):
            assert await term.process.wait() == 0
