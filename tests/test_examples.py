"""The examples run: as a user runs them (a subprocess from the repository root) and in-process.

Real sockets and real time, each run bounded."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_HOST = ROOT / "examples" / "embedded_host.py"
ANSWER = "web: streamed answer: 'You said: hello relay'"
TIMEOUT = 30.0  # the example takes well under a second; this only bounds a hang


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_host_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, str(EMBEDDED_HOST.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert ANSWER in lines, result.stdout
    # The host's listener saw the same stream as the web client, the answer included.
    assert any(line.startswith("host: seq ") and line.endswith(" message") for line in lines)
    assert lines[-1] == "done"


async def test_embedded_host_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    example = _load(EMBEDDED_HOST)
    with trio.fail_after(TIMEOUT):
        await example.main()
    out = capsys.readouterr().out
    assert ANSWER in out.splitlines()
    assert "relay: idle again: RelayStatistics(connections=0" in out
