"""Pairing: the PIN, and the devices that signed in with it once and now sign in with a token.

A successful PIN sign-in that names its device (``deviceName``) pairs the device: the relay
makes a random token (`secrets.token_urlsafe(32)`, 256 bits), gives it to the client once and
keeps only its SHA-256, with the device's id, name, and when it was paired and last seen. The
client signs in with the token from then on, across reloads and relay restarts, until the
device is revoked.

- `DeviceStore` holds the devices in memory: what `open_relay` uses unless given another.
- `FileDeviceStore` keeps them, and the PIN, in ``pairing.json`` (what ``trio-relay serve``
  uses): mode 0600, written atomically (a temporary file, then `os.replace`), under an
  advisory lock so that the ``trio-relay pin`` and ``devices`` commands can change it while
  the relay runs. The relay reads it again when it changes (`DeviceStore.reload`, checked
  every `DeviceStore.watch_interval` seconds) and closes the connections of devices that are
  gone.

Tokens are compared in constant time, by their hashes. No PIN or token ever reaches a log.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import attrs
from loguru import logger

from .._wire.protocol import DEVICE_NAME_MAX, check_device_name

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: writes are still atomic
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PAIRING_FILE",
    "Device",
    "DeviceStore",
    "FileDeviceStore",
    "PairingFileError",
    "hash_token",
    "new_pin",
    "read_pin",
    "replace_pin",
]

#: The pairing file's name in the data dir.
PAIRING_FILE: Final = "pairing.json"
#: Last-seen times reach the file at most this often (seconds); in memory they are current.
LAST_SEEN_WRITE_INTERVAL: Final = 60.0


class PairingFileError(Exception):
    """``pairing.json`` cannot be read or written; the message names the file."""


def new_pin() -> str:
    """A random 6-digit PIN."""
    return f"{secrets.randbelow(10**6):06d}"


def hash_token(token: str) -> str:
    """What the relay stores of a token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@attrs.frozen
class Device:
    """A paired device, as the host and ``trio-relay devices`` see it (never its token)."""

    #: ``d_`` and 12 hex digits.
    id: str
    name: str
    #: When it was paired and when it last signed in or sent a message: ISO 8601, UTC.
    created: str
    last_seen: str


@attrs.define
class _Record:
    device: Device
    token_hash: str = attrs.field(repr=False)


class DeviceStore:
    """The paired devices, in memory: they last as long as the process.

    Give `open_relay` your own instance (``devices=``) to look at or revoke devices from the
    host (`Relay.revoke_device` also closes their connections); subclass it to keep them
    somewhere else, as `FileDeviceStore` does.
    """

    #: Seconds between calls of `reload` by the relay; None: never (nothing outside changes
    #: the store).
    watch_interval: float | None = None

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    @property
    def pin(self) -> str | None:
        """The PIN this store keeps, if it keeps one (`open_relay` uses it when given none)."""
        return None

    def devices(self) -> list[Device]:
        """Every paired device, oldest first."""
        return [record.device for record in self._records.values()]

    def get(self, device_id: str) -> Device | None:
        record = self._records.get(device_id)
        return record.device if record is not None else None

    def pair(self, name: str) -> tuple[Device, str]:
        """Pair a new device called ``name`` (see `check_device_name`); return it and its
        token, which is not kept and cannot be asked for again."""
        checked = check_device_name(name)
        if checked is None:
            raise ValueError(
                f"a device name must be 1 to {DEVICE_NAME_MAX} characters, without control"
                " characters"
            )
        token = secrets.token_urlsafe(32)
        device_id = f"d_{secrets.token_hex(6)}"
        while device_id in self._records:  # pragma: no cover - 48 bits: practically never
            device_id = f"d_{secrets.token_hex(6)}"
        now = _now()
        device = Device(id=device_id, name=checked, created=now, last_seen=now)
        self._records[device_id] = _Record(device, hash_token(token))
        try:
            self._changed(force=True)
        except BaseException:
            del self._records[device_id]  # not kept, so not paired: its token is never given
            raise
        return device, token

    def verify(self, token: str) -> Device | None:
        """The device whose token this is, or None (unknown or revoked); a match counts as
        the device being seen."""
        digest = hash_token(token)
        found: _Record | None = None
        for record in self._records.values():
            # Every hash is compared, in constant time: timing tells nothing about which.
            if hmac.compare_digest(record.token_hash, digest):
                found = record
        if found is None:
            return None
        self.seen(found.device.id)
        return self._records[found.device.id].device

    def seen(self, device_id: str) -> None:
        """The device signed in or sent something just now."""
        record = self._records.get(device_id)
        if record is not None:
            record.device = attrs.evolve(record.device, last_seen=_now())
            self._changed(force=False)

    def find(self, name_or_id: str) -> list[Device]:
        """The device with this id, else every device with this name."""
        record = self._records.get(name_or_id)
        if record is not None:
            return [record.device]
        return [r.device for r in self._records.values() if r.device.name == name_or_id]

    def revoke(self, device_id: str) -> Device | None:
        """Forget the device (its token stops working); return it, or None if unknown.

        Its open connections stay open: `Relay.revoke_device` closes them too.
        """
        record = self._records.pop(device_id, None)
        if record is not None:
            self._changed(force=True)
        return record.device if record is not None else None

    def reload(self) -> list[str]:
        """Read the store again if something outside changed it; return the ids of the
        devices that are gone. The memory store has nothing to read."""
        return []

    def flush(self) -> None:
        """Write what is not written yet (throttled last-seen times); the relay calls it
        when it stops."""

    def _changed(self, *, force: bool) -> None:
        """Hook for stores that persist: the records changed (``force``: not just a
        last-seen time)."""


