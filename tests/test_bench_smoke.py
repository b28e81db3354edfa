"""Smoke test of the benchmark (bench/fanout.py, docs/performance.md): its real command at tiny
scale (3 subscribers, acknowledged sends for a second, 20 connections, a soak of 240 cycles)
against the relay and the asyncio baseline.

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
# npm ci on a fresh checkout takes a few seconds; the run itself about 15.
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
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fanout.py"), "--quick", "--json", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output

    # The report came out: the command, the targets with their verdicts, the tables, the JSON.
    assert "command: python bench/fanout.py --quick" in done.stdout, output
    assert "**The targets**" in done.stdout, output
    for target in ("bytes per idle subscribed connection", "connect + auth + subscribe rate",
                   "server CPU per delivered frame", "p99 latency, send to receipt",
                   "soak: RSS after 200 more cycles / after a 40-cycle warm-up",
                   "soak: /metrics gauges after the last cycle | every gauge back at idle"):
        assert target in done.stdout, output
    assert "Fan-out to N subscribers, acknowledged sends" in done.stdout, output
    assert "K subscribed connections" in done.stdout, output
    assert "loadgen CPU (% of a core)" in done.stdout, output
    assert "0 violations of exactly-once, in-order delivery" in done.stdout, output
    report = json.loads(results.read_text())

    assert report["ok"] is True, report["problems"]
    assert report["problems"] == []
    assert report["violations"] == 0
    runs = report["runs"]
    assert {(r["scenario"], r["server"]) for r in runs} == {
        (scenario, server)
        for scenario in ("fanout", "connections")
        for server in ("relay", "asyncio")
    }
    for run in runs:
        result = run["result"]
        assert "error" not in result, result
        assert result["violationCount"] == 0, result["violations"]
        # The loadgen checked every push of every subscriber as it came (exactly once, in
        # seq order) and that every send was acknowledged; here, that there were pushes to
        # check, each one message, and that the publisher waited for each acknowledgement.
        assert result["sends"] > 0
        assert result["otherPushes"] == 0
        if run["scenario"] == "fanout":
            assert result["subscribers"] == 3
            send = result["send"]
            assert send["ackPaced"] is True
            assert send["sends"] > 0
            assert send["frames"] == 3 * send["sends"]
            assert send["latency"]["samples"] == 3 * send["sends"]
            assert send["serverCpuPerFrameUs"] > 0
            assert send["loadgenCpuShare"] > 0
        else:
            assert result["subscribers"] == 20
            assert result["broadcast"]["latency"]["samples"] == 20
            assert result["memoryPerConnection"]["rssKiB"] is not None
            assert result["connect"]["ratePerS"] > 0

    # The soak ran every cycle of every kind against the relay and found it back at idle.
    soak = report["soak"]
    assert soak["timedOut"] is False
    assert soak["errors"] == 0, soak["errorSamples"]
    assert soak["warmupRun"]["cycles"] + soak["run"]["cycles"] == 240
    assert set(soak["kinds"]) == {"clean-close", "drop-before-auth", "drop-after-subscribe",
                                  "drop-mid-send"}
    assert sum(soak["kinds"].values()) == 240
    assert soak["final"]["notIdle"] == []
    assert soak["idle"]["gauges"]["connections"] == soak["final"]["gauges"]["connections"] == 1
    assert soak["rssRatio"] > 0
