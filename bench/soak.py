"""Soak: many connect, subscribe and abort cycles against a running relay; nothing may stay.

    python bench/soak.py --cycles 10000

Starts a relay in this process on loopback (with a MemoryBackend holding a few chats and an
event stream flowing), then runs the cycles with bounded concurrency, each ending at a
different point: right after the TCP connect, after the WebSocket handshake, after auth,
after subscribing, and in the middle of a stream of pushes. Every client leaves without a
closing handshake (the socket is closed under it, as a vanished client would). Before and
after, it prints the relay's statistics, the process's resident memory, traced Python memory
and open file descriptors, and exits non-zero if connections, subscriptions, broadcasters or
tasks did not return to where they started, or file descriptors grew.

This is a script, not a unit test: the numbers go into docs/security.md.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
import tracemalloc
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from trio_relay import RelayConfig, RelayStatistics, open_relay
from trio_relay.testing import MemoryBackend

PIN = "soak-pin"
CHATS = [f"c{i}" for i in range(4)]
ENDINGS = ("connect", "handshake", "auth", "subscribe", "mid-stream")


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@attrs.frozen
class Sample:
    stats: RelayStatistics
    rss_kib: int
    traced_kib: int
    fds: int

    def show(self, label: str) -> str:
        s = self.stats
        return (f"{label:>6}: connections={s.connections} subscriptions={s.subscriptions}"
                f" broadcasters={s.broadcasters} kept_histories={s.kept_histories}"
                f" tasks={s.tasks} rss={self.rss_kib} KiB traced={self.traced_kib} KiB"
                f" fds={self.fds}")


async def sample(relay: Any) -> Sample:
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    return Sample(relay.statistics(), rss_kib(), current // 1024, open_fds())


async def cycle(port: int, ending: str, counts: dict[str, int]) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        if ending == "connect":
            return
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/ws")
            if ending != "handshake":
                await ws.get_message()  # auth_required
                await ws.send_message(json.dumps({"id": 1, "type": "auth", "pin": PIN}))
                reply = json.loads(await ws.get_message())
                assert reply["type"] == "auth_success", reply
                if ending != "auth":
                    chat = CHATS[counts[ending] % len(CHATS)]
                    await ws.send_message(json.dumps(
                        {"id": 2, "type": "subscribe", "resource": "chat", "resourceId": chat}))
                    while json.loads(await ws.get_message()).get("id") != 2:
                        pass
                    if ending == "mid-stream":
                        await ws.get_message()  # at least one push under way
            nursery.cancel_scope.cancel()
    except ConnectionClosed:
        counts["closed early"] += 1
    finally:
        counts[ending] += 1
        await trio.aclose_forcefully(stream)  # no closing handshake: the client vanishes


async def pump_events(backend: MemoryBackend, stop: trio.Event) -> None:
    for n in itertools.count():
        if stop.is_set():
            return
        for chat in CHATS:
            backend.emit("chat", chat, {"type": "chunk", "text": f"tick {n}"})
        await trio.sleep(0.001)


async def soak(cycles: int, concurrency: int) -> int:
    backend = MemoryBackend()
    for chat in CHATS:
        backend.add_chat("p1", chat)
    # Loopback clients all share one address: lift the per-address cap above the concurrency.
    config = RelayConfig(max_connections_per_address=concurrency * 2, request_rate=1000,
                         request_burst=1000, resume_grace=1.0)
    tracemalloc.start()
    async with open_relay(backend, pin=PIN, config=config) as relay:
        port = await relay.start_serving("127.0.0.1", 0)
        await trio.testing.wait_all_tasks_blocked()
        before = await sample(relay)
        print(before.show("before"), flush=True)
        counts: dict[str, int] = dict.fromkeys((*ENDINGS, "closed early"), 0)
        limiter = trio.CapacityLimiter(concurrency)
        stop = trio.Event()
        started = time.perf_counter()

        async def one(i: int) -> None:
            async with limiter:
                await cycle(port, ENDINGS[i % len(ENDINGS)], counts)

        async with trio.open_nursery() as events:
            events.start_soon(pump_events, backend, stop)
            async with trio.open_nursery() as nursery:
                for i in range(cycles):
                    await limiter.acquire_on_behalf_of(i)  # bounded: start no faster than done
                    limiter.release_on_behalf_of(i)
                    nursery.start_soon(one, i)
            stop.set()
        elapsed = time.perf_counter() - started
        # Let the relay notice the last resets, then wait out the resume grace period.
        with trio.fail_after(30):
            while relay.statistics().connections:  # noqa: ASYNC110 - polls the relay
                await trio.sleep(0.05)
        await trio.sleep(config.resume_grace + 0.5)
        after = await sample(relay)
        print(after.show("after"), flush=True)
        print(f"cycles={cycles} in {elapsed:.1f} s ({cycles / elapsed:.0f}/s), concurrency"
              f" {concurrency}, endings: {counts}", flush=True)
        leaked = (
            attrs.evolve(after.stats, authenticated_connections=0)
            != attrs.evolve(before.stats, authenticated_connections=0)
            or after.fds > before.fds
            or dict(backend.open_feeds)
        )
        if leaked:
            print("LEAK: the relay did not return to where it started", file=sys.stderr)
            return 1
        print("ok: back to where it started", flush=True)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    return trio.run(soak, args.cycles, args.concurrency)


if __name__ == "__main__":
    sys.exit(main())
