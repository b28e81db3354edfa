"""What every built-in store checks and decides the same way: a message's text, a chat's
title, a send's nonce, the model profiles a host sets, and which agent answers a profile."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

from .._agents.agent import Agent
from .._agents.echo import EchoAgent
from .._wire.protocol import JSON
from .backend import BackendError

__all__ = [
    "DEFAULT_CHAT_TITLE", "MAX_NONCE_LENGTH", "agent_for", "check_agents", "checked_nonce",
    "checked_profiles", "message_text", "new_chat",
]

DEFAULT_CHAT_TITLE: Final = "New chat"
#: The longest ``clientNonce`` a store keeps (a UUID is 36 characters).
MAX_NONCE_LENGTH: Final = 200
# The seeded profiles that pace the echo agent differently from the backend's own agent.
_PROFILE_CHUNK_DELAYS: Final = {"echo-fast": 0.01, "echo-slow": 0.3}
_MESSAGE_FIELDS: Final = ("text", "content", "message")


def message_text(message: JSON) -> str:
    """The text of a client's ``message``: a string, or an object's text/content/message."""
    if isinstance(message, str) and message:
        return message
    if isinstance(message, dict):
        for field in _MESSAGE_FIELDS:
            value = message.get(field)
            if isinstance(value, str) and value:
                return value
    raise BackendError(
        "message must be a non-empty string or an object with a non-empty string"
        " under 'text', 'content' or 'message'"
    )


def checked_profiles(profiles: list[JSON]) -> list[dict[str, JSON]]:
    """The model profiles a host sets, as stored (id, name, agent); `ValueError` if bad."""
    checked: list[dict[str, JSON]] = []
    seen: set[str] = set()
    for i, profile in enumerate(profiles):
        if not isinstance(profile, dict):
            raise ValueError(f"model profile {i} must be a dict")
        for field in ("id", "name", "agent"):
            if not isinstance(profile.get(field), str) or not profile[field]:
                raise ValueError(f"model profile {i} needs a non-empty string {field!r}")
        if profile["id"] in seen:
            raise ValueError(f"model profile id {profile['id']!r} appears twice")
        seen.add(profile["id"])
        checked.append({"id": profile["id"], "name": profile["name"], "agent": profile["agent"]})
    return checked


def new_chat(
    title: object, model_profile_id: str | None, profiles: list[JSON]
) -> tuple[str, str]:
    """The title and the profile of a chat to create, from a client's ``create``: a missing
    title is `DEFAULT_CHAT_TITLE`, a missing profile the first of ``profiles`` (the ids)."""
    if title is not None and not isinstance(title, str):
        raise BackendError("title must be a string")
    if not profiles:
        raise BackendError("there are no model profiles to create a chat with")
    # No profile named: the first one (`echo` in a new database).
    profile = model_profile_id or str(profiles[0])
    if profile not in profiles:
        raise BackendError(f"unknown model profile {profile!r}")
    return (title or "").strip() or DEFAULT_CHAT_TITLE, profile


def check_agents(profiles: list[dict[str, JSON]], agents: Mapping[str, Agent] | None) -> None:
    """Refuse agents given for profiles that are not in ``profiles`` (a host's mistake)."""
    if agents is None:
        return
    strays = sorted(set(agents) - {str(p["id"]) for p in profiles})
    if strays:
        raise ValueError(f"agents for unknown model profiles: {', '.join(strays)}")


def checked_nonce(nonce: object) -> str | None:
    """A send's nonce as stored: None, or a non-empty string of at most `MAX_NONCE_LENGTH`."""
    if nonce is None:
        return None
    if not isinstance(nonce, str) or not nonce or len(nonce) > MAX_NONCE_LENGTH:
        raise BackendError(
            f"clientNonce must be a non-empty string of at most {MAX_NONCE_LENGTH} characters"
        )
    return nonce


def agent_for(model_profile_id: str, agents: Mapping[str, Agent], default: EchoAgent) -> Agent:
    """The agent that answers in a chat of a profile: the host's for it, else ``default``
    (paced differently for the seeded ``echo-fast`` and ``echo-slow``)."""
    configured = agents.get(model_profile_id)
    if configured is not None:
        return configured
    delay = _PROFILE_CHUNK_DELAYS.get(model_profile_id)
    if delay is None:
        return default
    return attrs.evolve(default, chunk_delay=delay)
