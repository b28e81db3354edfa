"""Helpers for tests that run subprocesses: agents, and `trio-relay serve` itself."""

from __future__ import annotations

import os
from pathlib import Path

import trio

WAIT = 10.0  # bound on any single wait; the tests take a fraction of it

# An agent that starts a child (in its process group), writes "<its pid> <child's pid>" to
# $PIDS, says so, and hangs. With $IGNORE_TERM both ignore SIGTERM, so only SIGKILL stops them.
HANGING = """
import os, signal, subprocess, sys, time
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(os.environ["PIDS"] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(os.environ["PIDS"] + ".tmp", os.environ["PIDS"])
sys.stdout.write("started\\n"); sys.stdout.flush()
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Whether a process is running; a zombie (dead, not yet reaped by init) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


async def wait_gone(pids: list[int]) -> None:
    # Another process's exit sends no event here: poll it, bounded.
    with trio.fail_after(WAIT):
        while any(alive(pid) for pid in pids):  # noqa: ASYNC110 - polls other processes
            await trio.sleep(0.02)


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    """The next line of a subprocess's output (``buffer`` keeps what came after it)."""
    with trio.fail_after(WAIT):
        while b"\n" not in buffer:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"relay exited early; output so far: {bytes(buffer)!r}")
            buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def wait_for_file(path: Path) -> None:
    # Written by another process, which sends no event here: poll for it, bounded.
    with trio.fail_after(WAIT):
        while not await trio.Path(path).exists():  # noqa: ASYNC110 - written by another process
            await trio.sleep(0.01)
