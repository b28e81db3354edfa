"""In-memory transport: a trio Listener whose connections are `trio.testing` stream pairs.

The relay serves it like a TCP listener, so a client connected through it goes through the
real WebSocket handshake, framing and connection code, with no socket and no real time.
"""

from __future__ import annotations

import math

import trio
import trio.testing

__all__ = ["MemoryListener"]


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

    async def connect(self, *, lockstep: bool = False, peer: str | None = None) -> trio.abc.Stream:
        """Open a connection; returns the client's end of the stream.

        ``peer`` is the ``host:port`` the relay sees for it (default ``"memory"``), so tests
        can tell client addresses apart.
        """
        client: trio.abc.Stream
        server: trio.abc.Stream
        if lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = trio.testing.memory_stream_pair()
        if peer is not None:
            # An attribute the relay looks for (_peer_of); the stream type does not declare it.
            setattr(server, "peer", peer)  # noqa: B010
        try:
            self._send.send_nowait(server)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise trio.ClosedResourceError("listener is closed") from None
        await trio.lowlevel.checkpoint()
        return client
