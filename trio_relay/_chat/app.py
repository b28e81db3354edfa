"""``trio-relay chat URL``: a terminal client of the relay, built on `trio_relay.client` alone.

It authenticates, lists the projects and their chats, attaches to one chat, prints its
history and then everything that happens in it as it happens (agent replies stream in piece
by piece), and sends each line typed. Lines starting with ``/`` are commands (``/help``).

On a terminal it edits the input line itself, over a raw tty: output scrolls above the line
being typed, which is redrawn after each piece, so an incoming message or a streaming reply
never breaks what you are typing. Otherwise (input from a pipe or a file) it reads lines as
they come and prints plainly, and end of input leaves once the replies to what was sent have
come (within ``--linger`` seconds). Connection trouble is reported while the client
reconnects and resumes by itself.
"""

from __future__ import annotations

import argparse
import codecs
import getpass
import json
import math
import os
import signal
import socket
import ssl
import sys
import threading
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO

import trio

from ..client import (
    AgentError,
    AuthFailed,
    Chunk,
    Completed,
    Connect,
    ConnectionState,
    Device,
    MessageAdded,
    RelayClient,
    RelayClientError,
    ReplyCancelled,
    ReplyStarted,
    RequestRejected,
    Reset,
    SubscriptionFailed,
    TokenInvalid,
    open_relay_client,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["add_chat_command", "run_chat"]

JSON = Any
PIN_VARIABLE = "TRIO_RELAY_PIN"

COMMANDS = ("chats", "help", "new", "open", "quit", "stop")
HELP = """\
-- commands:
--   /chats         list the projects and their chats, numbered
--   /open N|ID     open chat number N of that list, or the chat with that id
--   /new [TITLE]   create a chat in this chat's project and open it
--   /stop          stop the agent's reply in progress
--   /quit          leave (as do Ctrl-C, and Ctrl-D on an empty line)
--   /help          this list
-- Any other line is sent to the chat; to send one starting with /, type //."""


def add_chat_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``chat`` command to a ``trio-relay`` argument parser; returns its parser."""
    chat = subparsers.add_parser(
        "chat", help="talk to a chat from the terminal",
        description="Connect to a relay, list its projects and chats, attach to a chat: print"
        " its history and then its live output, and send each line typed. /help lists the"
        " commands. Ends with /quit, Ctrl-C, Ctrl-D or the end of piped input.",
        allow_abbrev=False,
    )
    add_chat_arguments(chat)
    return chat


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL",
                        help="the relay, as printed by trio-relay serve: ws://127.0.0.1:8765/ws")
    parser.add_argument("--pin", help=f"the relay's PIN, to pair this terminal the first time"
                        f" (default: ${PIN_VARIABLE}, else asked for without echo); later runs"
                        " sign in with the device token kept then")
    parser.add_argument("--chat", metavar="ID", help="the chat to attach to (default: chosen"
                        " interactively on a terminal, else the first chat of the first project)")
    parser.add_argument("--name", metavar="NAME", help="the name to pair this terminal"
                        " under, shown to the others with what you send (default: the host"
                        " name)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long a request may take (default: 10)")
    parser.add_argument("--linger", type=float, default=30.0, metavar="SECONDS",
                        help="at the end of piped input, how long to wait at most for the"
                        " replies to what was sent (default: 30)")
    parser.add_argument("--cafile", metavar="PATH",
                        help="CA certificates (PEM) to trust for a wss:// relay")


# --- text -------------------------------------------------------------------------------------


def _printable(text: str, *, tabs: str = "\t") -> str:
    """``text`` made safe to print: a message must never drive the terminal, so control
    characters (escape sequences, bells, carriage returns) are shown in caret notation.
    Newlines stay; tabs become ``tabs``."""
    text = text.replace("\r\n", "\n")
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if char == "\n":
            out.append(char)
        elif char == "\t":
            out.append(tabs)
        elif code < 0x20 or code == 0x7F:
            out.append("^" + chr(code ^ 0x40))
        elif 0x80 <= code < 0xA0 or unicodedata.category(char) in ("Cc", "Cs"):
            out.append("\ufffd")
        else:
            out.append(char)  # other non-printables (format characters, spaces) are harmless
    return "".join(out)


def _cell(char: str) -> int:
    """How many terminal columns ``char`` takes (0 for combining marks, 2 for wide ones)."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _cells(text: str) -> int:
    if text.isascii():  # (control characters are gone by now)
        return len(text)
    return sum(_cell(char) for char in text)


def _fit_end(text: str, start: int, width: int) -> int:
    """The end of the longest piece of ``text`` from ``start`` that takes at most ``width``
    columns."""
    if text.isascii():
        return min(len(text), start + max(width, 0))
    used, end = 0, start
    while end < len(text):
        used += _cell(text[end])
        if used > width:
            break
        end += 1
    return end


def _fit(text: str, width: int) -> str:
    """The longest start of ``text`` that takes at most ``width`` columns."""
    return text[:_fit_end(text, 0, width)]


def _shorten(text: str, width: int, *, keep: int = 0) -> str:
    """``text`` in at most ``width`` columns: cut, marked with an ellipsis, before its last
    ``keep`` characters (the "> " or ": " that ends a prompt)."""
    if _cells(text) <= width:
        return text
    head, tail = text[:len(text) - keep], text[len(text) - keep:]
    return _fit(head, width - 1 - _cells(tail)) + "\u2026" + tail


def _wrap(text: str, first: int, width: int) -> list[str]:
    """``text`` (one line) cut into rows for a terminal ``width`` columns wide, the first row
    having ``first`` columns taken already; at a space when there is one late enough."""
    rows = []
    room, start = width - first, 0
    while True:
        end = _fit_end(text, start, room)
        if end == len(text):
            rows.append(text[start:])
            return rows
        space = text.rfind(" ", start, end)
        if space - start > (end - start) // 2:
            end = space + 1
        if end == start and room == width:
            end += 1  # a character wider than the terminal: a row of its own all the same
        rows.append(text[start:end])  # ("" when not even one character fits after a label)
        start, room = end, width


# --- input and output -------------------------------------------------------------------------


class _IO(Protocol):
    """Where a session reads lines and shows the chat: a terminal or plain streams."""

    #: True when the line being typed is on screen, edited by us (a terminal).
    editing: bool

    def set_prompt(self, prompt: str) -> None: ...

    async def read_line(self) -> str | None:
        """The next line typed, without its newline; None at end of input."""

    async def ask(self, question: str) -> str | None:
        """A line typed in answer to ``question``; None at end of input."""

    def line(self, text: str, kind: str = "note") -> None:
        """A whole line of output; ``kind`` styles it (note, error, text)."""

    def notice(self, text: str) -> None:
        """A line about the connection (stderr when plain)."""

    def message(self, label: str, kind: str, text: str) -> None:
        """A chat message: who (styled by ``kind``: you, other, agent) and what."""

    def stream_start(self, label: str, kind: str) -> None:
        """A message whose text follows in pieces (`stream`) until `stream_end`."""

    def stream(self, text: str) -> None: ...

    def stream_end(self) -> None: ...


class _PlainIO:
    """Lines from a stream (or from stdin in a thread), output written as it comes: for
    pipes, files and tests."""

    editing = False

    def __init__(self, stream: trio.abc.ReceiveStream | None, out: TextIO, err: TextIO) -> None:
        self._stream = stream
        self._out = out
        self._err = err
        self._buffer = bytearray()
        self._eof = False
        self._line_ended = True  # a streamed message's text ended with its own newline
        self._label: str | None = None  # a streamed message's label, until its first piece

    def set_prompt(self, prompt: str) -> None:
        pass  # nothing to redraw: what is typed is the terminal's (or nobody's) to show

    async def read_line(self) -> str | None:
        if self._stream is None:
            # Abandoned on cancellation: a thread blocked in readline cannot be interrupted,
            # and must not hold up Ctrl-C (Trio's worker threads are daemons).
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

    async def ask(self, question: str) -> str | None:
        self._write(question)
        return await self.read_line()

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def line(self, text: str, kind: str = "note") -> None:
        self._write(_printable(text) + "\n")

    def notice(self, text: str) -> None:
        self._err.write(_printable(text) + "\n")
        self._err.flush()

    def message(self, label: str, kind: str, text: str) -> None:
        text = _printable(text).removesuffix("\n")
        self._write(f"{_printable(label)}: {text}\n")

    def stream_start(self, label: str, kind: str) -> None:
        # Written with the first piece: a reply stopped before any says so without a stub.
        self._label = label

    def stream(self, text: str) -> None:
        if self._label is not None:
            self._write(f"{_printable(self._label)}: ")
            self._label = None
            self._line_ended = False
        if text:
            self._write(_printable(text))
            self._line_ended = text.endswith("\n")

    def stream_end(self) -> None:
        self._label = None
        if not self._line_ended:
            self._write("\n")
        self._line_ended = True


_STYLES = {"you": "1;32", "other": "1;33", "agent": "1;36", "note": "2", "error": "31",
           "prompt": "1"}


class _TerminalIO:
    """The bottom of a terminal, drawn by us over a raw tty: output scrolls above the line
    being typed (the *input row*), with a streaming reply's unfinished last line (the *live
    row*) just above it. Every output first clears these rows, writes, then redraws them, so
    what is being typed is never broken. The input row scrolls sideways rather than wrap, and
    the live row is cut into rows here, so the rows to clear are always known.

    Keys are read by `read_keys` for the whole session (Ctrl-C must work while a request is
    waiting); whole lines go to `read_line` through a channel.
    """

    editing = True

    def __init__(self, fd: int, out: TextIO, *, color: bool, on_interrupt: Callable[[], None],
                 ) -> None:
        self._fd = fd
        self._out = out
        self._color = color
        self._on_interrupt = on_interrupt
        self._saved: list[Any] | None = None
        self._prompt = ""
        self._active = False  # the rows are drawn (once a prompt is set, while raw)
        self._drawn_live = False  # the screen has a live row above the input row now
        self._buffer: list[str] = []
        self._cursor = 0
        self._scroll = 0  # index of the first character shown on the input row
        self._history: list[str] = []
        self._browsing = 0  # index into history while Up/Down browse it
        self._stash = ""  # the line being typed when browsing began
        self._live: tuple[str, str] | None = None  # the live row's (label, kind), None: gone
        self._live_text = ""
        self._live_labelled = True  # the live row still starts with the label
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._escape: str | None = None
        # Unbounded: lines come at the speed of typing (or of one paste).
        self._lines_in, self._lines_out = trio.open_memory_channel[str | None](math.inf)
        self._asking = False

    # --- the tty ------------------------------------------------------------------------------

    @contextmanager
    def raw(self) -> Iterator[None]:
        """The terminal in raw mode for the block; restored (and our rows cleared) after."""
        import termios  # not on Windows: only imported where a terminal is edited

        self._saved = termios.tcgetattr(self._fd)
        self._enter_raw()
        try:
            yield
        finally:
            self._write(self._clear())
            self._active = False
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def _enter_raw(self) -> None:
        import termios

        assert self._saved is not None
        mode = list(self._saved)
        mode[6] = list(mode[6])
        # Keys as they are typed, no echo, Ctrl-C / Ctrl-Z / Ctrl-S as bytes of input. Output
        # processing stays on ("\n" moves to the start of the next line), for everyone's
        # writes to the terminal.
        mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP
                     | termios.IXON)
        mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self._fd, termios.TCSADRAIN, mode)

    def _suspend(self) -> None:
        """Ctrl-Z: give the terminal back as it was, stop, and take it again on resume."""
        import termios

        self._write(self._clear())
        assert self._saved is not None
        termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until `fg`
        self._enter_raw()
        self.redraw()

    # --- reading keys -------------------------------------------------------------------------

    async def read_keys(self) -> None:
        """Read and act on keys until end of input (or cancelled)."""
        async with self._lines_in:
            while True:
                await trio.lowlevel.wait_readable(self._fd)
                try:
                    data = os.read(self._fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:  # the terminal went away
                    data = b""
                if not data:
                    self._lines_in.send_nowait(None)
                    return
                for key in self._keys(data):
                    if not self._key(key):
                        return
                # Once per read, not per key: a paste is drawn once.
                self._write(self._draw_input())

    def _keys(self, data: bytes) -> Iterator[str]:
        """Keys: a character, or a whole escape sequence (arrows and the like)."""
        for char in self._decoder.decode(data):
            if self._escape is not None:
                self._escape += char
                sequence = self._escape
                if (len(sequence) == 2 and char not in "[O") or (
                    len(sequence) == 3 and sequence[1] == "O"
                ) or (len(sequence) >= 3 and "\x40" <= char <= "\x7e") or len(sequence) > 16:
                    self._escape = None
                    yield sequence
            elif char == "\x1b":
                self._escape = char
            else:
                yield char

    def _key(self, key: str) -> bool:
        """Act on one key; False once input has ended."""
        buffer = self._buffer
        if key in ("\r", "\n"):
            line = "".join(buffer)
            if line.strip() and not self._asking and (
                not self._history or self._history[-1] != line
            ):
                self._history.append(line)
            self._set_line("")
            self._lines_in.send_nowait(line)
        elif key == "\x03":  # Ctrl-C
            self._on_interrupt()
        elif key == "\x04":  # Ctrl-D: end of input on an empty line, else delete
            if not buffer:
                self._lines_in.send_nowait(None)
                return False
            if self._cursor < len(buffer):
                del buffer[self._cursor]
        elif key in ("\x7f", "\x08"):  # Backspace
            if self._cursor:
                self._cursor -= 1
                del buffer[self._cursor]
        elif key == "\x1b[3~":  # Delete
            if self._cursor < len(buffer):
                del buffer[self._cursor]
        elif key in ("\x1b[D", "\x1bOD", "\x02"):  # Left, Ctrl-B
            self._cursor = max(0, self._cursor - 1)
        elif key in ("\x1b[C", "\x1bOC", "\x06"):  # Right, Ctrl-F
            self._cursor = min(len(buffer), self._cursor + 1)
        elif key in ("\x1b[H", "\x1bOH", "\x1b[1~", "\x1b[7~", "\x01"):  # Home, Ctrl-A
            self._cursor = 0
        elif key in ("\x1b[F", "\x1bOF", "\x1b[4~", "\x1b[8~", "\x05"):  # End, Ctrl-E
            self._cursor = len(buffer)
        elif key in ("\x1b[1;5D", "\x1bb"):  # Ctrl-Left, Alt-B: a word back
            self._cursor = self._word_start()
        elif key in ("\x1b[1;5C", "\x1bf"):  # Ctrl-Right, Alt-F: a word on
            self._cursor = self._word_end()
        elif key == "\x0b":  # Ctrl-K: delete to the end
            del buffer[self._cursor:]
        elif key == "\x15":  # Ctrl-U: delete to the start
            del buffer[:self._cursor]
            self._cursor = 0
        elif key == "\x17":  # Ctrl-W: delete the word before the cursor
            start = self._word_start()
            del buffer[start:self._cursor]
            self._cursor = start
        elif key in ("\x1b[A", "\x1bOA", "\x10"):  # Up, Ctrl-P: the previous line sent
            self._browse(-1)
        elif key in ("\x1b[B", "\x1bOB", "\x0e"):  # Down, Ctrl-N
            self._browse(1)
        elif key == "\x0c":  # Ctrl-L: clear the screen
            self._drawn_live = False
            self._write("\x1b[H\x1b[2J" + self._draw())
        elif key == "\x1a":  # Ctrl-Z
            self._suspend()
        elif key == "\t":
            self._complete()
        elif len(key) == 1 and key.isprintable():
            buffer.insert(self._cursor, key)
            self._cursor += 1
        return True  # (other control keys and sequences do nothing)

    def _complete(self) -> None:
        """Tab: complete a command's name; elsewhere, four spaces."""
        typed = "".join(self._buffer)
        if typed.startswith("/") and " " not in typed and self._cursor == len(typed):
            names = [name for name in COMMANDS if name.startswith(typed[1:].lower())]
            if len(names) == 1:
                self._set_line(f"/{names[0]} ")
            return
        self._buffer[self._cursor:self._cursor] = "    "
        self._cursor += 4

    def _word_start(self) -> int:
        index = self._cursor
        while index and self._buffer[index - 1] == " ":
            index -= 1
        while index and self._buffer[index - 1] != " ":
            index -= 1
        return index

    def _word_end(self) -> int:
        index, end = self._cursor, len(self._buffer)
        while index < end and self._buffer[index] == " ":
            index += 1
        while index < end and self._buffer[index] != " ":
            index += 1
        return index

    def _browse(self, step: int) -> None:
        if self._asking:
            return
        if self._browsing == len(self._history):
            self._stash = "".join(self._buffer)
        index = min(max(self._browsing + step, 0), len(self._history))
        if index != self._browsing:
            self._browsing = index
            line = self._history[index] if index < len(self._history) else self._stash
            self._buffer[:] = line
            self._cursor = len(self._buffer)

    def _set_line(self, line: str) -> None:
        self._buffer[:] = line
        self._cursor = len(self._buffer)
        self._scroll = 0
        self._browsing = len(self._history)

    async def read_line(self) -> str | None:
        try:
            return await self._lines_out.receive()
        except trio.EndOfChannel:
            return None

    async def ask(self, question: str) -> str | None:
        prompt, self._asking = self._prompt, True
        self.set_prompt(question)
        try:
            return await self.read_line()
        finally:
            self._asking = False
            self.set_prompt(prompt)

    # --- drawing ------------------------------------------------------------------------------

    def set_prompt(self, prompt: str) -> None:
        self._prompt = prompt
        self.redraw()

    def redraw(self) -> None:
        if self._saved is not None:
            self._write(self._clear() + self._draw())

    def _columns(self) -> int:
        try:
            return max(os.get_terminal_size(self._out.fileno()).columns, 10)
        except (OSError, ValueError):
            return 80

    def _style(self, text: str, kind: str) -> str:
        code = _STYLES.get(kind)
        if not self._color or not code or not text:
            return text
        return f"\x1b[{code}m{text}\x1b[0m"

    def _clear(self) -> str:
        """Erase our rows; the cursor ends at the start of the first."""
        if not self._active:
            return ""
        self._active = False
        up = "\x1b[A" if self._drawn_live else ""
        self._drawn_live = False
        return "\r" + up + "\x1b[J"

    def _draw(self) -> str:
        """Draw our rows (from the start of a row): the live row, then the input row."""
        if self._saved is None or not self._prompt:
            return ""
        self._active = True
        text = ""
        if self._live is not None and (self._live_text or self._live_labelled):
            text = self._live_row(self._live_text) + "\r\n"
            self._drawn_live = True
        return text + self._draw_input()

    def _draw_input(self) -> str:
        """The input row, from its start, leaving the cursor where the next key goes."""
        if not self._active:
            return ""
        columns = self._columns()
        prompt = _shorten(self._prompt, columns // 2, keep=2)
        room = columns - 1 - _cells(prompt)  # the last column stays free: no pending wrap
        buffer = self._buffer
        if _cells("".join(buffer)) <= room:
            self._scroll = 0
        self._scroll = min(self._scroll, self._cursor)
        # Scroll right just enough to keep the cursor on the row (walking back from it).
        start, used = self._cursor, 0
        while start > self._scroll and used + _cell(buffer[start - 1]) <= room:
            start -= 1
            used += _cell(buffer[start])
        if start > self._scroll:
            self._scroll = start
        shown = _fit("".join(buffer[self._scroll:]), room)
        column = _cells(prompt) + _cells("".join(buffer[self._scroll:self._cursor]))
        move = f"\x1b[{column}C" if column else ""
        return "\r\x1b[K" + self._style(prompt, "prompt") + shown + "\r" + move

    def _live_row(self, text: str) -> str:
        assert self._live is not None
        label, kind = self._live
        if not self._live_labelled:
            return text
        return f"{self._style(label, kind)}: {text}"

    def _rows(self, label: str, kind: str, text: str) -> str:
        """A message or line as finished rows: wrapped by us, so that the rows we redraw
        below them are where we think."""
        columns = self._columns()
        prefix = f"{label}: " if label else ""
        out = []
        lines = _printable(text, tabs="    ").removesuffix("\n").split("\n")
        for number, line in enumerate(lines):
            rows = _wrap(line, _cells(prefix) if number == 0 else 0, columns)
            if number == 0 and prefix:
                rows[0] = f"{self._style(label, kind)}: {rows[0]}"
            elif not prefix:
                rows = [self._style(row, kind) for row in rows]
            out.extend(rows)
        return "".join(row + "\r\n" for row in out)

    def _write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()

    # --- output -------------------------------------------------------------------------------

    def line(self, text: str, kind: str = "note") -> None:
        self._write(self._clear() + self._rows("", kind, text) + self._draw())

    def notice(self, text: str) -> None:
        self.line(text, "note")

    def message(self, label: str, kind: str, text: str) -> None:
        self._write(self._clear() + self._rows(_printable(label), kind, text) + self._draw())

    def stream_start(self, label: str, kind: str) -> None:
        out = self._clear() + self._end_live()
        self._live = (_printable(label), kind)
        self._live_text = ""
        self._live_labelled = True
        self._write(out + self._commit_live() + self._draw())

    def stream(self, text: str) -> None:
        if self._live is None:
            return
        out = self._clear()
        self._live_text += _printable(text, tabs="    ")
        self._write(out + self._commit_live() + self._draw())

    def stream_end(self) -> None:
        self._write(self._clear() + self._end_live() + self._draw())

    def _commit_live(self) -> str:
        """The live row's finished parts as rows of output: each line ended, and each full
        row of a long line (cut as `_wrap` does)."""
        assert self._live is not None
        out = ""
        columns = self._columns()
        while True:
            label = f"{self._live[0]}: " if self._live_labelled else ""
            line, newline, rest = self._live_text.partition("\n")
            rows = _wrap(line, _cells(label), columns)
            if len(rows) == 1 and not newline:
                return out
            done = rows[:-1] if not newline else rows
            for row in done:
                out += self._live_row(row) + "\r\n"
                self._live_labelled = False
            self._live_text = (rows[-1] if not newline else "") + (rest if newline else "")
            if not newline:
                return out

    def _end_live(self) -> str:
        if self._live is None:
            return ""
        # Nothing left after a final newline, or nothing streamed at all (stopped before the
        # first piece): no row. The label alone showed that a reply was coming.
        out = self._live_row(self._live_text) + "\r\n" if self._live_text else ""
        self._live = None
        return out


# --- one chat on screen -----------------------------------------------------------------------


class _ChatView:
    """One open chat on screen: stored messages one each, a streamed reply growing on its
    line.

    It also tracks what we sent, for `wait_idle`: each line becomes a user message, and the
    agent answers the chat's user messages one after another, whoever sent them. So the
    answer to ours has come once the user messages waiting for an answer when it came,
    ours included, have had as many answers (stored replies, errors, stops).
    """

    def __init__(self, io: _IO, *, device_id: str | None, agent: str) -> None:
        self._io = io
        self._device_id = device_id
        self._agent = agent
        self._shown: set[str] = set()  # ids of messages printed in full or streamed
        self._streamed: set[str] = set()
        # Replies whose line other output broke into: the rest of their chunks are not
        # printed, and the whole reply is, once stored.
        self._interrupted: set[str] = set()
        self._open: str | None = None  # the reply whose line is being written
        self._sent: deque[str] = deque()  # sent, not yet seen back
        self._waiting = 0  # user messages seen and not answered yet
        self._answers: set[str] = set()  # ids of the replies seen ended
        self._anonymous_answers = 0  # the same, for replies without an id
        self._due = 0  # answers to be seen before what we sent is answered
        self._lot = trio.lowlevel.ParkingLot()

    def line(self, text: str, kind: str = "note") -> None:
        self._make_room()
        self._io.line(text, kind)

    def _make_room(self) -> None:
        """Before other output: on a terminal a streaming reply's live row simply stays below
        it; elsewhere the reply's line ends there (and the whole reply comes once stored)."""
        if not self._io.editing:
            self._close_line()

    def _close_line(self) -> None:
        if self._open is not None:
            self._interrupted.add(self._open)
            self._open = None
            self._io.stream_end()

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
        if message_id in self._shown:
            return
        ours = False
        if role == "user":
            self._waiting += 1
            if self._sent and content == self._sent[0]:
                self._sent.popleft()
                self._due = self._answer_count() + self._waiting
                ours = True
        elif role == "assistant":
            self._answered(message_id)
        self._lot.unpark_all()
        if isinstance(message_id, str):
            self._shown.add(message_id)
        if message_id in self._streamed and message_id not in self._interrupted:
            if self._open == message_id:
                self._open = None
                self._io.stream_end()
            return  # its text is on the screen already
        label, kind = self._label(message, ours)
        text = content if isinstance(content, str) else str(content)
        self._make_room()
        self._io.message(label, kind, text)

    def _label(self, message: dict[str, Any], ours: bool) -> tuple[str, str]:
        """Who wrote it: "You" for this device, else the sender's name (spec: a message
        without a sender is "You", as before senders existed)."""
        role = message.get("role")
        if role == "assistant":
            return self._agent, "agent"
        if role != "user":
            return str(role or "?"), "other"
        sender = message.get("sender")
        if not isinstance(sender, dict):
            return "You", "you"
        device_id = sender.get("deviceId")
        if self._device_id is not None and device_id == self._device_id:
            return "You", "you"
        if self._device_id is None and ours:
            return "You", "you"  # not paired: the line we just sent, come back
        name = sender.get("name")
        if isinstance(name, str) and name.strip():
            return name.strip(), "other"
        return "You", "you"

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
            self._io.stream(event.text)
        elif isinstance(event, AgentError):
            if self._open is not None and self._open == event.message_id:
                self._open = None
                self._io.stream_end()
            self._answered(event.message_id)
            self.line(f"-- error: {event.error}", "error")
        elif isinstance(event, ReplyCancelled):
            if self._open is not None and event.message_id in (self._open, None):
                self._open = None
                self._io.stream_end()
            self._answered(event.message_id)
            self.line("-- reply stopped")
        elif isinstance(event, Reset):
            self.line("-- back in sync; messages missed meanwhile:")
            self.history(event.snapshot)
        elif isinstance(event, Completed):
            self.line("-- this chat's stream has ended")

    def _answered(self, message_id: object) -> None:
        """A reply ended: stored, failed or stopped (a stopped one may be stored after)."""
        if message_id in self._answers:
            return  # a stopped reply, now stored
        if isinstance(message_id, str):
            self._answers.add(message_id)
        else:
            self._anonymous_answers += 1
        self._waiting = max(0, self._waiting - 1)  # (a greeting answers nothing)
        self._lot.unpark_all()

    def _answer_count(self) -> int:
        return len(self._answers) + self._anonymous_answers

    def _start_reply(self, message_id: str) -> None:
        self._close_line()
        self._streamed.add(message_id)
        self._open = message_id
        self._io.stream_start(self._agent, "agent")

    def finish(self) -> None:
        self._close_line()

    async def wait_idle(self) -> None:
        """Until every line sent has come back and been answered."""
        while self._sent or self._answer_count() < self._due:
            await self._lot.park()


# --- the session ------------------------------------------------------------------------------


def _title(chat: JSON) -> str:
    title = chat.get("title") if isinstance(chat, dict) else None
    return str(title) if title else str(chat["id"])


class _Session:
    """The chat client proper: the open chat, the numbered list of chats, the commands."""

    def __init__(self, client: RelayClient, args: argparse.Namespace, io: _IO, *,
                 interactive: bool, device_id: str | None) -> None:
        self._client = client
        self._args = args
        self._io = io
        self._interactive = interactive
        self._device_id = device_id
        self._listing: list[tuple[JSON, JSON]] = []  # (project, chat), numbered from 1
        self._chat: JSON | None = None
        self._project_id: str | None = None
        self._view: _ChatView | None = None
        self._follow_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._leave = trio.CancelScope()  # cancelled by /quit

    # --- chats ------------------------------------------------------------------------------

    async def _list_chats(self) -> list[tuple[JSON, JSON]]:
        """Every project's chats, each project subscribed just long enough for its list."""
        chats: list[tuple[JSON, JSON]] = []
        lines: list[tuple[str, str]] = []
        for project in self._client.projects:
            if not isinstance(project, dict) or not isinstance(project.get("id"), str):
                continue
            lines.append((f"  {project.get('name', project['id'])} ({project['id']})", "text"))
            try:
                async with self._client.subscribe("project", project["id"]) as listing:
                    found = [c for c in listing.snapshot
                             if isinstance(c, dict) and isinstance(c.get("id"), str)]
            except RequestRejected as exc:
                lines.append((f"    (its chats could not be listed: {exc})", "error"))
                continue
            for chat in found:
                chats.append((project, chat))
                current = self._chat is not None and chat["id"] == self._chat["id"]
                lines.append((f"    {len(chats)}) {_title(chat)} ({chat['id']})"
                              + ("  <- open" if current else ""), "text"))
        self._listing = chats
        self._line("Projects:", "text")
        for text, kind in lines:
            self._line(text, kind)
        if not chats:
            self._line("-- no chats yet: /new TITLE creates one")
        return chats

    def _line(self, text: str, kind: str = "note") -> None:
        if self._view is not None:
            self._view.line(text, kind)
        else:
            self._io.line(text, kind)

    def _agent_name(self, chat: JSON) -> str:
        profile_id = chat.get("modelProfileId") if isinstance(chat, dict) else None
        for profile in self._client.model_profiles:
            if isinstance(profile, dict) and profile.get("id") == profile_id and isinstance(
                profile.get("name"), str
            ):
                return str(profile["name"])
        return str(profile_id) if profile_id else "Agent"

    async def _open(self, chat: JSON, project_id: str | None) -> None:
        """Follow ``chat`` instead of the open one, once its subscription stands (if it fails
        the open chat stays, and the error is raised)."""
        assert self._nursery is not None
        await self._nursery.start(self._follow, chat, project_id)

    async def _follow(self, chat: JSON, project_id: str | None, *,
                      task_status: trio.TaskStatus[None]) -> None:
        chat_id = chat["id"]
        view = _ChatView(self._io, device_id=self._device_id, agent=self._agent_name(chat))
        with trio.CancelScope() as scope:
            try:
                async with self._client.subscribe("chat", chat_id) as live:
                    # No checkpoint from here to the loop: the switch is seen whole.
                    if self._follow_scope is not None:
                        self._follow_scope.cancel()
                    if self._view is not None:
                        self._view.finish()
                    self._chat, self._project_id = chat, project_id
                    self._view, self._follow_scope = view, scope
                    view.line(f"-- {_title(chat)} ({chat_id}): type a message and press Enter;"
                              " /help for commands")
                    view.history(live.snapshot)
                    self._io.set_prompt(_shorten(_title(chat), 24) + "> ")
                    task_status.started()
                    async for event in live:
                        view.event(event)
            except SubscriptionFailed as exc:
                view.line(f"-- this chat's subscription ended: {exc}; /chats and /open to go"
                          " on", "error")
            finally:
                view.finish()

    def _project_of(self, chat_id: str) -> str | None:
        for project, chat in self._listing:
            if chat["id"] == chat_id:
                return str(project["id"])
        return None

    # --- commands ---------------------------------------------------------------------------

    async def _command(self, name: str, argument: str) -> None:
        if name == "chats":
            await self._list_chats()
        elif name == "open":
            await self._open_command(argument)
        elif name == "new":
            await self._new(argument)
        elif name == "stop":
            if self._chat is None:
                self._line("-- no chat is open")
            elif not await self._client.cancel_reply(self._chat["id"]):
                self._line("-- no reply is running")
        elif name == "help":
            self._line(HELP)
        else:
            self._line(f"-- unknown command /{name} (nothing was sent): /help lists the"
                       " commands; // sends a line starting with /", "error")

    async def _open_command(self, argument: str) -> None:
        if not argument:
            self._line("-- /open N or /open ID: N from /chats, or a chat's id", "error")
            return
        chat: JSON | None = None
        project_id: str | None = None
        if argument.isdigit():
            number = int(argument)
            if not 1 <= number <= len(self._listing):
                self._line(f"-- no chat number {number}: /chats lists them", "error")
                return
            project, chat = self._listing[number - 1]
            project_id = project["id"]
        else:
            for project, known in self._listing:
                if argument in (known["id"], _title(known)):
                    chat, project_id = known, project["id"]
                    break
            else:
                chat = {"id": argument}  # one we have not listed: the relay will say
        try:
            await self._open(chat, project_id)
        except RequestRejected as exc:
            self._line(f"-- cannot open {argument}: {exc}", "error")

    async def _new(self, title: str) -> None:
        project_id = self._project_id
        if project_id is None:
            projects = [p for p in self._client.projects
                        if isinstance(p, dict) and isinstance(p.get("id"), str)]
            if not projects:
                self._line("-- there is no project to create a chat in", "error")
                return
            project_id = projects[0]["id"]
        chat = await self._client.create_chat(project_id, title=title.strip() or None)
        if not isinstance(chat, dict) or not isinstance(chat.get("id"), str):
            self._line(f"-- the relay answered with no chat: {chat!r}", "error")
            return
        self._listing.append(({"id": project_id}, chat))
        await self._open(chat, project_id)

    async def _send(self, text: str) -> None:
        view, chat = self._view, self._chat
        if view is None or chat is None:
            self._line("-- no chat is open: /chats and /open to choose one", "error")
            return
        view.sent(text)
        try:
            await self._client.send(chat["id"], text)
        except RelayClientError:
            view.unsent(text)
            raise

    async def _handle(self, line: str) -> None:
        """One line typed: a command, or a message to send."""
        try:
            if line.startswith("/") and not line.startswith("//"):
                name, _, argument = line[1:].partition(" ")
                await self._command(name.lower(), argument.strip())
            else:
                await self._send(line[1:] if line.startswith("//") else line)
        except AuthFailed:
            raise
        except RelayClientError as exc:
            if self._client.state is ConnectionState.CLOSED:
                raise
            what = "not sent" if not line.startswith("/") or line.startswith("//") else line
            self._line(f"-- {what}: {exc}", "error")

    async def _work(self, lines: trio.MemoryReceiveChannel[str]) -> None:
        """Lines in the order typed, one at a time, while typing goes on."""
        async with lines:
            async for line in lines:
                if line.strip().lower() == "/quit":
                    self._leave.cancel()  # in its turn: what was typed before it is done
                    return
                await self._handle(line)

    async def _show_states(self) -> None:
        async for state in self._client.state_changes():
            if state is ConnectionState.RECONNECTING:
                close = self._client.last_close
                why = f" ({close.code} {close.reason})".rstrip() if close else ""
                self._io.notice(f"-- connection lost{why}; reconnecting")
            elif state is ConnectionState.CONNECTED and self._client.last_close is not None:
                self._io.notice("-- reconnected")

    async def _choose(self, chats: list[tuple[JSON, JSON]]) -> tuple[JSON, JSON] | None:
        """Ask which chat; None at end of input."""
        while True:
            answer = await self._io.ask(f"Chat [1-{len(chats)}, default 1]: ")
            if answer is None:
                return None
            answer = answer.strip() or "1"
            if answer.isdigit() and 1 <= int(answer) <= len(chats):
                return chats[int(answer) - 1]
            self._io.line(f"No chat {answer!r}.", "error")

    # --- the whole session ------------------------------------------------------------------

    async def run(self) -> int:
        """The whole session; returns the exit status."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._show_states)
            if isinstance(self._io, _TerminalIO):
                nursery.start_soon(self._io.read_keys)
            early = await self._start()
            status = early if early is not None else await self._converse()
            if self._view is not None:
                self._view.finish()
            nursery.cancel_scope.cancel()
        return status

    async def _start(self) -> int | None:
        """List the chats and open one; an exit status if the session ends here."""
        chats = await self._list_chats()
        if self._args.chat:
            chosen = next(((p, c) for p, c in chats if c["id"] == self._args.chat),
                          (None, {"id": self._args.chat}))
        elif not chats:  # (said so by the list): /new makes one
            self._io.set_prompt("> ")
            return None
        elif self._interactive and len(chats) > 1:
            picked = await self._choose(chats)
            if picked is None:
                return 0
            chosen = picked
        else:
            chosen = chats[0]
        project, chat = chosen
        await self._open(chat, project["id"] if project else self._project_of(chat["id"]))
        return None

    async def _converse(self) -> int:
        send, receive = trio.open_memory_channel[str](64)
        async with trio.open_nursery() as work:
            self._leave = work.cancel_scope
            work.start_soon(self._work, receive)
            async with send:
                while (line := await self._io.read_line()) is not None:
                    if line.strip():
                        await send.send(line)
            if self._io.editing:
                work.cancel_scope.cancel()  # Ctrl-D: leave now
        if self._leave.cancel_called:  # Ctrl-D or /quit
            return 0
        # The end of piped input: what was sent has gone; wait a while for the answers.
        if self._view is not None:
            with trio.move_on_after(self._args.linger):
                await self._view.wait_idle()
        return 0


# --- the command ------------------------------------------------------------------------------


class _SavedDevices:
    """This user's device tokens, one per relay URL: the first PIN sign-in pairs the terminal
    as a device, and later runs sign in with its token (no PIN, and no new device each run).
    The file is the user's alone (0600, in a 0700 folder) and replaced whole on each change."""

    def __init__(self, path: Path, err: TextIO) -> None:
        self.path = path
        self._err = err

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._err.write(f"trio-relay chat: ignoring {self.path}: {exc}\n")
            return {}
        relays = data.get("relays") if isinstance(data, dict) else None
        if not isinstance(relays, dict):
            return {}
        return {url: device for url, device in relays.items() if isinstance(device, dict)
                and all(isinstance(device.get(key), str) for key in ("id", "name", "token"))}

    def token(self, url: str) -> str | None:
        device = self._read().get(url)
        return device["token"] if device else None

    def save(self, url: str, device: Device) -> None:
        relays = self._read()
        if relays.get(url, {}).get("token") == device.token:
            return
        relays[url] = {"id": device.id, "name": device.name, "token": device.token}
        self._write(relays)

    def forget(self, url: str) -> None:
        relays = self._read()
        if relays.pop(url, None) is not None:
            self._write(relays)

    def _write(self, relays: dict[str, dict[str, str]]) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump({"relays": relays}, file, indent=2)
            os.replace(temporary, self.path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            self._err.write(f"trio-relay chat: cannot save this device's sign-in in"
                            f" {self.path}: {exc}\n")


def devices_file(environ: Mapping[str, str]) -> Path:
    """Where `trio-relay chat` keeps its device tokens."""
    config = environ.get("XDG_CONFIG_HOME") or str(
        Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(config) / "trio-relay" / "chat-devices.json"


class _WrongPin(Exception):
    """The PIN typed at the prompt was refused on connecting: ask again."""


class _Unpaired(Exception):
    """The saved token was refused on connecting: pair again with the PIN."""


async def _ask_pin(args: argparse.Namespace, env: Mapping[str, str],
                   stdin: trio.abc.ReceiveStream | None) -> str:
    pin = args.pin or env.get(PIN_VARIABLE)
    if not pin and stdin is None:
        # getpass turns echo off and back on; abandoned in its thread by Ctrl-C it never
        # turns it back on, so the terminal's settings are put back here.
        saved = _terminal_settings()
        try:
            pin = await trio.to_thread.run_sync(getpass.getpass, "PIN: ", abandon_on_cancel=True)
        except EOFError:
            pin = ""
        except BaseException:
            if saved is not None:
                import termios

                termios.tcsetattr(saved[0], termios.TCSADRAIN, saved[1])
                sys.stderr.write("\n")
            raise
    return pin or ""


def _terminal_settings() -> tuple[int, list[Any]] | None:
    """The terminal's fd and settings, when stdin is one."""
    try:
        if not sys.stdin.isatty():
            return None
        import termios

        fd = sys.stdin.fileno()
        return fd, termios.tcgetattr(fd)
    except (OSError, ValueError, ImportError):
        return None


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
    the process's stdin, output to other files, the client's ``connect``, the environment
    (the PIN, where device tokens are kept), and whether to ask which chat (default: when
    stdin is a terminal). The line editor is used when both stdin and stdout are the
    process's own and are a terminal.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    if interactive is None:
        interactive = stdin is None and sys.stdin.isatty()
    name = (args.name or "").strip() or socket.gethostname()[:64] or "Terminal"
    if len(name) > 64 or not name.isprintable():
        err.write("trio-relay chat: --name must be 1 to 64 characters, without control"
                  " characters\n")
        return 1
    ssl_context = None
    if args.cafile:
        try:
            ssl_context = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            err.write(f"trio-relay chat: cannot load {args.cafile}: {exc}\n")
            return 1
    saved = _SavedDevices(devices_file(env), err)
    token = saved.token(args.url)
    typed = False  # the PIN came from the prompt, not from --pin or the environment
    while True:
        pin = None
        if token is None:
            typed = stdin is None and not (args.pin or env.get(PIN_VARIABLE))
            pin = await _ask_pin(args, env, stdin)
            if not pin:
                err.write(f"trio-relay chat: no PIN: pass --pin or set ${PIN_VARIABLE}\n")
                return 1
        try:
            return await _run(
                args, pin=pin, token=token, name=name, ssl_context=ssl_context, saved=saved,
                stdin=stdin, out=out, err=err, connect=connect, env=env,
                interactive=interactive, typed=typed)
        except _WrongPin as exc:
            err.write(f"trio-relay chat: {exc}; try again\n")  # (the user asked anew)
            err.flush()
        except _Unpaired:
            saved.forget(args.url)
            err.write("trio-relay chat: the relay no longer knows this device (revoked, or its"
                      " pairings were reset): sign in with the PIN to pair it again\n")
            err.flush()
            token = None


async def _run(
    args: argparse.Namespace, *, pin: str | None, token: str | None, name: str,
    ssl_context: ssl.SSLContext | None, saved: _SavedDevices,
    stdin: trio.abc.ReceiveStream | None, out: TextIO, err: TextIO, connect: Connect | None,
    env: Mapping[str, str], interactive: bool, typed: bool,
) -> int:
    """One sign-in and the session after it; `_Unpaired` if the saved token was refused,
    `_WrongPin` if the PIN ``typed`` at the prompt was."""
    interrupted = False
    signed_in = False
    # What Ctrl-C cancels: connecting at first, then only the session, so that leaving the
    # client's block closes the connection with the client's tasks still running (they read
    # the relay's answer to our close; cancelled, the close waited for its 2 s timeout).
    target: trio.CancelScope | None = None

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        if target is not None:
            target.cancel()

    editing = (stdin is None and out is sys.stdout and sys.stdin.isatty()
               and sys.stdout.isatty() and env.get("TERM", "") != "dumb")
    io: _PlainIO | _TerminalIO
    if editing:
        io = _TerminalIO(sys.stdin.fileno(), out, on_interrupt=interrupt,
                         color="NO_COLOR" not in env)
    else:
        io = _PlainIO(stdin, out, err)
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            target = nursery.cancel_scope
            if threading.current_thread() is threading.main_thread():
                async def on_ctrl_c(task_status: trio.TaskStatus[None]) -> None:
                    with trio.open_signal_receiver(signal.SIGINT) as signals:
                        task_status.started()
                        async for _ in signals:
                            interrupt()

                await nursery.start(on_ctrl_c)
                if isinstance(io, _TerminalIO):
                    async def on_resize() -> None:
                        with trio.open_signal_receiver(signal.SIGWINCH) as signals:
                            async for _ in signals:
                                io.redraw()

                    nursery.start_soon(on_resize)
            async with open_relay_client(
                args.url, pin=pin, token=token, device_name=name if pin else None,
                request_timeout=args.timeout, ssl_context=ssl_context, connect=connect,
            ) as client:
                signed_in = True
                if client.device is not None:
                    saved.save(args.url, client.device)
                with trio.CancelScope() as target:
                    if interrupted:
                        target.cancel()
                    device_id = client.device.id if client.device is not None else None
                    session = _Session(client, args, io, interactive=interactive,
                                       device_id=device_id)
                    if isinstance(io, _TerminalIO):
                        with io.raw():
                            status = await session.run()
                    else:
                        status = await session.run()
            nursery.cancel_scope.cancel()
    except BaseException as exc:
        error = _single(exc)
        if isinstance(error, TokenInvalid):
            if not signed_in:
                raise _Unpaired from None
            saved.forget(args.url)  # refused on a reconnect: the next run asks for the PIN
        elif isinstance(error, AuthFailed) and error.code == "auth_failed" and typed and (
            not signed_in
        ):
            raise _WrongPin(error.error) from None
        if isinstance(error, RelayClientError):
            return _failed(error, out, err)
        if isinstance(error, ValueError):  # a malformed URL
            err.write(f"trio-relay chat: {error}\n")
            return 1
        if not isinstance(error, KeyboardInterrupt):
            raise
        interrupted = True
    if interrupted:
        if not editing:
            out.write("\n")
            out.flush()
        return 130
    return status


def _single(exc: BaseException) -> BaseException:
    """The one error a group stands for (Cancelled aside), else ``exc`` itself."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []
    groups: list[BaseException] = [exc]
    while groups:
        group = groups.pop()
        if isinstance(group, BaseExceptionGroup):
            groups.extend(group.exceptions)
        else:
            leaves.append(group)
    errors = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    return errors[0] if len(errors) == 1 else exc


def _failed(exc: RelayClientError, out: TextIO, err: TextIO) -> int:
    out.flush()
    err.write(f"\ntrio-relay chat: {exc}\n")
    err.flush()
    return 1
