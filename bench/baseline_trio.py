"""Baseline for bench/fanout.py: a minimal broadcaster on trio-websocket.

    python bench/baseline_trio.py [--host 127.0.0.1] [--port 0] [--pin PIN]

Speaks the protocol subset of ``baseline_core.py`` and prints ``serving ws://HOST:PORT/ws``
once it listens; stops on SIGINT or SIGTERM. The obvious design: per connection, one reader
(the handler) and one writer task draining a bounded memory channel; a push is encoded once
and put on every subscriber's channel with ``send_nowait``; every frame goes out through
trio-websocket's ``send_message``.
"""

from __future__ import annotations

import argparse
import signal

import trio
from baseline_core import MAX_MESSAGE_SIZE, OUTBOUND_QUEUE_SIZE, Core, raise_fd_limit
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket


class TrioPeer:
    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.nursery = nursery
        self.authenticated = False
        self.send, self.receive = trio.open_memory_channel[str](OUTBOUND_QUEUE_SIZE)

    def enqueue(self, text: str) -> bool:
        try:
            self.send.send_nowait(text)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def close_slow(self) -> None:
        self.send.close()
        self.nursery.start_soon(self.ws.aclose, 1013, "slow consumer: outbound queue overflowed")

    async def writer(self) -> None:
        try:
            async for text in self.receive:
                await self.ws.send_message(text)
        except ConnectionClosed:
            pass


async def main(host: str, port: int, pin: str) -> None:
    core = Core(pin)

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        async with trio.open_nursery() as nursery:
            peer = TrioPeer(ws, nursery)
            peer.enqueue(core.hello())
            nursery.start_soon(peer.writer)
            try:
                while True:
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        await ws.aclose(1003, "binary frames are not supported")
                        break
                    core.receive(peer, message)
            except ConnectionClosed:
                pass
            finally:
                core.forget(peer)
                nursery.cancel_scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    handler, host, port, None, max_message_size=MAX_MESSAGE_SIZE,
                    task_status=task_status,
                )
            )
            print(f"serving ws://{host}:{server.port}/ws", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pin", default="bench-pin")
    args = parser.parse_args()
    raise_fd_limit()
    trio.run(main, args.host, args.port, args.pin)
