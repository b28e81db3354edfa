"""`Replies`: the agent-reply runner that every store shares (run, stream, stop, fail).

A store keeps a chat's data; the runner answers its messages. The store stores a user's
message and hands the runner a `ReplyJob`; the runner keeps one queue per chat (one reply at
a time, in the order the messages were stored; different chats answer at once), runs the
agent the store names for the chat's model profile, and publishes what changes no rows
through ``publish``:

- ``{"type": "reply_started", "messageId": ...}`` when a reply starts,
- ``{"type": "chunk", "messageId": ..., "text": ...}`` for each piece the agent emits,
- ``{"type": "error", "messageId": ..., "error": ...}`` when the agent fails (the answer is
  then not stored) or its answer cannot be stored,
- ``{"type": "cancelled", "messageId": ...}`` when a reply is stopped (`Replies.cancel`).

The answer, or a stopped reply as far as it got with `STOPPED_NOTE`, is kept by
`ChatStore.store_reply`, which stores it and publishes its ``message`` under the store's own
consistency rule. A reply that ends with nothing stored (the agent failed, or its answer could
not be stored) is handed back through `ChatStore.reply_failed`, so a store that records its
jobs (PostgreSQL's, with leases) closes the job; a reply cut short by the runner's shutdown is
handed back through neither: it is the store's to recover (PostgreSQL's lease expires and
another node stores an "interrupted" note). A run's time limit is its agent's
(`CommandAgent.timeout`), reported as an `AgentError` like any failure of the agent.
"""

from __future__ import annotations

import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, Protocol

import attrs
import trio
from loguru import logger

from .._agents.agent import Agent, AgentError, HistoryItem, answers, run_reply
from .._errors import raise_single
from .._wire.protocol import JSON
from .backend import NotFound, chat_key

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "STOPPED_NOTE", "ChatStore", "Publish", "Replies", "ReplyJob", "open_replies",
    "reply_message_id",
]

#: What a stopped reply's stored message says (after the text it got to, if any).
STOPPED_NOTE: Final = "(stopped)"

#: Reply ids are derived from the user message's id in this namespace (`reply_message_id`).
_REPLY_IDS: Final = uuid.UUID("6d1f3c2a-4b5e-4f60-9a7b-8c9d0e1f2a3b")


def reply_message_id(user_message_id: str) -> str:
    """The id of the reply to a user message, the same wherever it is computed: a store that
    closes a reply its runner never finished (PostgreSQL's, after a node died) stores its
    note under the id the reply streamed under, so clients see that reply end; and a reply
    can never be stored twice (message ids are unique)."""
    return uuid.uuid5(_REPLY_IDS, user_message_id).hex


#: Publishes an event that changes no stored rows to a chat's feed: ``publish(chat_id, data)``.
Publish = Callable[[str, JSON], object]


class ChatStore(Protocol):
    """What the runner needs from a store."""

    def agent_for(self, model_profile_id: str) -> Agent:
        """The agent that answers in a chat of this model profile, now."""
        ...

    async def earlier_messages(self, chat_id: str, message_id: str) -> Sequence[HistoryItem]:
        """The chat's messages as the reply to ``message_id`` starts, in the order they were
        stored: all but that message and the user messages after it (they wait their turn)."""
        ...

    async def store_reply(self, job: ReplyJob, message_id: str, content: str) -> None:
        """Store the agent's answer to ``job`` as its chat's next (assistant) message under
        ``message_id``, and publish ``{"type": "message", ...}``; `NotFound` if the chat is
        gone (or the job is no longer this store's to answer)."""
        ...

    async def reply_failed(self, job: ReplyJob) -> None:
        """The reply to ``job`` ended with nothing stored (the agent failed, or the answer
        could not be stored); the error event is already published."""
        ...


@attrs.frozen
class ReplyJob:
    """A stored user message that waits for its answer."""

    chat_id: str
    #: The text the agent answers.
    content: str
    #: The chat's model profile: its agent is looked up when the reply starts.
    model_profile_id: str
    #: The id of the user's message: the messages before it are its history.
    message_id: str


@attrs.define(eq=False)
class _ChatQueue:
    """The replies waiting in one chat; it exists only while a reply is running or queued."""

    jobs: deque[ReplyJob] = attrs.Factory(deque)
    running: trio.CancelScope | None = None
    #: The id of the reply being written, for the ``cancelled`` event, and its text so far.
    message_id: str | None = None
    text: list[str] = attrs.Factory(list)


