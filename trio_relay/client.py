"""A Trio client library for trio-relay: reconnects, resumes, and never loses an event.

::

    async with open_relay_client("ws://127.0.0.1:8765/ws", pin="123456") as client:
        async with client.subscribe("chat", "welcome") as chat:
            await client.send("welcome", "hi")
            async for event in chat:
                ...

See ``docs/client.md``. Everything here is re-exported from the private ``_client`` package.
"""

from ._client import DEFAULT_BUFFER as DEFAULT_BUFFER
from ._client import TERMINAL_CLOSE_CODES as TERMINAL_CLOSE_CODES
from ._client import AgentError as AgentError
from ._client import AuthFailed as AuthFailed
from ._client import Backoff as Backoff
from ._client import ChatCreated as ChatCreated
from ._client import ChatDeleted as ChatDeleted
from ._client import ChatRenamed as ChatRenamed
from ._client import Chunk as Chunk
from ._client import ClientStatistics as ClientStatistics
from ._client import CloseInfo as CloseInfo
from ._client import Completed as Completed
from ._client import Connect as Connect
from ._client import ConnectionLost as ConnectionLost
from ._client import ConnectionState as ConnectionState
from ._client import Device as Device
from ._client import Event as Event
from ._client import LockedOut as LockedOut
from ._client import MessageAdded as MessageAdded
from ._client import ModelProfilesChanged as ModelProfilesChanged
from ._client import Other as Other
from ._client import RelayClient as RelayClient
from ._client import RelayClientError as RelayClientError
from ._client import ReplyCancelled as ReplyCancelled
from ._client import ReplyStarted as ReplyStarted
from ._client import RequestRejected as RequestRejected
from ._client import RequestTimeout as RequestTimeout
from ._client import Reset as Reset
from ._client import Subscription as Subscription
from ._client import SubscriptionFailed as SubscriptionFailed
from ._client import SyncedMirror as SyncedMirror
from ._client import TokenInvalid as TokenInvalid
from ._client import open_mirror as open_mirror
from ._client import open_relay_client as open_relay_client
from ._client import parse_event as parse_event

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
