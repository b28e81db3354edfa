"""``trio-relay chat URL``, the terminal client, on the public `trio_relay.client` API only.

`cli` adds the command's arguments, `app` signs in and runs a `session.Session`, which shows
one chat at a time (`view`) on a `screen` (plain) or a `terminal` (edited with `editor`);
`commands` parses what is typed, `text` measures and escapes it, `devices` keeps the
sign-in tokens.
"""

from .app import run_chat
from .cli import add_chat_command

__all__ = ["add_chat_command", "run_chat"]
