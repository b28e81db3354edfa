"""``trio-relay chat URL``, the terminal client, on the public `trio_relay.client` API only."""

from .app import add_chat_command, run_chat

__all__ = ["add_chat_command", "run_chat"]
