"""The terminal client's line editor, fed keys as a raw tty would give them (no terminal)."""

from __future__ import annotations

import pytest

from trio_relay._chat.editor import KeyDecoder, LineEditor, Signal
from trio_relay._chat.text import cells

LEFT, RIGHT, UP, DOWN, HOME, END = "\x1b[D", "\x1b[C", "\x1b[A", "\x1b[B", "\x1b[H", "\x1b[F"
ENTER, BACKSPACE, DELETE = "\r", "\x7f", "\x1b[3~"


def type_keys(editor: LineEditor, *keys: str) -> list[str | Signal]:
    """Each key in turn (a string of plain characters is one key each); what came out."""
    out: list[str | Signal] = []
    for key in keys:
        for one in [key] if key.startswith("\x1b") else list(key):
            done = editor.key(one)
            if done is not None:
                out.append(done)
    return out


def test_enter_gives_the_line_and_starts_a_new_one() -> None:
    editor = LineEditor()
    assert type_keys(editor, "hello", ENTER) == ["hello"]
    assert (editor.text, editor.cursor) == ("", 0)
    assert type_keys(editor, ENTER) == [""]  # (the session skips blank lines)


def test_moving_inserting_and_deleting() -> None:
    editor = LineEditor()
    type_keys(editor, "helo", LEFT, "l", HOME, DELETE, "H", END, BACKSPACE, "o!")
    assert (editor.text, editor.cursor) == ("Hello!", 6)
    type_keys(editor, HOME, RIGHT, "\x0b")  # Ctrl-K: to the end
    assert editor.text == "H"
    type_keys(editor, "ello world  ", "\x17")  # Ctrl-W: the word before, and its spaces
    assert editor.text == "Hello "
    type_keys(editor, LEFT, LEFT, "\x15")  # Ctrl-U: to the start
    assert (editor.text, editor.cursor) == ("o ", 0)


def test_words() -> None:
    editor = LineEditor()
    type_keys(editor, "one two  three")
    type_keys(editor, "\x1b[1;5D")
    assert editor.cursor == len("one two  ")
    type_keys(editor, "\x1bb", "\x1bb")
    assert editor.cursor == 0
    type_keys(editor, "\x1bf")
    assert editor.cursor == len("one")


def test_ctrl_d_ends_input_only_on_an_empty_line() -> None:
    editor = LineEditor()
    assert type_keys(editor, "ab", HOME, "\x04") == []  # deletes under the cursor
    assert editor.text == "b"
    assert type_keys(editor, "\x04", "\x04") == [Signal.END]


@pytest.mark.parametrize(
    ("key", "signal"),
    [("\x03", Signal.INTERRUPT), ("\x0c", Signal.CLEAR), ("\x1a", Signal.SUSPEND)],
)
def test_keys_for_the_terminal(key: str, signal: Signal) -> None:
    editor = LineEditor()
    type_keys(editor, "typed")
    assert editor.key(key) is signal
    assert editor.text == "typed"  # the line is left as it was


def test_other_control_keys_and_sequences_do_nothing() -> None:
    editor = LineEditor()
    assert type_keys(editor, "a", "\x07", "\x1b[15~", "\x1b", "\x00") == []
    assert editor.text == "a"


def test_history_browsing_keeps_the_line_being_typed() -> None:
    editor = LineEditor()
    type_keys(editor, "first", ENTER, "second", ENTER, "second", ENTER, "  ", ENTER)
    assert editor.history == ["first", "second"]  # no repeat, no blank line
    type_keys(editor, "draft", UP)
    assert editor.text == "second"
    type_keys(editor, UP, UP)
    assert (editor.text, editor.cursor) == ("first", 5)
    type_keys(editor, DOWN, DOWN)
    assert editor.text == "draft"
    type_keys(editor, DOWN)
    assert editor.text == "draft"


def test_an_answer_is_not_history() -> None:
    editor = LineEditor()
    type_keys(editor, "sent", ENTER)
    editor.asking = True
    type_keys(editor, UP)
    assert editor.text == ""  # no browsing while answering
    assert type_keys(editor, "2", ENTER) == ["2"]
    assert editor.history == ["sent"]


def test_tab_completes_a_command_else_indents() -> None:
    editor = LineEditor()
    type_keys(editor, "/op\t")
    assert (editor.text, editor.cursor) == ("/open ", 6)
    editor = LineEditor()
    type_keys(editor, "/\t")  # several commands: nothing
    assert editor.text == "/"
    editor = LineEditor()
    type_keys(editor, "a\t")
    assert (editor.text, editor.cursor) == ("a    ", 5)


def test_view_scrolls_sideways_to_keep_the_cursor_shown() -> None:
    editor = LineEditor()
    type_keys(editor, "abcdefghij")
    assert editor.view(20) == ("abcdefghij", 10)
    assert editor.view(4) == ("ghij", 4)  # the end, the cursor after it
    type_keys(editor, LEFT, LEFT, LEFT, LEFT, LEFT)
    assert editor.view(4) == ("fghi", 0)  # scrolled back just enough
    type_keys(editor, RIGHT)
    assert editor.view(4) == ("fghi", 1)  # and no further than needed
    type_keys(editor, HOME)
    assert editor.view(4) == ("abcd", 0)


def test_view_counts_wide_characters_as_two_columns() -> None:
    editor = LineEditor()
    type_keys(editor, "日本語")
    assert editor.view(10) == ("日本語", 6)
    shown, column = editor.view(4)
    assert cells(shown) <= 4 and column == cells(shown)


def test_key_decoder_joins_pieces_of_keys() -> None:
    decoder = KeyDecoder()
    assert list(decoder.keys(b"a\x1b[")) == ["a"]  # an arrow cut in two reads
    assert list(decoder.keys(b"Db")) == [LEFT, "b"]
    assert list(decoder.keys("é".encode()[:1])) == []  # a character cut in two reads
    assert list(decoder.keys("é".encode()[1:] + b"\x1bOA\x1b[1;5C\x1bb")) == [
        "é", "\x1bOA", "\x1b[1;5C", "\x1bb"]
    assert list(decoder.keys(b"\xff")) == ["\ufffd"]

