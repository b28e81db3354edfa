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
``relay_client_timeout``      what bounds every wait of the relay's `TestClient`s (30 s)
``memory_relay``              a running `MemoryRelay` over those (async)
``relay_client``              a `TestClient` of ``memory_relay``, authenticated (async)
============================  ==============================================================

Override a fixture by defining one of the same name in a test module or a ``conftest.py``,
or, for one test, mark it: ``@pytest.mark.trio_relay(client_timeout=120, pin="42",
pin_lockout_failures=2)`` sets the client timeout, the PIN, and any `RelayConfig` field
(applied over ``relay_config``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from ._config import RelayConfig
from ._store.backend import Backend
from .testing import DEFAULT_PIN, MemoryBackend, MemoryRelay, TestClient, open_memory_relay

__all__ = [
    "memory_backend",
    "memory_relay",
    "relay_backend",
    "relay_client",
    "relay_client_timeout",
    "relay_config",
    "relay_pin",
]

_MARKER = "trio_relay"
#: Marker keywords that are not `RelayConfig` fields.
_OWN_KEYS = frozenset({"client_timeout", "pin"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(client_timeout=..., pin=..., **relay_config_fields): settings of the"
        " trio_relay plugin's memory_relay for this test",
    )


def _marked(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The keywords of the test's ``trio_relay`` markers (the closest wins), checked."""
    settings: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers(_MARKER))):
        if marker.args:
            raise TypeError(f"@pytest.mark.{_MARKER} takes keywords only")
        settings.update(marker.kwargs)
    known = _OWN_KEYS | {field.name for field in attrs.fields(RelayConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"@pytest.mark.{_MARKER}: no setting named {', '.join(unknown)}")
    return settings


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
def relay_client_timeout() -> float:
    """What bounds every wait of ``memory_relay``'s `TestClient`s, in (mock) seconds.

    Longer than the relay timer a test waits out, or the client gives up first: the default
    30 s equals ``pin_backoff_max`` and ``resume_grace``.
    """
    return 30.0


@pytest.fixture
async def memory_relay(
    request: pytest.FixtureRequest,
    relay_backend: Backend,
    relay_config: RelayConfig,
    relay_pin: str,
    relay_client_timeout: float,
) -> AsyncIterator[MemoryRelay]:
    """A relay over in-memory streams, running for the test; shut down after it."""
    marked = _marked(request)
    overrides = {key: value for key, value in marked.items() if key not in _OWN_KEYS}
    config = attrs.evolve(relay_config, **overrides) if overrides else relay_config
    async with open_memory_relay(
        relay_backend, pin=marked.get("pin", relay_pin), config=config,
        client_timeout=marked.get("client_timeout", relay_client_timeout),
    ) as relay:
        yield relay


@pytest.fixture
async def relay_client(memory_relay: MemoryRelay) -> TestClient:
    """A client of ``memory_relay`` that has authenticated."""
    return await memory_relay.connect(authenticate=True)
