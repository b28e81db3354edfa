"""Direct writes: a push framed once for everyone and written straight into each socket.

The only module that reaches below trio-websocket's public API. Server frames are unmasked
and the relay negotiates no extension, so a text frame's bytes are the same for every client:
the broadcaster frames each push once (`frame_text`), and a connection whose writer has
nothing queued hands those bytes to the kernel without blocking, as asyncio's transports do.
Only what the kernel does not take at once goes into the connection's bounded queue, drained
by its writer task as before; a full queue still closes that client alone (1013).

What it relies on, checked by `check_internals` when a relay starts (any surprise turns the
direct path off for good, with one log line, and every frame goes through trio-websocket):

- trio-websocket's `WebSocketConnection` keeps its wsproto connection in ``_wsproto`` and its
  close state in ``_close_reason``, and writes each frame with one ``send_all`` call on the
  stream it was given (the relay's `OwnedStream`, which serialises all writes);
- wsproto frames a server text message exactly as `frame_text` does, and records an
  unfinished (fragmented) outgoing message in ``FrameProtocol._outbound_opcode``;
- a `trio.SocketStream`'s trio socket keeps the non-blocking stdlib socket in ``_sock``;
- wsproto keeps the opening handshake's h11 connection in ``H11Handshake._h11_connection``
  and never uses it once the connection is open (`drop_handshake_state` frees it).

Per connection, `DirectPath.open` says no (the plain path) for TLS, for any stream that is
not a socket or the relay's in-memory socket (`trio_relay._memory`), and when extensions were
negotiated. Per write, it says no while another write is under way or part of a frame is
still owed, once the connection is closing, and mid fragmented message.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

import trio
import trio_websocket
import wsproto
from loguru import logger
from trio_websocket import WebSocketConnection
from wsproto.frame_protocol import FrameProtocol

from ._transport import OwnedStream

__all__ = [
    "DirectPath", "Written", "check_internals", "drop_handshake_state", "frame_text",
    "nonblocking_sender",
]

#: The trio-websocket and wsproto releases whose internals were checked (pyproject pins them).
SUPPORTED: Final = {"trio_websocket": ("0.12",), "wsproto": ("1.2", "1.3")}

_TEXT_FIN: Final = 0x81


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final text frame (RFC 6455 section 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT_FIN, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _TEXT_FIN, 126, size) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, size) + payload


class Written(enum.Enum):
    ALL = "all"  # the kernel took the whole frame
    PART = "part"  # it took some: the rest is owed first, before anything else is written
    NONE = "none"  # nothing was written: queue the frame


#: None: the internals are as expected; else why the direct path is off. Set once per process.
_off_because: str | None = None
_checked = False


def check_internals() -> str | None:
    """Check, once per process, that what the direct path relies on is there; returns None if
    so, else the reason it is off (logged once)."""
    global _checked, _off_because
    if not _checked:
        _checked = True
        _off_because = _find_problem()
        if _off_because is not None:
            logger.warning("direct writes off, every frame goes through trio-websocket: {}",
                           _off_because)
    return _off_because


def _find_problem() -> str | None:
    versions = {"trio_websocket": trio_websocket.__version__, "wsproto": wsproto.__version__}
    for name, version in versions.items():
        if not version.startswith(tuple(prefix + "." for prefix in SUPPORTED[name])):
            return f"{name} {version} is not a checked release ({', '.join(SUPPORTED[name])})"
    proto = FrameProtocol(client=False, extensions=[])
    if getattr(proto, "_outbound_opcode", "missing") is not None:
        return "wsproto's FrameProtocol has no _outbound_opcode"
    for size in (0, 125, 126, 65535, 65536):
        payload = "é" * (size // 2) + "x" * (size % 2)
        if bytes(proto.send_data(payload, fin=True)) != frame_text(payload.encode()):
            return f"wsproto frames a {size}-byte text message differently"
    init = WebSocketConnection.__init__.__code__.co_names
    if not {"_wsproto", "_close_reason", "_stream"} <= set(init):
        return "trio-websocket's WebSocketConnection lacks _wsproto, _close_reason or _stream"
    with trio.socket.from_stdlib_socket(socket.socket()) as probe:
        if not isinstance(getattr(probe, "_sock", None), socket.socket):
            return "a trio socket has no _sock"
    return None


def nonblocking_sender(stream: trio.abc.Stream) -> Callable[[memoryview], int] | None:
    """A function writing what the kernel takes at once (a count), or None (TLS, any other
    kind of stream, or unexpected internals). It raises `trio.BrokenResourceError` when the
    peer is gone. `OwnedStream` writes with it too, so that a cancelled write knows exactly
    what went out."""
    if check_internals() is not None:
        return None
    if type(stream) is trio.SocketStream:
        sock: socket.socket = stream.socket._sock  # type: ignore[attr-defined]

        def send(data: memoryview) -> int:
            try:
                return sock.send(data)
            except BlockingIOError:
                return 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc

        return send
    # The relay's in-memory socket (tests), which offers the same non-blocking write.
    send_nowait: Callable[[memoryview], int] | None = getattr(stream, "send_nowait", None)
    return send_nowait


def drop_handshake_state(ws: WebSocketConnection) -> None:
    """Free what wsproto keeps of the opening handshake (its h11 connection, about 1.5 KB),
    which it never uses once the connection is open; a no-op if the internals are not the
    expected ones."""
    if check_internals() is not None:
        return
    wsproto_connection = getattr(ws, "_wsproto", None)
    handshake = getattr(wsproto_connection, "handshake", None)
    if getattr(wsproto_connection, "connection", None) is not None and hasattr(
        handshake, "_h11_connection"
    ):
        handshake._h11_connection = None  # type: ignore[union-attr]


class DirectPath:
    """The direct path of one connection; `open` returns None where it cannot be used."""

    def __init__(self, ws: WebSocketConnection, stream: OwnedStream,
                 send: Callable[[memoryview], int], proto: Any) -> None:
        self._ws = ws
        self._stream = stream
        self._send = send
        self._proto = proto

    @classmethod
    def open(cls, ws: WebSocketConnection, stream: OwnedStream) -> DirectPath | None:
        send = stream.send_nowait
        connection = getattr(getattr(ws, "_wsproto", None), "connection", None)
        proto = getattr(connection, "_proto", None)
        if send is None or proto is None or getattr(proto, "extensions", None):
            return None  # TLS, another kind of stream, or compression
        return cls(ws, stream, send, proto)

    def write(self, frame: bytes) -> Written:
        """Write ``frame`` now if nothing else is being written; never blocks.

        After `Written.PART` the rest of the frame is owed by the stream: the caller must have
        its writer call ``stream.send_all`` (which writes what is owed first)."""
        stream = self._stream
        if (stream.busy or self._ws._close_reason is not None
                or self._proto._outbound_opcode is not None):
            return Written.NONE
        try:
            sent = self._send(memoryview(frame))
        except trio.BrokenResourceError:
            return Written.NONE  # the writer meets the same error and ends the connection
        if sent == len(frame):
            return Written.ALL
        if sent == 0:
            return Written.NONE
        stream.owe(memoryview(frame)[sent:])
        return Written.PART
