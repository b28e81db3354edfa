"""A WebSocket client of our own for the edge's tests: wsproto parses every byte the relay
writes, so a frame cut short, doubled, or with a pong or close written into its middle fails
the parse; and frames of any shape, valid or not, can be written by hand.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from trio_relay.testing import MemoryRelay

#: A valid Sec-WebSocket-Key (16 bytes, base64).
KEY: Final = base64.b64encode(b"0123456789abcdef").decode()
#: Any masking key will do: the relay unmasks whatever a client picked.
MASK: Final = bytes([0x37, 0xFA, 0x21, 0x3D])

# Opcodes (RFC 6455 5.2), spelled out so the tests need no private module of wsproto.
CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
) -> bytes:
    """One WebSocket frame built by hand: ``rsv`` is the three RSV bits (0-7), ``mask=None``
    leaves it unmasked (which a server must refuse), any opcode and any length go."""
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)
    masked = 0x80 if mask is not None else 0
    size = len(payload)
    if size < 126:
        header = bytes([first, masked | size])
    elif size < 1 << 16:
        header = bytes([first, masked | 126]) + struct.pack("!H", size)
    else:
        header = bytes([first, masked | 127]) + struct.pack("!Q", size)
    if mask is None:
        return header + payload
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def upgrade_request(
    target: str = "/ws",
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    key: str | None = KEY,
    ws_version: str | None = "13",
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    extra: tuple[str, ...] = (),
) -> bytes:
    """An opening handshake request, by hand; each header can be left out (None) or bent."""
    lines = [f"{method} {target} {version}", "Host: relay.test"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if ws_version is not None:
        lines.append(f"Sec-WebSocket-Version: {ws_version}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_to_end(stream: trio.abc.Stream) -> bytes:
    """Everything until the relay closes the stream."""
    received = b""
    while chunk := await stream.receive_some():
        received += chunk
    return received


class RawClient:
    """A WebSocket client on wsproto that reads only when told to."""

    def __init__(self, stream: trio.abc.Stream, *, opened: bool = False) -> None:
        """``opened``: the opening handshake is already done (or skipped: a server-side
        object under test directly), so only frames are spoken."""
        self.stream = stream
        self.ws: WSConnection | Connection = (
            Connection(ConnectionType.CLIENT) if opened else WSConnection(ConnectionType.CLIENT)
        )
        self.events: list[Event] = []
        self._text = ""
        #: The relay closed the stream (end of file, or it is gone).
        self.ended = False

    async def handshake(self, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.send(Request(host="relay.test", target="/ws",
                                extra_headers=extra_headers or []))
        await self.read_until(lambda events: any(
            isinstance(e, (AcceptConnection, RejectConnection)) for e in events))
        assert isinstance(self.events[0], AcceptConnection), self.events
        # auth_required may have come with the handshake's answer.
        self.events = [e for e in self.events if not isinstance(e, AcceptConnection)]

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        """Bytes straight to the stream, past our wsproto (which does not see them)."""
        await self.stream.send_all(data)

    async def request(self, **fields: Any) -> None:
        await self.send(TextMessage(json.dumps(fields)))

    async def read_until(self, done: Callable[[list[Event]], bool]) -> list[Event]:
        """Read until ``done(events)`` or the end of the stream; returns the events read
        (the pieces of each text message joined, in order)."""
        while not done(self.events) and not self.ended:
            try:
                data = await self.stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.ended = True
                break
            self.ws.receive_data(bytes(data))
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._text += event.data
                    if event.message_finished:
                        self.events.append(TextMessage(self._text))
                        self._text = ""
                elif isinstance(event, RejectData):
                    continue
                else:
                    self.events.append(event)
        return self.events

    async def closed(self) -> CloseConnection:
        """Read until the relay's close frame, which must come; answer it (as a client
        should) and return it."""
        events = await self.read_until(
            lambda events: any(isinstance(e, CloseConnection) for e in events))
        close = next((e for e in events if isinstance(e, CloseConnection)), None)
        assert close is not None, f"no close frame before the end: {events}"
        try:
            await self.send(close.response())
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass  # gone, or the close answered ours
        return close

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(e.data) for e in self.events if isinstance(e, TextMessage)]

    async def replies(self, count: int) -> list[dict[str, Any]]:
        await self.read_until(lambda events: len(self.frames()) >= count)
        return self.frames()


@asynccontextmanager
async def raw_client(
    memory: MemoryRelay, *, buffer: int = 1 << 18, pin: str | None = None,
    subscribe: str | None = None,
) -> AsyncIterator[RawClient]:
    """A `RawClient` of ``memory``, its handshake done and, with ``pin``, authenticated (and
    subscribed to chat ``subscribe``); every frame read on the way is cleared."""
    stream = await memory.listener.connect(buffer=buffer)
    client = RawClient(stream)
    await client.handshake()
    if pin is not None:
        await client.request(id="a", type="auth", pin=pin)
        expected = ["auth_required", "auth_success"]
        if subscribe is not None:
            await client.request(id="s", type="subscribe", resource="chat",
                                 resourceId=subscribe)
            expected.append("subscribed")
        assert [f["type"] for f in await client.replies(len(expected))] == expected
        client.events.clear()
    try:
        yield client
    finally:
        await stream.aclose()
