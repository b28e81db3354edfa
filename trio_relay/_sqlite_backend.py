"""`SqliteBackend`: a complete `Backend` on the standard library's sqlite3, with its agents.

It is the relay's default backend and its reference: projects, chats, messages and model
profiles live in ``<data_dir>/trio-relay.sqlite3`` and every change is published through a
`ChangeHub`, so subscriptions are exact.

The consistency rule: a write and its ``hub.publish`` happen under ``self._lock``, with no
``await`` between the write returning and the publish, and a snapshot reads ``hub.version``
and its rows under the same lock. A snapshot therefore holds exactly the writes of the changes
up to its version. Streamed agent output (``reply_started``, ``chunk``, ``error``) changes no
rows, so it is published without the lock (the agent's ``emit`` is synchronous); a snapshot
takes its version before it reads its rows, so such an event published during the read gets a
later version and still reaches the subscriber.
"""

from __future__ import annotations

import contextvars
import json
import os
import sqlite3
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Final, NoReturn, TypeVar, cast

import attrs
import outcome
import trio
from loguru import logger

from ._agents import Agent, AgentError, CommandAgent, SilentAgent
from ._backend import BackendError, Feed, NotFound, Snapshot
from ._echo_agent import EchoAgent
from ._hub import ChangeHub
from ._wire.protocol import JSON, ResourceKey

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DATABASE_NAME",
    "MODEL_PROFILES_KEY",
    "SEED_MODEL_PROFILES",
    "WELCOME_TEXT",
    "SqliteBackend",
    "open_sqlite_backend",
]

DATABASE_NAME: Final = "trio-relay.sqlite3"
DEFAULT_CHAT_TITLE: Final = "New chat"
#: What a stopped reply's stored message says (after the text it got to, if any).
STOPPED_NOTE: Final = "(stopped)"
DEFAULT_MODEL_PROFILE: Final = "echo"
MODEL_PROFILES_KEY: Final = ResourceKey("modelProfiles", "")

# PRAGMA user_version of the schema below. 0 means a fresh file: the only time we seed.
# 2: messages.sender (`_MIGRATIONS`).
_SCHEMA_VERSION: Final = 2

