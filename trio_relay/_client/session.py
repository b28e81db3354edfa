"""The client's session with the relay, sans-IO: frames in, frames and aborts out.

Like h11 or wsproto, `ClientSession` does no I/O and knows nothing of Trio. The transport
(`client.py`, `transport.py`) tells it when a connection is made or lost and hands it every
message received; the session updates its state and queues what must happen next, which the
transport takes with `ClientSession.take_actions` right after each call:

- `Send`: one text frame to write on the current connection;
- `Abort`: drop the connection (the relay broke its ordering promise); the client reconnects.

What it keeps:

- a *wire* per subscribed resource: the client's half of the relay's subscription, with the
  resource's ``epoch``, the ``seq`` of the last push and the connection it lives on. After a
  reconnect each wire is subscribed again with ``sinceSeq`` and ``epoch``: the relay sends the
  missed pushes, or a fresh snapshot that each consumer gets as an explicit `Reset`. Pushes at
  or below the last ``seq`` are dropped, so nothing is delivered twice; a gap makes the
  resource start over from a fresh snapshot rather than pass the gap on;
- an `Inbox` per consumer (one per ``client.subscribe``), a bounded queue: a consumer that
  falls more than its buffer behind is given a fresh snapshot later instead;
- the requests of the current connection waiting for their reply, by ``id``. Ids are never
  reused, and losing the connection ends every pending request, so a late reply to a request
  of an earlier connection finds nothing and is ignored;
- how to sign in (PIN or device token; once paired, the token it got).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import attrs

from .errors import SubscriptionFailed, auth_error, rejection
from .events import JSON, RESOURCES, Completed, Key, Reset, parse_event, target
from .inbox import END, End, Inbox

__all__ = [
    "TRANSIENT_CODES",
    "Abort",
    "Action",
    "ClientSession",
    "Device",
    "Frame",
    "Join",
    "Pending",
    "Purpose",
    "Resnapshot",
    "Resubscribe",
    "Send",
    "Wire",
]

Frame: TypeAlias = dict[str, Any]

_SNAPSHOT_FIELDS: Final = {"project": "chats", "chat": "messages", "modelProfiles": "modelProfiles"}
#: Refusals of a resubscription worth retrying on the same connection, with backoff.
TRANSIENT_CODES: Final = frozenset({"rate_limited", "backend_error"})


def _snapshot_items(key: Key, reply: Frame) -> list[JSON]:
    data = reply.get("data")
    items = data.get(_SNAPSHOT_FIELDS[key[0]]) if isinstance(data, dict) else None
    return list(items) if isinstance(items, list) else []


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@attrs.frozen
class Device:
    """This client as a paired device (`RelayClient.device`).

    ``token`` signs it in from now on: keep it somewhere private and pass it as
    ``open_relay_client(..., token=...)`` next time. Messages sent from this client carry
    ``sender.deviceId == id``: that is how a UI tells "You" from the others.
    """

    id: str
    name: str
    token: str = attrs.field(repr=False)


@attrs.define(eq=False)
class Wire:
    """The client's half of the relay's subscription to one resource."""

    key: Key
    consumers: list[Inbox] = attrs.Factory(list)
    epoch: str | None = None
    #: The seq of the last push received (or of the snapshot); None before the first reply,
    #: or after an anomaly, when the resource must start over from a fresh snapshot.
    seq: int | None = None
    #: The connection (its number) the relay holds this subscription on.
    connection: int | None = None
    #: Pushes are dropped until the next snapshot (after a gap or an unverifiable resume).
    stale: bool = False


# --- requests and actions ---------------------------------------------------------------------


@attrs.frozen(eq=False)
class Join:
    """A ``subscribe`` for a new consumer."""

    inbox: Inbox


@attrs.frozen(eq=False)
class Resnapshot:
    """A ``subscribe`` for a consumer that overflowed: it wants a fresh snapshot."""

    inbox: Inbox


@attrs.define(eq=False)
class Resubscribe:
    """A ``subscribe`` after a reconnect, resuming ``wire`` where it left off."""

    wire: Wire
    #: Set by the reply: refused for a reason worth retrying (`TRANSIENT_CODES`).
    retry: bool = False


Purpose: TypeAlias = Join | Resnapshot | Resubscribe | None


@attrs.define(eq=False)
class Pending:
    """A request waiting for its reply; ``wake`` (if any) is called once it is ``done``."""

    id: str
    purpose: Purpose
    wake: Callable[[], object] | None = None
    #: The reply (an ``error`` reply too); None once done means the connection was lost.
    reply: Frame | None = None
    done: bool = False


@attrs.frozen
class Send:
    """Write this text frame on the current connection."""

    text: str


@attrs.frozen
class Abort:
    """Drop the current connection (a protocol anomaly); the client reconnects."""

    reason: str


Action: TypeAlias = Send | Abort


# --- the session ------------------------------------------------------------------------------


class ClientSession:
    """Everything the client knows about its subscriptions and requests, without I/O."""

    def __init__(
        self, *, pin: str | None, token: str | None = None, device_name: str | None = None
    ) -> None:
        if (pin is None) == (token is None):
            raise ValueError("give exactly one of pin and token")
        if device_name is not None and not (1 <= len(device_name.strip()) <= 64):
            raise ValueError("device_name must be 1 to 64 characters")
        self._pin = pin
        self._token = token
        self._device_name = device_name
        #: This client as a paired device, once signed in with a token, or with the PIN and
        #: a ``device_name`` (then it reconnects with the token it got); None otherwise.
        self.device: Device | None = None
        #: The projects and model profiles sent on authenticating (refreshed on reconnect).
        self.projects: list[JSON] = []
        self.model_profiles: list[JSON] = []
        self.wires: dict[Key, Wire] = {}
        #: Consumers not yet closed, and how many joins of each resource await their reply.
        self.inboxes: set[Inbox] = set()
        self.joining: Counter[Key] = Counter()
        #: The current connection's requests waiting for a reply, by id.
        self.pending: dict[str, Pending] = {}
        #: The number of the live connection; None between connections.
        self.connection: int | None = None
        self._connection_numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._actions: list[Action] = []

    def take_actions(self) -> list[Action]:
        """What the transport must do now, in order (each call returns them once)."""
        actions, self._actions = self._actions, []
        return actions

    # --- connections ------------------------------------------------------------------------

    def connection_made(self) -> int:
        """A new connection is open (not yet signed in); returns its number."""
        self.connection = next(self._connection_numbers)
        return self.connection

    def connection_lost(self, connection: int | None = None) -> None:
        """The connection (``connection``, else whichever is live) is gone: every pending
        request is done without a reply, and nothing queued for it will be sent."""
        if self.connection is None or connection not in (None, self.connection):
            return
        self.connection = None
        self._actions = [a for a in self._actions if not isinstance(a, Send)]
        pending, self.pending = list(self.pending.values()), {}
        for request in pending:
            request.done = True
            if request.wake is not None:
                request.wake()

    def auth_fields(self) -> Frame:
        """The ``auth`` request: once paired, the token (it outlives a change of PIN)."""
        token = self.device.token if self.device is not None else self._token
        fields: Frame = {"type": "auth"}
        if token is not None:
            fields["token"] = token
        else:
            fields["pin"] = self._pin
            if self._device_name is not None:
                fields["deviceName"] = self._device_name
        return fields

    def authenticated(self, reply: Frame) -> None:
        """Take the reply to `auth_fields`; raises `AuthFailed` or `RequestRejected`."""
        kind = reply.get("type")
        if kind == "auth_failed":
            raise auth_error(reply)
        if kind != "auth_success":
            raise rejection(reply)
        data = reply.get("data")
        data = data if isinstance(data, dict) else {}
        projects, profiles = data.get("projects"), data.get("modelProfiles")
        self.projects = list(projects) if isinstance(projects, list) else []
        self.model_profiles = list(profiles) if isinstance(profiles, list) else []
        device = data.get("device")
        if isinstance(device, dict) and isinstance(device.get("id"), str):
            new_token = device.get("token")
            token = self.device.token if self.device is not None else self._token
            secret = new_token if isinstance(new_token, str) else token
            if secret is not None:
                self.device = Device(str(device["id"]), str(device.get("name") or ""), secret)

    # --- requests ---------------------------------------------------------------------------

    def request(
        self, fields: Frame, purpose: Purpose = None, wake: Callable[[], object] | None = None
    ) -> Pending:
        """Send a request on the live connection; its `Pending` is done on reply or loss."""
        if self.connection is None:
            raise RuntimeError("no live connection to send a request on")
        pending = Pending(self._next_id(), purpose, wake)
        self.pending[pending.id] = pending
        self._send({"id": pending.id, **fields})
        return pending

    def _next_id(self) -> str:
        return str(next(self._ids))

    def _send(self, frame: Frame) -> None:
        self._actions.append(Send(json.dumps(frame, separators=(",", ":"))))

    def _abort(self, reason: str) -> None:
        self.connection_lost()
        self._actions.append(Abort(reason))

    # --- subscribing ------------------------------------------------------------------------

    def open(self, inbox: Inbox) -> None:
        """A consumer is about to join its resource (send `subscribe_fields` with `Join`)."""
        self.inboxes.add(inbox)
        self.joining[inbox.key] += 1

    def opened(self, inbox: Inbox) -> None:
        """The consumer's join is over, whatever its outcome."""
        self.joining[inbox.key] -= 1
        if not self.joining[inbox.key]:
            del self.joining[inbox.key]

    @staticmethod
    def subscribe_fields(key: Key) -> Frame:
        return {"type": "subscribe", **target(key)}

    def detach(self, inbox: Inbox) -> None:
        """The consumer is gone; the last one of a resource unsubscribes it."""
        if inbox.closed:
            return
        inbox.close()
        self.inboxes.discard(inbox)
        wire = self.wires.get(inbox.key)
        if wire is None:
            return
        if inbox in wire.consumers:
            wire.consumers.remove(inbox)
        if wire.consumers or self.joining[inbox.key]:
            return
        del self.wires[inbox.key]
        # Queued behind everything already sent for this resource, so a later subscribe
        # (queued after it) cannot be undone by it.
        if wire.connection is not None and wire.connection == self.connection:
            self._unsubscribe(inbox.key)

    def _unwanted(self, key: Key) -> bool:
        return key not in self.wires and not self.joining[key]

    def _unsubscribe(self, key: Key) -> None:
        # The reply ({"unsubscribed": ...}) is not waited for: nothing depends on it.
        self._send({"id": self._next_id(), "type": "unsubscribe", **target(key)})

    def forget_positions(self) -> None:
        """Start every resource over from a fresh snapshot (a `Reset`) on the next connection."""
        for wire in self.wires.values():
            wire.seq = wire.epoch = None

    def to_resubscribe(self) -> list[Wire]:
        """The wires to subscribe again on a new connection, in the order they were made."""
        return list(self.wires.values())

    def wants(self, wire: Wire) -> bool:
        """``wire`` is still the live wire of its resource, with consumers."""
        return self.wires.get(wire.key) is wire and bool(wire.consumers)

    def needs_retry(self, wire: Wire, connection: int) -> bool:
        """A resubscription refused on ``connection`` is still worth retrying on it."""
        return (
            self.wires.get(wire.key) is wire
            and wire.connection != connection
            and self.connection == connection
        )

    @staticmethod
    def resubscribe_fields(wire: Wire) -> Frame:
        fields: Frame = {"type": "subscribe", **target(wire.key)}
        if wire.seq is not None and wire.epoch is not None:
            fields["sinceSeq"] = wire.seq
            fields["epoch"] = wire.epoch
        return fields

    def end_all(self, final: BaseException) -> None:
        """The client is closed (for good, or by you): every subscription ends with ``final``."""
        for wire in list(self.wires.values()):
            self._end_wire(wire, final)

    # --- receiving (nothing here waits) -----------------------------------------------------

    def receive(self, message: str | bytes) -> None:
        """One message from the live connection: a reply to its request, or a push."""
        if self.connection is None or not isinstance(message, str):
            return  # the relay sends text only
        try:
            frame = json.loads(message)
        except ValueError:
            return
        if not isinstance(frame, dict):
            return
        request_id = frame.get("id")
        if request_id is not None:
            if isinstance(request_id, str):
                self._deliver(frame)
            return  # a late reply to a request given up on, or not ours
        if frame.get("type") in ("data", "error") and frame.get("resource") in RESOURCES:
            self._on_push(frame)
        # Otherwise auth_required, or an error about a frame the relay could not read.

    def _deliver(self, frame: Frame) -> None:
        pending = self.pending.pop(frame["id"], None)
        if pending is None:
            return
        # Even when its caller gave up: a late `subscribed` must be adopted or undone.
        purpose = pending.purpose
        if isinstance(purpose, Join):
            self._on_join_reply(purpose.inbox, frame)
        elif isinstance(purpose, Resnapshot):
            self._on_resnapshot_reply(purpose.inbox, frame)
        elif isinstance(purpose, Resubscribe):
            purpose.retry = self._on_resubscribe_reply(purpose.wire, frame)
        pending.reply = frame
        pending.done = True
        if pending.wake is not None:
            pending.wake()

    def _on_join_reply(self, inbox: Inbox, reply: Frame) -> None:
        if reply.get("type") != "subscribed":
            return
        wire = self.wires.get(inbox.key)
        if inbox.closed:  # the caller gave up (timeout, cancelled) before this reply
            if wire is not None and wire.consumers:
                self._apply_subscribed(wire, reply, None)
            elif self._unwanted(inbox.key):
                self._unsubscribe(inbox.key)
            return
        if wire is None:
            wire = self.wires[inbox.key] = Wire(inbox.key)
        self._apply_subscribed(wire, reply, inbox)

    def _on_resnapshot_reply(self, inbox: Inbox, reply: Frame) -> None:
        if reply.get("type") != "subscribed":
            return
        wire = self.wires.get(inbox.key)
        if wire is None or inbox not in wire.consumers:
            if self._unwanted(inbox.key):
                self._unsubscribe(inbox.key)
            return
        self._apply_subscribed(wire, reply, inbox)

    def _on_resubscribe_reply(self, wire: Wire, reply: Frame) -> bool:
        """Take a resubscription's reply; True if refused for a reason worth retrying."""
        if self.wires.get(wire.key) is not wire:
            if reply.get("type") == "subscribed" and self._unwanted(wire.key):
                self._unsubscribe(wire.key)
            return False
        if reply.get("type") == "subscribed":
            self._apply_subscribed(wire, reply, None)
            return False
        if reply.get("code") in TRANSIENT_CODES:
            return True
        refused = rejection(reply)
        self._end_wire(wire, SubscriptionFailed(refused.code, refused.error))
        return False

    def _on_push(self, frame: Frame) -> None:
        resource = frame["resource"]
        resource_id = frame.get("resourceId")
        if resource == "modelProfiles" or not isinstance(resource_id, str):
            resource_id = ""
        wire = self.wires.get((resource, resource_id))
        if wire is None or wire.connection != self.connection or wire.stale:
            return  # no longer wanted, or waiting for a fresh snapshot
        seq = _int_or_none(frame.get("seq"))
        if seq is not None and wire.seq is not None:
            if seq <= wire.seq:
                return  # already delivered
            if seq != wire.seq + 1:
                self._anomaly(wire, f"{resource} push seq {seq} after {wire.seq}")
                return
        if seq is not None:
            wire.seq = seq
        if frame.get("type") == "error":
            self._end_wire(wire, SubscriptionFailed(
                str(frame.get("code") or "backend_error"), str(frame.get("error") or "failed")
            ))
            return
        event = parse_event(resource, frame.get("data"), seq)
        for consumer in wire.consumers:
            consumer.put(event)
        if isinstance(event, Completed):
            self._end_wire(wire, END)

    def _apply_subscribed(self, wire: Wire, reply: Frame, requester: Inbox | None) -> None:
        """Take a ``subscribed`` reply for ``wire``: line its pushes up with what each
        consumer has seen. ``requester`` asked for this snapshot (a join or an overflow)."""
        seq = _int_or_none(reply.get("seq"))
        epoch = reply.get("epoch") if isinstance(reply.get("epoch"), str) else None
        if reply.get("resumed") is True:
            if requester is None and epoch is not None and (epoch, seq) == (wire.epoch, wire.seq):
                wire.connection = self.connection  # the missed pushes follow, from seq + 1
                return
            self._anomaly(wire, "the relay resumed a position this client did not ask for")
            return
        items = _snapshot_items(wire.key, reply)
        continuous = (
            reply.get("reset") is not True
            and not wire.stale
            and wire.seq is not None
            and seq == wire.seq
            and (
                (epoch is not None and epoch == wire.epoch)
                # A relay without epochs: only the same live connection proves continuity.
                or (epoch is None and wire.epoch is None and wire.connection == self.connection)
            )
        )
        wire.connection, wire.seq, wire.epoch, wire.stale = self.connection, seq, epoch, False
        if not continuous:
            for consumer in wire.consumers:
                if consumer is not requester:
                    consumer.put(Reset(items, seq=seq))
        if requester is not None:
            if requester in wire.consumers:
                requester.reset(items, seq)
            else:
                requester.start(items, seq)
                wire.consumers.append(requester)

    def _anomaly(self, wire: Wire, why: str) -> None:
        """The relay broke its ordering promise: forget this resource's position (it starts
        over from a fresh snapshot, a `Reset`) and reconnect rather than pass on a gap."""
        wire.seq = wire.epoch = None
        wire.stale = True
        self._abort(f"protocol anomaly: {why}")

    def _end_wire(self, wire: Wire, final: BaseException | End) -> None:
        if self.wires.get(wire.key) is wire:
            del self.wires[wire.key]
        for consumer in wire.consumers:
            consumer.finish(final)
        wire.consumers.clear()

