"""The PostgreSQL store's SQL: plain functions over one connection, each its own transaction.

Every function takes the connection last, so that the backend can bind the rest with
`functools.partial` and run it in a worker thread. Connections are in autocommit mode; a
function that writes opens one transaction for the change *and* its events: each event goes
into the ``outbox`` table in that transaction (`Event`), so an event is never lost between
the commit and its publication. Rows come back with the wire's camelCase names.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, Final

import attrs
import outcome
import psycopg
from psycopg.types.json import Jsonb

from .._wire.protocol import JSON, ResourceKey
from .backend import MODEL_PROFILES_KEY, NotFound, chat_key, project_key
from .replies import reply_message_id
from .sqlite_sql import now

__all__ = [
    "INTERRUPTED_NOTE", "Conn", "Event", "Lease", "Row", "claim_outbox", "close_job",
    "delete_chat", "delete_outbox", "insert_chat", "insert_reply", "insert_user_message",
    "new_id", "now", "request_cancel", "run_batch", "take_cancel_requests",
    "release_jobs", "renew_leases", "replace_profiles", "select_chat", "select_chats",
    "select_earlier", "select_history", "select_profiles", "select_projects", "store_profiles",
    "take_over_jobs", "update_chat_title",
]

Conn = psycopg.Connection[dict[str, Any]]
Row = dict[str, JSON]

#: What the chat shows for a reply whose node stopped (died, or was shut down) mid-reply.
INTERRUPTED_NOTE: Final = "(interrupted: the relay answering this stopped before it finished)"

_PROJECT_COLUMNS: Final = "id, name, created_at AS \"createdAt\""
_CHAT_COLUMNS: Final = (
    "id, project_id AS \"projectId\", title, model_profile_id AS \"modelProfileId\","
    " created_at AS \"createdAt\""
)
_MESSAGE_COLUMNS: Final = (
    "id, chat_id AS \"chatId\", role, content, created_at AS \"createdAt\", sender"
)


def new_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen
class Event:
    """A stored change's event, with its outbox row (``None`` data: the resource ended)."""

    outbox_id: int
    key: ResourceKey
    data: JSON | None


@attrs.frozen
class Lease:
    """Who writes (this backend's node id) and for how long its claims hold, in seconds."""

    node: str
    seconds: float


def _outbox(conn: Conn, lease: Lease, key: ResourceKey, data: JSON | None) -> Event:
    row = conn.execute(
        "INSERT INTO outbox (owner, lease_until, kind, key, data)"
        " VALUES (%s, now() + make_interval(secs => %s), %s, %s, %s) RETURNING id",
        (lease.node, lease.seconds, key.resource, key.resource_id,
         None if data is None else Jsonb(data)),
    ).fetchone()
    assert row is not None
    return Event(int(row["id"]), key, data)


def _message(row: dict[str, Any]) -> Row:
    message: Row = dict(row)
    sender = message.pop("sender", None)
    if isinstance(sender, str):
        try:
            message["sender"] = json.loads(sender)
        except ValueError:
            pass
    return message


# --- reads ---------------------------------------------------------------------------------


def select_projects(conn: Conn) -> list[JSON]:
    rows = conn.execute(f"SELECT {_PROJECT_COLUMNS} FROM projects ORDER BY pos").fetchall()
    return [dict(row) for row in rows]


def select_profiles(conn: Conn) -> list[JSON]:
    rows = conn.execute("SELECT id, name, agent FROM model_profiles ORDER BY position").fetchall()
    return [dict(row) for row in rows]


