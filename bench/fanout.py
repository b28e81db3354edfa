"""Fan-out benchmark: the relay against two minimal broadcasters, in one run, alternating.

    python bench/fanout.py                 # the full run (about 10 minutes on 2 cores)
    python bench/fanout.py --write-docs    # the same, then rewrite docs/performance.md's
                                           # results and docs/performance-fanout.png
    python bench/fanout.py --quick         # a few seconds: tiny scale, a smoke test
    python bench/fanout.py --relay-rev REV # the relay as committed at REV (before a change)
    python bench/fanout.py --from-json bench/results/latest.json --write-docs
                                           # no run: tables, plot, docs from earlier results

Servers, each started afresh for every measurement and stopped after it:

- ``relay``: ``python -m trio_relay serve --config bench/relay-bench.toml`` (the default
  SQLite backend; every chat uses the ``silent`` model profile, so a ``send`` is one push);
- ``trio``: ``bench/baseline_trio.py``, a minimal broadcaster on trio-websocket;
- ``asyncio``: ``bench/baseline_asyncio.py``, the same on asyncio and ``websockets``.

The load comes from ``bench/loadgen/loadgen.mjs``, a separate Node process using ``ws``
(installed by ``npm ci`` from the committed lock file, which this command runs when
``bench/loadgen/node_modules`` is missing or stale). Scenarios, each run on the three servers
one after the other (relay, trio, asyncio, relay, trio, asyncio, ...), for ``--rounds``
rounds; the table shows the median of the rounds:

- fan-out to N subscribers (10, 100, 1,000): one sender keeps 16 pushes in flight for 5 s:
  delivered frames per second and server CPU per delivered frame; then one push at a time:
  latency from send to receipt, p50 and p99;
- K connections (1,000, 5,000, 10,000), each authenticated and subscribed to one chat:
  connect + auth + subscribe rate, server memory per connection (RSS and PSS, after
  settling), and the time until all K have one broadcast.

Every subscriber must get every push exactly once and in ``seq`` order; any violation, a
server that misbehaves (exits badly, logs an error) or a loadgen failure fails the run
(exit status 1) after the results are written. Results: a table on stdout, JSON in
``bench/results/latest.json``, a plot in ``bench/results/fanout.png`` (``--write-docs``:
``docs/performance-fanout.png`` and the marked section of ``docs/performance.md``). See
docs/performance.md for the method.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN = BENCH / "loadgen"
RESULTS = BENCH / "results"
DOC = ROOT / "docs" / "performance.md"
DOC_PLOT = ROOT / "docs" / "performance-fanout.png"
RELAY_CONFIG = BENCH / "relay-bench.toml"
PIN = "bench-pin-1234"
SERVERS = ("relay", "trio", "asyncio")
LABELS = {"relay": "relay", "trio": "trio-websocket", "asyncio": "asyncio websockets"}
#: A figure measured while the loadgen used more than this share of a core is capped by it.
CAPPED_SHARE = 0.9
#: A figure measured while other processes used more than this share of a core is contended.
CONTENDED_SHARE = 0.15
BEGIN_MARK = "<!-- fanout-results:begin (written by python bench/fanout.py --write-docs) -->"
END_MARK = "<!-- fanout-results:end -->"
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 20.0

Json = dict[str, Any]


class BenchError(Exception):
    """The benchmark cannot run (a missing tool, a server that does not start)."""


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    fanout: tuple[int, ...]
    connections: tuple[int, ...]
    servers: tuple[str, ...]
    window: int
    throughput_seconds: float
    throughput_sends: int  # used instead of seconds when > 0 (--quick)
    latency_sends: int
    latency_max_seconds: float
    connect_concurrency: int
    settle: Json = field(default_factory=dict)

    def fanout_spec(self, n: int) -> Json:
        return {
            "scenario": "fanout", "subscribers": n, "window": self.window,
            # About 5,000 frames of warm-up before anything is measured.
            "warmupSends": max(5, min(500, 5000 // n)),
            "throughputSeconds": 0 if self.throughput_sends else self.throughput_seconds,
            "throughputSends": self.throughput_sends,
            "latencySends": self.latency_sends, "latencyMaxSeconds": self.latency_max_seconds,
            "connectConcurrency": self.connect_concurrency,
            "deadlineSeconds": 60 + self.throughput_seconds + self.latency_max_seconds,
        }

    def connections_spec(self, k: int) -> Json:
        return {
            "scenario": "connections", "subscribers": k, "measureMemory": True,
            "broadcastSends": 1, "connectConcurrency": self.connect_concurrency,
            "settle": self.settle, "deadlineSeconds": 60 + k / 50,
        }


FULL = Plan(
    rounds=3, fanout=(10, 100, 1000), connections=(1000, 5000, 10000), servers=SERVERS,
    window=16, throughput_seconds=5.0, throughput_sends=0, latency_sends=300,
    latency_max_seconds=3.0, connect_concurrency=100,
    settle={"intervalMs": 200, "stableMs": 1000, "maxMs": 5000},
)
QUICK = Plan(
    rounds=1, fanout=(3,), connections=(20,), servers=SERVERS, window=4,
    throughput_seconds=0.0, throughput_sends=30, latency_sends=10, latency_max_seconds=2.0,
    connect_concurrency=10, settle={"intervalMs": 50, "stableMs": 150, "maxMs": 600},
)


# --- the tools ----------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def need_tools() -> tuple[str, str]:
    """node and npm, and websockets for the asyncio baseline; BenchError says how to get them."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise BenchError(
            "bench/fanout.py needs Node.js 18+ and npm for its load generator: install them"
            " (Debian: apt-get install nodejs npm); the command runs `npm ci` in"
            " bench/loadgen itself"
        )
    if importlib.util.find_spec("websockets") is None:
        raise BenchError(
            "bench/fanout.py needs the websockets package for its asyncio baseline:"
            " pip install -e '.[bench]' (or pip install websockets)"
        )
    return node, npm


