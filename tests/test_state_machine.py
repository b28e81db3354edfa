"""A hypothesis state machine: many clients doing random things to one in-memory relay.

Clients connect, subscribe (to chats, projects and modelProfiles that exist or not), subscribe
twice, unsubscribe, send (valid, to an unknown chat, empty), create chats, pipeline several
requests without waiting, leave by closing or aborting (sometimes with requests in flight) and
come back resuming with ``sinceSeq``; the host meanwhile streams output, stores messages,
creates chats, changes the model profiles, completes or breaks upstreams, fails backend calls,
and writes while a subscription is being set up. A model kept on the side says what every
client must have seen; after every step the invariants compare it with what the clients
received and what the relay holds:

- every request got exactly one reply with its id, of the expected kind (a request sent just
  before its client left gets at most one);
- per client and resource, pushes' ``seq`` continue from the ``subscribed`` reply without a gap
  or a duplicate, and no push arrives for a resource the client is not subscribed to;
- what a subscriber holds (snapshot, or what it held before it resumed, plus pushes) is
  exactly the backend's state, and every streamed event since it subscribed arrived once;
- the relay holds one broadcaster and one upstream feed per resource someone watches or whose
  last subscriber dropped (it lingers, recording changes, until someone subscribes again or
  ``resume_grace`` passes), and as many subscriptions and connections as the model;
- a client that dropped and comes back resumes with what changed while it was away, even
  when nobody else watched;
- when every client has left, the relay is back at the footprint it had before the first one
  but for the lingering broadcasters, and after ``resume_grace`` exactly at it.

Hypothesis drives rules synchronously, so the relay runs on a trio loop in a background thread
(`RelayLoop`) and each rule runs one async function there. That run's clock is a `MockClock`
that never advances: no timeout of the relay (auth, ping, backend, close, shutdown, resume
grace) can fire during or between steps, so what a step does is decided by the step alone.
Each step ends at a quiet point (`trio.testing.wait_all_tasks_blocked`), where the invariants
are checked. A step that does not reach one within `STEP_TIMEOUT` real seconds is stuck (time
is frozen, so only a deadlock can take that long) and fails the test instead of hanging it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import attrs
import trio
import trio.testing
from _helpers import PIN, Frame, count_tasks_in_run
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from trio_websocket import ConnectionClosed, WebSocketConnection

from trio_relay import BackendError, RelayConfig, RelayStatistics, Snapshot
from trio_relay._wire.protocol import ResourceKey
from trio_relay.testing import MemoryBackend, MemoryRelay, open_memory_relay

#: Real seconds a step may take before it counts as stuck.
STEP_TIMEOUT = 30.0
#: Clients connected at once, at most.
MAX_CLIENTS = 4
#: Time never passes, so token buckets never refill: give every connection more than a run
#: can use, and never strike out (the machine sends deliberately bad requests).
CONFIG = RelayConfig(request_burst=1_000_000, max_strikes=1_000_000)

PROJECTS = ("p1", "p2")
MISSING_PROJECT = "p-missing"
MISSING_CHAT = "c-missing"
MODEL_PROFILES = ResourceKey("modelProfiles", "")
SNAPSHOT_FIELDS = {"chat": "messages", "project": "chats", "modelProfiles": "modelProfiles"}
SEND_KINDS = ("valid", "valid-object", "unknown-chat", "empty")
#: The epoch a client that comes back sends: the one it had, none, or one that never was.
EPOCHS = ("kept", "kept", "kept", "none", "bogus")
#: The backend calls a subscription may need: the snapshot read and opening the feed.
FAILING_CALLS = {
    "chat": ("get_history", "watch_chat"),
    "project": ("list_chats", "watch_project"),
    "modelProfiles": ("get_model_profiles", "watch_model_profiles"),
}
#: What the host may write to each kind of resource while a subscription is set up.
HOST_WRITES = {"chat": ("chunk", "message"), "project": ("chat",), "modelProfiles": ("profiles",)}
T = TypeVar("T")

#: Put into a client's frames where a new connection of it begins.
NEW_CONNECTION: Frame = {"id": None, "type": "new connection (test marker)"}


# --- the trio side ------------------------------------------------------------------------------


class RelayLoop:
    """A memory relay on a trio run in a thread of its own, with time frozen.

    `call` runs one async function in that run and returns its result; exceptions come back
    as themselves. `stop` leaves the relay and joins the thread.
    """

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.relay: MemoryRelay
        self.nursery: trio.Nursery
        self.clock = trio.testing.MockClock(rate=0)  # time stands still unless jumped
        self._token: trio.lowlevel.TrioToken
        self._stop: trio.Event
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="relay-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(STEP_TIMEOUT):
            raise RuntimeError("the relay did not start")
        if self._error is not None:
            raise RuntimeError("the relay did not start") from self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        # Steps and client readers run in this nursery, which outlives the relay, so that on
        # the way out the relay closes whatever clients are still there while they can answer.
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            async with open_memory_relay(self.backend, pin=PIN, config=CONFIG) as relay:
                self.relay = relay
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def step() -> None:
            try:
                result = await fn(*args)
            except Exception as exc:
                future.set_exception(exc)
            except BaseException:
                future.set_exception(RuntimeError("the trio run was cancelled mid-step"))
                raise
            else:
                future.set_result(result)

        try:
            self._token.run_sync_soon(self.nursery.start_soon, step)
        except trio.RunFinishedError:
            raise RuntimeError("the trio run has ended") from self._error
        try:
            return future.result(STEP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise AssertionError(
                f"a step did not reach a quiet point in {STEP_TIMEOUT} s with time frozen:"
                " something in the relay waits for a timeout or is deadlocked"
            ) from None
        except RuntimeError as exc:
            self._thread.join(STEP_TIMEOUT)
            raise exc from self._error

    def stop(self, *, failing: bool = False) -> None:
        """Leave the relay (closing any client still connected, with 1001) and end the run.

        When the test is already ``failing`` the relay may be in any state: cancel it all."""
        if self._thread.is_alive():
            try:
                if failing:
                    self._token.run_sync_soon(self.nursery.cancel_scope.cancel)
                else:
                    self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
            self._thread.join(STEP_TIMEOUT)
        if failing:
            return
        assert not self._thread.is_alive(), "the relay did not shut down"
        if self._error is not None:
            raise AssertionError("the relay's trio run failed") from self._error


# --- a backend whose host writes race a subscription ---------------------------------------------


@attrs.define(eq=False)
class Race:
    """Host writes around the next snapshot read of ``key``: some before it, some after."""

    key: ResourceKey
    before: Callable[[], None]
    checkpoints: int
    after: Callable[[], None]
    ran: bool = False


class RacingBackend(MemoryBackend):
    """A `MemoryBackend` that runs a `Race` inside the next snapshot read of its resource,
    so that the host writes while a subscription is being set up: before the state is read
    (with ``checkpoints`` yields in between, in which the relay may take them in or not) and
    right after it, before the relay has the snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self.race: Race | None = None

    async def _racing(self, key: ResourceKey, read: Callable[[], Awaitable[Snapshot]]) -> Snapshot:
        race = self.race
        if race is None or race.key != key:
            return await read()
        self.race = None
        race.ran = True
        race.before()
        for _ in range(race.checkpoints):
            await trio.lowlevel.checkpoint()
        snapshot = await read()
        race.after()
        return snapshot

    async def get_history(self, chat_id: str) -> Snapshot:
        read = partial(MemoryBackend.get_history, self, chat_id)
        return await self._racing(ResourceKey("chat", chat_id), read)

    async def list_chats(self, project_id: str) -> Snapshot:
        read = partial(MemoryBackend.list_chats, self, project_id)
        return await self._racing(ResourceKey("project", project_id), read)

    async def get_model_profiles(self) -> Snapshot:
        read = partial(MemoryBackend.get_model_profiles, self)
        return await self._racing(MODEL_PROFILES, read)


