"""``trio-relay chat URL``: a terminal client of the relay, built on `trio_relay.client`.

It authenticates, lists the projects and their chats, attaches to one chat, prints its
history and then everything that happens in it as it happens (agent replies stream in piece
by piece), and sends each line typed on stdin. It exits on end of input (after the replies
to what it sent have finished, within ``--linger`` seconds) or on Ctrl-C. Connection trouble
is reported on stderr while the client reconnects and resumes by itself.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import ssl
import sys
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, TextIO

import trio

from ._client import (
    AgentError,
    AuthFailed,
    Chunk,
    Completed,
    Connect,
    ConnectionState,
    MessageAdded,
    RelayClient,
    RelayClientError,
    ReplyStarted,
    RequestRejected,
    Reset,
    Subscription,
    _raise_single,
    open_relay_client,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["add_chat_command", "run_chat"]

JSON = Any
PIN_VARIABLE = "TRIO_RELAY_PIN"


def add_chat_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``chat`` command to a ``trio-relay`` argument parser; returns its parser."""
    chat = subparsers.add_parser(
        "chat", help="talk to a chat from the terminal",
        description="Connect to a relay, list its projects and chats, attach to a chat: print"
        " its history and then its live output, and send each line typed on stdin. Ends at"
        " end of input or Ctrl-C.",
        allow_abbrev=False,
    )
    add_chat_arguments(chat)
    return chat


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL",
                        help="the relay, as printed by trio-relay serve: ws://127.0.0.1:8765/ws")
    parser.add_argument("--pin", help=f"the relay's PIN (default: ${PIN_VARIABLE}, else asked"
                        " for without echo)")
    parser.add_argument("--chat", metavar="ID", help="the chat to attach to (default: chosen"
                        " interactively on a terminal, else the first chat of the first project)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long a request may take (default: 10)")
    parser.add_argument("--linger", type=float, default=30.0, metavar="SECONDS",
                        help="at end of input, how long to wait at most for the replies to"
                        " what was sent (default: 30)")
    parser.add_argument("--cafile", metavar="PATH",
                        help="CA certificates (PEM) to trust for a wss:// relay")


# --- input ------------------------------------------------------------------------------------


class _Lines:
    """Lines of input without blocking Trio: from a stream, or from stdin in a thread."""

    def __init__(self, stream: trio.abc.ReceiveStream | None) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False

    async def readline(self) -> str | None:
        """The next line without its newline; None at end of input."""
        if self._stream is None:
            # Abandoned on cancellation: a thread blocked in readline cannot be interrupted,
            # and must not hold up Ctrl-C.
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            return line.rstrip("\r\n") if line else None
        while b"\n" not in self._buffer and not self._eof:
            chunk = await self._stream.receive_some()
            if not chunk:
                self._eof = True
            self._buffer += chunk
        if not self._buffer:
            return None
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line.decode("utf-8", errors="replace").rstrip("\r")


# --- output -----------------------------------------------------------------------------------