def ensure_loadgen(npm: str) -> None:
    """Run ``npm ci`` in bench/loadgen when node_modules is missing or older than the lock."""
    lock = hashlib.sha256(
        (LOADGEN / "package.json").read_bytes() + (LOADGEN / "package-lock.json").read_bytes()
    ).hexdigest()
    marker = LOADGEN / "node_modules" / ".bench-installed"
    if marker.exists() and marker.read_text().strip() == lock and (
        LOADGEN / "node_modules" / "ws" / "package.json"
    ).exists():
        return
    print("bench: npm ci in bench/loadgen", file=sys.stderr, flush=True)
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=LOADGEN,
        capture_output=True, text=True, timeout=600, check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"npm ci in bench/loadgen failed:\n{done.stdout}{done.stderr}")
    marker.write_text(lock + "\n")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(node: str) -> Json:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    node_version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    ws_version = json.loads((LOADGEN / "node_modules" / "ws" / "package.json").read_text())[
        "version"
    ]
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "memory": memory, "kernel": platform.release(),
        "python": platform.python_version(), "trio": _version("trio"),
        "trio-websocket": _version("trio-websocket"), "wsproto": _version("wsproto"),
        "websockets": _version("websockets"), "trio-relay": _version("trio-relay"),
        "node": node_version, "ws": ws_version, "commit": commit or "unknown",
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# --- servers ----------------------------------------------------------------------------------


def relay_env(relay_src: Path, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """Environment and working directory that make ``python -m trio_relay`` import the
    trio_relay package of ``relay_src`` (another checkout) rather than this one."""
    path = [str(relay_src), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path)}, relay_src


def export_revision(rev: str) -> tuple[tempfile.TemporaryDirectory[str], Path]:
    """``git archive`` the revision ``rev`` of this repository into a temporary directory."""
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--short", f"{rev}^{{commit}}"], cwd=ROOT,
        capture_output=True, text=True, check=False,
    )
    if found.returncode != 0:
        raise BenchError(f"--relay-rev {rev}: not a commit here: {found.stderr.strip()}")
    commit = found.stdout.strip()
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-relay-{commit}-")
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT,
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive {commit} failed: {archive.stderr.decode()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("trio_relay/")]
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(tmp.name, members=members, filter="data")
        else:  # pragma: no cover - a tree of our own making
            tar.extractall(tmp.name, members=members)
    (Path(tmp.name) / "REVISION").write_text(f"{commit}\n")
    return tmp, Path(tmp.name)


