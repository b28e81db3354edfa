"""Smoke test of the fan-out benchmark (bench/fanout.py, docs/performance.md): its real command
at tiny scale (3 subscribers, a few dozen pushes, 20 connections) against all three servers.

It needs Node.js with npm (the command runs `npm ci` in bench/loadgen itself) and the
websockets package. Without them it is skipped, saying how to install them, unless the
environment variable CI is set: then it fails, so that CI cannot pass without running it.
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
# npm ci on a fresh checkout takes a few seconds; the run itself well under 20.
TIMEOUT = 180


def _missing() -> list[str]:
    missing = []
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing.append("Node.js 18+ with npm (Debian: apt-get install nodejs npm)")
    if importlib.util.find_spec("websockets") is None:
        missing.append("the websockets package (pip install -e '.[bench]')")
    return missing


def test_quick_bench_delivers_every_push_once_in_order(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        message = "the benchmark smoke test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is not skipped)")
        pytest.skip(message)
    results = tmp_path / "quick.json"
    plot = tmp_path / "quick.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fanout.py"), "--quick", "--json", str(results),
         "--plot", str(plot)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output

    # The report came out: the tables on stdout, the JSON, the plot (if matplotlib is here).
    assert "Fan-out to N subscribers" in done.stdout, output
    assert "K subscribed connections" in done.stdout, output
    assert "0 violations of exactly-once, in-order delivery" in done.stdout, output
    report = json.loads(results.read_text())
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 0

    assert report["ok"] is True, report["problems"]
    assert report["problems"] == []
    assert report["violations"] == 0
    runs = report["runs"]
    assert {(r["scenario"], r["server"]) for r in runs} == {
        (scenario, server)
        for scenario in ("fanout", "connections")
        for server in ("relay", "trio", "asyncio")
    }
    for run in runs:
        result = run["result"]
        assert "error" not in result, result
        assert result["violationCount"] == 0, result["violations"]
        # The loadgen checked every push of every subscriber as it came (exactly once, in
        # seq order); here, that there were pushes to check, and each was one message.
        assert result["sends"] > 0
        assert result["otherPushes"] == 0
        if run["scenario"] == "fanout":
            assert result["subscribers"] == 3
            assert result["throughput"]["frames"] == 3 * result["throughput"]["sends"] > 0
            assert result["latency"]["latency"]["samples"] == 3 * result["latency"]["sends"]
        else:
            assert result["subscribers"] == 20
            assert result["broadcast"]["latency"]["samples"] == 20
            assert result["memoryPerConnection"]["rssKiB"] is not None
    fanout = report["summary"]["fanout"]["3"]
    for server in ("relay", "trio", "asyncio"):
        assert fanout["frames_per_s"][server]["median"] > 0
