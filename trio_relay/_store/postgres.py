"""`PostgresBackend`: the `Backend` on a shared PostgreSQL database, for a cluster of relays.

It stores what `SqliteBackend` stores, behaves the same, and answers through the same reply
runner (``replies``); the schema is created and migrated by the backend itself
(``postgres_schema``; the SQL is in ``postgres_sql``). psycopg's async connection does not run
under Trio, so its synchronous API runs in worker threads: a bounded connection pool, and a
`trio.CapacityLimiter` of the pool's size in front of it.

The consistency rule in one process is SQLite's: a write and its ``hub.publish`` happen under
``self._lock``, with no ``await`` between the commit and the publish, and a snapshot reads
``hub.version`` and its rows under the same lock, so a snapshot's version covers exactly the
changes of this process in its rows. (Across processes the bus numbers the events: a relay
with a broker takes each resource's position from the bus, not from this hub.) Streamed agent
output (``reply_started``, ``chunk``, ``cancelled``, ``error``) changes no rows and is
published at once, without the lock.

Across nodes:

- **Outbox.** Every stored change's event is written to the ``outbox`` table in the change's
  own transaction, with a lease. Right after the commit, under the lock, this node publishes
  it (a relay with a broker forwards it to the bus); a drain task then waits for
  `ChangeHub.flush` (the bus has it) and only then deletes the rows. While rows wait, their
  lease is renewed. Rows whose lease ran out were left by a node that crashed between the
  commit and the publish (or could not publish for that long): any node claims them after
  that short delay (``lease`` seconds) and publishes them, in order. An event is therefore
  published at least once; twice only when a node dies after publishing and before deleting.
- **Reply jobs.** The node that stores a user message runs its reply, recorded in the same
  transaction as a ``reply_jobs`` row it owns with a lease, renewed while the reply runs. A
  job whose lease ran out (its node died or stopped) is closed by any node, which stores an
  assistant message saying the reply was interrupted (`postgres_sql.INTERRUPTED_NOTE`). A
  reply is stored only together with closing its job, and only by the job's owner, so a chat
  never shows two replies, and never one stuck running. A node that stops releases its jobs
  at once; a node id is new each time the backend opens, so a restarted node takes over its
  own earlier jobs like any other.
- **Nonces.** A send with a ``nonce`` already stored in the chat stores and answers nothing
  (a unique index, so also when two nodes get the same retry at once).

Faults: an unreachable database at start raises `DatabaseUnavailable`, naming host, port and
database (never the password). While running, a call that cannot reach the database fails
with `DatabaseUnavailable` (a `BackendError`, so the client gets an error frame) and the pool
reconnects by itself once the database is back; a statement that runs longer than
``statement_timeout`` is cancelled by the server, and a call whose server stops answering
altogether (frozen) has its connection cut after ``call_timeout`` (real time, by a watchdog
thread): both fail with a clear `BackendError`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Final, TypeVar

import attrs
import outcome
import psycopg
import trio
from loguru import logger
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from .._agents.agent import Agent, HistoryItem, answers
from .._agents.echo import EchoAgent
from .._errors import raise_single
from .._wire.protocol import JSON, ResourceKey
from . import postgres_sql as sql
from . import rules
from .backend import MODEL_PROFILES_KEY, BackendError, Snapshot, chat_key, project_key
from .group_commit import GroupCommit, PendingWrite
from .hub import ChangeHub, HubFeeds
from .postgres_schema import migrate
from .replies import Replies, ReplyJob, open_replies

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["DatabaseUnavailable", "PostgresBackend", "open_postgres_backend"]

DEFAULT_POOL_SIZE: Final = 8
#: Seconds a statement may run before the server cancels it.
DEFAULT_STATEMENT_TIMEOUT: Final = 10.0
#: Seconds a whole call may take before its connection is cut (a server that stopped
#: answering); also the bound on waiting for a free connection and on connecting.
DEFAULT_CALL_TIMEOUT: Final = 15.0
#: Seconds a node's claim on a reply job or an unpublished event holds without renewal.
DEFAULT_LEASE: Final = 10.0
#: How long the retry of a call whose connection was found dead waits for a fresh one.
RETRY_WAIT: Final = 2.0
#: Expired jobs or events claimed per pass.
_CLAIM_BATCH: Final = 100

_T = TypeVar("_T")


class DatabaseUnavailable(BackendError):
    """The PostgreSQL database cannot be reached (or stopped answering); ``str()`` is safe to
    show: it names host, port and database, never the password."""


@attrs.frozen
class _Where:
    """The database's address, for messages; built without the password."""

    host: str
    port: str
    database: str
    password: str | None

    @classmethod
    def of(cls, dsn: str) -> _Where:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            raise BackendError("the database URL is not a valid PostgreSQL conninfo") from None
        return cls(
            str(params.get("host") or os.environ.get("PGHOST") or "localhost"),
            str(params.get("port") or os.environ.get("PGPORT") or "5432"),
            str(params.get("dbname") or params.get("user") or os.environ.get("PGDATABASE") or "?"),
            None if params.get("password") is None else str(params["password"]),
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}, database {self.database!r}"

    def scrub(self, text: str) -> str:
        """``text`` (a driver's message) without the password, and on one line."""
        if self.password:
            text = text.replace(self.password, "***")
        return " ".join(text.split())


