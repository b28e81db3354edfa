"""The SQLite store's SQL: plain functions over one connection, and the transactions they run in.

Every function takes the connection last, so that the backend can bind the rest with
`functools.partial` and run it in its worker thread (or, for a batch of message inserts, on
the event loop: `run_batch`). Rows come back with the wire's camelCase names, ready to send.
"""

from __future__ import annotations

import contextvars
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Final, TypeVar

import outcome

from .._wire.protocol import JSON
from .backend import BackendError, NotFound

__all__ = [
    "BUSY_TIMEOUT_MS", "Busy", "Row", "delete_chat", "insert_chat", "insert_message", "new_id",
    "now", "patiently", "replace_profiles", "run_batch", "select_chats", "select_earlier",
    "select_history", "select_profiles", "select_projects", "store_profiles", "transaction",
    "update_chat_title", "wal_checkpoint",
]

# Column aliases give the wire's camelCase names, so a row converts to its JSON form as is.
_PROJECT_COLUMNS: Final = "id, name, created_at AS createdAt"
_CHAT_COLUMNS: Final = (
    "id, project_id AS projectId, title, model_profile_id AS modelProfileId,"
    " created_at AS createdAt"
)
_MESSAGE_COLUMNS: Final = (
    "id, chat_id AS chatId, role, content, created_at AS createdAt, sender"
)
_PROFILE_COLUMNS: Final = "id, name, agent"

_T = TypeVar("_T")
Row = dict[str, JSON]


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> str:
    # Milliseconds and "Z": the ISO-8601 form every JavaScript Date parses.
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: Set while `run_batch` runs: each write's `transaction` is then a savepoint of the batch.
_IN_BATCH: Final = contextvars.ContextVar("_IN_BATCH", default=False)
#: How long a write waits for another connection's lock, in the worker thread only: on the
#: event loop it does not wait at all (`run_batch` raises `Busy`; the batch moves to the
#: worker thread). SQLite's own default in Python is 5 s.
BUSY_TIMEOUT_MS: Final = 5000


class Busy(Exception):
    """Another connection to the database file holds its write lock."""


@contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool = True) -> Iterator[None]:
    # The connection is in autocommit mode, so transactions are explicit and none is left open
    # between calls. A write takes sqlite's write lock up front (IMMEDIATE) rather than
    # upgrading halfway, which could fail if another process writes to the file too. Inside a
    # batch (`run_batch`) it is a savepoint: one write failing undoes only itself.
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


def wal_checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def patiently(fn: Callable[[sqlite3.Connection], _T], conn: sqlite3.Connection) -> _T:
    """Run ``fn`` (in the worker thread) waiting up to `BUSY_TIMEOUT_MS` for locks."""
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    try:
        return fn(conn)
    finally:
        conn.execute("PRAGMA busy_timeout=0")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return bool(code & 0xFF == 5)  # SQLITE_BUSY, and its extended codes
    return "locked" in str(exc) or "busy" in str(exc)


def run_batch(
    writes: list[Callable[[sqlite3.Connection], object]], conn: sqlite3.Connection
) -> list[outcome.Outcome[object]]:
    """Run several writes in one transaction, with one commit; each one's result or error is
    its own (a savepoint each). Raises `Busy` if the write lock cannot be had at once, and
    fails whole if SQLite rolls the transaction back by itself (a full disk, an I/O error) or
    the commit fails: then none of the writes was stored."""
    token = _IN_BATCH.set(True)
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise Busy(str(exc)) from exc
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


def _row(row: sqlite3.Row | None) -> Row | None:
    return None if row is None else dict(row)


def _rows(rows: list[sqlite3.Row]) -> list[JSON]:
    return [dict(row) for row in rows]


def _message(row: sqlite3.Row) -> Row:
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


def replace_profiles(conn: sqlite3.Connection, profiles: list[Row]) -> None:
    conn.execute("DELETE FROM model_profiles")
    conn.executemany(
        "INSERT INTO model_profiles (id, name, agent, position) VALUES (?, ?, ?, ?)",
        [(p["id"], p["name"], p["agent"], i) for i, p in enumerate(profiles)],
    )


def select_projects(conn: sqlite3.Connection) -> list[JSON]:
    return _rows(
        conn.execute(
            f"SELECT {_PROJECT_COLUMNS} FROM projects ORDER BY created_at, rowid"
        ).fetchall()
    )


def select_profiles(conn: sqlite3.Connection) -> list[JSON]:
    return _rows(
        conn.execute(f"SELECT {_PROFILE_COLUMNS} FROM model_profiles ORDER BY position").fetchall()
    )


def select_chat(conn: sqlite3.Connection, chat_id: str) -> Row:
    chat = _row(
        conn.execute(f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = ?", (chat_id,)).fetchone()
    )
    if chat is None:
        raise NotFound(f"chat {chat_id!r} not found")
    return chat


def _check_project(conn: sqlite3.Connection, project_id: str) -> None:
    if conn.execute("SELECT 1 FROM projects WHERE id = ?", (project_id,)).fetchone() is None:
        raise NotFound(f"project {project_id!r} not found")


def select_chats(project_id: str, conn: sqlite3.Connection) -> list[JSON]:
    with transaction(conn, write=False):  # the project check and the list agree
        _check_project(conn, project_id)
        rows = conn.execute(
            f"SELECT {_CHAT_COLUMNS} FROM chats WHERE project_id = ? ORDER BY created_at, rowid",
            (project_id,),
        ).fetchall()
    return _rows(rows)


def select_earlier(
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


def select_history(chat_id: str, conn: sqlite3.Connection) -> list[JSON]:
    with transaction(conn, write=False):
        select_chat(conn, chat_id)
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? ORDER BY seq",
            (chat_id,),
        ).fetchall()
    return [_message(row) for row in rows]


def insert_message(
    chat_id: str, message_id: str, role: str, content: str, conn: sqlite3.Connection,
    sender: str | None = None, nonce: str | None = None,
) -> tuple[Row, Row, bool]:
    """Store a message (``sender`` as JSON text); return it, its chat, and whether it is new:
    a message with the same ``nonce`` in the chat is returned as it was stored, and nothing
    is stored again. `NotFound` if the chat is gone."""
    with transaction(conn):
        chat = select_chat(conn, chat_id)
        if nonce is not None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND nonce = ?",
                (chat_id, nonce),
            ).fetchone()
            if row is not None:
                return _message(row), chat, False
        conn.execute(
            "INSERT INTO messages (id, chat_id, role, content, created_at, sender, nonce)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (message_id, chat_id, role, content, now(), sender, nonce),
        )
        row = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
    assert row is not None
    return _message(row), chat, True


def insert_chat(
    project_id: str, title: str, model_profile_id: str, conn: sqlite3.Connection
) -> Row:
    chat_id = new_id()
    with transaction(conn):
        _check_project(conn, project_id)
        conn.execute(
            "INSERT INTO chats (id, project_id, title, model_profile_id, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (chat_id, project_id, title, model_profile_id, now()),
        )
        return select_chat(conn, chat_id)


def update_chat_title(chat_id: str, title: str, conn: sqlite3.Connection) -> Row:
    with transaction(conn):
        conn.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))
        return select_chat(conn, chat_id)


def delete_chat(chat_id: str, conn: sqlite3.Connection) -> Row:
    with transaction(conn):
        chat = select_chat(conn, chat_id)
        conn.execute("DELETE FROM messages WHERE chat_id = ?", (chat_id,))
        conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
    return chat


def store_profiles(profiles: list[Row], conn: sqlite3.Connection) -> None:
    with transaction(conn):
        replace_profiles(conn, profiles)
