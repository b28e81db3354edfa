"""The cost of publishing through the Redis bus: `RedisBus.forward` of N events (published in
batches, one script call each) against `RedisBus.publish` one at a time, and forward-to-follower
delivery on one node.

    python bench/redis_publish.py [--url redis://127.0.0.1:6379/0] [--events 10000]

Without ``--url`` it starts its own `redis-server` (no persistence) on a free port in a temp
dir, and stops it at the end. It FLUSHALLs the Redis it uses: never point it at one that
holds anything.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import coredis
import trio
from coredis.retry import NoRetryPolicy

from trio_relay._stream.redis_bus import open_redis_bus
from trio_relay._wire.protocol import ResourceKey

PAYLOAD = {"type": "message", "chatId": "c", "message": {"id": "m", "text": "hello world " * 4}}


@contextmanager
def own_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:  # another process: poll until it answers, bounded
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.kill()
            process.wait()


async def script_stats(client: coredis.Redis[bytes]) -> tuple[int, int]:
    stats = await client.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    if not isinstance(entry, dict):
        return 0, 0
    return int(entry.get("calls", 0)), int(entry.get("usec", 0))


async def forwarded(url: str, events: int, keys: int, batch_size: int) -> None:
    client = coredis.Redis.from_url(url, retry_policy=NoRetryPolicy())
    async with client, open_redis_bus(url, batch_size=batch_size) as bus:
        await client.flushall()
        resources = [ResourceKey("chat", f"c{i}") for i in range(keys)]
        for key in resources:
            await bus.head(key)  # also loads the script
        calls, usec = await script_stats(client)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(events):
            bus.forward(resources[i % keys], PAYLOAD)
        await bus.flush()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after_calls, after_usec = await script_stats(client)
        trips = after_calls - calls
        print(f"forward() x{events}, {keys} resource(s), batches of {batch_size}: "
              f"{events / wall:,.0f} events/s; relay CPU {cpu / events * 1e6:.1f} us/event; "
              f"{trips} script calls = round trips ({events / trips:.0f} events each); "
              f"Redis {(after_usec - usec) / events:.2f} us/event in the script")


async def one_by_one(url: str, events: int) -> None:
    async with open_redis_bus(url) as bus:
        key = ResourceKey("chat", "one")
        await bus.publish(key, PAYLOAD)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(events):
            await bus.publish(key, PAYLOAD)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"publish() x{events}, one at a time: {events / wall:,.0f} events/s; "
              f"{wall / events * 1e6:.0f} us each; relay CPU {cpu / events * 1e6:.0f} us each")


async def delivered(url: str, events: int) -> None:
    async with open_redis_bus(url) as bus:
        key = ResourceKey("chat", "followed")
        start = await bus.head(key)
        async with bus.follow(key, start) as followed:
            wall = time.perf_counter()
            for _ in range(events):
                bus.forward(key, PAYLOAD)
            seen = 0
            async for _ in followed:
                seen += 1
                if seen == events:
                    break
            wall = time.perf_counter() - wall
        print(f"forward() -> follow() on one node, x{events}: {events / wall:,.0f} events/s")


async def main(url: str, events: int) -> None:
    await forwarded(url, events, keys=1, batch_size=256)
    await forwarded(url, events, keys=10, batch_size=256)
    await forwarded(url, events, keys=100, batch_size=256)
    await one_by_one(url, min(events, 3000))
    await delivered(url, events)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", help="a Redis to use (FLUSHALLed!); default: start one")
    parser.add_argument("--events", type=int, default=10_000)
    arguments = parser.parse_args()
    if arguments.url:
        trio.run(main, arguments.url, arguments.events)
    else:
        with own_redis() as started:
            trio.run(main, started, arguments.events)
