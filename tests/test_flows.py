"""Every flow and guarantee of the wire contract (CONTRACT.md), through real connections.

Each test runs a real relay over in-memory streams (`open_memory_relay`) under the autojump
clock: the WebSocket handshake, framing and connection code are the production ones, time is
mock time, and "quiet" means every task is blocked, never a guessed sleep.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from _helpers import PIN, PROFILES, Frame, demo_chats

from trio_relay import CloseCode, RelayConfig, Snapshot, Update
from trio_relay._store.backend import BackendError
from trio_relay._wire.protocol import ResourceKey
from trio_relay.testing import (
    HANG,
    MemoryBackend,
    MemoryRelay,
    TestClient,
    next_update,
    open_memory_relay,
)

memory_backend = pytest.fixture(demo_chats, name="memory_backend")


def push(resource: str, resource_id: str | None, data: Any, seq: int) -> Frame:
    """The exact push frame the contract promises (``resourceId`` is absent for modelProfiles)."""
    frame: Frame = {"id": None, "type": "data", "resource": resource, "data": data, "seq": seq}
    if resource_id is not None:
        frame["resourceId"] = resource_id
    return frame


def message_push(backend: MemoryBackend, chat_id: str, seq: int, index: int = -1) -> Frame:
    """The push of a stored message of ``chat_id`` (the last one by default)."""
    message = backend.messages[chat_id][index]
    return push("chat", chat_id, {"type": "message", "message": message}, seq)


class _AnyEpoch:
    """Equal to any epoch: an opaque token the relay chooses (see the resume tests)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    def __repr__(self) -> str:
        return "<any epoch>"


def subscribed(request_id: Any, resource: str, resource_id: str | None, data: Any,
               seq: int) -> Frame:
    frame: Frame = {"id": request_id, "type": "subscribed", "resource": resource, "data": data,
                    "seq": seq, "epoch": _AnyEpoch()}
    if resource_id is not None:
        frame["resourceId"] = resource_id
    return frame


def error(request_id: Any, code: str, text: str, resource: str | None = None,
          resource_id: str | None = None) -> Frame:
    frame: Frame = {"id": request_id, "type": "error", "error": text, "code": code}
    if resource is not None:
        frame["resource"] = resource
    if resource_id is not None:
        frame["resourceId"] = resource_id
    return frame


async def connect(relay: MemoryRelay) -> TestClient:
    return await relay.connect(authenticate=PIN)


# --- 1. connect -----------------------------------------------------------------------------


