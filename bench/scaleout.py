"""Scale-out benchmark: the same fan-out in one relay process, and through Redis with one and
two relay processes, in one run (docs/scaling.md).

    python bench/scaleout.py                # N = 10, 100, 1,000, 3 rounds (about 3 minutes)
    python bench/scaleout.py --write-docs   # the same, then rewrite docs/scaling.md's results
    python bench/scaleout.py --quick        # about 10 seconds: tiny scale, a smoke test
    python bench/scaleout.py --from-json bench/results/scaleout.json --write-docs
                                            # no run: tables and docs from earlier results

The workload is bench/fanout.py's (the same load generator, bench/loadgen): N subscribers of
one chat, one publisher that sends the next message only when the relay has acknowledged the
last, each message stored by SQLite and pushed to every subscriber, a warm-up, then sends for
``--seconds``. It runs in three setups, each started afresh for each measurement:

- ``in-process``: one ``trio-relay serve`` without a broker (the baseline);
- ``redis x1``: a ``redis-server`` of its own (loopback, a free port, a temporary directory,
  no persistence) and one ``trio-relay serve --broker redis://...``;
- ``redis x2``: that Redis and two relays sharing one data dir (SQLite in WAL mode); the
  subscribers alternate between them, the publisher is on the first.

Each figure: server-side CPU per delivered frame (the relays' CPU time and Redis's, from
``/proc/PID/stat``, over the window from the first send until every subscriber has the last
message, divided by sends x N), the same split into relays and Redis, p50 and p99 from send to
receipt, and, from Redis's ``INFO`` at the edges of the window, its commands per second and
per message, the events each ``EVALSHA`` of the publish script carried, and the script's time
per event (``cmdstat_evalsha`` usec / ``cmdstat_xadd`` calls: the script appends each event to
the Stream with one XADD). Ratios are medians over the in-process median. Then, from the
medians, each setup's cost split into a part per message and a part per delivered frame (a
line through the sizes: the smallest N sets the first, the largest the second), and the
capacity plan of docs/scaling.md computed from them.

The relays and Redis are pinned to the first CPU, the load generator to the last, as in
bench/fanout.py: the server side gets one core in every setup, so the figures compare costs,
not the throughput two cores would give two relays. Every subscriber must get every push once
and in order; a violation or a misbehaving server fails the run (exit 1) after the results are
written; 2 means it could not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import (
    RESULTS,
    ROOT,
    BenchError,
    Json,
    Server,
    ensure_loadgen,
    machine,
    machine_busy_share,
    need_tools,
    raise_fd_limit,
    relay_source,
    run_loadgen,
)

DOC = ROOT / "docs" / "scaling.md"
BEGIN_MARK = "<!-- scaleout-results:begin (written by python bench/scaleout.py --write-docs) -->"
END_MARK = "<!-- scaleout-results:end -->"
SETUPS = ("inproc", "redis1", "redis2")
LABELS = {"inproc": "in-process", "redis1": "redis x1", "redis2": "redis x2"}
RELAYS = {"inproc": 1, "redis1": 1, "redis2": 2}
#: Same marks as bench/fanout.py.
CAPPED_SHARE = 0.9
CONTENDED_SHARE = 0.15

#: What an idle subscribed connection costs a relay process (docs/performance.md, K = 5,000).
CONN_KIB = 13.7
#: What a relay process costs before any client, when a run did not measure it (MiB).
PROCESS_MIB = 55.0
#: The capacity plan's workload: each connected client watches one chat of WATCHERS clients
#: and receives PUSH_RATE pushes per second on average.
WATCHERS = 10
PUSH_RATES = (0.1, 1.0)
CLIENTS = (100_000, 1_000_000)
#: The relay's defaults: events kept per resource, and for how long (replay_buffer_size,
#: replay_max_age).
REPLAY_EVENTS = 1024
REPLAY_SECONDS = 120.0
#: Share of a core a relay process is planned to use at most (headroom for bursts, GC, TLS).
CORE_BUDGET = 0.5


@dataclass(frozen=True)
class Plan:
    rounds: int
    sizes: tuple[int, ...]
    setups: tuple[str, ...]
    send_seconds: float
    warmup_frames: int
    seed_sends: int
    max_undelivered: int

    def spec(self, n: int) -> Json:
        return {
            "scenario": "fanout", "subscribers": n, "seedSends": self.seed_sends,
            "warmupSends": max(5, min(500, self.warmup_frames // n)),
            "sendSeconds": self.send_seconds, "sendCount": 0,
            "maxUndelivered": self.max_undelivered, "connectConcurrency": 100,
            "deadlineSeconds": 90 + self.send_seconds + n / 50,
        }


FULL = Plan(rounds=3, sizes=(10, 100, 1000), setups=SETUPS, send_seconds=3.0,
            warmup_frames=20000, seed_sends=5, max_undelivered=64)
QUICK = Plan(rounds=1, sizes=(4,), setups=SETUPS, send_seconds=0.5, warmup_frames=20,
             seed_sends=2, max_undelivered=64)


# --- Redis ------------------------------------------------------------------------------------


class RedisServer:
    """A `redis-server` of this measurement: loopback, a free port, a temp dir, no persistence."""

    def __init__(self, cpus: set[int] | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (Debian: apt-get install"
                             " redis-server)")
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-redis-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.log_path = Path(self._tmp.name) / "redis.log"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._tmp.name, "--logfile", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if cpus is not None:
            os.sched_setaffinity(self.process.pid, cpus)
        deadline = time.monotonic() + 10
        while not self._answers():  # another process: poll until it answers, bounded
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"redis-server did not start: {self._log()[-1000:]}")
            time.sleep(0.01)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> list[str]:
        problems = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                problems.append("redis-server did not stop within 10 s of SIGTERM")
                self.process.kill()
                self.process.wait()
        elif self.process.returncode != 0:
            problems.append(f"redis-server exited with status {self.process.returncode}:"
                            f" {self._log()[-1000:]}")
        self._tmp.cleanup()
        return problems


# --- one measurement --------------------------------------------------------------------------


def measure(node: str, setup: str, n: int, plan: Plan, cpus: tuple[set[int] | None,
            set[int] | None], quiet: bool) -> tuple[Json, list[str]]:
    """Start the setup's servers, run the loadgen once, stop them; (result, problems)."""
    pin_server, pin_loadgen = cpus
    problems: list[str] = []
    redis: RedisServer | None = None
    relays: list[Server] = []
    shared = tempfile.TemporaryDirectory(prefix="bench-scaleout-data-")
    try:
        settings: dict[str, str] = {}
        if setup != "inproc":
            redis = RedisServer(pin_server)
            settings["broker"] = redis.url
        # All at once on a fresh data dir, as systemd starts them: the database and the PIN
        # file are made under their locks by whichever comes first.
        with ThreadPoolExecutor(RELAYS[setup]) as pool:
            starting = [pool.submit(Server, "relay", pin_server, None, settings,
                                    data_dir=Path(shared.name) / "data")
                        for _ in range(RELAYS[setup])]
            failed: BenchError | None = None
            for future in starting:
                try:
                    relays.append(future.result())
                except BenchError as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed
        idle_kib = [_rss_kib(r.process.pid) for r in relays]
        spec = plan.spec(n)
        spec["urls"] = [r.url for r in relays]
        spec["serverPids"] = [r.process.pid for r in relays] + (
            [redis.process.pid] if redis else [])
        if redis is not None:
            spec["redisPort"] = redis.port
        result = run_loadgen(node, relays[0], spec, pin_loadgen, quiet)
        result["relayPids"] = [r.process.pid for r in relays]
        result["relayIdleRssKiB"] = idle_kib
        result["redisPid"] = redis.process.pid if redis else None
    finally:
        for relay in relays:
            problems += [f"relay {relay.url}: {p}" for p in relay.stop()]
        if redis is not None:
            problems += redis.stop()
        shared.cleanup()
    if result.get("error"):
        problems.append(f"loadgen: {result['error']}")
    if result.get("violationCount"):
        problems.append(f"{result['violationCount']} violations of exactly-once, in-order"
                        f" delivery: {result['violations']}")
    return result, problems


