"""The terminal's device tokens, one per relay URL, in a file of the user's own."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from ..client import Device

__all__ = ["SavedDevices", "devices_file"]


class SavedDevices:
    """This user's device tokens, one per relay URL: the first PIN sign-in pairs the terminal
    as a device, and later runs sign in with its token (no PIN, and no new device each run).
    The file is the user's alone (0600, in a 0700 folder) and replaced whole on each change."""

    def __init__(self, path: Path, err: TextIO) -> None:
        self.path = path
        self._err = err

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._err.write(f"trio-relay chat: ignoring {self.path}: {exc}\n")
            return {}
        relays = data.get("relays") if isinstance(data, dict) else None
        if not isinstance(relays, dict):
            return {}
        return {url: device for url, device in relays.items() if isinstance(device, dict)
                and all(isinstance(device.get(key), str) for key in ("id", "name", "token"))}

    def token(self, url: str) -> str | None:
        device = self._read().get(url)
        return device["token"] if device else None

    def save(self, url: str, device: Device) -> None:
        relays = self._read()
        if relays.get(url, {}).get("token") == device.token:
            return
        relays[url] = {"id": device.id, "name": device.name, "token": device.token}
        self._write(relays)

    def forget(self, url: str) -> None:
        relays = self._read()
        if relays.pop(url, None) is not None:
            self._write(relays)

    def _write(self, relays: dict[str, dict[str, str]]) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump({"relays": relays}, file, indent=2)
            os.replace(temporary, self.path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            self._err.write(f"trio-relay chat: cannot save this device's sign-in in"
                            f" {self.path}: {exc}\n")


def devices_file(environ: Mapping[str, str]) -> Path:
    """Where `trio-relay chat` keeps its device tokens."""
    config = environ.get("XDG_CONFIG_HOME") or str(
        Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(config) / "trio-relay" / "chat-devices.json"
