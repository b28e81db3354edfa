"""`MemoryBackend`: a complete backend held in memory, scriptable for tests.

Set up projects, chats and messages in a line or two, emit upstream events on demand, read
back what was sent, inject a failure or a hang into any call, and see which upstream feeds are
open, so a test can prove that cleanup happened.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from .._wire.protocol import JSON, ResourceKey
from .backend import (
    MODEL_PROFILES_KEY,
    BackendError,
    Change,
    NotFound,
    Snapshot,
    chat_key,
    project_key,
)
from .hub import ChangeHub

__all__ = ["HANG", "MemoryBackend"]

#: Put into `MemoryBackend.faults` to make a call hang until cancelled.
HANG: Final = "hang"


class MemoryBackend:
    """A `trio_relay.Backend` in memory. Chats answer nothing by themselves; call `emit`."""

    def __init__(self) -> None:
        self.hub = ChangeHub()
        self.projects: dict[str, dict[str, JSON]] = {}
        self.chats: dict[str, dict[str, JSON]] = {}
        self.messages: dict[str, list[dict[str, JSON]]] = {}
        self.model_profiles: list[JSON] = []
        #: Every accepted send, in order: (chat id, message as the client sent it).
        self.sent: list[tuple[str, JSON]] = []
        #: Chats whose agent reply counts as running: `cancel_reply` stops it (and pushes
        #: ``{"type": "cancelled"}``); a test adds chat ids here to script a reply.
        self.replying: set[str] = set()
        #: Method name (``"get_history"``, ``"watch_chat"``, ...) to an exception it raises,
        #: or `HANG`.
        self.faults: dict[str, BaseException | str] = {}
        #: Feeds open now, by resource, and how many were ever opened and closed.
        self.open_feeds: Counter[ResourceKey] = Counter()
        self.feeds_opened = 0
        self.feeds_closed = 0
        self._ids = itertools.count(1)

    # --- scripting --------------------------------------------------------------------------

    def add_project(self, project_id: str, name: str | None = None) -> dict[str, JSON]:
        project: dict[str, JSON] = {"id": project_id, "name": name or project_id}
        self.projects[project_id] = project
        return project

    def add_chat(
        self, project_id: str, chat_id: str | None = None, title: str = "Chat"
    ) -> dict[str, JSON]:
        """Add a chat (and its project if new); the project's subscribers get a push."""
        if project_id not in self.projects:
            self.add_project(project_id)
        chat_id = chat_id or f"chat-{next(self._ids)}"
        chat: dict[str, JSON] = {"id": chat_id, "projectId": project_id, "title": title}
        self.chats[chat_id] = chat
        self.messages[chat_id] = []
        self.hub.publish(project_key(project_id), {"type": "chat_created", "chat": chat})
        return chat

    def add_message(
        self, chat_id: str, content: str, role: str = "assistant", *, sender: JSON | None = None
    ) -> dict[str, JSON]:
        """Store a message (with its ``sender``, if given); the chat's subscribers get
        ``{"type": "message", ...}``."""
        message: dict[str, JSON] = {
            "id": f"m{next(self._ids)}", "chatId": chat_id, "role": role, "content": content,
        }
        if sender is not None:
            message["sender"] = sender
        self.messages[chat_id].append(message)
        self.hub.publish(chat_key(chat_id), {"type": "message", "message": message})
        return message

    def set_model_profiles(self, profiles: list[JSON]) -> None:
        self.model_profiles = list(profiles)
        self.hub.publish(MODEL_PROFILES_KEY, {"modelProfiles": self.model_profiles})

    def emit(self, resource: str, resource_id: str, data: JSON) -> Change:
        """Publish a raw upstream event that changes no stored state (streamed output)."""
        return self.hub.publish(ResourceKey(resource, resource_id), data)

    def end_feeds(
        self, resource: str, resource_id: str, error: BaseException | None = None
    ) -> None:
        """Complete (or, with ``error``, fail) every open feed of a resource."""
        self.hub.end(ResourceKey(resource, resource_id), error)

    async def _fault(self, method: str) -> None:
        fault = self.faults.get(method)
        if fault == HANG:
            await trio.sleep_forever()
        if isinstance(fault, BaseException):
            raise fault
        await trio.lowlevel.checkpoint()

    # --- the Backend protocol ---------------------------------------------------------------

    async def list_projects(self) -> list[JSON]:
        await self._fault("list_projects")
        return list(self.projects.values())

    async def get_model_profiles(self) -> Snapshot:
        await self._fault("get_model_profiles")
        return Snapshot(list(self.model_profiles), self.hub.version(MODEL_PROFILES_KEY))

    async def list_chats(self, project_id: str) -> Snapshot:
        await self._fault("list_chats")
        if project_id not in self.projects:
            raise NotFound(f"project {project_id!r} not found")
        chats = [c for c in self.chats.values() if c["projectId"] == project_id]
        return Snapshot(chats, self.hub.version(project_key(project_id)))

    async def get_history(self, chat_id: str) -> Snapshot:
        await self._fault("get_history")
        if chat_id not in self.chats:
            raise NotFound(f"chat {chat_id!r} not found")
        version = self.hub.version(chat_key(chat_id))
        return Snapshot(list(self.messages[chat_id]), version)

    async def send_message(
        self, chat_id: str, message: JSON, *, sender: JSON | None = None
    ) -> None:
        await self._fault("send_message")
        if chat_id not in self.chats:
            raise NotFound(f"chat {chat_id!r} not found")
        content = message if isinstance(message, str) else None
        if isinstance(message, dict):
            content = message.get("text") or message.get("content") or message.get("message")
        if not isinstance(content, str):
            raise BackendError("message must be text or an object with a 'text' field")
        self.sent.append((chat_id, message))
        self.add_message(chat_id, content, role="user", sender=sender)

    async def create_chat(
        self, project_id: str, title: str | None, model_profile_id: str | None = None
    ) -> JSON:
        await self._fault("create_chat")
        if project_id not in self.projects:
            raise NotFound(f"project {project_id!r} not found")
        known = {p.get("id") for p in self.model_profiles if isinstance(p, dict)}
        if model_profile_id is not None and model_profile_id not in known:
            raise BackendError(f"unknown model profile {model_profile_id!r}")
        chat = self.add_chat(project_id, title=title or "New chat")
        if model_profile_id is not None:
            chat["modelProfileId"] = model_profile_id
        return chat

    async def cancel_reply(self, chat_id: str) -> bool:
        await self._fault("cancel_reply")
        if chat_id not in self.chats:
            raise NotFound(f"chat {chat_id!r} not found")
        if chat_id not in self.replying:
            return False
        self.replying.discard(chat_id)
        self.hub.publish(chat_key(chat_id), {"type": "cancelled"})
        return True

    def watch_project(self, project_id: str) -> Any:
        return self._feed("watch_project", project_key(project_id))

    def watch_chat(self, chat_id: str) -> Any:
        return self._feed("watch_chat", chat_key(chat_id))

    def watch_model_profiles(self) -> Any:
        return self._feed("watch_model_profiles", MODEL_PROFILES_KEY)

    @asynccontextmanager
    async def _feed(self, method: str, key: ResourceKey) -> AsyncIterator[AsyncIterator[Change]]:
        await self._fault(method)
        async with self.hub.open_feed(key) as feed:
            self.open_feeds[key] += 1
            self.feeds_opened += 1
            try:
                yield feed
            finally:
                self.open_feeds[key] -= 1
                if not self.open_feeds[key]:
                    del self.open_feeds[key]
                self.feeds_closed += 1
