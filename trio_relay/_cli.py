"""The ``trio-relay`` command: ``trio-relay serve`` runs the relay with its default backend."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from loguru import logger

from ._config import RelayConfig
from ._relay import open_relay

if TYPE_CHECKING:
    from loguru import Record

__all__ = ["main"]

DEFAULT_PORT = 8765
PIN_ENV = "TRIO_RELAY_PIN"
DATA_DIR_ENV = "TRIO_RELAY_DATA_DIR"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trio-relay"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-relay", description="A WebSocket relay for live project, chat and agent sync."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the relay with its default SQLite backend")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port to bind; 0 picks a free one (default {DEFAULT_PORT})")
    serve.add_argument("--pin", default=None,
                       help=f"the PIN clients must send (default: ${PIN_ENV}, else a random one"
                       " printed once)")
    serve.add_argument("--data-dir", type=Path, default=None,
                       help=f"where the SQLite database lives (default: ${DATA_DIR_ENV}, else"
                       " $XDG_DATA_HOME/trio-relay or ~/.local/share/trio-relay)")
    serve.add_argument("--log-level", default="INFO",
                       choices=["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"],
                       help="log verbosity on stderr (default INFO)")
    return parser


def _log_format(record: Record) -> str:
    extra = record["extra"]
    context = " ".join(f"{key}={extra[key]}" for key in ("conn", "peer", "resource")
                       if key in extra)
    # The context is data, not format: escape braces so loguru does not interpret them.
    context = context.replace("{", "{{").replace("}", "}}")
    prefix = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | "
    return prefix + (context + " | " if context else "") + "{message}\n{exception}"


def configure_logging(level: str) -> None:
    logger.remove()
    logger.add(sys.stderr, level=level, format=_log_format, backtrace=False, diagnose=False)
    logger.enable("trio_relay")


async def serve(args: argparse.Namespace, pin: str, generated: bool) -> None:
    from ._sqlite_backend import open_sqlite_backend

    data_dir: Path = args.data_dir or default_data_dir()
    async with open_sqlite_backend(data_dir) as backend:
        async with open_relay(backend, pin=pin, config=RelayConfig()) as relay:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                port = await relay.start_serving(args.host, args.port)
                host = f"[{args.host}]" if ":" in args.host else args.host
                # Printed, not logged: the PIN must never reach a log line.
                print(f"trio-relay serving ws://{host}:{port}/ws", flush=True)
                print(f"PIN: {pin}" + (" (generated; set --pin or $TRIO_RELAY_PIN to choose)"
                                       if generated else ""), flush=True)
                print(f"data: {data_dir}", flush=True)
                async for signum in signals:
                    logger.info("received {}, shutting down", signal.Signals(signum).name)
                    break
    logger.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        configure_logging(args.log_level)
        pin = args.pin or os.environ.get(PIN_ENV) or ""
        generated = not pin
        if generated:
            pin = f"{secrets.randbelow(10**6):06d}"
        try:
            trio.run(serve, args, pin, generated)
        except OSError as exc:
            print(f"trio-relay: {exc}", file=sys.stderr)
            return 1
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


