"""Helpers for the web client's JavaScript tests: finding `node`, and the ws-link.js
scenarios (tests/ws_link_scenario.js, tests/ws_link_pairing_scenario.js) with what their
results must be.

Each scenario is one async function over a scripted fake WebSocket that returns what it saw.
It runs in a page of the web client (tests/test_browser.py) and in Node
(tests/test_ws_link.py); both check its result here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent

#: Routing by resource and id, request timeouts, gaps, resuming after a reconnect.
ROUTING = TESTS / "ws_link_scenario.js"
#: Pairing, signing in with the token, and never retrying a refusal.
PAIRING = TESTS / "ws_link_pairing_scenario.js"


def node() -> str:
    """The `node` executable; the test is skipped without it, unless CI is set."""
    found = shutil.which("node")
    if found is None:
        message = (
            "node is not installed (`apt-get install nodejs`): the web client's JS tests"
            " need it"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: they must run there)")
        pytest.skip(message)
    return found


def check_routing(result: dict[str, Any]) -> None:
    assert result["timeout"] is True
    assert result["events"]["c1"] == [
        ["snapshot", 1, False],
        ["event", "a", 6],
        ["event", "c", 7],
        ["snapshot", 2, True],  # after the gap
        ["resumed"],
        ["event", "missed", 13],
    ]
    assert result["events"]["c2"] == [
        ["snapshot", 0, False], ["event", "b", 1], ["snapshot", 3, True],
    ]
    resync = result["resync"]
    assert "sinceSeq" not in resync and "epoch" not in resync
    assert result["auth"]["type"] == "auth" and result["auth"]["pin"] == "1234"
    assert [(r["resourceId"], r["sinceSeq"], r["epoch"]) for r in result["resubscribes"]] == [
        ("c1", 12, "E1"), ("c2", 1, "E2"),
    ]
    assert result["states"] == [
        "connected", "reconnecting", "connected", "reconnecting", "connected", "signed-out"]
    assert result["connectedAfterClosing"] is True


def check_pairing(result: dict[str, Any]) -> None:
    assert result["pairedWith"] == {"id": result["pairedWith"]["id"], "type": "auth",
                                    "pin": "1234", "deviceName": "Phone"}
    assert result["tokenGiven"] == "T1"
    assert result["device"] == {"id": "d_0123456789ab", "name": "Phone"}
    assert result["reconnectedWith"] == {"id": result["reconnectedWith"]["id"], "type": "auth",
                                         "token": "T1"}
    assert result["endedWith"] == {"code": "token_invalid", "isAuthFailed": True}
    assert result["socketsAfterRefusal"] == 3  # the refused one, and no other
    assert result["patientSockets"] == 3
    assert result["patientStates"] == ["connecting", "reconnecting", "connected"]
    assert all(frame["token"] == "T1" and "pin" not in frame for frame in result["patientAuths"])
    assert result["hasty"] == "ConnectionLost"
    assert result["locked"] == {"name": "AuthFailed", "code": "locked_out", "retryAfter": 42}
    assert result["lockedSockets"] == 1
