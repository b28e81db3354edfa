"""Baseline for bench/fanout.py: a minimal relay on asyncio and ``websockets``.

    python bench/baseline_asyncio.py --data-dir DIR [--host 127.0.0.1] [--port 0] [--pin PIN]

Speaks the protocol of ``baseline_core.py`` (PIN auth, create, subscribe with the snapshot,
send stored in SQLite and acknowledged) and prints ``serving ws://HOST:PORT/ws`` once it
listens; stops on SIGINT or SIGTERM. It is written the way the websockets documentation
suggests: one handler per connection reads the client's frames and ``await``\\ s each reply;
a push is encoded once and written to every subscriber with ``websockets.broadcast``, which
puts it in each connection's write buffer without waiting. A subscriber whose buffer holds
more than the relay's ``outbound_queue_size`` (1,024) of those frames is closed with 1013, as
the relay closes a slow consumer. Like the relay it offers no compression and, within a run,
sends no keepalive pings.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Collection
from pathlib import Path

from baseline_core import MAX_MESSAGE_SIZE, OUTBOUND_QUEUE_SIZE, Core, raise_fd_limit
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed


class AsyncioPeer:
    __slots__ = ("authenticated", "chats", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.authenticated = False
        self.chats: set[str] = set()


def push(peers: Collection[AsyncioPeer], text: str) -> None:
    """Write one push to every peer without waiting; close those that fell too far behind."""
    connections = [peer.ws for peer in peers]
    broadcast(connections, text)
    limit = OUTBOUND_QUEUE_SIZE * (len(text.encode()) + 4)
    for ws in connections:
        if ws.transport.get_write_buffer_size() > limit:
            asyncio.get_running_loop().create_task(
                ws.close(1013, "slow consumer: outbound queue overflowed")
            )


async def main(host: str, port: int, pin: str, data_dir: Path) -> None:
    core = Core(pin, data_dir / "baseline.sqlite3", push)

    async def handler(ws: ServerConnection) -> None:
        peer = AsyncioPeer(ws)
        try:
            await ws.send(core.hello())
            async for message in ws:
                if isinstance(message, bytes):
                    await ws.close(1003, "binary frames are not supported")
                    break
                await ws.send(core.receive(peer, message))
        except ConnectionClosed:
            pass
        finally:
            core.forget(peer)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve(
            handler, host, port, compression=None, ping_interval=None,
            max_size=MAX_MESSAGE_SIZE, backlog=4096,
        ) as server:
            bound = next(iter(server.sockets)).getsockname()[1]
            print(f"serving ws://{host}:{bound}/ws", flush=True)
            await stop.wait()
    finally:
        core.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pin", default="bench-pin")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="where the SQLite database goes (created if missing)")
    args = parser.parse_args()
    raise_fd_limit()
    asyncio.run(main(args.host, args.port, args.pin, args.data_dir))
