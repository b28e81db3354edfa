"""`SilentAgent`: the agent of chats that get no answer."""

from __future__ import annotations

from typing import ClassVar

import attrs

from .agent import Emit

__all__ = ["SilentAgent"]


@attrs.frozen
class SilentAgent:
    """An agent that never answers: a message sent to its chats is stored and pushed, and
    that is all. For chats that only people write in, and for benchmarks, where every
    ``send`` must be exactly one push."""

    answers: ClassVar[bool] = False

    async def reply(self, content: str, emit: Emit) -> str:
        raise AssertionError("a silent agent is never asked to reply")  # pragma: no cover
