"""Testing a host application that embeds the relay: its own backend, served by
``memory_relay``, to web clients, to the Trio client library and to the host itself.

The application under test is defined at the top to keep the example in one file; yours
lives in your package. Its agent answers each message after "thinking" for two seconds, a
word every half second: under ``autojump_clock`` that takes no time at all.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from trio_relay import Backend, BackendError, ChangeHub, Feed, NotFound, Snapshot
from trio_relay.client import Chunk, MessageAdded, Reset, open_relay_client
from trio_relay.testing import MemoryRelay, TestClient, next_update

pytestmark = pytest.mark.trio  # not needed with trio_mode = true, harmless with it

JSON = Any
THINKING = 2.0  # seconds before the agent starts answering
WORD_DELAY = 0.5  # seconds between two words of the answer

# --- the application under test --------------------------------------------------------------


class DeskBackend:
    """The host's `trio_relay.Backend`: one project, one chat, an agent that echoes."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.hub = ChangeHub()
        self._nursery = nursery
        self._ids = itertools.count(1)
        self.chats: list[JSON] = [{"id": "general", "projectId": "desk", "title": "General"}]
        self.messages: dict[str, list[JSON]] = {"general": []}

    async def list_projects(self) -> list[JSON]:
        await trio.lowlevel.checkpoint()
        return [{"id": "desk", "name": "Help desk"}]

    async def get_model_profiles(self) -> Snapshot:
        await trio.lowlevel.checkpoint()
        return Snapshot([{"id": "echo", "name": "Echo"}], self.hub.version("modelProfiles"))

    async def list_chats(self, project_id: str) -> Snapshot:
        await trio.lowlevel.checkpoint()
        if project_id != "desk":
            raise NotFound(f"project {project_id!r} not found")
        return Snapshot(list(self.chats), self.hub.version(("project", project_id)))

    async def get_history(self, chat_id: str) -> Snapshot:
        await trio.lowlevel.checkpoint()
        if chat_id not in self.messages:
            raise NotFound(f"chat {chat_id!r} not found")
        return Snapshot(list(self.messages[chat_id]), self.hub.version(("chat", chat_id)))

    async def send_message(
        self, chat_id: str, message: JSON, *, sender: JSON | None = None
    ) -> None:
        await trio.lowlevel.checkpoint()
        text = message.get("text") if isinstance(message, dict) else message
        if not isinstance(text, str):
            raise BackendError("message must be text")
        if chat_id not in self.messages:
            raise NotFound(f"chat {chat_id!r} not found")
        self._store(chat_id, f"m{next(self._ids)}", "user", text, sender)
        self._nursery.start_soon(self._answer, chat_id, text)

    async def create_chat(
        self, project_id: str, title: str | None, model_profile_id: str | None = None
    ) -> JSON:
        await trio.lowlevel.checkpoint()
        raise BackendError("this desk has one chat")

    async def cancel_reply(self, chat_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        return False

    def watch_project(self, project_id: str) -> Feed:
        return self.hub.open_feed(("project", project_id))

    def watch_chat(self, chat_id: str) -> Feed:
        return self.hub.open_feed(("chat", chat_id))

    def watch_model_profiles(self) -> Feed:
        return self.hub.open_feed("modelProfiles")

    def _store(
        self, chat_id: str, message_id: str, role: str, content: str, sender: JSON = None
    ) -> None:
        message = {"id": message_id, "role": role, "content": content}
        if sender is not None:  # who sent it: a device, or the host (Relay.send)
            message["sender"] = sender
        self.messages[chat_id].append(message)  # change the state, then publish: no await
        self.hub.publish(("chat", chat_id), {"type": "message", "message": message})

    async def _answer(self, chat_id: str, question: str) -> None:
        message_id = f"m{next(self._ids)}"
        await trio.sleep(THINKING)
        words = f"You said: {question}".split()
        for word in words:
            await trio.sleep(WORD_DELAY)
            chunk = {"type": "chunk", "messageId": message_id, "text": word}
            self.hub.publish(("chat", chat_id), chunk)
        self._store(chat_id, message_id, "assistant", " ".join(words))


# --- the fixtures: the plugin's, serving the application's backend ---------------------------


@pytest.fixture
async def relay_backend() -> AsyncIterator[Backend]:
    """Overrides the plugin's ``relay_backend``: ``memory_relay`` now serves the desk."""
    async with trio.open_nursery() as nursery:  # where the agent's answers run
        yield DeskBackend(nursery)
        nursery.cancel_scope.cancel()


# --- the tests -----------------------------------------------------------------------------


async def test_a_web_client_sees_the_answer_stream_in(
    autojump_clock: trio.testing.MockClock, relay_client: TestClient
) -> None:
    await relay_client.subscribe("chat", "general")
    start = trio.current_time()
    await relay_client.send_message("general", "hi there")
    pushes = [await relay_client.next_push() for _ in range(1 + 4 + 1)]
    kinds = [p["data"]["type"] for p in pushes]
    assert kinds == ["message", "chunk", "chunk", "chunk", "chunk", "message"]
    assert pushes[-1]["data"]["message"]["content"] == "You said: hi there"
    # Exactly as long as the agent takes, in mock time; no real time passed.
    assert trio.current_time() - start == THINKING + 4 * WORD_DELAY


async def test_the_host_watches_beside_the_web_clients(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay, relay_client: TestClient
) -> None:
    async with memory_relay.relay.listen("chat", "general") as updates:
        await relay_client.send_message("general", "from the web")
        update = await next_update(updates)
        assert update.data["message"]["content"] == "from the web"
        await memory_relay.relay.send("general", "from the host")  # the host writes too
        update = await next_update(updates)
        assert update.data["message"]["content"] == "from the host"


async def test_a_bot_on_the_client_library_survives_a_dropped_connection(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    connector = memory_relay.connector()  # the client's transport, which the test can cut
    async with open_relay_client(
        memory_relay.url, pin=memory_relay.pin, connect=connector
    ) as client, client.subscribe("chat", "general") as chat:
        await client.send("general", "are you there?")
        await connector.cut()  # the network fails while the agent thinks
        words, answer = [], None
        async for event in chat:  # every event exactly once, across the reconnect
            assert not isinstance(event, Reset)
            if isinstance(event, Chunk):
                words.append(event.text)
            elif isinstance(event, MessageAdded) and event.message["role"] == "assistant":
                answer = event.message["content"]
                break
        assert " ".join(words) == answer == "You said: are you there?"
        assert len(connector.attempts) == 2
