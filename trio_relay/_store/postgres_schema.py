"""The PostgreSQL store's schema: creating, migrating and seeding the database.

``trio_relay_schema`` holds the schema's version in one row. A new database gets the schema
and the demo data (a project, the ``welcome`` chat, the echo profiles); an older one is
migrated step by step. Each step runs in its own transaction together with the version it
leads to, so a database is never left half migrated, and the whole check runs under a
transaction-level advisory lock, so that relays starting at the same moment migrate once:
the others wait for the lock, then find the work done.
"""

from __future__ import annotations

from typing import Final

import psycopg

from .backend import BackendError
from .postgres_sql import new_id, now, replace_profiles
from .rules import checked_profiles
from .sqlite_schema import DEFAULT_MODEL_PROFILE, SEED_MODEL_PROFILES, WELCOME_TEXT

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

#: Any 64-bit number of our own: the advisory lock that serializes migrations.
MIGRATION_LOCK: Final = 0x7472696F_72656C61  # "triorela"

# What takes a database of the version before each to that version. Version 1 is the whole
# schema as first released; later versions add to it.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        """CREATE TABLE projects (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            pos BIGSERIAL NOT NULL
        )""",
        # pos: timestamps of chats created on several nodes can tie or step back with their
        # clocks; the order they were stored in cannot.
        """CREATE TABLE chats (
            id TEXT PRIMARY KEY,
            project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
            title TEXT NOT NULL,
            model_profile_id TEXT NOT NULL,
            created_at TEXT NOT NULL,
            pos BIGSERIAL NOT NULL
        )""",
        "CREATE INDEX chats_by_project ON chats (project_id, pos)",
        """CREATE TABLE messages (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            created_at TEXT NOT NULL,
            sender TEXT,
            nonce TEXT
        )""",
        "CREATE INDEX messages_by_chat ON messages (chat_id, seq)",
        # A retried send (same client nonce, same chat) is stored once, whichever node it
        # reaches.
        "CREATE UNIQUE INDEX messages_by_nonce ON messages (chat_id, nonce)"
        " WHERE nonce IS NOT NULL",
        """CREATE TABLE model_profiles (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            agent TEXT NOT NULL,
            position INTEGER NOT NULL
        )""",
        # One row per user message that an agent answers: the node that stored it runs the
        # reply and renews lease_until while it does; a job whose lease ran out (its node
        # died) is closed by another node with an "interrupted" note. cancel_requested: a
        # client of another node asked to stop it; the owner stops it at its next look.
        """CREATE TABLE reply_jobs (
            message_id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
            chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            lease_until TIMESTAMPTZ NOT NULL,
            done BOOLEAN NOT NULL DEFAULT FALSE,
            cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
        )""",
        "CREATE INDEX reply_jobs_running ON reply_jobs (lease_until) WHERE NOT done",
        # Every stored change's event, written in the change's own transaction and deleted
        # once published; the rows a crashed node left are published by another one.
        """CREATE TABLE outbox (
            id BIGSERIAL PRIMARY KEY,
            owner TEXT NOT NULL,
            lease_until TIMESTAMPTZ NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            data JSONB
        )""",
        # data NULL: the resource ended (a deleted chat's feed completes).
    ),
}
SCHEMA_VERSION: Final = max(MIGRATIONS)


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Bring the database to `SCHEMA_VERSION` (seeding a new one); return the version found.

    ``conn`` must be in autocommit mode: each step is its own transaction."""
    with conn.transaction():
        # Held to the end of this transaction: one relay migrates, the others wait here.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS trio_relay_schema (version INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT version FROM trio_relay_schema FOR UPDATE").fetchone()
        found = 0 if row is None else int(str(row[0]))
        if row is None:
            conn.execute("INSERT INTO trio_relay_schema (version) VALUES (0)")
        if found > SCHEMA_VERSION:
            raise BackendError(
                f"the database has schema version {found}; this trio-relay knows up to"
                f" {SCHEMA_VERSION}"
            )
    for step in range(found + 1, SCHEMA_VERSION + 1):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            (current,) = conn.execute("SELECT version FROM trio_relay_schema").fetchone() or (0,)
            if int(str(current)) >= step:
                continue  # another relay took this step while we waited
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            if step == 1:
                _seed(conn)
            conn.execute("UPDATE trio_relay_schema SET version = %s", (step,))
    return found


def _seed(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    created = now()
    conn.execute(
        "INSERT INTO projects (id, name, created_at) VALUES (%s, %s, %s)",
        ("demo", "Demo project", created),
    )
    conn.execute(
        "INSERT INTO chats (id, project_id, title, model_profile_id, created_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        ("welcome", "demo", "Welcome", DEFAULT_MODEL_PROFILE, created),
    )
    conn.execute(
        "INSERT INTO messages (id, chat_id, role, content, created_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        (new_id(), "welcome", "assistant", WELCOME_TEXT, created),
    )
    replace_profiles(conn, checked_profiles(list(SEED_MODEL_PROFILES)))
