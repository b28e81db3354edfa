"""The line being typed, edited key by key: no terminal and no relay here, so it is tested
by feeding it keys.

`KeyDecoder` turns the bytes read from a raw tty into keys (a character, or a whole escape
sequence); `LineEditor` acts on each key (moving, deleting, history, Tab) and says when a
line is done or the terminal must act (Ctrl-C, Ctrl-D, Ctrl-L, Ctrl-Z).
"""

from __future__ import annotations

import codecs
import enum
from collections.abc import Iterator

from . import commands
from .text import cell, cells, fit

__all__ = ["KeyDecoder", "LineEditor", "Signal"]


class Signal(enum.Enum):
    """A key for the terminal rather than for the line."""

    INTERRUPT = "interrupt"  # Ctrl-C
    END = "end"  # Ctrl-D on an empty line: end of input
    CLEAR = "clear"  # Ctrl-L: clear the screen
    SUSPEND = "suspend"  # Ctrl-Z


class KeyDecoder:
    """Bytes as read from the tty, in pieces of any size, to keys."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._escape: str | None = None  # an escape sequence begun, not yet whole

    def keys(self, data: bytes) -> Iterator[str]:
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


class LineEditor:
    """The line being typed, its cursor, and the lines sent before (Up and Down)."""

    def __init__(self) -> None:
        self.buffer: list[str] = []
        self.cursor = 0
        #: The first character shown on the input row: kept by `view`, reset with the line.
        self.scroll = 0
        #: Answering a question (which chat): the answer is not history, nor browsed to.
        self.asking = False
        self.history: list[str] = []
        self._browsing = 0  # index into history while Up/Down browse it
        self._stash = ""  # the line being typed when browsing began

    @property
    def text(self) -> str:
        return "".join(self.buffer)

    def key(self, key: str) -> str | Signal | None:
        """Act on one key: the whole line on Enter, a `Signal` for the terminal, else None."""
        buffer = self.buffer
        if key in ("\r", "\n"):
            line = self.text
            if line.strip() and not self.asking and (
                not self.history or self.history[-1] != line
            ):
                self.history.append(line)
            self._set_line("")
            return line
        if key == "\x03":
            return Signal.INTERRUPT
        if key == "\x04":  # Ctrl-D: end of input on an empty line, else delete
            if not buffer:
                return Signal.END
            if self.cursor < len(buffer):
                del buffer[self.cursor]
        elif key == "\x0c":
            return Signal.CLEAR
        elif key == "\x1a":
            return Signal.SUSPEND
        elif key in ("\x7f", "\x08"):  # Backspace
            if self.cursor:
                self.cursor -= 1
                del buffer[self.cursor]
        elif key == "\x1b[3~":  # Delete
            if self.cursor < len(buffer):
                del buffer[self.cursor]
        elif key in ("\x1b[D", "\x1bOD", "\x02"):  # Left, Ctrl-B
            self.cursor = max(0, self.cursor - 1)
        elif key in ("\x1b[C", "\x1bOC", "\x06"):  # Right, Ctrl-F
            self.cursor = min(len(buffer), self.cursor + 1)
        elif key in ("\x1b[H", "\x1bOH", "\x1b[1~", "\x1b[7~", "\x01"):  # Home, Ctrl-A
            self.cursor = 0
        elif key in ("\x1b[F", "\x1bOF", "\x1b[4~", "\x1b[8~", "\x05"):  # End, Ctrl-E
            self.cursor = len(buffer)
        elif key in ("\x1b[1;5D", "\x1bb"):  # Ctrl-Left, Alt-B: a word back
            self.cursor = self._word_start()
        elif key in ("\x1b[1;5C", "\x1bf"):  # Ctrl-Right, Alt-F: a word on
            self.cursor = self._word_end()
        elif key == "\x0b":  # Ctrl-K: delete to the end
            del buffer[self.cursor:]
        elif key == "\x15":  # Ctrl-U: delete to the start
            del buffer[:self.cursor]
            self.cursor = 0
        elif key == "\x17":  # Ctrl-W: delete the word before the cursor
            start = self._word_start()
            del buffer[start:self.cursor]
            self.cursor = start
        elif key in ("\x1b[A", "\x1bOA", "\x10"):  # Up, Ctrl-P: the previous line sent
            self._browse(-1)
        elif key in ("\x1b[B", "\x1bOB", "\x0e"):  # Down, Ctrl-N
            self._browse(1)
        elif key == "\t":
            self._complete()
        elif len(key) == 1 and key.isprintable():
            buffer.insert(self.cursor, key)
            self.cursor += 1
        return None  # (other control keys and sequences do nothing)

    def view(self, room: int) -> tuple[str, int]:
        """What of the line fits in ``room`` columns, scrolled sideways just enough to keep
        the cursor in it; and the cursor's column in that."""
        buffer = self.buffer
        if cells(self.text) <= room:
            self.scroll = 0
        self.scroll = min(self.scroll, self.cursor)
        # Scroll right just enough to keep the cursor on the row (walking back from it).
        start, used = self.cursor, 0
        while start > self.scroll and used + cell(buffer[start - 1]) <= room:
            start -= 1
            used += cell(buffer[start])
        if start > self.scroll:
            self.scroll = start
        shown = fit("".join(buffer[self.scroll:]), room)
        return shown, cells("".join(buffer[self.scroll:self.cursor]))

    def _complete(self) -> None:
        """Tab: complete a command's name; elsewhere, four spaces."""
        typed = self.text
        if typed.startswith("/") and " " not in typed and self.cursor == len(typed):
            line = commands.complete(typed)
            if line is not None:
                self._set_line(line)
            return
        self.buffer[self.cursor:self.cursor] = "    "
        self.cursor += 4

    def _word_start(self) -> int:
        index = self.cursor
        while index and self.buffer[index - 1] == " ":
            index -= 1
        while index and self.buffer[index - 1] != " ":
            index -= 1
        return index

    def _word_end(self) -> int:
        index, end = self.cursor, len(self.buffer)
        while index < end and self.buffer[index] == " ":
            index += 1
        while index < end and self.buffer[index] != " ":
            index += 1
        return index

    def _browse(self, step: int) -> None:
        if self.asking:
            return
        if self._browsing == len(self.history):
            self._stash = self.text
        index = min(max(self._browsing + step, 0), len(self.history))
        if index != self._browsing:
            self._browsing = index
            line = self.history[index] if index < len(self.history) else self._stash
            self.buffer[:] = line
            self.cursor = len(self.buffer)

    def _set_line(self, line: str) -> None:
        self.buffer[:] = line
        self.cursor = len(self.buffer)
        self.scroll = 0
        self._browsing = len(self.history)
