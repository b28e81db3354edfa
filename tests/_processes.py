"""Helpers for tests that check agent processes are gone (shared by the agent tests)."""

from __future__ import annotations

import os
from pathlib import Path

import trio

WAIT = 10.0  # bound on any single wait; the tests take a fraction of it


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
    with trio.fail_after(WAIT):
        while any(alive(pid) for pid in pids):  # noqa: ASYNC110 - polls other processes
            await trio.sleep(0.02)