def select_chat(conn: Conn, chat_id: str, *, lock: str = "") -> Row:
    """A chat, `NotFound` if there is none; ``lock``: "FOR SHARE" (a message goes into it:
    no delete meanwhile) or "FOR UPDATE" (it is being deleted)."""
    assert lock in ("", "FOR SHARE", "FOR UPDATE")
    row = conn.execute(
        f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = %s {lock}",
        (chat_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"chat {chat_id!r} not found")
    return dict(row)


def _check_project(conn: Conn, project_id: str) -> None:
    if conn.execute("SELECT 1 FROM projects WHERE id = %s", (project_id,)).fetchone() is None:
        raise NotFound(f"project {project_id!r} not found")


def select_chats(project_id: str, conn: Conn) -> list[JSON]:
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        _check_project(conn, project_id)
        rows = conn.execute(
            f"SELECT {_CHAT_COLUMNS} FROM chats WHERE project_id = %s ORDER BY pos",
            (project_id,),
        ).fetchall()
    return [dict(row) for row in rows]


def select_history(chat_id: str, conn: Conn) -> list[JSON]:
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        select_chat(conn, chat_id)
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = %s ORDER BY seq",
            (chat_id,),
        ).fetchall()
    return [_message(row) for row in rows]


def select_earlier(chat_id: str, message_id: str, conn: Conn) -> list[dict[str, str]]:
    """As `sqlite_sql.select_earlier`: the history a reply to ``message_id`` starts from."""
    rows = conn.execute(
        "SELECT role, content FROM messages WHERE chat_id = %s AND"
        " (seq < (SELECT seq FROM messages WHERE id = %s) OR role = 'assistant') ORDER BY seq",
        (chat_id, message_id),
    ).fetchall()
    return [{"role": row["role"], "content": row["content"]} for row in rows]


# --- writes --------------------------------------------------------------------------------


def insert_user_message(
    chat_id: str, message_id: str, content: str, sender: str | None, nonce: str | None,
    answers: Callable[[str], bool], lease: Lease, conn: Conn,
) -> tuple[Row, Row, bool, list[Event], bool]:
    """Store a user message, its event and (if the chat's agent ``answers``) its reply job,
    owned by ``lease.node``; return the message, its chat, whether it is new, its events,
    and whether a job was recorded.

    A message with the same ``nonce`` in the chat is returned as stored, with nothing new:
    the unique index makes this hold when two nodes store the same retry at once (the
    second insert does nothing, and the stored row is read back)."""
    with conn.transaction():
        chat = select_chat(conn, chat_id, lock="FOR SHARE")
        row = conn.execute(
            "INSERT INTO messages (id, chat_id, role, content, created_at, sender, nonce)"
            " VALUES (%s, %s, 'user', %s, %s, %s, %s)"
            " ON CONFLICT (chat_id, nonce) WHERE nonce IS NOT NULL DO NOTHING"
            f" RETURNING {_MESSAGE_COLUMNS}",
            (message_id, chat_id, content, now(), sender, nonce),
        ).fetchone()
        if row is None:
            stored = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = %s AND nonce = %s",
                (chat_id, nonce),
            ).fetchone()
            assert stored is not None
            return _message(stored), chat, False, [], False
        message = _message(row)
        events = [_outbox(conn, lease, chat_key(chat_id), {"type": "message", "message": message})]
        job = answers(str(chat["modelProfileId"]))
        if job:
            conn.execute(
                "INSERT INTO reply_jobs (message_id, chat_id, owner, lease_until)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
                (message_id, chat_id, lease.node, lease.seconds),
            )
    return message, chat, True, events, job


def _insert_assistant(
    conn: Conn, chat_id: str, message_id: str, content: str, lease: Lease
) -> tuple[Row, Event]:
    row = conn.execute(
        "INSERT INTO messages (id, chat_id, role, content, created_at)"
        f" VALUES (%s, %s, 'assistant', %s, %s) RETURNING {_MESSAGE_COLUMNS}",
        (message_id, chat_id, content, now()),
    ).fetchone()
    assert row is not None
    message = _message(row)
    return message, _outbox(conn, lease, chat_key(chat_id), {"type": "message", "message": message})


def insert_reply(
    chat_id: str, for_message: str, message_id: str, content: str, lease: Lease, conn: Conn
) -> tuple[Row, list[Event]]:
    """Store the answer to ``for_message`` and close its job, if the job is still this
    node's: `NotFound` if the chat is gone or another node took the job over (its lease ran
    out while this node could not renew it), so a chat never shows two replies."""
    with conn.transaction():
        select_chat(conn, chat_id, lock="FOR SHARE")
        closed = conn.execute(
            "UPDATE reply_jobs SET done = TRUE"
            " WHERE message_id = %s AND owner = %s AND NOT done",
            (for_message, lease.node),
        )
        if closed.rowcount == 0 and conn.execute(
            "SELECT 1 FROM reply_jobs WHERE message_id = %s", (for_message,)
        ).fetchone() is not None:
            raise NotFound(f"the reply to {for_message!r} was taken over by another relay")
        message, event = _insert_assistant(conn, chat_id, message_id, content, lease)
    return message, [event]