class _Watchdog:
    """Cuts the connection of a call that takes longer than ``limit`` seconds of real time:
    a frozen server never answers, and libpq has no client-side timeout of its own. Real
    time, in a thread of its own, so that a test's mock clock never fires it."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._calls: dict[int, tuple[float, int]] = {}  # call -> (deadline, socket fd)
        self._cut: set[int] = set()
        self._mutex = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="trio-relay-pg-watchdog", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    @contextmanager
    def watch(self, conn: sql.Conn) -> Iterator[Callable[[], bool]]:
        """Watch one call on ``conn``; yields a function telling whether it was cut."""
        call = id(threading.current_thread())
        with self._mutex:
            self._calls[call] = (time.monotonic() + self.limit, conn.fileno())
        try:
            yield lambda: call in self._cut
        finally:
            with self._mutex:
                self._calls.pop(call, None)
                self._cut.discard(call)

    def _run(self) -> None:
        while not self._stopped.wait(min(0.25, self.limit / 4)):
            now = time.monotonic()
            with self._mutex:
                for call, (deadline, fd) in list(self._calls.items()):
                    if now > deadline and call not in self._cut:
                        self._cut.add(call)
                        try:
                            # A shutdown wakes the blocked read; libpq then reports the
                            # connection lost, and the pool discards it.
                            with socket.socket(fileno=os.dup(fd)) as sock:
                                sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass


class PostgresBackend(HubFeeds):
    """The `Backend` over a PostgreSQL database. Get one from `open_postgres_backend`.

    Besides the protocol's methods it offers the host's side, as `SqliteBackend` does:
    `rename_chat`, `delete_chat` and `set_model_profiles`, each pushed to the relevant feed.
    Agents are chosen as in `SqliteBackend` (``agents``, else ``agent``).
    """

    #: The runner of this backend's replies, set by `open_postgres_backend`.
    _replies: Replies

    def __init__(
        self,
        pool: ConnectionPool[sql.Conn],
        *,
        limiter: trio.CapacityLimiter,
        agent: EchoAgent,
        where: _Where,
        lease: float,
        watchdog: _Watchdog,
        statement_timeout: float,
    ) -> None:
        self.hub = ChangeHub()
        self.agent = agent
        self.agents: dict[str, Agent] = {}
        #: This backend's node id: the owner of its jobs and events (new at every open).
        self.node = uuid.uuid4().hex
        self.where = where
        self._pool = pool
        self._limiter = limiter
        self._lease = sql.Lease(self.node, lease)
        self._watchdog = watchdog
        self._statement_timeout = statement_timeout
        self._lock = trio.Lock()
        self._closed = False
        self._healthy = True
        # Projects are only ever seeded: read once. (The profiles are not cached: another
        # node may change them.)
        self._projects: list[JSON] | None = None
        # Reply jobs this node runs or has queued (user message id -> chat id), and the ids
        # of outbox rows it published but has not deleted yet: their leases are renewed.
        self._jobs: dict[str, str] = {}
        self._unflushed: list[int] = []
        self._undeleted: set[int] = set()
        self._forwarded: set[int] = set()  # of those, the ones handed to a broker
        self._drain_wanted = trio.Event()
        # Messages waiting for the next batch (`_write_batched`); recorded jobs no agent runs.
        self._batches = GroupCommit[sql.Conn](self._lock, self._store, lambda: self._closed)
        self._jobs_to_close: list[str] = []

    @property
    def healthy(self) -> bool:
        """False since a call found the database unreachable, until one succeeds again
        (``/healthz`` may answer 503 meanwhile)."""
        return self._healthy

    # --- running SQL in a worker thread ---

    async def _run(self, fn: Callable[[sql.Conn], _T], *, retry: bool = False) -> _T:
        if self._closed:
            raise BackendError("backend is closed")
        return await self._run_anyway(fn, retry=retry)

    async def _run_anyway(self, fn: Callable[[sql.Conn], _T], *, retry: bool = False) -> _T:
        """``fn`` in a worker thread; ``retry``: it may run twice (a read, or a write that
        cannot take effect twice), so a stale connection costs no error."""
        # Abandoned when cancelled: the thread finishes by itself (the watchdog bounds it),
        # and a write it commits meanwhile is not lost: its events wait in the outbox.
        try:
            result = await trio.to_thread.run_sync(
                self._call, fn, retry, limiter=self._limiter, abandon_on_cancel=True
            )
        except DatabaseUnavailable:
            self._healthy = False
            raise
        self._healthy = True
        return result

    def _call(self, fn: Callable[[sql.Conn], _T], retry: bool) -> _T:
        """In the worker thread: ``fn`` on a pooled connection, its failures made clear. A
        call that may be retried and finds its connection broken (the server restarted) is
        tried once more on a fresh one."""
        for attempt in (1, 2):
            try:
                return self._call_once(fn, retrying=attempt == 2)
            except _Stale as stale:
                if not retry or attempt == 2:
                    raise stale.error from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _call_once(self, fn: Callable[[sql.Conn], _T], *, retrying: bool = False) -> _T:
        where = self.where
        try:
            # While the database is known to be down, fail fast rather than wait out the
            # whole call timeout for a connection (the pool keeps reconnecting meanwhile);
            # so does the retry after a connection found dead: a server that restarted
            # answers a fresh connection at once, one that is gone will not.
            short = not self._healthy or retrying
            wait = min(RETRY_WAIT if retrying else 1.0, self._watchdog.limit) if short else (
                self._watchdog.limit
            )
            with self._pool.connection(timeout=wait) as conn:
                with self._watchdog.watch(conn) as was_cut:
                    try:
                        return fn(conn)
                    except psycopg.errors.QueryCanceled:
                        raise BackendError(
                            f"the database did not answer within {self._statement_timeout:g}"
                            " seconds (statement_timeout)"
                        ) from None
                    except psycopg.OperationalError as exc:
                        if was_cut():
                            raise DatabaseUnavailable(
                                f"the database at {where} did not answer within"
                                f" {self._watchdog.limit:g} seconds"
                            ) from None
                        if conn.broken:
                            # The server went away (or restarted): every pooled connection
                            # is likely stale; replace them all.
                            self._pool.drain()
                            raise _Stale(DatabaseUnavailable(
                                f"lost the database at {where}: {where.scrub(str(exc))}"
                            )) from None
                        raise
        except PoolTimeout:
            raise DatabaseUnavailable(
                f"cannot reach the database at {where} (no connection within {wait:g}"
                " seconds)"
            ) from None
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(
                f"lost the database at {where}: {where.scrub(str(exc))}"
            ) from None

    async def _snapshot(
        self, key: ResourceKey, read: Callable[[sql.Conn], list[JSON]]
    ) -> Snapshot:
        async with self._lock:
            # This node's writes wait for the lock, so the version still matches the rows.
            version = self.hub.version(key)
            items = await self._run(read, retry=True)
        return Snapshot(items, version)

    # --- publishing stored changes (under the lock, right after their commit) ---

    def _emit(self, events: Sequence[sql.Event]) -> None:
        for event in events:
            if event.data is None:
                self.hub.end(event.key)
            else:
                self.hub.publish(event.key, event.data)
            self._unflushed.append(event.outbox_id)
            self._undeleted.add(event.outbox_id)
            if self.hub.outlet is not None:
                self._forwarded.add(event.outbox_id)
        if events:
            self._drain_wanted.set()

    async def _drain(self) -> None:
        """Delete the outbox rows of published events once they have left this process."""
        while True:
            await self._drain_wanted.wait()
            self._drain_wanted = trio.Event()
            ids, self._unflushed = self._unflushed, []
            try:
                await self._clear(ids)
            except Exception as exc:
                # Kept, and renewed: tried again with the next event or the next pass.
                logger.opt(exception=exc).warning("could not clear {} outbox rows", len(ids))
                self._unflushed[:0] = ids

    async def _clear(self, ids: list[int]) -> None:
        """Delete the rows of events that have left this process. An event that went to a
        broker which is gone now (its relay closed) may not have reached it: its row is left
        to expire, and a node publishes it again (at least once, never lost)."""
        flushing = self.hub.flusher is not None
        await self.hub.flush()
        done = ids if flushing else [i for i in ids if i not in self._forwarded]
        if done:
            await self._run_anyway(partial(sql.delete_outbox, done), retry=True)
        # Either cleared, or left to expire: no longer this node's to renew.
        self._undeleted.difference_update(ids)
        self._forwarded.difference_update(ids)

    async def _maintain(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every third of a lease: renew this node's claims, close the jobs of nodes that
        stopped, and publish the events they left unpublished."""
        task_status.started()
        while True:
            try:
                await self._maintain_once()
            except Exception as exc:
                logger.opt(exception=exc).warning("lease upkeep failed: {}", exc)
            await trio.sleep(self._lease.seconds / 3)

    async def _maintain_once(self) -> None:
        if self._unflushed:  # a clear that failed: try again now
            self._drain_wanted.set()
        while self._jobs_to_close:
            close = partial(sql.close_job, self._jobs_to_close[0], self._lease)
            await self._run_anyway(close, retry=True)
            self._jobs_to_close.pop(0)
        jobs, rows = list(self._jobs), sorted(self._undeleted)
        if jobs or rows:
            renew = partial(sql.renew_leases, self._lease, jobs, rows)
            await self._run_anyway(renew, retry=True)
        if jobs:
            for chat_id in await self._run_anyway(partial(sql.take_cancel_requests, self._lease)):
                self._replies.cancel(chat_id)
        async with self._lock:
            closed = await self._run_anyway(
                partial(sql.take_over_jobs, self._lease, _CLAIM_BATCH, list(self._jobs))
            )
            for message, events in closed:
                logger.bind(resource=str(chat_key(str(message["chatId"])))).warning(
                    "a reply was interrupted (its relay stopped, or could not renew its"
                    " lease); marked as such"
                )
                self._emit(events)
        async with self._lock:
            mine = sorted(self._undeleted)
            left = await self._run_anyway(
                partial(sql.claim_outbox, self._lease, _CLAIM_BATCH, mine)
            )
            if left:
                logger.warning("publishing {} events a stopped relay left unpublished", len(left))
            self._emit(left)

    # --- reads ---

    async def list_projects(self) -> list[JSON]:
        if self._projects is None:
            self._projects = await self._run(sql.select_projects, retry=True)
        else:
            await trio.lowlevel.checkpoint()
        return [dict(project) for project in self._projects]

    async def get_model_profiles(self) -> Snapshot:
        return await self._snapshot(MODEL_PROFILES_KEY, sql.select_profiles)

    async def list_chats(self, project_id: str) -> Snapshot:
        return await self._snapshot(project_key(project_id), partial(sql.select_chats, project_id))

    async def get_history(self, chat_id: str) -> Snapshot:
        return await self._snapshot(chat_key(chat_id), partial(sql.select_history, chat_id))

    # --- writes ---

    async def _write_batched(
        self, write: Callable[[sql.Conn], _T], then: Callable[[_T], None], *, retry: bool
    ) -> _T:
        """Store a message together with the others sent meanwhile: one transaction, one
        round trip to a worker thread and one commit (so one WAL flush) for all of them,
        each in a savepoint of its own (group commit, as in the SQLite store). ``then`` runs
        right after the commit, under the lock, in the order of the writes (it publishes).
        The first writer commits for everyone waiting; cancelling a caller does not undo its
        write. A batch of writes that may all be retried (``retry``: sends with a nonce) is
        tried once more when it meets a stale connection."""
        return await self._batches.write(write, then, retry=retry)

    async def _store(self, batch: list[PendingWrite[sql.Conn]]) -> list[outcome.Outcome[object]]:
        """One batch in one transaction; each write's own failure made clear."""
        writes = [pending.write for pending in batch]
        retry = all(pending.retry for pending in batch)
        try:
            results = await self._run_anyway(partial(sql.run_batch, writes), retry=retry)
        except Exception as exc:
            error = exc if isinstance(exc, BackendError) else BackendError(
                f"the message could not be stored: {exc}"
            )
            return [outcome.Error(error) for _ in batch]
        return [
            outcome.Error(self._clear_error(result.error))
            if isinstance(result, outcome.Error) else result
            for result in results
        ]

    def _clear_error(self, error: BaseException) -> BaseException:
        """A write's own failure in a batch, made clear as `_call` makes a call's."""
        if isinstance(error, psycopg.errors.QueryCanceled):
            return BackendError(
                f"the database did not answer within {self._statement_timeout:g} seconds"
                " (statement_timeout)"
            )
        if isinstance(error, psycopg.Error):
            detail = self.where.scrub(str(error))
            return BackendError(f"the message could not be stored: {detail}")
        return error

    async def send_message(
        self, chat_id: str, message: JSON, *, sender: JSON | None = None,
        nonce: str | None = None,
    ) -> None:
        """Store a user message, with ``sender`` (any JSON, stored as it is), and queue the
        chat's agent to answer it on this node. A ``nonce`` already stored in the chat (a
        retried send, on any node) stores and answers nothing."""
        content = rules.message_text(message)
        nonce = rules.checked_nonce(nonce)
        try:
            sender_text = None if sender is None else json.dumps(sender, ensure_ascii=False)
        except (TypeError, ValueError):
            raise BackendError("sender must be JSON") from None
        agents = dict(self.agents)

        def agent_answers(profile: str) -> bool:
            return answers(rules.agent_for(profile, agents, self.agent))

        write = partial(
            sql.insert_user_message, chat_id, sql.new_id(), content, sender_text, nonce,
            agent_answers, self._lease,
        )

        def stored(result: tuple[sql.Row, sql.Row, bool, list[sql.Event], bool]) -> None:
            message, chat, new, events, recorded = result
            if not new:
                return  # a retry: its first send was pushed and answered
            self._emit(events)
            # Queued under the lock, so replies run in the order the messages were stored.
            job = ReplyJob(chat_id, content, str(chat["modelProfileId"]), str(message["id"]))
            if self._replies.queue(job):
                self._jobs[job.message_id] = chat_id
            elif recorded:  # the profile's agent changed meanwhile: it answers nothing now
                self._jobs_to_close.append(job.message_id)

        await self._write_batched(write, stored, retry=nonce is not None)
        logger.bind(resource=str(chat_key(chat_id))).debug("message of {} characters", len(content))

    async def create_chat(
        self,
        project_id: str,
        title: str | None = None,
        model_profile_id: str | None = None,
    ) -> JSON:
        profiles = [p["id"] for p in (await self.get_model_profiles()).items]
        title, model_profile_id = rules.new_chat(title, model_profile_id, profiles)
        write = partial(sql.insert_chat, project_id, title, model_profile_id, self._lease)
        async with self._lock:
            chat, events = await self._run(write)
            self._emit(events)
        logger.info("created chat {} in project {}", chat["id"], project_id)
        return chat

    async def rename_chat(self, chat_id: str, title: str) -> JSON:
        """Retitle a chat and return it; pushes ``chat_renamed`` to its project's feed."""
        if not isinstance(title, str) or not title.strip():
            raise BackendError("title must be a non-empty string")
        async with self._lock:
            chat, events = await self._run(
                partial(sql.update_chat_title, chat_id, title.strip(), self._lease)
            )
            self._emit(events)
        return chat

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the reply running in a chat (queued ones still run); push ``cancelled``.

        A reply that another node runs is stopped by that node at its next look at its jobs
        (within a third of the lease); this returns True once it is asked to."""
        await self._run(partial(sql.select_chat, chat_id=chat_id), retry=True)
        if self._replies.cancel(chat_id):
            return True
        return await self._run(partial(sql.request_cancel, chat_id, self._lease), retry=True)

    async def delete_chat(self, chat_id: str) -> None:
        """Delete a chat and its messages, and stop its replies; pushes ``chat_deleted``."""
        async with self._lock:
            _, events = await self._run(partial(sql.delete_chat, chat_id, self._lease))
            self._emit(events)  # chat_deleted, and the end of the chat's own feeds
            self._replies.forget(chat_id)
            for message_id in [m for m, c in self._jobs.items() if c == chat_id]:
                del self._jobs[message_id]
        logger.info("deleted chat {}", chat_id)

    async def set_model_profiles(
        self, profiles: list[JSON], agents: Mapping[str, Agent] | None = None
    ) -> None:
        """As `SqliteBackend.set_model_profiles`: replace all model profiles and push them.
        The agents are this node's: each node of a cluster is given its own."""
        checked = rules.checked_profiles(profiles)
        rules.check_agents(checked, agents)
        async with self._lock:
            events = await self._run(partial(sql.store_profiles, checked, self._lease))
            if agents is not None:
                self.agents = dict(agents)
            self._emit(events)
        logger.info("model profiles replaced ({} profiles)", len(checked))

    # --- replies ---

    def agent_for(self, model_profile_id: str) -> Agent:
        """The agent that answers in a chat of the given model profile."""
        return rules.agent_for(model_profile_id, self.agents, self.agent)


