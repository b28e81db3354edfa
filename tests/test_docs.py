"""The docs agree with the code: every example frame in docs/protocol.md is one the relay
accepts (a request) or could send (a reply or push), and its field tables name every field.

Each line of a ```json block in docs/protocol.md is one frame. A block that deliberately
shows bad input is marked by the line ``<!-- bad-input -->`` right before it; its requests
must be refused by `decode`.

That every `RelayConfig` field has its row in docs/operations.md is checked by
`tests/test_settings.py` (each field is a setting, and every setting has its row).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple, get_args

import attrs
import pytest

from trio_relay import RelayStatistics
from trio_relay._wire.frames import _REQUEST_TYPES
from trio_relay._wire.protocol import (
    _WIRE_NAMES,
    ProtocolError,
    Reply,
    decode,
    encode,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROTOCOL = DOCS / "protocol.md"
BAD_INPUT = "<!-- bad-input -->"

REQUEST_TYPES = set(_REQUEST_TYPES)
REPLY_CLASSES: dict[str, type[Any]] = {cls.type: cls for cls in get_args(Reply)}
PYTHON_NAMES = {wire: name for name, wire in _WIRE_NAMES.items()}


class Example(NamedTuple):
    line: int  # in docs/protocol.md
    text: str
    bad_input: bool


def _examples() -> list[Example]:
    examples: list[Example] = []
    in_block = bad_input = False
    previous = ""  # the last non-blank line outside a block
    for number, line in enumerate(PROTOCOL.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not in_block:
            if stripped == "```json":
                in_block, bad_input = True, previous == BAD_INPUT
            elif stripped:
                previous = stripped
        elif stripped == "```":
            in_block = False
        elif stripped:
            examples.append(Example(number, stripped, bad_input))
    assert not in_block, "docs/protocol.md has an unclosed ```json block"
    return examples


EXAMPLES = _examples()


def _frame(example: Example) -> dict[str, Any]:
    frame = json.loads(example.text)
    assert isinstance(frame, dict), "a frame is a JSON object"
    return frame


def test_the_examples_cover_every_frame_type() -> None:
    types = {_frame(example).get("type") for example in EXAMPLES}
    assert REQUEST_TYPES | set(REPLY_CLASSES) <= types
    assert any(example.bad_input for example in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"line{e.line}")
def test_example_frame(example: Example) -> None:
    frame = _frame(example)
    if frame.get("type") in REQUEST_TYPES:
        if example.bad_input:
            with pytest.raises(ProtocolError):
                decode(example.text)
        else:
            decode(example.text)
        return
    # A reply or a push, as the relay sends it.
    assert "id" in frame and "type" in frame
    assert frame["type"] in REPLY_CLASSES, f"unknown frame type {frame['type']!r}"
    if frame["type"] == "subscribed":
        assert isinstance(frame.get("seq"), int) and isinstance(frame.get("epoch"), str)
    is_push = frame["id"] is None and (
        frame["type"] == "data" or (frame["type"] == "error" and "resource" in frame)
    )
    if is_push:  # a data push, or the error push that ends a failed upstream
        assert isinstance(frame.get("seq"), int)
    # The relay's own model of the frame encodes to exactly this: no field it lacks or would
    # leave out, none missing that it always sends.
    fields = {PYTHON_NAMES.get(key, key): value for key, value in frame.items() if key != "type"}
    reply = REPLY_CLASSES[frame["type"]](**fields)
    assert json.loads(encode(reply)) == frame


def _table_cells() -> set[str]:
    """Every `code span` in a table row of docs/protocol.md."""
    cells: set[str] = set()
    for line in PROTOCOL.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            cells.update(re.findall(r"`([^`]+)`", line))
    return cells


# create's fields that travel inside ``message``, by their wire names there.
INSIDE_MESSAGE = {"title": "title", "model_profile_id": "modelProfileId"}


def test_the_field_tables_name_every_field() -> None:
    cells = _table_cells()
    request_fields = {
        _WIRE_NAMES.get(field.name, field.name)
        for cls in _REQUEST_TYPES.values()
        for field in attrs.fields(cls)
        if field.name not in INSIDE_MESSAGE
    }
    reply_fields = {
        _WIRE_NAMES.get(field.name, field.name)
        for cls in REPLY_CLASSES.values()
        for field in attrs.fields(cls)
    }
    assert request_fields | reply_fields | {"type", "message"} <= cells
    text = PROTOCOL.read_text(encoding="utf-8")
    for wire in INSIDE_MESSAGE.values():
        assert f'"{wire}"' in text, wire


def test_the_embedding_doc_lists_every_statistic() -> None:
    text = (DOCS / "embedding.md").read_text(encoding="utf-8")
    for field in attrs.fields(RelayStatistics):
        assert f"| `{field.name}` |" in text, field.name