# --- the model ----------------------------------------------------------------------------------


@attrs.frozen
class Expect:
    """What the reply to one request must be."""

    type: str
    code: str | None = None
    resource: str | None = None
    resource_id: str | None = None
    data: Any = None
    #: Sent right before its client left: the reply may never come (but never comes twice).
    optional: bool = False

    def check(self, frame: Frame, request: Frame) -> None:
        # ``type`` may name alternatives: "subscribed|error".
        assert frame["type"] in self.type.split("|"), f"{request} was answered with {frame}"
        if self.code is not None and frame["type"] == "error":
            assert frame.get("code") == self.code, f"{request} was answered with {frame}"
        if self.resource is not None:
            assert frame.get("resource") == self.resource, f"{request}: {frame}"
            assert frame.get("resourceId") == (self.resource_id or None), f"{request}: {frame}"
        if self.data is not None:
            assert frame.get("data") == self.data, f"{request} was answered with {frame}"
        if frame["type"] == "subscribed":
            assert isinstance(frame.get("seq"), int), frame
            assert isinstance(frame.get("epoch"), str), frame
            resuming = "sinceSeq" in request
            assert frame.get("reset") in ((None, True) if resuming else (None,)), frame
            assert frame.get("resumed") in ((None, True) if resuming else (None,)), frame
            if frame.get("resumed"):
                assert "data" not in frame and not frame.get("reset"), frame
                assert frame["seq"] == request["sinceSeq"], frame
                assert frame["epoch"] == request.get("epoch"), frame
            else:
                assert set(frame["data"]) == {SNAPSHOT_FIELDS[frame["resource"]]}, frame
                assert frame.get("reset") is (True if resuming else None), frame


@attrs.define(eq=False)
class Client:
    """One user: a connection at a time (a new one after `come_back`) and all it received."""

    name: str
    ws: WebSocketConnection
    stream: trio.abc.Stream
    #: Every frame received, in order, over all its connections (`NEW_CONNECTION` between).
    frames: list[Frame] = attrs.Factory(list)
    #: Every request sent, by id, with the reply it must get.
    requests: dict[str, tuple[Frame, Expect]] = attrs.Factory(dict)
    #: The model: resources it is subscribed to (or, while away, held when it left), each
    #: with the streamed events (chunks) emitted since it subscribed.
    subscriptions: dict[ResourceKey, list[Any]] = attrs.Factory(dict)
    #: While away: per held resource, the `RelayMachine.marks` when it left.
    marks: dict[ResourceKey, tuple[int, int, int]] = attrs.Factory(dict)
    away: bool = False
    closed: bool = False
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))

    def __repr__(self) -> str:
        return f"<Client {self.name}>"

    def new_request(self, type: str, expect: Expect, **fields: Any) -> Frame:
        request = {"id": f"{self.name}-r{next(self._ids)}", "type": type, **fields}
        self.requests[request["id"]] = (request, expect)
        return request