@attrs.frozen
class _ChatStore:
    """What the reply runner needs of a `PostgresBackend` (`replies.ChatStore`)."""

    backend: PostgresBackend

    def agent_for(self, model_profile_id: str) -> Agent:
        return self.backend.agent_for(model_profile_id)

    def publish(self, chat_id: str, data: JSON) -> None:
        """Streamed agent output changes no rows: published without the lock."""
        self.backend.hub.publish(chat_key(chat_id), data)

    async def earlier_messages(self, chat_id: str, message_id: str) -> Sequence[HistoryItem]:
        return await self.backend._run(
            partial(sql.select_earlier, chat_id, message_id), retry=True
        )

    async def store_reply(self, job: ReplyJob, message_id: str, content: str) -> None:
        backend = self.backend
        write = partial(
            sql.insert_reply, job.chat_id, job.message_id, message_id, content, backend._lease
        )
        try:
            async with backend._lock:
                # Retried on a stale connection: the reply's id is unique, so it cannot be
                # stored twice.
                _, events = await backend._run(write, retry=True)
                backend._emit(events)
        finally:
            backend._jobs.pop(job.message_id, None)

    async def reply_failed(self, job: ReplyJob) -> None:
        backend = self.backend
        backend._jobs.pop(job.message_id, None)
        await backend._run(partial(sql.close_job, job.message_id, backend._lease), retry=True)


