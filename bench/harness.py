"""What bench/fanout.py and bench/soak.py share: the tools, the servers, the load generator.

Not a command. The servers are started as subprocesses, one per measurement:

- ``relay``: ``python -m trio_relay serve --config bench/relay-bench.toml --port 0
  --data-dir <a fresh temporary directory>``, the PIN in ``TRIO_RELAY_PIN``; any build of the
  relay that has that command and prints ``serving ws://...`` works (``--relay-src``,
  ``--relay-rev`` pick another checkout or commit);
- ``asyncio``: ``bench/baseline_asyncio.py`` with its SQLite file in a fresh directory.

The load generator is ``bench/loadgen/loadgen.mjs`` (Node, ``ws`` from the committed lock
file; ``npm ci`` runs when ``node_modules`` is missing or stale).
"""

from __future__ import annotations

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
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN = BENCH / "loadgen"
RESULTS = BENCH / "results"
RELAY_CONFIG = BENCH / "relay-bench.toml"
PIN = "bench-pin-1234"
SERVERS = ("relay", "asyncio")
LABELS = {"relay": "relay", "asyncio": "asyncio websockets"}
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 20.0

Json = dict[str, Any]


class BenchError(Exception):
    """The benchmark cannot run (a missing tool, a server that does not start)."""


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
            "the benchmark needs Node.js 18+ and npm for its load generator: install them"
            " (Debian: apt-get install nodejs npm); the command runs `npm ci` in"
            " bench/loadgen itself"
        )
    if importlib.util.find_spec("websockets") is None:
        raise BenchError(
            "the benchmark needs the websockets package for its asyncio baseline:"
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

    def __init__(self, kind: str, cpus: set[int] | None, relay_src: Path | None,
                 settings: dict[str, str] | None = None, data_dir: Path | None = None) -> None:
        self.kind = kind
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{kind}-")
        tmp = Path(self._tmp.name)
        self.log_path = tmp / "stderr.log"
        env = dict(os.environ)
        cwd = ROOT
        if kind == "relay":
            # data_dir: one that several relays share (bench/scaleout.py); else its own.
            argv = [sys.executable, "-m", "trio_relay", "serve", "--config", str(RELAY_CONFIG),
                    "--port", "0", "--data-dir", str(data_dir or tmp / "data")]
            # The config file says everything; nothing from this shell's environment.
            env = {k: v for k, v in env.items() if not k.startswith("TRIO_RELAY_")}
            env["TRIO_RELAY_PIN"] = PIN
            env.update({f"TRIO_RELAY_{k.upper()}": v for k, v in (settings or {}).items()})
            if relay_src is not None:
                env, cwd = relay_env(relay_src, env)
        else:
            argv = [sys.executable, str(BENCH / f"baseline_{kind}.py"), "--port", "0",
                    "--pin", PIN, "--data-dir", str(tmp / "data")]
        self._log = self.log_path.open("w")
        self._drainer: threading.Thread | None = None
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd,
        )
        _pin(self.process.pid, cpus)
        self.url = self._wait_for_url()
        # The relay answers plain HTTP (/metrics, /healthz) on the same port.
        self.http_url = re.sub(r"^ws://([^/]+).*$", r"http://\1", self.url)

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
            "modelProfileId": "silent", "quiet": quiet,
            "metricsUrl": f"{server.http_url}/metrics"}
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



def machine_busy_share(seconds: float) -> float:
    """The share of a core that the machine is busy over ``seconds`` (before starting)."""

    def busy() -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    before = busy()
    time.sleep(seconds)
    return (busy() - before) / seconds

