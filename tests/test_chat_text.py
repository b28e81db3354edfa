"""The terminal client's text: control characters made harmless, widths in columns."""

from __future__ import annotations

from trio_relay._chat.text import cells, fit, printable, shorten, wrap


def test_text_is_made_harmless_and_measured() -> None:
    assert printable("a\x1b[2Jb\r\n\x07\tc\x9b") == "a^[[2Jb\n^G\tc\ufffd"
    assert printable("\tx", tabs="    ") == "    x"
    assert cells("e\u0301日") == 3  # a combining mark takes no column, a wide one two
    assert shorten("a long prompt> ", 8, keep=2) == "a lon\u2026> "
    assert wrap("one two three", 0, 8) == ["one two ", "three"]
    assert wrap("abcdef", 4, 5) == ["a", "bcdef"]


def test_wide_characters_are_cut_whole() -> None:
    assert fit("日本語", 5) == "日本"
    assert wrap("日本語", 0, 3) == ["日", "本", "語"]
    assert shorten("short", 10) == "short"
