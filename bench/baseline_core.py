"""The protocol subset both baseline servers speak, with no I/O (bench/fanout.py).

``baseline_trio.py`` (trio-websocket) and ``baseline_asyncio.py`` (websockets) put this under
their own transport, so that the two differ only there. The frames are copied from
docs/protocol.md, field for field:

- on connect ``{"id":null,"type":"auth_required"}``; ``auth`` with the right PIN answers
  ``auth_success`` with the projects and model profiles, a wrong one ``auth_failed``;
- ``create`` (resource ``chat``, in project ``demo``) makes an empty chat;
- ``subscribe`` to a chat answers ``subscribed`` with ``seq``, ``epoch`` and its messages;
- ``send`` stores the message, pushes it to every subscriber of the chat with the next
  ``seq`` (``{"id":null,"type":"data","data":{"type":"message","message":{...}},...}``), and
  answers ``{"sent":true}``; nothing answers the message (the relay's ``silent`` agent).

Everything else is refused with an ``error`` (``bad_request``, ``not_authenticated``,
``not_found``). The design is the obvious one: each push is encoded to JSON once, then put on
every subscriber's own bounded queue without waiting; a subscriber whose queue is full is a
slow consumer and is closed (1013), as the relay does.
"""

from __future__ import annotations

import json
import resource
import secrets
import uuid
from datetime import datetime, timezone
from typing import Any, Final, Protocol

__all__ = ["OUTBOUND_QUEUE_SIZE", "Core", "Peer", "raise_fd_limit"]

#: Frames queued for one client before it counts as slow: the relay's default.
OUTBOUND_QUEUE_SIZE: Final = 1024
#: Largest frame a client may send (the relay's default).
MAX_MESSAGE_SIZE: Final = 64 * 1024

_MESSAGE_FIELDS: Final = ("text", "content", "message")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Peer(Protocol):
    """One client connection, as the transport gives it to `Core`."""

    authenticated: bool

    def enqueue(self, text: str) -> bool:
        """Queue a frame without waiting; False when the queue is full (a slow consumer)."""
        ...

    def close_slow(self) -> None:
        """Close this connection as a slow consumer (1013)."""
        ...


class _Chat:
    def __init__(self, chat: dict[str, Any]) -> None:
        self.chat = chat
        self.messages: list[dict[str, Any]] = []
        self.seq = 0
        self.epoch = secrets.token_urlsafe(9)
        self.subscribers: set[Peer] = set()