@attrs.define
class View:
    """What a client knows of one resource, from its frames: the items and streamed output
    since its snapshot, and where it is in the numbering (for resuming)."""

    items: list[Any]
    chunks: list[Any]
    seq: int
    epoch: str


def key_of(frame: Frame) -> ResourceKey:
    return ResourceKey(frame["resource"], frame.get("resourceId") or "")


def is_push(frame: Frame) -> bool:
    return frame.get("id") is None and "resource" in frame


def wire_id(key: ResourceKey) -> dict[str, str]:
    return {"resourceId": key.resource_id} if key.resource_id else {}


def idle_part(stats: RelayStatistics) -> dict[str, int]:
    """The statistics that must be back at the baseline at once when every client has left
    (kept histories wait out ``resume_grace`` for clients that come back, and so do
    lingering broadcasters, one task each: they are not counted here)."""
    fields = attrs.asdict(stats)
    fields.pop("kept_histories", None)
    lingering = fields.pop("lingering")
    fields["broadcasters"] -= lingering
    fields["tasks"] -= lingering
    return fields


def views_of(client: Client) -> dict[ResourceKey, View]:
    """Replay a client's frames: what it holds of each resource it was ever subscribed to."""
    views: dict[ResourceKey, View] = {}
    for frame in client.frames:
        if frame.get("type") == "subscribed":
            key = key_of(frame)
            if frame.get("resumed"):
                view = views[key]
                assert (view.seq, view.epoch) == (frame["seq"], frame["epoch"]), frame
            else:
                items = frame["data"][SNAPSHOT_FIELDS[key.resource]]
                views[key] = View(list(items), [], frame["seq"], frame["epoch"])
        elif is_push(frame):
            view = views[key_of(frame)]
            view.seq = frame["seq"]
            data: Any = frame.get("data")
            if frame["type"] == "error" or data == {"completed": True}:
                continue
            if frame["resource"] == "chat":
                assert data.get("type") in ("message", "chunk"), frame
                if data["type"] == "message":
                    view.items.append(data["message"])
                else:
                    view.chunks.append(data)
            elif frame["resource"] == "project":
                assert data.get("type") == "chat_created", frame
                view.items.append(data["chat"])
            else:
                view.items = list(data["modelProfiles"])
    return views


_names = itertools.count(1)