class Replies:
    """Runs the replies of one store's chats. Get one from `open_replies`."""

    def __init__(self, store: ChatStore, publish: Publish, nursery: trio.Nursery) -> None:
        self._store = store
        self._publish = publish
        self._nursery = nursery
        self._queues: dict[str, _ChatQueue] = {}

    @property
    def active_chats(self) -> frozenset[str]:
        """The chats with a reply running or queued (for tests and statistics)."""
        return frozenset(self._queues)

    def queue(self, job: ReplyJob) -> bool:
        """Queue the answer to a stored message; False if the chat's agent answers nothing.

        Call it in the order the messages were stored (under the store's write lock, say):
        that is the order their replies run in.
        """
        if not answers(self._store.agent_for(job.model_profile_id)):
            return False
        queue = self._queues.get(job.chat_id)
        if queue is None:
            queue = self._queues[job.chat_id] = _ChatQueue()
            self._nursery.start_soon(self._drain, job.chat_id, queue)
        queue.jobs.append(job)
        return True

    def cancel(self, chat_id: str) -> bool:
        """Stop the reply running in a chat, if one is (queued ones still run)."""
        queue = self._queues.get(chat_id)
        if queue is None or queue.running is None:
            return False
        queue.running.cancel()
        logger.bind(resource=str(chat_key(chat_id))).info("reply cancelled")
        return True

    def forget(self, chat_id: str) -> None:
        """The chat is gone: drop its queued replies and stop the running one, silently."""
        queue = self._queues.pop(chat_id, None)
        if queue is not None:
            queue.jobs.clear()
            if queue.running is not None:
                queue.running.cancel()

    async def _drain(self, chat_id: str, queue: _ChatQueue) -> None:
        """Run a chat's replies one at a time, then forget the chat's queue."""
        try:
            while queue.jobs:
                job = queue.jobs.popleft()
                with trio.CancelScope() as queue.running:
                    await self._reply(job, queue)
                # Stopped by `cancel`, not by `forget` (the chat is gone) nor a shutdown.
                stopped = queue.running.cancelled_caught and self._queues.get(chat_id) is queue
                message_id, text = queue.message_id, "".join(queue.text)
                # Nothing runs any more: a cancel from now on finds nothing to stop, also
                # while the stopped reply is being stored.
                queue.running = queue.message_id = None
                queue.text = []
                if stopped:
                    assert message_id is not None
                    self._publish(chat_id, {"type": "cancelled", "messageId": message_id})
                    await self._store_stopped(job, message_id, text)
        finally:
            # No checkpoint since the loop found the queue empty, so no job can be stranded.
            if self._queues.get(chat_id) is queue:
                del self._queues[chat_id]

    async def _store_stopped(self, job: ReplyJob, message_id: str, text: str) -> None:
        """A stopped reply is stored as far as it got, with a note that it was stopped (and
        only the note if it had not begun), so that it never shows as an empty message."""
        content = f"{text}\n\n{STOPPED_NOTE}" if text.strip() else STOPPED_NOTE
        try:
            await self._store.store_reply(job, message_id, content)
        except NotFound:
            pass  # the chat was deleted meanwhile
        except Exception:
            logger.bind(resource=str(chat_key(job.chat_id))).exception(
                "could not store the stopped reply"
            )
            await self._failed(job)

    async def _failed(self, job: ReplyJob) -> None:
        try:
            await self._store.reply_failed(job)
        except NotFound:
            pass
        except Exception:
            logger.bind(resource=str(chat_key(job.chat_id))).exception(
                "could not close the failed reply's job"
            )

    async def _reply(self, job: ReplyJob, queue: _ChatQueue) -> None:
        chat_id = job.chat_id
        resource = str(chat_key(chat_id))
        log = logger.bind(resource=resource)
        message_id = queue.message_id = reply_message_id(job.message_id)

        def emit(piece: str) -> None:
            queue.text.append(piece)
            self._publish(chat_id, {"type": "chunk", "messageId": message_id, "text": piece})

        async def history() -> Sequence[HistoryItem]:
            return await self._store.earlier_messages(chat_id, job.message_id)

        self._publish(chat_id, {"type": "reply_started", "messageId": message_id})
        agent = self._store.agent_for(job.model_profile_id)
        try:
            # The agent's own log lines name the chat too.
            with logger.contextualize(resource=resource):
                text = await run_reply(agent, job.content, emit, history)
        except AgentError as exc:
            # An expected failure (a command that exits non-zero, times out, is missing): one
            # line says what happened, and the chat is told.
            log.error("agent failed: {}", exc.detail)
            self._publish(chat_id, {"type": "error", "messageId": message_id, "error": str(exc)})
            await self._failed(job)
            return
        except Exception:
            # Handlers should set diagnose=False (as the CLI does): its variable dumps would
            # print the message's content.
            log.exception("agent failed")
            self._publish(
                chat_id, {"type": "error", "messageId": message_id, "error": "agent failed"}
            )
            await self._failed(job)
            return
        try:
            await self._store.store_reply(job, message_id, text)
        except NotFound:
            log.debug("chat deleted before its reply was stored")
        except Exception:
            log.exception("could not store the reply")
            self._publish(
                chat_id, {"type": "error", "messageId": message_id, "error": "reply not saved"}
            )
            await self._failed(job)


@asynccontextmanager
async def open_replies(store: ChatStore, publish: Publish) -> AsyncIterator[Replies]:
    """Run ``store``'s replies; leaving the block stops the ones still running or queued."""
    try:
        async with trio.open_nursery() as nursery:
            replies = Replies(store, publish, nursery)
            try:
                yield replies
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the block raised; `async with` raises it as itself.
        raise_single(group)
