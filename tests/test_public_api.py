"""The public surface: what `import trio_relay` offers, as trio checks its own exports."""

from __future__ import annotations

import trio_relay

PUBLIC = {
    "Agent", "AgentError", "Backend", "BackendError", "Bus", "BusError", "BusEvent", "Change",
    "ChangeHub", "CloseCode",
    "CommandAgent", "Device", "DeviceStore", "EchoAgent", "EpochChanged", "ErrorCode", "Feed",
    "FeedOverflow", "LocalBus", "Position", "ResourceKey",
    "FileDeviceStore", "Listener", "ListenerOverflow", "NotFound", "Relay", "RelayConfig",
    "RelayCounters", "RelayError", "RelayStatistics",
    "Snapshot", "SqliteBackend", "SubscriptionError", "Update", "UpstreamError",
    "open_relay", "open_sqlite_backend",
}


#: Public too, imported on first use: their modules import the extras' drivers.
LAZY = {"PostgresBackend", "DatabaseUnavailable", "open_postgres_backend", "RedisBus",
        "open_redis_bus"}


def test_the_lazy_names_import_on_first_use() -> None:
    for name in LAZY:
        module = getattr(trio_relay, name).__module__
        assert module.startswith("trio_relay._"), (name, module)
    assert set(dir(trio_relay)) >= LAZY


def test_the_package_exports_exactly_the_public_api() -> None:
    # ("@..." names are pytest's assertion rewriting: the package holds our pytest plugin.)
    exported = {name for name in vars(trio_relay) if not name.startswith(("_", "@"))}
    # Submodules that are public in their own right appear as attributes once imported.
    exported -= {"client", "testing", "pytest_plugin"}
    exported -= LAZY  # present once a test has touched them
    assert exported == PUBLIC


def test_public_names_live_in_private_modules() -> None:
    for name in PUBLIC - {"Feed"}:  # Feed is a type alias of contextlib's
        module = getattr(trio_relay, name).__module__
        assert module.startswith("trio_relay._"), (name, module)
