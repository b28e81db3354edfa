"""The commands of `trio_relay._settings.cli` around pairing, as a user runs them: ``pin``,
``devices``, ``--version``, and ``serve`` keeping its PIN and devices across restarts (real
subprocesses, real time). Settings and their errors are in test_settings.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _helpers import Frame
from _processes import read_line

from trio_relay._server.pairing import PAIRING_FILE, FileDeviceStore
from trio_relay._settings.cli import main
from trio_relay.testing import open_loopback_client

WAIT = 20.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_")}
    return {**env, **extra}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trio_relay", *args], capture_output=True,
                          text=True, timeout=WAIT, env=env or _env(), check=False)


# --- pin, devices, --version (in process) -----------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"trio-relay {version('trio-relay')}\n"


def test_pin_prints_the_kept_pin_and_new_replaces_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRIO_RELAY_DATA_DIR", raising=False)
    data = tmp_path / "data"
    assert main(["pin", "--data-dir", str(data)]) == 0
    pin = capsys.readouterr().out.strip()
    assert len(pin) == 6 and pin.isdigit()
    assert main(["pin", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == pin
    store = FileDeviceStore(data / PAIRING_FILE)
    _, token = store.pair("Phone")
    assert main(["pin", "--new", "--data-dir", str(data)]) == 0
    captured = capsys.readouterr()
    new = captured.out.strip()
    assert new != pin and len(new) == 6  # (a repeat is one chance in a million)
    assert "stay paired" in captured.err
    assert FileDeviceStore(data / PAIRING_FILE).verify(token) is not None
    # The data dir may come from the environment, as for serve.
    monkeypatch.setenv("TRIO_RELAY_DATA_DIR", str(data))
    assert main(["pin"]) == 0
    assert capsys.readouterr().out.strip() == new


def test_devices_lists_and_revokes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path)
    assert main(["devices", "--data-dir", data]) == 0
    assert capsys.readouterr().out == "No paired devices.\n"
    store = FileDeviceStore(tmp_path / PAIRING_FILE)
    phone, _ = store.pair("Firefox on Android")
    twin_a, _ = store.pair("Laptop")
    twin_b, _ = store.pair("Laptop")
    assert main(["devices", "--data-dir", data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "PAIRED", "LAST", "SEEN"]
    assert lines[1].startswith(f"{phone.id}  Firefox on Android  {phone.created}  ")
    assert lines[1].endswith(phone.last_seen)
    assert len(lines) == 4
    # By name.
    assert main(["devices", "--data-dir", data, "--revoke", "Firefox on Android"]) == 0
    assert capsys.readouterr().out.startswith(f"Revoked {phone.id} (Firefox on Android)")
    # An ambiguous name is refused, naming the ids; an id is not.
    assert main(["devices", "--data-dir", data, "--revoke", "Laptop"]) == 1
    err = capsys.readouterr().err
    assert "2 devices are named 'Laptop'" in err and twin_a.id in err and twin_b.id in err
    assert main(["devices", "--data-dir", data, "--revoke", twin_b.id]) == 0
    assert main(["devices", "--data-dir", data, "--revoke", "nobody"]) == 1
    assert "no paired device has the id or name 'nobody'" in capsys.readouterr().err
    assert [d.id for d in FileDeviceStore(tmp_path / PAIRING_FILE).devices()] == [twin_a.id]


def test_a_broken_pairing_file_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / PAIRING_FILE).write_text("{")
    assert main(["devices", "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"trio-relay: {tmp_path / PAIRING_FILE}: not a pairing file: invalid JSON\n")


# --- serve (subprocesses) ---------------------------------------------------------------------


@pytest.mark.e2e
def test_a_busy_port_is_one_clear_line_and_creates_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        result = _run("serve", "--port", str(port), "--data-dir", str(data))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"trio-relay: 127.0.0.1:{port} is already in use; choose another with --port")
    assert not data.exists()


@pytest.mark.e2e
def test_version_as_a_command() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("trio-relay ")


@asynccontextmanager
async def _serve(data: Path, **env: str) -> AsyncIterator[tuple[str, str]]:
    """``trio-relay serve`` in a subprocess; yields its URL and the PIN line; stops it with
    SIGTERM after the block, which must exit 0."""
    command = [sys.executable, "-m", "trio_relay", "serve", "--port", "0",
               "--data-dir", str(data)]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(
            trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=_env(**env), check=False))
        try:
            assert process.stdout is not None
            buffer = bytearray()
            url = (await read_line(process.stdout, buffer)).split()[-1]
            pin_line = await read_line(process.stdout, buffer)
            yield url, pin_line
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(WAIT):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()


async def _auth(url: str, **fields: Any) -> Frame:
    async with open_loopback_client(url, client_timeout=WAIT) as ws:
        reply: Frame = await ws.request("auth", **fields)
        return reply


@pytest.mark.e2e
async def test_the_pin_and_devices_survive_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with _serve(data) as (url, pin_line):
        pin = pin_line.split()[1]
        assert pin_line == f"PIN: {pin} (kept in {PAIRING_FILE}; `trio-relay pin --new`" \
            " replaces it)"
        paired = await _auth(url, pin=pin, deviceName="Terminal on test")
        device = paired["data"]["device"]
    stored = json.loads((data / PAIRING_FILE).read_text())
    assert stored["pin"] == pin and stored["devices"][0]["id"] == device["id"]
    assert (data / PAIRING_FILE).stat().st_mode & 0o777 == 0o600
    # The second start: the same PIN, and the token still signs in.
    async with _serve(data) as (url, pin_line):
        assert pin_line.split()[1] == pin
        again = await _auth(url, token=device["token"])
        assert again["data"]["device"] == {"id": device["id"], "name": "Terminal on test"}
        assert (await _auth(url, pin=pin))["type"] == "auth_success"
    # --pin/$TRIO_RELAY_PIN win for one run, and change neither the kept PIN nor the devices.
    async with _serve(data, TRIO_RELAY_PIN="999000") as (url, pin_line):
        assert pin_line == "PIN: 999000"
        assert (await _auth(url, pin="999000"))["type"] == "auth_success"
        assert (await _auth(url, token=device["token"]))["type"] == "auth_success"
    assert json.loads((data / PAIRING_FILE).read_text())["pin"] == pin


@pytest.mark.e2e
async def test_revoking_from_the_command_line_closes_the_device(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with _serve(data) as (url, pin_line):
        pin = pin_line.split()[1]
        async with open_loopback_client(url, client_timeout=WAIT) as ws:
            reply = await ws.request("auth", pin=pin, deviceName="Doomed")
            device = reply["data"]["device"]
            result = await trio.to_thread.run_sync(
                partial(_run, "devices", "--data-dir", str(data), "--revoke", "Doomed"))
            assert result.returncode == 0, result.stderr
            assert await ws.wait_closed() == (1008, "device revoked")
        assert (await _auth(url, token=device["token"]))["code"] == "token_invalid"


async def test_a_full_collection_follows_every_thousand_closed_connections(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # wsproto's frame parser is cyclic garbage once its connection ends; with serve's high
    # GC thresholds only these collections free it.
    import gc

    from trio_relay import RelayCounters
    from trio_relay._settings import cli

    collections: list[int] = []

    def collect(*args: object) -> int:
        collections.append(1)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    counters = RelayCounters()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cli.collect_after_closes, counters)
        await trio.testing.wait_all_tasks_blocked()  # it counts from here
        counters.connections_accepted = counters.connections_closed = 999
        await trio.sleep(5)
        assert collections == []
        counters.connections_accepted = counters.connections_closed = 1000
        await trio.sleep(1.5)
        assert collections == [1]
        # With more open than the threshold, it waits for as many to close as are open.
        counters.connections_accepted += 5000
        counters.connections_closed += 1000
        await trio.sleep(5)
        assert collections == [1]
        counters.connections_closed += 3000
        await trio.sleep(1.5)
        assert collections == [1, 1]
        nursery.cancel_scope.cancel()