# One statement each: executescript() would commit the transaction they run in.
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS projects (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS chats (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
        title TEXT NOT NULL,
        model_profile_id TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS chats_by_project ON chats (project_id, created_at)",
    # seq: timestamps can tie or step back with the wall clock; insertion order cannot.
    """CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        created_at TEXT NOT NULL,
        sender TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS messages_by_chat ON messages (chat_id, seq)",
    # position: profiles are listed in the order the host gave them.
    """CREATE TABLE IF NOT EXISTS model_profiles (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        agent TEXT NOT NULL,
        position INTEGER NOT NULL
    )""",
)

# What takes a database of the version before each to that version, one statement each.
# messages.sender: who sent a user message, as JSON; NULL for agent replies and for messages
# stored before senders existed (they are shown as before).
_MIGRATIONS: Final = {
    2: ("ALTER TABLE messages ADD COLUMN sender TEXT",),
}

# Column aliases give the wire's camelCase names, so a row converts to its JSON form as is.
_PROJECT_COLUMNS: Final = "id, name, created_at AS createdAt"
_CHAT_COLUMNS: Final = (
    "id, project_id AS projectId, title, model_profile_id AS modelProfileId,"
    " created_at AS createdAt"
)
_MESSAGE_COLUMNS: Final = (
    "id, chat_id AS chatId, role, content, created_at AS createdAt, sender"
)
#: Messages stored between two checkpoints of the write-ahead log (SQLite's own default
#: is 1000 pages, about 4 MiB; a message is usually far smaller than a page).
CHECKPOINT_EVERY: Final = 1000
_PROFILE_COLUMNS: Final = "id, name, agent"

WELCOME_TEXT: Final = (
    "Welcome to trio-relay! This demo chat talks to the echo agent: type something and "
    "it will be streamed back to you."
)
SEED_MODEL_PROFILES: Final = (
    {"id": "echo", "name": "Echo", "agent": "echo"},
    {"id": "echo-fast", "name": "Echo (fast)", "agent": "echo"},
    {"id": "echo-slow", "name": "Echo (slow)", "agent": "echo"},
)
# The seeded profiles that pace the echo agent differently from the backend's own agent.
_PROFILE_CHUNK_DELAYS: Final = {"echo-fast": 0.01, "echo-slow": 0.3}

_MESSAGE_FIELDS: Final = ("text", "content", "message")

_T = TypeVar("_T")
_Row = dict[str, JSON]


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> str:
    # Milliseconds and "Z": the ISO-8601 form every JavaScript Date parses.
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _chat_key(chat_id: str) -> ResourceKey:
    return ResourceKey("chat", chat_id)


def _project_key(project_id: str) -> ResourceKey:
    return ResourceKey("project", project_id)


# --- sqlite: these run in the worker thread, never on the event loop ---------------------------


#: Set while `_run_batch` runs: each write's `_transaction` is then a savepoint of the batch.
_IN_BATCH: Final = contextvars.ContextVar("_IN_BATCH", default=False)
#: How long a write waits for another connection's lock, in the worker thread only: on the
#: event loop it does not wait at all (`_run_batch` raises `_Busy`; the batch moves to the
#: worker thread). SQLite's own default in Python is 5 s.
_BUSY_TIMEOUT_MS: Final = 5000


class _Busy(Exception):
    """Another connection to the database file holds its write lock."""


@contextmanager
def _transaction(conn: sqlite3.Connection, *, write: bool = True) -> Iterator[None]:
    # The connection is in autocommit mode, so transactions are explicit and none is left open
    # between calls. A write takes sqlite's write lock up front (IMMEDIATE) rather than
    # upgrading halfway, which could fail if another process writes to the file too. Inside a
    # batch (`_run_batch`) it is a savepoint: one write failing undoes only itself.
    if _IN_BATCH.get():
        conn.execute("SAVEPOINT batched")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO batched")
            conn.execute("RELEASE batched")
            raise
        conn.execute("RELEASE batched")
        return
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        conn.commit()
    except BaseException:
        if conn.in_transaction:  # also when the commit itself failed
            conn.rollback()
        raise


def _wal_checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _patiently(fn: Callable[[sqlite3.Connection], _T], conn: sqlite3.Connection) -> _T:
    """Run ``fn`` (in the worker thread) waiting up to `_BUSY_TIMEOUT_MS` for locks."""
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    try:
        return fn(conn)
    finally:
        conn.execute("PRAGMA busy_timeout=0")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return bool(code & 0xFF == 5)  # SQLITE_BUSY, and its extended codes
    return "locked" in str(exc) or "busy" in str(exc)


def _run_batch(
    writes: list[Callable[[sqlite3.Connection], object]], conn: sqlite3.Connection
) -> list[outcome.Outcome[object]]:
    """Run several writes in one transaction, with one commit; each one's result or error is
    its own (a savepoint each). Raises `_Busy` if the write lock cannot be had at once, and
    fails whole if SQLite rolls the transaction back by itself (a full disk, an I/O error) or
    the commit fails: then none of the writes was stored."""
    token = _IN_BATCH.set(True)
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise _Busy(str(exc)) from exc
            raise
        try:
            results: list[outcome.Outcome[object]] = []
            for write in writes:
                result = outcome.capture(write, conn)
                results.append(result)
                if not conn.in_transaction:
                    cause = result.error if isinstance(result, outcome.Error) else None
                    raise BackendError("SQLite rolled the transaction back") from cause
            conn.commit()
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        return results
    finally:
        _IN_BATCH.reset(token)


def _row(row: sqlite3.Row | None) -> _Row | None:
    return None if row is None else dict(row)


def _rows(rows: list[sqlite3.Row]) -> list[JSON]:
    return [dict(row) for row in rows]


def _message(row: sqlite3.Row) -> _Row:
    """A message row as clients see it: ``sender`` parsed, and left out when there is none
    (agent replies, and messages stored before senders were)."""
    message = dict(row)
    sender = message.pop("sender", None)
    if sender is not None:
        try:
            message["sender"] = json.loads(sender)
        except ValueError:  # written by hand: show the message without it
            pass
    return message


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: trio picks any worker thread; the limiter of 1 serializes use.
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL still never corrupts the database, and a commit survives the
        # relay crashing; only a power loss or an OS crash can lose the last commits. It
        # spares every commit an fsync (docs/operations.md, "Data directory").
        conn.execute("PRAGMA synchronous=NORMAL")
        # No checkpoint inside a commit: message inserts commit on the event loop, and the
        # backend checkpoints in the worker thread instead (`SqliteBackend._checkpoint`).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA foreign_keys=ON")
        with _transaction(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise BackendError(
                    f"{path} has schema version {version}; this trio-relay knows up to"
                    f" {_SCHEMA_VERSION}"
                )
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                _seed(conn)
            else:
                for step in range(version + 1, _SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[step]:
                        conn.execute(statement)
                for statement in _SCHEMA:  # indexes a database made by hand may lack
                    conn.execute(statement)
            if version != _SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("PRAGMA busy_timeout=0")  # from now on, see _BUSY_TIMEOUT_MS
    except BaseException:
        conn.close()
        raise
    return conn


def _seed(conn: sqlite3.Connection) -> None:
    now = _now()
    conn.execute(
        "INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)",
        ("demo", "Demo project", now),
    )
    conn.execute(
        "INSERT INTO chats (id, project_id, title, model_profile_id, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        ("welcome", "demo", "Welcome", DEFAULT_MODEL_PROFILE, now),
    )
    conn.execute(
        "INSERT INTO messages (id, chat_id, role, content, created_at) VALUES (?, ?, ?, ?, ?)",
        (_new_id(), "welcome", "assistant", WELCOME_TEXT, now),
    )
    _replace_profiles(conn, list(SEED_MODEL_PROFILES))


def _replace_profiles(conn: sqlite3.Connection, profiles: list[_Row]) -> None:
    conn.execute("DELETE FROM model_profiles")
    conn.executemany(
        "INSERT INTO model_profiles (id, name, agent, position) VALUES (?, ?, ?, ?)",
        [(p["id"], p["name"], p["agent"], i) for i, p in enumerate(profiles)],
    )


def _select_projects(conn: sqlite3.Connection) -> list[JSON]:
    return _rows(
        conn.execute(
            f"SELECT {_PROJECT_COLUMNS} FROM projects ORDER BY created_at, rowid"
        ).fetchall()
    )


def _select_profiles(conn: sqlite3.Connection) -> list[JSON]:
    return _rows(
        conn.execute(f"SELECT {_PROFILE_COLUMNS} FROM model_profiles ORDER BY position").fetchall()
    )


def _select_chat(conn: sqlite3.Connection, chat_id: str) -> _Row:
    chat = _row(
        conn.execute(f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = ?", (chat_id,)).fetchone()
    )
    if chat is None:
        raise NotFound(f"chat {chat_id!r} not found")
    return chat


def _check_project(conn: sqlite3.Connection, project_id: str) -> None:
    if conn.execute("SELECT 1 FROM projects WHERE id = ?", (project_id,)).fetchone() is None:
        raise NotFound(f"project {project_id!r} not found")


def _select_chats(project_id: str, conn: sqlite3.Connection) -> list[JSON]:
    with _transaction(conn, write=False):  # the project check and the list agree
        _check_project(conn, project_id)
        rows = conn.execute(
            f"SELECT {_CHAT_COLUMNS} FROM chats WHERE project_id = ? ORDER BY created_at, rowid",
            (project_id,),
        ).fetchall()
    return _rows(rows)


def _select_earlier(
    chat_id: str, message_id: str, conn: sqlite3.Connection
) -> list[dict[str, str]]:
    """The role and content of a chat's messages as its reply to ``message_id`` starts, in
    the order they were stored: all but ``message_id`` and the user messages after it, which
    wait for their turn. (The replies to messages sent while an earlier reply ran were stored
    after them, so they come after them.)"""
    rows = conn.execute(
        "SELECT role, content FROM messages WHERE chat_id = ? AND"
        " (seq < (SELECT seq FROM messages WHERE id = ?) OR role = 'assistant') ORDER BY seq",
        (chat_id, message_id),
    ).fetchall()
    return [{"role": row["role"], "content": row["content"]} for row in rows]


def _select_history(chat_id: str, conn: sqlite3.Connection) -> list[JSON]:
    with _transaction(conn, write=False):
        _select_chat(conn, chat_id)
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? ORDER BY seq",
            (chat_id,),
        ).fetchall()
    return [_message(row) for row in rows]


def _insert_message(
    chat_id: str, message_id: str, role: str, content: str, conn: sqlite3.Connection,
    sender: str | None = None,
) -> tuple[_Row, _Row]:
    """Store a message (``sender`` as JSON text); return it and its chat. `NotFound` if the
    chat is gone."""
    with _transaction(conn):
        chat = _select_chat(conn, chat_id)
        conn.execute(
            "INSERT INTO messages (id, chat_id, role, content, created_at, sender)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, chat_id, role, content, _now(), sender),
        )
        row = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
    assert row is not None
    return _message(row), chat


def _insert_chat(
    project_id: str, title: str, model_profile_id: str, conn: sqlite3.Connection
) -> _Row:
    chat_id = _new_id()
    with _transaction(conn):
        _check_project(conn, project_id)
        conn.execute(
            "INSERT INTO chats (id, project_id, title, model_profile_id, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (chat_id, project_id, title, model_profile_id, _now()),
        )
        return _select_chat(conn, chat_id)


def _update_chat_title(chat_id: str, title: str, conn: sqlite3.Connection) -> _Row:
    with _transaction(conn):
        conn.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))
        return _select_chat(conn, chat_id)


def _delete_chat(chat_id: str, conn: sqlite3.Connection) -> _Row:
    with _transaction(conn):
        chat = _select_chat(conn, chat_id)
        conn.execute("DELETE FROM messages WHERE chat_id = ?", (chat_id,))
        conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
    return chat


def _store_profiles(profiles: list[_Row], conn: sqlite3.Connection) -> None:
    with _transaction(conn):
        _replace_profiles(conn, profiles)


# --- validation --------------------------------------------------------------------------------


def _message_text(message: JSON) -> str:
    """The text of a client's ``message``: a string, or an object's text/content/message."""
    if isinstance(message, str) and message:
        return message
    if isinstance(message, dict):
        for field in _MESSAGE_FIELDS:
            value = message.get(field)
            if isinstance(value, str) and value:
                return value
    raise BackendError(
        "message must be a non-empty string or an object with a non-empty string"
        " under 'text', 'content' or 'message'"
    )


def _checked_profiles(profiles: list[JSON]) -> list[_Row]:
    checked: list[_Row] = []
    seen: set[str] = set()
    for i, profile in enumerate(profiles):
        if not isinstance(profile, dict):
            raise ValueError(f"model profile {i} must be a dict")
        for field in ("id", "name", "agent"):
            if not isinstance(profile.get(field), str) or not profile[field]:
                raise ValueError(f"model profile {i} needs a non-empty string {field!r}")
        if profile["id"] in seen:
            raise ValueError(f"model profile id {profile['id']!r} appears twice")
        seen.add(profile["id"])
        checked.append({"id": profile["id"], "name": profile["name"], "agent": profile["agent"]})
    return checked


# --- the backend -------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Job:
    content: str
    model_profile_id: str
    #: The id of the user's message being answered: earlier ones are its history.
    message_id: str


@attrs.define(eq=False)
class _BatchedWrite:
    """A write waiting for its batch (`SqliteBackend._write_batched`)."""

    write: Callable[[sqlite3.Connection], object]
    then: Callable[[object], None]
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome[object] | None = None


@attrs.define(eq=False)
class _ChatQueue:
    """The replies waiting in one chat; it exists only while a reply is running or queued."""

    jobs: deque[_Job] = attrs.Factory(deque)
    running: trio.CancelScope | None = None
    #: The id of the reply being written, for the ``cancelled`` event, and its text so far.
    message_id: str | None = None
    text: list[str] = attrs.Factory(list)


class SqliteBackend:
    """The `Backend` over one sqlite file. Get one from `open_sqlite_backend`.

    Besides the protocol's methods it offers the host's side: `rename_chat`, `delete_chat`
    and `set_model_profiles`, each pushed to the relevant feed.

    A chat is answered by the agent of its model profile: ``agents[profile id]`` when
    `set_model_profiles` was given one for it, else ``agent``, the echo agent (paced
    differently for the seeded ``echo-fast`` and ``echo-slow``).
    """

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
        self._queues: dict[str, _ChatQueue] = {}
        self._closed = False
        # Every client's auth reads the projects and the model profiles: they are kept in
        # memory, since only this backend writes them (the database is one relay's own).
        # Projects are only ever seeded; the profiles' cache is dropped when they change.
        self._projects: list[JSON] | None = None
        self._profiles: Snapshot | None = None
        # Messages waiting to be stored by the next batch (`_write_batched`).
        self._batch: list[_BatchedWrite] = []
        self._batching = False
        self._uncheckpointed = 0  # messages stored since the last checkpoint
        self._checkpointing = False

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise BackendError("backend is closed")
        return await trio.to_thread.run_sync(
            _patiently, fn, self._conn, limiter=self._limiter
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
            self._projects = await self._run(_select_projects)
        else:
            await trio.lowlevel.checkpoint()
        return [dict(project) for project in self._projects]  # rows of strings

    async def get_model_profiles(self) -> Snapshot:
        cached = self._profiles
        if cached is not None and cached.version == self.hub.version(MODEL_PROFILES_KEY):
            await trio.lowlevel.checkpoint()
        else:
            cached = self._profiles = await self._snapshot(MODEL_PROFILES_KEY, _select_profiles)
        return Snapshot([dict(profile) for profile in cached.items], cached.version)

    async def list_chats(self, project_id: str) -> Snapshot:
        return await self._snapshot(_project_key(project_id), partial(_select_chats, project_id))

    async def get_history(self, chat_id: str) -> Snapshot:
        return await self._snapshot(_chat_key(chat_id), partial(_select_history, chat_id))

    # --- writes ---

    async def send_message(
        self, chat_id: str, message: JSON, *, sender: JSON | None = None
    ) -> None:
        """Store a user message, with ``sender`` (any JSON, stored as it is), and queue the
        chat's agent to answer it."""
        content = _message_text(message)
        try:
            sender_text = None if sender is None else json.dumps(sender, ensure_ascii=False)
        except (TypeError, ValueError):
            raise BackendError("sender must be JSON") from None

        def stored(result: tuple[_Row, _Row]) -> None:
            message, chat = result
            self.hub.publish(_chat_key(chat_id), {"type": "message", "message": message})
            # Queued under the lock, so replies run in the order the messages were stored.
            if not isinstance(self.agent_for(chat["modelProfileId"]), SilentAgent):
                self._queue_reply(chat_id, _Job(content, chat["modelProfileId"], message["id"]))

        await self._write_batched(
            partial(_insert_message, chat_id, _new_id(), "user", content, sender=sender_text),
            stored,
        )
        logger.bind(resource=f"chat:{chat_id}").debug("message of {} characters", len(content))

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
        if self._closed:
            raise BackendError("backend is closed")
        pending = _BatchedWrite(write, then)  # type: ignore[arg-type]
        self._batch.append(pending)
        with trio.CancelScope(shield=True):
            if self._batching:
                await pending.done.wait()
            else:
                await self._commit_batches()
        assert pending.result is not None
        return cast(_T, pending.result.unwrap())

    async def _commit_batches(self) -> None:
        self._batching = True
        batch: list[_BatchedWrite] = []
        try:
            while self._batch and not self._closed:
                async with self._lock:
                    if self._closed:
                        break
                    # What queued up while the last batch was committed (or while the lock was
                    # held) goes in this one.
                    batch, self._batch = self._batch, []
                    results = await self._store(batch)
                    for pending, result in zip(batch, results, strict=True):
                        if isinstance(result, outcome.Value):
                            pending.then(result.value)
                        pending.result = result
                        pending.done.set()
                self._uncheckpointed += len(batch)
                if self._uncheckpointed >= CHECKPOINT_EVERY and not self._checkpointing:
                    self._checkpointing = True
                    self._nursery.start_soon(self._checkpoint)
                batch = []
        finally:
            self._batching = False
            # Closed (or failed) with writes still waiting: they will never be stored.
            for pending in (*batch, *self._batch):
                if not pending.done.is_set():
                    pending.result = outcome.Error(BackendError("backend is closed"))
                    pending.done.set()
            self._batch = []

    async def _store(self, batch: list[_BatchedWrite]) -> list[outcome.Outcome[object]]:
        writes = [pending.write for pending in batch]
        try:
            try:
                async with self._limiter:  # no worker thread is using the connection
                    return _run_batch(writes, self._conn)
            except _Busy:
                # Another connection to the file (a backup, an operator's shell) holds its
                # write lock: wait for it in the worker thread, never on the event loop.
                return await self._run(partial(_run_batch, writes))
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
                await self._run(_wal_checkpoint)
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
        if title is not None and not isinstance(title, str):
            raise BackendError("title must be a string")
        profiles = [p["id"] for p in (await self.get_model_profiles()).items]
        if not profiles:
            raise BackendError("there are no model profiles to create a chat with")
        # No profile named: the first one (`echo` in a new database).
        model_profile_id = model_profile_id or profiles[0]
        if model_profile_id not in profiles:
            raise BackendError(f"unknown model profile {model_profile_id!r}")
        title = (title or "").strip() or DEFAULT_CHAT_TITLE
        write = partial(_insert_chat, project_id, title, model_profile_id)
        async with self._lock:
            chat = await self._run(write)
            self.hub.publish(_project_key(project_id), {"type": "chat_created", "chat": chat})
        logger.info("created chat {} in project {}", chat["id"], project_id)
        return chat

    async def rename_chat(self, chat_id: str, title: str) -> JSON:
        """Retitle a chat and return it; pushes ``chat_renamed`` to its project's feed."""
        if not isinstance(title, str) or not title.strip():
            raise BackendError("title must be a non-empty string")
        write = partial(_update_chat_title, chat_id, title.strip())
        async with self._lock:
            chat = await self._run(write)
            self.hub.publish(
                _project_key(chat["projectId"]), {"type": "chat_renamed", "chat": chat}
            )
        return chat

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the reply running in a chat (queued ones still run); push ``cancelled``."""
        await self._run(partial(_select_chat, chat_id=chat_id))  # NotFound if unknown
        queue = self._queues.get(chat_id)
        if queue is None or queue.running is None:
            return False
        queue.running.cancel()
        logger.bind(resource=str(_chat_key(chat_id))).info("reply cancelled")
        return True

    async def delete_chat(self, chat_id: str) -> None:
        """Delete a chat and its messages, and stop its replies; pushes ``chat_deleted``."""
        async with self._lock:
            chat = await self._run(partial(_delete_chat, chat_id))
            self.hub.publish(
                _project_key(chat["projectId"]), {"type": "chat_deleted", "chatId": chat_id}
            )
            # The chat's own watchers are done: their feeds complete, so subscribers get the
            # final {"completed": true} and a later subscribe finds the chat gone.
            self.hub.end(_chat_key(chat_id))
            queue = self._queues.pop(chat_id, None)
            if queue is not None:
                queue.jobs.clear()
                if queue.running is not None:
                    queue.running.cancel()
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
        checked = _checked_profiles(profiles)
        if agents is not None:
            strays = sorted(set(agents) - {p["id"] for p in checked})
            if strays:
                raise ValueError(f"agents for unknown model profiles: {', '.join(strays)}")
        async with self._lock:
            await self._run(partial(_store_profiles, checked))
            self._profiles = None
            if agents is not None:
                self.agents = dict(agents)
            self.hub.publish(MODEL_PROFILES_KEY, {"modelProfiles": checked})
        logger.info("model profiles replaced ({} profiles)", len(checked))

    # --- feeds ---

    def watch_project(self, project_id: str) -> Feed:
        return self.hub.open_feed(_project_key(project_id))

    def watch_chat(self, chat_id: str) -> Feed:
        return self.hub.open_feed(_chat_key(chat_id))

    def watch_model_profiles(self) -> Feed:
        return self.hub.open_feed(MODEL_PROFILES_KEY)

    # --- replies ---

    def agent_for(self, model_profile_id: str) -> Agent:
        """The agent that answers in a chat of the given model profile."""
        configured = self.agents.get(model_profile_id)
        if configured is not None:
            return configured
        delay = _PROFILE_CHUNK_DELAYS.get(model_profile_id)
        if delay is None:
            return self.agent
        return attrs.evolve(self.agent, chunk_delay=delay)

    def _queue_reply(self, chat_id: str, job: _Job) -> None:
        queue = self._queues.get(chat_id)
        if queue is None:
            queue = self._queues[chat_id] = _ChatQueue()
            self._nursery.start_soon(self._drain, chat_id, queue)
        queue.jobs.append(job)

    async def _drain(self, chat_id: str, queue: _ChatQueue) -> None:
        """Run a chat's replies one at a time, then forget the chat's queue."""
        try:
            while queue.jobs:
                job = queue.jobs.popleft()
                with trio.CancelScope() as queue.running:
                    await self._reply(chat_id, job, queue)
                stopped = queue.running.cancelled_caught and self._queues.get(chat_id) is queue
                message_id, text = queue.message_id, "".join(queue.text)
                # Nothing runs any more: a cancel from now on finds nothing to stop, also
                # while the stopped reply is being stored.
                queue.running = queue.message_id = None
                queue.text = []
                if stopped:
                    assert message_id is not None
                    self.hub.publish(
                        _chat_key(chat_id), {"type": "cancelled", "messageId": message_id}
                    )
                    await self._store_stopped(chat_id, message_id, text)
        finally:
            # No checkpoint since the loop found the queue empty, so no job can be stranded.
            if self._queues.get(chat_id) is queue:
                del self._queues[chat_id]

    async def _store_stopped(self, chat_id: str, message_id: str, text: str) -> None:
        """A stopped reply is stored as far as it got, with a note that it was stopped (and
        only the note if it had not begun), so that it never shows as an empty message."""
        content = f"{text}\n\n{STOPPED_NOTE}" if text.strip() else STOPPED_NOTE
        key = _chat_key(chat_id)
        try:
            async with self._lock:
                stored, _ = await self._run(
                    partial(_insert_message, chat_id, message_id, "assistant", content)
                )
                self.hub.publish(key, {"type": "message", "message": stored})
        except NotFound:
            pass  # the chat was deleted meanwhile
        except Exception:
            logger.bind(resource=str(key)).exception("could not store the stopped reply")

    async def _reply(self, chat_id: str, job: _Job, queue: _ChatQueue) -> None:
        key = _chat_key(chat_id)
        log = logger.bind(resource=str(key))
        message_id = queue.message_id = _new_id()

        def emit(piece: str) -> None:
            queue.text.append(piece)
            self.hub.publish(key, {"type": "chunk", "messageId": message_id, "text": piece})

        self.hub.publish(key, {"type": "reply_started", "messageId": message_id})
        agent = self.agent_for(job.model_profile_id)
        try:
            # The agent's own log lines name the chat too.
            with logger.contextualize(resource=str(key)):
                if isinstance(agent, CommandAgent) and agent.history:
                    earlier = await self._run(partial(_select_earlier, chat_id, job.message_id))
                    text = await agent.reply(job.content, emit, history=earlier)
                else:
                    text = await agent.reply(job.content, emit)
        except AgentError as exc:
            # An expected failure (a command that exits non-zero, times out, is missing): one
            # line says what happened, and the chat is told.
            log.error("agent failed: {}", exc.detail)
            self.hub.publish(key, {"type": "error", "messageId": message_id, "error": str(exc)})
            return
        except Exception:
            # Handlers should set diagnose=False (as the CLI does): its variable dumps would
            # print the message's content.
            log.exception("agent failed")
            self.hub.publish(
                key, {"type": "error", "messageId": message_id, "error": "agent failed"}
            )
            return
        write = partial(_insert_message, chat_id, message_id, "assistant", text)
        try:
            async with self._lock:
                stored, _ = await self._run(write)
                self.hub.publish(key, {"type": "message", "message": stored})
        except NotFound:
            log.debug("chat deleted before its reply was stored")
        except Exception:
            log.exception("could not store the reply")
            self.hub.publish(
                key, {"type": "error", "messageId": message_id, "error": "reply not saved"}
            )


@asynccontextmanager
async def open_sqlite_backend(
    data_dir: str | os.PathLike[str], *, agent: EchoAgent | None = None
) -> AsyncIterator[SqliteBackend]:
    """Open (creating and seeding if new) the database in ``data_dir`` and run its replies.

    Leaving the context cancels the replies still running and closes the database.
    """
    path = Path(data_dir) / DATABASE_NAME
    limiter = trio.CapacityLimiter(1)
    conn = await trio.to_thread.run_sync(_connect, path, limiter=limiter)
    logger.info("sqlite backend opened at {}", path)
    try:
        try:
            async with trio.open_nursery() as nursery:
                backend = SqliteBackend(
                    conn, limiter=limiter, nursery=nursery, agent=agent or EchoAgent(), path=path
                )
                try:
                    yield backend
                finally:
                    # Refuse new calls, and stop the replies: none outlives the backend.
                    backend._closed = True
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps whatever the caller's block raised; hand it back unwrapped so
            # `async with open_sqlite_backend(...)` raises what its body raised.
            if len(group.exceptions) != 1:
                raise
            _reraise(group.exceptions[0])
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close, limiter=limiter)
        logger.info("sqlite backend at {} closed", path)


def _reraise(exc: BaseException) -> NoReturn:
    context, cause = exc.__context__, exc.__cause__
    try:
        raise exc
    finally:
        # Raising inside an except block would chain the group as context; undo that.
        exc.__context__, exc.__cause__ = context, cause
        del exc
