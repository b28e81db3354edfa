"""The bus on Redis: several relay processes number, keep and fan out each resource's events
through one Redis (``trio-relay serve --broker redis://HOST:PORT/DB``).

Per resource key, three Redis keys share one Cluster hash slot through the hash tag
``{<resource>}``: ``<prefix>:{chat:abc}:meta`` (a hash: ``epoch`` and ``seq``),
``...:stream`` (a capped Stream, the replay buffer: entry id ``<seq>-0``, fields ``t`` (Redis
time, ms) and ``d`` (the event's JSON)), and the pub/sub channel ``...:live``. One Lua script
assigns the next seqs, appends to the Stream and publishes, atomically; a batch of forwarded
changes for several resources is one call (one round trip).

The epoch is a random string that lives in the meta hash; it changes only when that history
is lost: the meta is gone (Redis restarted empty, the key was evicted) or the bus itself had
to drop queued changes of the resource (`RedisBus.forward` while Redis was away too long).

coredis runs on Trio through anyio. What it does not give a Trio program is worked around
in `_Redis` alone (see its docstring): every call is bounded there and every failure becomes
one `BusError`.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from loguru import logger

try:
    import coredis
except ImportError as missing:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "the Redis bus needs coredis: pip install 'trio-relay[redis]'") from missing
from coredis.exceptions import RedisError
from coredis.patterns.pubsub import PubSub
from coredis.retry import NoRetryPolicy

from .._errors import leaves, raise_single
from .._wire.protocol import JSON, ResourceKey
from .bus import BusError, BusEvent, EpochChanged, Position

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["RedisBus", "open_redis_bus", "redacted_url"]

T = TypeVar("T")

#: Live messages queued for one follower before it is told to catch up from the Stream
#: instead (a slow consumer must not make the process's memory grow without bound).
FOLLOWER_QUEUE = 4096
#: How long a dedupe mark of one node's last batch for one key is kept: longer than any retry
#: of that batch can take once Redis answers again.
MARK_TTL_MS = 600_000

# KEYS: per group of one resource: meta, stream, mark (this node's last batch for it).
# ARGV: maxlen, stream ttl (ms), batch number ('' = no dedupe), mark ttl (ms), then per group:
# channel, a fresh epoch, force ('1' = start a new epoch whatever is there), n, n JSON texts.
# Returns per group: epoch, seq (the resource's last seq after the call).
PUBLISH_LUA = """
local maxlen, ttl, batch, mark_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = redis.call('TIME')
local ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
local out = {}
local a = 5
for g = 0, #KEYS / 3 - 1 do
  local meta, stream, mark = KEYS[3 * g + 1], KEYS[3 * g + 2], KEYS[3 * g + 3]
  local channel, fresh, force, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local first = a + 4
  a = first + n
  local epoch = redis.call('HGET', meta, 'epoch')
  local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
  local done = false
  if batch ~= '' then
    -- A retry of a batch whose answer was lost (a timeout, a dropped connection) is applied
    -- once: this node's batches are numbered and sent in order.
    local last = redis.call('GET', mark)
    done = last ~= false and tonumber(last) >= tonumber(batch)
  end
  if not done then
    local created = false
    if force == '1' or not epoch then
      -- A new epoch restarts the numbering, so the old Stream (if any) must go.
      redis.call('DEL', stream)
      redis.call('HSET', meta, 'epoch', fresh, 'seq', 0)
      epoch, seq, created = fresh, 0, true
    end
    local start = seq + 1
    for i = first, first + n - 1 do
      seq = seq + 1
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, seq .. '-0', 't', ms, 'd', ARGV[i])
    end
    if n > 0 then
      redis.call('HSET', meta, 'seq', seq)
      -- Entries older than the replay window are refused anyway: an idle Stream may go.
      redis.call('PEXPIRE', stream, ttl)
    end
    if batch ~= '' then
      redis.call('SET', mark, batch, 'PX', mark_ttl)
    end
    if n > 0 or created then
      local data = {}
      for i = first, first + n - 1 do data[#data + 1] = ARGV[i] end
      redis.call('PUBLISH', channel,
                 epoch .. ' ' .. start .. ' [' .. table.concat(data, ',') .. ']')
    end
  end
  out[#out + 1] = epoch or ''
  out[#out + 1] = seq
end
return out
"""

# KEYS: meta, stream. ARGV: epoch, after, until ('' = the head), keep (replay size), max age
# (ms). Returns {epoch, head, ok, data...}: ok = 1 and the JSON texts of seqs after+1..until
# when the epoch is current and every one of them is kept and young enough; else ok = 0.
READ_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {'', 0, 0} end
local head = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if epoch ~= ARGV[1] then return {epoch, head, 0} end
local after = tonumber(ARGV[2])
local upto = head
if ARGV[3] ~= '' then upto = tonumber(ARGV[3]) end
if after < 0 or upto > head then return {epoch, head, 0} end
local out = {epoch, head, 1}
if upto <= after then return out end
if after + 1 <= head - tonumber(ARGV[4]) then return {epoch, head, 0} end
local entries = redis.call('XRANGE', KEYS[2], after + 1, upto)
if #entries ~= upto - after then return {epoch, head, 0} end
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[5])
local fields = entries[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 't' and tonumber(fields[i + 1]) < oldest then return {epoch, head, 0} end
end
for _, entry in ipairs(entries) do
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'd' then out[#out + 1] = f[i + 1] end
  end
end
return out
"""


def redacted_url(url: str) -> str:
    """``scheme://host:port/db`` of a Redis URL: what logs and errors may show (never a
    user name or password, nor the query)."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        db = parse_qs(parts.query).get("db", [parts.path.strip("/") or "0"])[0]
        return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}"
    except ValueError:
        return "(an invalid URL)"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """One line that says why a Redis call failed, from a coredis error or a group of them,
    with the error at the root of it (``Connection refused``)."""
    found = [leaf for leaf in leaves(exc) if not isinstance(leaf, trio.Cancelled)] or [exc]
    first = root = found[0]
    while root.__cause__ is not None:
        root = root.__cause__
    if root is first:
        return _describe(first)
    return f"{_describe(first)} ({_describe(root)})"


def _only_errors(exc: BaseException) -> bool:
    """Whether ``exc`` stands for errors only: a group with a cancellation (or worse) in it
    is not ours to turn into a `BusError`."""
    return all(isinstance(leaf, Exception) for leaf in leaves(exc))


class _Failed(Exception):
    """A Redis call failed: why (None: no answer in time)."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


class _Redis:
    """The one place where coredis meets Trio; everything else talks to Redis through it.

    What coredis (6.9) does not give a Trio program, and what is done about it here:

    - Its pub/sub reconnects by itself (its default retry policy retries forever) and tells
      nobody, so messages published meanwhile would be lost unseen. It is given
      ``NoRetryPolicy``: a lost connection ends the subscription (`RedisBus` opens a new one
      and catches up from the Stream).
    - Its errors come out of its anyio task groups wrapped in (nested) exception groups, even
      one `ConnectionError`; and with ``ignore_subscribe_messages`` ``get_message`` returns
      None for each subscribe confirmation instead of skipping it.
    - ``connect_timeout`` bounds only the TCP connect: a frozen Redis (SIGSTOP) accepts the
      connection in the kernel and the handshake (HELLO) waits forever; a request on an
      open connection to it waits forever too unless ``stream_timeout`` is set. And a
      cancellation during the handshake comes out as coredis's ``ConnectionError`` ("Unable
      to establish a connection"), not as `trio.Cancelled`, logged at ERROR by coredis.
    - Its client retries a failed command twice by default; for a script that appends
      events, a retry after a lost answer would append them twice. So no retries there
      either: the bus retries a batch itself, and the script drops a repeat.
    - Each failed connect leaves six anyio memory streams unclosed (made before connecting,
      closed only once connected): a ResourceWarning each when collected, harmless, and
      filtered in the tests' settings.
    - One command costs about 0.2-0.3 ms of CPU in this process under Trio (a PING on this
      machine), whatever its size: so changes are published in batches, one call each.

    So every call here is bounded by ``timeout`` (a `trio.move_on_after` around it, and
    coredis's ``stream_timeout``), and any failure or timeout becomes one `BusError` whose
    text names the Redis (without credentials) and the call.
    """

    def __init__(self, url: str, where: str, timeout: float) -> None:
        self.where = where
        self.timeout = timeout
        self.client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url,
            decode_responses=False,
            retry_policy=NoRetryPolicy(),
            stream_timeout=timeout,
            connect_timeout=timeout,
        )
        self.publish_script = self.client.register_script(PUBLISH_LUA)
        self.read_script = self.client.register_script(READ_LUA)
        #: Called after any failed call, so that health is checked at once.
        self.on_failure: Callable[[], None] = lambda: None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        async with self.client:
            yield

    async def attempt(self, request: Callable[[], Awaitable[T]]) -> T:
        """``request()``, bounded by the timeout; `_Failed` says why if it failed."""
        with trio.move_on_after(self.timeout) as scope:
            try:
                return await request()
            except (RedisError, OSError, TimeoutError, BaseExceptionGroup) as exc:
                if not _only_errors(exc):
                    raise
                if scope.cancel_called:
                    # Our deadline, which coredis turned into its ConnectionError.
                    raise _Failed(None) from None
                raise _Failed(_reason(exc)) from None
        raise _Failed(None)

    async def call(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self.attempt(request)
        except _Failed as failed:
            self.on_failure()
            if failed.reason is None:
                raise BusError(
                    f"Redis at {self.where} did not answer {what} within {self.timeout:g}s"
                ) from None
            raise BusError(f"Redis at {self.where} failed {what}: {failed.reason}") from None

    async def reach(self) -> None:
        """PING once at the start: `BusError` "cannot reach Redis at ..." if it fails."""
        try:
            await self.attempt(self.client.ping)
        except _Failed as failed:
            reason = failed.reason or f"no answer within {self.timeout:g}s"
            raise BusError(f"cannot reach Redis at {self.where}: {reason}") from None

    async def ping(self) -> None:
        await self.call("PING", self.client.ping)

    async def publish(self, keys: list[str], args: list[str | bytes]) -> list[Any]:
        async def run() -> list[Any]:
            return list(await self.publish_script(keys, args))

        return await self.call("the publish script", run)

    async def read(self, keys: list[str], args: list[str | bytes]) -> list[Any]:
        async def run() -> list[Any]:
            return list(await self.read_script(keys, args))

        return await self.call("the read script", run)

    @asynccontextmanager
    async def pubsub(self) -> AsyncIterator[PubSub[bytes]]:
        """One pub/sub connection; it raises `BusError` (never a group) when it is lost."""
        try:
            async with self.client.pubsub(
                retry_policy=NoRetryPolicy(),
                ignore_subscribe_messages=True,
                subscription_timeout=self.timeout,
                max_idle_seconds=max(1.0, self.timeout),
            ) as pubsub:
                yield pubsub
        except (RedisError, OSError, TimeoutError, BaseExceptionGroup) as exc:
            if not _only_errors(exc):
                raise
            mine = [leaf for leaf in leaves(exc) if isinstance(leaf, BusError)]
            if mine:
                raise mine[0] from None  # ours, raised inside the subscription
            self.on_failure()
            raise BusError(f"pub/sub on Redis at {self.where} failed: {_reason(exc)}") from None

    async def subscribe(self, pubsub: PubSub[bytes], channels: list[bytes]) -> None:
        await self.call("SUBSCRIBE", lambda: pubsub.subscribe(*channels))

    async def unsubscribe(self, pubsub: PubSub[bytes], channel: bytes) -> None:
        await self.call("UNSUBSCRIBE", lambda: pubsub.unsubscribe(channel))

    @staticmethod
    async def next_message(pubsub: PubSub[bytes]) -> tuple[bytes, bytes]:
        """The next published message's channel and data (confirmations are skipped)."""
        while True:
            message = await pubsub.get_message()
            if message is not None and message["type"] == "message":
                channel, data = message["channel"], message["data"]
                assert isinstance(channel, bytes) and isinstance(data, bytes)
                return channel, data


@attrs.define(eq=False)
class _Follower:
    """One `RedisBus.follow`: where it stands, and the live messages not yet looked at."""

    key: ResourceKey
    epoch: str
    last: int
    pending: deque[bytes] = attrs.field(factory=deque)
    #: Catch up from the Stream before anything else (at the start, after a reconnect).
    need_sync: bool = True
    error: BusError | None = None
    ready: deque[BusEvent] = attrs.field(factory=deque)
    wake: trio.Event = attrs.field(factory=trio.Event)
    failing_since: float | None = None

    def push(self, message: bytes) -> None:
        if len(self.pending) >= FOLLOWER_QUEUE:
            # Too far behind to keep every message: catch up from the Stream instead.
            self.pending.clear()
            self.need_sync = True
        else:
            self.pending.append(message)
        self.wake.set()

    def resync(self) -> None:
        self.need_sync = True
        self.wake.set()

    def fail(self, error: BusError) -> None:
        self.error = error
        self.wake.set()


@attrs.define(eq=False)
class _Channel:
    """The followers of one resource's pub/sub channel in this process."""

    followers: set[_Follower] = attrs.field(factory=set)
    #: Set once the channel is subscribed on the current pub/sub connection.
    subscribed: trio.Event = attrs.field(factory=trio.Event)


class _Events:
    """The async iterator `RedisBus.follow` yields: a follower's events, in seq order."""

    def __init__(self, bus: RedisBus, follower: _Follower) -> None:
        self._bus = bus
        self._follower = follower

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> BusEvent:
        follower = self._follower
        if follower.ready:
            # Events at hand still make a checkpoint, so a consumer's loop stays cancellable.
            await trio.lowlevel.checkpoint()
        while not follower.ready:
            if follower.error is not None:
                raise follower.error
            try:
                if follower.need_sync:
                    follower.need_sync = False
                    await self._bus.catch_up(follower)
                elif follower.pending:
                    self._bus.accept(follower, follower.pending.popleft())
                else:
                    follower.wake = trio.Event()
                    await follower.wake.wait()
                    continue
                follower.failing_since = None
            except EpochChanged as exc:
                follower.error = exc
                raise
            except BusError as exc:
                await self._bus.after_failure(follower, exc)
        return follower.ready.popleft()


class RedisBus:
    """A `Bus` on one Redis; made and run by `open_redis_bus`, for the ``async with``."""

    def __init__(
        self,
        redis: _Redis,
        *,
        prefix: str,
        replay_size: int,
        replay_max_age: float,
        timeout: float,
        grace: float,
        max_backlog: int,
        batch_size: int,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._replay_size = replay_size
        self._max_age_ms = math.ceil(replay_max_age * 1000)
        self._timeout = timeout
        self._grace = grace
        self._max_backlog = max_backlog
        self._batch_size = batch_size
        self._log = logger.bind(broker=redis.where)
        # Numbers this bus's batches, for the script to apply a retried batch only once.
        self._node = secrets.token_hex(8)
        self._batches = 0
        self._backlog: deque[tuple[ResourceKey, bytes]] = deque()
        self._work = trio.Event()  # forward() -> the drain task
        self._progress = trio.Event()  # the drain task -> flush()
        self._inflight = 0
        # Changes forwarded, and of those published or dropped: `flush` waits on the second
        # to reach what the first was when it was called.
        self._forwarded = 0
        self._settled = 0
        self._dropped = 0
        #: Resources whose queued changes were dropped: their next publish starts a new epoch.
        #: (How many were dropped: a drop during a publish that forces the new epoch
        #: breaks the resource again.)
        self._broken: dict[ResourceKey, int] = {}
        self._healthy = True
        self._health_changed = trio.Event()
        self._check_now = trio.Event()
        self._channels: dict[bytes, _Channel] = {}
        self._pubsub: PubSub[bytes] | None = None
        self._session: trio.CancelScope | None = None
        redis.on_failure = self._on_failure

    # --- names ---------------------------------------------------------------------------

    def _base(self, key: ResourceKey) -> str:
        # The hash tag keeps one resource's keys in one Cluster slot.
        return f"{self._prefix}:{{{key}}}"

    def _keys(self, key: ResourceKey) -> list[str]:
        base = self._base(key)
        return [f"{base}:meta", f"{base}:stream", f"{base}:w:{self._node}"]

    def _channel(self, key: ResourceKey) -> bytes:
        return f"{self._base(key)}:live".encode()

    # --- the Bus -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def backlog(self) -> int:
        """Forwarded changes not yet published (queued and in flight)."""
        return len(self._backlog) + self._inflight

    def forward(self, key: ResourceKey, data: JSON) -> None:
        # Encoded now: bad data fails its sender, never the batch it would be part of.
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        self._backlog.append((key, text.encode()))
        self._forwarded += 1
        if len(self._backlog) > self._max_backlog:
            dropped, _ = self._backlog.popleft()
            self._settled += 1
            self._broken[dropped] = self._broken.get(dropped, 0) + 1
            if not self._dropped:
                self._log.warning(
                    "Redis backlog over {} changes: dropping the oldest; their resources "
                    "start a new epoch", self._max_backlog)
            self._dropped += 1
        self._work.set()

    async def publish(self, key: ResourceKey, data: JSON) -> Position:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        [(epoch, seq)] = await self._run([(key, [text.encode()])], batch=None)
        return Position(epoch, seq)

    async def head(self, key: ResourceKey) -> Position:
        [(epoch, seq)] = await self._run([(key, [])], batch=None)
        return Position(epoch, seq)

    async def read(
        self, key: ResourceKey, epoch: str, after: int, until: int
    ) -> list[BusEvent] | None:
        if key in self._broken:
            return None
        found = await self._read(key, epoch, after, until)
        if found is None:
            return None
        _, _, data = found
        return [BusEvent(after + 1 + i, json.loads(item)) for i, item in enumerate(data)]

    @asynccontextmanager
    async def follow(
        self, key: ResourceKey, start: Position
    ) -> AsyncIterator[AsyncIterator[BusEvent]]:
        name = self._channel(key)
        channel = self._channels.setdefault(name, _Channel())
        follower = _Follower(key, start.epoch, start.seq)
        first = not channel.followers
        channel.followers.add(follower)
        try:
            # A Redis that stopped answering just now is given its grace here too, as a live
            # follower is: the pub/sub connection that replaces a lost one subscribes this
            # channel with the others.
            with trio.move_on_after(self._grace):
                pubsub = self._pubsub
                if pubsub is not None and first:
                    try:
                        await self._redis.subscribe(pubsub, [name])
                    except BusError:
                        pass  # that connection is going: the next one subscribes it
                    else:
                        if pubsub is self._pubsub:
                            channel.subscribed.set()
                await channel.subscribed.wait()
            if not channel.subscribed.is_set():
                raise BusError(
                    f"cannot follow {key} on Redis at {self._redis.where}: not subscribed "
                    f"within {self._grace:g}s")
            self._log.bind(resource=str(key)).debug(
                "following {} from epoch {} seq {}", key, start.epoch, start.seq)
            yield _Events(self, follower)
        finally:
            channel.followers.discard(follower)
            if not channel.followers and self._channels.get(name) is channel:
                del self._channels[name]
                pubsub = self._pubsub
                if pubsub is not None:
                    # Bounded, and cancelled with the caller: UNSUBSCRIBE is sent first.
                    with trio.move_on_after(self._timeout):
                        try:
                            await self._redis.unsubscribe(pubsub, name)
                        except BusError:
                            pass  # that connection is gone, and its subscriptions with it

    # --- for tests and a graceful exit ---------------------------------------------------

    async def flush(self) -> None:
        """Wait until every change forwarded before the call is published (or dropped); the
        changes forwarded meanwhile do not hold it up."""
        mark = self._forwarded
        while self._settled < mark:
            self._progress = trio.Event()
            await self._progress.wait()

    # --- the scripts ---------------------------------------------------------------------

    async def _run(
        self, groups: list[tuple[ResourceKey, list[bytes]]], batch: int | None
    ) -> list[tuple[str, int]]:
        """Publish the events of each group (a resource, in order) in one script call."""
        keys: list[str] = []
        args: list[str | bytes] = [
            str(self._replay_size), str(self._max_age_ms + 1000),
            "" if batch is None else str(batch), str(MARK_TTL_MS),
        ]
        forced = {key: self._broken[key] for key, _ in groups if key in self._broken}
        for key, events in groups:
            keys += self._keys(key)
            args += [self._channel(key), secrets.token_hex(8),
                     "1" if key in self._broken else "0", str(len(events)), *events]
        reply = await self._redis.publish(keys, args)
        # Only once the new epoch surely exists is the resource whole again.
        for key, drops in forced.items():
            if self._broken.get(key) == drops:
                del self._broken[key]
        return [(_text(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def _read(
        self, key: ResourceKey, epoch: str, after: int, until: int | None
    ) -> tuple[str, int, list[bytes]] | None:
        base = self._base(key)
        reply = await self._redis.read(
            [f"{base}:meta", f"{base}:stream"],
            [epoch, str(after), "" if until is None else str(until),
             str(self._replay_size), str(self._max_age_ms)])
        current, head, ok = _text(reply[0]), int(reply[1]), int(reply[2])
        if not ok:
            return None
        return current, head, list(reply[3:])

    # --- following -----------------------------------------------------------------------

    async def catch_up(self, follower: _Follower) -> None:
        """Deliver from the Stream everything after the follower's last seq up to the head."""
        key = follower.key
        base = self._base(key)
        reply = await self._redis.read(
            [f"{base}:meta", f"{base}:stream"],
            [follower.epoch, str(follower.last), "", str(self._replay_size),
             str(self._max_age_ms)])
        current, head, ok = _text(reply[0]), int(reply[1]), int(reply[2])
        if current != follower.epoch:
            raise EpochChanged(f"the history of {key} was lost on Redis (a new epoch)")
        if not ok:
            raise EpochChanged(
                f"the events of {key} after seq {follower.last} are no longer kept on Redis")
        for item in reply[3:]:
            follower.last += 1
            follower.ready.append(BusEvent(follower.last, json.loads(item)))
        if head > follower.last:  # defensive: the script returns every seq up to the head
            follower.need_sync = True

    def accept(self, follower: _Follower, message: bytes) -> None:
        """Take one live message: deliver what is new, drop repeats, catch up on a gap."""
        epoch, _, rest = message.partition(b" ")
        first_text, _, data = rest.partition(b" ")
        if epoch.decode() != follower.epoch:
            raise EpochChanged(f"the history of {follower.key} was lost on Redis (a new epoch)")
        first = int(first_text)
        events = json.loads(data)
        if first + len(events) - 1 <= follower.last:
            return  # already delivered (a repeat after catching up)
        if first > follower.last + 1:
            # A gap: the Stream has everything up to this message and more.
            follower.need_sync = True
            return
        for seq, item in enumerate(events, start=first):
            if seq > follower.last:
                follower.last = seq
                follower.ready.append(BusEvent(seq, item))

    async def after_failure(self, follower: _Follower, error: BusError) -> None:
        """A follower's read failed: retry soon, unless Redis failed it for longer than
        ``grace`` (then the follower ends with that error)."""
        now = trio.current_time()
        if follower.failing_since is None:
            follower.failing_since = now
        if now - follower.failing_since > self._grace:
            follower.error = BusError(
                f"Redis at {self._redis.where} unreachable for more than {self._grace:g}s "
                f"({error})")
            return
        follower.need_sync = True
        with trio.move_on_after(min(1.0, self._timeout / 2)):
            follower.wake = trio.Event()
            await follower.wake.wait()

    def _followers(self) -> Iterable[_Follower]:
        return [f for channel in self._channels.values() for f in channel.followers]

    # --- the tasks -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the bus's tasks: health checks, publishing the backlog, the subscription
        (`open_redis_bus` runs it for the ``async with``)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_health)
            nursery.start_soon(self._drain)
            nursery.start_soon(self._subscribe)

    def _on_failure(self) -> None:
        self._check_now.set()

    def _set_health(self, healthy: bool, reason: str = "") -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            self._log.info("Redis at {} answers again", self._redis.where)
        else:
            self._log.warning("Redis at {} is unreachable: {}", self._redis.where, reason)
            if self._session is not None:
                self._session.cancel()  # its connection cannot be trusted either
        self._health_changed.set()
        self._health_changed = trio.Event()

    async def _until_healthy(self) -> None:
        while not self._healthy:
            await self._health_changed.wait()

    async def _watch_health(self) -> None:
        """PING every ``timeout/2``; a frozen Redis fails by the timeout. While Redis is
        away, PING again with backoff."""
        backoff = 0.05
        while True:
            try:
                await self._redis.ping()
            except BusError as exc:
                self._set_health(False, str(exc))
                pause = backoff
                backoff = min(backoff * 2, self._timeout / 2)
                await trio.sleep(pause)
            else:
                self._set_health(True)
                backoff = 0.05
                # A failed call elsewhere asks for a check now rather than at the next beat.
                self._check_now = trio.Event()
                with trio.move_on_after(self._timeout / 2):
                    await self._check_now.wait()

    def _take_batch(self) -> tuple[list[tuple[ResourceKey, list[bytes]]], int]:
        """The next batch from the backlog, grouped by resource in order; else the resources
        whose changes were dropped, so that their new epoch starts even with nothing new."""
        groups: dict[ResourceKey, list[bytes]] = {}
        count = 0
        while self._backlog and count < self._batch_size:
            key, data = self._backlog.popleft()
            groups.setdefault(key, []).append(data)
            count += 1
        if not groups:
            for key in list(self._broken)[: self._batch_size]:
                groups[key] = []
        return list(groups.items()), count

    async def _drain(self) -> None:
        """Publish the backlog in batches, in order; a failed batch is retried as is."""
        while True:
            while not self._backlog and not self._broken:
                self._work = trio.Event()
                await self._work.wait()
            groups, self._inflight = self._take_batch()
            self._batches += 1
            backoff = 0.05
            failing = False
            while True:
                try:
                    await self._run(groups, self._batches)
                    break
                except BusError as exc:
                    if not failing:
                        self._log.warning(
                            "publishing a batch of {} changes failed, retrying: {}",
                            self._inflight, exc)
                        failing = True
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self._timeout / 2)
                    await self._until_healthy()
            if failing:
                self._log.info("published the batch after retrying")
            if self._dropped:
                self._log.warning("dropped {} changes while Redis was away", self._dropped)
                self._dropped = 0
            self._settled += self._inflight
            self._inflight = 0
            self._progress.set()

    async def _subscribe(self) -> None:
        """Keep one pub/sub connection for every followed resource of this process; after
        it was lost, open a new one as soon as Redis answers, and let every follower catch up
        from the Stream. Followers fail once Redis stayed away for longer than ``grace``."""
        lost_at: float | None = None
        backoff = 0.05
        while True:
            if lost_at is not None:
                with trio.move_on_at(lost_at + self._grace) as waiting:
                    await trio.sleep(backoff)
                    await self._until_healthy()
                if waiting.cancelled_caught:
                    error = BusError(
                        f"Redis at {self._redis.where} unreachable for more than "
                        f"{self._grace:g}s")
                    for follower in self._followers():
                        follower.fail(error)
                    lost_at = None
                    await self._until_healthy()
            else:
                await self._until_healthy()
            was_live = await self._session_once()
            if was_live:
                lost_at, backoff = trio.current_time(), 0.05
            else:
                lost_at = trio.current_time() if lost_at is None else lost_at
                backoff = min(backoff * 2, self._timeout / 2)

    async def _session_once(self) -> bool:
        """One pub/sub connection, until it fails; whether it got as far as subscribing."""
        live = False
        try:
            async with self._redis.pubsub() as pubsub:
                with trio.CancelScope() as self._session:
                    if not self._healthy:
                        return False
                    self._pubsub = pubsub
                    names = list(self._channels)
                    if names:
                        await self._redis.subscribe(pubsub, names)
                    live = True
                    for name in names:
                        channel = self._channels.get(name)
                        if channel is not None:
                            channel.subscribed.set()
                            for follower in channel.followers:
                                follower.resync()
                    while True:
                        name, message = await self._redis.next_message(pubsub)
                        channel = self._channels.get(name)
                        for follower in channel.followers if channel else ():
                            follower.push(message)
        except BusError as exc:
            self._log.warning("{}", exc)
        finally:
            self._pubsub = None
            self._session = None
            for channel in self._channels.values():
                if channel.subscribed.is_set():
                    channel.subscribed = trio.Event()
        return live


@asynccontextmanager
async def open_redis_bus(
    url: str,
    *,
    prefix: str = "trio-relay",
    replay_size: int = 1024,
    replay_max_age: float = 120.0,
    timeout: float = 5.0,  # noqa: ASYNC109 - the bound of each Redis call, not of this one
    grace: float = 30.0,
    max_backlog: int = 100_000,
    batch_size: int = 256,
) -> AsyncIterator[RedisBus]:
    """Connect to the Redis at ``url`` and run a `RedisBus` on it for the ``async with``.

    Raises `BusError` ("cannot reach Redis at redis://host:port/db: ...") if Redis does not
    answer PING within ``timeout``. ``replay_size`` events of each resource are kept for
    ``replay_max_age`` seconds; every call fails with `BusError` after ``timeout``; a follower
    fails after Redis was unreachable for ``grace``; at most ``max_backlog`` forwarded
    changes wait while Redis is away, published ``batch_size`` at a time.
    """
    where = redacted_url(url)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {where}")
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"prefix must be non-empty, without braces: {prefix!r}")
    for name, value in (("replay_size", replay_size), ("max_backlog", max_backlog),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    for name, number in (("replay_max_age", replay_max_age), ("timeout", timeout)):
        if not number > 0 or math.isinf(number):
            raise ValueError(f"{name} must be a positive number of seconds, not {number}")
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0 seconds, not {grace}")
    redis = _Redis(url, where, timeout)
    try:
        async with redis.open():
            await redis.reach()
            bus = RedisBus(
                redis, prefix=prefix, replay_size=replay_size, replay_max_age=replay_max_age,
                timeout=timeout, grace=grace, max_backlog=max_backlog, batch_size=batch_size)
            logger.bind(broker=where).info("connected to Redis at {}", where)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bus.serve)
                yield bus
                # Publish what is still queued, if Redis lets us, before the tasks end.
                with trio.move_on_after(timeout):
                    await bus.flush()
                if bus.backlog:
                    logger.bind(broker=where).warning(
                        "closing with {} forwarded changes not published to Redis at {}",
                        bus.backlog, where)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)
