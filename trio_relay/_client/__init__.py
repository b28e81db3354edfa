"""The client library, private: `trio_relay.client` is its public face.

- `session`: what the client knows (subscriptions, their seq and epoch, pending requests,
  what to resubscribe after a reconnect, how to sign in), sans-IO;
- `inbox`: one consumer's bounded queue of events, sans-IO;
- `events`, `errors`: what a subscription yields, and what the client raises;
- `transport`: one WebSocket connection (trio-websocket) feeding the session;
- `connector`: one connection's life (stream, handshake, sign in, resubscribe);
- `client`: `RelayClient` and its reconnect loop; `state`: its state, backoff, statistics;
- `subscription`: the ``async for`` side of an inbox; `mirror`: `SyncedMirror`.
"""

from .client import DEFAULT_BUFFER, TERMINAL_CLOSE_CODES, Connect, RelayClient, open_relay_client
from .errors import (
    AuthFailed,
    ConnectionLost,
    LockedOut,
    RelayClientError,
    RequestRejected,
    RequestTimeout,
    SubscriptionFailed,
    TokenInvalid,
)
from .events import (
    AgentError,
    ChatCreated,
    ChatDeleted,
    ChatRenamed,
    Chunk,
    Completed,
    Event,
    MessageAdded,
    ModelProfilesChanged,
    Other,
    ReplyCancelled,
    ReplyStarted,
    Reset,
    parse_event,
)
from .mirror import SyncedMirror, open_mirror
from .session import Device
from .state import Backoff, ClientStatistics, ConnectionState
from .subscription import Subscription
from .transport import CloseInfo

__all__ = [
    "DEFAULT_BUFFER",
    "TERMINAL_CLOSE_CODES",
    "AgentError",
    "AuthFailed",
    "Backoff",
    "ChatCreated",
    "ChatDeleted",
    "ChatRenamed",
    "Chunk",
    "ClientStatistics",
    "CloseInfo",
    "Completed",
    "Connect",
    "ConnectionLost",
    "ConnectionState",
    "Device",
    "Event",
    "LockedOut",
    "MessageAdded",
    "ModelProfilesChanged",
    "Other",
    "RelayClient",
    "RelayClientError",
    "ReplyCancelled",
    "ReplyStarted",
    "RequestRejected",
    "RequestTimeout",
    "Reset",
    "Subscription",
    "SubscriptionFailed",
    "SyncedMirror",
    "TokenInvalid",
    "open_mirror",
    "open_relay_client",
    "parse_event",
]
