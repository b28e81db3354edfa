"""Every program in docs/embedding.md, and the README's embedding example, runs as a user would
run it: saved to a file and started with Python, from the repository root (real time, each
run bounded). A new example must be added here, or the count check fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
EMBEDDING = ROOT / "docs" / "embedding.md"
README = ROOT / "README.md"
TIMEOUT = 60.0  # each takes a second or two; this only bounds a hang
SERVING = re.compile(r"serving ws://127\.0\.0\.1:(\d+)/ws")


def _blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(encoding="utf-8"),
                      flags=re.MULTILINE | re.DOTALL)


EXAMPLES = _blocks(EMBEDDING)


def _example(marker: str) -> str:
    [code] = [code for code in EXAMPLES if marker in code]
    return code


def _run(code: str, tmp_path: Path, *args: str) -> str:
    program = tmp_path / "example.py"
    program.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(program), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_example_is_run_here() -> None:
    # Opening, serving, listening, acting as the host, scaling out, configuration, gc,
    # logging, a backend, a test: ten. A new one needs its test below.
    assert len(EXAMPLES) == 10
    assert len([b for b in _blocks(README) if "open_relay" in b]) == 1


def _check_served(out: str) -> None:
    assert SERVING.search(out), out
    assert out.splitlines()[-1] == "stopped"


def test_the_readme_example(tmp_path: Path) -> None:
    [code] = [b for b in _blocks(README) if "open_relay" in b]
    out = _run(code, tmp_path)
    _check_served(out)
    assert "'content': 'Echo: hello from the host'" in out  # the agent's answer, stored


def test_opening_serves_until_a_signal(tmp_path: Path) -> None:
    code = _example("open_signal_receiver")
    program = tmp_path / "example.py"
    program.write_text(code, encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(program)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        port = SERVING.search(first)
        assert port, first
        _check_auth(int(port.group(1)))
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert out.splitlines() == ["stopped"]


def _check_auth(port: int) -> None:
    """A client signs in on the printed port (the relay really serves there)."""
    from trio_relay.testing import open_loopback_client

    async def sign_in() -> Any:
        async with open_loopback_client(f"ws://127.0.0.1:{port}/ws") as ws:
            return await ws.request("auth", pin="482913")

    assert trio.run(sign_in)["type"] == "auth_success"


def test_serving_all_ways_with_and_without_tls(tmp_path: Path) -> None:
    code = _example("serve_listeners")
    plain = _run(code, tmp_path).splitlines()
    assert [line.split(":")[0] for line in plain] == [
        "start_serving", "serve", "serve_listeners", "stopped"]
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = _run(code, tmp_path, str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    assert "start_serving with TLS: wss://127.0.0.1:" in tls


def test_listening_and_acting_as_the_host(tmp_path: Path) -> None:
    listened = _run(_example('print("answer:"'), tmp_path)
    _check_served(listened)
    assert "answer: Echo: hello from the host" in listened
    acted = _run(_example("stopped an answer"), tmp_path)
    _check_served(acted)
    assert "created Ideas answered by echo" in acted
    assert "created Quick answered by echo-fast" in acted
    assert "stopped an answer: True" in acted  # the echo agent was answering the send


def test_two_relays_on_one_bus(tmp_path: Path) -> None:
    out = _run(_example("LocalBus()"), tmp_path)
    _check_served(out)
    assert "relay b got: sent on relay a" in out


def test_configuration_gc_and_logging(tmp_path: Path) -> None:
    configured = _run(_example("RelayConfig("), tmp_path)
    _check_served(configured)
    assert "with auth_timeout 30.0" in configured
    _run(_example("gc.freeze()"), tmp_path)
    _run(_example('logger.enable("trio_relay")'), tmp_path)


def test_the_backend_of_its_own(tmp_path: Path) -> None:
    out = _run(_example("class NotesBackend"), tmp_path)
    _check_served(out)
    assert "1 buy milk {'name': 'Host'}" in out


def test_the_testing_example() -> None:
    namespace: dict[str, Any] = {}
    code = _example("async def test_")
    exec(compile(code, str(EMBEDDING), "exec"), namespace)
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(namespace["test_a_send_reaches_every_subscriber"], clock, clock=clock)


def test_no_example_hard_codes_a_port() -> None:
    for code in [*EXAMPLES, *_blocks(README)]:
        assert "8765" not in code, code
        assert os.sep == "/"  # (paths in the examples are POSIX ones)
