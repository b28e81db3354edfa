"""Pairing: device tokens, the pairing file, revoking, the lockout's retryAfter, and senders."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _helpers import PIN, Frame, one_chat

from trio_relay import RelayConfig
from trio_relay._server.pairing import (
    PAIRING_FILE,
    DeviceStore,
    FileDeviceStore,
    PairingFileError,
    hash_token,
)
from trio_relay._store import sqlite_schema
from trio_relay.pytest_plugin import _marked
from trio_relay.testing import MemoryBackend, MemoryRelay, TestClient, open_memory_relay


async def _pair(relay: MemoryRelay, name: str = "Firefox on Android") -> tuple[TestClient, Frame]:
    client = await relay.connect()
    reply = await client.authenticate(PIN, device_name=name)
    device: Frame = reply["data"]["device"]
    return client, device


# --- the stores, without a relay --------------------------------------------------------------


def test_memory_store_pairs_verifies_and_revokes() -> None:
    store = DeviceStore()
    device, token = store.pair("  Phone ")
    assert device.name == "Phone" and device.id.startswith("d_") and len(device.id) == 14
    assert len(token) >= 43  # 32 random bytes, url-safe base64
    assert store.verify(token) == store.get(device.id)
    assert store.verify(token + "x") is None
    assert store.verify("") is None
    other, other_token = store.pair("Phone")
    assert other_token != token
    assert store.find("Phone") == [device, other]
    assert store.find(device.id) == [device]
    assert store.revoke(device.id) == device
    assert store.revoke(device.id) is None
    assert store.verify(token) is None
    assert store.verify(other_token) is not None
    assert store.pin is None and store.reload() == []


@pytest.mark.parametrize("name", ["", "  ", "x" * 65, "a\nb", "\x00"])
def test_memory_store_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="1 to 64 characters"):
        DeviceStore().pair(name)


def test_the_pairing_file_keeps_the_pin_and_only_token_hashes(tmp_path: Path) -> None:
    path = tmp_path / "data" / PAIRING_FILE
    store = FileDeviceStore(path)
    pin = store.pin
    assert len(pin) == 6 and pin.isdigit()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    device, token = store.pair("Laptop")
    data = json.loads(path.read_text())
    assert data["pin"] == pin
    assert data["devices"] == [{
        "id": device.id, "name": "Laptop", "tokenHash": hash_token(token),
        "created": device.created, "lastSeen": device.last_seen,
    }]
    assert token not in path.read_text()
    # Another process (a restart) reads the same PIN and accepts the same token.
    again = FileDeviceStore(path)
    assert again.pin == pin
    assert again.verify(token) is not None
    new = again.new_pin()
    assert FileDeviceStore(path).pin == new
    assert FileDeviceStore(path).verify(token) is not None  # a new PIN keeps devices paired
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_the_pairing_file_notices_changes_and_merges(tmp_path: Path) -> None:
    path = tmp_path / PAIRING_FILE
    relay_side = FileDeviceStore(path)
    first, first_token = relay_side.pair("One")
    second, _ = relay_side.pair("Two")
    cli_side = FileDeviceStore(path)
    assert cli_side.revoke(first.id) == first
    assert relay_side.reload() == [first.id]
    assert relay_side.reload() == []  # only once
    assert relay_side.verify(first_token) is None
    # A change on each side at once: neither is lost.
    cli_side.revoke(second.id)
    third, third_token = relay_side.pair("Three")
    assert [d.id for d in FileDeviceStore(path).devices()] == [third.id]
    assert relay_side.reload() == [second.id]
    new_pin = cli_side.new_pin()
    relay_side.reload()
    assert relay_side.pin == new_pin
    assert relay_side.verify(third_token) is not None


def test_a_file_broken_while_running_is_reported_once(tmp_path: Path) -> None:
    path = tmp_path / PAIRING_FILE
    store = FileDeviceStore(path)
    device, token = store.pair("Phone")
    path.write_text("{ not json")
    with pytest.raises(PairingFileError, match="invalid JSON"):
        store.reload()
    assert store.reload() == []  # not again until it changes
    assert store.verify(token) is not None  # the devices it had are kept
    path.unlink()
    assert store.reload() == [] and store.reload() == []
    store.pair("Laptop")  # written back whole
    assert len(FileDeviceStore(path).devices()) == 2
    assert FileDeviceStore(path).get(device.id) is not None


def test_last_seen_reaches_the_file_throttled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("trio_relay._server.pairing.time.monotonic", lambda: now[0])
    times = iter(["2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z", "2026-01-01T00:01:30Z"])
    monkeypatch.setattr("trio_relay._server.pairing._now", lambda: next(times))
    path = tmp_path / PAIRING_FILE
    store = FileDeviceStore(path)
    device, token = store.pair("Phone")  # written at once
    now[0] += 1
    store.verify(token)  # seen: in memory at once, in the file not yet
    assert store.get(device.id).last_seen == "2026-01-01T00:00:02Z"  # type: ignore[union-attr]
    assert json.loads(path.read_text())["devices"][0]["lastSeen"] == "2026-01-01T00:00:01Z"
    now[0] += 60
    assert store.reload() == []  # the relay's watcher: the minute is up, so it writes
    assert json.loads(path.read_text())["devices"][0]["lastSeen"] == "2026-01-01T00:00:02Z"
    store.verify(token)
    store.flush()  # on the way out, whatever is left
    assert json.loads(path.read_text())["devices"][0]["lastSeen"] == "2026-01-01T00:01:30Z"


@pytest.mark.parametrize(
    "text",
    ["", "[]", '{"devices": []}', '{"pin": ""}', '{"pin": "1", "devices": {}}',
     '{"pin": "1", "devices": [{"id": "d_1"}]}'],
)
def test_a_broken_pairing_file_is_reported(tmp_path: Path, text: str) -> None:
    path = tmp_path / PAIRING_FILE
    path.write_text(text)
    with pytest.raises(PairingFileError, match="not a pairing file"):
        FileDeviceStore(path)


# --- signing in -------------------------------------------------------------------------------


async def test_pin_with_a_device_name_pairs_and_the_token_signs_in(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_memory_relay(one_chat(), pin=PIN) as relay:
        _, device = await _pair(relay)
        assert set(device) == {"id", "name", "token"}
        assert device["name"] == "Firefox on Android"
        later = await relay.connect()
        reply = await later.authenticate(token=device["token"])
        assert reply["data"]["device"] == {"id": device["id"], "name": device["name"]}
        assert reply["data"]["projects"] == [{"id": "p1", "name": "p1"}]
        # A token sign-in ignores a device name; a PIN one without a name pairs nothing.
        named = await (await relay.connect()).authenticate(token=device["token"],
                                                           device_name="Other")
        assert named["data"]["device"]["name"] == "Firefox on Android"
        plain = await (await relay.connect()).authenticate(PIN)
        assert "device" not in plain["data"]
        assert [d.id for d in relay.devices.devices()] == [device["id"]]


async def test_a_wrong_or_revoked_token_is_token_invalid(autojump_clock: trio.abc.Clock) -> None:
    async with open_memory_relay(one_chat(), pin=PIN) as relay:
        _, device = await _pair(relay)
        client = await relay.connect()
        wrong = await client.request("auth", token="not-a-token")
        assert wrong == {"id": wrong["id"], "type": "auth_failed", "code": "token_invalid",
                         "error": "Unknown or revoked device token"}
        # A wrong token is a failed attempt like a wrong PIN (the relay's counter, too).
        assert relay.relay.counters.failed_pins == 1
        assert relay.relay.revoke_device(device["id"]) is True
        revoked = await client.request("auth", token=device["token"])
        assert revoked["code"] == "token_invalid"
        # The connection stays open for the PIN.
        assert (await client.request("auth", pin=PIN))["type"] == "auth_success"


async def test_revoking_closes_the_devices_connections_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_memory_relay(one_chat(), pin=PIN) as relay:
        phone, device = await _pair(relay, "Phone")
        again = await relay.connect()
        await again.authenticate(token=device["token"])
        laptop, _ = await _pair(relay, "Laptop")
        bystander = await relay.connect(authenticate=PIN)
        await bystander.subscribe("chat", "c1")
        assert relay.relay.revoke_device(device["id"]) is True
        assert await phone.wait_closed() == (1008, "device revoked")
        assert await again.wait_closed() == (1008, "device revoked")
        # Everyone else stays.
        await laptop.send_message("c1", "still here")
        assert (await bystander.next_push())["data"]["message"]["content"] == "still here"
        assert relay.relay.revoke_device(device["id"]) is False  # already gone


async def test_a_revoke_in_the_pairing_file_closes_connections(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    path = tmp_path / PAIRING_FILE
    store = FileDeviceStore(path)
    async with open_memory_relay(one_chat(), pin=PIN, devices=store) as relay:
        phone, device = await _pair(relay, "Phone")
        # `trio-relay devices --revoke Phone`, from another process.
        FileDeviceStore(path).revoke(device["id"])
        start = trio.current_time()
        assert await phone.wait_closed() == (1008, "device revoked")
        assert trio.current_time() - start <= 1.0 + 0.01  # checked every second
        client = await relay.connect()
        assert (await client.request("auth", token=device["token"]))["code"] == "token_invalid"


async def test_the_relay_follows_the_stores_pin(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    from trio_relay._server.relay import open_relay

    store = FileDeviceStore(tmp_path / PAIRING_FILE)
    async with open_relay(one_chat(), devices=store) as relay:
        assert relay.pin == store.pin
        new = FileDeviceStore(tmp_path / PAIRING_FILE).new_pin()
        await trio.sleep(1.5)  # mock time: past the store's 1 s watch interval
        assert relay.pin == new
    with pytest.raises(ValueError, match="pin"):
        async with open_relay(one_chat()):
            pass


# --- the lockout ------------------------------------------------------------------------------


LOCKOUT = RelayConfig(pin_lockout_failures=3, pin_backoff_initial=0.5, pin_failure_window=600)


async def test_the_lockout_says_how_long_to_wait(autojump_clock: trio.abc.Clock) -> None:
    async with open_memory_relay(one_chat(), pin=PIN, config=LOCKOUT) as relay:
        _, device = await _pair(relay)
        client = await relay.connect()
        first = trio.current_time()
        assert (await client.request("auth", pin="0"))["code"] == "auth_failed"
        # A wrong token is one of the failures too.
        assert (await client.request("auth", token="nope"))["code"] == "token_invalid"
        locked = await client.request("auth", pin="0")  # the third: locked out
        # Until the first failure leaves the 600 s window, rounded up.
        assert locked == {
            "id": locked["id"], "type": "auth_failed", "code": "locked_out",
            "retryAfter": math.ceil(first + 600 - trio.current_time()),
            "error": "Too many failed attempts; try again in 10 minutes",
        }
        assert await client.wait_closed() == (1008, "too many failed PIN attempts")
        await trio.sleep(540)
        later = await relay.connect()
        refused = await later.request("auth", pin=PIN)  # even the right PIN
        assert refused["code"] == "locked_out"
        assert 50 <= refused["retryAfter"] <= 60
        wait = refused["retryAfter"]
        assert refused["error"] == f"Too many failed attempts; try again in {wait} seconds"
        # A paired device's token still signs in: someone else's guessing does not lock it
        # out (a token cannot be guessed); a wrong token is refused as locked out.
        paired = await relay.connect()
        assert (await paired.request("auth", token=device["token"]))["type"] == "auth_success"
        guesser = await relay.connect()
        assert (await guesser.request("auth", token="guess"))["code"] == "locked_out"
        assert await guesser.wait_closed() == (1008, "too many failed PIN attempts")
        await trio.sleep(refused["retryAfter"])
        free = await relay.connect()
        assert (await free.request("auth", pin=PIN))["type"] == "auth_success"


# --- senders ----------------------------------------------------------------------------------


async def test_each_message_carries_its_sender(autojump_clock: trio.abc.Clock) -> None:
    backend = one_chat()
    async with open_memory_relay(backend, pin=PIN) as relay:
        watcher = await relay.connect(authenticate=PIN)
        await watcher.subscribe("chat", "c1")
        phone, device = await _pair(relay, "Firefox on Android")
        await phone.send_message("c1", "from the phone")
        paired = await watcher.next_push()
        assert paired["data"]["message"]["sender"] == {
            "deviceId": device["id"], "name": "Firefox on Android"}
        await watcher.send_message("c1", "from nowhere in particular")
        unnamed = await watcher.next_push()
        assert unnamed["data"]["message"]["sender"] == {"name": "Unnamed device"}
        await relay.relay.send("c1", "from the desktop", sender="Desktop app")
        await relay.relay.send("c1", "from the host")
        hosts = await watcher.next_pushes(2)
        assert [p["data"]["message"]["sender"] for p in hosts] == [
            {"name": "Desktop app"}, {"name": "Host"}]
        # A token sign-in sends as the same device.
        again = await relay.connect()
        await again.authenticate(token=device["token"])
        await again.send_message("c1", "again")
        assert (await watcher.next_push())["data"]["message"]["sender"]["deviceId"] == device["id"]


class _OldBackend(MemoryBackend):
    """A backend written before senders: its send_message takes no ``sender``."""

    async def send_message(self, chat_id: str, message: Any) -> None:  # type: ignore[override]
        await super().send_message(chat_id, message)


async def test_a_backend_without_senders_keeps_working(autojump_clock: trio.abc.Clock) -> None:
    backend = _OldBackend()
    backend.add_chat("p1", "c1")
    # Only a type checker minds the missing parameter.
    async with open_memory_relay(backend, pin=PIN) as relay:  # type: ignore[arg-type]
        client, _ = await _pair(relay)
        await client.subscribe("chat", "c1")
        await client.send_message("c1", "hi")
        message = (await client.next_push())["data"]["message"]
        assert message["content"] == "hi" and "sender" not in message
        await relay.relay.send("c1", "host")
        assert (await client.next_push())["data"]["message"]["content"] == "host"


# --- testing kit ------------------------------------------------------------------------------


@pytest.mark.trio_relay(client_timeout=100, pin_backoff_initial=40, auth_timeout=100, pin="42")
async def test_the_fixtures_take_overrides_from_a_marker(
    memory_relay: MemoryRelay, autojump_clock: trio.abc.Clock
) -> None:
    assert memory_relay.timeout == 100 and memory_relay.pin == "42"
    # A wrong PIN answered after 40 s: longer than the default client timeout would allow.
    client = await memory_relay.connect()
    assert (await client.request("auth", pin="0"))["code"] == "auth_failed"


@pytest.mark.trio_relay(not_a_setting=1)
def test_the_marker_refuses_unknown_settings(request: pytest.FixtureRequest) -> None:
    with pytest.raises(TypeError, match="no setting named not_a_setting"):
        _marked(request)


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "d" / PAIRING_FILE
    FileDeviceStore(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.path.exists(str(path) + ".lock")


# --- the SQLite backend's senders -------------------------------------------------------------


async def test_sqlite_stores_senders_and_migrates_old_databases(tmp_path: Path) -> None:
    import sqlite3

    from trio_relay import open_sqlite_backend

    # A database as the previous trio-relay left it (schema 1: messages without senders).
    old = sqlite3.connect(tmp_path / "trio-relay.sqlite3")
    old.executescript("""
        CREATE TABLE projects (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at TEXT NOT NULL);
        CREATE TABLE chats (id TEXT PRIMARY KEY, project_id TEXT NOT NULL REFERENCES projects (id)
            ON DELETE CASCADE, title TEXT NOT NULL, model_profile_id TEXT NOT NULL,
            created_at TEXT NOT NULL);
        CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            chat_id TEXT NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), content TEXT NOT NULL,
            created_at TEXT NOT NULL);
        CREATE TABLE model_profiles (id TEXT PRIMARY KEY, name TEXT NOT NULL, agent TEXT NOT NULL,
            position INTEGER NOT NULL);
        INSERT INTO projects VALUES ('demo', 'Demo project', '2026-01-01T00:00:00.000Z');
        INSERT INTO chats VALUES ('c1', 'demo', 'Old', 'quiet', '2026-01-01T00:00:00.000Z');
        INSERT INTO messages (id, chat_id, role, content, created_at)
            VALUES ('m1', 'c1', 'user', 'written long ago', '2026-01-01T00:00:00.000Z');
        INSERT INTO model_profiles VALUES ('quiet', 'Quiet', 'silent', 0);
        PRAGMA user_version = 1;
    """)
    old.close()
    from trio_relay._agents.silent import SilentAgent

    async with open_sqlite_backend(tmp_path) as backend:
        await backend.set_model_profiles([{"id": "quiet", "name": "Quiet", "agent": "silent"}],
                                         {"quiet": SilentAgent()})
        history = (await backend.get_history("c1")).items
        # The old row renders as before: no sender key at all.
        assert history == [{"id": "m1", "chatId": "c1", "role": "user",
                            "content": "written long ago", "createdAt": "2026-01-01T00:00:00.000Z"}]
        async with backend.watch_chat("c1") as feed:
            await backend.send_message("c1", "new", sender={"deviceId": "d_1", "name": "Phone"})
            async for change in feed:
                pushed = change.data["message"]
                break
        assert pushed["sender"] == {"deviceId": "d_1", "name": "Phone"}
        await backend.send_message("c1", "no sender given")
    async with open_sqlite_backend(tmp_path) as backend:
        history = (await backend.get_history("c1")).items
        assert [m.get("sender") for m in history] == [
            None, {"deviceId": "d_1", "name": "Phone"}, None]
        assert history[1] == pushed
    check = sqlite3.connect(tmp_path / "trio-relay.sqlite3")
    assert check.execute("PRAGMA user_version").fetchone() == (sqlite_schema.SCHEMA_VERSION,)
    check.close()


async def test_a_pairing_that_cannot_be_stored_is_refused(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileDeviceStore(tmp_path / PAIRING_FILE)

    def full_disk(path: Path, text: str) -> None:
        raise PairingFileError(f"{path}: cannot write: No space left on device")

    monkeypatch.setattr("trio_relay._server.pairing._write_private", full_disk)
    async with open_memory_relay(one_chat(), pin=PIN, devices=store) as relay:
        client = await relay.connect()
        reply = await client.request("auth", pin=PIN, deviceName="Phone")
        assert reply["type"] == "error" and reply["code"] == "internal_error"
        assert "could not pair this device" in reply["error"]
        assert store.devices() == []
        # Without a name, signing in still works.
        assert (await client.request("auth", pin=PIN))["type"] == "auth_success"


class _GatedBackend(MemoryBackend):
    """list_projects waits for ``gate`` once it is armed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None

    async def list_projects(self) -> list[Any]:
        if self.gate is not None:
            await self.gate.wait()
        return await super().list_projects()


async def test_a_device_revoked_during_its_sign_in_is_closed(
    autojump_clock: trio.abc.Clock,
) -> None:
    backend = _GatedBackend()
    backend.add_chat("p1", "c1")
    async with open_memory_relay(backend, pin=PIN) as relay:
        _, device = await _pair(relay)
        backend.gate = trio.Event()
        client = await relay.connect()
        await client.request_nowait("auth", token=device["token"])
        await trio.testing.wait_all_tasks_blocked()  # the sign-in waits in the backend
        relay.relay.revoke_device(device["id"])
        backend.gate.set()
        assert await client.wait_closed() == (1008, "device revoked")
