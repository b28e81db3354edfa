"""The chat client proper, once signed in: the open chat, the numbered list of chats, the
commands, and the lines typed handled in order while typing goes on."""

from __future__ import annotations

import argparse

import trio

from ..client import (
    AuthFailed,
    ConnectionState,
    RelayClient,
    RelayClientError,
    RequestRejected,
    SubscriptionFailed,
)
from .commands import HELP, Command, is_quit, parse
from .screen import Screen
from .terminal import TerminalScreen
from .text import shorten
from .view import JSON, ChatView

__all__ = ["Session"]


def _title(chat: JSON) -> str:
    title = chat.get("title") if isinstance(chat, dict) else None
    return str(title) if title else str(chat["id"])


class Session:
    """The chat client proper: the open chat, the numbered list of chats, the commands."""

    def __init__(self, client: RelayClient, args: argparse.Namespace, io: Screen, *,
                 interactive: bool, device_id: str | None) -> None:
        self._client = client
        self._args = args
        self._io = io
        self._interactive = interactive
        self._device_id = device_id
        self._listing: list[tuple[JSON, JSON]] = []  # (project, chat), numbered from 1
        self._chat: JSON | None = None
        self._project_id: str | None = None
        self._view: ChatView | None = None
        self._follow_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._leave = trio.CancelScope()  # cancelled by /quit

    # --- chats ------------------------------------------------------------------------------

    async def _list_chats(self) -> list[tuple[JSON, JSON]]:
        """Every project's chats, each project subscribed just long enough for its list."""
        chats: list[tuple[JSON, JSON]] = []
        lines: list[tuple[str, str]] = []
        for project in self._client.projects:
            if not isinstance(project, dict) or not isinstance(project.get("id"), str):
                continue
            lines.append((f"  {project.get('name', project['id'])} ({project['id']})", "text"))
            try:
                async with self._client.subscribe("project", project["id"]) as listing:
                    found = [c for c in listing.snapshot
                             if isinstance(c, dict) and isinstance(c.get("id"), str)]
            except RequestRejected as exc:
                lines.append((f"    (its chats could not be listed: {exc})", "error"))
                continue
            for chat in found:
                chats.append((project, chat))
                current = self._chat is not None and chat["id"] == self._chat["id"]
                lines.append((f"    {len(chats)}) {_title(chat)} ({chat['id']})"
                              + ("  <- open" if current else ""), "text"))
        self._listing = chats
        self._line("Projects:", "text")
        for text, kind in lines:
            self._line(text, kind)
        if not chats:
            self._line("-- no chats yet: /new TITLE creates one")
        return chats

    def _line(self, text: str, kind: str = "note") -> None:
        if self._view is not None:
            self._view.line(text, kind)
        else:
            self._io.line(text, kind)

    def _agent_name(self, chat: JSON) -> str:
        profile_id = chat.get("modelProfileId") if isinstance(chat, dict) else None
        for profile in self._client.model_profiles:
            if isinstance(profile, dict) and profile.get("id") == profile_id and isinstance(
                profile.get("name"), str
            ):
                return str(profile["name"])
        return str(profile_id) if profile_id else "Agent"

    async def _open(self, chat: JSON, project_id: str | None) -> None:
        """Follow ``chat`` instead of the open one, once its subscription stands (if it fails
        the open chat stays, and the error is raised)."""
        assert self._nursery is not None
        await self._nursery.start(self._follow, chat, project_id)

    async def _follow(self, chat: JSON, project_id: str | None, *,
                      task_status: trio.TaskStatus[None]) -> None:
        chat_id = chat["id"]
        view = ChatView(self._io, device_id=self._device_id, agent=self._agent_name(chat))
        with trio.CancelScope() as scope:
            try:
                async with self._client.subscribe("chat", chat_id) as live:
                    # No checkpoint from here to the loop: the switch is seen whole.
                    if self._follow_scope is not None:
                        self._follow_scope.cancel()
                    if self._view is not None:
                        self._view.finish()
                    self._chat, self._project_id = chat, project_id
                    self._view, self._follow_scope = view, scope
                    view.line(f"-- {_title(chat)} ({chat_id}): type a message and press Enter;"
                              " /help for commands")
                    view.history(live.snapshot)
                    self._io.set_prompt(shorten(_title(chat), 24) + "> ")
                    task_status.started()
                    async for event in live:
                        view.event(event)
            except SubscriptionFailed as exc:
                view.line(f"-- this chat's subscription ended: {exc}; /chats and /open to go"
                          " on", "error")
            finally:
                view.finish()

    def _project_of(self, chat_id: str) -> str | None:
        for project, chat in self._listing:
            if chat["id"] == chat_id:
                return str(project["id"])
        return None

    # --- commands ---------------------------------------------------------------------------

    async def _command(self, name: str, argument: str) -> None:
        if name == "chats":
            await self._list_chats()
        elif name == "open":
            await self._open_command(argument)
        elif name == "new":
            await self._new(argument)
        elif name == "stop":
            if self._chat is None:
                self._line("-- no chat is open")
            elif not await self._client.cancel_reply(self._chat["id"]):
                self._line("-- no reply is running")
        elif name == "help":
            self._line(HELP)
        else:
            self._line(f"-- unknown command /{name} (nothing was sent): /help lists the"
                       " commands; // sends a line starting with /", "error")

    async def _open_command(self, argument: str) -> None:
        if not argument:
            self._line("-- /open N or /open ID: N from /chats, or a chat's id", "error")
            return
        chat: JSON | None = None
        project_id: str | None = None
        if argument.isdigit():
            number = int(argument)
            if not 1 <= number <= len(self._listing):
                self._line(f"-- no chat number {number}: /chats lists them", "error")
                return
            project, chat = self._listing[number - 1]
            project_id = project["id"]
        else:
            for project, known in self._listing:
                if argument in (known["id"], _title(known)):
                    chat, project_id = known, project["id"]
                    break
            else:
                chat = {"id": argument}  # one we have not listed: the relay will say
        try:
            await self._open(chat, project_id)
        except RequestRejected as exc:
            self._line(f"-- cannot open {argument}: {exc}", "error")

    async def _new(self, title: str) -> None:
        project_id = self._project_id
        if project_id is None:
            projects = [p for p in self._client.projects
                        if isinstance(p, dict) and isinstance(p.get("id"), str)]
            if not projects:
                self._line("-- there is no project to create a chat in", "error")
                return
            project_id = projects[0]["id"]
        chat = await self._client.create_chat(project_id, title=title.strip() or None)
        if not isinstance(chat, dict) or not isinstance(chat.get("id"), str):
            self._line(f"-- the relay answered with no chat: {chat!r}", "error")
            return
        self._listing.append(({"id": project_id}, chat))
        await self._open(chat, project_id)

    async def _send(self, text: str) -> None:
        view, chat = self._view, self._chat
        if view is None or chat is None:
            self._line("-- no chat is open: /chats and /open to choose one", "error")
            return
        view.sent(text)
        try:
            await self._client.send(chat["id"], text)
        except RelayClientError:
            view.unsent(text)
            raise

    async def _handle(self, line: str) -> None:
        """One line typed: a command, or a message to send."""
        wanted = parse(line)
        try:
            if isinstance(wanted, Command):
                await self._command(wanted.name, wanted.argument)
            else:
                await self._send(wanted.text)
        except AuthFailed:
            raise
        except RelayClientError as exc:
            if self._client.state is ConnectionState.CLOSED:
                raise
            what = line if isinstance(wanted, Command) else "not sent"
            self._line(f"-- {what}: {exc}", "error")

    async def _work(self, lines: trio.MemoryReceiveChannel[str]) -> None:
        """Lines in the order typed, one at a time, while typing goes on."""
        async with lines:
            async for line in lines:
                if is_quit(line):
                    self._leave.cancel()  # in its turn: what was typed before it is done
                    return
                await self._handle(line)

    async def _show_states(self) -> None:
        async for state in self._client.state_changes():
            if state is ConnectionState.RECONNECTING:
                close = self._client.last_close
                why = f" ({close.code} {close.reason})".rstrip() if close else ""
                self._io.notice(f"-- connection lost{why}; reconnecting")
            elif state is ConnectionState.CONNECTED and self._client.last_close is not None:
                self._io.notice("-- reconnected")

    async def _choose(self, chats: list[tuple[JSON, JSON]]) -> tuple[JSON, JSON] | None:
        """Ask which chat; None at end of input."""
        while True:
            answer = await self._io.ask(f"Chat [1-{len(chats)}, default 1]: ")
            if answer is None:
                return None
            answer = answer.strip() or "1"
            if answer.isdigit() and 1 <= int(answer) <= len(chats):
                return chats[int(answer) - 1]
            self._io.line(f"No chat {answer!r}.", "error")

    # --- the whole session ------------------------------------------------------------------

    async def run(self) -> int:
        """The whole session; returns the exit status."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._show_states)
            if isinstance(self._io, TerminalScreen):
                nursery.start_soon(self._io.read_keys)
            early = await self._start()
            status = early if early is not None else await self._converse()
            if self._view is not None:
                self._view.finish()
            nursery.cancel_scope.cancel()
        return status

    async def _start(self) -> int | None:
        """List the chats and open one; an exit status if the session ends here."""
        chats = await self._list_chats()
        if self._args.chat:
            chosen = next(((p, c) for p, c in chats if c["id"] == self._args.chat),
                          (None, {"id": self._args.chat}))
        elif not chats:  # (said so by the list): /new makes one
            self._io.set_prompt("> ")
            return None
        elif self._interactive and len(chats) > 1:
            picked = await self._choose(chats)
            if picked is None:
                return 0
            chosen = picked
        else:
            chosen = chats[0]
        project, chat = chosen
        await self._open(chat, project["id"] if project else self._project_of(chat["id"]))
        return None

    async def _converse(self) -> int:
        send, receive = trio.open_memory_channel[str](64)
        async with trio.open_nursery() as work:
            self._leave = work.cancel_scope
            work.start_soon(self._work, receive)
            async with send:
                while (line := await self._io.read_line()) is not None:
                    if line.strip():
                        await send.send(line)
            if self._io.editing:
                work.cancel_scope.cancel()  # Ctrl-D: leave now
        if self._leave.cancel_called:  # Ctrl-D or /quit
            return 0
        # The end of piped input: what was sent has gone; wait a while for the answers.
        if self._view is not None:
            with trio.move_on_after(self._args.linger):
                await self._view.wait_idle()
        return 0