class RelayMachine(RuleBasedStateMachine):
    clients = Bundle("clients")
    away = Bundle("away")
    chats = Bundle("chats")

    def __init__(self) -> None:
        super().__init__()
        self.backend = RacingBackend()
        for project in PROJECTS:
            self.backend.add_project(project)
        self.backend.set_model_profiles([{"id": "echo", "name": "Echo"}])
        self.loop = RelayLoop(self.backend)
        self.alive: list[Client] = []
        self.everyone: list[Client] = []
        self.counter = itertools.count(1)
        # What decides whether a client that comes back can resume a resource: writes while
        # nobody watched it (the relay cannot replay them), ends of its upstream (its
        # numbering ends), and things the model cannot know (requests in flight as a client
        # left, handled or not; host writes racing a first subscriber; a broadcaster that
        # failed to start).
        self.unwatched_writes: Counter[ResourceKey] = Counter()
        self.completions: Counter[ResourceKey] = Counter()
        self.uncertain: Counter[ResourceKey] = Counter()
        #: Resources whose last subscriber dropped and that nobody subscribed to since: their
        #: broadcaster lingers (time never passes here until the teardown), and what the host
        #: writes to them is numbered and recorded, so it can be replayed.
        self.lingering: set[ResourceKey] = set()
        #: What a leaving client is subscribed to as its requests in flight are handled.
        self.in_flight_keys: set[ResourceKey] = set()
        self.baseline: RelayStatistics = self.loop.call(self._stats)
        self.baseline_run_tasks: int = self.loop.call(self._run_tasks)
        self.per_connection_tasks: int | None = None

    # --- in the trio loop -----------------------------------------------------------------------

    async def _stats(self) -> RelayStatistics:
        await trio.testing.wait_all_tasks_blocked()
        return self.loop.relay.relay.statistics()

    async def _open_feeds(self) -> set[ResourceKey]:
        await trio.testing.wait_all_tasks_blocked()
        return set(self.backend.open_feeds)

    async def _run_tasks(self) -> int:
        await trio.testing.wait_all_tasks_blocked()
        return count_tasks_in_run()

    async def _after_grace(self) -> RelayStatistics:
        """Let the resume grace pass (kept histories are freed), then the relay's statistics."""
        await trio.testing.wait_all_tasks_blocked()
        self.loop.clock.jump(CONFIG.resume_grace)
        return await self._stats()

    async def _read_all(self, client: Client, ws: WebSocketConnection) -> None:
        try:
            while True:
                text = await ws.get_message()
                assert isinstance(text, str), "the relay sent a binary frame"
                client.frames.append(json.loads(text))
        except ConnectionClosed:
            client.closed = True

    async def _open(self, client: Client | None) -> Client:
        """A new connection, authenticated; for ``client`` (coming back) or a new one."""
        test_client = await self.loop.relay.connect()
        if client is None:
            client = Client(f"u{next(_names)}", test_client.ws, test_client.stream)
        else:
            client.ws, client.stream, client.closed = test_client.ws, test_client.stream, False
            client.frames.append(NEW_CONNECTION)
        self.loop.nursery.start_soon(self._read_all, client, client.ws)
        auth = client.new_request("auth", Expect("auth_success"), pin=PIN)
        await client.ws.send_message(json.dumps(auth))
        return client

    async def _connect(self, client: Client | None, *requests: Frame) -> Client:
        client = await self._open(client)
        await self._send(client, *requests)
        return client

    async def _send(self, client: Client, *requests: Frame) -> None:
        for request in requests:
            await client.ws.send_message(json.dumps(request))
        await trio.testing.wait_all_tasks_blocked()

    async def _send_racing(self, client: Client, request: Frame, race: Race) -> None:
        self.backend.race = race
        await self._send(client, request)
        self.backend.race = None

    async def _send_failing(self, client: Client, request: Frame, method: str) -> None:
        self.backend.faults[method] = BackendError("the backend is down")
        await self._send(client, request)
        del self.backend.faults[method]

    async def _leave(self, client: Client, how: str, requests: list[Frame]) -> None:
        for request in requests:
            await client.ws.send_message(json.dumps(request))
        if how == "close":
            await client.ws.aclose(1000)
        else:
            await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()

    async def _host(self, fn: Callable[..., T], *args: Any) -> T:
        """The host application writes to the backend (in the run: it may wake relay tasks),
        and the relay settles."""
        result = fn(*args)
        await trio.testing.wait_all_tasks_blocked()
        return result

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.loop.call(fn, *args)

    def host(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = self.run(self._host, fn, *args)
        return result

    # --- the model --------------------------------------------------------------------------

    def watched(self) -> set[ResourceKey]:
        return {key for client in self.alive for key in client.subscriptions}

    def marks(self, key: ResourceKey) -> tuple[int, int, int]:
        return self.unwatched_writes[key], self.completions[key], self.uncertain[key]

    def wrote(self, key: ResourceKey, chunk: Any = None) -> None:
        """The backend changed ``key`` (or streamed ``chunk`` on it), just now."""
        if key not in self.watched() and key not in self.lingering:
            self.unwatched_writes[key] += 1
        if chunk is not None:
            for client in self.everyone:  # subscribed, or held by a client that is away
                if key in client.subscriptions:
                    client.subscriptions[key].append(chunk)

    def chats_of(self, project: str) -> list[Any]:
        return [c for c in self.backend.chats.values() if c["projectId"] == project]

    def state_of(self, key: ResourceKey) -> list[Any]:
        if key.resource == "chat":
            return self.backend.messages[key.resource_id]
        if key.resource == "project":
            return self.chats_of(key.resource_id)
        return self.backend.model_profiles

    def exists(self, key: ResourceKey) -> bool:
        if key.resource == "chat":
            return key.resource_id in self.backend.chats
        if key.resource == "project":
            return key.resource_id in self.backend.projects
        return True

    def request_for(self, client: Client, op: tuple[Any, ...], *, in_flight: bool) -> Frame:
        """Build ``op``'s request and apply it to the model (requests are handled in order).

        ``in_flight``: sent just before the client leaves; it may or may not be handled."""
        kind, key = op[0], op[1]
        if in_flight:
            self.uncertain[key] += 1
        if kind == "subscribe" and not in_flight:
            self.lingering.discard(key)  # a joiner ends the wait, whether it succeeds or not
        if kind == "subscribe":
            if self.exists(key):
                expect = Expect("subscribed", resource=key.resource, resource_id=key.resource_id)
                if not in_flight:
                    client.subscriptions[key] = []
                else:
                    self.in_flight_keys.add(key)
            else:
                expect = Expect("error", code="not_found")
            return client.new_request(
                "subscribe", attrs.evolve(expect, optional=in_flight),
                resource=key.resource, **wire_id(key),
            )
        if kind == "unsubscribe":
            # Requests in flight are answered in order if at all (as fast as the relay writes):
            # an unsubscribe answers as the ones before it left the subscriptions.
            was = key in (self.in_flight_keys if in_flight else client.subscriptions)
            self.in_flight_keys.discard(key)
            if not in_flight:
                client.subscriptions.pop(key, None)
            return client.new_request(
                "unsubscribe",
                Expect("data", resource=key.resource, resource_id=key.resource_id,
                       data={"unsubscribed": was}, optional=in_flight),
                resource=key.resource, **wire_id(key),
            )
        assert kind == "send"
        how = op[2]
        n = next(self.counter)
        message: Any = {
            "valid": f"hello {n}", "valid-object": {"text": f"hello {n}"},
            "unknown-chat": "hello", "empty": "",
        }[how]
        chat_id = MISSING_CHAT if how == "unknown-chat" else key.resource_id
        if how == "empty":
            expect = Expect("error", code="bad_request")
        elif chat_id in self.backend.chats:
            expect = Expect("data", resource="chat", resource_id=chat_id, data={"sent": True})
            if not in_flight:
                self.wrote(key)
        else:
            expect = Expect("error", code="not_found")
        return client.new_request(
            "send", attrs.evolve(expect, optional=in_flight), resourceId=chat_id, message=message
        )

    # --- strategies -------------------------------------------------------------------------

    def keys(self) -> st.SearchStrategy[ResourceKey]:
        return st.one_of(
            st.builds(ResourceKey, st.just("chat"), self.chats),
            st.builds(ResourceKey, st.just("chat"), st.just(MISSING_CHAT)),
            st.builds(ResourceKey, st.just("project"),
                      st.sampled_from((*PROJECTS, MISSING_PROJECT))),
            st.just(MODEL_PROFILES),
        )

    def existing_keys(self) -> st.SearchStrategy[ResourceKey]:
        return st.one_of(
            st.builds(ResourceKey, st.just("chat"), self.chats),
            st.builds(ResourceKey, st.just("project"), st.sampled_from(PROJECTS)),
            st.just(MODEL_PROFILES),
        )

    def ops(self) -> st.SearchStrategy[tuple[Any, ...]]:
        return st.one_of(
            st.tuples(st.just("subscribe"), self.keys()),
            st.tuples(st.just("unsubscribe"), self.keys()),
            st.tuples(st.just("send"), st.builds(ResourceKey, st.just("chat"), self.chats),
                      st.sampled_from(SEND_KINDS)),
        )

    # --- setup ------------------------------------------------------------------------------

    @initialize(target=chats)
    def seed_chats(self) -> Any:
        ids = []
        for project, chat_id in (("p1", "c0"), ("p1", "c1"), ("p2", "c2")):
            self.host(self.backend.add_chat, project, chat_id)
            ids.append(chat_id)
        self.host(self.backend.add_message, "c0", "an old message")
        return multiple(*ids)

    @initialize(target=clients)
    def first_clients(self) -> Any:
        # Without clients most rules cannot run; start with two (connect adds more).
        first = [self.run(self._connect, None) for _ in range(2)]
        self.alive.extend(first)
        self.everyone.extend(first)
        return multiple(*first)

    # --- rules: clients ---------------------------------------------------------------------

    @precondition(lambda self: len(self.alive) < MAX_CLIENTS)
    @rule(target=clients)
    def connect(self) -> Client:
        client = self.run(self._connect, None)
        self.alive.append(client)
        self.everyone.append(client)
        return client

    @rule(client=clients, data=st.data())
    def subscribe(self, client: Client, data: st.DataObject) -> None:
        key = data.draw(self.keys(), label="key")
        self.run(self._send, client, self.request_for(client, ("subscribe", key), in_flight=False))

    @rule(client=clients, data=st.data())
    def subscribe_twice(self, client: Client, data: st.DataObject) -> None:
        """Two subscribes to one resource, the second sent before the first is answered."""
        key = data.draw(self.keys(), label="key")
        first = self.request_for(client, ("subscribe", key), in_flight=False)
        second = self.request_for(client, ("subscribe", key), in_flight=False)
        self.run(self._send, client, first, second)

    @rule(client=clients, data=st.data())
    def unsubscribe(self, client: Client, data: st.DataObject) -> None:
        # Mostly something it is subscribed to; sometimes anything at all.
        mine = sorted(client.subscriptions)
        keys = st.sampled_from(mine) | self.keys() if mine else self.keys()
        key = data.draw(keys, label="key")
        self.run(self._send, client, self.request_for(client, ("unsubscribe", key),
                                                       in_flight=False))

    @rule(client=clients, chat=chats, how=st.sampled_from(SEND_KINDS))
    def send(self, client: Client, chat: str, how: str) -> None:
        op = ("send", ResourceKey("chat", chat), how)
        self.run(self._send, client, self.request_for(client, op, in_flight=False))

    @rule(
        target=chats,
        client=clients,
        project=st.sampled_from((*PROJECTS, MISSING_PROJECT)),
        title=st.none() | st.sampled_from(("Plans", "Ideas")),
    )
    def create(self, client: Client, project: str, title: str | None) -> Any:
        exists = project in self.backend.projects
        # The new chat's id is known only from the reply: checked below.
        expect = Expect("data") if exists else Expect("error", code="not_found")
        message = {"title": title} if title is not None else {}
        request = client.new_request(
            "create", expect, resource="chat", resourceId=project, message=message
        )
        if exists:
            self.wrote(ResourceKey("project", project))
        self.run(self._send, client, request)
        if not exists:
            return multiple()
        chat = self.chats_of(project)[-1]
        assert chat["title"] == (title or "New chat")
        [reply] = [f for f in client.frames if f.get("id") == request["id"]]
        assert reply["type"] == "data", reply
        assert reply["resourceId"] == chat["id"]
        assert reply["data"] == {"chat": chat}
        return chat["id"]

    @rule(client=clients, data=st.data())
    def pipeline(self, client: Client, data: st.DataObject) -> None:
        """Several requests sent back to back; the relay handles them in order."""
        ops = data.draw(st.lists(self.ops(), min_size=2, max_size=5), label="ops")
        requests = [self.request_for(client, op, in_flight=False) for op in ops]
        self.run(self._send, client, *requests)

    @rule(
        target=away,
        client=consumes(clients),
        how=st.sampled_from(("close", "abort")),
        data=st.data(),
    )
    def leave(self, client: Client, how: str, data: st.DataObject) -> Client:
        """Close cleanly or drop the stream, possibly with requests still in flight."""
        ops = data.draw(st.lists(self.ops(), max_size=3), label="in flight")
        self.go_away(client, how, ops)
        return client

    @precondition(lambda self: len(self.alive) < MAX_CLIENTS)
    @rule(target=clients, client=consumes(away), epoch=st.sampled_from(EPOCHS))
    def come_back(self, client: Client, epoch: str) -> Client:
        self.resume(client, epoch)
        return client

    @rule(
        target=clients,
        client=consumes(clients),
        how=st.sampled_from(("close", "abort")),
        data=st.data(),
        epoch=st.sampled_from(EPOCHS),
    )
    def blip(self, client: Client, how: str, data: st.DataObject, epoch: str) -> Client:
        """The connection drops, the host may write to what the client held, and it comes
        back at once, resuming (the same as `leave` then `come_back`, made likely)."""
        self.go_away(client, how, [])
        if client.subscriptions:
            key = data.draw(st.sampled_from(sorted(client.subscriptions)), label="key")
            kinds = data.draw(
                st.lists(st.sampled_from(HOST_WRITES[key.resource]), max_size=2), label="writes"
            )
            for kind in kinds:
                # (A chat the host creates here is not added to the chats bundle.)
                chunk, _ = self.host(self.host_write, key, kind)
                self.wrote(key, chunk)
        self.resume(client, epoch)
        return client

    def go_away(self, client: Client, how: str, in_flight: list[tuple[Any, ...]]) -> None:
        client.marks = {key: self.marks(key) for key in client.subscriptions}
        self.in_flight_keys = set(client.subscriptions)
        requests = [self.request_for(client, op, in_flight=True) for op in in_flight]
        self.alive.remove(client)
        client.away = True
        self.run(self._leave, client, how, requests)
        assert client.closed, f"{client} did not see its connection end"
        # A dropped connection (not a clean 1000 close, which says the client is done) leaves
        # what it alone watched lingering.
        watched = self.watched()
        touched = {op[1] for op in in_flight if op[0] in ("subscribe", "unsubscribe")}
        if how == "abort":
            self.lingering |= set(client.subscriptions) - watched - touched
        # A subscribe or unsubscribe in flight may or may not have been handled, and a
        # subscribe handled may have been live or still joining as the connection ended
        # (which lingers, or not): the relay says which.
        open_feeds = self.run(self._open_feeds)
        for key in touched - watched:
            if key in open_feeds:
                self.lingering.add(key)
            else:
                self.lingering.discard(key)

    def resume(self, client: Client, epoch: str) -> None:
        """Reconnect and resubscribe to what it held, with ``sinceSeq`` (and its ``epoch``):
        it resumes with exactly the pushes it missed, or gets a fresh snapshot (reset)."""
        views = views_of(client)
        requests, must = [], {}
        for key in sorted(client.subscriptions):
            view = views[key]
            fields: dict[str, Any] = {"resource": key.resource, **wire_id(key),
                                      "sinceSeq": view.seq}
            if epoch != "none":
                fields["epoch"] = view.epoch if epoch == "kept" else "not-an-epoch"
            nothing_lost = client.marks[key] == self.marks(key)
            unknowable = client.marks[key][2] != self.uncertain[key]
            if epoch == "kept" and nothing_lost:
                must[key] = "resumed"  # nothing the relay cannot replay happened meanwhile
            elif epoch != "kept" or not unknowable:
                must[key] = "reset"
            requests.append(client.new_request(
                "subscribe", Expect("subscribed", resource=key.resource,
                                    resource_id=key.resource_id), **fields,
            ))
            self.lingering.discard(key)  # it joins its lingering broadcaster, if any
        self.run(self._connect, client, *requests)
        client.away = False
        self.alive.append(client)
        for request in requests:
            [reply] = [f for f in client.frames if f.get("id") == request["id"]]
            key = key_of(reply)
            outcome = "resumed" if reply.get("resumed") else "reset"
            assert must.get(key, outcome) == outcome, (
                f"{client} coming back to {key} was {outcome}, expected {must[key]}: {reply}"
            )
            if outcome == "reset":
                client.subscriptions[key] = []  # streamed output from the snapshot on

    def host_write(self, key: ResourceKey, kind: str) -> tuple[Any, str | None]:
        """One write of the host to ``key``: returns the chunk streamed, the chat created."""
        n = next(self.counter)
        if kind == "chunk":
            chunk = {"type": "chunk", "text": f"streamed {n}"}
            self.backend.emit("chat", key.resource_id, chunk)
            return chunk, None
        if kind == "message":
            self.backend.add_message(key.resource_id, f"from the host {n}")
        elif kind == "chat":
            return None, self.backend.add_chat(key.resource_id, None, "Made by the host")["id"]
        else:
            self.backend.set_model_profiles([{"id": "echo", "name": "Echo"}, {"id": f"m{n}"}])
        return None, None

    # --- rules: the host backend ------------------------------------------------------------

    @rule(chat=chats)
    def emit_chunk(self, chat: str) -> None:
        data = {"type": "chunk", "text": f"chunk {next(self.counter)}"}
        self.wrote(ResourceKey("chat", chat), data)
        self.host(self.backend.emit, "chat", chat, data)

    @rule(chat=chats)
    def add_message(self, chat: str) -> None:
        self.wrote(ResourceKey("chat", chat))
        self.host(self.backend.add_message, chat, f"from the host {next(self.counter)}")

    @rule(target=chats, project=st.sampled_from(PROJECTS))
    def host_creates_chat(self, project: str) -> str:
        self.wrote(ResourceKey("project", project))
        chat = self.host(self.backend.add_chat, project, None, "Made by the host")
        return str(chat["id"])

    @rule(extra=st.integers(0, 2))
    def change_model_profiles(self, extra: int) -> None:
        n = next(self.counter)
        profiles = [{"id": "echo", "name": "Echo"}] + [{"id": f"m{n}.{i}"} for i in range(extra)]
        self.wrote(MODEL_PROFILES)
        self.host(self.backend.set_model_profiles, profiles)

    @precondition(lambda self: bool(self.watched() | self.lingering))
    @rule(data=st.data(), fails=st.booleans())
    def upstream_ends(self, data: st.DataObject, fails: bool) -> None:
        """The upstream of a watched (or lingering) resource completes, or fails: every
        subscriber gets one last push (``completed``, or an error) and is no longer
        subscribed; a lingering broadcaster ends, and its history is not kept."""
        key = data.draw(st.sampled_from(sorted(self.watched() | self.lingering)), label="key")
        self.lingering.discard(key)
        subscribers = [c for c in self.alive if key in c.subscriptions]
        for client in subscribers:
            del client.subscriptions[key]
        self.completions[key] += 1
        error = BackendError("the upstream broke") if fails else None
        self.host(self.backend.end_feeds, key.resource, key.resource_id, error)
        for client in subscribers:
            last = [f for f in client.frames if is_push(f) and key_of(f) == key][-1]
            if fails:
                assert last["type"] == "error" and last["code"] == "backend_error", last
            else:
                assert last["type"] == "data" and last["data"] == {"completed": True}, last

    @rule(client=clients, data=st.data())
    def backend_fails(self, client: Client, data: st.DataObject) -> None:
        """One backend call the request needs raises: the request gets an error reply, and
        nothing else changes (a subscription it replaced stays)."""
        what = data.draw(st.sampled_from(("subscribe", "send", "create")), label="request")
        if what == "subscribe":
            key = data.draw(self.existing_keys(), label="key")
            snapshot, feed = FAILING_CALLS[key.resource]
            method = data.draw(st.sampled_from((snapshot, feed)), label="failing")
            # The relay calls it only if it starts a broadcaster or needs a fresh snapshot, so
            # the subscription may also succeed.
            expect = Expect("subscribed|error", code="backend_error", resource=key.resource,
                            resource_id=key.resource_id)
            request = client.new_request("subscribe", expect, resource=key.resource,
                                         **wire_id(key))
            if key not in self.watched():
                self.uncertain[key] += 1  # a broadcaster that fails to start drops what was kept
            self.lingering.discard(key)
        elif what == "send":
            method, chat = "send_message", data.draw(self.chats, label="chat")
            request = client.new_request(
                "send", Expect("error", code="backend_error"), resourceId=chat, message="hi"
            )
        else:
            method = "create_chat"
            request = client.new_request(
                "create", Expect("error", code="backend_error"), resource="chat",
                resourceId=PROJECTS[0], message={"title": "Never"},
            )
        self.run(self._send_failing, client, request, method)
        if what == "subscribe":
            [reply] = [f for f in client.frames if f.get("id") == request["id"]]
            if reply["type"] == "subscribed":
                client.subscriptions[key] = []

    @rule(target=chats, client=clients, data=st.data())
    def subscribe_racing_the_host(self, client: Client, data: st.DataObject) -> Any:
        """The host writes while the subscription is being set up, around its snapshot read.

        Every write must reach the new subscriber exactly once, in its snapshot or as a
        push; streamed output (which no snapshot holds) reaches it from the snapshot's
        point on: a suffix of what was emitted. Other subscribers get everything.
        """
        key = data.draw(self.existing_keys(), label="key")
        kinds = HOST_WRITES[key.resource]
        before = data.draw(st.lists(st.sampled_from(kinds), max_size=3), label="before")
        checkpoints = data.draw(st.integers(0, 3), label="checkpoints")
        after = data.draw(st.lists(st.sampled_from(kinds), max_size=3), label="after")
        chunks: list[Any] = []
        created: list[str] = []

        def write(kinds: list[str]) -> None:
            for kind in kinds:
                chunk, chat_id = self.host_write(key, kind)
                chunks.extend([chunk] if chunk else [])
                created.extend([chat_id] if chat_id else [])

        if (before or after) and key not in self.watched():
            self.uncertain[key] += 1  # whether the relay can vouch for them is up to timing
        race = Race(key, partial(write, before), checkpoints, partial(write, after))
        request = self.request_for(client, ("subscribe", key), in_flight=False)
        self.run(self._send_racing, client, request, race)
        if not race.ran:  # the relay had a current snapshot and read none: write afterwards
            self.host(race.before)
            self.host(race.after)
        for other in self.everyone:
            if other is not client and key in other.subscriptions:
                other.subscriptions[key].extend(chunks)
        got = views_of(client)[key].chunks
        assert got == chunks[len(chunks) - len(got):], (
            f"{client} got streamed output {got} of {key}, not a suffix of {chunks}"
        )
        client.subscriptions[key] = got
        return multiple(*created)

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def every_request_answered_exactly_once(self) -> None:
        for client in self.everyone:
            replies: dict[str, list[Frame]] = {}
            for frame in client.frames:
                if frame.get("id") is not None:
                    assert frame["id"] in client.requests, f"{client} got a stray {frame}"
                    replies.setdefault(frame["id"], []).append(frame)
            for request_id, (request, expect) in client.requests.items():
                got = replies.get(request_id, [])
                assert len(got) <= 1, f"{request} was answered {len(got)} times: {got}"
                if not got:
                    assert expect.optional, f"{client}: {request} was never answered"
                    continue
                expect.check(got[0], request)

    @invariant()
    def pushes_in_order_and_only_while_subscribed(self) -> None:
        for client in self.everyone:
            live: dict[ResourceKey, int] = {}  # resource -> seq of the last frame for it
            previous: Frame = NEW_CONNECTION
            for frame in client.frames:
                if previous is NEW_CONNECTION:
                    assert frame == {"id": None, "type": "auth_required"}, frame
                previous = frame
                if frame is NEW_CONNECTION:
                    live = {}
                elif frame.get("id") is not None:
                    request, _ = client.requests[frame["id"]]
                    if frame["type"] == "subscribed":
                        live[key_of(frame)] = frame["seq"]
                    elif request["type"] == "unsubscribe":
                        live.pop(key_of(frame), None)
                elif frame["type"] != "auth_required":
                    assert "resource" in frame, f"{client} got an unexpected push {frame}"
                    key = key_of(frame)
                    assert key in live, f"{client} got a push for {key}, not subscribed: {frame}"
                    assert frame["seq"] == live[key] + 1, (
                        f"{client}: push for {key} has seq {frame['seq']} after {live[key]}"
                    )
                    live[key] = frame["seq"]
                    if frame["type"] == "error" or frame["data"] == {"completed": True}:
                        del live[key]
            if not client.away:
                assert set(live) == set(client.subscriptions), (
                    f"{client} is subscribed to {sorted(live)} by its frames, "
                    f"to {sorted(client.subscriptions)} by the model"
                )

    @invariant()
    def subscribers_hold_exactly_the_backend_state(self) -> None:
        for client in self.alive:
            views = views_of(client)
            for key, chunks in client.subscriptions.items():
                view = views[key]
                assert view.items == self.state_of(key), (
                    f"{client} holds {view.items} of {key}, the backend {self.state_of(key)}"
                )
                assert view.chunks == chunks, f"{client} missed or repeated output of {key}"

    @invariant()
    def relay_holds_what_the_model_says(self) -> None:
        stats = self.run(self._stats)
        watched = self.watched()
        assert not watched & self.lingering, "the model lets a watched resource linger"
        live = watched | self.lingering
        assert stats.connections == len(self.alive), stats
        assert stats.authenticated_connections == len(self.alive), stats
        assert stats.subscriptions == sum(len(c.subscriptions) for c in self.alive), stats
        assert stats.broadcasters == len(live), (
            f"{stats}, watched: {sorted(watched)}, lingering: {sorted(self.lingering)}")
        assert stats.lingering == len(self.lingering), (
            f"{stats}, lingering: {sorted(self.lingering)}")
        assert dict(self.backend.open_feeds) == dict.fromkeys(live, 1)
        assert self.backend.feeds_opened - self.backend.feeds_closed == len(live)
        assert stats.listeners == 0
        # Each connection costs the same number of tasks at a quiet point, each broadcaster
        # (lingering ones too) one; a subscription is not a task.
        extra = stats.tasks - self.baseline.tasks - stats.broadcasters
        if not self.alive:
            assert extra == 0, f"{stats}: tasks left behind (baseline {self.baseline})"
            assert idle_part(stats) == idle_part(self.baseline)
            assert self.run(self._run_tasks) == self.baseline_run_tasks + len(self.lingering)
        else:
            per_connection, rest = divmod(extra, len(self.alive))
            assert rest == 0, f"{stats}: tasks do not add up (baseline {self.baseline})"
            if self.per_connection_tasks is None:
                self.per_connection_tasks = per_connection
            assert per_connection == self.per_connection_tasks, stats

    # --- all leave ----------------------------------------------------------------------------

    def teardown(self) -> None:
        # Hypothesis tears down in a ``finally``: after a failed step, only clean up, so that
        # the failure is reported as itself.
        if sys.exc_info()[1] is not None:
            self.loop.stop(failing=True)
            return
        try:
            lingering = self.watched() | self.lingering  # all that is watched, dropped
            for client in list(self.alive):
                self.alive.remove(client)
                client.away = True
                self.run(self._leave, client, "abort", [])
            stats = self.run(self._stats)
            assert idle_part(stats) == idle_part(self.baseline), (
                f"after all left: {stats}, at first: {self.baseline}"
            )
            assert stats.lingering == stats.broadcasters == len(lingering), (
                f"after all left: {stats}, lingering: {sorted(lingering)}")
            assert self.run(self._run_tasks) == self.baseline_run_tasks + len(lingering), (
                "tasks left running")
            assert dict(self.backend.open_feeds) == dict.fromkeys(lingering, 1)
            assert self.backend.feeds_closed + len(lingering) == self.backend.feeds_opened
            # What is kept for clients that resume goes once the grace period has passed,
            # lingering broadcasters and their upstreams included.
            stats = self.run(self._after_grace)
            assert stats == self.baseline, f"after the grace: {stats}, at first: {self.baseline}"
            assert self.run(self._run_tasks) == self.baseline_run_tasks
            assert dict(self.backend.open_feeds) == {}
            assert self.backend.feeds_closed == self.backend.feeds_opened
        except BaseException:
            self.loop.stop(failing=True)
            raise
        self.loop.stop()


RelayMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRelayStateMachine = RelayMachine.TestCase
