"""A real PostgreSQL server for the tests: started in a temp dir on a free port, stopped after.

The system's own binaries run it (``initdb`` and ``postgres``, from PATH or
/usr/lib/postgresql/*/bin). initdb refuses to run as root, and CI runs as root: then the server
runs as the unprivileged system user ``trio-relay-test`` (created when missing), which owns
the temp dir. Its unix socket is in the temp dir too; the tests connect over TCP on loopback,
as a relay on another machine would.

`postgres_server` (session-scoped) starts one server for the whole run; `postgres_dsn` gives
each test a fresh database of its own (CREATE DATABASE), so tests stay independent. Without
the binaries the tests skip with the reason, except under CI (the env var ``CI`` set), where
a missing server is a failure: .ci/run installs it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "find_binary", "postgres_dsn", "postgres_server"]

USER = "trio-relay-test"
START_TIMEOUT = 30.0  # initdb plus the first start take ~2 s here


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")

    def version(path: str) -> int:
        number = Path(path).parts[-3]
        return int(number) if number.isdigit() else 0

    candidates.sort(key=version)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> pwd.struct_passwd | None:
    """None when not root (run as ourselves); else the test user, created if missing."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(USER)


def _alive(pid: int) -> bool:
    """Whether a process runs; a zombie (dead, not yet reaped) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class PostgresServer:
    """One PostgreSQL server in its own temp dir; `dsn` names a database on it."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user = _unprivileged_user()
        self.dir = Path(tempfile.mkdtemp(prefix="trio-relay-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C"])

    def _as_user(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, cwd=self.dir, **self._as_user())  # type: ignore[call-overload]
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.decode(errors='replace')}")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        assert self.process is None, "already running"
        log = open(self.log, "ab")  # noqa: SIM115 - the server writes it until it stops
        try:
            # Durability is not what these tests are about: no fsync keeps them fast.
            self.process = subprocess.Popen(  # type: ignore[call-overload]
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-k", str(self.dir), "-c", f"listen_addresses={self.host}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                start_new_session=True, **self._as_user(),
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        # Another process's readiness sends no event: poll it, bounded.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log.read_text()[-2000:]}")
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not accept connections:\n{self.log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def _pids(self) -> list[int]:
        """The postmaster and its children (each child is in a session of its own)."""
        if self.process is None or self.process.poll() is not None:
            return []
        pids = [self.process.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                pids.append(int(stat.parent.name))
        return pids

    def _signal(self, signum: int) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, the data is kept."""
        if self.process is None:
            return
        self._signal(signal.SIGCONT)  # a frozen server could not shut down
        self._signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL to the server and every backend process of it (a crash)."""
        if self.process is None:
            return
        children = self._pids()[1:]
        self._signal(signal.SIGKILL)
        self.process.wait()
        self.process = None
        # Its children are killed too; the next start needs them gone (shared memory).
        deadline = time.monotonic() + START_TIMEOUT
        while any(_alive(pid) for pid in children):
            if time.monotonic() > deadline:
                raise RuntimeError("postgres children did not exit")
            time.sleep(0.01)

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open and nothing answers."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """Stop the server and remove its directory, whatever state it is in."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole test run."""
    try:
        import psycopg  # noqa: F401
    except ImportError:  # pragma: no cover - the test extra installs it
        if os.environ.get("CI"):
            raise
        pytest.skip("psycopg is not installed (pip install -e '.[test]')")
    found = {name: find_binary(name) for name in ("initdb", "postgres")}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        reason = (
            f"PostgreSQL's {' and '.join(missing)} not found on PATH nor in"
            " /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests")
        pytest.skip(reason)
    postgres = found["postgres"]
    assert postgres is not None
    server = PostgresServer(Path(postgres).resolve().parent)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database of its own for one test."""
    if postgres_server.process is None:  # a test that stopped it and failed before restarting
        postgres_server.start()
    postgres_server.thaw()
    name = postgres_server.create_database()
    try:
        yield postgres_server.dsn(name)
    finally:
        postgres_server.thaw()
        if postgres_server.process is None:
            postgres_server.start()
        postgres_server.drop_database(name)
