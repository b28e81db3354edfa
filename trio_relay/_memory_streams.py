"""In-memory transport: a trio Listener whose connections behave like sockets.

The relay serves it like a TCP listener, so a client connected through it goes through the
real WebSocket handshake, framing and connection code, with no socket and no real time. Each
direction has a bounded buffer, the kernel's socket buffer in small: `MemorySocketStream`
offers the non-blocking ``send_nowait`` that the relay's direct writes use on real sockets
(`trio_relay._server.websocket`), so tests run the same path, partial writes included.
"""

from __future__ import annotations

import math
from typing import Final

import trio
import trio.testing

__all__ = ["MemoryListener", "MemorySocketStream", "memory_socket_pair"]

#: Bytes each direction of a `memory_socket_pair` buffers, as a loopback socket about does.
DEFAULT_BUFFER: Final = 256 * 1024


class _Pipe:
    """One direction: a bounded byte buffer between a writer and a reader."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.writer_closed = False
        self.reader_closed = False
        self.readable = trio.lowlevel.ParkingLot()
        self.writable = trio.lowlevel.ParkingLot()

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        if self.writer_closed:
            raise trio.ClosedResourceError("this stream is closed")
        if self.reader_closed:
            # As with TCP, writing to a peer that has closed is not refused at once.
            return len(data)
        taken = min(len(data), self.capacity - len(self.buffer))
        if taken > 0:
            self.buffer += data[:taken]
            self.readable.unpark_all()
        return max(taken, 0)


class MemorySocketStream(trio.abc.Stream):
    """One end of a `memory_socket_pair`."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self._out = outgoing
        self._in = incoming
        self._sending = False
        self._receiving = False

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what fits in the buffer now; returns how many bytes (0 when it is full)."""
        return self._out.write_nowait(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        self._sending = True
        try:
            view = memoryview(data)
            await trio.lowlevel.checkpoint()
            while view:
                view = view[self._out.write_nowait(view):]
                if view:
                    await self._out.writable.park()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        while len(self._out.buffer) >= self._out.capacity and not self._out.reader_closed:
            await self._out.writable.park()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            pipe = self._in
            while True:
                if pipe.reader_closed:
                    raise trio.ClosedResourceError("this stream is closed")
                if pipe.buffer:
                    size = len(pipe.buffer) if max_bytes is None else max_bytes
                    data = bytes(pipe.buffer[:size])
                    del pipe.buffer[:size]
                    pipe.writable.unpark_all()
                    return data
                if pipe.writer_closed:
                    return b""
                await pipe.readable.park()
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        self._out.writer_closed = True
        self._in.reader_closed = True
        self._in.buffer.clear()
        for pipe in (self._out, self._in):
            pipe.readable.unpark_all()
            pipe.writable.unpark_all()
        await trio.lowlevel.checkpoint()


def memory_socket_pair(
    buffer: int = DEFAULT_BUFFER,
) -> tuple[MemorySocketStream, MemorySocketStream]:
    """Two connected `MemorySocketStream` ends, ``buffer`` bytes in flight each way."""
    a_to_b, b_to_a = _Pipe(buffer), _Pipe(buffer)
    return MemorySocketStream(a_to_b, b_to_a), MemorySocketStream(b_to_a, a_to_b)


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands the relay the server side of each `connect`; ``lockstep`` makes writes block
    until the client reads, which is how a slow consumer is simulated."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener is closed") from None

    async def aclose(self) -> None:
        self._receive.close()
        self._send.close()
        await trio.lowlevel.checkpoint()

    async def connect(
        self, *, lockstep: bool = False, peer: str | None = None, buffer: int = DEFAULT_BUFFER
    ) -> trio.abc.Stream:
        """Open a connection; returns the client's end of the stream.

        ``peer`` is the ``host:port`` the relay sees for it (default ``"memory"``), so tests
        can tell client addresses apart. ``buffer``: bytes in flight each way before writes
        wait (or, direct, are taken in part). ``lockstep``: every write waits for the reader
        (a trio `lockstep_stream_pair`, which takes no direct writes).
        """
        client: trio.abc.Stream
        server: trio.abc.Stream
        if lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = memory_socket_pair(buffer)
        if peer is not None:
            # An attribute the relay looks for (_peer_of); the stream type does not declare it.
            setattr(server, "peer", peer)  # noqa: B010
        try:
            self._send.send_nowait(server)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise trio.ClosedResourceError("listener is closed") from None
        await trio.lowlevel.checkpoint()
        return client
