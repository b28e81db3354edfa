"""ws-link.js, the web client's wire protocol, on its own in Node: the scenarios that
tests/test_browser.py also runs in a page, over a scripted fake WebSocket (tests/_js.py
says what each checks). Here they need no browser, only `node`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _js import PAIRING, ROUTING, check_pairing, check_routing, node

TESTS = Path(__file__).resolve().parent
RUNNER = TESTS / "js" / "run_scenario.mjs"


@pytest.mark.parametrize(
    ("scenario", "check"),
    [(ROUTING, check_routing), (PAIRING, check_pairing)],
    ids=["routes-times-out-and-resumes", "pairs-and-never-retries-a-refusal"],
)
def test_ws_link_scenario_in_node(scenario: Path, check: Callable[[dict[str, Any]], None]) -> None:
    result = subprocess.run(
        [node(), str(RUNNER), str(scenario)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}"
        pytest.fail(f"{scenario.name} failed in node:\n{output}", pytrace=False)
    check(json.loads(result.stdout))
