"""TLS end to end over loopback, with certificates made by trustme: the relay served on
`trio.open_ssl_over_tcp_listeners`, and `trio-relay serve --tls-cert --tls-key` as a subprocess.
Real time here, each wait bounded."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
import trustme
from _helpers import Frame, wait_until
from _processes import WAIT, read_line
from cryptography.hazmat.primitives import serialization

from trio_relay import Relay, RelayConfig, RelayStatistics, open_relay
from trio_relay._settings.cli import main, server_ssl_context
from trio_relay.testing import MemoryBackend, TestClient, open_loopback_client

pytestmark = pytest.mark.e2e

PIN = "8642"


@attrs.frozen
class Certs:
    ca: trustme.CA
    cert: Path  # the server's certificate chain, PEM
    key: Path  # its private key, PEM


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("certs")
    cert, key = directory / "cert.pem", directory / "key.pem"
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return Certs(ca, cert, key)


def _client_context(certs: Certs | None) -> ssl.SSLContext:
    """Trusts the test CA, or (``None``) only the system's CAs, which do not include it."""
    context = ssl.create_default_context()
    if certs is not None:
        certs.ca.configure_trust(context)
    return context


@asynccontextmanager
async def serve_tls(relay: Relay, certs: Certs) -> AsyncIterator[int]:
    """The relay on a TLS listener, as `trio-relay serve --tls-cert` runs it; yields the port."""
    context = server_ssl_context(certs.cert, certs.key)
    listeners = await trio.open_ssl_over_tcp_listeners(
        0, context, host="127.0.0.1", https_compatible=True
    )
    transport = listeners[0].transport_listener
    assert isinstance(transport, trio.SocketListener)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve_listeners, listeners)
        yield transport.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def open_wss(port: int, context: ssl.SSLContext) -> AbstractAsyncContextManager[TestClient]:
    return open_loopback_client(f"wss://127.0.0.1:{port}/ws", ssl_context=context)


async def _login(ws: TestClient, pin: str = PIN) -> Frame:
    assert await ws.receive() == {"id": None, "type": "auth_required"}
    await ws.send({"id": "auth-1", "type": "auth", "pin": pin})
    return await ws.receive()


def _held(statistics: RelayStatistics) -> dict[str, int]:
    # A stream's history is kept a while after its last subscriber left, by design.
    return {k: v for k, v in attrs.asdict(statistics).items() if k != "kept_histories"}


async def _idle(relay: Relay, baseline: RelayStatistics) -> None:
    """Wait (bounded) until the relay holds what it held at ``baseline``: no connection, no
    subscription, no task left behind."""
    await wait_until(lambda: _held(relay.statistics()) == _held(baseline), WAIT)


async def test_a_client_that_trusts_the_ca_authenticates_subscribes_and_gets_pushes(
    certs: Certs,
) -> None:
    backend = MemoryBackend()
    backend.add_chat("p1", "c1")
    # The client's close leaves c1's broadcaster lingering for resume_grace (real time here).
    config = RelayConfig(resume_grace=0.5)
    async with open_relay(backend, pin=PIN, config=config) as relay:
        baseline = relay.statistics()
        async with serve_tls(relay, certs) as port:
            async with open_wss(port, _client_context(certs)) as ws:
                reply = await _login(ws)
                assert reply["type"] == "auth_success"
                await ws.send({"id": "s", "type": "subscribe", "resource": "chat",
                               "resourceId": "c1"})
                assert (await ws.receive())["type"] == "subscribed"
                await relay.send("c1", "over TLS")
                push = await ws.receive()
                assert push["data"]["message"]["content"] == "over TLS"
                assert relay.statistics().authenticated_connections == 1
            await _idle(relay, baseline)


async def test_a_client_that_does_not_trust_the_ca_fails_and_the_next_one_is_served(
    certs: Certs,
) -> None:
    async with open_relay(MemoryBackend(), pin=PIN) as relay:
        baseline = relay.statistics()
        async with serve_tls(relay, certs) as port:
            with trio.fail_after(WAIT):
                with pytest.raises(trio.BrokenResourceError) as failed:
                    async with open_wss(port, _client_context(None)):
                        pass  # pragma: no cover - the handshake fails first
            assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
            await _idle(relay, baseline)
            async with open_wss(port, _client_context(certs)) as ws:
                assert (await _login(ws))["type"] == "auth_success"
            await _idle(relay, baseline)


