"""`ServerWebSocket`: one open WebSocket on the relay's side, on wsproto's public API.

One reader: `ServerWebSocket.read` feeds every byte the client sends to wsproto and handles
each event through a dispatch table (texts go to the connection, pings are answered, a close
is answered or completes ours). Writes never block the caller: a frame goes straight into
the stream when nothing is queued, written without waiting (as asyncio's transports do), and
only what the kernel does not take at once is queued, to be drained by a writer task that
exists only while something waits. A queue past ``max_backlog`` frames means a slow client.

Non-blocking writes need a stream that offers them: a `trio.SocketStream` (through its
socket's file descriptor) or a stream with a ``send_nowait`` method (the in-memory socket of
`trio_relay.testing`). Any other stream (TLS) has every frame written by the writer task.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)

from .._config import CloseCode

__all__ = ["ServerWebSocket", "nonblocking_writer"]

#: Bytes asked of the stream per read.
RECEIVE_SIZE: Final = 64 * 1024
#: Close codes that mean the other side is gone (no closing handshake happened).
_ABNORMAL: Final = 1006

NonBlockingWrite = Callable[[bytes | memoryview], int]


def nonblocking_writer(stream: trio.abc.Stream) -> NonBlockingWrite | None:
    """A function writing what the stream takes at once and returning how many bytes, or None
    where the stream offers no such write (TLS). It raises `trio.BrokenResourceError` when
    the peer is gone."""
    if isinstance(stream, trio.SocketStream) and os.name == "posix":
        fd = stream.socket.fileno()  # trio keeps its sockets non-blocking

        def write(data: bytes | memoryview) -> int:
            try:
                return os.write(fd, data)
            except BlockingIOError:
                return 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc

        return write
    send_nowait: NonBlockingWrite | None = getattr(stream, "send_nowait", None)
    return send_nowait


class ServerWebSocket:
    """The server side of one WebSocket whose opening handshake is done."""

    # A relay holds thousands of these: no per-instance dict.
    __slots__ = (
        "_backlog", "_broken", "_close_timeout", "_drained", "_ignoring", "_max_backlog",
        "_max_message_size", "_nursery", "_parts", "_read_scope", "_size",
        "_stop_after_violation", "_violation", "_write_now", "_writing", "_ws", "closed",
        "pinged_at", "stream",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        *,
        max_message_size: int,
        max_backlog: int,
        close_timeout: float,
        write_at_once: bool = True,
    ) -> None:
        self.stream = stream
        self._ws = ws
        # None: every frame goes through the writer task.
        self._write_now = nonblocking_writer(stream) if write_at_once else None
        self._max_message_size = max_message_size
        self._max_backlog = max_backlog
        self._close_timeout = close_timeout
        # Frames (or the rest of one) waiting for the writer, oldest first; made when first
        # needed, since most connections keep up and never queue anything.
        self._backlog: deque[bytes | memoryview] | None = None
        self._writing = False
        self._drained: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._read_scope = trio.CancelScope()
        self._parts: list[str] = []
        self._size = 0  # bytes of the message so far
        self._ignoring = False  # the rest of a refused message (binary, too big)
        # A frame broke the protocol: the close code and reason to close with once settled,
        # and whether to stop reading at once (wsproto cannot parse any further).
        self._violation: tuple[int, str] | None = None
        self._stop_after_violation = False
        # A write failed or was cut short: nothing more may be written.
        self._broken = False
        #: The close code and reason of the connection, once known (ours or the peer's).
        self.closed: tuple[int, str] | None = None
        #: When the ping still waiting for its pong was sent (`trio_relay._server.timers`).
        self.pinged_at: float | None = None

    @property
    def backlog(self) -> int:
        """Frames queued and not yet written."""
        return len(self._backlog) if self._backlog is not None else 0

    @property
    def closing(self) -> bool:
        """Our close frame is queued or written (or the peer's came): only it goes out now."""
        return self._ws.state is not ConnectionState.OPEN

    # --- reading ----------------------------------------------------------------------------

    async def read(
        self,
        nursery: trio.Nursery,
        deliver: Callable[[str], Awaitable[None]],
        settle: Callable[[], Awaitable[None]],
    ) -> None:
        """Read until the WebSocket is closed (either way) or the peer is gone; each text
        message is passed to ``deliver``. The writer runs in ``nursery``.

        A frame that breaks the protocol closes the connection (1002, 1003, 1007, 1009), but
        only after ``settle`` returns: the messages delivered before it still get their
        answers. Once we start closing, the peer has ``close_timeout`` to answer before
        reading stops.
        """
        self._nursery = nursery
        if self._backlog:
            self._start_writer()  # what was written before reading began and did not fit
        ws = self._ws
        handlers = _HANDLERS
        with self._read_scope:
            while True:
                # Events first: frames may have come in the same read as the request head.
                for event in ws.events():
                    if type(event) is TextMessage:
                        text = self._on_text(event)
                        if text is not None:
                            await deliver(text)
                    elif handlers[type(event)](self, event):
                        return
                    if self._violation is not None:
                        code, reason = self._violation
                        self._violation = None
                        await settle()
                        self.close(code, reason)
                        if self._stop_after_violation:
                            return
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                ws.receive_data(bytes(data) if data else None)

    def _on_text(self, event: TextMessage) -> str | None:
        """A whole text message, or None while it is incomplete or refused."""
        if self._ignoring or self.closing:
            self._ignoring = not event.message_finished
            return None
        chunk: str = event.data
        if event.message_finished and not self._parts and (
            len(chunk) * 4 <= self._max_message_size
        ):
            return chunk  # the common case: one frame, surely within the limit
        # Each fragment counted once, as it comes: a message sent in many tiny fragments costs
        # time in proportion to its size.
        self._size += len(chunk) if chunk.isascii() else len(chunk.encode())
        self._parts.append(chunk)
        if self._size > self._max_message_size:
            self._parts.clear()
            self._size = 0
            self._ignoring = not event.message_finished
            self._violation = (CloseCode.MESSAGE_TOO_BIG, "message too big")
            return None
        if not event.message_finished:
            return None
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        return text

    def _on_bytes(self, event: BytesMessage) -> bool:
        if not (self._ignoring or self.closing):
            self._violation = (CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
        self._ignoring = not event.message_finished
        return False

    def _on_ping(self, event: Ping) -> bool:
        if not self.closing:
            self._write(self._ws.send(event.response()))
        return False

    def _on_pong(self, event: Pong) -> bool:
        self.pinged_at = None
        return False

    def _on_close(self, event: CloseConnection) -> bool:
        state = self._ws.state
        if event.code == _ABNORMAL and state is ConnectionState.CLOSED:
            # The stream ended without a closing handshake.
            if self.closed is None:
                self.closed = (_ABNORMAL, "")
            return True
        if state is ConnectionState.REMOTE_CLOSING:
            # The client closes: answer with the same code, then we are done.
            self.closed = (event.code, event.reason or "")
            self._write(self._ws.send(event.response()), force=True)
            self._close_by(trio.current_time() + self._close_timeout)
            return True
        if state is ConnectionState.CLOSED:
            return True  # the client answered our close
        # wsproto could not parse a frame (state still OPEN): close with its code, without
        # waiting for an answer. While already closing, just stop.
        if state is ConnectionState.OPEN:
            self._violation = (event.code, event.reason or "")
            self._stop_after_violation = True
            return False
        return True

    # --- writing ----------------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> bool:
        """Write a data frame framed by the relay (`trio_relay._wire.framing`); False when it does
        not fit in the backlog (a slow client). Ignored once closing."""
        if self._ws.state is not ConnectionState.OPEN:
            return True
        return self._write(frame)

    def ping(self, now: float) -> None:
        """Send a keepalive ping; `pinged_at` holds the oldest one still unanswered."""
        if self._ws.state is ConnectionState.OPEN:
            if self.pinged_at is None:
                self.pinged_at = now
            self._write(self._ws.send(Ping(b"")), force=True)

    def close(self, code: int, reason: str = "", *, drop_backlog: bool = False) -> None:
        """Start the closing handshake with ``code``: after what is queued, or with the
        backlog dropped (a slow client resumes by seq). The peer has ``close_timeout`` to
        answer."""
        if self._ws.state is not ConnectionState.OPEN:
            return
        self.closed = (code, reason)
        backlog = self._backlog
        if drop_backlog and backlog:
            # Only a frame partly written may stay (the writer's, or the rest of one written
            # at once in part, held as a memoryview): cutting it short would tear the stream.
            first = backlog[0] if self._writing or isinstance(backlog[0], memoryview) else None
            backlog.clear()
            if first is not None:
                backlog.append(first)
        self._write(self._ws.send(CloseConnection(code=code, reason=reason)), force=True)
        self._close_by(trio.current_time() + self._close_timeout)

    def _close_by(self, deadline: float) -> None:
        """The closing handshake has begun: reading, and writing what is left, stop by
        ``deadline`` at the latest."""
        self._read_scope.deadline = min(self._read_scope.deadline, deadline)

    def _write(self, data: bytes, *, force: bool = False) -> bool:
        if self._broken:
            return True
        backlog = self._backlog
        if backlog:
            if len(backlog) >= self._max_backlog and not force:
                return False
            backlog.append(data)
            return True
        write_now = self._write_now
        sent = 0
        if write_now is not None:
            try:
                sent = write_now(data)  # the bytes as they are: no view made per push
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._gone()
                return True
            if sent == len(data):
                return True
        if backlog is None:
            backlog = self._backlog = deque()
        # A frame partly written stays a memoryview of its rest; one not begun, bytes.
        backlog.append(memoryview(data)[sent:] if sent else data)
        self._start_writer()
        return True

    def _start_writer(self) -> None:
        nursery = self._nursery
        if self._writing or nursery is None:
            return
        try:
            nursery.start_soon(self._writer)
        except RuntimeError:  # its tasks are all done: the connection is ending anyway
            return
        self._writing = True

    async def _writer(self) -> None:
        """Drain the backlog, then end; the next frame that does not fit starts another."""
        backlog = self._backlog
        assert backlog is not None
        write_now = self._write_now
        try:
            while backlog:
                data = backlog[0]
                if write_now is None:
                    try:
                        await self.stream.send_all(data)
                    except trio.Cancelled:
                        self._broken = True  # how much went out is unknown
                        raise
                    backlog.popleft()
                    continue
                # Write what the kernel takes, wait for room, repeat: cancelled while waiting,
                # exactly the unwritten rest stays queued.
                view = memoryview(data)
                sent = write_now(view)
                if sent == len(view):
                    backlog.popleft()
                else:
                    backlog[0] = view[sent:]
                    await self.stream.wait_send_all_might_not_block()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._gone()
        finally:
            self._writing = False
            if self._drained is not None and not backlog:
                self._drained.set()

    def _gone(self) -> None:
        """A write failed: the peer is gone; stop reading too."""
        self._broken = True
        if self._backlog:
            self._backlog.clear()
        if self.closed is None:
            self.closed = (_ABNORMAL, "")
        self._read_scope.cancel()

    async def flush(self) -> None:
        """Wait (at most ``close_timeout``) until everything queued is written: the close
        frame must reach the peer before the stream is closed. Call it from the task that
        read, before the writer's nursery is cancelled."""
        if not self._backlog or self._broken:
            return
        self._drained = trio.Event()
        self._start_writer()
        deadline = self._read_scope.deadline
        if deadline == math.inf:  # the peer left without a close: one grace period
            deadline = trio.current_time() + self._close_timeout
        with trio.move_on_at(deadline):
            await self._drained.wait()


# One reader, one dispatch table: what each wsproto event does (True: reading is over).
_HANDLERS: Final[dict[type[Event], Callable[[ServerWebSocket, Any], bool]]] = {
    BytesMessage: ServerWebSocket._on_bytes,
    Ping: ServerWebSocket._on_ping,
    Pong: ServerWebSocket._on_pong,
    CloseConnection: ServerWebSocket._on_close,
}
