"""The client's sans-IO session, driven by hand: frames in, actions out, no event loop.

Each test plays the relay's side of a conversation by feeding `ClientSession.receive` and
reading back what the session queued (`Send`, `Abort`) and what each consumer's `Inbox` holds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from trio_relay._client.errors import (
    AuthFailed,
    LockedOut,
    RequestRejected,
    SubscriptionFailed,
    TokenInvalid,
)
from trio_relay._client.events import Chunk, Completed, Event, Key, MessageAdded, Reset
from trio_relay._client.inbox import END, Inbox
from trio_relay._client.session import (
    Abort,
    ClientSession,
    Device,
    Join,
    Pending,
    Resnapshot,
    Resubscribe,
    Send,
    Wire,
)

CHAT: Key = ("chat", "c1")


def pin_session() -> ClientSession:
    return ClientSession(pin="123456")


def sent(session: ClientSession) -> list[dict[str, Any]]:
    """The frames the session queued since the last look (and no abort among them)."""
    actions = session.take_actions()
    assert all(isinstance(action, Send) for action in actions), actions
    return [json.loads(action.text) for action in actions if isinstance(action, Send)]


def aborts(session: ClientSession) -> list[str]:
    return [a.reason for a in session.take_actions() if isinstance(a, Abort)]


def feed(session: ClientSession, **frame: Any) -> None:
    session.receive(json.dumps(frame))


def answer(session: ClientSession, pending: Pending, **frame: Any) -> None:
    feed(session, id=pending.id, **frame)


def subscribed(seq: int | None, epoch: str | None = "e1", **extra: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"type": "subscribed", "resource": "chat", "resourceId": "c1",
                             "data": {"messages": [{"id": f"m{seq}"}]}, **extra}
    if seq is not None:
        reply["seq"] = seq
    if epoch is not None:
        reply["epoch"] = epoch
    return reply


def push(session: ClientSession, seq: int | None, text: str = "x", **extra: Any) -> None:
    frame: dict[str, Any] = {"type": "data", "resource": "chat", "resourceId": "c1",
                             "data": {"type": "chunk", "messageId": "r", "text": text}, **extra}
    if seq is not None:
        frame["seq"] = seq
    session.receive(json.dumps(frame))


def events(inbox: Inbox) -> list[Event]:
    found = []
    while (event := inbox.pop()) is not None:
        found.append(event)
    return found


def join(session: ClientSession, buffer: int = 100) -> tuple[Inbox, Pending]:
    """A consumer starts subscribing to CHAT; returns it and its pending request."""
    inbox = Inbox(CHAT, buffer)
    session.open(inbox)
    pending = session.request(ClientSession.subscribe_fields(CHAT), Join(inbox))
    assert sent(session) == [{"id": pending.id, "type": "subscribe", "resource": "chat",
                              "resourceId": "c1"}]
    return inbox, pending


def joined(session: ClientSession, seq: int = 3, epoch: str | None = "e1") -> Inbox:
    """A consumer subscribed to CHAT at ``seq`` (on a fresh connection if none is live)."""
    if session.connection is None:
        session.connection_made()
    inbox, pending = join(session)
    answer(session, pending, **subscribed(seq, epoch))
    session.opened(inbox)
    assert pending.done and pending.reply is not None
    assert (inbox.snapshot, inbox.seq) == ([{"id": f"m{seq}"}], seq)
    return inbox


def resubscribe(session: ClientSession) -> tuple[Wire, Resubscribe, Pending, dict[str, Any]]:
    """A new connection, and the one resubscription it makes; returns what was sent."""
    session.connection_made()
    [wire] = [w for w in session.to_resubscribe() if session.wants(w)]
    purpose = Resubscribe(wire)
    pending = session.request(ClientSession.resubscribe_fields(wire), purpose)
    [frame] = sent(session)
    return wire, purpose, pending, frame


# --- requests and connections -----------------------------------------------------------------


def test_replies_find_their_request_by_id_and_ids_never_repeat() -> None:
    session = pin_session()
    session.connection_made()
    first = session.request({"type": "send", "resourceId": "c1", "message": "a"})
    second = session.request({"type": "send", "resourceId": "c1", "message": "b"})
    assert [f["id"] for f in sent(session)] == [first.id, second.id]
    assert first.id != second.id
    answer(session, second, type="data", data={})
    assert second.done and second.reply == {"id": second.id, "type": "data", "data": {}}
    assert not first.done and list(session.pending) == [first.id]


def test_losing_the_connection_ends_every_pending_request_without_a_reply() -> None:
    session = pin_session()
    session.connection_made()
    woken: list[str] = []
    pending = session.request({"type": "send"}, wake=lambda: woken.append("yes"))
    session.connection_lost()
    assert pending.done and pending.reply is None and woken == ["yes"]
    assert session.pending == {} and session.connection is None


def test_a_reply_to_a_request_of_an_earlier_connection_is_ignored() -> None:
    session = pin_session()
    session.connection_made()
    inbox, old = join(session)
    session.connection_lost()
    session.connection_made()
    fresh = session.request(ClientSession.subscribe_fields(CHAT), Join(inbox))
    sent(session)
    answer(session, old, **subscribed(9))  # the old connection's reply, arriving late
    assert CHAT not in session.wires and inbox.snapshot == [] and not fresh.done
    answer(session, fresh, **subscribed(4))
    assert inbox.seq == 4 and session.wires[CHAT].consumers == [inbox]


def test_an_old_connection_cannot_end_the_new_one() -> None:
    session = pin_session()
    first = session.connection_made()
    session.connection_lost(first)
    second = session.connection_made()
    session.connection_lost(first)  # a late report about the first connection
    assert session.connection == second


def test_nothing_is_sent_without_a_connection_and_nothing_received_is_read() -> None:
    session = pin_session()
    with pytest.raises(RuntimeError, match="no live connection"):
        session.request({"type": "send"})
    session.receive(json.dumps({"id": "1", "type": "data"}))
    assert session.take_actions() == []


@pytest.mark.parametrize(
    "message", [b'{"id":"1"}', "not json", "[1,2]", '"text"', '{"id":1,"type":"data"}', "{}",
                '{"type":"auth_required"}', '{"type":"data","resource":"nope","seq":1}']
)
def test_frames_the_session_cannot_use_change_nothing(message: str | bytes) -> None:
    session = pin_session()
    inbox = joined(session)
    pending = session.request({"type": "send"})
    sent(session)
    session.receive(message)
    assert not pending.done and events(inbox) == [] and session.take_actions() == []


def test_queued_frames_for_a_lost_connection_are_dropped() -> None:
    session = pin_session()
    session.connection_made()
    session.request({"type": "send"})
    session.connection_lost()
    assert session.take_actions() == []


# --- signing in -------------------------------------------------------------------------------


def test_only_one_of_pin_and_token_and_a_sane_device_name() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ClientSession(pin=None)
    with pytest.raises(ValueError, match="exactly one"):
        ClientSession(pin="1", token="t")
    with pytest.raises(ValueError, match="device_name"):
        ClientSession(pin="1", device_name="  ")
    with pytest.raises(ValueError, match="device_name"):
        ClientSession(pin="1", device_name="x" * 65)


def test_pairing_with_the_pin_then_signing_in_with_the_token_it_got() -> None:
    session = ClientSession(pin="123456", device_name="Laptop")
    assert session.auth_fields() == {"type": "auth", "pin": "123456", "deviceName": "Laptop"}
    session.authenticated({"type": "auth_success", "data": {
        "projects": [{"id": "p"}], "modelProfiles": [{"id": "m"}],
        "device": {"id": "d1", "name": "Laptop", "token": "secret-token"},
    }})
    assert session.device == Device("d1", "Laptop", "secret-token")
    assert (session.projects, session.model_profiles) == ([{"id": "p"}], [{"id": "m"}])
    assert "secret-token" not in repr(session.device)
    # A reconnect signs in with the token: it outlives a change of PIN.
    assert session.auth_fields() == {"type": "auth", "token": "secret-token"}
    # The relay sends no new token when signing in with one: the device keeps its own.
    session.authenticated({"type": "auth_success", "data": {"device": {"id": "d1"}}})
    assert session.device == Device("d1", "", "secret-token")
    assert (session.projects, session.model_profiles) == ([], [])


def test_signing_in_with_a_token_records_the_device() -> None:
    session = ClientSession(pin=None, token="tok")
    assert session.auth_fields() == {"type": "auth", "token": "tok"}
    session.authenticated({"type": "auth_success", "data": {"device": {"id": "d", "name": "P"}}})
    assert session.device == Device("d", "P", "tok")


def test_a_pin_without_a_device_name_is_no_device() -> None:
    session = pin_session()
    session.authenticated({"type": "auth_success", "data": "not a dict"})
    assert session.device is None and session.projects == []


@pytest.mark.parametrize(
    ("reply", "error", "attributes"),
    [
        ({"type": "auth_failed", "error": "Invalid PIN"}, AuthFailed,
         {"code": "auth_failed", "error": "Invalid PIN", "close_code": None}),
        ({"type": "auth_failed", "code": "token_invalid", "error": "revoked"}, TokenInvalid,
         {"code": "token_invalid", "error": "revoked"}),
        ({"type": "auth_failed", "code": "locked_out", "error": "wait", "retryAfter": 30},
         LockedOut, {"code": "locked_out", "retry_after": 30}),
        ({"type": "auth_failed", "code": "locked_out", "error": "wait", "retryAfter": True},
         LockedOut, {"retry_after": None}),
        ({"type": "auth_failed"}, AuthFailed, {"error": "Invalid PIN"}),
        ({"type": "error", "code": "bad_request", "error": "what"}, RequestRejected,
         {"code": "bad_request", "error": "what"}),
        ({"type": "subscribed"}, RequestRejected, {"code": "error"}),
    ],
)
def test_a_refused_sign_in_raises_one_clear_error(
    reply: dict[str, Any], error: type[Exception], attributes: dict[str, Any]
) -> None:
    session = pin_session()
    with pytest.raises(error) as raised:
        session.authenticated(reply)
    assert type(raised.value) is error
    for name, value in attributes.items():
        assert getattr(raised.value, name) == value


# --- subscribing ------------------------------------------------------------------------------


def test_pushes_reach_the_consumer_in_order_and_duplicates_are_dropped() -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    push(session, 4, "a")
    push(session, 4, "again")  # the same seq twice
    push(session, 2, "old")  # from before the snapshot
    push(session, 5, "b")
    assert events(inbox) == [Chunk("r", "a", seq=4), Chunk("r", "b", seq=5)]
    assert inbox.seq == 5 and session.take_actions() == []


def test_a_gap_in_seqs_drops_the_connection_and_starts_the_resource_over() -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    pending = session.request({"type": "send"})
    sent(session)
    push(session, 5, "skipped one")
    assert aborts(session) == ["protocol anomaly: chat push seq 5 after 3"]
    assert session.connection is None and pending.done and pending.reply is None
    push(session, 4)  # whatever still arrives on the dropped connection is not read
    assert events(inbox) == []
    # The next connection asks for a fresh snapshot (no sinceSeq) and hands it on as a Reset.
    _, _, pending, frame = resubscribe(session)
    assert "sinceSeq" not in frame and "epoch" not in frame
    answer(session, pending, **subscribed(6))
    assert events(inbox) == [Reset([{"id": "m6"}], seq=6)]


def test_pushes_without_seq_are_passed_on_as_they_come() -> None:
    session = pin_session()
    session.connection_made()
    inbox, pending = join(session)
    answer(session, pending, **subscribed(None, None))
    push(session, None, "a")
    push(session, None, "a")
    assert events(inbox) == [Chunk("r", "a"), Chunk("r", "a")]


def test_a_push_for_another_resource_or_before_the_reply_reaches_no_one() -> None:
    session = pin_session()
    session.connection_made()
    inbox, pending = join(session)
    push(session, 1)  # the relay has not answered the subscribe yet
    feed(session, type="data", resource="chat", resourceId="c2", seq=1, data={})
    answer(session, pending, **subscribed(1))
    assert events(inbox) == [] and inbox.seq == 1


def test_completed_is_the_last_event_and_an_error_push_fails_the_subscription() -> None:
    session = pin_session()
    inbox = joined(session, seq=0)
    feed(session, type="data", resource="chat", resourceId="c1", seq=1,
         data={"completed": True})
    assert events(inbox) == [Completed(seq=1)] and inbox.final is END
    assert CHAT not in session.wires
    other = joined(session, seq=0)
    feed(session, type="error", resource="chat", resourceId="c1", seq=1,
         code="backend_error", error="the store is down")
    assert isinstance(other.final, SubscriptionFailed)
    assert (other.final.code, other.final.error) == ("backend_error", "the store is down")


def test_two_consumers_share_one_wire_and_the_second_gets_its_own_snapshot() -> None:
    session = pin_session()
    first = joined(session, seq=3)
    second, pending = join(session)
    answer(session, pending, **subscribed(3))  # the relay's snapshot at the same position
    session.opened(second)
    assert session.wires[CHAT].consumers == [first, second]
    assert events(first) == []  # the same position, same epoch, same connection: no Reset
    push(session, 4)
    assert [e.seq for e in events(first)] == [4] and [e.seq for e in events(second)] == [4]


def test_leaving_unsubscribes_only_after_the_last_consumer_and_only_when_live() -> None:
    session = pin_session()
    first = joined(session)
    second = joined(session)
    session.detach(first)
    assert sent(session) == [] and first.closed
    session.detach(second)
    [frame] = sent(session)
    assert frame["type"] == "unsubscribe" and frame["resourceId"] == "c1"
    assert session.wires == {} and session.inboxes == set()
    session.detach(second)  # twice is harmless
    assert sent(session) == []
    # Leaving while disconnected sends nothing: the relay already forgot the connection.
    third = joined(session)
    session.connection_lost()
    session.detach(third)
    assert session.take_actions() == [] and session.wires == {}


def test_leaving_while_another_consumer_of_it_is_joining_keeps_the_wire() -> None:
    session = pin_session()
    first = joined(session)
    second, pending = join(session)
    session.detach(first)
    # No unsubscribe: the wire stays, without consumers, for the one joining.
    assert sent(session) == [] and session.wires[CHAT].consumers == []
    answer(session, pending, **subscribed(5))
    session.opened(second)
    assert session.wires[CHAT].consumers == [second] and second.seq == 5


def test_a_subscribe_answered_after_its_caller_gave_up_is_undone() -> None:
    session = pin_session()
    session.connection_made()
    inbox, pending = join(session)
    session.opened(inbox)
    session.detach(inbox)  # timed out, or cancelled, before the reply
    answer(session, pending, **subscribed(2))
    [frame] = sent(session)
    assert frame["type"] == "unsubscribe" and session.wires == {}


def test_reconnecting_in_the_middle_of_a_subscribe_sends_it_again() -> None:
    session = pin_session()
    session.connection_made()
    inbox, pending = join(session)
    session.connection_lost()
    assert pending.done and pending.reply is None
    # Nothing to resubscribe: the consumer never joined, its own subscribe is sent again.
    session.connection_made()
    assert session.to_resubscribe() == []
    retry = session.request(ClientSession.subscribe_fields(CHAT), Join(inbox))
    sent(session)
    answer(session, retry, **subscribed(7))
    session.opened(inbox)
    assert inbox.seq == 7 and session.wires[CHAT].consumers == [inbox]


# --- resuming after a reconnect ---------------------------------------------------------------


def test_a_resumed_subscription_goes_on_from_where_it_stopped_with_no_reset() -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    push(session, 4)
    events(inbox)
    session.connection_lost()
    wire, _, pending, frame = resubscribe(session)
    assert (frame["sinceSeq"], frame["epoch"]) == (4, "e1")
    answer(session, pending, type="subscribed", resumed=True, seq=4, epoch="e1")
    assert wire.connection == session.connection
    push(session, 5)
    assert events(inbox) == [Chunk("r", "x", seq=5)]


def test_a_reset_reply_hands_every_consumer_the_fresh_snapshot() -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    session.connection_lost()
    _, _, pending, _ = resubscribe(session)
    answer(session, pending, **subscribed(8, "e2", reset=True))
    assert events(inbox) == [Reset([{"id": "m8"}], seq=8)]
    assert (session.wires[CHAT].seq, session.wires[CHAT].epoch) == (8, "e2")


@pytest.mark.parametrize(
    "reply",
    [
        subscribed(3, "e2"),  # another epoch: the same seq means nothing
        subscribed(3, "e1", reset=True),  # the relay says so
        subscribed(3, None),  # a relay without epochs, on another connection
    ],
)
def test_a_snapshot_that_cannot_be_proven_continuous_is_a_reset(reply: dict[str, Any]) -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    session.connection_lost()
    _, _, pending, _ = resubscribe(session)
    answer(session, pending, **reply)
    assert events(inbox) == [Reset([{"id": "m3"}], seq=3)]


def test_a_snapshot_at_the_same_position_and_epoch_is_no_reset() -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    session.connection_lost()
    _, _, pending, _ = resubscribe(session)
    answer(session, pending, **subscribed(3, "e1"))
    assert events(inbox) == []


@pytest.mark.parametrize(
    "reply",
    [
        {"type": "subscribed", "resumed": True, "seq": 2, "epoch": "e1"},
        {"type": "subscribed", "resumed": True, "seq": 3, "epoch": "e9"},
        {"type": "subscribed", "resumed": True, "seq": 3},
    ],
)
def test_resuming_a_position_the_client_did_not_ask_for_is_an_anomaly(
    reply: dict[str, Any],
) -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    session.connection_lost()
    wire, _, pending, _ = resubscribe(session)
    answer(session, pending, **reply)
    assert aborts(session) == [
        "protocol anomaly: the relay resumed a position this client did not ask for"
    ]
    assert wire.stale and wire.seq is None and session.connection is None
    _, _, pending, frame = resubscribe(session)
    assert "sinceSeq" not in frame
    answer(session, pending, **subscribed(5))
    assert events(inbox) == [Reset([{"id": "m5"}], seq=5)]


def test_a_refused_resubscription_fails_that_subscription_only() -> None:
    session = pin_session()
    inbox = joined(session)
    session.connection_lost()
    _, purpose, pending, _ = resubscribe(session)
    answer(session, pending, type="error", code="not_found", error="no chat c1")
    assert not purpose.retry and CHAT not in session.wires
    assert isinstance(inbox.final, SubscriptionFailed) and inbox.final.code == "not_found"
    assert session.connection is not None  # the connection itself carries on


@pytest.mark.parametrize("code", ["rate_limited", "backend_error"])
def test_a_transiently_refused_resubscription_is_retried_on_the_same_connection(
    code: str,
) -> None:
    session = pin_session()
    inbox = joined(session, seq=3)
    session.connection_lost()
    wire, purpose, pending, _ = resubscribe(session)
    answer(session, pending, type="error", code=code, error="later")
    connection = session.connection
    assert connection is not None
    assert purpose.retry and session.needs_retry(wire, connection) and inbox.final is None
    retry = session.request(ClientSession.resubscribe_fields(wire), Resubscribe(wire))
    assert sent(session)[0]["sinceSeq"] == 3
    answer(session, retry, type="subscribed", resumed=True, seq=3, epoch="e1")
    assert not session.needs_retry(wire, connection)  # live again
    assert events(inbox) == []


def test_a_resubscription_answered_after_its_consumer_left_is_undone() -> None:
    session = pin_session()
    inbox = joined(session)
    session.connection_lost()
    wire, _, pending, _ = resubscribe(session)
    session.detach(inbox)
    assert sent(session) == []  # the wire was not live on this connection yet
    answer(session, pending, **subscribed(4))
    [frame] = sent(session)
    assert frame["type"] == "unsubscribe"
    assert not session.needs_retry(wire, 2)


def test_after_a_slow_consumer_close_every_resource_starts_over() -> None:
    session = pin_session()
    joined(session, seq=3)
    session.connection_lost()
    session.forget_positions()
    _, _, _, frame = resubscribe(session)
    assert "sinceSeq" not in frame and "epoch" not in frame


# --- a consumer that falls behind -------------------------------------------------------------


def test_a_consumer_past_its_buffer_gets_a_fresh_snapshot_instead() -> None:
    session = pin_session()
    session.connection_made()
    inbox, pending = join(session, buffer=2)
    answer(session, pending, **subscribed(0))
    session.opened(inbox)
    for seq in (1, 2, 3, 4):
        push(session, seq)
    assert inbox.overflowed and len(inbox.queue) == 2
    assert [e.seq for e in events(inbox)] == [1, 2]
    refill = session.request(ClientSession.subscribe_fields(CHAT), Resnapshot(inbox))
    sent(session)
    push(session, 5)  # dropped: the consumer waits for its snapshot
    answer(session, refill, **subscribed(5))
    assert not inbox.overflowed
    assert events(inbox) == [Reset([{"id": "m5"}], seq=5)] and inbox.snapshot == [{"id": "m5"}]
    push(session, 6)
    assert [e.seq for e in events(inbox)] == [6]


def test_a_stream_that_ends_while_its_consumer_is_behind_fails_it() -> None:
    session = pin_session()
    session.connection_made()
    inbox, pending = join(session, buffer=1)
    answer(session, pending, **subscribed(0))
    push(session, 1)
    push(session, 2)
    feed(session, type="data", resource="chat", resourceId="c1", seq=3,
         data={"completed": True})
    assert [e.seq for e in events(inbox)] == [1]
    assert isinstance(inbox.final, SubscriptionFailed) and inbox.final.code == "client_overflow"


def test_closing_the_client_ends_every_subscription_with_its_error() -> None:
    session = pin_session()
    inbox = joined(session)
    push(session, 4)
    error = AuthFailed("the PIN changed")
    session.end_all(error)
    assert inbox.final is error and session.wires == {}
    assert [e.seq for e in events(inbox)] == [4]  # what came before is still read first
    inbox.put(MessageAdded({}, seq=5))  # and nothing after
    assert events(inbox) == []
