"""`trio_relay.client` and pairing: a device name, a token, and refusals that end the client."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
from _helpers import PIN, one_chat

from trio_relay import open_relay, open_sqlite_backend
from trio_relay._store.sqlite_schema import WELCOME_TEXT
from trio_relay.client import (
    AuthFailed,
    ConnectionLost,
    ConnectionState,
    LockedOut,
    MessageAdded,
    Subscription,
    TokenInvalid,
    open_relay_client,
)
from trio_relay.testing import MemoryRelay, open_memory_relay

DOCS = Path(__file__).resolve().parent.parent / "docs" / "client.md"


async def test_a_device_name_pairs_and_reconnects_use_the_token(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_memory_relay(one_chat(), pin=PIN) as relay:
        transport = relay.connector()
        async with open_relay_client(relay.url, pin=PIN, device_name="Terminal on box",
                                     connect=transport) as client:
            device = client.device
            assert device is not None
            assert (device.id, device.name) == (relay.devices.devices()[0].id, "Terminal on box")
            assert device.token not in repr(device)
            async with client.subscribe("chat", "c1") as chat:
                await client.send("c1", "mine")
                event = await _next_message(chat)
                # What a UI compares to tell "You" from the others.
                assert event.message["sender"] == {"deviceId": device.id,
                                                   "name": "Terminal on box"}
                # The PIN changes; the paired client reconnects all the same, by its token.
                relay.relay.pin = "9999"
                await transport.cut()
                await client.wait_state(ConnectionState.RECONNECTING)
                await client.wait_state(ConnectionState.CONNECTED)
                assert len(relay.devices.devices()) == 1  # not paired twice
        # A later run signs in with the token alone.
        async with open_relay_client(relay.url, token=device.token,
                                     connect=relay.connector()) as again:
            assert again.device == device


async def _next_message(chat: Subscription) -> MessageAdded:
    with trio.fail_after(5):
        async for event in chat:
            if isinstance(event, MessageAdded):
                return event
    raise AssertionError("no message")  # pragma: no cover


async def test_a_plain_pin_sign_in_pairs_nothing(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    memory_relay.backend.add_chat("p1", "c1")  # type: ignore[attr-defined]
    async with open_relay_client(memory_relay.url, pin=memory_relay.pin,
                                 connect=memory_relay.connector()) as client:
        assert client.device is None
    assert memory_relay.devices.devices() == []


async def test_a_bad_token_is_token_invalid_and_never_retried(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    transport = memory_relay.connector()
    with pytest.raises(TokenInvalid) as failed:
        async with open_relay_client(memory_relay.url, token="stale", connect=transport):
            pytest.fail("entered with a bad token")  # pragma: no cover
    assert failed.value.code == "token_invalid"
    assert isinstance(failed.value, AuthFailed)
    await trio.sleep(300)  # mock time: five minutes without a retry
    assert len(transport.attempts) == 1


@pytest.mark.trio_relay(pin_lockout_failures=1)
async def test_a_lockout_says_how_long_to_wait(
    autojump_clock: trio.abc.Clock, memory_relay: MemoryRelay
) -> None:
    transport = memory_relay.connector()
    with pytest.raises(LockedOut) as locked:
        async with open_relay_client(memory_relay.url, pin="0000", connect=transport):
            pytest.fail("entered with a wrong PIN")  # pragma: no cover
    assert locked.value.code == "locked_out"
    assert locked.value.retry_after == 600
    assert "try again in 10 minutes" in str(locked.value)
    await trio.sleep(300)  # mock time: five minutes without a retry
    assert len(transport.attempts) == 1  # never fed the lockout again


async def test_revoking_ends_the_client_for_good(autojump_clock: trio.abc.Clock) -> None:
    async with open_memory_relay(one_chat(), pin=PIN) as relay:
        transport = relay.connector()
        async with open_relay_client(relay.url, pin=PIN, device_name="Phone",
                                     connect=transport) as client:
            assert client.device is not None
            relay.relay.revoke_device(client.device.id)
            with pytest.raises(ConnectionLost) as lost:
                await client.wait_state(ConnectionState.CONNECTING)
            assert lost.value.close_code == 1008
            assert "device revoked" in str(lost.value)
            assert client.state is ConnectionState.CLOSED
        await trio.sleep(300)  # mock time: five minutes without a retry
        assert len(transport.attempts) == 1


async def test_bad_arguments_fail_at_once() -> None:
    url = "ws://relay.test/ws"
    for bad in (open_relay_client(url), open_relay_client(url, pin="1", token="t"),
                open_relay_client(url, pin="1", device_name=" ")):
        with pytest.raises(ValueError):
            async with bad:
                pass  # pragma: no cover


@pytest.mark.e2e
async def test_the_documented_pairing_helper_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/client.md's pairing program: pairs, then signs in with the saved token; a revoked
    token is forgotten."""
    code = next(c for c in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
                if "def show_welcome_chat(" in c)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    show = namespace["show_welcome_chat"]
    token_file = tmp_path / "token"
    with trio.fail_after(20):
        async with open_sqlite_backend(tmp_path / "data") as backend:
            async with open_relay(backend, pin="123456") as relay:
                port = await relay.start_serving("127.0.0.1", 0)
                url = f"ws://127.0.0.1:{port}/ws"
                await relay.send("welcome", "from the desktop", sender="Desktop app")
                await show(url, "123456", token_file)
                assert token_file.stat().st_mode & 0o777 == 0o600
                [device] = relay.devices.devices()
                # The second run: the token, whatever the PIN.
                await show(url, "wrong", token_file)
                assert len(relay.devices.devices()) == 1
                relay.revoke_device(device.id)
                await show(url, "123456", token_file)
                assert not token_file.exists()
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"Agent: {WELCOME_TEXT}", "Desktop app: from the desktop"]
    assert out[2:4] == out[:2]
    assert out[4] == "this device was unpaired; sign in with the PIN again"