def _rss_kib(pid: int) -> int | None:
    """VmRSS of a process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def figures(result: Json) -> Json:
    """The figures of one measurement, from the loadgen's result of its send window."""
    send = result.get("send") or {}
    frames = send.get("frames") or 0
    sends = send.get("sends") or 0
    by_pid = {int(k): v for k, v in (send.get("serverCpuByPidS") or {}).items()}
    relay_s = sum(by_pid.get(pid, 0.0) for pid in result.get("relayPids", []))
    redis_pid = result.get("redisPid")
    # Redis's own CPU from its INFO (getrusage, microseconds) rather than /proc's 10 ms ticks.
    redis_info = send.get("redis")
    redis_s = (redis_info["cpuS"] if redis_info else by_pid.get(redis_pid, 0.0)) \
        if redis_pid else 0.0
    seconds = send.get("seconds") or 0.0
    lat = send.get("latency") or {}
    out: Json = {
        "sends": sends, "frames": frames, "seconds": seconds,
        "cpu_us_per_frame": (relay_s + redis_s) / frames * 1e6 if frames else None,
        "relay_us_per_frame": relay_s / frames * 1e6 if frames else None,
        "redis_us_per_frame": redis_s / frames * 1e6 if frames and redis_pid else None,
        "cpu_us_per_send": (relay_s + redis_s) / sends * 1e6 if sends else None,
        # Each relay alone: the first takes the sends; the others only follow the chat.
        "relay_us_per_send": [by_pid.get(pid, 0.0) / sends * 1e6 if sends else None
                              for pid in result.get("relayPids", [])],
        "p50_ms": lat.get("p50Ms"), "p99_ms": lat.get("p99Ms"),
        "sends_per_s": send.get("sendsPerS"), "frames_per_s": send.get("framesPerS"),
        "server_cpu_share": send.get("serverCpuShare"),
        "loadgen_share": send.get("loadgenCpuShare"),
        "other_share": send.get("otherCpuShare"), "held_back": send.get("heldBack"),
        "idle_rss_mib": statistics.fmean(kib) / 1024
        if (kib := [k for k in result.get("relayIdleRssKiB") or [] if k]) else None,
    }
    if redis_info:
        commands = redis_info["commands"]
        evalsha = commands.get("evalsha", {"calls": 0, "usec": 0})
        xadd = commands.get("xadd", {"calls": 0, "usec": 0})
        publish = commands.get("publish", {"calls": 0, "usec": 0})
        inner = {"xadd", "hget", "hset", "publish", "pexpire", "set", "get", "del", "time",
                 "xrange"}
        calls = sum(c["calls"] for name, c in commands.items() if name not in inner)
        out.update({
            "redis_cpu_us_per_send": redis_s / sends * 1e6 if sends else None,
            "client_calls_per_s": calls / seconds if seconds else None,
            "client_calls_per_send": calls / sends if sends else None,
            "commands_per_s": redis_info["commandsProcessed"] / seconds if seconds else None,
            "commands_per_send": redis_info["commandsProcessed"] / sends if sends else None,
            "evalsha_per_send": evalsha["calls"] / sends if sends else None,
            "events_per_evalsha": xadd["calls"] / evalsha["calls"] if evalsha["calls"] else None,
            "lua_us_per_event": evalsha["usec"] / xadd["calls"] if xadd["calls"] else None,
            "lua_us_per_call": evalsha["usec"] / evalsha["calls"] if evalsha["calls"] else None,
            "publish_per_send": publish["calls"] / sends if sends else None,
            "redis_commands": commands,
            "redis_used_memory": redis_info.get("usedMemoryBytes"),
            # What the Stream grew by per event (until it reaches its cap of 1,024 entries).
            "redis_bytes_per_event": (redis_info.get("usedMemoryGrowthBytes") or 0) / sends
            if sends else None,
        })
    return out


