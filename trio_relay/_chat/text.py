"""Text for a terminal: control characters made harmless, and widths in columns.

Pure functions: a message must never drive the terminal, and the rows the screen redraws
below the output are only where it thinks if it measures and cuts the text itself.
"""

from __future__ import annotations

import unicodedata

__all__ = ["cell", "cells", "fit", "fit_end", "printable", "shorten", "wrap"]


def printable(text: str, *, tabs: str = "\t") -> str:
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


def cell(char: str) -> int:
    """How many terminal columns ``char`` takes (0 for combining marks, 2 for wide ones)."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def cells(text: str) -> int:
    if text.isascii():  # (control characters are gone by now)
        return len(text)
    return sum(cell(char) for char in text)


def fit_end(text: str, start: int, width: int) -> int:
    """The end of the longest piece of ``text`` from ``start`` that takes at most ``width``
    columns."""
    if text.isascii():
        return min(len(text), start + max(width, 0))
    used, end = 0, start
    while end < len(text):
        used += cell(text[end])
        if used > width:
            break
        end += 1
    return end


def fit(text: str, width: int) -> str:
    """The longest start of ``text`` that takes at most ``width`` columns."""
    return text[:fit_end(text, 0, width)]


def shorten(text: str, width: int, *, keep: int = 0) -> str:
    """``text`` in at most ``width`` columns: cut, marked with an ellipsis, before its last
    ``keep`` characters (the "> " or ": " that ends a prompt)."""
    if cells(text) <= width:
        return text
    head, tail = text[:len(text) - keep], text[len(text) - keep:]
    return fit(head, width - 1 - cells(tail)) + "\u2026" + tail


def wrap(text: str, first: int, width: int) -> list[str]:
    """``text`` (one line) cut into rows for a terminal ``width`` columns wide, the first row
    having ``first`` columns taken already; at a space when there is one late enough."""
    rows = []
    room, start = width - first, 0
    while True:
        end = fit_end(text, start, room)
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

