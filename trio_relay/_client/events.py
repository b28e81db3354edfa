"""The resources one subscribes to, the typed events a subscription yields, and the
parsing of a push into one.

Hand-written rather than a cattrs union: a push of a shape this client does not know must
become `Other`, never an error.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import attrs

__all__ = [
    "JSON",
    "RESOURCES",
    "AgentError",
    "ChatCreated",
    "ChatDeleted",
    "ChatRenamed",
    "Chunk",
    "Completed",
    "Event",
    "Key",
    "MessageAdded",
    "ModelProfilesChanged",
    "Other",
    "ReplyCancelled",
    "ReplyStarted",
    "Reset",
    "key_of",
    "parse_event",
    "target",
]

#: Any JSON value, as the standard library's `json` module produces it.
JSON: TypeAlias = Any
Key: TypeAlias = tuple[str, str]  # (resource, resourceId); modelProfiles has id ""

RESOURCES: Final = ("project", "chat", "modelProfiles")


def key_of(resource: str, resource_id: str | None) -> Key:
    """The key of a resource a caller names; ValueError if it names none."""
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {', '.join(RESOURCES)}, not {resource!r}")
    if resource == "modelProfiles":
        return (resource, "")
    if not resource_id:
        raise ValueError(f"resource_id is required for {resource}")
    return (resource, resource_id)


def target(key: Key) -> dict[str, Any]:
    resource, resource_id = key
    return {"resource": resource, "resourceId": resource_id} if resource_id else {
        "resource": resource
    }

@attrs.frozen
class MessageAdded:
    """chat: a message was stored (the user's on send, the agent's once its answer is done)."""

    message: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ReplyStarted:
    """chat: the agent starts answering; its final message will have id ``message_id``."""

    message_id: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Chunk:
    """chat: a piece of the agent's answer; the pieces joined are the final content."""

    message_id: str
    text: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class AgentError:
    """chat: the agent failed, or its answer could not be stored."""

    message_id: str | None
    error: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ReplyCancelled:
    """chat: a ``cancel`` stopped the agent's reply; nothing is stored for it."""

    message_id: str | None
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ChatCreated:
    """project: a chat was created."""

    chat: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ChatRenamed:
    """project: a chat was renamed; ``chat`` has its new title."""

    chat: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ChatDeleted:
    """project: a chat and its messages were deleted."""

    chat_id: str
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class ModelProfilesChanged:
    """modelProfiles: the whole new list."""

    profiles: list[JSON]
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Reset:
    """Events were lost to this subscription (the relay could not resume it, or the consumer
    fell behind): ``snapshot`` is the resource's whole state now. Replace yours with it;
    events from ``seq + 1`` follow."""

    snapshot: list[JSON]
    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Completed:
    """The resource's upstream ended; this is the subscription's last event."""

    seq: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Other:
    """A push this client does not recognise (another backend's events), passed through."""

    data: JSON
    seq: int | None = attrs.field(default=None, kw_only=True)


Event: TypeAlias = (
    MessageAdded | ReplyStarted | Chunk | AgentError | ReplyCancelled | ChatCreated
    | ChatRenamed | ChatDeleted | ModelProfilesChanged | Reset | Completed | Other
)


def parse_event(resource: str, data: JSON, seq: int | None = None) -> Event:
    """The typed event for one push's ``data``; `Other` when the shape is not recognised."""
    if not isinstance(data, dict):
        return Other(data, seq=seq)
    if data.get("completed") is True and "type" not in data:
        return Completed(seq=seq)
    kind = data.get("type")
    if resource == "chat":
        message_id = data.get("messageId")
        if kind == "message" and isinstance(data.get("message"), dict):
            return MessageAdded(data["message"], seq=seq)
        if kind == "reply_started" and isinstance(message_id, str):
            return ReplyStarted(message_id, seq=seq)
        if kind == "chunk" and isinstance(message_id, str) and isinstance(data.get("text"), str):
            return Chunk(message_id, data["text"], seq=seq)
        if kind == "error" and isinstance(data.get("error"), str) and (
            message_id is None or isinstance(message_id, str)
        ):
            return AgentError(message_id, data["error"], seq=seq)
        if kind == "cancelled" and (message_id is None or isinstance(message_id, str)):
            return ReplyCancelled(message_id, seq=seq)
    elif resource == "project":
        if kind == "chat_created" and isinstance(data.get("chat"), dict):
            return ChatCreated(data["chat"], seq=seq)
        if kind == "chat_renamed" and isinstance(data.get("chat"), dict):
            return ChatRenamed(data["chat"], seq=seq)
        if kind == "chat_deleted" and isinstance(data.get("chatId"), str):
            return ChatDeleted(data["chatId"], seq=seq)
    elif resource == "modelProfiles" and kind is None and isinstance(
        data.get("modelProfiles"), list
    ):
        return ModelProfilesChanged(data["modelProfiles"], seq=seq)
    return Other(data, seq=seq)
