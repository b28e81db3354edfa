"""Send-to-push latency through a relay cluster on PostgreSQL + Redis, against one relay on
SQLite without a broker (the baseline).

    python bench/cluster_latency.py [--sends 200] [--warmup 20] [--json FILE]

It starts everything itself and stops it at the end: a PostgreSQL server (the test suite's
harness, tests/_postgres.py: the system's ``initdb``/``postgres`` in a temp dir on a free
port, fsync off), a ``redis-server`` (tests/_redis.py), three ``trio-relay serve`` processes
(``--database postgresql://... --broker redis://...``, each with a data dir of its own, as on
three machines), then one ``trio-relay serve`` on SQLite alone (the baseline), and one on the
PostgreSQL database without a broker (to tell the database's share from the broker's).
Needs the test and postgres extras (``pip install -e '.[test,postgres]'``).

Each measurement creates a chat with a silent profile (no agent reply, so every send is
exactly one push), signs in a sender on node a and subscribers on nodes a and c, and sends
``--sends`` messages one after another (each with a ``clientNonce``, as the client library
sends them): the latency of one is from just before its ``send`` frame is written on a to the
arrival of its ``message`` push at a subscriber. The next send waits for the push and the
reply. Loopback only: this is the cost of the relay, the database and the broker, not of a
network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _postgres import PostgresServer, find_binary  # noqa: E402 - the tests' harness
from _redis import RedisServer, find_redis_server  # noqa: E402

from trio_relay.testing import TestClient, open_loopback_client  # noqa: E402

PIN = "424242"
# One sender sends as fast as its pushes arrive: the request rate limit is lifted (default
# 20/s, burst 50); everything else keeps its default.
CONFIG = """
[relay]
request_rate = 1000000.0
request_burst = 1000000

[[model_profiles]]
id = "silent"
name = "Silent"
agent = "silent"
"""
START_TIMEOUT = 30.0


# --- the relays --------------------------------------------------------------------------------


@asynccontextmanager
async def relay(
    name: str, workdir: Path, database: str | None, broker: str | None
) -> AsyncIterator[str]:
    """One `trio-relay serve` process; yields its ws:// URL, stops it (SIGTERM) after."""
    data_dir, log = workdir / f"data-{name}", workdir / f"{name}.log"
    config = workdir / "relay.toml"
    config.write_text(CONFIG)
    argv = [sys.executable, "-m", "trio_relay", "serve", "--port", "0", "--pin", PIN,
            "--data-dir", str(data_dir), "--config", str(config), "--log-level", "WARNING",
            *(["--database", database] if database else []),
            *(["--broker", broker] if broker else [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_")}
    with log.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sink, env=env)
    try:
        assert process.stdout is not None
        printed = b""
        with trio.fail_after(START_TIMEOUT):
            while b"web client:" not in printed:  # its last line: it listens
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise SystemExit(f"relay {name} did not start:\n{log.read_text()}")
                printed += chunk
        first = printed.decode().splitlines()[0]
        yield first.removeprefix("trio-relay serving ")
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def signed_in(stack: AsyncExitStack, url: str) -> TestClient:
    client = await stack.enter_async_context(open_loopback_client(url))
    await client.authenticate(PIN)
    return client


# --- the measurement ---------------------------------------------------------------------------


async def measure(
    sender_url: str, subscriber_urls: dict[str, str], sends: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds from each send on ``sender_url`` to its push at each subscriber."""
    async with AsyncExitStack() as stack:
        sender = await signed_in(stack, sender_url)
        created = await sender.request(
            "create", resource="chat", resourceId="demo",
            message={"title": "latency", "modelProfileId": "silent"})
        assert created["type"] == "data", created
        chat = created["data"]["chat"]["id"]
        subscribers = {}
        for where, url in subscriber_urls.items():
            subscribers[where] = await signed_in(stack, url)
            await subscribers[where].subscribe("chat", chat)
        latencies: dict[str, list[float]] = {where: [] for where in subscribers}
        arrived: dict[str, float] = {}

        async def receive(where: str, client: TestClient, text: str) -> None:
            push = await client.next_push()
            arrived[where] = time.perf_counter()
            message = push["data"]["message"]
            assert (push["data"]["type"], message["content"]) == ("message", text), push

        for i in range(warmup + sends):
            text = f"message {i}"
            arrived.clear()
            async with trio.open_nursery() as nursery:
                for where, client in subscribers.items():
                    nursery.start_soon(receive, where, client, text)
                sent = time.perf_counter()
                request = await sender.request_nowait(
                    "send", resourceId=chat, message=text, clientNonce=f"bench-{i}")
                reply = await sender.reply_to(request)
                assert reply.get("data") == {"sent": True}, reply
            if i >= warmup:
                for where, at in arrived.items():
                    latencies[where].append(at - sent)
        return latencies


def summary(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(cuts[49] * 1000, 2), "p90_ms": round(cuts[89] * 1000, 2),
            "p99_ms": round(cuts[98] * 1000, 2), "max_ms": round(max(samples) * 1000, 2)}


async def run(
    workdir: Path, dsn: str, broker: str, sends: int, warmup: int
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    async with AsyncExitStack() as stack:
        urls = {}
        for name in "abc":
            urls[name] = await stack.enter_async_context(relay(name, workdir, dsn, broker))
        cluster = await measure(urls["a"], {"a": urls["a"], "c": urls["c"]}, sends, warmup)
    results["cluster: send on a, push on c"] = summary(cluster["c"])
    results["cluster: send on a, push on a"] = summary(cluster["a"])
    async with relay("single", workdir, None, None) as url:
        single = await measure(url, {"a": url}, sends, warmup)
    results["one relay, SQLite, no broker"] = summary(single["a"])
    # Where the cluster's time goes: the database alone, without the broker's hop.
    async with relay("postgres-only", workdir, dsn, None) as url:
        alone = await measure(url, {"a": url}, sends, warmup)
    results["one relay, PostgreSQL, no broker"] = summary(alone["a"])
    return results


def measure_all(sends: int, warmup: int) -> dict[str, dict[str, float]]:
    """Start PostgreSQL and Redis, measure, and stop them, whatever happened."""
    postgres = find_binary("postgres")
    if postgres is None:
        raise SystemExit("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    with tempfile.TemporaryDirectory(prefix="cluster-latency-") as tmp:
        workdir = Path(tmp)
        database = PostgresServer(Path(postgres).resolve().parent)
        broker = RedisServer(find_redis_server(), workdir)
        try:
            database.start()
            broker.start()
            dsn = database.dsn(database.create_database())
            return trio.run(run, workdir, dsn, broker.url, sends, warmup)
        finally:
            broker.kill()
            database.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=200, help="measured sends (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="sends not counted (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.sends < 2 or args.warmup < 0:
        parser.error("--sends must be at least 2 and --warmup at least 0")
    results = measure_all(args.sends, args.warmup)
    width = max(map(len, results))
    print(f"{'send-to-push latency, ' + str(args.sends) + ' sequential sends':<{width}}"
          "     p50     p90     p99     max (ms)")
    for label, figures in results.items():
        print(f"{label:<{width}}" + "".join(f"{value:8.2f}" for value in figures.values()))
    if args.json is not None:
        args.json.write_text(json.dumps({"sends": args.sends, "results": results}, indent=2))


if __name__ == "__main__":
    main()
