"""Smoke test of the scale-out benchmark (bench/scaleout.py, docs/scaling.md): its real command
at tiny scale (4 subscribers, acknowledged sends for a second) in its three setups: one relay
without a broker, one relay on Redis, two relays on Redis sharing a data dir.

It needs Node.js with npm (the command runs `npm ci` in bench/loadgen itself), the websockets
package, coredis and `redis-server`. Without them it is skipped, saying how to install them,
unless the environment variable CI is set: then it fails, so that CI cannot pass without
running it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# npm ci on a fresh checkout takes a few seconds; the run itself about 10.
TIMEOUT = 180


def _missing() -> list[str]:
    missing = []
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing.append("Node.js 18+ with npm (Debian: apt-get install nodejs npm)")
    if importlib.util.find_spec("websockets") is None:
        missing.append("the websockets package (pip install -e '.[bench]')")
    if importlib.util.find_spec("coredis") is None:
        missing.append("coredis (pip install -e '.[redis]')")
    if shutil.which("redis-server") is None:
        missing.append("redis-server (Debian: apt-get install redis-server)")
    return missing


def test_quick_scaleout_bench_delivers_every_push_in_every_setup(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        message = "the scale-out benchmark smoke test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is not skipped)")
        pytest.skip(message)
    results = tmp_path / "quick.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scaleout.py"), "--quick", "--json", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output

    assert "command: python bench/scaleout.py --quick" in done.stdout, output
    assert "| in-process | redis x1 | redis x2 | redis x1 / in-process |" in done.stdout, output
    assert "0 violations of exactly-once, in-order delivery in 3 measurements" in done.stdout
    report = json.loads(results.read_text())
    assert report["ok"] is True, report["problems"]
    runs = {run["setup"]: run for run in report["runs"]}
    assert set(runs) == {"inproc", "redis1", "redis2"}
    for setup, run in runs.items():
        result, figures = run["result"], run["figures"]
        assert "error" not in result, result
        assert result["violationCount"] == 0, result["violations"]
        assert result["subscribers"] == 4
        send = result["send"]
        assert send["ackPaced"] is True
        assert send["sends"] > 0
        # Every subscriber had every push, wherever it was connected.
        assert send["frames"] == 4 * send["sends"]
        assert send["latency"]["samples"] == 4 * send["sends"]
        assert len(result["relayPids"]) == (2 if setup == "redis2" else 1)
        if setup == "inproc":
            assert "redis" not in send
            assert figures["redis_us_per_frame"] is None
        else:
            # Redis's INFO was read at the edges of the window: each message went through
            # the publish script once (one XADD each), in at least one EVALSHA.
            commands = send["redis"]["commands"]
            assert commands["xadd"]["calls"] == send["sends"], commands
            assert 1 <= commands["evalsha"]["calls"] <= send["sends"], commands
            assert figures["events_per_evalsha"] >= 1
            assert figures["lua_us_per_event"] > 0