async def test_connect_sends_auth_required_first(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    assert await client.receive() == {"id": None, "type": "auth_required"}
    await client.assert_no_push()


# --- 2. auth --------------------------------------------------------------------------------


async def test_auth_success_returns_projects_and_model_profiles(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    assert await client.receive() == {"id": None, "type": "auth_required"}
    await client.send({"id": "auth-1", "type": "auth", "pin": PIN})
    assert await client.receive() == {
        "id": "auth-1",
        "type": "auth_success",
        "data": {
            "projects": [{"id": "p1", "name": "Project one"},
                         {"id": "p2", "name": "Project two"}],
            "modelProfiles": PROFILES,
        },
    }


async def test_wrong_pin_gets_auth_failed_with_a_code(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    reply = await client.request("auth", pin="9999")
    assert reply == {"id": "r1", "type": "auth_failed", "error": reply.get("error"),
                     "code": "auth_failed"}
    assert isinstance(reply["error"], str) and reply["error"]


@pytest.mark.parametrize("guess", ["1235", "123", "12345", "0000", "", "1234 "])
async def test_auth_failed_reveals_nothing_about_the_pin(
    guess: str, memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    """Near misses, prefixes and far misses get the same words after the same delay."""

    async def attempt(pin: str) -> tuple[Frame, float]:
        # A fresh relay each time: a fresh PIN guard.
        async with open_memory_relay(memory_backend, pin=PIN) as relay:
            client = await relay.connect()
            start = trio.current_time()
            reply = await client.request("auth", pin=pin)
            return reply, trio.current_time() - start

    reply, delay = await attempt(guess)
    far_reply, far_delay = await attempt("9876")
    assert reply["type"] == "auth_failed"
    assert reply["error"] == far_reply["error"]
    assert delay == far_delay
    for secret in (PIN, *PIN, guess or PIN):  # neither the PIN, its digits nor the guess
        assert secret not in reply["error"]


async def test_auth_after_a_wrong_pin_works_on_the_same_connection(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    assert (await client.request("auth", pin="0000"))["type"] == "auth_failed"
    reply = await client.authenticate(PIN)
    assert reply["data"]["modelProfiles"] == PROFILES


async def test_requests_before_auth_are_refused_and_the_connection_stays_usable(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await memory_relay.connect()
    assert await client.receive() == {"id": None, "type": "auth_required"}
    refused = "Not authenticated"
    code = "not_authenticated"
    assert await client.request("subscribe", resource="chat", resourceId="c1") == error(
        "r1", code, refused, "chat", "c1")
    assert await client.request("send", resourceId="c1", message="hi") == error(
        "r2", code, refused, "chat", "c1")
    assert await client.request("unsubscribe", resource="project", resourceId="p1") == error(
        "r3", code, refused, "project", "p1")
    assert await client.request(
        "create", resource="chat", resourceId="p1", message={"title": "T"}
    ) == error("r4", code, refused, "chat", "p1")
    assert await client.request("subscribe", resource="modelProfiles") == error(
        "r5", code, refused, "modelProfiles")
    await client.assert_no_push()
    assert memory_backend.sent == []
    assert memory_backend.feeds_opened == 0
    # Nothing was half-done, and auth afterwards works as if nothing happened.
    await client.authenticate(PIN)
    reply = await client.subscribe("chat", "c1")
    assert reply["data"] == {"messages": memory_backend.messages["c1"]}


# --- 3. subscribe to a project --------------------------------------------------------------


async def test_project_subscription_gets_chats_then_a_push_per_chat_change(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    reply = await client.subscribe("project", "p1")
    assert reply == subscribed("r2", "project", "p1", {"chats": [memory_backend.chats["c1"]]}, 0)

    chat = memory_backend.add_chat("p1", "c2", title="Second chat")
    assert await client.next_push() == push(
        "project", "p1", {"type": "chat_created", "chat": chat}, 1)
    # Renames and deletions are upstream events of the project like any other.
    renamed = {"type": "chat_renamed", "chat": {**chat, "title": "Renamed"}}
    memory_backend.emit("project", "p1", renamed)
    assert await client.next_push() == push("project", "p1", renamed, 2)
    deleted = {"type": "chat_deleted", "chatId": "c2"}
    memory_backend.emit("project", "p1", deleted)
    assert await client.next_push() == push("project", "p1", deleted, 3)
    # Another project's chats are not pushed here.
    memory_backend.add_chat("p2", "c3")
    await client.assert_no_push()


async def test_subscribing_to_an_unknown_resource_is_not_found(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    for resource in ("project", "chat"):
        reply = await client.request("subscribe", resource=resource, resourceId="nope")
        assert reply == error(reply["id"], "not_found", reply["error"], resource, "nope")
        assert "nope" in reply["error"]
    assert memory_backend.open_feeds == {}
    assert memory_relay.relay.statistics().subscriptions == 0


# --- 4. subscribe to a chat -----------------------------------------------------------------


async def test_chat_subscription_gets_history_then_every_event_with_seq(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    reply = await client.subscribe("chat", "c1")
    assert reply == subscribed("r2", "chat", "c1", {"messages": memory_backend.messages["c1"]}, 0)

    memory_backend.add_message("c1", "Hi, how can I help?")
    memory_backend.emit("chat", "c1", {"type": "chunk", "text": "Let me"})
    memory_backend.emit("chat", "c1", {"type": "chunk", "text": " think."})
    assert await client.next_push() == message_push(memory_backend, "c1", 1)
    assert await client.next_push() == push(
        "chat", "c1", {"type": "chunk", "text": "Let me"}, 2)
    assert await client.next_push() == push(
        "chat", "c1", {"type": "chunk", "text": " think."}, 3)
    await client.assert_no_push()


async def test_upstream_completion_pushes_completed_once_and_ends_the_subscription(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    await client.subscribe("chat", "c1")
    memory_backend.emit("chat", "c1", {"type": "chunk", "text": "done"})
    memory_backend.end_feeds("chat", "c1")
    assert await client.next_push() == push(
        "chat", "c1", {"type": "chunk", "text": "done"}, 1)
    assert await client.next_push() == push("chat", "c1", {"completed": True}, 2)
    await client.assert_no_push()
    # The subscription is gone, and so is its upstream.
    assert memory_backend.open_feeds == {}
    assert await client.request("unsubscribe", resource="chat", resourceId="c1") == {
        "id": "r3", "type": "data", "resource": "chat", "resourceId": "c1",
        "data": {"unsubscribed": False},
    }
    # Resubscribing works and starts from a fresh snapshot.
    memory_backend.add_message("c1", "stored while nobody watched")
    reply = await client.subscribe("chat", "c1")
    assert reply["data"] == {"messages": memory_backend.messages["c1"]}
    assert len(reply["data"]["messages"]) == 2
    memory_backend.add_message("c1", "live again")
    assert await client.next_push() == message_push(memory_backend, "c1", reply["seq"] + 1)


async def test_upstream_failure_pushes_backend_error_and_ends_the_subscription(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    await client.subscribe("chat", "c1")
    memory_backend.end_feeds("chat", "c1", error=RuntimeError("disk /var/secret/db.sqlite failed"))
    frame = await client.next_push()
    # A push like any other, so it is numbered: the first push of this subscription.
    assert frame == {**error(None, "backend_error", frame["error"], "chat", "c1"), "seq": 1}
    assert frame["error"] and "secret" not in frame["error"]  # no internals
    await client.assert_no_push()
    assert memory_backend.open_feeds == {}
    assert (await client.request("unsubscribe", resource="chat", resourceId="c1"))["data"] == {
        "unsubscribed": False}
    reply = await client.subscribe("chat", "c1")
    assert reply["data"] == {"messages": memory_backend.messages["c1"]}
    memory_backend.add_message("c1", "after the failure")
    assert await client.next_push() == message_push(memory_backend, "c1", reply["seq"] + 1)


# --- 5. send --------------------------------------------------------------------------------


async def test_send_replies_sent_and_every_subscriber_gets_the_message(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    sender = await connect(memory_relay)
    watcher = await connect(memory_relay)
    await sender.subscribe("chat", "c1")
    await watcher.subscribe("chat", "c1")
    reply = await sender.request("send", resourceId="c1", message={"text": "What is 2+2?"})
    assert reply == {"id": "r3", "type": "data", "resource": "chat", "resourceId": "c1",
                     "data": {"sent": True}}
    assert memory_backend.sent == [("c1", {"text": "What is 2+2?"})]
    assert memory_backend.messages["c1"][-1]["content"] == "What is 2+2?"
    expected = message_push(memory_backend, "c1", 1)
    assert await sender.next_push() == expected
    assert await watcher.next_push() == expected
    # The agent's answer arrives the same way, to both.
    memory_backend.add_message("c1", "4")
    for client in (sender, watcher):
        assert await client.next_push() == message_push(memory_backend, "c1", 2)


async def test_send_to_an_unknown_chat_is_not_found(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    reply = await client.request("send", resourceId="nope", message="hi")
    assert reply == error("r2", "not_found", reply["error"], "chat", "nope")
    assert memory_backend.sent == []


async def test_send_backend_error_passes_its_message_on(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    memory_backend.faults["send_message"] = BackendError("the agent is busy")
    reply = await client.request("send", resourceId="c1", message="hi")
    assert reply == error("r2", "backend_error", "the agent is busy", "chat", "c1")


async def test_send_unexpected_backend_exception_hides_internals(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    memory_backend.faults["send_message"] = KeyError("/home/alice/.secrets token=abc")
    reply = await client.request("send", resourceId="c1", message="hi")
    assert reply == error("r2", "backend_error", "backend error", "chat", "c1")
    # The connection is fine and the relay did not close it.
    del memory_backend.faults["send_message"]
    assert (await client.request("send", resourceId="c1", message="hi"))["data"] == {
        "sent": True}


async def test_send_backend_hang_times_out_and_nobody_is_stalled(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(backend_timeout=3.0)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        client = await connect(relay)
        other = await connect(relay)
        await other.subscribe("chat", "c1")
        memory_backend.faults["send_message"] = HANG
        start = trio.current_time()
        await client.send({"id": "hang", "type": "send", "resourceId": "c1", "message": "hi"})
        # While the send hangs, another client's pushes flow at once.
        await trio.testing.wait_all_tasks_blocked()
        memory_backend.emit("chat", "c1", {"type": "chunk", "text": "x"})
        assert await other.next_push() == push("chat", "c1", {"type": "chunk", "text": "x"}, 1)
        assert trio.current_time() == start

        reply = await client.reply_to("hang")
        assert trio.current_time() - start == pytest.approx(config.backend_timeout)
        assert reply == error("hang", "backend_error", reply["error"], "chat", "c1")
        assert "timed out" in reply["error"]
        # The connection stays usable.
        del memory_backend.faults["send_message"]
        assert (await client.request("send", resourceId="c1", message="hi"))["data"] == {
            "sent": True}
        assert (await client.subscribe("chat", "c1"))["resourceId"] == "c1"


# --- create (extension) ---------------------------------------------------------------------


async def test_create_replies_with_the_new_chat_and_pushes_to_the_project(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    creator = await connect(memory_relay)
    watcher = await connect(memory_relay)
    await watcher.subscribe("project", "p1")
    reply = await creator.request(
        "create", resource="chat", resourceId="p1", message={"title": "Plans"})
    chat = reply["data"]["chat"]
    assert chat == memory_backend.chats[chat["id"]]
    assert chat["title"] == "Plans" and chat["projectId"] == "p1"
    assert reply == {"id": "r2", "type": "data", "resource": "chat",
                     "resourceId": chat["id"], "data": {"chat": chat}}
    assert await watcher.next_push() == push(
        "project", "p1", {"type": "chat_created", "chat": chat}, 1)
    # The new chat can be subscribed to at once.
    assert (await creator.subscribe("chat", chat["id"]))["data"] == {"messages": []}


async def test_create_without_a_title_uses_the_backend_default(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    reply = await client.request("create", resource="chat", resourceId="p2")
    assert reply["type"] == "data"
    assert reply["data"]["chat"]["projectId"] == "p2"
    assert reply["data"]["chat"]["title"] == "New chat"  # the backend got title None
    assert reply["resourceId"] == reply["data"]["chat"]["id"]


async def test_create_in_an_unknown_project_is_not_found(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    chats_before = dict(memory_backend.chats)
    reply = await client.request(
        "create", resource="chat", resourceId="nope", message={"title": "T"})
    assert reply == error("r2", "not_found", reply["error"], "chat", "nope")
    assert memory_backend.chats == chats_before


# --- 6. unsubscribe -------------------------------------------------------------------------


async def test_unsubscribe_answers_and_stops_the_pushes(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    await client.subscribe("chat", "c1")
    await client.subscribe("project", "p1")
    assert await client.request("unsubscribe", resource="chat", resourceId="c1") == {
        "id": "r4", "type": "data", "resource": "chat", "resourceId": "c1",
        "data": {"unsubscribed": True},
    }
    memory_backend.add_message("c1", "nobody listens here")
    memory_backend.emit("chat", "c1", {"type": "chunk", "text": "nor here"})
    await client.assert_no_push()
    # The other subscription is untouched: the next push is the project's.
    chat = memory_backend.add_chat("p1", "c9")
    assert await client.next_push() == push(
        "project", "p1", {"type": "chat_created", "chat": chat}, 1)


async def test_unsubscribe_without_a_subscription_answers_false(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    assert await client.request("unsubscribe", resource="chat", resourceId="c1") == {
        "id": "r2", "type": "data", "resource": "chat", "resourceId": "c1",
        "data": {"unsubscribed": False},
    }
    assert await client.request("unsubscribe", resource="modelProfiles") == {
        "id": "r3", "type": "data", "resource": "modelProfiles",
        "data": {"unsubscribed": False},
    }
    # Unsubscribing twice: true, then false.
    await client.subscribe("project", "p1")
    first = await client.request("unsubscribe", resource="project", resourceId="p1")
    second = await client.request("unsubscribe", resource="project", resourceId="p1")
    assert first["data"] == {"unsubscribed": True}
    assert second["data"] == {"unsubscribed": False}


# --- 7. modelProfiles -----------------------------------------------------------------------


async def test_model_profiles_subscription_and_push_on_change(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    reply = await client.subscribe("modelProfiles")
    assert reply == subscribed("r2", "modelProfiles", None, {"modelProfiles": PROFILES}, 0)
    changed = [*PROFILES, {"id": "haiku", "name": "Haiku"}]
    memory_backend.set_model_profiles(changed)
    assert await client.next_push() == push(
        "modelProfiles", None, {"modelProfiles": changed}, 1)
    memory_backend.set_model_profiles([])
    assert await client.next_push() == push("modelProfiles", None, {"modelProfiles": []}, 2)


# --- guarantees -----------------------------------------------------------------------------


async def test_every_request_with_an_id_gets_exactly_one_reply(
    autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    requests: list[tuple[Frame, str]] = [
        ({"type": "subscribe", "resource": "chat", "resourceId": "c1"}, "subscribed"),
        ({"type": "subscribe", "resource": "project", "resourceId": "p1"}, "subscribed"),
        ({"type": "subscribe", "resource": "modelProfiles"}, "subscribed"),
        ({"type": "subscribe", "resource": "chat", "resourceId": "c1"}, "subscribed"),
        ({"type": "subscribe", "resource": "chat", "resourceId": "missing"}, "error"),
        ({"type": "send", "resourceId": "c1", "message": {"text": "hi"}}, "data"),
        ({"type": "send", "resourceId": "missing", "message": "hi"}, "error"),
        ({"type": "create", "resource": "chat", "resourceId": "p1",
          "message": {"title": "T"}}, "data"),
        ({"type": "create", "resource": "chat", "resourceId": "missing"}, "error"),
        ({"type": "unsubscribe", "resource": "chat", "resourceId": "c1"}, "data"),
        ({"type": "unsubscribe", "resource": "chat", "resourceId": "c1"}, "data"),
        ({"type": "frobnicate"}, "error"),
        ({"type": "subscribe", "resource": "chat"}, "error"),
        ({"type": "send", "resourceId": "c1"}, "error"),
        ({"type": "auth", "pin": PIN}, "auth_success"),
    ]
    client = await connect(memory_relay)
    expected: dict[Any, str] = {}
    for n, (fields, reply_type) in enumerate(requests * 2):
        request_id: Any = n if n % 3 == 0 else f"req-{n}"  # string and integer ids
        expected[request_id] = reply_type
        await client.send({"id": request_id, **fields})
    replies: dict[Any, list[Frame]] = {}
    with trio.fail_after(10):
        while set(replies) != set(expected):
            frame = await client.receive()
            if frame["id"] is not None:
                replies.setdefault(frame["id"], []).append(frame)
    for frame in await client.frames_until_quiet():  # and nothing more comes
        if frame["id"] is not None:
            replies[frame["id"]].append(frame)
    assert {rid: [f["type"] for f in frames] for rid, frames in replies.items()} == {
        rid: [reply_type] for rid, reply_type in expected.items()
    }


async def test_subscribing_twice_on_one_connection_does_not_double_pushes(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    history = {"messages": memory_backend.messages["c1"]}
    assert await client.subscribe("chat", "c1") == subscribed("r2", "chat", "c1", history, 0)
    assert await client.subscribe("chat", "c1") == subscribed("r3", "chat", "c1", history, 0)
    assert memory_relay.relay.statistics().subscriptions == 1
    for n in range(1, 4):
        memory_backend.emit("chat", "c1", {"n": n})
        assert await client.next_push() == push("chat", "c1", {"n": n}, n)
        await client.assert_no_push()
    # One subscription, so one unsubscribe ends it.
    unsub = await client.request("unsubscribe", resource="chat", resourceId="c1")
    assert unsub["data"] == {"unsubscribed": True}
    memory_backend.emit("chat", "c1", {"n": 4})
    await client.assert_no_push()
    assert memory_backend.open_feeds == {}


async def test_pushes_arrive_in_order_without_gaps_across_interleaved_resources(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    memory_backend.add_chat("p1", "c2")
    events = 150
    clients = [await connect(memory_relay) for _ in range(2)]
    for client in clients:
        await client.subscribe("chat", "c1")
        await client.subscribe("chat", "c2")
        await client.subscribe("project", "p1")
    for n in range(events):
        memory_backend.emit("chat", "c1", {"n": n})
        memory_backend.emit("chat", "c2", {"n": n})
        if n % 10 == 0:
            memory_backend.emit("project", "p1", {"n": n})
        if n % 7 == 0:  # sometimes the writers catch up, sometimes they lag
            await trio.testing.wait_all_tasks_blocked()
    for client in clients:
        by_resource: dict[str, list[Frame]] = {}
        for _ in range(2 * events + events // 10):
            frame = await client.next_push()
            by_resource.setdefault(f"{frame['resource']}:{frame['resourceId']}", []).append(
                frame)
        await client.assert_no_push()
        for key, count, step in (("chat:c1", events, 1), ("chat:c2", events, 1),
                                 ("project:p1", events // 10, 10)):
            frames = by_resource[key]
            assert [f["seq"] for f in frames] == list(range(1, count + 1)), key
            assert [f["data"] for f in frames] == [{"n": n} for n in range(0, events, step)]


class GatedBackend(MemoryBackend):
    """A MemoryBackend whose chat history reads wait for ``gate`` (when set)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None
        self.reading = trio.Event()

    async def get_history(self, chat_id: str) -> Snapshot:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return await super().get_history(chat_id)

    async def during_next_history_read(self, change: Callable[[], None]) -> None:
        """Hold the next history read, run ``change`` while it is held, then let it finish."""
        self.gate, self.reading = trio.Event(), trio.Event()
        with trio.fail_after(5):
            await self.reading.wait()
        change()
        self.gate.set()
        self.gate = None


async def test_events_during_subscription_setup_are_neither_lost_nor_duplicated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = GatedBackend()
    backend.add_chat("p1", "c1")
    backend.add_message("c1", "m-1")

    def two_messages(first: str, second: str) -> Callable[[], None]:
        def add() -> None:
            backend.add_message("c1", first)
            backend.add_message("c1", second)

        return add

    async with open_memory_relay(backend, pin=PIN) as relay:
        first = await connect(relay)
        second = await connect(relay)
        # The first subscriber starts the upstream; messages land while its snapshot is read.
        await first.send({"id": "s1", "type": "subscribe", "resource": "chat", "resourceId": "c1"})
        await backend.during_next_history_read(two_messages("m-2", "m-3"))
        reply = await first.reply_to("s1")
        assert [m["content"] for m in reply["data"]["messages"]] == ["m-1", "m-2", "m-3"]
        backend.add_message("c1", "m-4")
        assert await first.next_push() == message_push(backend, "c1", reply["seq"] + 1)
        await first.assert_no_push()

        # A second subscriber joins the live upstream; messages land while its snapshot is read.
        await second.send({"id": "s2", "type": "subscribe", "resource": "chat",
                           "resourceId": "c1"})
        await backend.during_next_history_read(two_messages("m-5", "m-6"))
        reply2 = await second.reply_to("s2")
        assert [m["content"] for m in reply2["data"]["messages"]] == [
            "m-1", "m-2", "m-3", "m-4", "m-5", "m-6"]
        backend.add_message("c1", "m-7")
        assert await second.next_push() == message_push(backend, "c1", reply2["seq"] + 1)
        await second.assert_no_push()
        # The first subscriber saw every message exactly once, in order.
        pushed = [(await first.next_push()) for _ in range(3)]
        assert [p["data"]["message"]["content"] for p in pushed] == ["m-5", "m-6", "m-7"]
        assert [p["seq"] for p in pushed] == [reply["seq"] + 2, reply["seq"] + 3,
                                              reply2["seq"] + 1]
        await first.assert_no_push()


async def test_one_upstream_per_resource_cancelled_when_the_last_watcher_leaves(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    key = ResourceKey("chat", "c1")
    clients = [await connect(memory_relay) for _ in range(5)]
    for client in clients:
        await client.subscribe("chat", "c1")
    async with memory_relay.relay.listen("chat", "c1") as listener:
        assert memory_backend.open_feeds == {key: 1}
        assert memory_backend.feeds_opened == 1
        memory_backend.add_message("c1", "to all")
        for client in clients:
            assert await client.next_push() == message_push(memory_backend, "c1", 1)
        assert (await next_update(listener)).seq == 1
    # The listener left; the web clients leave one way after another.
    unsub = await clients[0].request("unsubscribe", resource="chat", resourceId="c1")
    assert unsub["data"] == {"unsubscribed": True}
    await clients[1].close()
    await clients[2].abort()  # vanished without a closing handshake
    await clients[3].send("not even JSON")  # still subscribed after a bad request
    await clients[3].close()
    await trio.testing.wait_all_tasks_blocked()
    assert memory_backend.open_feeds == {key: 1}
    assert memory_backend.feeds_closed == 0
    memory_backend.add_message("c1", "to the last one")
    assert await clients[4].next_push() == message_push(memory_backend, "c1", 2)
    await clients[4].abort()
    await trio.testing.wait_all_tasks_blocked()
    # The last one dropped: the upstream lingers for its return, then is cancelled.
    lingering = memory_relay.relay.statistics()
    assert (lingering.subscriptions, lingering.broadcasters, lingering.lingering) == (0, 1, 1)
    assert memory_backend.open_feeds == {key: 1}
    await trio.sleep(memory_relay.relay.config.resume_grace)
    await trio.testing.wait_all_tasks_blocked()
    assert memory_backend.open_feeds == {}
    assert (memory_backend.feeds_opened, memory_backend.feeds_closed) == (1, 1)
    statistics = memory_relay.relay.statistics()
    # Only clients[0], which unsubscribed but stayed connected, is left.
    assert (statistics.connections, statistics.subscriptions, statistics.broadcasters,
            statistics.listeners) == (1, 0, 0, 0)


async def test_slow_client_alone_is_closed_1013_and_can_resume(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock
) -> None:
    config = RelayConfig(outbound_queue_size=4)
    async with open_memory_relay(memory_backend, pin=PIN, config=config) as relay:
        fast = await connect(relay)
        await fast.subscribe("chat", "c1")
        slow = await relay.connect(lockstep=True, authenticate=PIN)  # writes wait for our reads
        await slow.subscribe("chat", "c1")
        start = trio.current_time()
        for n in range(1, 11):
            memory_backend.emit("chat", "c1", {"n": n})
            await trio.testing.wait_all_tasks_blocked()
        for n in range(1, 11):
            assert await fast.next_push() == push("chat", "c1", {"n": n}, n)
        assert trio.current_time() == start  # the fast client never waited for the slow one
        code, reason = await slow.wait_closed()
        assert code == CloseCode.SLOW_CONSUMER == 1013
        assert reason and "slow" in reason
        # It resumes from a fresh snapshot on a new connection; the upstream stayed up.
        again = await connect(relay)
        reply = await again.subscribe("chat", "c1")
        assert reply["seq"] == 10
        memory_backend.emit("chat", "c1", {"n": 11})
        assert await again.next_push() == push("chat", "c1", {"n": 11}, 11)
        assert await fast.next_push() == push("chat", "c1", {"n": 11}, 11)
        assert memory_backend.feeds_opened == 1


# --- in-process listeners -------------------------------------------------------------------


async def test_host_send_reaches_web_clients_and_listeners(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    client = await connect(memory_relay)
    reply = await client.subscribe("chat", "c1")
    async with memory_relay.relay.listen("chat", "c1") as listener:
        assert listener.snapshot == reply["data"]["messages"]
        assert listener.seq == reply["seq"]
        await memory_relay.relay.send("c1", "from the desktop")
        expected = message_push(memory_backend, "c1", 1)
        assert expected["data"]["message"]["content"] == "from the desktop"
        assert await client.next_push() == expected
        assert await next_update(listener) == Update("chat", "c1", 1, expected["data"])


async def test_web_send_reaches_the_host_listener(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    async with memory_relay.relay.listen("chat", "c1") as listener:
        client = await connect(memory_relay)
        reply = await client.request("send", resourceId="c1", message={"text": "from web"})
        assert reply["data"] == {"sent": True}
        update = await next_update(listener)
        assert update == Update("chat", "c1", 1, message_push(memory_backend, "c1", 1)["data"])
        assert update.data["message"]["content"] == "from web"
        # A web client joining later sees the same snapshot and seq as the listener.
        web = await client.subscribe("chat", "c1")
        async with memory_relay.relay.listen("chat", "c1") as late:
            assert (late.snapshot, late.seq) == (web["data"]["messages"], web["seq"])
            assert web["seq"] == listener.seq == 1


# --- the seed's client, unchanged -----------------------------------------------------------


class WsLink:
    """The seed's ws-link.ts ``onmessage`` (Task 7, step 7), ported line by line.

    Only what the browser client reads is read; anything else in a frame is ignored, as it is
    in JavaScript. Handlers record what they were given instead of updating a UI store.
    """

    def __init__(self) -> None:
        self.is_authenticated = False
        self.initial_data: Any = None
        self.subscription_handlers: dict[str, dict[str, Callable[[Any], None]]] = {}
        self.pending_requests: dict[str, dict[str, Callable[[Any], None]]] = {}
        self.ignored: list[Frame] = []

    def onmessage(self, text: str) -> None:
        message = json.loads(text)
        if message["type"] == "auth_success":
            self.is_authenticated = True
            self.initial_data = message.get("data")
            return
        if message["type"] in ("auth_required", "auth_failed"):
            return
        if not message.get("id") and message["type"] == "data" and message.get("resource"):
            for sub_id, handler in list(self.subscription_handlers.items()):
                if message["resource"] in sub_id:
                    handler["onData"](message.get("data"))
            return
        if message.get("id"):
            sub_handler = self.subscription_handlers.get(message["id"])
            if sub_handler is not None:
                has_data = "data" in message
                if message["type"] == "subscribed" or (message["type"] == "data" and has_data):
                    sub_handler["onData"](message.get("data"))
                elif message["type"] == "error":
                    sub_handler["onError"](message.get("error") or "Error")
                elif message["type"] == "data":
                    sub_handler["onComplete"](None)
                    del self.subscription_handlers[message["id"]]
                return
            pending = self.pending_requests.pop(message["id"], None)
            if pending is not None:
                if message["type"] == "error":
                    pending["reject"](message.get("error") or "Unknown error")
                else:
                    pending["resolve"](message.get("data"))
                return
        self.ignored.append(message)


async def test_the_seeds_ws_link_client_works_unchanged(
    memory_backend: MemoryBackend, autojump_clock: trio.testing.MockClock, memory_relay: MemoryRelay
) -> None:
    link = WsLink()
    now = 1_732_579_200_000  # Date.now()
    outcomes: dict[str, Any] = {}
    chat_data: list[Any] = []
    errors: list[Any] = []

    client = await memory_relay.connect()

    async def pump_until(done: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not done():
                link.onmessage(await client.ws.get_message())  # type: ignore[arg-type]

    assert json.loads(await client.ws.get_message()) == {"id": None, "type": "auth_required"}
    await client.send({"id": f"auth-{now}", "type": "auth", "pin": PIN})
    await pump_until(lambda: link.is_authenticated)
    assert link.initial_data == {"projects": list(memory_backend.projects.values()),
                                 "modelProfiles": PROFILES}

    # subscribeToProject(projectId): resolves with data.chats || [].
    sub_project = f"sub-project-{now + 1}"

    def resolve_chats(data: Any) -> None:  # a one-time handler: resolve(data.chats || [])
        del link.subscription_handlers[sub_project]
        outcomes["chats"] = data.get("chats") or []

    link.subscription_handlers[sub_project] = {
        "onData": resolve_chats, "onError": errors.append, "onComplete": errors.append,
    }
    await client.send({"id": sub_project, "type": "subscribe", "resource": "project",
                       "resourceId": "p1"})
    await pump_until(lambda: "chats" in outcomes)
    assert outcomes["chats"] == [memory_backend.chats["c1"]]

    # subscribeToChat(chatId, onData): snapshot, then every push of the chat.
    sub_chat = f"sub-chat-{now + 2}"
    link.subscription_handlers[sub_chat] = {
        "onData": chat_data.append, "onError": errors.append, "onComplete": errors.append,
    }
    await client.send({"id": sub_chat, "type": "subscribe", "resource": "chat",
                       "resourceId": "c1"})
    await pump_until(lambda: len(chat_data) == 1)
    assert chat_data == [{"messages": memory_backend.messages["c1"]}]

    # sendChatMessage(chatId, { message }): resolves with data, rejects on error.
    send_id = f"send-{now + 3}"
    link.pending_requests[send_id] = {
        "resolve": lambda data: outcomes.update(sent=data),
        "reject": errors.append,
    }
    await client.send({"id": send_id, "type": "send", "resourceId": "c1",
                       "message": {"message": "Hello from the web"}})
    await pump_until(lambda: "sent" in outcomes and len(chat_data) == 2)
    assert outcomes["sent"] == {"sent": True}
    assert memory_backend.sent == [("c1", {"message": "Hello from the web"})]
    assert chat_data[1] == {"type": "message", "message": memory_backend.messages["c1"][-1]}
    memory_backend.emit("chat", "c1", {"type": "text-delta", "delta": "Hi!"})
    memory_backend.end_feeds("chat", "c1")
    await pump_until(lambda: len(chat_data) == 4)
    assert chat_data[2:] == [{"type": "text-delta", "delta": "Hi!"}, {"completed": True}]

    # The unsubscribe function: its reply is read by nobody and must break nothing.
    del link.subscription_handlers[sub_chat]
    await client.send({"id": f"unsub-{now + 4}", "type": "unsubscribe", "resource": "chat",
                       "resourceId": "c1"})
    await pump_until(lambda: len(link.ignored) == 1)
    assert link.ignored[0]["id"] == f"unsub-{now + 4}"
    assert errors == []


async def test_create_with_a_model_profile(autojump_clock: trio.abc.Clock) -> None:
    backend = MemoryBackend()
    backend.add_project("p1")
    backend.set_model_profiles([{"id": "echo", "name": "Echo"}])
    async with open_memory_relay(backend, pin=PIN) as memory:
        client = await memory.connect(authenticate=PIN)
        reply = await client.request("create", resource="chat", resourceId="p1",
                                     message={"title": "T", "modelProfileId": "echo"})
        assert reply["data"]["chat"]["modelProfileId"] == "echo"
        refused = await client.request("create", resource="chat", resourceId="p1",
                                       message={"modelProfileId": "nope"})
        assert (refused["code"], refused["error"]) == (
            "backend_error", "unknown model profile 'nope'"
        )
