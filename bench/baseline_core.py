"""The protocol of the asyncio baseline (bench/baseline_asyncio.py), with no network I/O.

The frames are copied from docs/protocol.md, field for field, and the baseline does the work
a user's message costs the relay, so that the comparison is fair:

- on connect ``{"id":null,"type":"auth_required"}``; ``auth`` with the right PIN answers
  ``auth_success`` with the projects and model profiles, a wrong one ``auth_failed``;
- ``create`` (resource ``chat``, in project ``demo``) stores an empty chat;
- ``subscribe`` to a chat answers ``subscribed`` with ``seq``, ``epoch`` and the chat's
  messages, read from the database (the snapshot);
- ``send`` stores the message in SQLite (one committed insert), pushes it to every subscriber
  of the chat with the next ``seq`` (``{"id":null,"type":"data","data":{"type":"message",
  "message":{...}},...}``), and answers ``{"sent":true}``; nothing answers the message (the
  relay's ``silent`` agent).

Everything else is refused with an ``error`` (``bad_request``, ``not_authenticated``,
``not_found``). The database is a file like the relay's: WAL journal, ``synchronous=NORMAL``,
a message committed on the event loop as it arrives, the same tables and indexes.
"""

from __future__ import annotations

import json
import resource
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Protocol

__all__ = ["MAX_MESSAGE_SIZE", "OUTBOUND_QUEUE_SIZE", "Core", "Peer", "raise_fd_limit"]

#: Frames a client may have waiting before it counts as slow: the relay's default.
OUTBOUND_QUEUE_SIZE: Final = 1024
#: Largest frame a client may send (the relay's default).
MAX_MESSAGE_SIZE: Final = 64 * 1024

_MESSAGE_FIELDS: Final = ("text", "content", "message")

