"""The ``cancel`` request (extension): stop the agent's reply running in a chat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio
from _helpers import PIN, OpenStore

from trio_relay._agents.echo import EchoAgent
from trio_relay._store.replies import STOPPED_NOTE
from trio_relay.testing import MemoryBackend, open_memory_relay


async def test_cancel_is_answered_and_pushed(autojump_clock: trio.abc.Clock) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as memory:
        watcher = await memory.connect(authenticate=PIN)
        await watcher.subscribe("chat", "c1")
        client = await memory.connect(authenticate=PIN)
        idle = await client.request("cancel", resourceId="c1")
        assert idle == {"id": idle["id"], "type": "data", "resource": "chat",
                        "resourceId": "c1", "data": {"cancelled": False}}
        backend.replying.add("c1")  # a reply is running
        stopped = await client.request("cancel", resourceId="c1")
        assert stopped["data"] == {"cancelled": True}
        push = await watcher.next_push()
        assert (push["data"], push["seq"]) == ({"type": "cancelled"}, 1)
        # From the host, the same.
        backend.replying.add("c1")
        assert await memory.relay.cancel_reply("c1") is True
        assert (await watcher.next_push())["data"] == {"type": "cancelled"}


async def test_cancel_bad_input(autojump_clock: trio.abc.Clock) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as memory:
        client = await memory.connect(authenticate=PIN)
        missing = await client.request("cancel")
        assert (missing["code"], missing["error"]) == (
            "bad_request", "field 'resourceId' is required"
        )
        unknown = await client.request("cancel", resourceId="nope")
        assert (unknown["code"], unknown["resource"]) == ("not_found", "chat")
        stranger = await memory.connect()
        assert (await stranger.request("cancel", resourceId="c1"))["code"] == (
            "not_authenticated"
        )


@attrs.frozen
class StallingAgent(EchoAgent):
    """Streams one chunk, then never finishes on its own."""

    async def reply(self, content: str, emit: Callable[[str], None]) -> str:
        emit("thinking")
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def _frames_until(client: Any, kind: str) -> list[dict[str, Any]]:
    frames = []
    with trio.fail_after(10):
        while True:
            frame = await client.next_push()
            frames.append(frame)
            if frame["data"].get("type") == kind:
                return frames


async def test_cancel_stops_the_default_backends_reply(open_store: OpenStore) -> None:
    # Real time (the built-in stores work in threads), every wait bounded; on both stores.
    async with open_store(agent=StallingAgent()) as backend:
        async with open_memory_relay(backend, pin=PIN) as memory:
            client = await memory.connect(authenticate=PIN)
            await client.subscribe("chat", "welcome")
            await client.request("send", resourceId="welcome", message="go")
            started = await _frames_until(client, "chunk")
            message_id = started[-1]["data"]["messageId"]
            reply = await client.request("cancel", resourceId="welcome")
            assert reply["data"] == {"cancelled": True}
            cancelled = await _frames_until(client, "cancelled")
            assert cancelled[-1]["data"] == {"type": "cancelled", "messageId": message_id}
            # The reply is stored as far as it got, saying it was stopped, and pushed after
            # the `cancelled` event, under the id its stream had.
            stored = (await client.next_push())["data"]
            assert stored["type"] == "message"
            assert stored["message"]["id"] == message_id
            assert stored["message"]["content"] == f"thinking\n\n{STOPPED_NOTE}"
            history = (await backend.get_history("welcome")).items
            assert [m["role"] for m in history] == ["assistant", "user", "assistant"]
            assert history[-1] == stored["message"]
            assert (await client.request("cancel", resourceId="welcome"))["data"] == {
                "cancelled": False
            }


@attrs.frozen
class SilentThenStallingAgent(EchoAgent):
    """Never streams anything."""

    async def reply(self, content: str, emit: Callable[[str], None]) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_stop_before_the_first_chunk_leaves_a_stopped_note(
    open_store: OpenStore,
) -> None:
    async with open_store(agent=SilentThenStallingAgent()) as backend:
        async with open_memory_relay(backend, pin=PIN) as memory:
            client = await memory.connect(authenticate=PIN)
            await client.subscribe("chat", "welcome")
            await client.request("send", resourceId="welcome", message="go")
            started = await _frames_until(client, "reply_started")
            message_id = started[-1]["data"]["messageId"]
            assert (await client.request("cancel", resourceId="welcome"))["data"] == {
                "cancelled": True}
            await _frames_until(client, "cancelled")
            stored = (await client.next_push())["data"]["message"]
            # Not an empty message: one that says it was stopped.
            assert (stored["id"], stored["role"], stored["content"]) == (
                message_id, "assistant", STOPPED_NOTE)
            assert "sender" not in stored  # agent replies have no sender
