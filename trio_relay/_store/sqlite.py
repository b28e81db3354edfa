"""`SqliteBackend`: a complete `Backend` on the standard library's sqlite3.

It is the relay's default backend and its reference: projects, chats, messages and model
profiles live in ``<data_dir>/trio-relay.sqlite3`` (``sqlite_schema``; the SQL itself is in
``sqlite_sql``) and every change is published through a `ChangeHub`, so subscriptions are
exact. Agents answer through the shared reply runner (``replies``), to which this backend is
the `ChatStore`.

The consistency rule: a write and its ``hub.publish`` happen under ``self._lock``, with no
``await`` between the write returning and the publish, and a snapshot reads ``hub.version``
and its rows under the same lock. A snapshot therefore holds exactly the writes of the changes
up to its version. Streamed agent output (``reply_started``, ``chunk``, ``error``) changes no
rows, so it is published without the lock (the agent's ``emit`` is synchronous); a snapshot
takes its version before it reads its rows, so such an event published during the read gets a
later version and still reaches the subscriber.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import attrs
import outcome
import trio
from loguru import logger

from .._agents.agent import Agent, HistoryItem
from .._agents.echo import EchoAgent
from .._errors import raise_single
from .._wire.protocol import JSON, ResourceKey
from . import rules
from . import sqlite_sql as sql
from .backend import (
    MODEL_PROFILES_KEY,
    BackendError,
    Snapshot,
    chat_key,
    project_key,
)
from .group_commit import GroupCommit, PendingWrite
from .hub import ChangeHub, HubFeeds
from .replies import Replies, ReplyJob, open_replies
from .sqlite_schema import connect

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DATABASE_NAME",
    "SqliteBackend",
    "open_sqlite_backend",
]

DATABASE_NAME: Final = "trio-relay.sqlite3"
#: Messages stored between two checkpoints of the write-ahead log (SQLite's own default
#: is 1000 pages, about 4 MiB; a message is usually far smaller than a page).
CHECKPOINT_EVERY: Final = 1000


_T = TypeVar("_T")


# --- the backend -------------------------------------------------------------------------------


class SqliteBackend(HubFeeds):
    """The `Backend` over one sqlite file. Get one from `open_sqlite_backend`.

    Besides the protocol's methods it offers the host's side: `rename_chat`, `delete_chat`
    and `set_model_profiles`, each pushed to the relevant feed.

    A chat is answered by the agent of its model profile: ``agents[profile id]`` when
    `set_model_profiles` was given one for it, else ``agent``, the echo agent (paced
    differently for the seeded ``echo-fast`` and ``echo-slow``).
    """

    #: The runner of this backend's replies, set by `open_sqlite_backend`.
    _replies: Replies

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        limiter: trio.CapacityLimiter,
        nursery: trio.Nursery,
        agent: EchoAgent,
        path: Path,
    ) -> None:
        self.hub = ChangeHub()
        self.agent = agent
        self.agents: dict[str, Agent] = {}
        self.path = path
        self._conn = conn
        self._limiter = limiter
        self._nursery = nursery
        self._lock = trio.Lock()
        self._closed = False
        # Every client's auth reads the projects and the model profiles: they are kept in
        # memory, since only this backend writes them (the database is one relay's own).
        # Projects are only ever seeded; the profiles' cache is dropped when they change.
        self._projects: list[JSON] | None = None
        self._profiles: Snapshot | None = None
        # Messages are stored in batches (`_write_batched`).
        self._batches = GroupCommit[sqlite3.Connection](
            self._lock, self._store, lambda: self._closed, committed=self._stored
        )
        self._uncheckpointed = 0  # messages stored since the last checkpoint
        self._checkpointing = False

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise BackendError("backend is closed")
        return await trio.to_thread.run_sync(
            sql.patiently, fn, self._conn, limiter=self._limiter
        )

    async def _snapshot(
        self, key: ResourceKey, read: Callable[[sqlite3.Connection], list[JSON]]
    ) -> Snapshot:
        async with self._lock:
            # Writes wait for the lock, so the version taken first still matches the rows.
            version = self.hub.version(key)
            items = await self._run(read)
        return Snapshot(items, version)

    # --- reads ---

    async def list_projects(self) -> list[JSON]:
        if self._projects is None:
            self._projects = await self._run(sql.select_projects)
        else:
            await trio.lowlevel.checkpoint()
        return [dict(project) for project in self._projects]  # rows of strings

    async def get_model_profiles(self) -> Snapshot:
        cached = self._profiles
        if cached is not None and cached.version == self.hub.version(MODEL_PROFILES_KEY):
            await trio.lowlevel.checkpoint()
        else:
            cached = self._profiles = await self._snapshot(MODEL_PROFILES_KEY, sql.select_profiles)
        return Snapshot([dict(profile) for profile in cached.items], cached.version)

    async def list_chats(self, project_id: str) -> Snapshot:
        return await self._snapshot(project_key(project_id), partial(sql.select_chats, project_id))

    async def get_history(self, chat_id: str) -> Snapshot:
        return await self._snapshot(chat_key(chat_id), partial(sql.select_history, chat_id))

    # --- writes ---

    async def send_message(
        self, chat_id: str, message: JSON, *, sender: JSON | None = None,
        nonce: str | None = None,
    ) -> None:
        """Store a user message, with ``sender`` (any JSON, stored as it is), and queue the
        chat's agent to answer it.

        ``nonce`` (the client's ``clientNonce``) makes a retried send safe: a message with the
        same nonce already stored in the chat is neither stored nor answered again."""
        content = rules.message_text(message)
        nonce = rules.checked_nonce(nonce)
        try:
            sender_text = None if sender is None else json.dumps(sender, ensure_ascii=False)
        except (TypeError, ValueError):
            raise BackendError("sender must be JSON") from None

        def stored(result: tuple[sql.Row, sql.Row, bool]) -> None:
            message, chat, new = result
            if not new:
                return  # a retry: its first send was pushed and answered
            self.hub.publish(chat_key(chat_id), {"type": "message", "message": message})
            # Queued under the lock, so replies run in the order the messages were stored.
            self._replies.queue(ReplyJob(chat_id, content, chat["modelProfileId"], message["id"]))

        await self._write_batched(
            partial(
                sql.insert_message, chat_id, sql.new_id(), "user", content,
                sender=sender_text, nonce=nonce,
            ),
            stored,
        )
        logger.bind(resource=str(chat_key(chat_id))).debug("message of {} characters", len(content))

    async def _write_batched(
        self, write: Callable[[sqlite3.Connection], _T], then: Callable[[_T], None]
    ) -> _T:
        """Store a message, with the others sent meanwhile: one transaction and one commit for
        all of them (group commit). ``then`` runs once the batch is committed, under the lock
        and in the order the writes were made (it publishes the change).

        These small inserts run on the event loop, not in the worker thread, whose round trip
        costs several times the insert: in WAL mode with ``synchronous=NORMAL`` a commit only
        appends to the log in the page cache, and the log is checkpointed (the part that
        syncs to disk) in the worker thread (`_checkpoint`). The first writer commits for
        everyone waiting; like a write of its own, it is not undone by cancelling the caller.
        """
        return await self._batches.write(write, then)

    def _stored(self, count: int) -> None:
        self._uncheckpointed += count
        if self._uncheckpointed >= CHECKPOINT_EVERY and not self._checkpointing:
            self._checkpointing = True
            self._nursery.start_soon(self._checkpoint)

    async def _store(
        self, batch: list[PendingWrite[sqlite3.Connection]]
    ) -> list[outcome.Outcome[object]]:
        writes = [pending.write for pending in batch]
        try:
            try:
                async with self._limiter:  # no worker thread is using the connection
                    return sql.run_batch(writes, self._conn)
            except sql.Busy:
                # Another connection to the file (a backup, an operator's shell) holds its
                # write lock: wait for it in the worker thread, never on the event loop.
                return await self._run(partial(sql.run_batch, writes))
        except Exception as exc:
            logger.opt(exception=exc).error("could not store {} messages", len(batch))
            error = BackendError(f"the message could not be stored: {exc}")
            return [outcome.Error(error) for _ in batch]

    async def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database file, in the worker thread: the part of
        storing that waits for the disk (automatic checkpoints are off, see `_connect`). A
        failure is logged, not raised: the log keeps growing until a checkpoint succeeds."""
        try:
            self._uncheckpointed = 0
            if not self._closed:
                await self._run(sql.wal_checkpoint)
        except Exception as exc:
            logger.opt(exception=exc).error("checkpoint of the write-ahead log failed")
        finally:
            self._checkpointing = False

    async def create_chat(
        self,
        project_id: str,
        title: str | None = None,
        model_profile_id: str | None = None,
    ) -> JSON:
        profiles = [p["id"] for p in (await self.get_model_profiles()).items]
        title, model_profile_id = rules.new_chat(title, model_profile_id, profiles)
        write = partial(sql.insert_chat, project_id, title, model_profile_id)
        async with self._lock:
            chat = await self._run(write)
            self.hub.publish(project_key(project_id), {"type": "chat_created", "chat": chat})
        logger.info("created chat {} in project {}", chat["id"], project_id)
        return chat

    async def rename_chat(self, chat_id: str, title: str) -> JSON:
        """Retitle a chat and return it; pushes ``chat_renamed`` to its project's feed."""
        if not isinstance(title, str) or not title.strip():
            raise BackendError("title must be a non-empty string")
        write = partial(sql.update_chat_title, chat_id, title.strip())
        async with self._lock:
            chat = await self._run(write)
            self.hub.publish(
                project_key(chat["projectId"]), {"type": "chat_renamed", "chat": chat}
            )
        return chat

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the reply running in a chat (queued ones still run); push ``cancelled``."""
        await self._run(partial(sql.select_chat, chat_id=chat_id))  # NotFound if unknown
        return self._replies.cancel(chat_id)

    async def delete_chat(self, chat_id: str) -> None:
        """Delete a chat and its messages, and stop its replies; pushes ``chat_deleted``."""
        async with self._lock:
            chat = await self._run(partial(sql.delete_chat, chat_id))
            self.hub.publish(
                project_key(chat["projectId"]), {"type": "chat_deleted", "chatId": chat_id}
            )
            # The chat's own watchers are done: their feeds complete, so subscribers get the
            # final {"completed": true} and a later subscribe finds the chat gone.
            self.hub.end(chat_key(chat_id))
            self._replies.forget(chat_id)
        logger.info("deleted chat {}", chat_id)

    async def set_model_profiles(
        self, profiles: list[JSON], agents: Mapping[str, Agent] | None = None
    ) -> None:
        """Replace all model profiles (each ``{"id", "name", "agent"}``) and push the list.

        ``agents`` maps profile ids to the agent that answers in their chats, replacing the
        ones given before (None: keep them); a profile without one gets the echo agent. A
        reply already running keeps its agent. Raises `ValueError` for a malformed list or an
        agent for no profile: this is the host's call, not a client's.
        """
        checked = rules.checked_profiles(profiles)
        rules.check_agents(checked, agents)
        async with self._lock:
            await self._run(partial(sql.store_profiles, checked))
            self._profiles = None
            if agents is not None:
                self.agents = dict(agents)
            self.hub.publish(MODEL_PROFILES_KEY, {"modelProfiles": checked})
        logger.info("model profiles replaced ({} profiles)", len(checked))

    # --- replies ---

    def agent_for(self, model_profile_id: str) -> Agent:
        """The agent that answers in a chat of the given model profile."""
        return rules.agent_for(model_profile_id, self.agents, self.agent)


@attrs.frozen
class _ChatStore:
    """What the reply runner needs of a `SqliteBackend` (`replies.ChatStore`), kept off the
    backend's own surface."""

    backend: SqliteBackend

    def agent_for(self, model_profile_id: str) -> Agent:
        return self.backend.agent_for(model_profile_id)

    def publish(self, chat_id: str, data: JSON) -> None:
        """Streamed agent output changes no rows: published without the lock."""
        self.backend.hub.publish(chat_key(chat_id), data)

    async def earlier_messages(self, chat_id: str, message_id: str) -> Sequence[HistoryItem]:
        return await self.backend._run(partial(sql.select_earlier, chat_id, message_id))

    async def store_reply(self, job: ReplyJob, message_id: str, content: str) -> None:
        backend = self.backend
        write = partial(sql.insert_message, job.chat_id, message_id, "assistant", content)
        async with backend._lock:
            stored, _, _ = await backend._run(write)
            backend.hub.publish(chat_key(job.chat_id), {"type": "message", "message": stored})

    async def reply_failed(self, job: ReplyJob) -> None:
        """Nothing to close: SQLite keeps no record of a reply's job."""
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_sqlite_backend(
    data_dir: str | os.PathLike[str], *, agent: EchoAgent | None = None
) -> AsyncIterator[SqliteBackend]:
    """Open (creating and seeding if new) the database in ``data_dir`` and run its replies.

    Leaving the context cancels the replies still running and closes the database.
    """
    path = Path(data_dir) / DATABASE_NAME
    limiter = trio.CapacityLimiter(1)
    conn = await trio.to_thread.run_sync(connect, path, limiter=limiter)
    logger.info("sqlite backend opened at {}", path)
    try:
        try:
            async with trio.open_nursery() as nursery:
                backend = SqliteBackend(
                    conn, limiter=limiter, nursery=nursery, agent=agent or EchoAgent(), path=path
                )
                try:
                    store = _ChatStore(backend)
                    async with open_replies(store, store.publish) as replies:
                        backend._replies = replies
                        try:
                            yield backend
                        finally:
                            # Refuse new calls; leaving the block stops the replies: none
                            # outlives the backend.
                            backend._closed = True
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps whatever the caller's block raised; hand it back unwrapped so
            # `async with open_sqlite_backend(...)` raises what its body raised.
            raise_single(group)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close, limiter=limiter)
        logger.info("sqlite backend at {} closed", path)