class Core:
    """The state of one baseline server: its chats and their subscribers."""

    def __init__(self, pin: str) -> None:
        self.pin = pin
        created = _now()
        self.project = {"id": "demo", "name": "Demo project", "createdAt": created}
        self.profiles = [{"id": "silent", "name": "Silent (benchmark)", "agent": "silent"}]
        self.chats: dict[str, _Chat] = {}
        self._auth_success_data = {"projects": [self.project], "modelProfiles": self.profiles}

    def hello(self) -> str:
        return '{"id":null,"type":"auth_required"}'

    def forget(self, peer: Peer) -> None:
        """The connection is gone: drop its subscriptions."""
        for chat in self.chats.values():
            chat.subscribers.discard(peer)

    def receive(self, peer: Peer, text: str) -> None:
        """Handle one text frame from ``peer``; replies and pushes go to the queues."""
        try:
            request = json.loads(text)
        except ValueError:
            self._error(peer, None, "frame is not valid JSON", "bad_request")
            return
        if not isinstance(request, dict) or not isinstance(request.get("id"), (str, int)):
            self._error(peer, None, "frame has no valid id", "bad_request")
            return
        rid = request["id"]
        kind = request.get("type")
        if kind == "auth":
            if request.get("pin") == self.pin:
                peer.authenticated = True
                self._reply(peer, {"id": rid, "type": "auth_success",
                                   "data": self._auth_success_data})
            else:
                self._reply(peer, {"id": rid, "type": "auth_failed", "error": "Invalid PIN",
                                   "code": "auth_failed"})
            return
        if kind not in ("subscribe", "send", "create"):
            self._error(peer, rid, f"unknown type {kind!r}", "bad_request")
            return
        if not peer.authenticated:
            self._error(peer, rid, "Not authenticated", "not_authenticated")
            return
        if kind == "create":
            self._create(peer, rid, request)
            return
        chat_id = request.get("resourceId")
        if not isinstance(chat_id, str):
            self._error(peer, rid, "field 'resourceId' must be a string", "bad_request")
            return
        chat = self.chats.get(chat_id)
        if chat is None:
            self._error(peer, rid, f"chat {chat_id!r} not found", "not_found", chat_id)
        elif kind == "subscribe":
            if request.get("resource") != "chat":
                self._error(peer, rid, "only chats can be subscribed here", "bad_request")
                return
            chat.subscribers.add(peer)
            self._reply(peer, {"id": rid, "type": "subscribed", "resource": "chat",
                               "seq": chat.seq, "resourceId": chat_id,
                               "data": {"messages": chat.messages}, "epoch": chat.epoch})
        else:
            self._send(peer, rid, chat, request.get("message"))

    def _create(self, peer: Peer, rid: str | int, request: dict[str, Any]) -> None:
        if request.get("resource") != "chat" or request.get("resourceId") != "demo":
            self._error(peer, rid, "only chats in project 'demo' can be created", "bad_request")
            return
        message = request.get("message")
        fields = message if isinstance(message, dict) else {}
        profile = fields.get("modelProfileId") or "silent"
        if profile != "silent":
            self._error(peer, rid, f"unknown model profile {profile!r}", "backend_error", "demo")
            return
        chat_id = uuid.uuid4().hex
        chat = {"id": chat_id, "projectId": "demo", "title": fields.get("title") or "New chat",
                "modelProfileId": profile, "createdAt": _now()}
        self.chats[chat_id] = _Chat(chat)
        self._reply(peer, {"id": rid, "type": "data", "data": {"chat": chat},
                           "resource": "chat", "resourceId": chat_id})

    def _send(self, peer: Peer, rid: str | int, chat: _Chat, message: Any) -> None:
        content = message if isinstance(message, str) and message else None
        if isinstance(message, dict):
            content = next((message[f] for f in _MESSAGE_FIELDS
                            if isinstance(message.get(f), str) and message[f]), None)
        chat_id = chat.chat["id"]
        if content is None:
            self._error(peer, rid, "message must be a non-empty string", "backend_error",
                        chat_id)
            return
        stored = {"id": uuid.uuid4().hex, "chatId": chat_id, "role": "user",
                  "content": content, "createdAt": _now()}
        chat.messages.append(stored)
        chat.seq += 1
        # Encoded once; every subscriber's queue gets the same string.
        push = dumps({"id": None, "type": "data", "data": {"type": "message", "message": stored},
                      "resource": "chat", "resourceId": chat_id, "seq": chat.seq})
        for subscriber in list(chat.subscribers):
            if not subscriber.enqueue(push):
                chat.subscribers.discard(subscriber)
                subscriber.close_slow()
        self._reply(peer, {"id": rid, "type": "data", "data": {"sent": True},
                           "resource": "chat", "resourceId": chat_id})

    def _reply(self, peer: Peer, frame: dict[str, Any]) -> None:
        if not peer.enqueue(dumps(frame)):
            self.forget(peer)
            peer.close_slow()

    def _error(self, peer: Peer, rid: str | int | None, error: str, code: str,
               chat_id: str | None = None) -> None:
        frame: dict[str, Any] = {"id": rid, "type": "error", "error": error, "code": code}
        if chat_id is not None:
            frame.update(resource="chat", resourceId=chat_id)
        self._reply(peer, frame)


def raise_fd_limit() -> None:
    """Both baselines hold up to 10,000 connections: lift the soft limit to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
