"""A send's ``clientNonce``: a retried send is stored and answered once.

With a backend that takes no ``nonce`` (the `MemoryBackend` here) the relay remembers recent
nonces itself (`RecentNonces`); the built-in stores dedupe in their database, across relays
and restarts (their own tests).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_relay import Relay
from trio_relay._server.nonces import RecentNonces
from trio_relay.testing import HANG, Frame, MemoryBackend, MemoryRelay, TestClient


@pytest.fixture
def memory_backend() -> MemoryBackend:
    backend = MemoryBackend()
    backend.add_project("p1")
    backend.add_chat("p1", "c1")
    backend.add_chat("p1", "c2")
    return backend


async def send(client: TestClient, chat: str, text: str, nonce: object) -> Frame:
    return await client.request(
        "send", resource="chat", resourceId=chat, message=text, clientNonce=nonce
    )


async def test_a_send_repeated_with_its_nonce_is_stored_once(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=True)
    first = await send(client, "c1", "hello", "n-1")
    again = await send(client, "c1", "hello", "n-1")
    assert first["data"] == again["data"] == {"sent": True}
    assert memory_backend.sent == [("c1", "hello")]
    # The nonce is the client's: another connection retrying it is the same send, while
    # another chat or another nonce is another message.
    other = await memory_relay.connect(authenticate=True)
    await send(other, "c1", "hello", "n-1")
    await send(other, "c2", "hello", "n-1")
    await send(other, "c1", "hello", "n-2")
    assert memory_backend.sent == [("c1", "hello"), ("c2", "hello"), ("c1", "hello")]


async def test_a_send_that_failed_goes_through_when_retried(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=True)
    memory_backend.faults["send_message"] = RuntimeError("disk on fire")
    failed = await send(client, "c1", "hello", "n-1")
    assert failed["type"] == "error"
    del memory_backend.faults["send_message"]
    assert (await send(client, "c1", "hello", "n-1"))["data"] == {"sent": True}
    assert memory_backend.sent == [("c1", "hello")]


async def test_a_retry_while_the_first_is_in_flight_waits_for_it(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    memory_backend.faults["send_message"] = HANG
    first = await memory_relay.connect(authenticate=True)
    await first.request_nowait(
        "send", resource="chat", resourceId="c1", message="hello", clientNonce="n-1"
    )
    await trio.testing.wait_all_tasks_blocked()
    second = await memory_relay.connect(authenticate=True)
    retry = await second.request_nowait(
        "send", resource="chat", resourceId="c1", message="hello", clientNonce="n-1"
    )
    await trio.testing.wait_all_tasks_blocked()
    await first.abort()  # the first one is cancelled with its connection: the retry goes on
    await trio.testing.wait_all_tasks_blocked()
    del memory_backend.faults["send_message"]
    assert memory_backend.sent == []
    # The backend hung the retry too (the fault was set when it started); it times out and
    # is answered with an error, and nothing was stored twice.
    reply = await second.reply_to(retry)
    assert reply["type"] == "error"
    assert (await send(second, "c1", "hello", "n-1"))["data"] == {"sent": True}
    assert memory_backend.sent == [("c1", "hello")]


@pytest.mark.parametrize(
    "nonce", ["", "x" * 129, 7, None, ["n"], "tab\there"], ids=repr
)
async def test_a_bad_nonce_is_refused_and_nothing_is_sent(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay,
    nonce: object,
) -> None:
    client = await memory_relay.connect(authenticate=True)
    reply = await send(client, "c1", "hello", nonce)
    if nonce is None:  # JSON null: no nonce, a plain send
        assert reply["data"] == {"sent": True}
        return
    assert reply["type"] == "error" and reply["code"] == "bad_request", reply
    assert "clientNonce" in reply["error"]
    assert memory_backend.sent == []


async def test_the_host_may_send_with_a_nonce_too(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    relay: Relay = memory_relay.relay
    await relay.send("c1", "from the host", nonce="h-1")
    await relay.send("c1", "from the host", nonce="h-1")
    assert memory_backend.sent == [("c1", "from the host")]


async def test_recent_nonces_are_forgotten_after_their_time_and_bounded(
    autojump_clock: trio.abc.Clock,
) -> None:
    nonces = RecentNonces(memory=10, kept=3)
    sent: list[str] = []

    async def store(text: str) -> None:
        sent.append(text)

    for n in range(5):
        await nonces.once("c", f"n{n}", lambda n=n: store(f"m{n}"))  # type: ignore[misc]
    assert len(nonces) <= 4  # the bound holds (the newest is added after the expiry)
    await nonces.once("c", "n4", lambda: store("again"))
    assert sent == ["m0", "m1", "m2", "m3", "m4"]
    await trio.sleep(11)
    await nonces.once("c", "n4", lambda: store("later"))
    assert sent[-1] == "later"  # forgotten after its time: a new message