def run_batch(
    writes: list[Callable[[Conn], object]], conn: Conn
) -> list[outcome.Outcome[object]]:
    """Run several writes in one transaction, with one commit; each one's result or error is
    its own (each write's transaction is a savepoint of this one). If the commit fails, or
    the connection breaks, the whole batch fails: none of the writes was stored."""
    with conn.transaction():
        return [outcome.capture(write, conn) for write in writes]


def close_job(for_message: str, lease: Lease, conn: Conn) -> None:
    conn.execute(
        "UPDATE reply_jobs SET done = TRUE WHERE message_id = %s AND owner = %s",
        (for_message, lease.node),
    )


def insert_chat(
    project_id: str, title: str, model_profile_id: str, lease: Lease, conn: Conn
) -> tuple[Row, list[Event]]:
    chat_id = new_id()
    with conn.transaction():
        _check_project(conn, project_id)
        row = conn.execute(
            "INSERT INTO chats (id, project_id, title, model_profile_id, created_at)"
            f" VALUES (%s, %s, %s, %s, %s) RETURNING {_CHAT_COLUMNS}",
            (chat_id, project_id, title, model_profile_id, now()),
        ).fetchone()
        assert row is not None
        chat: Row = dict(row)
        data = {"type": "chat_created", "chat": chat}
        event = _outbox(conn, lease, project_key(project_id), data)
    return chat, [event]


def update_chat_title(
    chat_id: str, title: str, lease: Lease, conn: Conn
) -> tuple[Row, list[Event]]:
    with conn.transaction():
        row = conn.execute(
            f"UPDATE chats SET title = %s WHERE id = %s RETURNING {_CHAT_COLUMNS}",
            (title, chat_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"chat {chat_id!r} not found")
        chat: Row = dict(row)
        key = project_key(str(chat["projectId"]))
        event = _outbox(conn, lease, key, {"type": "chat_renamed", "chat": chat})
    return chat, [event]


def delete_chat(chat_id: str, lease: Lease, conn: Conn) -> tuple[Row, list[Event]]:
    """Delete a chat (its messages and jobs go with it); its events: ``chat_deleted`` on the
    project, and the end of the chat's own feed."""
    with conn.transaction():
        chat = select_chat(conn, chat_id, lock="FOR UPDATE")
        conn.execute("DELETE FROM chats WHERE id = %s", (chat_id,))
        key = project_key(str(chat["projectId"]))
        events = [
            _outbox(conn, lease, key, {"type": "chat_deleted", "chatId": chat_id}),
            _outbox(conn, lease, chat_key(chat_id), None),
        ]
    return chat, events


def replace_profiles(conn: psycopg.Connection[Any], profiles: list[Row]) -> None:
    conn.execute("DELETE FROM model_profiles")
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO model_profiles (id, name, agent, position) VALUES (%s, %s, %s, %s)",
            [(p["id"], p["name"], p["agent"], i) for i, p in enumerate(profiles)],
        )


def store_profiles(profiles: list[Row], lease: Lease, conn: Conn) -> list[Event]:
    with conn.transaction():
        # Two hosts replacing the profiles at once: one after the other, whole.
        conn.execute("LOCK TABLE model_profiles IN EXCLUSIVE MODE")
        replace_profiles(conn, profiles)
        listed: list[JSON] = [dict(p) for p in profiles]
        return [_outbox(conn, lease, MODEL_PROFILES_KEY, {"modelProfiles": listed})]


# --- leases, takeover and the outbox --------------------------------------------------------


