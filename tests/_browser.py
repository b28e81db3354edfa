"""Helpers for the real-browser tests (tests/test_browser.py): the relay as a subprocess,
and where to find Chromium and Playwright.

Everything here is synchronous: Playwright's sync API drives the browser from plain test
functions, outside Trio.
"""

from __future__ import annotations

import importlib.util
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

#: Chromium from the distribution (`apt-get install chromium`); never Playwright's download.
CHROMIUM = os.environ.get("TRIO_RELAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

#: Headless, and nothing that would reach for the network on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

STARTUP_TIMEOUT = 20.0  # the relay prints its URL within a second or two
STOP_TIMEOUT = 10.0  # shutdown_timeout (5 s) plus a margin

INSTALL_HINT = (
    "install Chromium (`apt-get install chromium`) and Playwright (`pip install -e '.[test]'`)"
)


def browser_problem() -> str | None:
    """Why the browser tests cannot run here, or None if they can."""
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM}"
    return None


class RelayProcess:
    """`python -m trio_relay serve` in a subprocess, on loopback; stdout gives its port.

    Its log (stderr) goes to ``<data_dir>/../relay-<n>.log``, so a failing test can show it.
    """

    def __init__(self, data_dir: Path, pin: str, *extra_args: str) -> None:
        self.data_dir = data_dir
        self.pin = pin
        self.extra_args = extra_args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._starts = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, port: int | None = None) -> None:
        """Start the relay, on ``port`` (default: the port it had, or any free one)."""
        assert self.process is None, "already running"
        if port is not None:
            self.port = port
        self._starts += 1
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-relay-{self._starts}.log"
        command = [
            sys.executable, "-m", "trio_relay", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra_args,
        ]
        env = {**os.environ, "TRIO_RELAY_PIN": self.pin}  # not on the command line
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
            )
        try:
            first = self._read_line()
            prefix = "trio-relay serving ws://127.0.0.1:"
            if not first.startswith(prefix):
                raise RuntimeError(f"unexpected first line {first!r}")
            self.port = int(first[len(prefix):].split("/")[0])
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _read_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        deadline = time.monotonic() + STARTUP_TIMEOUT
        line = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise RuntimeError(f"the relay printed no URL; its log: {self.log()}")
                byte = os.read(stdout.fileno(), 1)
                if not byte:
                    raise RuntimeError(f"the relay exited; its log: {self.log()}")
                line += byte
        return line.decode().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Stop the relay with ``signum`` and wait; returns its exit status."""
        process, self.process = self.process, None
        assert process is not None, "not running"
        try:
            if process.poll() is None:
                process.send_signal(signum)
            try:
                return process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
        finally:
            if process.stdout is not None:
                process.stdout.close()

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            self.stop()
