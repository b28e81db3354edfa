"""The echo agent: what it replies, how it splits the reply, and how it paces the pieces."""

from __future__ import annotations

import itertools

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_relay._agents.echo import EchoAgent, split_text


async def test_reply_streams_the_echo_in_pieces(autojump_clock: trio.abc.Clock) -> None:
    agent = EchoAgent(chunk_delay=0.05, chunks=5)
    pieces: list[str] = []
    start = trio.current_time()
    text = await agent.reply("the quick brown fox jumps over the lazy dog", pieces.append)
    assert text == "Echo: the quick brown fox jumps over the lazy dog"
    assert "".join(pieces) == text
    assert len(pieces) == 5
    assert all(pieces)
    # One delay before each piece, and nothing else takes time.
    assert trio.current_time() - start == pytest.approx(5 * 0.05)


async def test_each_piece_waits_its_delay(autojump_clock: trio.abc.Clock) -> None:
    times: list[float] = []
    await EchoAgent(chunk_delay=0.3, chunks=3).reply(
        "one two three four", lambda _: times.append(trio.current_time())
    )
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([0.3, 0.3])


def test_pieces_break_on_word_boundaries() -> None:
    text = "Echo: the quick brown fox jumps over the lazy dog"
    pieces = split_text(text, 4)
    assert len(pieces) == 4
    for before, after in itertools.pairwise(pieces):
        assert before[-1] == " " and after[0] != " "


def test_short_text_is_split_inside_words() -> None:
    # Too few words for five pieces: every word boundary is used, then words are halved.
    pieces = split_text("Echo: hi", 5)
    assert "".join(pieces) == "Echo: hi"
    assert len(pieces) == 5
    assert all(pieces)


def test_one_chunk_is_the_whole_text() -> None:
    assert split_text("Echo: hello there", 1) == ["Echo: hello there"]


def test_more_chunks_than_characters() -> None:
    assert split_text("ab", 10) == ["a", "b"]
    assert split_text("", 3) == []


async def test_empty_content(autojump_clock: trio.abc.Clock) -> None:
    pieces: list[str] = []
    assert await EchoAgent().reply("", pieces.append) == "Echo: "
    assert "".join(pieces) == "Echo: "


@pytest.mark.parametrize("kwargs", [{"chunks": 0}, {"chunk_delay": -1.0}])
def test_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EchoAgent(**kwargs)  # type: ignore[arg-type]


@given(st.text(min_size=1), st.integers(min_value=1, max_value=30))
def test_split_properties(text: str, pieces: int) -> None:
    parts = split_text(text, pieces)
    assert "".join(parts) == text
    assert all(parts)
    assert len(parts) == min(pieces, len(text))
