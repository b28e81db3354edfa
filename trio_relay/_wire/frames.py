"""The frames of the wire protocol as attrs classes: every request a client sends, every reply
and push the relay sends, the error codes, and the rule for a device name. No I/O, and no
encoding: `trio_relay._wire.protocol` turns text into these and these into text.
"""

from __future__ import annotations

import unicodedata
from typing import Any, ClassVar, Final, Literal, get_args

import attrs

__all__ = [
    "_REQUEST_TYPES",
    "AuthFailed",
    "AuthRequest",
    "AuthRequired",
    "AuthSuccess",
    "CancelRequest",
    "check_device_name",
    "CreateRequest",
    "DataReply",
    "DEVICE_NAME_MAX",
    "ErrorCode",
    "ErrorReply",
    "JSON",
    "MAX_ID_LENGTH",
    "ProtocolError",
    "Reply",
    "Request",
    "RequestId",
    "Resource",
    "ResourceKey",
    "RESOURCES",
    "SendRequest",
    "Subscribed",
    "SubscribeRequest",
    "UnsubscribeRequest",
]

#: Any JSON value, as the standard library's `json` module produces it.
JSON = Any
#: A request id: a non-empty string or an integer, echoed back unchanged.
RequestId = str | int

Resource = Literal["project", "chat", "modelProfiles"]
RESOURCES: Final[tuple[str, ...]] = get_args(Resource)

MAX_ID_LENGTH: Final = 256

#: Longest device name, in characters after trimming.
DEVICE_NAME_MAX: Final = 64


def check_device_name(name: str) -> str | None:
    """The name trimmed, or None if it cannot be a device name (empty after trimming, longer
    than `DEVICE_NAME_MAX`, or holding a control character)."""
    name = name.strip()
    if not 1 <= len(name) <= DEVICE_NAME_MAX:
        return None
    if any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in name):
        return None
    return name


class ErrorCode:
    """The stable, machine-readable ``code`` carried by every error reply."""

    BAD_REQUEST: Final = "bad_request"
    NOT_AUTHENTICATED: Final = "not_authenticated"
    AUTH_FAILED: Final = "auth_failed"
    #: On ``auth_failed``: the device token is unknown or revoked; ask for the PIN.
    TOKEN_INVALID: Final = "token_invalid"
    #: On ``auth_failed``: too many failed attempts; ``retryAfter`` says how long to wait.
    LOCKED_OUT: Final = "locked_out"
    NOT_FOUND: Final = "not_found"
    RATE_LIMITED: Final = "rate_limited"
    BACKEND_ERROR: Final = "backend_error"
    TOO_MANY_SUBSCRIPTIONS: Final = "too_many_subscriptions"
    INTERNAL_ERROR: Final = "internal_error"


@attrs.frozen(order=True)
class ResourceKey:
    """Names one watchable resource. ``modelProfiles`` has one instance, with id ``""``."""

    resource: str
    resource_id: str

    def __str__(self) -> str:
        return f"{self.resource}:{self.resource_id}" if self.resource_id else self.resource


# --- requests (client to relay) ---------------------------------------------------------------


@attrs.frozen
class AuthRequest:
    """Sign in with the PIN (and, to pair this device, its ``deviceName``) or with the token
    an earlier pairing gave: exactly one of ``pin`` and ``token``."""

    type: ClassVar[str] = "auth"
    id: RequestId
    # Secrets are never in a repr, so never in a log line.
    pin: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    #: Trimmed, 1 to 64 characters (checked by `decode`); only used with ``pin``.
    device_name: str | None = None


@attrs.frozen
class SubscribeRequest:
    type: ClassVar[str] = "subscribe"
    id: RequestId
    resource: Resource
    resource_id: str = ""
    #: Resume (extension): the last seq the client saw, and the epoch it belongs to.
    since_seq: int | None = None
    epoch: str | None = None

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.resource, self.resource_id)


@attrs.frozen
class UnsubscribeRequest:
    type: ClassVar[str] = "unsubscribe"
    id: RequestId
    resource: Resource
    resource_id: str = ""

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.resource, self.resource_id)


@attrs.frozen
class SendRequest:
    """Send a message to a chat: ``resourceId`` is the chat id, ``message`` any JSON value."""

    type: ClassVar[str] = "send"
    id: RequestId
    resource_id: str
    message: JSON = attrs.field(repr=False)  # message contents stay out of logs
    #: A string the client chose for this message (``clientNonce``): a send retried with the
    #: same one, to the same chat, is stored and answered once.
    client_nonce: str | None = None


@attrs.frozen
class CreateRequest:
    """Create a chat (extension): ``resourceId`` is the project id; ``message`` may hold the
    ``title`` and the ``modelProfileId`` whose agent answers in the chat."""

    type: ClassVar[str] = "create"
    id: RequestId
    resource: Literal["chat"]
    resource_id: str
    title: str | None = None
    model_profile_id: str | None = None


@attrs.frozen
class CancelRequest:
    """Stop the agent's reply running in a chat (extension): ``resourceId`` is the chat id."""

    type: ClassVar[str] = "cancel"
    id: RequestId
    resource_id: str


Request = (
    AuthRequest | SubscribeRequest | UnsubscribeRequest | SendRequest | CreateRequest
    | CancelRequest
)

_REQUEST_TYPES: Final[dict[str, type[Request]]] = {
    cls.type: cls
    for cls in (
        AuthRequest, SubscribeRequest, UnsubscribeRequest, SendRequest, CreateRequest,
        CancelRequest,
    )
}

# --- replies and pushes (relay to client) -----------------------------------------------------


@attrs.frozen(kw_only=True)
class AuthRequired:
    type: ClassVar[str] = "auth_required"
    id: RequestId | None = None


@attrs.frozen(kw_only=True)
class AuthSuccess:
    type: ClassVar[str] = "auth_success"
    id: RequestId | None
    data: JSON  # {"projects": [...], "modelProfiles": [...]}


@attrs.frozen(kw_only=True)
class AuthFailed:
    type: ClassVar[str] = "auth_failed"
    id: RequestId | None
    error: str
    code: str = ErrorCode.AUTH_FAILED
    #: With ``locked_out``: whole seconds until the lockout ends.
    retry_after: int | None = None


@attrs.frozen(kw_only=True)
class Subscribed:
    type: ClassVar[str] = "subscribed"
    id: RequestId | None
    resource: str
    resource_id: str | None = None
    #: The snapshot; absent when the subscription resumed.
    data: JSON = None
    seq: int
    epoch: str | None = None
    #: The client asked to resume but gets a fresh snapshot and a new sequence instead.
    reset: bool | None = None
    #: The missed pushes follow, from ``seq + 1``; there is no snapshot.
    resumed: bool | None = None


@attrs.frozen(kw_only=True)
class DataReply:
    """A ``data`` frame: a reply to send/unsubscribe/create, or (``id`` None) a push."""

    type: ClassVar[str] = "data"
    id: RequestId | None
    resource: str | None = None
    resource_id: str | None = None
    data: JSON
    seq: int | None = None


@attrs.frozen(kw_only=True)
class ErrorReply:
    type: ClassVar[str] = "error"
    id: RequestId | None
    error: str
    code: str
    resource: str | None = None
    resource_id: str | None = None
    #: Set on the error push that ends a failed upstream: it is a push, so it is numbered.
    seq: int | None = None


Reply = AuthRequired | AuthSuccess | AuthFailed | Subscribed | DataReply | ErrorReply


class ProtocolError(Exception):
    """A frame could not be decoded. ``reply`` is the error frame to send back."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.error)
        self.reply = reply
