"""The web client's pure modules, unit-tested with Node's own test runner (tests/js/).

The page's state is kept by pure functions (trio_relay/web/state.js); their tests run
without a browser, in `node --test`. This test runs them, so that the README's test
command does; their output is the failure message.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _js import node

JS_TESTS = Path(__file__).parent / "js"
REPO = Path(__file__).resolve().parent.parent


def test_the_web_clients_state_passes_its_node_tests() -> None:
    # Files named one by one: how `node --test` reads a directory changed across versions.
    files = sorted(str(path.relative_to(REPO)) for path in JS_TESTS.glob("*.test.mjs"))
    assert files, f"no *.test.mjs in {JS_TESTS}"
    result = subprocess.run(
        [node(), "--test", *files],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    if result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}"
        pytest.fail(f"node --test failed ({result.returncode}):\n{output}", pytrace=False)
