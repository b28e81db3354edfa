"""The ``chat`` command's arguments, for the ``trio-relay`` argument parser."""

from __future__ import annotations

import argparse

__all__ = ["PIN_VARIABLE", "add_chat_arguments", "add_chat_command"]

PIN_VARIABLE = "TRIO_RELAY_PIN"


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

