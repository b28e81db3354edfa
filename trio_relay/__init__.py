"""trio-relay: a WebSocket relay on Trio for live, push-based sync of projects, chats and agents.

The public API is re-exported here; every module whose name starts with ``_`` is private.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from loguru import logger as _logger

from ._agents.agent import Agent as Agent
from ._agents.agent import AgentError as AgentError
from ._agents.command import CommandAgent as CommandAgent
from ._agents.echo import EchoAgent as EchoAgent
from ._config import CloseCode as CloseCode
from ._config import RelayConfig as RelayConfig
from ._config import RelayStatistics as RelayStatistics
from ._server.counters import RelayCounters as RelayCounters
from ._server.listener import Listener as Listener
from ._server.listener import ListenerOverflow as ListenerOverflow
from ._server.listener import RelayError as RelayError
from ._server.listener import SubscriptionError as SubscriptionError
from ._server.listener import Update as Update
from ._server.listener import UpstreamError as UpstreamError
from ._server.pairing import Device as Device
from ._server.pairing import DeviceStore as DeviceStore
from ._server.pairing import FileDeviceStore as FileDeviceStore
from ._server.relay import Relay as Relay
from ._server.relay import open_relay as open_relay
from ._store.backend import Backend as Backend
from ._store.backend import BackendError as BackendError
from ._store.backend import Change as Change
from ._store.backend import Feed as Feed
from ._store.backend import NotFound as NotFound
from ._store.backend import Snapshot as Snapshot
from ._store.hub import ChangeHub as ChangeHub
from ._store.hub import FeedOverflow as FeedOverflow
from ._store.sqlite import SqliteBackend as SqliteBackend
from ._store.sqlite import open_sqlite_backend as open_sqlite_backend
from ._stream.bus import Bus as Bus
from ._stream.bus import BusError as BusError
from ._stream.bus import BusEvent as BusEvent
from ._stream.bus import EpochChanged as EpochChanged
from ._stream.bus import Position as Position
from ._stream.local_bus import LocalBus as LocalBus
from ._wire.protocol import ErrorCode as ErrorCode
from ._wire.protocol import ResourceKey as ResourceKey

__version__ = "0.1.0"

# A library stays quiet unless the application asks: `trio-relay serve` enables these logs,
# an embedding application can call `loguru.logger.enable("trio_relay")`.
_logger.disable("trio_relay")

if _TYPE_CHECKING:  # for type checkers; at run time, `__getattr__` below
    from ._store.postgres import DatabaseUnavailable as DatabaseUnavailable
    from ._store.postgres import PostgresBackend as PostgresBackend
    from ._store.postgres import open_postgres_backend as open_postgres_backend
    from ._stream.redis_bus import RedisBus as RedisBus
    from ._stream.redis_bus import open_redis_bus as open_redis_bus

# The stores and buses of the extras import their drivers (psycopg, coredis), which only the
# extras install: they are imported on first use, not with the package.
_LAZY = {
    "PostgresBackend": "trio_relay._store.postgres",
    "DatabaseUnavailable": "trio_relay._store.postgres",
    "open_postgres_backend": "trio_relay._store.postgres",
    "RedisBus": "trio_relay._stream.redis_bus",
    "open_redis_bus": "trio_relay._stream.redis_bus",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_relay' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
