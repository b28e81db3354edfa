"""Where a session reads lines and shows the chat: the `Screen` it talks to, and
`PlainScreen`, for pipes, files and tests (a terminal's is `terminal.TerminalScreen`)."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

import trio

from .text import printable

__all__ = ["PlainScreen", "Screen"]


class Screen(Protocol):
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


class PlainScreen:
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
        self._write(printable(text) + "\n")

    def notice(self, text: str) -> None:
        self._err.write(printable(text) + "\n")
        self._err.flush()

    def message(self, label: str, kind: str, text: str) -> None:
        text = printable(text).removesuffix("\n")
        self._write(f"{printable(label)}: {text}\n")

    def stream_start(self, label: str, kind: str) -> None:
        # Written with the first piece: a reply stopped before any says so without a stub.
        self._label = label

    def stream(self, text: str) -> None:
        if self._label is not None:
            self._write(f"{printable(self._label)}: ")
            self._label = None
            self._line_ended = False
        if text:
            self._write(printable(text))
            self._line_ended = text.endswith("\n")

    def stream_end(self) -> None:
        self._label = None
        if not self._line_ended:
            self._write("\n")
        self._line_ended = True