class _Printer:
    """Prints a chat: stored messages one per line, a streamed reply growing on its line.

    It also tracks what we sent: each line becomes a user message, which the agent answers;
    `wait_idle` waits until every such answer has come (or failed).
    """

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown: set[str] = set()  # ids of messages printed in full or streamed
        self._streamed: set[str] = set()
        # Replies whose line other output broke into: the rest of their chunks are not
        # printed, and the whole reply is, once stored.
        self._interrupted: set[str] = set()
        self._open: str | None = None  # the reply whose line is being written
        self._sent: deque[str] = deque()  # sent, not yet seen back
        self._replies_due = 0
        self._lot = trio.lowlevel.ParkingLot()

    def write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def line(self, text: str) -> None:
        self._close_line()
        self.write(text + "\n")

    def _close_line(self) -> None:
        if self._open is not None:
            self._interrupted.add(self._open)
            self._open = None
            self.write("\n")

    def sent(self, text: str) -> None:
        self._sent.append(text)

    def unsent(self, text: str) -> None:
        if text in self._sent:
            self._sent.remove(text)
            self._lot.unpark_all()

    def history(self, messages: list[JSON]) -> None:
        for message in messages:
            self.message(message)

    def message(self, message: JSON) -> None:
        if not isinstance(message, dict):
            return
        message_id = message.get("id")
        role = message.get("role")
        content = message.get("content")
        if role == "user" and self._sent and content == self._sent[0]:
            self._sent.popleft()
            self._replies_due += 1
        elif role == "assistant" and self._replies_due:
            self._replies_due -= 1
        self._lot.unpark_all()
        if message_id in self._shown:
            return
        if isinstance(message_id, str):
            self._shown.add(message_id)
        if message_id in self._streamed and message_id not in self._interrupted:
            if self._open == message_id:
                self._open = None
                self.write("\n")
            return  # its text is on the screen already
        text = content if isinstance(content, str) else json.dumps(content)
        self.line(f"[{role or '?'}] {text}")

    def event(self, event: object) -> None:
        if isinstance(event, MessageAdded):
            self.message(event.message)
        elif isinstance(event, ReplyStarted):
            self._start_reply(event.message_id)
        elif isinstance(event, Chunk):
            if event.message_id in self._interrupted:
                return
            if self._open != event.message_id:
                self._start_reply(event.message_id)
            self.write(event.text)
        elif isinstance(event, AgentError):
            if self._open == event.message_id:
                self._open = None
                self.write("\n")
            if self._replies_due:
                self._replies_due -= 1
                self._lot.unpark_all()
            self.line(f"[error] {event.error}")
        elif isinstance(event, Reset):
            self.line("-- back in sync; messages missed meanwhile:")
            self.history(event.snapshot)
        elif isinstance(event, Completed):
            self.line("-- this chat's stream has ended")

    def _start_reply(self, message_id: str) -> None:
        self._close_line()
        self._streamed.add(message_id)
        self._open = message_id
        self.write("[assistant] ")

    def finish(self) -> None:
        self._close_line()

    async def wait_idle(self) -> None:
        """Until every line sent has come back and been answered."""
        while self._sent or self._replies_due:
            await self._lot.park()


# --- the session ------------------------------------------------------------------------------


async def _choose(
    chats: list[tuple[JSON, JSON]], lines: _Lines, out: TextIO
) -> JSON | None:
    """Ask which chat on a terminal; None at end of input."""
    for number, (project, chat) in enumerate(chats, 1):
        out.write(f"  {number}) {chat.get('title', chat['id'])} ({chat['id']})"
                  f" in {project.get('name', project['id'])}\n")
    while True:
        out.write(f"Chat [1-{len(chats)}, default 1]: ")
        out.flush()
        answer = await lines.readline()
        if answer is None:
            return None
        answer = answer.strip() or "1"
        if answer.isdigit() and 1 <= int(answer) <= len(chats):
            return chats[int(answer) - 1][1]
        out.write(f"No chat {answer!r}.\n")


async def _show_events(chat: Subscription, printer: _Printer) -> None:
    async for event in chat:
        printer.event(event)


async def _show_states(client: RelayClient, err: TextIO) -> None:
    async for state in client.state_changes():
        if state is ConnectionState.RECONNECTING:
            close = client.last_close
            why = f" ({close.code} {close.reason})".rstrip() if close else ""
            err.write(f"-- connection lost{why}; reconnecting\n")
        elif state is ConnectionState.CONNECTED and client.last_close is not None:
            err.write("-- reconnected\n")
        err.flush()


