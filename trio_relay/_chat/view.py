"""One open chat on screen: its messages, replies streaming in piece by piece, and when
what we sent has been answered (for the end of piped input)."""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from ..client import AgentError, Chunk, Completed, MessageAdded, ReplyCancelled, ReplyStarted, Reset
from .screen import Screen

__all__ = ["JSON", "ChatView"]

JSON = Any


class ChatView:
    """One open chat on screen: stored messages one each, a streamed reply growing on its
    line.

    It also tracks what we sent, for `wait_idle`: each line becomes a user message, and the
    agent answers the chat's user messages one after another, whoever sent them. So the
    answer to ours has come once the user messages waiting for an answer when it came,
    ours included, have had as many answers (stored replies, errors, stops).
    """

    def __init__(self, io: Screen, *, device_id: str | None, agent: str) -> None:
        self._io = io
        self._device_id = device_id
        self._agent = agent
        self._shown: set[str] = set()  # ids of messages printed in full or streamed
        self._streamed: set[str] = set()
        # Replies whose line other output broke into: the rest of their chunks are not
        # printed, and the whole reply is, once stored.
        self._interrupted: set[str] = set()
        self._open: str | None = None  # the reply whose line is being written
        self._sent: deque[str] = deque()  # sent, not yet seen back
        self._waiting = 0  # user messages seen and not answered yet
        self._answers: set[str] = set()  # ids of the replies seen ended
        self._anonymous_answers = 0  # the same, for replies without an id
        self._due = 0  # answers to be seen before what we sent is answered
        self._lot = trio.lowlevel.ParkingLot()

    def line(self, text: str, kind: str = "note") -> None:
        self._make_room()
        self._io.line(text, kind)

    def _make_room(self) -> None:
        """Before other output: on a terminal a streaming reply's live row simply stays below
        it; elsewhere the reply's line ends there (and the whole reply comes once stored)."""
        if not self._io.editing:
            self._close_line()

    def _close_line(self) -> None:
        if self._open is not None:
            self._interrupted.add(self._open)
            self._open = None
            self._io.stream_end()

    def sent(self, text: str) -> None:
        self._sent.append(text)

    def unsent(self, text: str) -> None:
        if text in self._sent:
            self._sent.remove(text)
            self._lot.unpark_all()

    def history(self, messages: list[JSON]) -> None:
        for message in messages:
            self.message(message)

    def message(self, message: JSON) -> None:
        if not isinstance(message, dict):
            return
        message_id = message.get("id")
        role = message.get("role")
        content = message.get("content")
        if message_id in self._shown:
            return
        ours = False
        if role == "user":
            self._waiting += 1
            if self._sent and content == self._sent[0]:
                self._sent.popleft()
                self._due = self._answer_count() + self._waiting
                ours = True
        elif role == "assistant":
            self._answered(message_id)
        self._lot.unpark_all()
        if isinstance(message_id, str):
            self._shown.add(message_id)
        if message_id in self._streamed and message_id not in self._interrupted:
            if self._open == message_id:
                self._open = None
                self._io.stream_end()
            return  # its text is on the screen already
        label, kind = self._label(message, ours)
        text = content if isinstance(content, str) else str(content)
        self._make_room()
        self._io.message(label, kind, text)

    def _label(self, message: dict[str, Any], ours: bool) -> tuple[str, str]:
        """Who wrote it: "You" for this device, else the sender's name (spec: a message
        without a sender is "You", as before senders existed)."""
        role = message.get("role")
        if role == "assistant":
            return self._agent, "agent"
        if role != "user":
            return str(role or "?"), "other"
        sender = message.get("sender")
        if not isinstance(sender, dict):
            return "You", "you"
        device_id = sender.get("deviceId")
        if self._device_id is not None and device_id == self._device_id:
            return "You", "you"
        if self._device_id is None and ours:
            return "You", "you"  # not paired: the line we just sent, come back
        name = sender.get("name")
        if isinstance(name, str) and name.strip():
            return name.strip(), "other"
        return "You", "you"

    def event(self, event: object) -> None:
        if isinstance(event, MessageAdded):
            self.message(event.message)
        elif isinstance(event, ReplyStarted):
            self._start_reply(event.message_id)
        elif isinstance(event, Chunk):
            if event.message_id in self._interrupted:
                return
            if self._open != event.message_id:
                self._start_reply(event.message_id)
            self._io.stream(event.text)
        elif isinstance(event, AgentError):
            if self._open is not None and self._open == event.message_id:
                self._open = None
                self._io.stream_end()
            self._answered(event.message_id)
            self.line(f"-- error: {event.error}", "error")
        elif isinstance(event, ReplyCancelled):
            if self._open is not None and event.message_id in (self._open, None):
                self._open = None
                self._io.stream_end()
            self._answered(event.message_id)
            self.line("-- reply stopped")
        elif isinstance(event, Reset):
            self.line("-- back in sync; messages missed meanwhile:")
            self.history(event.snapshot)
        elif isinstance(event, Completed):
            self.line("-- this chat's stream has ended")

    def _answered(self, message_id: object) -> None:
        """A reply ended: stored, failed or stopped (a stopped one may be stored after)."""
        if message_id in self._answers:
            return  # a stopped reply, now stored
        if isinstance(message_id, str):
            self._answers.add(message_id)
        else:
            self._anonymous_answers += 1
        self._waiting = max(0, self._waiting - 1)  # (a greeting answers nothing)
        self._lot.unpark_all()

    def _answer_count(self) -> int:
        return len(self._answers) + self._anonymous_answers

    def _start_reply(self, message_id: str) -> None:
        self._close_line()
        self._streamed.add(message_id)
        self._open = message_id
        self._io.stream_start(self._agent, "agent")

    def finish(self) -> None:
        self._close_line()

    async def wait_idle(self) -> None:
        """Until every line sent has come back and been answered."""
        while self._sent or self._answer_count() < self._due:
            await self._lot.park()

