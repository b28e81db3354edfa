"""A host application that embeds trio-relay: its own backend, an in-process listener and a
web client, in one Trio program.

The host keeps one project with one chat in memory and publishes every change through a
`trio_relay.ChangeHub`. Its "agent" answers each message by streaming a few chunks and then
storing the whole answer. The relay serves it on a free loopback port; the host watches the
chat in-process while a web client (trio-websocket) authenticates, subscribes, sends a
message and prints the streamed answer. Then everything shuts down.

Run it from the repository root::

    python examples/embedded_host.py

To see the relay's own log lines as well, call ``loguru.logger.enable("trio_relay")`` first.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

import trio_relay
from trio_relay import BackendError, ChangeHub, Feed, NotFound, Snapshot

JSON = Any
PIN = "246810"
PROJECT_ID = "demo"
CHAT_ID = "general"
QUESTION = "hello relay"
CHUNK_DELAY = 0.05  # seconds between two chunks of the agent's answer


class HostBackend:
    """The host's side of the relay (`trio_relay.Backend`), with its data in memory.

    The consistency rule that makes subscriptions exact: a write changes the state and calls
    ``hub.publish`` with no ``await`` in between, and a read takes its items and
    ``hub.version`` with no ``await`` in between.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.hub = ChangeHub()
        self._nursery = nursery  # the agent's answers run here, owned by the host
        self._ids = itertools.count(1)
        self._projects: list[JSON] = [{"id": PROJECT_ID, "name": "Demo project"}]
        self._chats: dict[str, list[JSON]] = {
            PROJECT_ID: [{"id": CHAT_ID, "projectId": PROJECT_ID, "title": "General"}],
        }
        self._messages: dict[str, list[JSON]] = {
            CHAT_ID: [{"id": "m0", "role": "assistant", "content": "Ask me anything."}],
        }
        self._profiles: list[JSON] = [{"id": "default", "name": "Default agent"}]

    # --- reads: items and version together ----------------------------------------------------

    async def list_projects(self) -> list[JSON]:
        await trio.lowlevel.checkpoint()
        return list(self._projects)

    async def get_model_profiles(self) -> Snapshot:
        await trio.lowlevel.checkpoint()
        return Snapshot(list(self._profiles), self.hub.version("modelProfiles"))

    async def list_chats(self, project_id: str) -> Snapshot:
        await trio.lowlevel.checkpoint()
        if project_id not in self._chats:
            raise NotFound(f"project {project_id!r} not found")
        return Snapshot(list(self._chats[project_id]), self.hub.version(("project", project_id)))

    async def get_history(self, chat_id: str) -> Snapshot:
        await trio.lowlevel.checkpoint()
        if chat_id not in self._messages:
            raise NotFound(f"chat {chat_id!r} not found")
        return Snapshot(list(self._messages[chat_id]), self.hub.version(("chat", chat_id)))

    # --- writes: change, then publish -----------------------------------------------------------

    async def send_message(
        self, chat_id: str, message: JSON, *, sender: JSON | None = None
    ) -> None:
        await trio.lowlevel.checkpoint()
        text = message.get("text") if isinstance(message, dict) else message
        if not isinstance(text, str) or not text:
            raise BackendError("message must be a string or {\"text\": ...}")
        if chat_id not in self._messages:
            raise NotFound(f"chat {chat_id!r} not found")
        self._store(chat_id, f"m{next(self._ids)}", "user", text, sender)
        self._nursery.start_soon(self._answer, chat_id, text)

    async def cancel_reply(self, chat_id: str) -> bool:
        # This host's agent answers at once, so there is never a reply to stop.
        await trio.lowlevel.checkpoint()
        return False

    async def create_chat(
        self, project_id: str, title: str | None, model_profile_id: str | None = None
    ) -> JSON:
        await trio.lowlevel.checkpoint()
        if project_id not in self._chats:
            raise NotFound(f"project {project_id!r} not found")
        chat = {"id": f"chat{next(self._ids)}", "projectId": project_id,
                "title": title or "New chat"}
        self._chats[project_id].append(chat)
        self._messages[chat["id"]] = []
        self.hub.publish(("project", project_id), {"type": "chat_created", "chat": chat})
        return chat

    # --- change feeds ----------------------------------------------------------------------------

    def watch_project(self, project_id: str) -> Feed:
        return self.hub.open_feed(("project", project_id))

    def watch_chat(self, chat_id: str) -> Feed:
        return self.hub.open_feed(("chat", chat_id))

    def watch_model_profiles(self) -> Feed:
        return self.hub.open_feed("modelProfiles")

    # --- the agent -------------------------------------------------------------------------------

    def _store(
        self, chat_id: str, message_id: str, role: str, content: str, sender: JSON = None
    ) -> None:
        message = {"id": message_id, "role": role, "content": content}
        if sender is not None:  # who sent it: {"deviceId", "name"} or {"name"}
            message["sender"] = sender
        self._messages[chat_id].append(message)
        self.hub.publish(("chat", chat_id), {"type": "message", "message": message})

    async def _answer(self, chat_id: str, question: str) -> None:
        """Stream ``You said: <question>`` word by word, then store it as one message."""
        key = ("chat", chat_id)
        message_id = f"m{next(self._ids)}"
        self.hub.publish(key, {"type": "reply_started", "messageId": message_id})
        words = f"You said: {question}".split(" ")
        pieces = [word + " " for word in words[:-1]] + words[-1:]
        for piece in pieces:
            await trio.sleep(CHUNK_DELAY)
            self.hub.publish(key, {"type": "chunk", "messageId": message_id, "text": piece})
        self._store(chat_id, message_id, "assistant", "".join(pieces))