def relay_source(relay_src: Path | None) -> str:
    """Where the relay's code comes from: its directory and, if it is a git checkout, commit."""
    if relay_src is not None and (relay_src / "REVISION").exists():
        return f"commit {(relay_src / 'REVISION').read_text().strip()} (git archive)"
    env, cwd = relay_env(relay_src, dict(os.environ)) if relay_src else (dict(os.environ), ROOT)
    found = subprocess.run(
        [sys.executable, "-c", "import trio_relay; print(trio_relay.__file__)"], env=env,
        cwd=cwd, capture_output=True, text=True, check=False,
    ).stdout.strip()
    package = Path(found).parent if found else Path("?")
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=package if found else ROOT,
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    return f"{package}" + (f" ({commit})" if commit else "")


def _pin(pid: int, cpus: set[int] | None) -> None:
    if cpus is not None:
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass


class Server:
    """One server process, started for one measurement."""

    def __init__(self, kind: str, cpus: set[int] | None, relay_src: Path | None) -> None:
        self.kind = kind
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{kind}-")
        tmp = Path(self._tmp.name)
        self.log_path = tmp / "stderr.log"
        env = dict(os.environ)
        cwd = ROOT
        if kind == "relay":
            argv = [sys.executable, "-m", "trio_relay", "serve", "--config", str(RELAY_CONFIG),
                    "--port", "0", "--data-dir", str(tmp / "data")]
            env["TRIO_RELAY_PIN"] = PIN
            env.pop("TRIO_RELAY_LOG_LEVEL", None)
            if relay_src is not None:
                env, cwd = relay_env(relay_src, env)
        else:
            argv = [sys.executable, str(BENCH / f"baseline_{kind}.py"), "--port", "0",
                    "--pin", PIN]
        self._log = self.log_path.open("w")
        self._drainer: threading.Thread | None = None
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd,
        )
        _pin(self.process.pid, cpus)
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        fd = self.process.stdout.fileno()
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                seen += chunk
                match = re.search(rb"serving (ws://\S+)", seen)
                if match:
                    # Whatever else it prints is read and dropped, so that it never blocks.
                    self._drainer = threading.Thread(target=self._drain, args=(fd,), daemon=True)
                    self._drainer.start()
                    return match.group(1).decode()
            elif self.process.poll() is not None:
                break
        self.stop()
        raise BenchError(f"{self.kind} server did not start: {seen.decode(errors='replace')}"
                         f" {self.stderr()}")

    def _drain(self, fd: int) -> None:
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass

    def stderr(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> list[str]:
        """Stop it (SIGTERM); return what went wrong: exit status, errors in its log."""
        problems: list[str] = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"did not stop within {SERVER_STOP_TIMEOUT:.0f} s of SIGTERM")
                self.process.kill()
                self.process.wait()
        if self._drainer is not None:
            self._drainer.join(5)  # the server is gone: its stdout is at its end
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.process.returncode not in (0, -signal.SIGTERM):
            problems.append(f"exited with status {self.process.returncode}")
        log = self.stderr()
        self._log.close()
        bad = [line for line in log.splitlines()
               if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", line)]
        if bad:
            problems.append(f"{len(bad)} error lines in its log, first: {bad[0][:300]}")
        if problems:
            problems.append(f"log tail: {log[-1500:]}")
        self._tmp.cleanup()
        return problems


def run_loadgen(node: str, server: Server, spec: Json, cpus: set[int] | None,
                quiet: bool) -> Json:
    spec = {**spec, "url": server.url, "pin": PIN, "serverPid": server.process.pid,
            "clkTck": os.sysconf("SC_CLK_TCK"), "projectId": "demo",
            "modelProfileId": "silent", "quiet": quiet}
    process = subprocess.Popen(
        [node, str(LOADGEN / "loadgen.mjs"), json.dumps(spec)], stdout=subprocess.PIPE,
        stderr=None if not quiet else subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        text=True,
    )
    _pin(process.pid, cpus)
    try:
        out, _ = process.communicate(timeout=spec["deadlineSeconds"] + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"error": "the loadgen did not finish in time", "violationCount": 0,
                "violations": []}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"the loadgen printed no result (status {process.returncode})",
                "violationCount": 0, "violations": []}
    result: Json = json.loads(lines[-1])
    return result


