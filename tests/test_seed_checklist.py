"""The seed plan's testing checklist, one test per line, in the seed's order.

(Reconnection belongs to the resume issue; everything else of the checklist is here.)
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _helpers import PIN

from trio_relay.testing import MemoryBackend, MemoryRelay


@pytest.fixture
def memory_backend() -> MemoryBackend:
    backend = MemoryBackend()
    backend.add_project("p1", "Project one")
    backend.add_chat("p1", "c1", title="First chat")
    backend.add_message("c1", "earlier answer")
    backend.model_profiles = [{"id": "echo", "name": "Echo"}]
    return backend


async def test_auth_sends_projects_and_model_profiles(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    reply = await client.authenticate(PIN)
    assert reply["data"] == {
        "projects": [{"id": "p1", "name": "Project one"}],
        "modelProfiles": [{"id": "echo", "name": "Echo"}],
    }


async def test_project_subscription_sends_chat_list(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("project", "p1")
    assert reply["data"] == {
        "chats": [{"id": "c1", "projectId": "p1", "title": "First chat"}]
    }


async def test_chat_subscription_sends_message_history(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    reply = await client.subscribe("chat", "c1")
    assert [m["content"] for m in reply["data"]["messages"]] == ["earlier answer"]


async def test_chat_subscription_streams_new_messages(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    subscribed = await client.subscribe("chat", "c1")
    memory_backend.emit("chat", "c1", {"type": "chunk", "text": "Hel"})
    memory_backend.emit("chat", "c1", {"type": "chunk", "text": "lo"})
    message = memory_backend.add_message("c1", "Hello")
    pushes = [await client.next_push() for _ in range(3)]
    assert [p["data"] for p in pushes] == [
        {"type": "chunk", "text": "Hel"},
        {"type": "chunk", "text": "lo"},
        {"type": "message", "message": message},
    ]
    assert [p["seq"] for p in pushes] == [subscribed["seq"] + i for i in (1, 2, 3)]


async def test_send_message_works_from_web(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    await client.subscribe("chat", "c1")
    reply = await client.request("send", resourceId="c1", message={"message": "hi"})
    assert reply == {"id": reply["id"], "type": "data", "resource": "chat",
                     "resourceId": "c1", "data": {"sent": True}}
    assert memory_backend.sent == [("c1", {"message": "hi"})]
    push = await client.next_push()
    assert push["data"]["message"]["content"] == "hi"


async def test_send_message_works_from_host(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    await client.subscribe("chat", "c1")
    await memory_relay.relay.send("c1", "from the desktop")
    push = await client.next_push()
    assert push["data"]["message"]["content"] == "from the desktop"


async def test_messages_sync_between_web_and_host(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    subscribed = await client.subscribe("chat", "c1")
    async with memory_relay.relay.listen("chat", "c1") as host:
        assert host.snapshot == subscribed["data"]["messages"]
        assert host.seq == subscribed["seq"]
        await client.request("send", resourceId="c1", message="web says hi")
        await memory_relay.relay.send("c1", "host says hi")
        web_seen = [await client.next_push() for _ in range(2)]
        host_seen = [await host.__anext__() for _ in range(2)]
    assert [(p["seq"], p["data"]) for p in web_seen] == [(u.seq, u.data) for u in host_seen]
    assert [u.data["message"]["content"] for u in host_seen] == ["web says hi", "host says hi"]


async def test_unsubscribe_works(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect(authenticate=PIN)
    await client.subscribe("chat", "c1")
    reply = await client.request("unsubscribe", resource="chat", resourceId="c1")
    assert reply["data"] == {"unsubscribed": True}
    memory_backend.add_message("c1", "nobody is listening")
    await client.assert_no_push()
    assert memory_backend.open_feeds == {}


async def test_no_memory_leaks(
    autojump_clock: trio.abc.Clock, memory_backend: MemoryBackend, memory_relay: MemoryRelay
) -> None:
    baseline = await memory_relay.quiet_statistics()
    for round_ in range(3):
        clients = [await memory_relay.connect(authenticate=PIN) for _ in range(5)]
        for client in clients:
            await client.subscribe("chat", "c1")
            await client.subscribe("project", "p1")
        memory_backend.add_message("c1", f"round {round_}")
        for client in clients:
            await client.next_push()
        await clients[0].close()
        await clients[1].abort()
        await clients[2].request("unsubscribe", resource="chat", resourceId="c1")
        await clients[2].close()
        for client in clients[3:-1]:
            await client.close()
        await clients[-1].abort()
        await trio.testing.wait_all_tasks_blocked()
        # The last one out dropped its connection: its upstreams linger for it to come back,
        # and go, with the replay buffers, when their grace period ends.
        left = memory_relay.relay.statistics()
        assert (left.connections, left.subscriptions) == (0, 0)
        assert left.broadcasters == left.lingering == sum(memory_backend.open_feeds.values()) == 2
        await trio.sleep(memory_relay.relay.config.resume_grace + 1)
        assert memory_relay.relay.statistics() == baseline
        assert memory_backend.open_feeds == {}
        assert memory_backend.feeds_closed == memory_backend.feeds_opened
