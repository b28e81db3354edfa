"""docs/testing.md's examples run as a user runs them: ``pytest examples/testing`` in a
subprocess from the repository root, its fixtures coming from the installed trio-relay through
the ``pytest11`` entry point (no conftest.py, no ``-p`` option), and the page quotes each
example file whole."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "testing"
DOC = ROOT / "docs" / "testing.md"
TIMEOUT = 120.0  # the run takes about a second; this only bounds a hang


def _example_files() -> list[Path]:
    files = sorted(EXAMPLES.glob("test_*.py"))
    assert files, "no examples"
    return files


def _count_tests(path: Path) -> int:
    """Test functions and methods (no example is parametrized)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return sum(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
        for node in ast.walk(tree)
    )


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    # Whatever the caller's environment says, plugins load as they would for a user.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )


def test_there_is_no_conftest_to_provide_the_fixtures() -> None:
    assert not list(EXAMPLES.glob("conftest.py"))
    assert not (ROOT / "examples" / "conftest.py").exists()
    assert not (ROOT / "conftest.py").exists()


def test_the_examples_pass_with_the_plugin_from_its_entry_point() -> None:
    result = _pytest("examples/testing")
    assert result.returncode == 0, result.stdout + result.stderr
    plugins = next(line for line in result.stdout.splitlines() if line.startswith("plugins:"))
    assert "trio-relay-" in plugins, plugins  # loaded as the trio-relay distribution's plugin
    expected = sum(_count_tests(path) for path in _example_files())
    assert re.search(rf"\b{expected} passed in ", result.stdout), result.stdout
    assert " skipped" not in result.stdout and " warning" not in result.stdout


def test_without_the_plugin_the_fixtures_are_missing() -> None:
    """The control: the fixtures come from that entry point and nowhere else."""
    result = _pytest("-p", "no:trio_relay", "examples/testing")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fixture 'relay_client' not found" in result.stdout


def test_the_page_quotes_each_example_whole() -> None:
    page = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", page, flags=re.MULTILINE | re.DOTALL)
    for path in _example_files():
        assert path.read_text(encoding="utf-8") in blocks, f"{path.name} is not quoted whole"
        assert f"examples/testing/{path.name}" in page