async def _dropped(stream: trio.SocketStream) -> None:
    """Read until the relay closes the connection (an EOF or a reset)."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


# The first bytes of a TLS ClientHello record, and then nothing: a handshake that never ends.
PARTIAL_CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])


@pytest.mark.parametrize(("garbage", "bound"), [
    (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 2.0),  # plain HTTP: refused at once
    (b"\x00" * 64, 2.0),  # not TLS at all
    (PARTIAL_CLIENT_HELLO, 0.3 + 2.0),  # waits out handshake_timeout
    (b"", 0.3 + 2.0),  # connects and says nothing
], ids=["http", "zeros", "partial-hello", "silent"])
async def test_plain_tcp_to_the_tls_port_is_dropped_and_the_relay_keeps_serving(
    certs: Certs, garbage: bytes, bound: float
) -> None:
    config = RelayConfig(handshake_timeout=0.3)
    async with open_relay(MemoryBackend(), pin=PIN, config=config) as relay:
        baseline = relay.statistics()
        async with serve_tls(relay, certs) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                if garbage:
                    await stream.send_all(garbage)
                # Meanwhile a real client is served.
                async with open_wss(port, _client_context(certs)) as ws:
                    assert (await _login(ws))["type"] == "auth_success"
                with trio.fail_after(bound):
                    await _dropped(stream)
            finally:
                await stream.aclose()
            await _idle(relay, baseline)


@pytest.fixture
def in_process_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` in this process, without it reconfiguring loguru for the tests that follow."""
    monkeypatch.setattr("trio_relay._settings.cli.configure_logging", lambda level: None)


@pytest.mark.usefixtures("in_process_cli")
def test_a_missing_or_encrypted_key_is_reported_before_serving(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.pem"
    argv = ["serve", "--tls-cert", str(certs.cert), "--tls-key", str(missing),
            "--data-dir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"trio-relay: cannot load TLS certificate {certs.cert} and key {missing}")
    assert err.count("\n") == 1

    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ))
    # It must not prompt for the passphrase (stdin is not a terminal here; it would hang).
    argv[argv.index(str(missing))] = str(encrypted)
    assert main(argv) == 1
    assert "the key is encrypted" in capsys.readouterr().err


@pytest.mark.usefixtures("in_process_cli")
def test_a_port_in_use_exits_1(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
                "--port", str(port), "--pin", PIN, "--data-dir", str(tmp_path)]
        assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"trio-relay: 127.0.0.1:{port} is already in use; choose another with --port\n")


# --- trio-relay serve --tls-cert --tls-key, as a subprocess -----------------------------------


@pytest.fixture
def environ() -> Iterator[dict[str, str]]:
    """The environment for a subprocess, without any TRIO_RELAY_ setting of the caller's."""
    yield {k: v for k, v in os.environ.items() if not k.startswith("TRIO_RELAY_")}


async def test_serve_subprocess_with_tls(
    certs: Certs, tmp_path: Path, environ: dict[str, str]
) -> None:
    command = [sys.executable, "-m", "trio_relay", "serve", "--tls-cert", str(certs.cert),
               "--tls-key", str(certs.key), "--port", "0", "--data-dir", str(tmp_path)]
    env = {**environ, "TRIO_RELAY_PIN": PIN}
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=env, check=False)
        )
        try:
            assert process.stdout is not None
            buffer = bytearray()
            first = await read_line(process.stdout, buffer)
            assert first.startswith("trio-relay serving wss://127.0.0.1:"), first
            assert first.endswith("/ws")
            assert await read_line(process.stdout, buffer) == "PIN: " + PIN
            port = int(first.rpartition(":")[2].removesuffix("/ws"))
            async with open_wss(port, _client_context(certs)) as ws:
                reply = await _login(ws)
                assert reply["type"] == "auth_success"
                assert [p["id"] for p in reply["data"]["projects"]] == ["demo"]
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(WAIT):
                assert await process.wait() == 0
            assert process.stderr is not None
            logs = (await process.stderr.receive_some(1 << 20)).decode()
            assert PIN not in logs
        finally:
            if process.returncode is None:
                process.kill()


async def test_serve_subprocess_with_a_bad_config_file_exits_2_in_one_line(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    config = tmp_path / "trio-relay.toml"
    config.write_text("pin = 'do-not-show-me'\n[relay]\nmax_message_size = -1\n")
    command = [sys.executable, "-m", "trio_relay", "serve", "--config", str(config)]
    with trio.fail_after(WAIT):
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                        env=environ, check=False)
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"trio-relay: {config}: relay.max_message_size: must be positive, got -1\n")
