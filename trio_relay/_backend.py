"""What a host application implements so the relay can serve its data: the `Backend` protocol.

The relay reads snapshots (projects, chats of a project, history of a chat, model profiles),
forwards writes (send a message, create a chat) and watches one change feed per resource. It
never interprets the data it relays beyond wrapping snapshots in the wire's field names.

Versions make subscribing exact. Each `Change` of a feed carries a ``version`` greater than the
one before it, and a `Snapshot` carries the version of the last change it includes. The relay
opens a resource's feed first and reads the snapshot second; with versions it knows which of
the changes still in flight the snapshot already holds, so an event that races a subscription
is delivered exactly once. `ChangeHub` gives a backend those versions for free. A backend that
cannot tell versions may leave them ``None``: the relay then still serves it, but a change that
races a subscription may show up both in the snapshot and as a push.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import attrs

from ._wire.protocol import JSON

__all__ = ["Backend", "BackendError", "Change", "Feed", "NotFound", "Snapshot"]


@attrs.frozen
class Snapshot:
    """The current state of a resource: its items and the version of the last change in them."""

    items: list[JSON]
    version: int | None = None


@attrs.frozen
class Change:
    """One event of a resource's change feed; ``data`` is what subscribers receive."""

    data: JSON
    version: int | None = None


#: A change feed: an async context manager that yields an async iterator of changes. Leaving
#: the context closes the upstream; the relay leaves it when the last subscriber has gone.
Feed = AbstractAsyncContextManager[AsyncIterator[Change]]


class NotFound(Exception):
    """Raise from a backend method when the project or chat does not exist (``not_found``)."""


class BackendError(Exception):
    """Raise from a backend method to refuse a request with a message the client may see.

    Any other exception is reported to the client as a plain "backend error" and logged with
    its traceback, so that internal details never reach the network.
    """


@runtime_checkable
class Backend(Protocol):
    """The host application's side of the relay.

    Every method may raise `NotFound` or `BackendError`. Each call is bounded by the relay's
    ``backend_timeout``; a call that takes longer is cancelled and answered with an error.
    """

    async def list_projects(self) -> list[JSON]:
        """All projects, sent to a client when it authenticates."""
        ...

    async def get_model_profiles(self) -> Snapshot:
        """All model profiles, sent on authentication and to ``modelProfiles`` subscribers."""
        ...

    async def list_chats(self, project_id: str) -> Snapshot:
        """The chats of one project."""
        ...

    async def get_history(self, chat_id: str) -> Snapshot:
        """The stored messages of one chat, oldest first."""
        ...

    async def send_message(
        self, chat_id: str, message: JSON, *, sender: JSON | None = None
    ) -> None:
        """Accept a message for a chat and return; the agent's answer arrives on the chat feed.

        ``message`` is the client's ``message`` field as it arrived: a string, or an object
        such as ``{"text": ...}``. ``sender`` says who sent it, for the backend to store with
        the message (the default backends put it in the message's ``sender`` field):
        ``{"deviceId": ..., "name": ...}`` for a paired device, ``{"name": "Unnamed device"}``
        for a PIN sign-in that paired none, ``{"name": ...}`` for the host's `Relay.send`.
        The relay passes ``sender=`` only to a ``send_message`` that accepts it, so a backend
        written without it keeps working (a type checker wants the parameter, though).
        """
        ...

    async def create_chat(
        self, project_id: str, title: str | None, model_profile_id: str | None = None
    ) -> JSON:
        """Create a chat in a project and return it; it must have a string ``id``.

        ``model_profile_id`` names the profile whose agent answers in the chat (None: the
        backend's default); an unknown one should be refused with `BackendError`.
        """
        ...

    async def cancel_reply(self, chat_id: str) -> bool:
        """Stop the agent's reply running in a chat, if one is; return whether one was.

        The chat's subscribers should then get an event saying so (the default backend
        pushes ``{"type": "cancelled", "messageId": ...}``).
        """
        ...

    def watch_project(self, project_id: str) -> Feed:
        """Changes to a project's chat list (chat created, renamed, deleted)."""
        ...

    def watch_chat(self, chat_id: str) -> Feed:
        """New messages and streamed agent output of a chat."""
        ...

    def watch_model_profiles(self) -> Feed:
        """Changes to the model profiles; each change's data is the full new list."""
        ...
