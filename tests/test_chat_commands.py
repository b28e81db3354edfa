"""What a typed line means to the terminal client: a command or a message (pure functions)."""

from __future__ import annotations

import pytest

from trio_relay._chat.commands import COMMANDS, HELP, Command, Message, complete, is_quit, parse


@pytest.mark.parametrize(
    ("line", "wanted"),
    [
        ("hello", Message("hello")),
        ("", Message("")),
        ("  /open 2", Message("  /open 2")),  # a command starts the line
        ("//etc/hosts", Message("/etc/hosts")),  # the escape: one slash sent
        ("//", Message("/")),
        ("/chats", Command("chats")),
        ("/OPEN  2 ", Command("open", "2")),  # the name in any case, the argument stripped
        ("/new A title with spaces", Command("new", "A title with spaces")),
        ("/", Command("")),
        ("/nope x", Command("nope", "x")),  # unknown: the session says so, sends nothing
    ],
)
def test_parse(line: str, wanted: Command | Message) -> None:
    assert parse(line) == wanted


@pytest.mark.parametrize(
    ("line", "quits"),
    [("/quit", True), (" /QUIT ", True), ("/quit now", False), ("//quit", False),
     ("quit", False)],
)
def test_is_quit(line: str, quits: bool) -> None:
    assert is_quit(line) is quits


@pytest.mark.parametrize(
    ("typed", "line"),
    [("/c", "/chats "), ("/O", "/open "), ("/q", "/quit "), ("/stop", "/stop "),
     ("/", None), ("/x", None), ("/s", "/stop ")],
)
def test_complete(typed: str, line: str | None) -> None:
    assert complete(typed) == line


def test_help_names_every_command() -> None:
    for name in COMMANDS:
        assert f"/{name}" in HELP
    assert "//" in HELP
