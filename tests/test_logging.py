"""What the relay logs: one line per connection event, with context, never a secret."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from loguru import logger

from trio_relay._settings.cli import _log_format
from trio_relay.testing import MemoryBackend, open_memory_relay

PIN = "731904"
SECRET_TEXT = "the launch codes are 0000"


def _rendered(record: Any) -> str:
    """The line as `trio-relay serve` prints it, context included."""
    return _log_format(record).format_map({**record, "exception": ""}) + repr(record["extra"])


async def test_connection_events_are_logged_with_context(
    autojump_clock: trio.abc.Clock, records: list[Any]
) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as memory:
        client = await memory.connect(authenticate=PIN)
        await client.subscribe("chat", "c1")
        await client.request("unsubscribe", resource="chat", resourceId="c1")
        await client.close()
        await trio.testing.wait_all_tasks_blocked()
    info = [r for r in records if r["level"].no >= logger.level("INFO").no and "conn" in r["extra"]]
    messages = [r["message"] for r in info]
    for expected in ("connected", "authenticated", "subscribed to chat:c1",
                     "unsubscribed from chat:c1"):
        assert expected in messages
    assert any(m.startswith("disconnected") for m in messages)
    conn_ids = {r["extra"]["conn"] for r in info}
    assert len(conn_ids) == 1
    assert all(r["extra"]["peer"] for r in info)


async def test_pin_and_message_contents_never_logged(
    autojump_clock: trio.abc.Clock, records: list[Any]
) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as memory:
        wrong = await memory.connect()
        reply = await wrong.request("auth", pin="000000")
        assert reply["type"] == "auth_failed"
        assert PIN not in str(reply)
        client = await memory.connect(authenticate=PIN)
        await client.subscribe("chat", "c1")
        await client.request("send", resourceId="c1", message=SECRET_TEXT)
        await client.next_push()
        # A bad request that carries the PIN and the text must not leak them either.
        await client.send({"id": "x", "type": "auth", "pin": 731904, "message": SECRET_TEXT})
        await client.receive()
    assert records, "nothing was logged"
    for record in records:
        line = _rendered(record)
        assert PIN not in line
        assert "000000" not in line
        if record["level"].no >= logger.level("INFO").no:
            assert SECRET_TEXT not in line
    assert any(r["message"] == "auth failed" for r in records)


async def test_device_tokens_are_never_logged(
    autojump_clock: trio.abc.Clock, records: list[Any]
) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as memory:
        client = await memory.connect()
        reply = await client.authenticate(PIN, device_name="Phone")
        token = reply["data"]["device"]["token"]
        again = await memory.connect()
        await again.authenticate(token=token)
        wrong = await memory.connect()
        assert (await wrong.request("auth", token=token[::-1]))["code"] == "token_invalid"
        memory.relay.revoke_device(reply["data"]["device"]["id"])
        await again.wait_closed()
    lines = [_rendered(record) for record in records]
    assert any("paired device" in line for line in lines)
    for line in lines:
        assert token not in line and token[::-1] not in line and PIN not in line
