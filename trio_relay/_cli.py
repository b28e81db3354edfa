"""The ``trio-relay`` command: ``trio-relay serve`` runs the relay with its default backend,
``trio-relay config check FILE`` checks a config file, ``trio-relay chat URL`` is a client."""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import signal
import ssl
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from loguru import logger

from ._chat_cli import add_chat_command, run_chat
from ._relay import open_relay
from ._settings import (
    ServeSettings,
    SettingsError,
    add_arguments,
    check_programs,
    flag_values,
    load_settings,
    unknown_variables,
)

if TYPE_CHECKING:
    from loguru import Record

__all__ = ["main"]


#: Generation thresholds for `tune_garbage_collector` (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS: Final = (50_000, 20, 100)


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """Where the database lives when no data_dir is set: the XDG data directory."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trio-relay"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-relay", description="A WebSocket relay for live project, chat and agent sync."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the relay with its default SQLite backend",
        description="Run the relay with its default SQLite backend. Every setting comes from,"
        " in increasing precedence: its default, the --config file, its TRIO_RELAY_<NAME>"
        " environment variable, its flag (docs/operations.md).",
        # A new flag must not change what an abbreviation someone relies on means.
        allow_abbrev=False,
    )
    add_arguments(serve)
    config = commands.add_parser(
        "config", help="check a config file", description="Work with config files."
    )
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser(
        "check", help="check a config file without serving",
        description="Check FILE as `trio-relay serve --config FILE` would read it (the"
        " TRIO_RELAY_<NAME> environment variables included): print a summary and exit 0, or"
        " one line per problem, naming the file and the key, and exit 2. Programs of command"
        " profiles that cannot be found are warned about, as serve does.",
    )
    check.add_argument("file", metavar="FILE", type=Path, help="the TOML config file")
    add_chat_command(commands)
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


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for ``cert`` (a PEM chain) and its unencrypted ``key``."""

    def refuse_password() -> str:
        # Without this OpenSSL would prompt for a passphrase on the terminal.
        raise ValueError("the key is encrypted; trio-relay needs an unencrypted key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key, password=refuse_password)
    return context


def tune_garbage_collector() -> None:
    """Collect cyclic garbage less often, as a long-running server should.

    Every connection holds a few hundred objects that live as long as it does; with CPython's
    default thresholds (700, 10, 10) a relay with thousands of clients spends much of its time
    scanning them again. Objects made before serving (modules, settings) are frozen out of
    the scans altogether. docs/performance.md has the measurements.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    settings: ServeSettings, pin: str, generated: bool, data_dir: Path,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    from ._sqlite_backend import open_sqlite_backend

    async with open_sqlite_backend(data_dir) as backend:
        if settings.model_profiles is not None:
            # The config file's profiles replace the database's; their commands stay here.
            await backend.set_model_profiles(
                [profile.wire() for profile in settings.model_profiles], settings.agents()
            )
        async with open_relay(backend, pin=pin, config=settings.relay) as relay:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                port = await relay.start_serving(
                    settings.host, settings.port, ssl_context=ssl_context
                )
                host = f"[{settings.host}]" if ":" in settings.host else settings.host
                scheme = "ws" if ssl_context is None else "wss"
                # Printed, not logged: the PIN must never reach a log line.
                print(f"trio-relay serving {scheme}://{host}:{port}/ws", flush=True)
                print(f"PIN: {pin}" + (" (generated; set --pin or $TRIO_RELAY_PIN to choose)"
                                       if generated else ""), flush=True)
                print(f"data: {data_dir}", flush=True)
                if settings.relay.web_client:
                    web = "http" if ssl_context is None else "https"
                    print(f"web client: {web}://{host}:{port}/", flush=True)
                async for signum in signals:
                    logger.info("received {}, shutting down", signal.Signals(signum).name)
                    break
            # Leaving open_relay stops accepting, then closes every client with 1001.
    logger.info("stopped")


def check_config(file: Path) -> int:
    """``trio-relay config check FILE``: 0 and a summary, or 2 and a line per problem."""
    try:
        settings = load_settings(config_file=file, environ=os.environ)
    except SettingsError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            server_ssl_context(settings.tls_cert, settings.tls_key)
        except (OSError, ValueError) as exc:
            print(f"{file}: tls_cert, tls_key: cannot load {settings.tls_cert} and"
                  f" {settings.tls_key}: {exc}", file=sys.stderr)
            return 2
    for key, problem in check_programs(settings):
        print(f"warning: {file}: {key}: {problem}", file=sys.stderr)
    profiles = settings.model_profiles
    if profiles is None:
        summary = "no model profiles (the database's are kept)"
    else:
        ids = ", ".join(f"{p.id} ({p.agent})" for p in profiles)
        summary = f"{len(profiles)} model profile{'s' * (len(profiles) != 1)}: {ids}"
    scheme = "ws" if settings.tls_cert is None else "wss"
    data_dir = settings.data_dir or default_data_dir(os.environ)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"ok: {summary}; serving {scheme}://{host}:{settings.port}/ws; data in {data_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        return check_config(args.file)
    if args.command == "serve":
        try:
            settings = load_settings(
                config_file=args.config, environ=os.environ, flags=flag_values(args)
            )
        except SettingsError as exc:
            print(f"trio-relay: {exc}", file=sys.stderr)
            return 2
        configure_logging(settings.log_level)
        for name in unknown_variables(os.environ):
            logger.warning("ignoring {}: no setting has that name", name)
        for key, problem in check_programs(settings):
            logger.warning("{}: {}: {}", args.config, key, problem)
        pin = settings.pin or f"{secrets.randbelow(10**6):06d}"
        ssl_context = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            try:
                ssl_context = server_ssl_context(settings.tls_cert, settings.tls_key)
            except (OSError, ValueError) as exc:
                print(f"trio-relay: cannot load TLS certificate {settings.tls_cert} and key"
                      f" {settings.tls_key}: {exc}", file=sys.stderr)
                return 1
        data_dir = settings.data_dir or default_data_dir(os.environ)
        tune_garbage_collector()
        try:
            trio.run(serve, settings, pin, settings.pin is None, data_dir, ssl_context)
        except OSError as exc:
            print(f"trio-relay: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "chat":
        try:
            return int(trio.run(run_chat, args))
        except KeyboardInterrupt:
            return 130
    return 2  # pragma: no cover - argparse rejects unknown commands