# --- summary ---------------------------------------------------------------------------------


def _get(run: Json, *path: str) -> float | None:
    value: Any = run
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


# (key, label, path in a loadgen result, the measuring window the figure comes from: its
# loadgen and other-process CPU shares say whether the figure is capped or contended)
Metric = tuple[str, str, tuple[str, ...], str | None]
FANOUT_METRICS: list[Metric] = [
    ("frames_per_s", "delivered frames/s", ("throughput", "framesPerS"), "throughput"),
    ("cpu_us_per_frame", "server CPU per delivered frame (µs)",
     ("throughput", "serverCpuPerFrameUs"), "throughput"),
    ("server_cpu_pct", "server CPU (% of a core)", ("throughput", "serverCpuShare"),
     "throughput"),
    ("p50_ms", "latency p50, one push at a time (ms)", ("latency", "latency", "p50Ms"),
     "latency"),
    ("p99_ms", "latency p99, one push at a time (ms)", ("latency", "latency", "p99Ms"),
     "latency"),
    ("loaded_p50_ms", "latency p50, {window} in flight (ms)", ("throughput", "latency", "p50Ms"),
     "throughput"),
    ("loaded_p99_ms", "latency p99, {window} in flight (ms)", ("throughput", "latency", "p99Ms"),
     "throughput"),
    ("loadgen_cpu_pct", "loadgen CPU, {window} in flight (% of a core)",
     ("throughput", "loadgenCpuShare"), None),
]
CONNECTION_METRICS: list[Metric] = [
    ("connect_per_s", "connect + auth + subscribe (/s)", ("connect", "ratePerS"), "connect"),
    ("rss_kib_per_conn", "memory per connection, RSS (KiB)", ("memoryPerConnection", "rssKiB"),
     None),
    ("pss_kib_per_conn", "memory per connection, PSS (KiB)", ("memoryPerConnection", "pssKiB"),
     None),
    ("broadcast_all_ms", "one broadcast: until all have it (ms)", ("broadcast", "allMs"),
     "broadcast"),
    ("connect_loadgen_cpu_pct", "loadgen CPU while connecting (% of a core)",
     ("connect", "loadgenCpuShare"), None),
    ("broadcast_loadgen_cpu_pct", "loadgen CPU during the broadcast (% of a core)",
     ("broadcast", "loadgenCpuShare"), None),
]
PERCENT = {"server_cpu_pct", "loadgen_cpu_pct", "connect_loadgen_cpu_pct",
           "broadcast_loadgen_cpu_pct"}