# --- summary ----------------------------------------------------------------------------------

ROWS: list[tuple[str, str]] = [
    ("cpu_us_per_frame", "server-side CPU per delivered frame (µs)"),
    ("relay_us_per_frame", "of which relays (µs)"),
    ("redis_us_per_frame", "of which Redis (µs)"),
    ("p50_ms", "latency p50, send to receipt (ms)"),
    ("p99_ms", "latency p99, send to receipt (ms)"),
    ("sends_per_s", "acknowledged sends/s"),
    ("frames_per_s", "delivered frames/s"),
    ("server_cpu_share", "server side CPU (% of a core)"),
    ("loadgen_share", "loadgen CPU (% of a core)"),
    ("client_calls_per_send", "Redis calls from relays per message"),
    ("client_calls_per_s", "Redis calls from relays per second"),
    ("commands_per_send", "Redis commands per message (with the script's own)"),
    ("commands_per_s", "Redis commands per second (with the script's own)"),
    ("events_per_evalsha", "events per EVALSHA (batch size)"),
    ("lua_us_per_event", "publish script, Redis time per event (µs)"),
    ("redis_cpu_us_per_send", "Redis CPU per message (µs)"),
    ("redis_bytes_per_event", "Redis memory growth per message (bytes; until the Stream's cap)"),
    ("idle_rss_mib", "relay process RSS before any client (MiB)"),
]
RATIO_KEYS = {"cpu_us_per_frame", "p50_ms", "p99_ms", "sends_per_s"}
PERCENT = {"server_cpu_share", "loadgen_share"}


def summarize(runs: list[Json], plan: Plan) -> Json:
    """Medians over the rounds per size, setup and figure, the marks, the ratios."""
    summary: Json = {}
    for n in plan.sizes:
        table: Json = {}
        for key, label in ROWS:
            row: Json = {"label": label}
            for setup in plan.setups:
                mine = [r["figures"] for r in runs if r["size"] == n and r["setup"] == setup]
                values = [f[key] for f in mine if f.get(key) is not None]
                row[setup] = {
                    "median": statistics.median(values) if values else None,
                    "rounds": values,
                    "capped": any((f.get("loadgen_share") or 0) > CAPPED_SHARE
                                  or (f.get("held_back") or 0) > 0 for f in mine),
                    "contended": any((f.get("other_share") or 0) > CONTENDED_SHARE
                                     and (f.get("seconds") or 0) >= 0.5 for f in mine),
                }
            base = row.get("inproc", {}).get("median")
            row["ratios"] = {s: (row[s]["median"] / base if base and row[s]["median"] is not None
                                 else None) for s in plan.setups if s != "inproc"}
            table[key] = row
        summary[str(n)] = table
    return summary


