"""`TestClient`: a raw client of the protocol for tests, over any stream (`trio_relay.testing`
re-exports it); `GatedStream` holds a stream's reads and writes at a gate."""

from __future__ import annotations

import itertools
import json
import sys
from collections import deque
from typing import Any, Final

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection

if sys.version_info < (3, 11):
    pass

__all__ = ["Frame", "GatedStream", "TestClient"]

#: One frame, as JSON decodes it.
Frame = dict[str, Any]

_MASK: Final = bytes([0x37, 0xFA, 0x21, 0x3D])


class TestClient:
    """A WebSocket client of a relay, speaking the wire protocol frame by frame.

    Every wait is bounded by ``timeout`` seconds (mock seconds under ``autojump_clock``), so
    a frame that never comes fails the test instead of hanging it.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, ws: WebSocketConnection, stream: trio.abc.Stream, timeout: float) -> None:
        self.ws = ws
        self.stream = stream
        self.timeout = timeout
        self._ids = itertools.count(1)
        # Frames read but not yet returned: pushes that arrived while waiting for a reply,
        # and whatever wait_closed read before the close. `receive` returns these first.
        self._held: deque[Frame] = deque()

    @property
    def held(self) -> list[Frame]:
        """The frames read but not yet returned, oldest first: pushes that arrived while a
        reply was awaited, and every frame `wait_closed` read before the close."""
        return list(self._held)

    # --- sending ----------------------------------------------------------------------------

    async def send(self, frame: Frame | str) -> None:
        """Send one frame: a dict is encoded as JSON, a str is sent as it is."""
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def send_raw_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        """Write one masked WebSocket frame, built by hand, straight to the stream.

        For what a well-behaved client library would refuse to send: invalid UTF-8 in a text
        frame (``opcode`` 0x1), a ping at an awkward moment (0x9), a fragment (``fin=False``).
        ``opcode`` may be a `wsproto.frame_protocol.Opcode`.
        """
        header = bytearray([(0x80 if fin else 0) | opcode])
        size = len(payload)
        if size < 126:
            header.append(0x80 | size)
        elif size < 1 << 16:
            header += bytes([0x80 | 126]) + size.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + size.to_bytes(8, "big")
        masked = bytes(byte ^ _MASK[i % 4] for i, byte in enumerate(payload))
        await self.stream.send_all(bytes(header) + _MASK + masked)

    async def request_nowait(self, type: str, **fields: Any) -> str:
        """Send a request with a fresh id and return the id; read the reply with `reply_to`."""
        request_id = f"r{next(self._ids)}"
        await self.send({"id": request_id, "type": type, **fields})
        return request_id

    async def request(self, type: str, **fields: Any) -> Frame:
        """Send a request with a fresh id and return its reply; pushes meanwhile are held."""
        return await self.reply_to(await self.request_nowait(type, **fields))

    # --- receiving --------------------------------------------------------------------------

    async def receive(self) -> Frame:
        """The next frame, in arrival order (held frames first)."""
        if self._held:
            return self._held.popleft()
        with trio.fail_after(self.timeout):
            text = await self.ws.get_message()
        assert isinstance(text, str), "the relay sent a binary frame"
        frame: Frame = json.loads(text)
        return frame

    async def reply_to(self, request_id: Any) -> Frame:
        """The reply to ``request_id``; frames that arrive before it are held."""
        with trio.fail_after(self.timeout):
            while True:
                text = await self.ws.get_message()
                assert isinstance(text, str)
                frame: Frame = json.loads(text)
                if frame.get("id") == request_id and frame.get("id") is not None:
                    return frame
                self._held.append(frame)

    async def next_push(self) -> Frame:
        """The next frame, which must answer no request (``id`` null)."""
        frame = await self.receive()
        assert frame.get("id") is None, f"expected a push, got a reply: {frame}"
        return frame

    async def next_pushes(self, count: int) -> list[Frame]:
        """The next ``count`` frames, each of which must be a push."""
        return [await self.next_push() for _ in range(count)]

    async def frames_until_quiet(self, quiet: float = 0.001) -> list[Frame]:
        """Every frame (held ones first) until none arrives for ``quiet`` seconds.

        Under ``autojump_clock`` the default means "until every task is blocked": mock time
        only moves on once nothing else can happen.
        """
        frames: list[Frame] = []
        while True:
            with trio.move_on_after(quiet):
                frames.append(await self.receive())
                continue
            return frames

    async def assert_no_push(self) -> None:
        """Assert that no frame arrives before every task is blocked (no time passes).

        Only meaningful in memory: over a real socket, tasks block on the kernel too.
        """
        assert not self._held, f"unexpected frame: {self._held[0]}"
        arrived: list[str | bytes] = []

        async def grab() -> None:
            try:
                arrived.append(await self.ws.get_message())
            except ConnectionClosed:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grab)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert not arrived, f"unexpected frame: {arrived[0]!r}"

    # --- the protocol's requests ------------------------------------------------------------

    async def authenticate(
        self, pin: str | None = None, *, token: str | None = None, device_name: str | None = None
    ) -> Frame:
        """Read ``auth_required`` if it has not been read, then sign in with the PIN (pairing
        this client as ``device_name`` if given) or a device ``token``; asserts success and
        returns the reply (``reply["data"]["device"]`` holds a paired device's token)."""
        fields: dict[str, Any] = {"pin": pin} if token is None else {"token": token}
        if device_name is not None:
            fields["deviceName"] = device_name
        reply = await self.request("auth", **fields)
        if self._held and self._held[0].get("type") == "auth_required":
            self._held.popleft()
        assert reply["type"] == "auth_success", reply
        return reply

    async def subscribe(
        self,
        resource: str,
        resource_id: str | None = None,
        *,
        since_seq: int | None = None,
        epoch: str | None = None,
        **extra: Any,
    ) -> Frame:
        """Subscribe (resuming from ``since_seq`` of ``epoch`` if given); asserts the reply is
        ``subscribed`` and returns it."""
        fields: dict[str, Any] = {"resource": resource, **extra}
        if resource_id is not None:
            fields["resourceId"] = resource_id
        if since_seq is not None:
            fields["sinceSeq"] = since_seq
        if epoch is not None:
            fields["epoch"] = epoch
        reply = await self.request("subscribe", **fields)
        assert reply["type"] == "subscribed", reply
        return reply

    async def unsubscribe(self, resource: str, resource_id: str | None = None) -> bool:
        """Unsubscribe; returns whether there was a subscription to end."""
        fields: dict[str, Any] = {"resource": resource}
        if resource_id is not None:
            fields["resourceId"] = resource_id
        reply = await self.request("unsubscribe", **fields)
        assert reply["type"] == "data", reply
        unsubscribed: bool = reply["data"]["unsubscribed"]
        return unsubscribed

    async def send_message(self, chat_id: str, message: Any) -> Frame:
        """Send a message to a chat (a ``send`` request); asserts it was accepted."""
        reply = await self.request("send", resourceId=chat_id, message=message)
        assert reply["type"] == "data" and reply["data"] == {"sent": True}, reply
        return reply

    # --- closing ----------------------------------------------------------------------------

    async def close(self, code: int = 1000) -> None:
        """Close cleanly, with the closing handshake."""
        await self.ws.aclose(code)

    async def abort(self) -> None:
        """Drop the stream without a closing handshake, as a vanished client would."""
        await self.stream.aclose()

    async def wait_closed(self) -> tuple[int, str | None]:
        """Read until the relay closes the connection; returns its close code and reason.

        The frames read on the way are kept, in order, in `held`.
        """
        with trio.fail_after(self.timeout):
            while True:
                try:
                    text = await self.ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    return exc.reason.code, exc.reason.reason
                self._held.append(json.loads(text))


class GatedStream(trio.abc.Stream):
    """A client's stream whose reads can be held back: a client that stops reading, or a
    network path on which nothing from the relay gets through (no pong either)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._gate = trio.Event()
        self._gate.set()

    def pause_reading(self) -> None:
        """Hold back what the relay sends until `resume_reading` (a read in progress too)."""
        if self._gate.is_set():
            self._gate = trio.Event()

    def resume_reading(self) -> None:
        self._gate.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self._gate.wait()
        data = await self.inner.receive_some(max_bytes)
        # A read already waiting when the gate closed holds its data back too.
        await self._gate.wait()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._gate.set()
        await self.inner.aclose()