# The relay's tables for what the baseline stores (trio_relay/_sqlite_backend.py).
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS chats (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL,
        title TEXT NOT NULL,
        model_profile_id TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS chats_by_project ON chats (project_id, created_at)",
    """CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS messages_by_chat ON messages (chat_id, seq)",
)
_MESSAGE_COLUMNS: Final = "id, chat_id AS chatId, role, content, created_at AS createdAt"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Peer(Protocol):
    """One client connection, as the transport gives it to `Core`."""

    authenticated: bool
    chats: set[str]


#: How the transport writes one push to many peers without waiting for any of them.
Broadcast = Callable[[Collection[Any], str], None]


class _Chat:
    def __init__(self, chat: dict[str, Any]) -> None:
        self.chat = chat
        self.seq = 0
        self.epoch = secrets.token_urlsafe(9)
        self.subscribers: set[Peer] = set()


class Core:
    """The state of the baseline server: its database, chats and their subscribers."""

    def __init__(self, pin: str, database: Path, broadcast: Broadcast) -> None:
        self.pin = pin
        self.broadcast = broadcast
        database.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(database, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        for statement in _SCHEMA:
            self.db.execute(statement)
        created = _now()
        self.project = {"id": "demo", "name": "Demo project", "createdAt": created}
        self.profiles = [{"id": "silent", "name": "Silent (benchmark)", "agent": "silent"}]
        self.chats: dict[str, _Chat] = {}
        self._auth_success_data = {"projects": [self.project], "modelProfiles": self.profiles}

    def close(self) -> None:
        self.db.close()

    def hello(self) -> str:
        return '{"id":null,"type":"auth_required"}'

    def forget(self, peer: Peer) -> None:
        """The connection is gone: drop its subscriptions."""
        for chat_id in peer.chats:
            chat = self.chats.get(chat_id)
            if chat is not None:
                chat.subscribers.discard(peer)
        peer.chats.clear()

    def receive(self, peer: Peer, text: str) -> str:
        """Handle one text frame from ``peer``: its reply (pushes go out via `broadcast`)."""
        try:
            request = json.loads(text)
        except ValueError:
            return self._error(None, "frame is not valid JSON", "bad_request")
        if not isinstance(request, dict) or not isinstance(request.get("id"), (str, int)):
            return self._error(None, "frame has no valid id", "bad_request")
        rid = request["id"]
        kind = request.get("type")
        if kind == "auth":
            if request.get("pin") == self.pin:
                peer.authenticated = True
                return dumps({"id": rid, "type": "auth_success", "data": self._auth_success_data})
            return dumps({"id": rid, "type": "auth_failed", "error": "Invalid PIN",
                          "code": "auth_failed"})
        if kind not in ("subscribe", "send", "create"):
            return self._error(rid, f"unknown type {kind!r}", "bad_request")
        if not peer.authenticated:
            return self._error(rid, "Not authenticated", "not_authenticated")
        if kind == "create":
            return self._create(rid, request)
        chat_id = request.get("resourceId")
        if not isinstance(chat_id, str):
            return self._error(rid, "field 'resourceId' must be a string", "bad_request")
        chat = self.chats.get(chat_id)
        if chat is None:
            return self._error(rid, f"chat {chat_id!r} not found", "not_found", chat_id)
        if kind == "subscribe":
            if request.get("resource") != "chat":
                return self._error(rid, "only chats can be subscribed here", "bad_request")
            messages = [dict(row) for row in self.db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? ORDER BY seq",
                (chat_id,),
            )]
            chat.subscribers.add(peer)
            peer.chats.add(chat_id)
            return dumps({"id": rid, "type": "subscribed", "resource": "chat", "seq": chat.seq,
                          "resourceId": chat_id, "data": {"messages": messages},
                          "epoch": chat.epoch})
        return self._send(rid, chat, request.get("message"))

    def _create(self, rid: str | int, request: dict[str, Any]) -> str:
        if request.get("resource") != "chat" or request.get("resourceId") != "demo":
            return self._error(rid, "only chats in project 'demo' can be created", "bad_request")
        message = request.get("message")
        fields = message if isinstance(message, dict) else {}
        profile = fields.get("modelProfileId") or "silent"
        if profile != "silent":
            return self._error(rid, f"unknown model profile {profile!r}", "backend_error",
                               "demo")
        chat_id = uuid.uuid4().hex
        chat = {"id": chat_id, "projectId": "demo", "title": fields.get("title") or "New chat",
                "modelProfileId": profile, "createdAt": _now()}
        with self.db:
            self.db.execute(
                "INSERT INTO chats (id, project_id, title, model_profile_id, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (chat_id, "demo", chat["title"], profile, chat["createdAt"]),
            )
        self.chats[chat_id] = _Chat(chat)
        return dumps({"id": rid, "type": "data", "data": {"chat": chat}, "resource": "chat",
                      "resourceId": chat_id})

    def _send(self, rid: str | int, chat: _Chat, message: Any) -> str:
        content = message if isinstance(message, str) and message else None
        if isinstance(message, dict):
            content = next((message[f] for f in _MESSAGE_FIELDS
                            if isinstance(message.get(f), str) and message[f]), None)
        chat_id = chat.chat["id"]
        if content is None:
            return self._error(rid, "message must be a non-empty string", "backend_error",
                               chat_id)
        stored = {"id": uuid.uuid4().hex, "chatId": chat_id, "role": "user",
                  "content": content, "createdAt": _now()}
        # Stored (committed) before anyone sees it, as the relay does.
        self.db.execute("BEGIN")
        self.db.execute(
            "INSERT INTO messages (id, chat_id, role, content, created_at) VALUES (?, ?, ?, ?, ?)",
            (stored["id"], chat_id, "user", content, stored["createdAt"]),
        )
        self.db.execute("COMMIT")
        chat.seq += 1
        # Encoded once; the transport writes the same text to every subscriber.
        push = dumps({"id": None, "type": "data", "data": {"type": "message", "message": stored},
                      "resource": "chat", "resourceId": chat_id, "seq": chat.seq})
        if chat.subscribers:
            self.broadcast(chat.subscribers, push)
        return dumps({"id": rid, "type": "data", "data": {"sent": True}, "resource": "chat",
                      "resourceId": chat_id})

    def _error(self, rid: str | int | None, error: str, code: str,
               chat_id: str | None = None) -> str:
        frame: dict[str, Any] = {"id": rid, "type": "error", "error": error, "code": code}
        if chat_id is not None:
            frame.update(resource="chat", resourceId=chat_id)
        return dumps(frame)


def raise_fd_limit() -> None:
    """The baseline holds thousands of connections: lift the soft limit to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
