"""Helpers shared by the test modules; their shared fixtures are in conftest.py.

A module that wants the relay of the ``memory_relay`` fixture to serve seeded data overrides
the plugin's ``memory_backend`` with one of the builders here, in one line::

    memory_backend = pytest.fixture(one_chat, name="memory_backend")
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeAlias

import trio

from trio_relay._store.sqlite import SqliteBackend
from trio_relay.testing import DEFAULT_PIN, MemoryBackend, MemoryRelay, open_memory_relay

if TYPE_CHECKING:
    from trio_relay._store.postgres import PostgresBackend

#: One of the built-in stores, and what opens one (conftest's ``open_store`` fixture).
Store: TypeAlias = "SqliteBackend | PostgresBackend"
OpenStore: TypeAlias = "Callable[..., AbstractAsyncContextManager[Store]]"

#: A wire frame as the tests read and write it.
Frame = dict[str, Any]
#: The PIN of the ``memory_relay`` fixture (and of `open_memory_relay` unless told otherwise).
PIN = DEFAULT_PIN
#: The model profiles of `demo_chats`.
PROFILES = [{"id": "sonnet", "name": "Sonnet"}, {"id": "opus", "name": "Opus"}]


def one_chat() -> MemoryBackend:
    """Chat c1 in project p1, empty."""
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    return backend


def demo_chats() -> MemoryBackend:
    """Project p1 with chat c1 (one stored message), an empty project p2, `PROFILES`."""
    backend = MemoryBackend()
    backend.add_project("p1", "Project one")
    backend.add_project("p2", "Project two")
    backend.add_chat("p1", "c1", title="First chat")
    backend.add_message("c1", "hello", role="user")
    backend.set_model_profiles(PROFILES)
    return backend


async def run_relay(
    backend: MemoryBackend, stop: trio.Event, *, task_status: trio.TaskStatus[MemoryRelay]
) -> None:
    """A relay over ``backend`` until ``stop`` is set: ``nursery.start`` it, stop it, start
    another over the same backend, and a client sees the relay restart."""
    async with open_memory_relay(backend, pin=PIN) as relay:
        task_status.started(relay)
        await stop.wait()


async def still_serves(memory: MemoryRelay) -> None:
    """A new client can still log in (with the relay's PIN) and subscribe to chat c1."""
    client = await memory.connect(authenticate=True)
    assert (await client.subscribe("chat", "c1"))["type"] == "subscribed"
    await client.close()


def count_tasks_in_run() -> int:
    """Every task of the trio run (system tasks aside): relay, clients and the test itself."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``condition()`` holds, for ``within`` seconds at most.

    Only for what sends no event to wait on and that `trio.testing.wait_all_tasks_blocked`
    cannot see through: a worker thread, or the kernel's side of a real socket.
    """
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - nothing to wait on; see above
            await trio.sleep(0.01)
