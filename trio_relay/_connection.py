"""One web client's connection: a nursery holding a reader, a writer and its subscriptions.

    connection nursery
    ├── reader          reads frames into a small bounded request queue; the moment the
    │                   client is gone it cancels the nursery, even mid-request
    ├── dispatcher      decodes and handles each request, in order
    ├── subscription*   one per subscribed resource: registered with its broadcaster for
    │                   exactly as long as the task lives
    ├── writer          (while frames are queued) drains the bounded outbound queue
    ├── ping            (every ``ping_interval``, on the relay's schedule) no pong within
    │                   ``ping_timeout``: 1011; the relay's schedule also closes the
    │                   connection with 1008 unless ``auth`` succeeds within ``auth_timeout``
    └── close deadline  (once closing) drops the stream if the close takes too long

Every reply and push is written in order: straight into the socket when nothing is queued
(`trio_relay._direct`), else through the bounded outbound queue, which a writer task drains;
the writer exists only while there is something to drain, so an idle connection holds no
task for it. Pushes never block: when the queue is full the client is slow, and only this
connection is closed (1013). Any end of the connection cancels the nursery, and with it every
subscription, which leaves its broadcaster on the way out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio
from loguru import logger
from trio_websocket import ConnectionClosed, WebSocketConnection

from ._backend import BackendError, NotFound
from ._broadcaster import Push, SubscribeFailed
from ._config import CloseCode
from ._direct import DirectPath, Written, drop_handshake_state, frame_text
from ._limits import TokenBucket, pin_matches
from ._pairing import Device
from ._protocol import (
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
)

if TYPE_CHECKING:
    from ._relay import Relay
    from ._transport import OwnedStream

__all__ = ["Connection"]

T = TypeVar("T")

_ids = itertools.count(1)

# Requests read but not yet handled; past this the reader waits (TCP backpressure).
_REQUEST_QUEUE_SIZE = 16

SNAPSHOT_FIELDS = {"project": "chats", "chat": "messages", "modelProfiles": "modelProfiles"}


class _Refused(Exception):
    """A request is answered with an error reply; raised from deep in a handler."""

    def __init__(self, code: str, error: str) -> None:
        super().__init__(error)
        self.code = code


class _WebSubscription:
    """A connection's membership in one broadcaster, alive as long as its task is."""

    def __init__(self, connection: Connection, key: ResourceKey) -> None:
        self.connection = connection
        self.key = key
        self.cancel_scope = trio.CancelScope()
        self.detach: Callable[[], None] = self.cancel_scope.cancel

    def deliver(self, push: Push) -> None:
        self.connection.relay.counters["pushes_sent"] += 1
        self.connection.push(push.text, push.frame)

    def end(self, push: Push) -> None:
        self.connection.push(push.text, push.frame)
        self.connection.forget(self)
        self.cancel_scope.cancel()


