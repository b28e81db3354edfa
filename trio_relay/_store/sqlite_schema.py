"""The SQLite store's schema: creating, migrating and seeding the database file.

``PRAGMA user_version`` holds the schema's version. A new file gets the schema and the demo
data (a project, the ``welcome`` chat, the echo profiles); an older one is migrated step by
step, in one transaction with the check, so a file is never left half migrated.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

from .backend import BackendError
from .sqlite_sql import new_id, now, replace_profiles, transaction

__all__ = [
    "DEFAULT_MODEL_PROFILE", "SCHEMA_VERSION", "SEED_MODEL_PROFILES", "WELCOME_TEXT", "connect",
]

DEFAULT_MODEL_PROFILE: Final = "echo"

# PRAGMA user_version of the schema below. 0 means a fresh file: the only time we seed.
# 2: messages.sender; 3: messages.nonce (`MIGRATIONS`).
SCHEMA_VERSION: Final = 3

# One statement each: executescript() would commit the transaction they run in.
SCHEMA: Final = (
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
        sender TEXT,
        nonce TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS messages_by_chat ON messages (chat_id, seq)",
    # A retried send (same client nonce, same chat) is stored once.
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_by_nonce ON messages (chat_id, nonce)"
    " WHERE nonce IS NOT NULL",
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
# messages.nonce: the client's nonce of a user message (its unique index is in SCHEMA).
MIGRATIONS: Final = {
    2: ("ALTER TABLE messages ADD COLUMN sender TEXT",),
    3: ("ALTER TABLE messages ADD COLUMN nonce TEXT",),
}

WELCOME_TEXT: Final = (
    "Welcome to trio-relay! This demo chat talks to the echo agent: type something and "
    "it will be streamed back to you."
)
SEED_MODEL_PROFILES: Final = (
    {"id": "echo", "name": "Echo", "agent": "echo"},
    {"id": "echo-fast", "name": "Echo (fast)", "agent": "echo"},
    {"id": "echo-slow", "name": "Echo (slow)", "agent": "echo"},
)


def connect(path: Path) -> sqlite3.Connection:
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
        with transaction(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"{path} has schema version {version}; this trio-relay knows up to"
                    f" {SCHEMA_VERSION}"
                )
            if version == 0:
                for statement in SCHEMA:
                    conn.execute(statement)
                _seed(conn)
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        conn.execute(statement)
                for statement in SCHEMA:  # indexes a database made by hand may lack
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("PRAGMA busy_timeout=0")  # from now on, see sqlite_sql.BUSY_TIMEOUT_MS
    except BaseException:
        conn.close()
        raise
    return conn


def _seed(conn: sqlite3.Connection) -> None:
    created = now()
    conn.execute(
        "INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)",
        ("demo", "Demo project", created),
    )
    conn.execute(
        "INSERT INTO chats (id, project_id, title, model_profile_id, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        ("welcome", "demo", "Welcome", DEFAULT_MODEL_PROFILE, created),
    )
    conn.execute(
        "INSERT INTO messages (id, chat_id, role, content, created_at) VALUES (?, ?, ?, ?, ?)",
        (new_id(), "welcome", "assistant", WELCOME_TEXT, created),
    )
    replace_profiles(conn, list(SEED_MODEL_PROFILES))