def _connect_and_migrate(dsn: str, where: _Where, connect_timeout: float) -> int:
    try:
        timeout = max(1, round(connect_timeout))
        with psycopg.connect(dsn, autocommit=True, connect_timeout=timeout) as conn:
            return migrate(conn)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot reach the database at {where}: {where.scrub(str(exc))}"
        ) from None


@asynccontextmanager
async def open_postgres_backend(
    dsn: str,
    *,
    agent: EchoAgent | None = None,
    pool_size: int = DEFAULT_POOL_SIZE,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
    lease: float = DEFAULT_LEASE,
) -> AsyncIterator[PostgresBackend]:
    """Connect to the database at ``dsn`` (a ``postgresql://`` URL or a conninfo string),
    create or migrate its schema (seeding a new one), and run this node's replies, leases and
    outbox. Raises `DatabaseUnavailable` if the database cannot be reached.

    ``pool_size`` bounds the connections (and worker threads) this node uses;
    ``statement_timeout`` (seconds) is set on every connection; ``call_timeout`` bounds a
    whole call in real time (a server that stopped answering); ``lease`` is how long a job
    or an unpublished event of this node survives it without renewal: the delay before
    another node takes over after a crash.

    Leaving the context cancels the replies still running and releases their jobs (any node
    then closes them as interrupted), and closes the pool.
    """
    if pool_size < 1:
        raise ValueError("pool_size must be at least 1")
    if not 0 < statement_timeout <= call_timeout:
        raise ValueError("statement_timeout must be positive and at most call_timeout")
    if lease <= 0:
        raise ValueError("lease must be positive")
    where = _Where.of(dsn)
    await trio.to_thread.run_sync(_connect_and_migrate, dsn, where, call_timeout)
    pool: ConnectionPool[sql.Conn] = ConnectionPool(
        dsn,
        min_size=1,
        max_size=pool_size,
        open=False,
        timeout=call_timeout,
        reconnect_timeout=0,  # keep trying to reconnect for as long as it takes
        name="trio-relay",
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "connect_timeout": max(1, round(call_timeout)),
            "application_name": "trio-relay",
            "options": f"-c statement_timeout={round(statement_timeout * 1000)}",
        },
    )
    await trio.to_thread.run_sync(partial(pool.open, wait=False))
    watchdog = _Watchdog(call_timeout)
    watchdog.start()
    limiter = trio.CapacityLimiter(pool_size)
    logger.info("postgres backend opened at {}", where)
    backend = PostgresBackend(
        pool, limiter=limiter, agent=agent or EchoAgent(), where=where, lease=lease,
        watchdog=watchdog, statement_timeout=statement_timeout,
    )
    try:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    store = _ChatStore(backend)
                    async with open_replies(store, store.publish) as replies:
                        backend._replies = replies
                        nursery.start_soon(backend._drain)
                        await nursery.start(backend._maintain)
                        try:
                            yield backend
                        finally:
                            backend._closed = True
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise_single(group)
    finally:
        with trio.CancelScope(shield=True):
            await _close(backend, pool, watchdog)
        logger.info("postgres backend at {} closed", where)


async def _close(
    backend: PostgresBackend, pool: ConnectionPool[sql.Conn], watchdog: _Watchdog
) -> None:
    """Release this node's jobs (another node, or this one restarted, closes them as
    interrupted at once) and clear what it published; then close the pool."""
    try:
        jobs = list(backend._jobs)
        if jobs:
            release = partial(sql.release_jobs, backend._lease, jobs)
            await backend._run_anyway(release, retry=True)
        ids = sorted(backend._undeleted)
        if ids:
            await backend._clear(ids)
    except Exception as exc:
        # Their leases run out instead: the same outcome, a little later.
        logger.opt(exception=exc).warning("could not release this relay's jobs and events")
    finally:
        try:
            await trio.to_thread.run_sync(partial(pool.close, timeout=1.0))
        finally:
            watchdog.stop()


class _Stale(Exception):
    """A pooled connection was found broken before anything was done on it (maybe)."""

    def __init__(self, error: DatabaseUnavailable) -> None:
        super().__init__(str(error))
        self.error = error