def summarize(runs: list[Json], plan: Plan) -> Json:
    """Medians over the rounds, per scenario, server and metric, with the loadgen caps."""
    summary: Json = {"fanout": {}, "connections": {}}
    groups = [("fanout", n, FANOUT_METRICS) for n in plan.fanout] + [
        ("connections", k, CONNECTION_METRICS) for k in plan.connections
    ]
    for scenario, size, metrics in groups:
        table: Json = {}
        for key, label, path, window in metrics:
            row: Json = {"label": label.format(window=plan.window)}
            for kind in plan.servers:
                mine = [r["result"] for r in runs if r["scenario"] == scenario
                        and r["size"] == size and r["server"] == kind]
                values = [v for v in (_get(r, *path) for r in mine) if v is not None]
                shares = [s for s in (_get(r, window, "loadgenCpuShare") for r in mine)
                          if s is not None] if window else []
                # /proc/stat counts in 10 ms ticks: a shorter window than 0.5 s is not judged.
                others = [s for s in (_get(r, window, "otherCpuShare") for r in mine
                                      if (_get(r, window, "seconds") or 0) >= 0.5)
                          if s is not None] if window else []
                scale = 100.0 if key in PERCENT else 1.0
                row[kind] = {
                    "median": statistics.median(values) * scale if values else None,
                    "rounds": [v * scale for v in values],
                    "capped": any(s > CAPPED_SHARE for s in shares),
                    "max_loadgen_share": max(shares) if shares else None,
                    "contended": any(s > CONTENDED_SHARE for s in others),
                    "max_other_share": max(others) if others else None,
                }
            for kind in ("relay", "trio"):
                a, b = row.get(kind, {}).get("median"), row.get("asyncio", {}).get("median")
                row[f"{kind}/asyncio"] = (a / b) if a is not None and b else None
            table[key] = row
        summary[scenario][str(size)] = table
    return summary


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if key in PERCENT:
        return f"{value:.0f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def tables(summary: Json, plan: Plan) -> str:
    """The results as Markdown tables (printed, and pasted into docs/performance.md)."""
    servers = plan.servers
    head = ["", *(LABELS[s] for s in servers)]
    ratios = [k for k in ("relay", "trio") if k in servers and "asyncio" in servers]
    head += [f"{'trio-websocket' if k == 'trio' else k} / asyncio" for k in ratios]
    out: list[str] = []
    for scenario, title, metrics in (
        ("fanout", "Fan-out to N subscribers", FANOUT_METRICS),
        ("connections", "K subscribed connections", CONNECTION_METRICS),
    ):
        out.append(f"**{title}** (median of {plan.rounds} round{'s' * (plan.rounds != 1)})")
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for size, table in summary[scenario].items():
            letter = "N" if scenario == "fanout" else "K"
            out.append(f"| **{letter} = {int(size):,}** |" + " |" * (len(head) - 1))
            for key, _, _, _ in metrics:
                row = table[key]
                cells = [row["label"]]
                for kind in servers:
                    cell = _fmt(row[kind]["median"], key)
                    if row[kind]["capped"]:
                        cell += " ‡"
                    if row[kind]["contended"]:
                        cell += " §"
                    cells.append(cell)
                for k in ratios:
                    ratio = row[f"{k}/asyncio"]
                    cells.append("-" if ratio is None or key in PERCENT else f"{ratio:.2f}")
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(f"‡ capped by the load generator: it used more than {CAPPED_SHARE:.0%} of a core"
               " during that measurement in at least one round, so the server may have had"
               " more to give.")
    out.append("")
    out.append(f"§ contended: other processes on the machine used more than"
               f" {CONTENDED_SHARE:.0%} of a core during that measurement in at least one"
               " round (judged for measurements of 0.5 s or more).")
    return "\n".join(out)


def flagged(summary: Json, flag: str) -> list[str]:
    """The figures marked ``capped`` or ``contended``, one line each."""
    found = []
    for scenario, sizes in summary.items():
        for size, table in sizes.items():
            letter = "N" if scenario == "fanout" else "K"
            for row in table.values():
                for kind in SERVERS:
                    if kind in row and row[kind][flag]:
                        found.append(f"{letter} = {int(size):,}, {row['label']}, {LABELS[kind]}")
    return found