@attrs.frozen
class _FileState:
    """What identifies one version of the file, to notice that it changed."""

    mtime_ns: int
    size: int
    inode: int


class FileDeviceStore(DeviceStore):
    """Devices and the PIN in ``pairing.json`` (``path``), as ``trio-relay serve`` keeps them.

    Opening it creates the file, with a new PIN, if there is none. Raises `PairingFileError`
    if the file cannot be read or written, or does not hold a pairing.
    """

    watch_interval: float | None = 1.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self._pin = ""
        self._seen: _FileState | None = None
        #: The device ids in the file as last read or written, to merge changes by id.
        self._known: set[str] = set()
        #: The device ids `reload` has not yet reported gone (its callers' view).
        self._alive: set[str] = set()
        self._dirty = False
        self._written_at = -LAST_SEEN_WRITE_INTERVAL
        self._locked = False
        with self._lock():
            if not self._read():
                self._pin = new_pin()
                self._write()

    @property
    def pin(self) -> str:
        return self._pin

    def new_pin(self) -> str:
        """Replace the PIN with a new random one and return it; paired devices stay paired."""
        with self._lock():
            self._read()
            self._pin = new_pin()
            self._write()
        return self._pin

    def pair(self, name: str) -> tuple[Device, str]:
        device, token = super().pair(name)
        self._alive.add(device.id)
        return device, token

    def reload(self) -> list[str]:
        with self._lock():
            state = self._state()
            if state != self._seen:
                try:
                    if self._read():
                        logger.info("pairing file changed: {} devices", len(self._records))
                    else:  # deleted: ours are written back with the next change
                        self._seen = None
                except PairingFileError:
                    self._seen = state  # reported once, not every second
                    raise
            self._flush_due()
        # Also those a merge dropped (`_write_merged`) since the last call.
        gone = sorted(self._alive - set(self._records))
        self._alive = set(self._records)
        return gone

    def flush(self) -> None:
        if self._dirty:
            with self._lock():
                self._write_merged()

    # --- the file ---------------------------------------------------------------------------

    def _changed(self, *, force: bool) -> None:
        self._dirty = True
        if force:
            with self._lock():
                self._write_merged()
            return
        try:
            self._flush_due()
        except PairingFileError as exc:  # a last-seen time can wait for the next write
            logger.error("{}", exc)

    def _flush_due(self) -> None:
        if self._dirty and time.monotonic() - self._written_at >= LAST_SEEN_WRITE_INTERVAL:
            with self._lock():
                self._write_merged()

    def _write_merged(self) -> None:
        """Write our records, merged with the file's if it changed meanwhile: a device
        revoked there stays revoked, one paired here is kept, the PIN is the file's."""
        if self._state() != self._seen:
            ours, known = self._records, self._known
            self._read()
            theirs = self._records
            # Ours win where both have a device (our last-seen time is newer); a device we
            # knew and they lack was revoked there, one they have and we knew not, paired
            # there, one we have and they never had, paired here.
            merged = {i: r for i, r in theirs.items() if i in ours or i not in known}
            merged.update({i: r for i, r in ours.items() if i in theirs or i not in known})
            self._records = merged
        self._write()

    def _state(self) -> _FileState | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PairingFileError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        return _FileState(stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _read(self) -> bool:
        """Load the file; False if there is none."""
        state = self._state()
        if state is None:
            return False
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PairingFileError(f"{self.path}: cannot read: {exc}") from None
        self._pin, self._records = _parse(self.path, text)
        self._known = set(self._records)
        self._alive |= self._known
        self._seen = state
        return True

    def _write(self) -> None:
        data = {
            "pin": self._pin,
            "devices": [
                {"id": r.device.id, "name": r.device.name, "tokenHash": r.token_hash,
                 "created": r.device.created, "lastSeen": r.device.last_seen}
                for r in self._records.values()
            ],
        }
        _write_private(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        self._seen = self._state()
        self._known = set(self._records)
        self._dirty = False
        self._written_at = time.monotonic()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the advisory lock beside the file (re-entrant within this store)."""
        if fcntl is None or self._locked:
            yield
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"),
                         os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PairingFileError(f"{self.path}: cannot lock: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._locked = True
            try:
                yield
            finally:
                self._locked = False
        finally:
            os.close(fd)  # closing releases the lock


def _parse(path: Path, text: str) -> tuple[str, dict[str, _Record]]:
    def bad(why: str) -> PairingFileError:
        return PairingFileError(f"{path}: not a pairing file: {why}")

    try:
        data: Any = json.loads(text)
    except ValueError:
        raise bad("invalid JSON") from None
    if not isinstance(data, dict):
        raise bad("expected an object")
    pin = data.get("pin")
    if not isinstance(pin, str) or not pin:
        raise bad("'pin' must be a non-empty string")
    devices = data.get("devices", [])
    if not isinstance(devices, list):
        raise bad("'devices' must be an array")
    records: dict[str, _Record] = {}
    for index, item in enumerate(devices):
        fields = ("id", "name", "tokenHash", "created", "lastSeen")
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in fields):
            raise bad(f"devices[{index}] needs the strings {', '.join(fields)}")
        device = Device(id=item["id"], name=item["name"], created=item["created"],
                        last_seen=item["lastSeen"])
        records[device.id] = _Record(device, item["tokenHash"])
    return pin, records


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        raise PairingFileError(f"{path}: cannot write: {exc.strerror or exc}") from None


def read_pin(path: str | os.PathLike[str]) -> str:
    """The PIN kept in the pairing file at ``path`` (made, with a new PIN, if there is none)."""
    return FileDeviceStore(path).pin


def replace_pin(path: str | os.PathLike[str]) -> str:
    """Give the pairing file at ``path`` a new PIN and return it."""
    return FileDeviceStore(path).new_pin()
