"""trio-relay: a WebSocket relay on Trio for live, push-based sync of projects, chats and agents.

The public API is re-exported here; every module whose name starts with ``_`` is private.
"""

from loguru import logger as _logger

from ._agents import Agent as Agent
from ._agents import AgentError as AgentError
from ._agents import CommandAgent as CommandAgent
from ._backend import Backend as Backend
from ._backend import BackendError as BackendError
from ._backend import Change as Change
from ._backend import Feed as Feed
from ._backend import NotFound as NotFound
from ._backend import Snapshot as Snapshot
from ._config import CloseCode as CloseCode
from ._config import RelayConfig as RelayConfig
from ._config import RelayStatistics as RelayStatistics
from ._echo_agent import EchoAgent as EchoAgent
from ._hub import ChangeHub as ChangeHub
from ._hub import FeedOverflow as FeedOverflow
from ._server.counters import RelayCounters as RelayCounters
from ._server.pairing import Device as Device
from ._server.pairing import DeviceStore as DeviceStore
from ._server.pairing import FileDeviceStore as FileDeviceStore
from ._server.relay import Listener as Listener
from ._server.relay import ListenerOverflow as ListenerOverflow
from ._server.relay import Relay as Relay
from ._server.relay import RelayError as RelayError
from ._server.relay import SubscriptionError as SubscriptionError
from ._server.relay import Update as Update
from ._server.relay import UpstreamError as UpstreamError
from ._server.relay import open_relay as open_relay
from ._sqlite_backend import SqliteBackend as SqliteBackend
from ._sqlite_backend import open_sqlite_backend as open_sqlite_backend
from ._wire.protocol import ErrorCode as ErrorCode

__version__ = "0.1.0"

# A library stays quiet unless the application asks: `trio-relay serve` enables these logs,
# an embedding application can call `loguru.logger.enable("trio_relay")`.
_logger.disable("trio_relay")
