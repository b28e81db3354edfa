"""WebSocket frames the relay writes itself, the same bytes for every client (RFC 6455 5.2).

Server frames are unmasked and the relay negotiates no extension, so a text frame depends only
on its payload: the broadcaster frames each push once (`frame_text`) and the server edge
(`trio_relay._server.edge`) writes those bytes into every subscriber's stream. Everything else a
connection writes (pongs, close frames, handshake answers) goes through wsproto and h11.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["frame_text"]

_TEXT_FIN: Final = 0x81


def frame_text(payload: bytes) -> bytes:
    """One unmasked, final text frame, as a server sends it."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT_FIN, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _TEXT_FIN, 126, size) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, size) + payload