async def _session(
    client: RelayClient, args: argparse.Namespace, lines: _Lines, out: TextIO, err: TextIO,
    interactive: bool,
) -> int:
    chats: list[tuple[JSON, JSON]] = []  # (project, chat)
    out.write("Projects:\n")
    for project in client.projects:
        if not isinstance(project, dict) or not isinstance(project.get("id"), str):
            continue
        out.write(f"  {project.get('name', project['id'])} ({project['id']})\n")
        try:
            async with client.subscribe("project", project["id"]) as listing:
                project_chats = [c for c in listing.snapshot if isinstance(c, dict) and "id" in c]
        except RequestRejected as exc:
            out.write(f"    (its chats could not be listed: {exc})\n")
            continue
        for chat in project_chats:
            out.write(f"    {chat.get('title', chat['id'])} ({chat['id']})\n")
            chats.append((project, chat))
    out.flush()
    chosen: JSON | None
    if args.chat:
        chosen = next((c for _, c in chats if c["id"] == args.chat), {"id": args.chat})
    elif not chats:
        err.write("trio-relay chat: the relay has no chats\n")
        return 1
    elif interactive and len(chats) > 1:
        chosen = await _choose(chats, lines, out)
        if chosen is None:
            return 0
    else:
        chosen = chats[0][1]
    chat_id = chosen["id"]
    async with client.subscribe("chat", chat_id) as live:
        printer = _Printer(out)
        printer.line(f"-- {chosen.get('title', chat_id)} ({chat_id}); type a message and"
                     " press Enter, end of input or Ctrl-C to leave")
        printer.history(live.snapshot)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_show_events, live, printer)
            nursery.start_soon(_show_states, client, err)
            while (text := await lines.readline()) is not None:
                if not text.strip():
                    continue
                printer.sent(text)
                try:
                    await client.send(chat_id, text)
                except AuthFailed:
                    raise
                except RelayClientError as exc:
                    if client.state is ConnectionState.CLOSED:
                        raise
                    printer.unsent(text)
                    printer.line(f"-- not sent: {exc}")
            with trio.move_on_after(args.linger):
                await printer.wait_idle()
            printer.finish()
            nursery.cancel_scope.cancel()
    return 0


async def run_chat(
    args: argparse.Namespace,
    *,
    stdin: trio.abc.ReceiveStream | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    connect: Connect | None = None,
    environ: Mapping[str, str] | None = None,
    interactive: bool | None = None,
) -> int:
    """Run ``trio-relay chat``; returns the exit status (0, 1 on failure, 130 on Ctrl-C).

    The keyword arguments are for tests and embedding: input lines from a stream instead of
    the process's stdin, output to other files, the client's ``connect``, the environment, and
    whether to ask which chat (default: when stdin is a terminal).
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    if interactive is None:
        interactive = stdin is None and sys.stdin.isatty()
    pin = args.pin or env.get(PIN_VARIABLE)
    if not pin and stdin is None:
        try:
            pin = await trio.to_thread.run_sync(getpass.getpass, "PIN: ", abandon_on_cancel=True)
        except EOFError:
            pin = ""
    if not pin:
        err.write(f"trio-relay chat: no PIN: pass --pin or set ${PIN_VARIABLE}\n")
        return 1
    ssl_context = None
    if args.cafile:
        try:
            ssl_context = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            err.write(f"trio-relay chat: cannot load {args.cafile}: {exc}\n")
            return 1
    lines = _Lines(stdin)
    interrupted = False
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                async def on_ctrl_c(task_status: trio.TaskStatus[None]) -> None:
                    nonlocal interrupted
                    with trio.open_signal_receiver(signal.SIGINT) as signals:
                        task_status.started()
                        async for _ in signals:
                            interrupted = True
                            nursery.cancel_scope.cancel()
                            return

                await nursery.start(on_ctrl_c)
            async with open_relay_client(
                args.url, pin=pin, request_timeout=args.timeout, ssl_context=ssl_context,
                connect=connect,
            ) as client:
                status = await _session(client, args, lines, out, err, interactive)
            nursery.cancel_scope.cancel()
    except BaseException as exc:
        error = _single(exc)
        if isinstance(error, RelayClientError):
            return _failed(error, out, err)
        if isinstance(error, ValueError):  # a malformed URL
            err.write(f"trio-relay chat: {error}\n")
            return 1
        if not isinstance(error, KeyboardInterrupt):
            raise
        interrupted = True
    if interrupted:
        out.write("\n")
        out.flush()
        return 130
    return status


def _single(exc: BaseException) -> BaseException:
    """The one error a group stands for (Cancelled aside), else ``exc`` itself."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    try:
        _raise_single(exc)
    except BaseException as single:  # only looked at: the caller re-raises what it keeps
        return single


def _failed(exc: RelayClientError, out: TextIO, err: TextIO) -> int:
    out.flush()
    err.write(f"\ntrio-relay chat: {exc}\n")
    err.flush()
    return 1