class Connection:
    """Serves one accepted WebSocket until either side ends it."""

    def __init__(
        self, relay: Relay, ws: WebSocketConnection, peer: str, stream: OwnedStream | None = None
    ) -> None:
        self.relay = relay
        self.ws = ws
        self.peer = peer
        #: Frames go straight into the socket when nothing is queued (`trio_relay._direct`);
        #: None: every frame goes through trio-websocket (TLS, or direct writes are off).
        self.direct = (
            DirectPath.open(ws, stream)
            if stream is not None and relay.config.direct_writes else None
        )
        self._stream = stream
        drop_handshake_state(ws)
        # Frames handed to the writer and not yet written (the channel's own count misses the
        # one the writer has taken): direct writes wait until it is zero, to keep the order.
        self._queued = 0
        self.id = f"c{next(_ids)}"
        self.authenticated = False
        #: The paired device this connection signed in as (None: a PIN sign-in without a
        #: device name), and the sender its messages are stored with.
        self.device_id: str | None = None
        self.sender: JSON = None
        self.subscriptions: dict[ResourceKey, _WebSubscription] = {}
        config = relay.config
        self._config = config
        # The outbound queue: text for trio-websocket to frame, or frames for the stream when
        # direct. Made when first needed (`_outbound`): with direct writes an idle or keeping-up
        # connection never queues anything, and the channel is a good part of its memory.
        self._out: tuple[trio.MemorySendChannel[str | bytes],
                         trio.MemoryReceiveChannel[str | bytes]] | None = None
        self._close_request: tuple[int, str] | None = None
        self._requests_send, self._requests_receive = trio.open_memory_channel[str](
            _REQUEST_QUEUE_SIZE
        )
        self._bucket = TokenBucket(config.request_rate, config.request_burst)
        self._strikes = 0
        self._nursery: trio.Nursery | None = None
        self._writing = False  # a writer task is draining the outbound queue
        self._pinging = False  # a ping is waiting for its pong
        self.log = logger.bind(conn=self.id, peer=peer)

    # --- lifetime ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.log.info("connected")
        self.reply(AuthRequired())
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reader)
                nursery.start_soon(self._dispatcher)
                self.relay._schedule_connection(self)  # auth deadline and pings
                if self._queued or self._close_request is not None:
                    self._wake_writer()  # auth_required did not fit at once, or closed early
                if self._close_request is not None:  # closed before it started
                    nursery.start_soon(self._close_deadline)
        finally:
            self._nursery = None  # nothing may be started in it any more
            closed = self.ws.closed
            code, reason = self._close_request or (
                (closed.code, closed.reason or "") if closed else (1006, "")
            )
            self.log.info("disconnected: {code}{reason}", code=code,
                          reason=f" {reason}" if reason else "")

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` after the frames already queued (a slow consumer's are dropped).

        The writer sends the close frame; if the peer does not finish the closing handshake
        within ``close_timeout`` (a slow consumer usually will not), the stream is dropped.
        """
        if self._close_request is not None:
            return
        self._close_request = (code, reason)
        self.log.info("closing: {code} {reason}", code=code, reason=reason)
        self._outbound()[0].close()  # nothing more is queued; the writer closes after the rest
        self._wake_writer()
        # Requests not yet handled are dropped, and the reader only drains from now on, so
        # that trio-websocket keeps reading and sees the client's answer to our close frame.
        self._requests_receive.close()
        if self._nursery is not None:
            try:
                self._nursery.start_soon(self._close_deadline)
            except RuntimeError:  # its tasks are all done: the connection is ending anyway
                pass

    async def _close_deadline(self) -> None:
        await trio.sleep(self._config.close_timeout)
        self._cancel()

    def _cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _outbound(self) -> tuple[trio.MemorySendChannel[str | bytes],
                                 trio.MemoryReceiveChannel[str | bytes]]:
        if self._out is None:
            self._out = trio.open_memory_channel[str | bytes](self._config.outbound_queue_size)
        return self._out

    def _wake_writer(self) -> None:
        if not self._writing and self._nursery is not None:
            try:
                self._nursery.start_soon(self._writer)
            except RuntimeError:  # its tasks are all done: the connection is ending anyway
                return
            self._writing = True

    async def _writer(self) -> None:
        """Drain the outbound queue, then end; once closing, send the close frame after it."""
        try:
            while True:
                if self._out is None:
                    return  # nothing was ever queued (close makes the queue, so not closing)
                try:
                    item = self._out[1].receive_nowait()
                except trio.WouldBlock:
                    return  # drained: the next frame that does not fit starts a writer again
                except trio.EndOfChannel:
                    break  # closing, and everything queued is written
                # A slow client's backlog is dropped (it resumes by seq); any other close
                # first sends what is queued, so every request still gets its reply.
                if self._close_request is not None and (
                    self._close_request[0] == CloseCode.SLOW_CONSUMER
                ):
                    break
                if isinstance(item, str):
                    await self.ws.send_message(item)
                else:
                    assert self._stream is not None
                    if self.ws.closed is not None:
                        break
                    # An empty frame only writes what a direct write left owed.
                    await self._stream.send_frame(item)
                self._queued -= 1
            if self._close_request is not None:
                code, reason = self._close_request
                await self.ws.aclose(code, reason)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._writing = False
        self._cancel()  # the connection is over: closed, or the peer is gone

    async def _reader(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if self._close_request is not None:
                    continue
                if isinstance(message, bytes):
                    self.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                    continue
                try:
                    await self._requests_send.send(message)
                except trio.BrokenResourceError:  # closing: the dispatcher has stopped
                    pass
        except ConnectionClosed:
            # Our own close ends reading before the client has answered it; the writer
            # finishes that handshake. Otherwise the client is gone: stop everything now.
            if self._close_request is None:
                self._cancel()

    async def _dispatcher(self) -> None:
        try:
            async for text in self._requests_receive:
                await self._handle_text(text)
        except trio.ClosedResourceError:
            pass  # closing: requests still unread are not answered

    def ping(self) -> bool:
        """Ping the peer now, on the relay's schedule; False once the connection is over."""
        if self._nursery is None or self._close_request is not None:
            return False
        if not self._pinging:  # a ping still waiting for its pong is not doubled
            try:
                self._nursery.start_soon(self._ping)
            except RuntimeError:  # its tasks are all done: the connection is ending
                return False
            self._pinging = True
        return True

    async def _ping(self) -> None:
        """Find peers that stopped answering (a half-open TCP connection looks alive)."""
        try:
            with trio.move_on_after(self._config.ping_timeout) as waiting:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if waiting.cancelled_caught:
                self.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        finally:
            self._pinging = False

    # --- output -----------------------------------------------------------------------------

    def push(self, text: str, frame: bytes | None = None) -> None:
        """Send one message without blocking: straight into the socket when nothing is queued
        (``frame``, if given, is ``text`` framed), else into the outbound queue. A full queue
        means a slow client: close it."""
        item: str | bytes = text
        direct = self.direct
        if direct is not None:
            item = frame if frame is not None else frame_text(text.encode())
            if not self._queued and self._close_request is None:
                written = direct.write(item)
                if written is Written.ALL:
                    return
                if written is Written.PART:
                    item = b""  # the writer writes the rest of the frame
        try:
            self._outbound()[0].send_nowait(item)
            self._queued += 1
            self._wake_writer()
        except trio.WouldBlock:
            self.relay._count_slow_close()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue overflowed")
        except trio.ClosedResourceError:
            pass  # closing: what it misses, it resumes after reconnecting

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
        self.push(text)

    def forget(self, subscription: _WebSubscription) -> None:
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
            self.reply(_error(request, ErrorCode.RATE_LIMITED, "too many requests; slow down"))
            self._strike()
            return
        if not self.authenticated and not isinstance(request, AuthRequest):
            self.reply(_error(request, ErrorCode.NOT_AUTHENTICATED, "Not authenticated"))
            self._strike()
            return
        try:
            await self._dispatch(request)
        except _Refused as exc:
            self.reply(_error(request, exc.code, str(exc)))
        except Exception:
            self.log.exception("bug while handling a {} request", request.type)
            self.reply(_error(request, ErrorCode.INTERNAL_ERROR, "internal error"))
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
            await self._call(self.relay._send_message, request.resource_id, request.message,
                             self.sender)
            if self.device_id is not None:
                self.relay.devices.seen(self.device_id)
            self.log.debug("sent a message to chat {}", request.resource_id)
            self.reply(DataReply(id=request.id, resource="chat",
                                 resource_id=request.resource_id, data={"sent": True}))
        elif isinstance(request, CancelRequest):
            cancelled = await self._call(self.relay.backend.cancel_reply, request.resource_id)
            self.log.info("cancel in chat {}: {}", request.resource_id,
                          "stopped a reply" if cancelled else "nothing running")
            self.reply(DataReply(id=request.id, resource="chat",
                                 resource_id=request.resource_id,
                                 data={"cancelled": bool(cancelled)}))
        elif isinstance(request, CreateRequest):
            chat = await self._call(self.relay.backend.create_chat, request.resource_id,
                                    request.title, request.model_profile_id)
            chat_id = chat.get("id") if isinstance(chat, dict) else None
            if not isinstance(chat_id, str):
                self.log.error("backend create_chat returned a chat without a string id")
                raise _Refused(ErrorCode.BACKEND_ERROR, "backend returned an invalid chat")
            self.reply(DataReply(id=request.id, resource="chat", resource_id=chat_id,
                                 data={"chat": chat}))
        else:  # pragma: no cover - decode() returns only the types above
            _unreachable(request)

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Call the backend within ``backend_timeout``; its failures become error replies."""
        try:
            with trio.fail_after(self._config.backend_timeout):
                return await fn(*args)
        except trio.TooSlowError:
            self.relay._count_backend_error()
            raise _Refused(ErrorCode.BACKEND_ERROR, "backend timed out") from None
        except NotFound as exc:
            raise _Refused(ErrorCode.NOT_FOUND, str(exc) or "not found") from None
        except BackendError as exc:
            self.relay._count_backend_error()
            raise _Refused(ErrorCode.BACKEND_ERROR, str(exc) or "backend error") from None
        except Exception:
            self.relay._count_backend_error()
            self.log.exception("backend {} failed",
                               getattr(fn, "__name__", "call").lstrip("_"))  # _send_message
            raise _Refused(ErrorCode.BACKEND_ERROR, "backend error") from None

    async def _auth(self, request: AuthRequest) -> None:
        guard = self.relay.pin_guard
        address = self.peer.rsplit(":", 1)[0]
        check = guard.check(address, trio.current_time())
        devices = self.relay.devices
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
        elif not pin_matches(request.pin or "", self.relay.pin):
            await self._auth_failed(request, address, ErrorCode.AUTH_FAILED, "Invalid PIN")
            return
        if device is None:
            # The right PIN clears the address's failures; a token does not, since it may
            # pass a lockout that PIN guessers from the same address still deserve.
            guard.succeeded(address)
        projects = await self._call(self.relay.backend.list_projects)
        profiles = await self._call(self.relay.backend.get_model_profiles)
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
            else {"name": UNNAMED_DEVICE}
        )
        self.authenticated = True
        self.log.info("authenticated{}", f" as device {device.id}" if device else "")
        self.reply(AuthSuccess(id=request.id, data=data))

    async def _auth_failed(
        self, request: AuthRequest, address: str, code: str, error: str
    ) -> None:
        """A wrong PIN or token: one failure for the guard, answered after its delay."""
        self.relay._count_failed_pin()
        verdict = self.relay.pin_guard.failed(address, trio.current_time())
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
        assert self._nursery is not None
        await self._nursery.start(self._subscription, request)

    async def _subscription(
        self, request: SubscribeRequest, task_status: trio.TaskStatus[None]
    ) -> None:
        """Lives exactly as long as the subscription: cancelling it is unsubscribing."""
        key = request.key
        subscription = _WebSubscription(self, key)
        with subscription.cancel_scope:
            try:
                # A replay must fit the outbound queue (with the reply): more would close this
                # client as slow on every reconnect, so it gets a fresh snapshot instead.
                room = self._config.outbound_queue_size - 1 - self._queued
                async with self.relay._subscription(
                    key, subscription, request.since_seq, request.epoch, room
                ) as synced:
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
                    # Resubscribing replaces the old subscription in the same instant that
                    # the new one goes live, so no push is delivered twice or missed.
                    old = self.subscriptions.get(key)
                    if old is not None:
                        old.detach()
                    self.subscriptions[key] = subscription
                    subscription.detach = lambda: self._detach(subscription, synced.leave)
                    self.push(reply)
                    synced.go_live()
                    self.log.info("{} {}", "resumed" if snapshot is None else "subscribed to",
                                  key)
                    task_status.started()
                    await trio.sleep_forever()
            except SubscribeFailed as exc:
                self.reply(_error(request, exc.code, str(exc)))
                task_status.started()
            finally:
                self.forget(subscription)
                # The detach closure refers to the subscription: break the cycle, so that a
                # finished connection is freed at once, not at the next garbage collection.
                subscription.detach = subscription.cancel_scope.cancel

    def _detach(self, subscription: _WebSubscription, remove: Callable[[], None]) -> None:
        # Leave the broadcaster now, not when the task next runs, so no push slips in after
        # the reply that says the subscription is gone.
        remove()
        self.forget(subscription)
        subscription.cancel_scope.cancel()

    def _unsubscribe(self, request: UnsubscribeRequest) -> None:
        subscription = self.subscriptions.get(request.key)
        if subscription is not None:
            subscription.detach()
            self.log.info("unsubscribed from {}", request.key)
        self.reply(DataReply(id=request.id, resource=request.resource,
                             resource_id=request.resource_id or None,
                             data={"unsubscribed": subscription is not None}))


#: The sender of messages from a PIN sign-in that paired no device.
UNNAMED_DEVICE = "Unnamed device"


def locked_out_text(seconds: int) -> str:
    """The ``locked_out`` error text: how long to wait, in minutes from two minutes up."""
    if seconds >= 120:
        wait = f"{math.ceil(seconds / 60)} minutes"
    else:
        wait = f"{seconds} second{'s' * (seconds != 1)}"
    return f"Too many failed attempts; try again in {wait}"


def _error(request: Request, code: str, error: str) -> ErrorReply:
    resource = getattr(request, "resource", None)
    if isinstance(request, (SendRequest, CancelRequest)):
        resource = "chat"
    resource_id: str | None = getattr(request, "resource_id", None) or None
    return ErrorReply(id=request.id, error=error, code=code, resource=resource,
                      resource_id=resource_id)


def _unreachable(value: object) -> NoReturn:
    raise AssertionError(f"unexpected request {value!r}")

