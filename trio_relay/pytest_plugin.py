"""pytest fixtures for testing code that embeds or talks to trio-relay (``docs/testing.md``).

Installing trio-relay registers this module as a pytest plugin (the ``pytest11`` entry point
``trio_relay``); nothing happens until a test asks for one of its fixtures. The async ones
need pytest-trio: set ``trio_mode = true`` or mark the tests ``@pytest.mark.trio``. Add
pytest-trio's ``autojump_clock`` fixture to a test and every timeout of the relay, and of
`trio_relay.client`, passes in mock time, at once.

============================  ==============================================================
fixture                       value
============================  ==============================================================
``memory_backend``            an empty `MemoryBackend`
``relay_backend``             the backend the relay serves: ``memory_backend`` unless you
                              override it with your own
``relay_config``              the relay's `RelayConfig` (defaults; override to change limits)
``relay_pin``                 the relay's PIN (``"1234"``)
``memory_relay``              a running `MemoryRelay` over those (async)
``relay_client``              a `TestClient` of ``memory_relay``, authenticated (async)
============================  ==============================================================

Override a fixture by defining one of the same name in a test module or a ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._backend import Backend
from ._config import RelayConfig
from .testing import DEFAULT_PIN, MemoryBackend, MemoryRelay, TestClient, open_memory_relay

__all__ = [
    "memory_backend",
    "memory_relay",
    "relay_backend",
    "relay_client",
    "relay_config",
    "relay_pin",
]


@pytest.fixture
def memory_backend() -> MemoryBackend:
    """An empty `MemoryBackend`: add projects, chats and messages in the test."""
    return MemoryBackend()


@pytest.fixture
def relay_backend(memory_backend: MemoryBackend) -> Backend:
    """The backend ``memory_relay`` serves; override it to serve your own."""
    return memory_backend


@pytest.fixture
def relay_config() -> RelayConfig:
    """The ``memory_relay``'s limits and timeouts; override it to change them."""
    return RelayConfig()


@pytest.fixture
def relay_pin() -> str:
    """The ``memory_relay``'s PIN."""
    return DEFAULT_PIN


@pytest.fixture
async def memory_relay(
    relay_backend: Backend, relay_config: RelayConfig, relay_pin: str
) -> AsyncIterator[MemoryRelay]:
    """A relay over in-memory streams, running for the test; shut down after it."""
    async with open_memory_relay(relay_backend, pin=relay_pin, config=relay_config) as relay:
        yield relay


@pytest.fixture
async def relay_client(memory_relay: MemoryRelay) -> TestClient:
    """A client of ``memory_relay`` that has authenticated."""
    return await memory_relay.connect(authenticate=True)
