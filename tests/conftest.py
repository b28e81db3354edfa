"""Fixtures shared by the test modules (their plain helpers are in _helpers.py).

The relay fixtures (``memory_backend``, ``memory_relay``, ``relay_client``, ...) come from
trio-relay's own pytest plugin, as they would for any user (docs/testing.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from _helpers import OpenStore
from _postgres import postgres_dsn, postgres_server  # noqa: F401 - fixtures for every module
from loguru import logger

from trio_relay._store.sqlite import open_sqlite_backend


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Opens each built-in store in turn, for a test to run against both (``agent=`` as
    both take it); opening it again opens the same data."""
    if request.param == "sqlite":
        return partial(open_sqlite_backend, tmp_path / "data")
    dsn = request.getfixturevalue("postgres_dsn")  # skips first without PostgreSQL
    from trio_relay._store.postgres import open_postgres_backend

    return partial(open_postgres_backend, dsn)


@pytest.fixture
def records() -> Iterator[list[Any]]:
    """Every loguru record the package logs during the test, TRACE and up."""
    captured: list[Any] = []
    logger.enable("trio_relay")  # the package silences itself until an application asks
    handler = logger.add(lambda message: captured.append(message.record), level="TRACE")
    try:
        yield captured
    finally:
        logger.remove(handler)
        logger.disable("trio_relay")


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every line the package logs during the test, DEBUG and up, as ``LEVEL|message``."""
    lines: list[str] = []
    # diagnose=False as the CLI sets it: loguru's variable dumps would show any local.
    handler = logger.add(lines.append, level="DEBUG", format="{level}|{message}", diagnose=False)
    logger.enable("trio_relay")
    try:
        yield lines
    finally:
        logger.disable("trio_relay")
        logger.remove(handler)