def renew_leases(lease: Lease, jobs: list[str], outbox: list[int], conn: Conn) -> None:
    """Extend this node's claims: the jobs it runs and the events it has yet to clear. By id,
    not by owner: a job or event whose write was abandoned half way is not this node's to
    keep alive."""
    with conn.transaction():
        conn.execute(
            "UPDATE reply_jobs SET lease_until = now() + make_interval(secs => %s)"
            " WHERE message_id = ANY(%s) AND owner = %s AND NOT done",
            (lease.seconds, jobs, lease.node),
        )
        conn.execute(
            "UPDATE outbox SET lease_until = now() + make_interval(secs => %s)"
            " WHERE id = ANY(%s) AND owner = %s",
            (lease.seconds, outbox, lease.node),
        )


def request_cancel(chat_id: str, lease: Lease, conn: Conn) -> bool:
    """Ask the node running a reply in the chat to stop it; False if no other live node
    runs one."""
    rows = conn.execute(
        "UPDATE reply_jobs SET cancel_requested = TRUE WHERE chat_id = %s AND NOT done"
        " AND owner <> %s AND lease_until > now() RETURNING message_id",
        (chat_id, lease.node),
    ).fetchall()
    return bool(rows)


def take_cancel_requests(lease: Lease, conn: Conn) -> list[str]:
    """The chats in which another node asked this one to stop its reply (asked once)."""
    rows = conn.execute(
        "UPDATE reply_jobs SET cancel_requested = FALSE"
        " WHERE owner = %s AND cancel_requested AND NOT done RETURNING chat_id",
        (lease.node,),
    ).fetchall()
    return sorted({str(row["chat_id"]) for row in rows})


def release_jobs(lease: Lease, jobs: list[str], conn: Conn) -> None:
    """This node stops: its unfinished jobs may be taken over at once."""
    conn.execute(
        "UPDATE reply_jobs SET lease_until = now()"
        " WHERE message_id = ANY(%s) AND owner = %s AND NOT done",
        (jobs, lease.node),
    )


def take_over_jobs(
    lease: Lease, limit: int, mine: list[str], conn: Conn
) -> list[tuple[Row, list[Event]]]:
    """Close the jobs whose lease ran out (their node stopped mid-reply): each gets an
    assistant message saying the reply was interrupted, and its event. Rows another node is
    taking over at the same moment are skipped (SKIP LOCKED), so each job closes once; so
    are the jobs this node still runs (``mine``: their lease lapsed while it could not renew
    it, and it renews it now)."""
    closed: list[tuple[Row, list[Event]]] = []
    with conn.transaction():
        jobs = conn.execute(
            "SELECT message_id, chat_id FROM reply_jobs WHERE NOT done AND lease_until < now()"
            " AND NOT message_id = ANY(%s) ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED",
            (mine, limit),
        ).fetchall()
        for job in jobs:
            conn.execute(
                "UPDATE reply_jobs SET done = TRUE, owner = %s WHERE message_id = %s",
                (lease.node, job["message_id"]),
            )
            # Under the id the reply streamed under, so clients see that reply end.
            reply_id = reply_message_id(str(job["message_id"]))
            message, event = _insert_assistant(
                conn, str(job["chat_id"]), reply_id, INTERRUPTED_NOTE, lease
            )
            closed.append((message, [event]))
    return closed


def claim_outbox(lease: Lease, limit: int, mine: list[int], conn: Conn) -> list[Event]:
    """Claim, in order, the events whose owner's lease ran out (it crashed between commit
    and publish, or could not publish): this node publishes them now. The events this node
    published itself and has yet to clear (``mine``) are not published again."""
    rows = conn.execute(
        "UPDATE outbox SET owner = %s, lease_until = now() + make_interval(secs => %s)"
        " WHERE id IN (SELECT id FROM outbox WHERE lease_until < now()"
        " AND NOT id = ANY(%s) ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
        " RETURNING id, kind, key, data",
        (lease.node, lease.seconds, mine, limit),
    ).fetchall()
    events = [Event(int(r["id"]), ResourceKey(r["kind"], r["key"]), r["data"]) for r in rows]
    return sorted(events, key=lambda event: event.outbox_id)


def delete_outbox(ids: list[int], conn: Conn) -> None:
    conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", (ids,))
