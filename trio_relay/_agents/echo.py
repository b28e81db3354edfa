"""`EchoAgent`: the demo agent, which streams ``Echo: <what you said>`` back in a few pieces.

It stands in for a real AI agent so the relay's streaming path (``reply_started``, ``chunk``,
final ``message``) can be exercised end to end without a model. It does no I/O but sleeping.
"""

from __future__ import annotations

import bisect
import re
from typing import Final

import attrs
import trio

from .agent import Emit

__all__ = ["EchoAgent", "split_text"]

# A word boundary here is where whitespace ends and a word starts, so each piece keeps its
# trailing spaces and the pieces read naturally when printed one after another.
_WORD_START: Final = re.compile(r"(?<=\s)(?=\S)")


@attrs.frozen
class EchoAgent:
    """Answers ``content`` with ``Echo: content``, emitting it in about ``chunks`` pieces."""

    chunk_delay: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    chunks: int = attrs.field(default=5, validator=attrs.validators.ge(1))

    async def reply(self, content: str, emit: Emit) -> str:
        """Stream the reply through ``emit``, one piece per ``chunk_delay``; return it whole."""
        text = f"Echo: {content}"
        for piece in split_text(text, self.chunks):
            await trio.sleep(self.chunk_delay)
            emit(piece)
        return text


def split_text(text: str, pieces: int) -> list[str]:
    """Split ``text`` into ``pieces`` non-empty parts (fewer if it is shorter) that join to it.

    Cuts fall on word boundaries when there are enough of them, as close as possible to equal
    lengths; otherwise every word boundary is used and the longest parts are halved.
    """
    if not text:
        return []
    count = max(1, min(pieces, len(text)))
    boundaries = [m.start() for m in _WORD_START.finditer(text)]
    if len(boundaries) >= count - 1:
        cuts = _nearest_boundaries(boundaries, len(text), count)
        return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    parts = [text[a:b] for a, b in zip([0, *boundaries], [*boundaries, len(text)], strict=True)]
    while len(parts) < count:
        # Too few words for the pieces asked for: halve the longest part (count <= len(text),
        # so some part always has at least two characters).
        i = max(range(len(parts)), key=lambda k: len(parts[k]))
        half = len(parts[i]) // 2
        parts[i : i + 1] = [parts[i][:half], parts[i][half:]]
    return parts


def _nearest_boundaries(boundaries: list[int], length: int, count: int) -> list[int]:
    """Pick ``count - 1`` increasing boundaries, each the one nearest its ideal position."""
    cuts: list[int] = []
    low = 0  # index of the first boundary still free to use
    for i in range(1, count):
        # Leave enough boundaries after this cut for the cuts still to come.
        high = len(boundaries) - (count - 1 - i)  # exclusive upper index for this cut
        ideal = length * i / count
        j = bisect.bisect_left(boundaries, ideal, low, high)
        if j == high or (j > low and ideal - boundaries[j - 1] <= boundaries[j] - ideal):
            j -= 1
        cuts.append(boundaries[j])
        low = j + 1
    return cuts
