"""A terminal's screen, drawn by us over a raw tty: output scrolls above the line being
typed, so an incoming message or a streaming reply never breaks what you are typing."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import trio

from .editor import KeyDecoder, LineEditor, Signal
from .text import cells, printable, shorten, wrap

__all__ = ["TerminalScreen"]


_STYLES = {"you": "1;32", "other": "1;33", "agent": "1;36", "note": "2", "error": "31",
           "prompt": "1"}


class TerminalScreen:
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
        self._editor = LineEditor()
        self._live: tuple[str, str] | None = None  # the live row's (label, kind), None: gone
        self._live_text = ""
        self._live_labelled = True  # the live row still starts with the label
        self._decoder = KeyDecoder()
        # Unbounded: lines come at the speed of typing (or of one paste).
        self._lines_in, self._lines_out = trio.open_memory_channel[str | None](math.inf)

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
                for key in self._decoder.keys(data):
                    if not self._key(key):
                        return
                # Once per read, not per key: a paste is drawn once.
                self._write(self._draw_input())

    def _key(self, key: str) -> bool:
        """Act on one key; False once input has ended."""
        done = self._editor.key(key)
        if isinstance(done, str):
            self._lines_in.send_nowait(done)
        elif done is Signal.INTERRUPT:
            self._on_interrupt()
        elif done is Signal.END:
            self._lines_in.send_nowait(None)
            return False
        elif done is Signal.CLEAR:
            self._drawn_live = False
            self._write("\x1b[H\x1b[2J" + self._draw())
        elif done is Signal.SUSPEND:
            self._suspend()
        return True

    async def read_line(self) -> str | None:
        try:
            return await self._lines_out.receive()
        except trio.EndOfChannel:
            return None

    async def ask(self, question: str) -> str | None:
        prompt, self._editor.asking = self._prompt, True
        self.set_prompt(question)
        try:
            return await self.read_line()
        finally:
            self._editor.asking = False
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
        prompt = shorten(self._prompt, columns // 2, keep=2)
        room = columns - 1 - cells(prompt)  # the last column stays free: no pending wrap
        shown, column = self._editor.view(room)
        column += cells(prompt)
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
        lines = printable(text, tabs="    ").removesuffix("\n").split("\n")
        for number, line in enumerate(lines):
            rows = wrap(line, cells(prefix) if number == 0 else 0, columns)
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
        self._write(self._clear() + self._rows(printable(label), kind, text) + self._draw())

    def stream_start(self, label: str, kind: str) -> None:
        out = self._clear() + self._end_live()
        self._live = (printable(label), kind)
        self._live_text = ""
        self._live_labelled = True
        self._write(out + self._commit_live() + self._draw())

    def stream(self, text: str) -> None:
        if self._live is None:
            return
        out = self._clear()
        self._live_text += printable(text, tabs="    ")
        self._write(out + self._commit_live() + self._draw())

    def stream_end(self) -> None:
        self._write(self._clear() + self._end_live() + self._draw())

    def _commit_live(self) -> str:
        """The live row's finished parts as rows of output: each line ended, and each full
        row of a long line (cut as `wrap` does)."""
        assert self._live is not None
        out = ""
        columns = self._columns()
        while True:
            label = f"{self._live[0]}: " if self._live_labelled else ""
            line, newline, rest = self._live_text.partition("\n")
            rows = wrap(line, cells(label), columns)
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