def plot(summary: Json, plan: Plan, path: Path, run: Json) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in summary["fanout"]]
    fig, (ax_cpu, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    styles = {"relay": ("tab:red", "o"), "trio": ("tab:blue", "s"),
              "asyncio": ("tab:green", "^")}
    for axis, key, ylabel in (
        (ax_cpu, "cpu_us_per_frame", "server CPU per delivered frame (µs)"),
        (ax_rate, "frames_per_s", "delivered frames per second"),
    ):
        for kind in plan.servers:
            color, marker = styles[kind]
            cells = [summary["fanout"][str(n)][key][kind] for n in sizes]
            xs = [n for n, c in zip(sizes, cells, strict=True) if c["median"] is not None]
            ys = [c["median"] for c in cells if c["median"] is not None]
            axis.plot(xs, ys, color=color, marker=marker, label=LABELS[kind])
            capped = [(n, c["median"]) for n, c in zip(sizes, cells, strict=True)
                      if c["capped"] and c["median"] is not None]
            if capped:
                axis.scatter([x for x, _ in capped], [y for _, y in capped], s=180,
                             facecolors="none", edgecolors=color,
                             label=f"{LABELS[kind]}: capped by loadgen")
        axis.set_xscale("log")
        axis.set_xticks(sizes)
        axis.set_xticklabels([f"{n:,}" for n in sizes])
        axis.set_xlabel("subscribers (N)")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    ax_cpu.legend(fontsize=8)
    m = run["machine"]
    fig.suptitle(
        f"Fan-out, one sender, {plan.window} pushes in flight; median of {plan.rounds} rounds;"
        f" relay: {_short_source(run['relay_source'])}\n"
        f"{m['nproc']} cores, {m['cpu']}, Python {m['python']}, {run['started'][:10]}",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def doc_section(summary: Json, plan: Plan, meta: Json, command: str) -> str:
    m = meta["machine"]
    capped = flagged(summary, "capped")
    contended = flagged(summary, "contended")
    lines = [
        BEGIN_MARK,
        "",
        f"Run of {meta['started'][:16].replace('T', ' ')} UTC, {meta['seconds'] / 60:.1f}"
        f" minutes, bench at commit `{m['commit']}`, the relay's code from"
        f" `{_short_source(meta['relay_source'])}`; before it started, other processes kept"
        f" {meta['busy_before'] * 100:.0f}% of a core busy:",
        "",
        "```sh",
        f"{command}",
        "```",
        "",
        "| machine | |",
        "|---|---|",
        f"| cores (nproc) | {m['nproc']} |",
        f"| CPU | {m['cpu']} |",
        f"| memory | {m['memory']} |",
        f"| kernel | Linux {m['kernel']} |",
        f"| Python | {m['python']} |",
        f"| trio / trio-websocket / wsproto | {m['trio']} / {m['trio-websocket']} /"
        f" {m['wsproto']} |",
        f"| websockets | {m['websockets']} |",
        f"| Node.js / ws | {m['node']} / {m['ws']} |",
        f"| RLIMIT_NOFILE | {m['rlimit_nofile']} |",
        "",
        tables(summary, plan),
        "",
        "![Server CPU per delivered frame and delivered frames per second against the number"
        " of subscribers, for the relay and both baselines](performance-fanout.png)",
        "",
        "Capped by the load generator: " + ("; ".join(capped) + "." if capped else "nothing."),
        "",
        "Contended by other processes: "
        + ("; ".join(contended) + "." if contended else "nothing."),
        "",
        END_MARK,
    ]
    return "\n".join(lines)


def _short_source(source: str) -> str:
    """The relay's source relative to the repository, where it is inside it."""
    return source.replace(str(ROOT) + "/", "", 1) if source.startswith(str(ROOT)) else source


def machine_busy_share(seconds: float) -> float:
    """The share of a core that the machine is busy over ``seconds`` (before starting)."""

    def busy() -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    before = busy()
    time.sleep(seconds)
    return (busy() - before) / seconds


def write_docs(section: str) -> None:
    text = DOC.read_text()
    start, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        raise BenchError(f"{DOC} has no {BEGIN_MARK!r} ... {END_MARK!r} section to rewrite")
    DOC.write_text(text[:start] + section + text[end + len(END_MARK):])


# --- the run ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark: the relay against minimal trio-websocket and asyncio"
        " websockets broadcasters (docs/performance.md).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny scale, one round: a smoke test of a few seconds")
    parser.add_argument("--rounds", type=int, help="rounds of every scenario (default 3)")
    parser.add_argument("--servers", help="comma-separated subset of relay,trio,asyncio")
    parser.add_argument("--fanout", help="subscriber counts for fan-out, e.g. 10,100,1000")
    parser.add_argument("--connections", help="connection counts, e.g. 1000,5000,10000")
    parser.add_argument("--json", type=Path, help="where to write the results as JSON"
                        " (default bench/results/latest.json; quick.json with --quick)")
    parser.add_argument("--plot", type=Path, help="where to write the plot (default"
                        " bench/results/fanout.png; quick.png with --quick)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--write-docs", action="store_true",
                        help="also rewrite the results section of docs/performance.md and"
                        " docs/performance-fanout.png")
    parser.add_argument("--no-pin-cpus", action="store_true",
                        help="do not pin the server to the first CPU and the loadgen to the last")
    parser.add_argument("--relay-src", type=Path,
                        help="benchmark the trio_relay package of this directory (another"
                        " checkout, e.g. `git worktree add ../before HEAD~3`) instead of this one")
    parser.add_argument("--relay-rev", metavar="REV",
                        help="benchmark the relay as committed at this git revision (exported"
                        " with git archive into a temporary directory), e.g. the commit before"
                        " a change, to compare with a run without it")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="run nothing: summarize the results of an earlier run again"
                        " (tables, plot, with --write-docs the docs; --json to save them)")
    parser.add_argument("--verbose", action="store_true", help="show the loadgen's progress")
    args = parser.parse_args(argv)
    if args.write_docs and args.quick:
        parser.error("--write-docs takes the full run's figures, not --quick's")
    if args.relay_src is not None and args.relay_rev is not None:
        parser.error("--relay-src and --relay-rev: one or the other")
    export = None
    if args.relay_rev is not None:
        try:
            export, args.relay_src = export_revision(args.relay_rev)
        except BenchError as exc:
            parser.error(str(exc))
    if args.relay_src is not None:
        args.relay_src = args.relay_src.resolve()
        if not (args.relay_src / "trio_relay" / "__init__.py").exists():
            parser.error(f"--relay-src {args.relay_src}: no trio_relay package there")

    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text())
        fields: Json = {k: tuple(v) if isinstance(v, list) else v
                        for k, v in earlier["meta"]["plan"].items()}
        plot_path = DOC_PLOT if args.write_docs else (args.plot or RESULTS / "fanout.png")
        return write_outputs(earlier["runs"], earlier["meta"], Plan(**fields),
                             earlier["problems"], args, args.json, plot_path)

    plan = QUICK if args.quick else FULL
    overrides: Json = {}
    if args.rounds is not None:
        overrides["rounds"] = max(1, args.rounds)
    if args.servers:
        kinds = tuple(s.strip() for s in args.servers.split(",") if s.strip())
        unknown = set(kinds) - set(SERVERS)
        if unknown:
            parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
        overrides["servers"] = tuple(s for s in SERVERS if s in kinds)
    for name in ("fanout", "connections"):
        value = getattr(args, name)
        if value:
            overrides[name] = tuple(int(x) for x in value.split(",") if x.strip())
    plan = Plan(**{**plan.__dict__, **overrides})
    name = "quick" if args.quick else "latest"
    json_path = args.json or RESULTS / f"{name}.json"
    plot_path = DOC_PLOT if args.write_docs else (
        args.plot or RESULTS / ("quick.png" if args.quick else "fanout.png"))

    try:
        node, npm = need_tools()
        ensure_loadgen(npm)
        nofile = raise_fd_limit()
        needed = max((*plan.fanout, *plan.connections), default=0) + 100
        if nofile < needed:
            raise BenchError(f"RLIMIT_NOFILE's hard limit is {nofile}; this run needs {needed}")
        if args.write_docs or not args.no_plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                if args.write_docs:
                    raise BenchError(
                        "--write-docs needs matplotlib: pip install -e '.[bench]'"
                    ) from None
                print("bench: matplotlib is not installed; no plot", file=sys.stderr)
                args.no_plot = True
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    cpus = sorted(os.sched_getaffinity(0))
    pin_server = pin_loadgen = None
    if not args.no_pin_cpus and len(cpus) >= 2:
        pin_server, pin_loadgen = {cpus[0]}, {cpus[-1]}
    busy_before = machine_busy_share(0.2 if args.quick else 2.0)
    if busy_before > CONTENDED_SHARE:
        print(f"bench: warning: other processes keep {busy_before:.0%} of a core busy; the"
              " figures they contend with are marked §", file=sys.stderr, flush=True)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    meta: Json = {"started": started.isoformat(), "machine": machine(node),
                  "argv": sys.argv[1:], "plan": plan.__dict__,
                  "relay_source": relay_source(args.relay_src), "busy_before": busy_before,
                  "cpu_pinning": {"server": sorted(pin_server or []),
                                  "loadgen": sorted(pin_loadgen or [])}}
    runs: list[Json] = []
    problems: list[str] = []
    scenarios: list[tuple[str, int, Callable[[int], Json]]] = [
        ("fanout", n, plan.fanout_spec) for n in plan.fanout
    ] + [("connections", k, plan.connections_spec) for k in plan.connections]

    for round_no in range(1, plan.rounds + 1):
        for scenario, size, make_spec in scenarios:
            for kind in plan.servers:  # alternating: relay, trio, asyncio, relay, ...
                label = f"round {round_no}/{plan.rounds} {scenario} {size:,} {kind}"
                spec = make_spec(size)
                try:
                    server = Server(kind, pin_server, args.relay_src)
                except BenchError as exc:
                    problems.append(f"{label}: {exc}")
                    print(f"bench: {label}: {exc}", file=sys.stderr, flush=True)
                    continue
                try:
                    result = run_loadgen(node, server, spec, pin_loadgen, not args.verbose)
                finally:
                    server_problems = server.stop()
                for p in server_problems:
                    problems.append(f"{label}: server: {p}")
                if result.get("error"):
                    problems.append(f"{label}: loadgen: {result['error']}")
                if result.get("violationCount"):
                    problems.append(f"{label}: {result['violationCount']} violations of"
                                    f" exactly-once, in-order delivery: {result['violations']}")
                runs.append({"round": round_no, "scenario": scenario, "size": size,
                             "server": kind, "result": result})
                print(f"bench: {label}: {_one_line(scenario, result)}", file=sys.stderr,
                      flush=True)

    meta["seconds"] = time.monotonic() - t0
    if export is not None:
        export.cleanup()
    return write_outputs(runs, meta, plan, problems, args, json_path, plot_path)