def _median_at(runs: list[Json], n: int, setup: str, index: int) -> float | None:
    values = [r["figures"]["relay_us_per_send"][index] for r in runs
              if r["size"] == n and r["setup"] == setup
              and len(r["figures"].get("relay_us_per_send") or []) > index
              and r["figures"]["relay_us_per_send"][index] is not None]
    return statistics.median(values) if values else None


def _line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = c + d x through the points: (c, d)."""
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    d = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - d * mean_x, d


def _split(points: list[tuple[float, float]]) -> Json | None:
    """From (frames per message, CPU µs per message): fixed + per_frame x frames, fitted as
    CPU per frame = per_frame + fixed / frames, so that the smallest N, where the part per
    message shows, sets ``fixed`` and the largest sets ``per_frame``."""
    fit = _line([(1 / frames, cost / frames) for frames, cost in points if frames > 0])
    if fit is None:
        return None
    per_frame, fixed = fit
    return {"fixed_us": fixed, "per_frame_us": per_frame}


def split_costs(summary: Json, plan: Plan, runs: list[Json]) -> Json:
    """Per setup: server-side CPU per message = fixed + per_frame x N, through the medians
    at every size (µs); also for the relays and Redis alone, and for each relay of several
    alone (it delivers N / relays frames of each message)."""
    sizes = sorted(plan.sizes)
    if len(sizes) < 2:
        return {}
    out: Json = {}
    for setup in plan.setups:
        each: list[Json] = []
        count = RELAYS[setup]
        for index in range(count if count > 1 else 0):
            points = [(n / count, cost) for n in sizes
                      if (cost := _median_at(runs, n, setup, index)) is not None]
            if (fitted := _split(points)) is not None:
                each.append(fitted)
        parts: Json = {}
        for key in ("cpu_us_per_frame", "relay_us_per_frame", "redis_us_per_frame"):
            points = [(n, cpf * n) for n in sizes
                      if (cpf := summary[str(n)][key][setup]["median"]) is not None]
            if (fitted := _split(points)) is not None:
                parts[key] = fitted
        out[setup] = {"sizes": sizes, **parts, "each_relay": each,
                      "redis_fit": _redis_fit(runs, setup)}
    return out


def _redis_fit(runs: list[Json], setup: str) -> Json | None:
    """Redis's CPU does not depend on N, only on the message rate, and Redis spends some CPU
    with nothing to do (its timers, the relays' health checks): a least-squares line through
    every measurement of the setup, Redis's CPU seconds per second = idle + per message x
    messages per second."""
    points = [(f["sends_per_s"], f["redis_cpu_us_per_send"] * f["sends_per_s"] / 1e6)
              for f in (r["figures"] for r in runs if r["setup"] == setup)
              if f.get("redis_cpu_us_per_send") is not None and f.get("sends_per_s")]
    fit = _line(points)
    if fit is None:
        return None
    idle, slope = fit
    return {"us_per_msg": slope * 1e6, "idle_share": idle, "points": len(points)}


def _fmt(value: float | None, key: str = "") -> str:
    if value is None:
        return "-"
    if key in PERCENT:
        return f"{value * 100:.0f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _marks(cell: Json) -> str:
    return (" ‡" if cell["capped"] else "") + (" §" if cell["contended"] else "")


def tables(summary: Json, plan: Plan) -> str:
    redis_setups = [s for s in plan.setups if s != "inproc"]
    head = ["", *(LABELS[s] for s in plan.setups),
            *(f"{LABELS[s]} / in-process" for s in redis_setups if "inproc" in plan.setups)]
    out = [f"**Fan-out to N subscribers of one chat, acknowledged sends** (median of"
           f" {plan.rounds} round{'s' * (plan.rounds != 1)})", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size, table in summary.items():
        out.append(f"| **N = {int(size):,}** |" + " |" * (len(head) - 1))
        for key, _ in ROWS:
            row = table[key]
            cells = [row["label"]]
            for setup in plan.setups:
                cell = row[setup]
                cells.append(_fmt(cell["median"], key) + (_marks(cell) if cell["median"]
                                                           is not None else ""))
            if "inproc" in plan.setups:
                for setup in redis_setups:
                    r = row["ratios"].get(setup)
                    cells.append(f"{r:.2f}" if r is not None and key in RATIO_KEYS else "")
            out.append("| " + " | ".join(cells) + " |")
    out += ["", f"‡ capped: the load generator used more than {CAPPED_SHARE:.0%} of a core, or"
            " the publisher had to wait for it, in at least one round. § contended: other"
            f" processes used more than {CONTENDED_SHARE:.0%} of a core during the measurement"
            " in at least one round."]
    return "\n".join(out)


def split_table(split: Json) -> str:
    if not split:
        return ""
    sizes = next(iter(split.values()))["sizes"]
    out = [f"**Server-side CPU per message = fixed + per frame x N** (µs; a least-squares fit"
           f" of CPU per frame = per frame + fixed / N through the medians at N ="
           f" {', '.join(f'{n:,}' for n in sizes)})", "",
           "| setup | fixed per message | per delivered frame | relays: fixed, per frame |"
           " Redis: fixed, per frame | each relay alone: fixed, per frame of its own |",
           "|---|---|---|---|---|---|"]

    def pair(p: Json | None) -> str:
        return "-" if p is None else f"{p['fixed_us']:.0f}, {p['per_frame_us']:.2f}"

    for setup, parts in split.items():
        total = parts.get("cpu_us_per_frame")
        each = "; ".join(f"{'first (takes the sends)' if i == 0 else 'second (follows)'}:"
                         f" {pair(p)}" for i, p in enumerate(parts.get("each_relay") or []))
        out.append(f"| {LABELS[setup]} | {_fmt(total['fixed_us']) if total else '-'} |"
                   f" {_fmt(total['per_frame_us']) if total else '-'} |"
                   f" {pair(parts.get('relay_us_per_frame'))} |"
                   f" {pair(parts.get('redis_us_per_frame'))} | {each or '-'} |")
    fits = [(setup, parts["redis_fit"]) for setup, parts in split.items()
            if parts.get("redis_fit")]
    if fits:
        out += ["", "Redis's CPU against the message rate (a line through every measurement):"
                + ";".join(f" {LABELS[setup]}: {fit['idle_share']:.1%} of a core idle +"
                           f" {fit['us_per_msg']:.0f} µs per message" for setup, fit in fits)
                + "."]
    return "\n".join(out)


# --- the capacity plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """CPU (µs) a message costs, from the measured splits."""

    publisher_us: float  # the relay that takes a send: store, script call, its own follow
    follower_us: float  # each further relay with watchers of the chat: receive, decode, frame
    frame_us: float  # each delivered frame
    redis_us: float  # Redis, per message, with one subscribed relay
    redis_follower_us: float  # Redis, per further subscribed relay
    calls_per_msg: float  # calls the relays make, per message
    commands_per_msg: float  # commands Redis runs, per message (the script's own included)
    bytes_per_event: float  # Redis memory per event kept in a Stream
    process_mib: float  # a relay process before any client


def cost_model(summary: Json, split: Json, plan: Plan) -> CostModel | None:
    if not all(s in split for s in ("redis1", "redis2")):
        return None
    big = str(max(plan.sizes))
    relays = split["redis2"].get("relay_us_per_frame")
    each = split["redis2"].get("each_relay") or []
    if relays is None or len(each) < 2:
        return None
    fit1, fit2 = split["redis1"].get("redis_fit"), split["redis2"].get("redis_fit")
    if fit1 is None or fit2 is None:
        return None
    redis1, redis2 = fit1["us_per_msg"], fit2["us_per_msg"]
    rss = summary[big]["idle_rss_mib"]["redis2"]["median"]
    return CostModel(
        publisher_us=each[0]["fixed_us"], follower_us=max(0.0, each[1]["fixed_us"]),
        frame_us=relays["per_frame_us"], redis_us=redis1,
        redis_follower_us=max(0.0, redis2 - redis1),
        calls_per_msg=summary[big]["client_calls_per_send"]["redis1"]["median"] or 1.0,
        commands_per_msg=summary[big]["commands_per_send"]["redis1"]["median"] or 0.0,
        bytes_per_event=summary[big]["redis_bytes_per_event"]["redis1"]["median"] or 0.0,
        process_mib=rss if rss is not None else PROCESS_MIB)


def capacity_plan(summary: Json, split: Json, plan: Plan) -> str:
    """The capacity plan of docs/scaling.md, computed from this run's figures, arithmetic
    shown."""
    m = cost_model(summary, split, plan)
    if m is None:
        return "(the capacity plan needs two sizes of N or more and both Redis setups)"
    big = int(max(plan.sizes))
    lines = [
        "**Inputs, from the run above** (µs of CPU per message; \"fixed\" parts from the"
        " split):",
        "",
        f"- the relay that takes a `send` (stores it, runs the script, answers, gets it back"
        f" over pub/sub, frames it once): **{m.publisher_us:.0f} µs** (redis x2, the first"
        " relay's fixed part);",
        f"- each further relay with watchers of that chat (pub/sub receive, decode, frame once):"
        f" **{m.follower_us:.0f} µs** (redis x2, the second relay's fixed part);",
        f"- each delivered frame: **{m.frame_us:.2f} µs** (redis x2, the relays' per-frame"
        " part);",
        f"- Redis: **{m.redis_us:.0f} µs** per message with one subscribed relay, and"
        f" **+{m.redis_follower_us:.0f} µs** per further subscribed relay (redis x2 less redis"
        " x1; each the slope of Redis's CPU against the message rate over every measurement of"
        f" the setup: Redis spends {split['redis1']['redis_fit']['idle_share']:.1%} of a core"
        " with nothing to do);",
        f"- Redis calls from the relays: **{m.calls_per_msg:.2f}** per message (one EVALSHA per"
        " batch, and a batch held one event here, plus the health checks);"
        f" **{m.commands_per_msg:.0f}** commands per message counting the script's own;",
        f"- Redis memory: **{m.bytes_per_event:.0f} bytes** per event kept in a Stream (its"
        f" growth over the window / messages, redis x1, N = {big:,}); each chat keeps"
        f" {REPLAY_EVENTS:,} events at most, for {REPLAY_SECONDS:.0f} s at most;",
        f"- memory: **{CONN_KIB} KiB** per idle subscribed connection (docs/performance.md,"
        f" 5,000 connections) and **{m.process_mib:.0f} MiB** per relay process before any"
        " client (its RSS with the Redis bus, measured above);",
        f"- a relay process is planned at **{CORE_BUDGET:.0%} of a core**: headroom for bursts,"
        " reconnect storms (every client of a failed relay comes back at once), TLS and the"
        " garbage collector.",
        "",
        f"**Workload.** Every client watches one chat with {WATCHERS} watchers and receives r"
        f" pushes per second on average: messages/s = clients x r / {WATCHERS}, frames/s ="
        " clients x r. The load balancer spreads clients without regard to chats, so a chat's"
        f" watchers sit on S = min({WATCHERS}, P) relays, each of which receives every message"
        " of that chat from Redis. Per message: relays' CPU = publisher + (S - 1) x follower"
        f" + {WATCHERS} x frame; Redis's CPU = Redis + (S - 1) x Redis per further relay;"
        " Redis pub/sub deliveries = S.",
        "",
        "| clients | r | messages/s | frames/s | relay CPU (cores) | relay processes P |"
        " memory (relays) | Redis calls/s | Redis commands/s | pub/sub deliveries/s |"
        " Redis CPU (cores) | Redis memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for clients in CLIENTS:
        for rate in PUSH_RATES:
            msgs = clients * rate / WATCHERS
            frames = clients * rate
            procs = 1
            for _ in range(50):  # S depends on P, P on the CPU S costs: a fixed point
                spread = min(WATCHERS, procs)
                cpu_us = msgs * (m.publisher_us + (spread - 1) * m.follower_us) \
                    + frames * m.frame_us
                need = max(1, math.ceil(cpu_us / 1e6 / CORE_BUDGET))
                if need <= procs:
                    break
                procs = need
            spread = min(WATCHERS, procs)
            cores = cpu_us / 1e6
            mem_gib = (clients * CONN_KIB / 1024 + procs * m.process_mib) / 1024
            redis_cores = msgs * (m.redis_us + (spread - 1) * m.redis_follower_us) / 1e6
            chats = clients / WATCHERS
            kept = min(REPLAY_EVENTS, rate * REPLAY_SECONDS)  # a chat has r messages/s
            redis_mib = chats * kept * m.bytes_per_event / 2**20
            lines.append(
                f"| {clients:,} | {rate:g} | {msgs:,.0f} | {frames:,.0f} | {cores:.1f} |"
                f" {procs} | {mem_gib:.1f} GiB | {msgs * m.calls_per_msg:,.0f} |"
                f" {msgs * m.commands_per_msg:,.0f} | {msgs * spread:,.0f} |"
                f" {redis_cores:.2f} | {redis_mib:,.0f} MiB |")
            notes.append(
                f"- {clients:,} clients, r = {rate:g}: {msgs:,.0f} msg/s x ({m.publisher_us:.0f}"
                f" + {spread - 1} x {m.follower_us:.0f}) µs + {frames:,.0f} frames/s x"
                f" {m.frame_us:.2f} µs = {cores:.2f} cores; / {CORE_BUDGET} = P = {procs}"
                f" (so S = {spread}). Memory: {clients:,} x {CONN_KIB} KiB + {procs} x"
                f" {m.process_mib:.0f} MiB = {mem_gib:.1f} GiB. Redis: {msgs:,.0f} x"
                f" ({m.redis_us:.0f} + {spread - 1} x {m.redis_follower_us:.0f}) µs ="
                f" {redis_cores:.2f} cores; {msgs:,.0f} x {m.calls_per_msg:.2f} calls,"
                f" {msgs:,.0f} x {m.commands_per_msg:.0f} commands, {msgs:,.0f} x {spread}"
                f" deliveries; memory {chats:,.0f} chats x {kept:g} events x"
                f" {m.bytes_per_event:.0f} bytes = {redis_mib:,.0f} MiB.")
    # Redis is one thread: the message rate at which it needs a whole core. At thousands of
    # messages/s P is far above the watchers per chat, so each message goes to S = WATCHERS.
    full = WATCHERS
    per_msg = m.redis_us + (full - 1) * m.redis_follower_us
    limit = 1e6 / per_msg
    notes += [
        "",
        f"**What gives out first: Redis.** It runs every script and every pub/sub delivery on"
        f" one thread. At thousands of messages/s P is far above {WATCHERS}, so every message"
        f" goes to S = {full} relays, and Redis spends {m.redis_us:.0f} +"
        f" {full - 1} x {m.redis_follower_us:.0f} = {per_msg:.0f} µs per message, so one"
        f" core carries at most 1,000,000 / {per_msg:.0f} = **{limit:,.0f} messages/s**:"
        f" {limit * WATCHERS / 1:,.0f} clients at r = 1, {limit * WATCHERS / 0.1:,.0f} at r ="
        " 0.1. The relays grow by adding processes (their CPU per message does not depend on"
        " P once S reaches the watchers per chat), and memory stays small beside CPU.",
    ]
    return "\n".join([*lines, "", "The arithmetic, row by row:", "", *notes])


# --- output -----------------------------------------------------------------------------------


def doc_section(summary: Json, split: Json, plan: Plan, meta: Json, command: str,
                plan_text: str, runs: list[Json]) -> str:
    m = meta["machine"]
    others = sorted(r["figures"]["other_share"] for r in runs
                    if r["figures"].get("other_share") is not None)
    during = (f" During the measurements other processes used {others[0]:.0%} to"
              f" {others[-1]:.0%} of a core (median {statistics.median(others):.0%});"
              f" `uptime` after it: `{meta.get('uptime_after', 'unknown')}`." if others else "")
    return "\n".join([
        BEGIN_MARK, "",
        f"Run of {meta['started'][:16].replace('T', ' ')} UTC, {meta['seconds'] / 60:.1f}"
        f" minutes, bench at commit `{m['commit']}`; `uptime` before it started:"
        f" `{meta['uptime']}`; other processes kept {meta['busy_before'] * 100:.0f}% of a core"
        f" busy just before it.{during}", "",
        "```sh", command, "```", "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, Python {m['python']},"
        f" trio {m['trio']}, Redis {meta['redis_version']}, Node.js {m['node']}. The relays and"
        " Redis share the first core, the load generator has the other.", "",
        tables(summary, plan), "",
        split_table(split), "",
        "### The capacity plan, computed from these figures", "",
        plan_text, "",
        END_MARK,
    ])


def write_docs(section: str) -> None:
    text = DOC.read_text()
    start, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        raise BenchError(f"{DOC} has no {BEGIN_MARK!r} ... {END_MARK!r} section to rewrite")
    DOC.write_text(text[:start] + section + text[end + len(END_MARK):])


def write_outputs(runs: list[Json], meta: Json, plan: Plan, problems: list[str],
                  args: argparse.Namespace, json_path: Path | None) -> int:
    if json_path is not None:  # first: whatever fails below, the measurements are kept
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"ok": not problems, "meta": meta,
                                         "problems": problems, "runs": runs}, indent=1) + "\n")
    summary = summarize(runs, plan)
    split = split_costs(summary, plan, runs)
    plan_text = capacity_plan(summary, split, plan)
    command = shlex.join(["python", "bench/scaleout.py", *meta["argv"]])
    violations = sum(int(r["result"].get("violationCount") or 0) for r in runs)
    out: Json = {"ok": not problems, "meta": meta, "summary": summary, "split": split,
                 "violations": violations, "problems": problems, "runs": runs}
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=1) + "\n")
    if args.write_docs:
        write_docs(doc_section(summary, split, plan, meta, command, plan_text, runs))
    print(f"command: {command}")
    print(f"relay: {meta['relay_source']}; uptime before: {meta['uptime']}")
    print()
    print(tables(summary, plan))
    print()
    if split:
        print(split_table(split))
        print()
        print(plan_text)
        print()
    print(f"delivery: {violations} violations of exactly-once, in-order delivery"
          f" in {len(runs)} measurements")
    written = [p for p in (json_path, DOC if args.write_docs else None) if p is not None]
    print(f"written: {', '.join(map(str, written)) or 'nothing'}")
    print(f"run time: {meta['seconds']:.0f} s")
    if problems:
        print(f"\nFAILED: {len(problems)} problems:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "not installed"
    text = subprocess.run([binary, "--version"], capture_output=True, text=True,
                          check=False).stdout
    for word in text.split():
        if word.startswith("v="):
            return word[2:]
    return text.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fan-out through Redis (1 and 2 relay"
                                     " processes) against one relay process (docs/scaling.md).")
    parser.add_argument("--quick", action="store_true", help="tiny scale, one round: a smoke"
                        " test")
    parser.add_argument("--rounds", type=int, help="rounds (default 3)")
    parser.add_argument("--sizes", help="subscriber counts, e.g. 100,1000")
    parser.add_argument("--setups", help="comma-separated subset of inproc,redis1,redis2")
    parser.add_argument("--seconds", type=float, help="seconds of sends per measurement"
                        " (default 3)")
    parser.add_argument("--json", type=Path, help="where to write the results (default"
                        " bench/results/scaleout.json; scaleout-quick.json with --quick)")
    parser.add_argument("--write-docs", action="store_true",
                        help="also rewrite the results section of docs/scaling.md")
    parser.add_argument("--no-pin-cpus", action="store_true",
                        help="leave the processes to the scheduler")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="run nothing: summarize the results of an earlier run again")
    parser.add_argument("--verbose", action="store_true", help="show the loadgen's progress")
    args = parser.parse_args(argv)
    if args.write_docs and args.quick:
        parser.error("--write-docs takes the full run's figures, not --quick's")
    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text())
        if args.write_docs and "--quick" in earlier["meta"]["argv"]:
            parser.error("--write-docs takes the full run's figures, not --quick's")
        fields: Json = {k: tuple(v) if isinstance(v, list) else v
                        for k, v in earlier["meta"]["plan"].items()}
        for run in earlier["runs"]:  # from the raw results, as this version computes them
            run["figures"] = figures(run["result"])
        return write_outputs(earlier["runs"], earlier["meta"], Plan(**fields),
                             earlier["problems"], args, args.json)

    plan = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.rounds is not None:
        overrides["rounds"] = max(1, args.rounds)
    if args.sizes:
        overrides["sizes"] = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    if args.setups:
        chosen = tuple(s.strip() for s in args.setups.split(",") if s.strip())
        unknown = set(chosen) - set(SETUPS)
        if unknown:
            parser.error(f"unknown setups: {', '.join(sorted(unknown))}")
        overrides["setups"] = tuple(s for s in SETUPS if s in chosen)
    if args.seconds is not None:
        overrides["send_seconds"] = args.seconds
    plan = Plan(**{**plan.__dict__, **overrides})
    json_path = args.json or RESULTS / f"scaleout{'-quick' if args.quick else ''}.json"

    try:
        node, npm = need_tools()
        ensure_loadgen(npm)
        if shutil.which("redis-server") is None:
            raise BenchError("redis-server is not installed (Debian: apt-get install"
                             " redis-server)")
        try:
            import coredis  # noqa: F401 - the relay's Redis bus needs it
        except ImportError:
            raise BenchError("the relay's Redis bus needs coredis: pip install -e"
                             " '.[redis]'") from None
        nofile = raise_fd_limit()
        if nofile < max(plan.sizes) * 2 + 200:
            raise BenchError(f"RLIMIT_NOFILE's hard limit is {nofile}: too low for this run")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    cpus = sorted(os.sched_getaffinity(0))
    pins: tuple[set[int] | None, set[int] | None] = (None, None)
    if not args.no_pin_cpus and len(cpus) >= 2:
        pins = ({cpus[0]}, {cpus[-1]})
    uptime = _uptime()
    busy_before = machine_busy_share(0.2 if args.quick else 2.0)
    if busy_before > CONTENDED_SHARE:
        print(f"bench: warning: other processes keep {busy_before:.0%} of a core busy"
              f" ({uptime}); the figures they contend with are marked §", file=sys.stderr,
              flush=True)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    meta: Json = {"started": started.isoformat(), "machine": machine(node),
                  "argv": sys.argv[1:] if argv is None else list(argv), "plan": plan.__dict__,
                  "relay_source": relay_source(None), "busy_before": busy_before,
                  "uptime": uptime, "redis_version": _redis_version(),
                  "cpu_pinning": {"servers": sorted(pins[0] or []),
                                  "loadgen": sorted(pins[1] or [])}}
    runs: list[Json] = []
    problems: list[str] = []
    for round_no in range(1, plan.rounds + 1):
        for n in plan.sizes:
            for setup in plan.setups:
                label = f"round {round_no}/{plan.rounds} N = {n:,} {LABELS[setup]}"
                try:
                    result, found = measure(node, setup, n, plan, pins, not args.verbose)
                except BenchError as exc:
                    problems.append(f"{label}: {exc}")
                    print(f"bench: {label}: {exc}", file=sys.stderr, flush=True)
                    continue
                problems += [f"{label}: {p}" for p in found]
                f = figures(result)
                runs.append({"round": round_no, "size": n, "setup": setup, "result": result,
                             "figures": f})
                print(f"bench: {label}: {_one_line(f)}", file=sys.stderr, flush=True)
    meta["seconds"] = time.monotonic() - t0
    meta["uptime_after"] = _uptime()
    return write_outputs(runs, meta, plan, problems, args, json_path)


def _one_line(f: Json) -> str:
    bits = [f"{f.get('sends_per_s') or 0:,.0f} sends/s",
            f"{f.get('cpu_us_per_frame') or 0:.2f} µs CPU/frame"
            f" (relays {f.get('relay_us_per_frame') or 0:.2f},"
            f" Redis {f.get('redis_us_per_frame') or 0:.2f})",
            f"p50 {f.get('p50_ms') or 0:.2f} ms p99 {f.get('p99_ms') or 0:.2f} ms",
            f"loadgen {f.get('loadgen_share') or 0:.0%}", f"other {f.get('other_share') or 0:.0%}"]
    if f.get("events_per_evalsha") is not None:
        bits.append(f"{f['events_per_evalsha']:.2f} events/EVALSHA,"
                    f" {f.get('lua_us_per_event') or 0:.1f} µs/event in the script,"
                    f" {f.get('client_calls_per_send') or 0:.2f} calls/msg")
    return ", ".join(bits)


if __name__ == "__main__":
    sys.exit(main())