def _is_answer(data: JSON) -> bool:
    return bool(data.get("type") == "message" and data["message"]["role"] == "assistant")


async def host_listener(
    relay: trio_relay.Relay, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Watch the chat from inside the host, beside the web clients, until the answer is in."""
    async with relay.listen("chat", CHAT_ID) as updates:
        print(f"host: watching chat {CHAT_ID!r} from seq {updates.seq},"
              f" {len(updates.snapshot)} message(s) of history")
        task_status.started()
        async for update in updates:
            print(f"host: seq {update.seq} {update.data['type']}")
            if _is_answer(update.data):
                return


async def _send(ws: WebSocketConnection, frame: JSON) -> None:
    await ws.send_message(json.dumps(frame))


async def _receive(ws: WebSocketConnection) -> JSON:
    text = await ws.get_message()
    assert isinstance(text, str), "the relay sends text frames only"
    return json.loads(text)


async def web_client(port: int) -> str:
    """What a browser does: auth, subscribe to the chat, send, read the streamed answer."""
    async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
        assert (await _receive(ws))["type"] == "auth_required"
        await _send(ws, {"id": "auth-1", "type": "auth", "pin": PIN})
        reply = await _receive(ws)
        assert reply["type"] == "auth_success", reply
        print(f"web: authenticated; projects {[p['name'] for p in reply['data']['projects']]}")

        await _send(ws, {"id": "sub-1", "type": "subscribe", "resource": "chat",
                         "resourceId": CHAT_ID})
        reply = await _receive(ws)
        assert reply["type"] == "subscribed", reply
        print(f"web: subscribed to chat {CHAT_ID!r} at seq {reply['seq']},"
              f" {len(reply['data']['messages'])} message(s) of history")

        await _send(ws, {"id": "send-1", "type": "send", "resourceId": CHAT_ID,
                         "message": {"text": QUESTION}})
        answer = ""
        while True:
            frame = await _receive(ws)
            if frame["id"] == "send-1":  # the reply to our send; it may follow the first push
                assert frame["data"] == {"sent": True}, frame
                print("web: message accepted")
                continue
            data = frame["data"]
            print(f"web: seq {frame['seq']} {data['type']}"
                  + (f" {data['text']!r}" if data["type"] == "chunk" else ""))
            if data["type"] == "chunk":
                answer += data["text"]
            if _is_answer(data):
                break
        # Done with the chat: say so. A connection that just ends is taken for a drop, and
        # the relay keeps watching the chat for resume_grace in case the client comes back.
        await _send(ws, {"id": "unsub-1", "type": "unsubscribe", "resource": "chat",
                         "resourceId": CHAT_ID})
        while (await _receive(ws))["id"] != "unsub-1":
            pass
    print(f"web: streamed answer: {answer!r}")
    return answer


async def main() -> None:
    with trio.fail_after(10):  # an example must not hang, whatever happens
        async with trio.open_nursery() as host_nursery:
            backend = HostBackend(host_nursery)
            async with trio_relay.open_relay(backend, pin=PIN) as relay:
                port = await relay.start_serving("127.0.0.1", 0)
                print(f"relay: serving ws://127.0.0.1:{port}/ws")
                async with trio.open_nursery() as nursery:
                    await nursery.start(host_listener, relay)
                    nursery.start_soon(web_client, port)
                # Both have left; the relay frees the connection and the chat's upstream a
                # moment later. It has no event for "idle", so poll its statistics.
                while relay.statistics().connections or relay.statistics().broadcasters:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                print(f"relay: idle again: {relay.statistics()}")
            host_nursery.cancel_scope.cancel()  # stop any agent still answering
    print("done")


if __name__ == "__main__":
    trio.run(main)
