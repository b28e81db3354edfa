"""The `Agent` protocol: what answers a chat's messages, whatever kind of agent it is.

An agent has one method, ``async def reply(content, emit) -> str``: it streams its answer to
``content`` through ``emit`` (a synchronous callable taking one piece of text) as it goes, and
returns the whole answer, which the store keeps as the chat's next message. Two optional
attributes change how a store runs it; `answers` and `run_reply` read them, so that no caller
asks which class an agent is, and a new kind of agent is one new class.

An agent that fails in a way worth telling the chat about raises `AgentError`: its message is
what the chat's subscribers see, its ``detail`` what the log line says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, cast, runtime_checkable

__all__ = ["Agent", "AgentError", "Emit", "HistoryItem", "answers", "run_reply"]

#: What an agent streams its answer through, one piece of text per call.
Emit = Callable[[str], None]
#: One earlier message of a chat, ``{"role": "user" | "assistant", "content": ...}``.
HistoryItem = Mapping[str, str]


@runtime_checkable
class Agent(Protocol):
    """What answers a chat's messages: any object with this ``reply``.

    Two attributes, which an agent need not have (the defaults then hold, so an object with
    ``reply`` alone is a whole agent), say how a store runs it:

    - ``answers`` (default True): False for an agent that never answers. A message sent to
      its chats is stored and pushed, and that is all: no reply starts, no event follows.
    - ``wants_history`` (default False): True for an agent whose ``reply`` takes
      ``history=``, the chat's earlier messages (`HistoryItem`), oldest first.

    They are not members of the protocol: an agent with ``reply`` alone, as the protocol
    asked before they existed, must stay an agent to a type checker too.
    """

    async def reply(self, content: str, emit: Emit) -> str:
        """Stream the answer to ``content`` through ``emit``, piece by piece; return it whole."""
        ...


class _HistoryAgent(Protocol):
    async def reply(self, content: str, emit: Emit, history: Sequence[HistoryItem]) -> str: ...


class AgentError(Exception):
    """A run of an agent failed: ``str(error)`` is for the chat, ``detail`` for the log."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


def answers(agent: Agent) -> bool:
    """Whether ``agent`` answers messages at all (only an ``answers`` of False says no)."""
    # Strict: an agent of the host's may well hold something else under that name.
    return getattr(agent, "answers", True) is not False


async def run_reply(
    agent: Agent,
    content: str,
    emit: Emit,
    history: Callable[[], Awaitable[Sequence[HistoryItem]]],
) -> str:
    """One run of ``agent`` for ``content``; ``history`` is read only for an agent that wants it."""
    if getattr(agent, "wants_history", False) is True:
        earlier = await history()
        return await cast(_HistoryAgent, agent).reply(content, emit, history=earlier)
    return await agent.reply(content, emit)
