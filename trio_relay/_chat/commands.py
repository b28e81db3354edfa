"""What a typed line means: a slash command, or a message to send (``//`` sends one that
starts with ``/``). Pure functions, shared by the session and the line editor's Tab."""

from __future__ import annotations

import attrs

__all__ = ["COMMANDS", "HELP", "Command", "Message", "complete", "is_quit", "parse"]

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


@attrs.frozen
class Command:
    """``/name argument``: ``name`` lower-cased (maybe not one of `COMMANDS`), ``argument``
    stripped."""

    name: str
    argument: str = ""


@attrs.frozen
class Message:
    """A line to send to the chat as it is (a leading ``//`` made ``/``)."""

    text: str


def parse(line: str) -> Command | Message:
    """What ``line`` asks for."""
    if line.startswith("/") and not line.startswith("//"):
        name, _, argument = line[1:].partition(" ")
        return Command(name.lower(), argument.strip())
    return Message(line[1:] if line.startswith("//") else line)


def is_quit(line: str) -> bool:
    """``/quit``, which leaves in its turn: what was typed before it is done first."""
    return line.strip().lower() == "/quit"


def complete(typed: str) -> str | None:
    """The line Tab makes of ``typed`` (all of it before the cursor): the one command whose
    name starts so, with a space; None when none or several do."""
    names = [name for name in COMMANDS if name.startswith(typed[1:].lower())]
    return f"/{names[0]} " if len(names) == 1 else None
