"""Testing against the relay with the scriptable `MemoryBackend` and the plugin's fixtures.

Run with ``pytest examples/testing`` (pytest-trio installed, trio-relay installed).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_relay import RelayConfig
from trio_relay.testing import HANG, MemoryBackend, MemoryRelay, TestClient

pytestmark = pytest.mark.trio  # not needed with trio_mode = true, harmless with it


@pytest.fixture
def memory_backend() -> MemoryBackend:
    """The plugin's fixture, overridden: a project with one chat and its history."""
    backend = MemoryBackend()
    backend.add_chat("p1", "c1", title="Support")
    backend.add_message("c1", "How can I help?")
    return backend


async def test_history_then_live_pushes(
    memory_backend: MemoryBackend, relay_client: TestClient
) -> None:
    reply = await relay_client.subscribe("chat", "c1")
    assert [m["content"] for m in reply["data"]["messages"]] == ["How can I help?"]

    memory_backend.emit("chat", "c1", {"type": "chunk", "text": "Typing"})  # streamed output
    message = memory_backend.add_message("c1", "Typing done")  # a stored message
    first, second = await relay_client.next_pushes(2)
    assert first["data"] == {"type": "chunk", "text": "Typing"}
    assert second["data"] == {"type": "message", "message": message}
    assert second["seq"] == reply["seq"] + 2
    await relay_client.assert_no_push()  # and nothing else


async def test_what_a_client_sends_reaches_the_backend(
    memory_backend: MemoryBackend, relay_client: TestClient
) -> None:
    await relay_client.send_message("c1", {"text": "My order is late"})
    assert memory_backend.sent == [("c1", {"text": "My order is late"})]


async def test_leaving_closes_the_upstream(
    autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend,
    memory_relay: MemoryRelay, relay_client: TestClient,
) -> None:
    await relay_client.subscribe("chat", "c1")
    assert sum(memory_backend.open_feeds.values()) == 1
    await relay_client.abort()  # vanish without a closing handshake
    # The relay keeps watching for resume_grace, so that the client can come back and resume.
    stats = await memory_relay.quiet_statistics()
    assert (stats.connections, stats.subscriptions, stats.lingering) == (0, 0, 1)
    await trio.sleep(memory_relay.relay.config.resume_grace)  # mock seconds: none taken
    stats = await memory_relay.quiet_statistics()
    assert (stats.connections, stats.subscriptions, stats.broadcasters) == (0, 0, 0)
    assert memory_backend.open_feeds == {}


class TestAHangingBackend:
    @pytest.fixture
    def relay_config(self) -> RelayConfig:
        """The plugin's fixture, overridden for these tests: a shorter backend timeout."""
        return RelayConfig(backend_timeout=3.0)

    async def test_a_hanging_send_is_answered_with_an_error_in_time(
        self, autojump_clock: trio.testing.MockClock, memory_backend: MemoryBackend,
        relay_client: TestClient,
    ) -> None:
        memory_backend.faults["send_message"] = HANG
        start = trio.current_time()
        reply = await relay_client.request("send", resourceId="c1", message="hello?")
        assert (reply["code"], reply["error"]) == ("backend_error", "backend timed out")
        assert trio.current_time() - start == 3.0  # mock seconds: the test took none
