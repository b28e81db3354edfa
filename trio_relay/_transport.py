"""`OwnedStream`: the relay's hold on each accepted stream, under trio-websocket.

Two gaps in trio-websocket 0.12 are closed here, with its public API only:

- After an abrupt disconnect it never closes the stream, so the socket would live until
  garbage collection. The relay closes every stream itself when the connection ends.
- When wsproto fails to parse a frame (invalid UTF-8 in a text frame: 1007; a protocol error:
  1002) trio-websocket records the close code but drops the TCP connection without sending the
  close frame, so the client would see 1006. `OwnedStream` notices that no close frame went
  out and sends one before the stream is closed.

trio-websocket writes each WebSocket frame with one ``send_all`` call, so a close frame is
recognised by its first byte (FIN + opcode 8); server frames are never masked.

The relay's HTTP front (`trio_relay._http`) reads each request head itself; an upgrade
request is pushed back with `OwnedStream.unread` for trio-websocket to read.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["OwnedStream", "close_frame"]

_CLOSE_FRAME_FIRST_BYTE: Final = 0x88
_MAX_REASON: Final = 123  # a control frame's payload is at most 125 bytes


def close_frame(code: int, reason: str = "") -> bytes:
    """An unmasked (server) close frame."""
    payload = struct.pack("!H", code) + reason.encode("utf-8")[:_MAX_REASON]
    return bytes([_CLOSE_FRAME_FIRST_BYTE, len(payload)]) + payload


class OwnedStream(trio.abc.Stream):
    """Passes everything through, but only the relay may really close the stream."""

    def __init__(
        self, stream: trio.abc.Stream, send_nowait: Callable[[memoryview], int] | None = None
    ) -> None:
        self.inner = stream
        #: Writes what the kernel takes at once and returns the count (`trio_relay._direct`);
        #: None where the stream offers no such write (TLS).
        self.send_nowait = send_nowait
        self.close_frame_sent = False
        #: Called when trio-websocket closes (during the handshake: it has given up).
        self.on_close: Callable[[], object] | None = None
        self._unread = b""
        self._write_lock = trio.Lock()
        self._owed: memoryview | None = None
        # A write was cancelled halfway with no way to know how much went out (TLS): the
        # byte stream is torn, and nothing more may be written.
        self._torn = False

    @property
    def busy(self) -> bool:
        """Whether a write is under way (or waiting for its turn) or part of a frame is still
        owed (`owe`)."""
        return self._write_lock.locked() or self._owed is not None

    def owe(self, rest: memoryview) -> None:
        """The rest of a frame written in part without blocking (`trio_relay._direct`): it is
        written before anything else."""
        assert self._owed is None
        self._owed = rest

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # trio-websocket (pongs, close frames, its own messages) and the connection's writer
        # (frames framed once for every client) both write here, one at a time.
        async with self._write_lock:
            if self._torn:
                raise trio.BrokenResourceError("an earlier write was cancelled halfway")
            if self._owed is not None:
                await self._write(self._owed)
            if data and data[0] == _CLOSE_FRAME_FIRST_BYTE:
                self.close_frame_sent = True
            if data:
                await self._write(memoryview(data))

    async def _write(self, data: memoryview) -> None:
        """Write all of ``data``. Cancelled halfway (a ping's timeout, a closing connection),
        it leaves exactly the unwritten rest owed, so that a frame is never cut short nor
        written twice; without a non-blocking write, it marks the stream torn."""
        send_nowait = self.send_nowait
        if send_nowait is None:
            try:
                await self.inner.send_all(data)
            except trio.Cancelled:
                self._torn = True
                raise
            return
        self._owed = None
        while data:
            data = data[send_nowait(data):]
            if data:
                self._owed = data  # until it is written, by this call or (cancelled) the next
                await self.inner.wait_send_all_might_not_block()
                self._owed = None
        await trio.lowlevel.cancel_shielded_checkpoint()  # written: a cancel cannot undo it

    async def send_frame(self, frame: bytes) -> None:
        """Write a data frame framed by the relay; refused once a close frame has gone out."""
        if self.close_frame_sent:
            raise trio.ClosedResourceError("the closing handshake has begun")
        await self.send_all(frame)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._unread:
            # What the relay's HTTP front read ahead (an upgrade request) comes first.
            size = len(self._unread) if max_bytes is None else max_bytes
            unread, self._unread = self._unread[:size], self._unread[size:]
            await trio.lowlevel.checkpoint()
            return unread
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._gone()
            raise
        if not data:
            self._gone()
        return data

    def unread(self, data: bytes) -> None:
        """Push bytes back: the next ``receive_some`` returns them before reading more."""
        self._unread = data + self._unread

    async def aclose(self) -> None:
        # trio-websocket closes from inside its reader; the relay closes when the whole
        # connection is over (`close_for_real`), after a close frame if one is owed.
        self._gone()
        await trio.lowlevel.checkpoint()

    def _gone(self) -> None:
        # The peer left or trio-websocket gave up: a handshake still waiting can stop now.
        if self.on_close is not None:
            self.on_close()

    async def close_for_real(self, owed_code: int | None, reason: str, grace: float) -> None:
        """Send the close frame trio-websocket owed (if any), then close the stream; each step
        bounded by ``grace`` seconds, so a peer that reads nothing cannot hold the stream open."""
        # Half a frame still owed, or a torn stream, would make the close frame unreadable:
        # just close.
        if (owed_code is not None and not self.close_frame_sent and self._owed is None
                and not self._torn):
            with trio.move_on_after(grace):
                try:
                    await self.inner.send_all(close_frame(owed_code, reason))
                    self.close_frame_sent = True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        with trio.move_on_after(grace) as scope:
            await self.inner.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.inner)
