"""A real `redis-server` for the tests: on a free loopback port, in a temp dir, without
persistence, so that a restart comes back empty as an unpersisted Redis would.

`RedisServer` starts it and waits until it answers PING; a test can `stop`, `kill` (SIGKILL),
`freeze`/`thaw` (SIGSTOP/SIGCONT) and `restart` it on the same port (empty, or with what an
explicit SAVE wrote). The `redis_server`
fixture gives one and kills it afterwards, whatever the test did. Without the binary the tests
that ask for it skip with the reason; on CI (``$CI`` set) they fail instead, since CI installs
it (.ci/run).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

WAIT = 10.0  # bound on waiting for the server; it starts in a few milliseconds


def find_redis_server() -> str:
    """The path of `redis-server`; skips the test without it (fails it on CI)."""
    found = shutil.which("redis-server")
    if found is None:
        reason = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must have it (.ci/run installs it)")
        pytest.skip(reason)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def answers_ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis on ``port`` answers PING within ``timeout`` (RESP inline command; one
    that wants a password answers NOAUTH, which is an answer too)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process on a fixed port; `restart` brings a new, empty one there."""

    def __init__(self, binary: str, directory: Path, password: str | None = None) -> None:
        self.binary = binary
        self.password = password
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def start(self, keep_data: bool = False) -> None:
        """Start it and wait until it answers; empty unless ``keep_data`` (then it loads
        what a SAVE wrote before, as a Redis with snapshots would)."""
        assert self.process is None, "already running"
        if not keep_data:
            (self.directory / "dump.rdb").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--logfile", str(self.directory / "redis.log"),
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            # Another process: nothing to wait on but its answer, so poll it, bounded.
            deadline = time.monotonic() + WAIT
            while not answers_ping(self.port):
                if self.process.poll() is not None:
                    log = (self.directory / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited at start: {log[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer PING within {WAIT}s")
                time.sleep(0.005)
        except BaseException:
            self.kill()
            raise

    def _end(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        if self.frozen and sig != signal.SIGKILL:
            self.thaw()  # a stopped process would not act on SIGTERM
        self.process.send_signal(sig)
        self.process.wait(timeout=WAIT)
        self.process = None
        self.frozen = False

    def stop(self) -> None:
        """Shut it down cleanly (SIGTERM); it saves nothing."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Kill it at once (SIGKILL): connections drop, everything in it is lost."""
        self._end(signal.SIGKILL)

    def restart(self, keep_data: bool = False) -> None:
        """Kill it and start a new one on the same port: empty, unless ``keep_data``."""
        self.kill()
        self.start(keep_data)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.frozen = False


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running `redis-server` of this test alone, killed afterwards."""
    binary, directory = find_redis_server(), tmp_path_factory.mktemp("redis")
    for attempt in range(3):
        server = RedisServer(binary, directory)
        try:
            server.start()
            break
        except RuntimeError:  # the free port was taken meanwhile: another one
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        server.kill()
