"""Deterministic in-memory relays and clients, for this project's tests and for yours.

`open_memory_relay` runs a real relay whose clients connect through `trio.testing` memory
streams: the WebSocket handshake, framing and connection code are the ones production runs,
but there is no socket and, under trio's ``autojump_clock``, no real time.

::

    async def test_echo(autojump_clock):
        backend = MemoryBackend()
        chat = backend.add_chat("p1", "c1")
        async with open_memory_relay(backend, pin="1234") as relay:
            client = await relay.connect()
            await client.authenticate("1234")
            await client.subscribe("chat", "c1")
            backend.emit("chat", "c1", {"type": "chunk", "text": "hi"})
            assert (await client.next_push())["data"] == {"type": "chunk", "text": "hi"}
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from ._config import RelayConfig
from ._memory import MemoryListener
from ._memory_backend import HANG, MemoryBackend
from ._relay import Relay, _raise_single, open_relay

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["HANG", "MemoryBackend", "MemoryRelay", "TestClient", "open_memory_relay"]

Frame = dict[str, Any]


class TestClient:
    """A WebSocket client of a memory relay, speaking the wire protocol frame by frame."""

    __test__ = False  # not a pytest test class

    def __init__(self, ws: WebSocketConnection, stream: trio.abc.Stream, timeout: float) -> None:
        self.ws = ws
        self.stream = stream
        self.timeout = timeout
        self._ids = itertools.count(1)
        # Frames that arrived while waiting for a reply: pushes, kept in order for next_push.
        self._held: deque[Frame] = deque()

    async def send(self, frame: Frame | str) -> None:
        """Send one frame: a dict is encoded as JSON, a str is sent as it is."""
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def receive(self) -> Frame:
        """The next frame, in arrival order (held pushes first)."""
        if self._held:
            return self._held.popleft()
        with trio.fail_after(self.timeout):
            text = await self.ws.get_message()
        assert isinstance(text, str), "the relay sent a binary frame"
        frame: Frame = json.loads(text)
        return frame

    async def request(self, type: str, **fields: Any) -> Frame:
        """Send a request with a fresh id and return its reply; pushes meanwhile are held."""
        request_id = f"r{next(self._ids)}"
        await self.send({"id": request_id, "type": type, **fields})
        return await self.reply_to(request_id)

    async def reply_to(self, request_id: Any) -> Frame:
        with trio.fail_after(self.timeout):
            while True:
                text = await self.ws.get_message()
                assert isinstance(text, str)
                frame: Frame = json.loads(text)
                if frame.get("id") == request_id and frame.get("id") is not None:
                    return frame
                self._held.append(frame)

    async def next_push(self) -> Frame:
        """The next frame that answers no request (``id`` null)."""
        frame = await self.receive()
        assert frame.get("id") is None, f"expected a push, got a reply: {frame}"
        return frame

    async def assert_no_push(self) -> None:
        """Assert that no frame arrives before every task is blocked (no time passes)."""
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

    async def authenticate(self, pin: str) -> Frame:
        """Read ``auth_required`` if it has not been read, then authenticate; returns the reply."""
        reply = await self.request("auth", pin=pin)
        if self._held and self._held[0].get("type") == "auth_required":
            self._held.popleft()
        assert reply["type"] == "auth_success", reply
        return reply

    async def subscribe(self, resource: str, resource_id: str | None = None, **extra: Any) -> Frame:
        fields: dict[str, Any] = {"resource": resource, **extra}
        if resource_id is not None:
            fields["resourceId"] = resource_id
        reply = await self.request("subscribe", **fields)
        assert reply["type"] == "subscribed", reply
        return reply

    async def close(self, code: int = 1000) -> None:
        """Close cleanly, with the closing handshake."""
        await self.ws.aclose(code)

    async def abort(self) -> None:
        """Drop the stream without a closing handshake, as a vanished client would."""
        await self.stream.aclose()

    async def wait_closed(self) -> tuple[int, str | None]:
        """Read until the relay closes the connection; returns its close code and reason."""
        with trio.fail_after(self.timeout):
            while True:
                try:
                    text = await self.ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    return exc.reason.code, exc.reason.reason
                self._held.append(json.loads(text))


class MemoryRelay:
    """A relay served over in-memory streams; `connect` opens a `TestClient`."""

    def __init__(self, relay: Relay, listener: MemoryListener, nursery: trio.Nursery,
                 timeout: float) -> None:
        self.relay = relay
        self.listener = listener
        self._nursery = nursery
        self._timeout = timeout

    async def connect(
        self,
        *,
        lockstep: bool = False,
        authenticate: str | None = None,
        peer: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> TestClient:
        """Open a client connection.

        ``lockstep``: the relay's writes wait for our reads (a slow consumer). ``peer``: the
        ``host:port`` the relay sees. ``headers``: extra handshake headers (e.g. Origin).
        """
        stream = await self.listener.connect(lockstep=lockstep, peer=peer)
        extra = [(name.encode(), value.encode()) for name, value in headers or ()]
        # A refused handshake (403, 429) raises ConnectionRejected here, not in the nursery.
        ws = await self._nursery.start(_run_client, stream, extra)
        client = TestClient(ws, stream, self._timeout)
        if authenticate is not None:
            await client.authenticate(authenticate)
        return client


async def _run_client(
    stream: trio.abc.Stream,
    headers: list[tuple[bytes, bytes]],
    *,
    task_status: trio.TaskStatus[WebSocketConnection],
) -> None:
    """A client connection in a nursery of its own, so that trio-websocket's reader, which
    raises a refused handshake, fails only this start and not every client."""
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]  # hinted as a socket stream; any Stream works
                "relay.test",
                "/ws",
                extra_headers=headers,
            )
            task_status.started(ws)
    except BaseExceptionGroup as group:
        _raise_single(group)


@asynccontextmanager
async def open_memory_relay(
    backend: Any,
    *,
    pin: str = "1234",
    config: RelayConfig | None = None,
    client_timeout: float = 30.0,
) -> AsyncIterator[MemoryRelay]:
    """A relay on an in-memory listener; ``client_timeout`` bounds every client wait."""
    listener = MemoryListener()
    try:
        # The clients' nursery encloses the relay, so that on the way out the relay closes
        # them (1001) while they can still answer, as real clients would.
        async with trio.open_nursery() as client_nursery:
            async with open_relay(backend, pin=pin, config=config) as relay:
                await relay._nursery.start(relay.serve_listeners, [listener])
                yield MemoryRelay(relay, listener, client_nursery, client_timeout)
            client_nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)
