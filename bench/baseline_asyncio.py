"""Baseline for bench/fanout.py: the same minimal broadcaster on asyncio and ``websockets``.

    python bench/baseline_asyncio.py [--host 127.0.0.1] [--port 0] [--pin PIN]

Speaks the protocol subset of ``baseline_core.py`` and prints ``serving ws://HOST:PORT/ws``
once it listens; stops on SIGINT or SIGTERM. Same design as ``baseline_trio.py``: per
connection, one reader (the handler) and one writer task draining a bounded
``asyncio.Queue``; a push is encoded once and put on every subscriber's queue with
``put_nowait``; every frame goes out through ``websockets``' ``send``. Like the relay it
offers no compression and sends no keepalive pings.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from baseline_core import MAX_MESSAGE_SIZE, OUTBOUND_QUEUE_SIZE, Core, raise_fd_limit
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class AsyncioPeer:
    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.authenticated = False
        self.queue: asyncio.Queue[str] = asyncio.Queue(OUTBOUND_QUEUE_SIZE)
        self.slow = False

    def enqueue(self, text: str) -> bool:
        if self.slow:
            return False
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            return False
        return True

    def close_slow(self) -> None:
        self.slow = True
        asyncio.get_running_loop().create_task(
            self.ws.close(1013, "slow consumer: outbound queue overflowed")
        )

    async def writer(self) -> None:
        try:
            while True:
                await self.ws.send(await self.queue.get())
        except ConnectionClosed:
            pass


async def main(host: str, port: int, pin: str) -> None:
    core = Core(pin)

    async def handler(ws: ServerConnection) -> None:
        peer = AsyncioPeer(ws)
        peer.enqueue(core.hello())
        writer = asyncio.create_task(peer.writer())
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    await ws.close(1003, "binary frames are not supported")
                    break
                core.receive(peer, message)
        except ConnectionClosed:
            pass
        finally:
            core.forget(peer)
            writer.cancel()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(
        handler, host, port, compression=None, ping_interval=None, max_size=MAX_MESSAGE_SIZE,
        backlog=4096,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"serving ws://{host}:{bound}/ws", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pin", default="bench-pin")
    args = parser.parse_args()
    raise_fd_limit()
    asyncio.run(main(args.host, args.port, args.pin))
