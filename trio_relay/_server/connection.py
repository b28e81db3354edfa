"""One web client's connection: its reader, its requests and its subscriptions.

    connection nursery (inside the edge's task for the stream)
    ├── reader          this task: `ServerWebSocket.read` feeds wsproto, answers pings and
    │                   closes, and queues each request
    ├── dispatcher      (while requests wait) handles them one by one, in order; the reader
    │                   goes on reading meanwhile, so a vanished client is noticed mid-request
    └── writer          (while frames wait) drains what the kernel did not take at once

Every reply and push is written in order, straight into the socket when nothing is queued.
Pushes never block: past ``outbound_queue_size`` queued frames the client is slow, and only
this connection is closed (1013). Subscriptions are not tasks: each is registered with its
resource's broadcaster when it starts and removed when it ends, and however the connection
ends, leaving `Connection.run` removes every one that is left. The auth deadline and keepalive
pings are kept for all connections by one relay task (`trio_relay._server.timers`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import attrs
import trio
from loguru import logger

from .._config import CloseCode, RelayConfig
from .._errors import CodedError
from .._store.backend import Backend, BackendError, NotFound
from .._stream.broadcaster import SubscribeFailed
from .._stream.registry import BroadcasterRegistry
from .._wire.framing import frame_text
from .._wire.protocol import (
    JSON,
    AuthFailed,
    AuthRequest,
    AuthRequired,
    AuthSuccess,
    CancelRequest,
    CreateRequest,
    DataReply,
    ErrorCode,
    ErrorReply,
    ProtocolError,
    Reply,
    Request,
    ResourceKey,
    SendRequest,
    Subscribed,
    SubscribeRequest,
    UnsubscribeRequest,
    decode,
    encode,
    error_reply,
)
from .counters import RelayCounters
from .limits import PinGuard, TokenBucket, locked_out_text, pin_matches
from .pairing import Device, DeviceStore
from .subscription import WebSubscription
from .timers import ConnectionTimers
from .websocket import ServerWebSocket

if TYPE_CHECKING:
    from loguru import Logger

__all__ = ["Connection", "ConnectionContext"]

T = TypeVar("T")

_ids = itertools.count(1)

# Requests read but not yet handled; past this the reader waits (TCP backpressure).
_REQUEST_QUEUE_SIZE = 16

SNAPSHOT_FIELDS = {"project": "chats", "chat": "messages", "modelProfiles": "modelProfiles"}


@attrs.define(eq=False)
class ConnectionContext:
    """What a connection needs of the relay, handed to it when it is made (shared by all)."""

    config: RelayConfig
    backend: Backend
    counters: RelayCounters
    registry: BroadcasterRegistry
    timers: ConnectionTimers
    pin_guard: PinGuard
    devices: DeviceStore
    #: The PIN clients sign in with now (the host or ``trio-relay pin --new`` may change it).
    current_pin: Callable[[], str] = attrs.field(repr=False)
    #: Stores a sent message with its sender (passed only to backends that take one).
    send_message: Callable[[str, JSON, JSON, str | None], Awaitable[None]]
    #: Stops the reply running in a chat (on whichever relay runs it, with a broker).
    cancel_reply: Callable[[str], Awaitable[bool]]
    #: Why writes are refused right now (the broker is unreachable), or None.
    writes_refused: Callable[[], str | None] = lambda: None


class _Refused(CodedError):
    """A request is answered with an error reply; raised from deep in a handler."""


class Connection:
    """Serves one open WebSocket until either side ends it."""

    # A relay holds thousands of these: no per-instance dict.
    __slots__ = (
        "__weakref__", "_bucket", "_config", "_counters", "_dispatching", "_idle", "_nursery",
        "_requests", "_room", "_strikes", "authenticated", "context", "device_id", "id",
        "peer", "sender", "socket", "subscriptions",
    )

    def __init__(self, socket: ServerWebSocket, peer: str, context: ConnectionContext) -> None:
        self.socket = socket
        self.peer = peer
        self.context = context
        self._config = context.config
        self._counters = context.counters
        self.id = f"c{next(_ids)}"
        self.authenticated = False
        #: The paired device this connection signed in as (None: a PIN sign-in without a
        #: device name), and the sender its messages are stored with.
        self.device_id: str | None = None
        self.sender: JSON = None
        self.subscriptions: dict[ResourceKey, WebSubscription] = {}
        # Requests read and not yet handled; the dispatcher task exists only while some wait.
        self._requests: deque[str] | None = None
        self._dispatching = False
        self._room: trio.Event | None = None  # set when the reader may queue again
        self._idle: trio.Event | None = None  # set when the dispatcher has answered all
        self._bucket = TokenBucket(self._config.request_rate, self._config.request_burst)
        self._strikes = 0
        self._nursery: trio.Nursery | None = None

    @property
    def log(self) -> Logger:
        """A logger with the connection's context; made when used (a few times a connection),
        not kept (it would cost every idle connection its memory)."""
        return logger.bind(conn=self.id, peer=self.peer)

    # --- lifetime ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the WebSocket is closed, either way, or the peer is gone."""
        self.log.info("connected")
        self.reply(AuthRequired())
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.context.timers.schedule(self)
                await self.socket.read(nursery, self._queue_request, self._settle)
                # Our close frame (or our answer to the client's) goes out before the end.
                await self.socket.flush()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            # A client that closes with 1000 is done ("the purpose for which the connection
            # was established has been fulfilled", RFC 6455): its resources go at once. Any
            # other end (a drop, 1001 from a page being reloaded, our 1013 or 1012) may be
            # followed by a return that resumes: a lone subscriber's broadcaster lingers.
            code = self.socket.closed[0] if self.socket.closed else 1006
            for subscription in list(self.subscriptions.values()):
                subscription.detach(linger=code != CloseCode.NORMAL)
            self.subscriptions.clear()
            code, reason = self.socket.closed or (1006, "")
            self.log.info("disconnected: {code}{reason}", code=code,
                          reason=f" {reason}" if reason else "")

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` after the frames already queued (a slow consumer's are dropped).

        Requests not yet handled are dropped. If the peer does not finish the closing
        handshake within ``close_timeout`` (a slow consumer usually will not), the stream is
        dropped."""
        if self.socket.closing:
            return
        self.log.info("closing: {code} {reason}", code=code, reason=reason)
        if self._requests:
            self._requests.clear()
        if self._room is not None:  # the reader must go on, to read the client's answer
            self._room.set()
            self._room = None
        self.socket.close(code, reason, drop_backlog=code == CloseCode.SLOW_CONSUMER)

    # What the relay's timers need (`trio_relay._server.timers.Timed`).

    @property
    def pinged_at(self) -> float | None:
        return self.socket.pinged_at

    def ping(self, now: float) -> bool:
        """Ping the peer now; False once the connection is over."""
        if self._nursery is None or self.socket.closing:
            return False
        self.socket.ping(now)
        return True

    # --- requests in ------------------------------------------------------------------------

    async def _queue_request(self, text: str) -> None:
        """Called by the reader for each text message: queue it for the dispatcher."""
        if self.socket.closing:
            return
        requests = self._requests
        if requests is None:
            requests = self._requests = deque()
        requests.append(text)
        if not self._dispatching and self._nursery is not None:
            self._nursery.start_soon(self._dispatcher)
            self._dispatching = True
        if len(requests) >= _REQUEST_QUEUE_SIZE:
            self._room = trio.Event()
            await self._room.wait()

    async def _dispatcher(self) -> None:
        requests = self._requests
        assert requests is not None
        try:
            while requests:
                text = requests.popleft()
                if self._room is not None:
                    self._room.set()
                    self._room = None
                await self._handle_text(text)
        finally:
            self._dispatching = False
            if self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _settle(self) -> None:
        """Wait until the requests read so far are answered (at most ``backend_timeout``):
        the reader is about to close the connection for a frame that broke the protocol."""
        if self._dispatching:
            self._idle = trio.Event()
            with trio.move_on_after(self._config.backend_timeout):
                await self._idle.wait()

    # --- output -----------------------------------------------------------------------------

    def push(self, frame: bytes) -> None:
        """Write one framed message without blocking (queued if the kernel does not take it
        at once). A full queue means a slow client: close it."""
        if not self.socket.send_frame(frame):
            self._counters.slow_closes += 1
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue overflowed")

    def reply(self, reply: Reply) -> None:
        try:
            text = encode(reply)
        except (TypeError, ValueError):
            # Only backend data can fail to encode: answer the request all the same.
            self.log.error("a {} reply held backend data that is not JSON", reply.type)
            text = encode(ErrorReply(
                id=reply.id, error="backend returned data that is not JSON",
                code=ErrorCode.BACKEND_ERROR, resource=getattr(reply, "resource", None),
                resource_id=getattr(reply, "resource_id", None),
            ))
        if not self.socket.send_frame(frame_text(text.encode())):
            self._counters.slow_closes += 1
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue overflowed")

    def forget(self, subscription: WebSubscription) -> None:
        if self.subscriptions.get(subscription.key) is subscription:
            del self.subscriptions[subscription.key]

    # --- requests ---------------------------------------------------------------------------

    async def _handle_text(self, text: str) -> None:
        try:
            request = decode(text)
        except ProtocolError as exc:
            self.reply(exc.reply)
            self._strike()
            return
        if not self._bucket.take(trio.current_time()):
            self.reply(error_reply(request, ErrorCode.RATE_LIMITED, "too many requests; slow down"))
            self._strike()
            return
        if not self.authenticated and not isinstance(request, AuthRequest):
            self.reply(error_reply(request, ErrorCode.NOT_AUTHENTICATED, "Not authenticated"))
            self._strike()
            return
        try:
            await self._dispatch(request)
        except _Refused as exc:
            self.reply(error_reply(request, exc.code, str(exc)))
        except Exception:
            self.log.exception("bug while handling a {} request", request.type)
            self.reply(error_reply(request, ErrorCode.INTERNAL_ERROR, "internal error"))
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _strike(self) -> None:
        self._strikes += 1
        if self._strikes >= self._config.max_strikes:
            self.close(CloseCode.POLICY_VIOLATION, "too many bad or rate-limited requests")

    async def _dispatch(self, request: Request) -> None:
        if isinstance(request, AuthRequest):
            await self._auth(request)
        elif isinstance(request, SubscribeRequest):
            await self._subscribe(request)
        elif isinstance(request, UnsubscribeRequest):
            self._unsubscribe(request)
        elif isinstance(request, SendRequest):
            self._check_writable()
            await self._call(self.context.send_message, request.resource_id, request.message,
                             self.sender, request.client_nonce)
            if self.device_id is not None:
                self.context.devices.seen(self.device_id)
            await _let_fan_out()
            self.log.debug("sent a message to chat {}", request.resource_id)
            self.reply(DataReply(id=request.id, resource="chat",
                                 resource_id=request.resource_id, data={"sent": True}))
        elif isinstance(request, CancelRequest):
            cancelled = await self._call(self.context.cancel_reply, request.resource_id)
            self.log.info("cancel in chat {}: {}", request.resource_id,
                          "stopped a reply" if cancelled else "nothing running")
            self.reply(DataReply(id=request.id, resource="chat",
                                 resource_id=request.resource_id,
                                 data={"cancelled": bool(cancelled)}))
        elif isinstance(request, CreateRequest):
            self._check_writable()
            chat = await self._call(self.context.backend.create_chat, request.resource_id,
                                    request.title, request.model_profile_id)
            chat_id = chat.get("id") if isinstance(chat, dict) else None
            if not isinstance(chat_id, str):
                self.log.error("backend create_chat returned a chat without a string id")
                raise _Refused(ErrorCode.BACKEND_ERROR, "backend returned an invalid chat")
            self.reply(DataReply(id=request.id, resource="chat", resource_id=chat_id,
                                 data={"chat": chat}))
        else:  # pragma: no cover - decode() returns only the types above
            _unreachable(request)

    def _check_writable(self) -> None:
        # A write that could not reach the other relays' subscribers is refused up front,
        # rather than stored and seen only here.
        reason = self.context.writes_refused()
        if reason is not None:
            self._counters.backend_errors += 1
            raise _Refused(ErrorCode.BACKEND_ERROR, reason)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Call the backend within ``backend_timeout``; its failures become error replies."""
        try:
            with trio.fail_after(self._config.backend_timeout):
                return await fn(*args)
        except trio.TooSlowError:
            self._counters.backend_errors += 1
            raise _Refused(ErrorCode.BACKEND_ERROR, "backend timed out") from None
        except NotFound as exc:
            raise _Refused(ErrorCode.NOT_FOUND, str(exc) or "not found") from None
        except BackendError as exc:
            self._counters.backend_errors += 1
            raise _Refused(ErrorCode.BACKEND_ERROR, str(exc) or "backend error") from None
        except Exception:
            self._counters.backend_errors += 1
            self.log.exception("backend {} failed", getattr(fn, "__name__", "call").lstrip("_"))
            raise _Refused(ErrorCode.BACKEND_ERROR, "backend error") from None

    async def _auth(self, request: AuthRequest) -> None:
        guard = self.context.pin_guard
        address = self.peer.rsplit(":", 1)[0]
        check = guard.check(address, trio.current_time())
        devices = self.context.devices
        device: Device | None = None
        if request.token is not None:
            # A valid token passes even a lockout: it cannot be guessed, and someone else's
            # guessing must not sign paired devices out. A wrong one is one more failure.
            device = devices.verify(request.token)
            if device is None:
                await self._auth_failed(request, address, ErrorCode.TOKEN_INVALID,
                                        "Unknown or revoked device token")
                return
            self.device_id = device.id  # from now on: revoking it meanwhile closes us too
        elif check.locked:
            await self._refuse_locked_out(request, check.delay, check.retry_after)
            return
        elif not pin_matches(request.pin or "", self.context.current_pin()):
            await self._auth_failed(request, address, ErrorCode.AUTH_FAILED, "Invalid PIN")
            return
        if device is None:
            # The right PIN clears the address's failures; a token does not, since it may
            # pass a lockout that PIN guessers from the same address still deserve.
            guard.succeeded(address)
        projects = await self._call(self.context.backend.list_projects)
        profiles = await self._call(self.context.backend.get_model_profiles)
        data: dict[str, JSON] = {"projects": projects, "modelProfiles": profiles.items}
        if device is not None:
            data["device"] = {"id": device.id, "name": device.name}
        elif request.device_name is not None:
            try:
                device, token = devices.pair(request.device_name)
            except Exception:
                self.log.exception("could not pair a device")
                raise _Refused(ErrorCode.INTERNAL_ERROR,
                               "could not pair this device; sign in without a device name"
                               " or ask the relay's operator") from None
            data["device"] = {"id": device.id, "name": device.name, "token": token}
            self.log.info("paired device {} ({})", device.id, device.name)
        self.device_id = device.id if device is not None else None
        self.sender = (
            {"deviceId": device.id, "name": device.name} if device is not None
            else _UNNAMED_SENDER
        )
        self.authenticated = True
        self.log.info("authenticated{}", f" as device {device.id}" if device else "")
        self.reply(AuthSuccess(id=request.id, data=data))

    async def _auth_failed(
        self, request: AuthRequest, address: str, code: str, error: str
    ) -> None:
        """A wrong PIN or token: one failure for the guard, answered after its delay."""
        self._counters.failed_pins += 1
        verdict = self.context.pin_guard.failed(address, trio.current_time())
        if verdict.locked:
            await self._refuse_locked_out(request, verdict.delay, verdict.retry_after)
            return
        await trio.sleep(verdict.delay)
        self.log.warning("auth failed" if code == ErrorCode.AUTH_FAILED
                         else "auth failed: unknown or revoked token")
        self.reply(AuthFailed(id=request.id, error=error, code=code))

    async def _refuse_locked_out(
        self, request: AuthRequest, delay: float, retry_after: float
    ) -> None:
        ends = trio.current_time() + retry_after
        await trio.sleep(delay)
        seconds = max(1, math.ceil(ends - trio.current_time()))
        self.log.warning("auth refused: too many failed attempts")
        self.reply(AuthFailed(id=request.id, error=locked_out_text(seconds),
                              code=ErrorCode.LOCKED_OUT, retry_after=seconds))
        self.close(CloseCode.POLICY_VIOLATION, "too many failed PIN attempts")

    async def _subscribe(self, request: SubscribeRequest) -> None:
        key = request.key
        if key not in self.subscriptions and (
            len(self.subscriptions) >= self._config.max_subscriptions
        ):
            raise _Refused(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                           f"at most {self._config.max_subscriptions} subscriptions")
        subscription = WebSubscription(self, key, self._counters)
        try:
            broadcaster = self.context.registry.join(key, subscription)
        except SubscribeFailed as exc:
            raise _Refused(exc.code, str(exc)) from None
        live = False
        try:
            # A replay must fit the outbound queue (with the reply): more would close this
            # client as slow on every reconnect, so it gets a fresh snapshot instead.
            room = self._config.outbound_queue_size - 1 - self.socket.backlog
            synced = await broadcaster.sync(subscription, request.since_seq, request.epoch, room)
            snapshot = synced.snapshot
            try:
                reply = encode(Subscribed(
                    id=request.id, resource=key.resource,
                    resource_id=key.resource_id or None,
                    data=None if snapshot is None
                    else {SNAPSHOT_FIELDS[key.resource]: snapshot.items},
                    seq=synced.seq,
                    epoch=synced.epoch,
                    reset=True if synced.reset else None,
                    resumed=True if snapshot is None else None,
                ))
            except (TypeError, ValueError):
                self.log.error("the snapshot of {} is not JSON", key)
                raise SubscribeFailed(ErrorCode.BACKEND_ERROR,
                                      "backend returned data that is not JSON") from None
            if self.socket.closing:
                return  # closing: it would never see a push
            # Resubscribing replaces the old subscription in the same instant that the new
            # one goes live, so no push is delivered twice or missed.
            old = self.subscriptions.get(key)
            if old is not None:
                old.detach()
            subscription.leave = synced.leave
            self.subscriptions[key] = subscription
            self.push(frame_text(reply.encode()))
            live = True
            synced.go_live()
            self.log.info("{} {}", "resumed" if snapshot is None else "subscribed to", key)
        except SubscribeFailed as exc:
            raise _Refused(exc.code, str(exc)) from None
        finally:
            if not live:
                broadcaster.remove(subscription)

    def _unsubscribe(self, request: UnsubscribeRequest) -> None:
        subscription = self.subscriptions.pop(request.key, None)
        if subscription is not None:
            # Leave now, so no push slips in after the reply that says it is gone.
            subscription.detach()
            self.log.info("unsubscribed from {}", request.key)
        self.reply(DataReply(id=request.id, resource=request.resource,
                             resource_id=request.resource_id or None,
                             data={"unsubscribed": subscription is not None}))


#: The sender of messages from a PIN sign-in that paired no device.
UNNAMED_DEVICE = "Unnamed device"
# One shared value (it is only read) rather than a dict on every such connection.
_UNNAMED_SENDER: JSON = {"name": UNNAMED_DEVICE}


async def _let_fan_out() -> None:
    """Let the broadcasters that the message woke fan it out before its sender hears back,
    so that a sender that waits for each answer does not send the next message into the
    middle of the last one's fan-out. Two checkpoints: trio runs a batch of ready tasks in
    either order, so the second one is after the broadcasters whichever ran first."""
    await trio.lowlevel.cancel_shielded_checkpoint()
    await trio.lowlevel.cancel_shielded_checkpoint()


def _unreachable(value: object) -> NoReturn:
    raise AssertionError(f"unexpected request {value!r}")