def write_outputs(runs: list[Json], meta: Json, plan: Plan, problems: list[str],
                  args: argparse.Namespace, json_path: Path | None, plot_path: Path) -> int:
    """Summarize, print the tables, write the JSON, the plot and the docs; the exit status."""
    summary = summarize(runs, plan)
    violations = sum(int(r["result"].get("violationCount") or 0) for r in runs)
    command = " ".join(["python bench/fanout.py", *meta["argv"]])
    out: Json = {"ok": not problems, "meta": meta, "summary": summary,
                 "capped": flagged(summary, "capped"),
                 "contended": flagged(summary, "contended"), "violations": violations,
                 "problems": problems, "runs": runs}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=1) + "\n")
    if not args.no_plot:
        plot(summary, plan, plot_path, meta)
    if args.write_docs:
        write_docs(doc_section(summary, plan, meta, command))

    print(tables(summary, plan))
    print()
    print(f"delivery: {violations} violations of exactly-once, in-order delivery"
          f" in {len(runs)} measurements")
    print(f"relay: {meta['relay_source']}")
    written = [str(p) for p in (json_path, None if args.no_plot else plot_path) if p]
    if args.write_docs:
        written.append(str(DOC))
    print(f"written: {', '.join(written) or 'nothing'}")
    print(f"run time: {meta['seconds']:.0f} s")
    if problems:
        print(f"\nFAILED: {len(problems)} problems:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


def _one_line(scenario: str, r: Json) -> str:
    if r.get("error"):
        return f"ERROR {r['error']}"
    bits = []
    if scenario == "fanout":
        t, lat = r.get("throughput", {}), r.get("latency", {}).get("latency", {})
        bits.append(f"{t.get('framesPerS', 0):,.0f} frames/s")
        bits.append(f"{t.get('serverCpuPerFrameUs') or 0:.1f} µs CPU/frame")
        bits.append(f"p50 {lat.get('p50Ms') or 0:.2f} ms p99 {lat.get('p99Ms') or 0:.2f} ms")
        bits.append(f"loadgen {t.get('loadgenCpuShare', 0):.0%}")
        bits.append(f"other {t.get('otherCpuShare', 0):.0%}")
    else:
        c, m = r.get("connect", {}), r.get("memoryPerConnection", {})
        bits.append(f"{c.get('ratePerS', 0):,.0f} conn/s")
        bits.append(f"{m.get('rssKiB', 0):.1f} KiB RSS/conn")
        bits.append(f"broadcast {r.get('broadcast', {}).get('allMs') or 0:.1f} ms")
        bits.append(f"loadgen {c.get('loadgenCpuShare', 0):.0%}")
        bits.append(f"other {c.get('otherCpuShare', 0):.0%}")
    if r.get("violationCount"):
        bits.append(f"{r['violationCount']} VIOLATIONS")
    return ", ".join(bits)


if __name__ == "__main__":
    sys.exit(main())
