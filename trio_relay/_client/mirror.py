"""The state of what you watch, kept current from a client's subscriptions."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import trio

from .._errors import raise_single
from .client import RelayClient
from .errors import SubscriptionFailed
from .events import (
    JSON,
    AgentError,
    ChatCreated,
    ChatDeleted,
    ChatRenamed,
    Chunk,
    Event,
    Key,
    MessageAdded,
    ModelProfilesChanged,
    ReplyCancelled,
    ReplyStarted,
    Reset,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["SyncedMirror", "open_mirror"]

class SyncedMirror:
    """The state of what you watch, kept current from pushes and resets (events folded in).

    All state is plain dicts and lists of the relay's JSON objects, readable at any time
    (between awaits it never changes):

    - ``projects``: the client's projects (refreshed on every reconnect).
    - ``model_profiles``: the model profiles (live if opened with ``model_profiles=True``).
    - ``chats[project_id]``: chat id → chat, for each watched project, in creation order.
    - ``messages[chat_id]``: the stored messages of each watched chat, oldest first.
    - ``streaming[chat_id]``: message id → the text streamed so far of each reply in
      progress; an entry goes when the reply's stored message (or an error) arrives. After
      a `Reset` during a reply, its text restarts from the next chunk.
    - ``agent_errors[chat_id]``: message id → error text of replies that failed.
    - ``failures``: (resource, id) → the `SubscriptionFailed` that ended a watch.

    ``version`` counts the changes applied; `wait_changed` and `wait_for` wait for more.
    A project's ``chat_deleted`` also stops watching that chat and drops its messages.
    """

    def __init__(self, client: RelayClient, nursery: trio.Nursery) -> None:
        self.client = client
        self.chats: dict[str, dict[str, JSON]] = {}
        self.messages: dict[str, list[JSON]] = {}
        self.streaming: dict[str, dict[str, str]] = {}
        self.agent_errors: dict[str, dict[str, str]] = {}
        self.failures: dict[Key, SubscriptionFailed] = {}
        self.version = 0
        self._model_profiles: list[JSON] | None = None
        self._nursery = nursery
        self._watches: dict[Key, trio.CancelScope] = {}
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def projects(self) -> list[JSON]:
        return self.client.projects

    @property
    def model_profiles(self) -> list[JSON]:
        if self._model_profiles is not None:
            return self._model_profiles
        return self.client.model_profiles

    @property
    def watching(self) -> set[Key]:
        """The (resource, id) pairs watched now."""
        return set(self._watches)

    # --- watching ---------------------------------------------------------------------------

    async def watch_project(self, project_id: str) -> None:
        """Watch a project's chats; returns once ``chats[project_id]`` holds its snapshot."""
        await self._watch(("project", project_id))

    async def watch_chat(self, chat_id: str) -> None:
        """Watch a chat; returns once ``messages[chat_id]`` holds its history."""
        await self._watch(("chat", chat_id))

    async def watch_model_profiles(self) -> None:
        await self._watch(("modelProfiles", ""))

    def unwatch_project(self, project_id: str) -> None:
        """Stop watching; the project's chats are dropped."""
        self._unwatch(("project", project_id))
        self.chats.pop(project_id, None)
        self._changed()

    def unwatch_chat(self, chat_id: str) -> None:
        """Stop watching; the chat's messages are dropped."""
        self._unwatch(("chat", chat_id))
        self._drop_chat(chat_id)
        self._changed()

    async def _watch(self, key: Key) -> None:
        if key in self._watches:
            await trio.lowlevel.checkpoint()
            return
        self.failures.pop(key, None)
        await self._nursery.start(self._follow, key)

    def _unwatch(self, key: Key) -> None:
        scope = self._watches.pop(key, None)
        if scope is not None:
            scope.cancel()

    async def _follow(self, key: Key, *, task_status: trio.TaskStatus[None]) -> None:
        scope = trio.CancelScope()
        with scope:
            self._watches[key] = scope
            try:
                async with self.client.subscribe(*key) as subscription:
                    self._apply_snapshot(key, subscription.snapshot)
                    task_status.started()
                    async for event in subscription:
                        self._apply(key, event)
            except SubscriptionFailed as exc:
                self.failures[key] = exc
                self._changed()
            except trio.ClosedResourceError:
                pass  # the client is closing
            finally:
                if self._watches.get(key) is scope:
                    del self._watches[key]

    # --- folding events in ------------------------------------------------------------------

    def _apply_snapshot(self, key: Key, items: list[JSON]) -> None:
        resource, resource_id = key
        if resource == "project":
            self.chats[resource_id] = {
                chat["id"]: chat for chat in items
                if isinstance(chat, dict) and isinstance(chat.get("id"), str)
            }
        elif resource == "chat":
            self.messages[resource_id] = [m for m in items if isinstance(m, dict)]
            self.streaming[resource_id] = {}
            self.agent_errors.setdefault(resource_id, {})
        else:
            self._model_profiles = list(items)
        self._changed()

    def _apply(self, key: Key, event: Event) -> None:
        resource_id = key[1]
        if isinstance(event, Reset):
            self._apply_snapshot(key, event.snapshot)
            return
        if isinstance(event, MessageAdded):
            self._add_message(resource_id, event.message)
        elif isinstance(event, ReplyStarted):
            self.streaming.setdefault(resource_id, {})[event.message_id] = ""
        elif isinstance(event, Chunk):
            streams = self.streaming.setdefault(resource_id, {})
            streams[event.message_id] = streams.get(event.message_id, "") + event.text
        elif isinstance(event, AgentError):
            if event.message_id is not None:
                self.streaming.get(resource_id, {}).pop(event.message_id, None)
                self.agent_errors.setdefault(resource_id, {})[event.message_id] = event.error
        elif isinstance(event, ReplyCancelled):
            streams = self.streaming.get(resource_id, {})
            if event.message_id is not None:
                streams.pop(event.message_id, None)
            else:  # a backend that does not say which: the chat runs one reply at a time
                streams.clear()
        elif isinstance(event, (ChatCreated, ChatRenamed)):
            chat_id = event.chat.get("id")
            if isinstance(chat_id, str):
                self.chats.setdefault(resource_id, {})[chat_id] = event.chat
        elif isinstance(event, ChatDeleted):
            self.chats.get(resource_id, {}).pop(event.chat_id, None)
            if ("chat", event.chat_id) in self._watches:
                self._unwatch(("chat", event.chat_id))
                self._drop_chat(event.chat_id)
        elif isinstance(event, ModelProfilesChanged):
            self._model_profiles = list(event.profiles)
        self._changed()

    def _add_message(self, chat_id: str, message: JSON) -> None:
        messages = self.messages.setdefault(chat_id, [])
        message_id = message.get("id")
        for index, existing in enumerate(messages):
            if message_id is not None and existing.get("id") == message_id:
                messages[index] = message
                break
        else:
            messages.append(message)
        if isinstance(message_id, str):
            self.streaming.get(chat_id, {}).pop(message_id, None)

    def _drop_chat(self, chat_id: str) -> None:
        self.messages.pop(chat_id, None)
        self.streaming.pop(chat_id, None)
        self.agent_errors.pop(chat_id, None)

    def _changed(self) -> None:
        self.version += 1
        self._lot.unpark_all()

    # --- waiting ----------------------------------------------------------------------------

    async def wait_changed(self, after: int | None = None) -> int:
        """Wait until ``version`` is past ``after`` (default: the current one); return it."""
        after = self.version if after is None else after
        while self.version <= after:
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        return self.version

    async def wait_for(self, predicate: Callable[[SyncedMirror], object]) -> None:
        """Wait until ``predicate(mirror)`` is true (checked now and after every change)."""
        while not predicate(self):
            await self._lot.park()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_mirror(
    client: RelayClient,
    *,
    project_ids: Iterable[str] = (),
    chat_ids: Iterable[str] = (),
    model_profiles: bool = False,
) -> AsyncIterator[SyncedMirror]:
    """A `SyncedMirror` watching the given projects and chats (and the model profiles) for
    the duration of the block; more can be watched with its ``watch_*`` methods.

    Entering returns once every initial snapshot is in. A watch the relay ends with an error
    is recorded in ``failures``; the client's terminal error (`ConnectionLost`, `AuthFailed`)
    ends the block and is raised from it.
    """
    try:
        async with trio.open_nursery() as nursery:
            mirror = SyncedMirror(client, nursery)
            for project_id in project_ids:
                await mirror.watch_project(project_id)
            for chat_id in chat_ids:
                await mirror.watch_chat(chat_id)
            if model_profiles:
                await mirror.watch_model_profiles()
            try:
                yield mirror
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)
