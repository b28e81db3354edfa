"""The ``trio-relay`` command: ``trio-relay serve`` runs the relay with its default backend,
``trio-relay config check FILE`` checks a config file, ``trio-relay chat URL`` is a client,
``trio-relay pin`` and ``trio-relay devices`` look after pairing (``pairing.json`` in the data
dir)."""

from __future__ import annotations

import argparse
import errno
import gc
import importlib.metadata
import logging
import os
import signal
import ssl
import sys
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import trio
from loguru import logger

from .._chat import add_chat_command, run_chat
from .._server.counters import RelayCounters
from .._server.pairing import PAIRING_FILE, FileDeviceStore, PairingFileError
from .._server.relay import open_broker, open_relay
from .._store.backend import BackendError
from .._store.sqlite import SqliteBackend, open_sqlite_backend
from .._stream.bus import Bus, BusError
from .load import load_settings, unknown_variables
from .settings import ServeSettings, Setting, SettingsError, all_settings, check_programs

if TYPE_CHECKING:
    from loguru import Record

    from .._store.postgres import PostgresBackend

#: The stores `serve` runs on: SQLite in the data dir, or a shared PostgreSQL database.
Store: TypeAlias = "SqliteBackend | PostgresBackend"

__all__ = ["main"]


#: Generation thresholds for `tune_garbage_collector` (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS: Final = (50_000, 20, 100)


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """Where the database lives when no data_dir is set: the XDG data directory."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trio-relay"


class PortInUse(Exception):
    """The address to serve on is taken; the message says so and what to do."""


def _version() -> str:
    try:
        return importlib.metadata.version("trio-relay")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        from .. import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-relay", description="A WebSocket relay for live project, chat and agent sync."
    )
    parser.add_argument("--version", action="version", version=f"trio-relay {_version()}")
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
    pin = commands.add_parser(
        "pin", help="print the PIN (or make a new one)",
        description="Print the PIN that `trio-relay serve` uses, kept in pairing.json in the"
        " data dir (made on first use). With --new, replace it: a running relay takes the new"
        " one within a second; devices paired with the old one stay paired (revoke them with"
        " `trio-relay devices --revoke`). --pin and $TRIO_RELAY_PIN override it for one run of"
        " serve, without changing it.",
    )
    pin.add_argument("--new", action="store_true", help="replace the PIN with a new random one")
    _add_data_dir_arguments(pin)
    devices = commands.add_parser(
        "devices", help="list or revoke paired devices",
        description="List the devices paired with the relay (id, name, when paired, when last"
        " seen), or revoke one: its token stops working and a running relay closes its"
        " connections within a second; it must enter the PIN again.",
    )
    devices.add_argument("--revoke", metavar="NAME|ID", help="revoke the device with this id"
                         " or, if only one has it, this name")
    _add_data_dir_arguments(devices)
    add_chat_command(commands)
    return parser


def _add_data_dir_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="PATH", type=Path, default=None,
                        help="the relay's data dir ($TRIO_RELAY_DATA_DIR; default"
                        " $XDG_DATA_HOME/trio-relay, else ~/.local/share/trio-relay)")
    parser.add_argument("--config", metavar="FILE", type=Path, default=None,
                        help="take data_dir from this config file, as serve would")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and a flag for every setting; `flag_values` reads them back."""
    parser.add_argument("--config", metavar="FILE", type=Path, default=None,
                        help="read settings from this TOML file (docs/operations.md)")
    groups: dict[tuple[str, ...], Any] = {}
    for setting in all_settings():
        table = setting.path[:-1]
        if table not in groups:
            title = f"[{'.'.join(table)}] settings" if table else "settings"
            groups[table] = parser.add_argument_group(title) if table else parser
        help_text = (setting.doc.replace("`", "") + f" (${setting.env}; default "
                     + setting.default_text.replace("`", "") + ")").replace("%", "%%")
        if setting.is_list:
            help_text += "; repeat the flag or separate with commas"
        groups[table].add_argument(
            setting.flag, dest=setting.key, default=None, help=help_text,
            metavar=_metavar(setting), action="append" if setting.is_list else "store",
        )


def _metavar(setting: Setting) -> str:
    if setting.is_list:
        return "ITEM[,ITEM...]"
    return {int: "INT", float: "NUMBER",
            bool: "BOOL", Path: "PATH"}.get(setting.type, setting.name.upper())


def flag_values(namespace: argparse.Namespace) -> dict[str, str | Sequence[str]]:
    """The flags given on the command line, keyed by setting key, for `load_settings`."""
    values = vars(namespace)
    given: dict[str, str | Sequence[str]] = {}
    for setting in all_settings():
        value = values.get(setting.key)
        if value is not None:
            given[setting.key] = value
    return given


def _pairing_path(args: argparse.Namespace) -> Path:
    flags = {"data_dir": str(args.data_dir)} if args.data_dir is not None else {}
    settings = load_settings(config_file=args.config, environ=os.environ, flags=flags)
    return (settings.data_dir or default_data_dir(os.environ)) / PAIRING_FILE


def pin_command(args: argparse.Namespace) -> int:
    """``trio-relay pin [--new]``."""
    path = _pairing_path(args)
    store = FileDeviceStore(path)
    if args.new:
        print(store.new_pin())
        print(f"The new PIN is kept in {path}; a running relay uses it within a second."
              " Devices paired before stay paired (trio-relay devices --revoke NAME|ID).",
              file=sys.stderr)
    else:
        print(store.pin)
    return 0


def devices_command(args: argparse.Namespace) -> int:
    """``trio-relay devices [--revoke NAME|ID]``."""
    path = _pairing_path(args)
    store = FileDeviceStore(path)
    if args.revoke is None:
        devices = store.devices()
        if not devices:
            print("No paired devices.")
            return 0
        rows = [("ID", "NAME", "PAIRED", "LAST SEEN")]
        rows += [(d.id, d.name, d.created, d.last_seen) for d in devices]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[3]]))
        return 0
    found = store.find(args.revoke)
    if not found:
        print(f"trio-relay: no paired device has the id or name {args.revoke!r}", file=sys.stderr)
        return 1
    if len(found) > 1:
        ids = ", ".join(d.id for d in found)
        print(f"trio-relay: {len(found)} devices are named {args.revoke!r}; revoke one by its"
              f" id: {ids}", file=sys.stderr)
        return 1
    device = found[0]
    store.revoke(device.id)
    print(f"Revoked {device.id} ({device.name}); a running relay closes its connections"
          " within a second.")
    return 0


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
    # The drivers (coredis, psycopg) log through the standard library: their warnings go to
    # the same place, in the same format, rather than print in another shape.
    for name in _DRIVER_LOGGERS:
        stdlib = logging.getLogger(name)
        stdlib.handlers = [_ToLoguru()]
        stdlib.setLevel(logging.WARNING)
        stdlib.propagate = False


_DRIVER_LOGGERS: Final = ("coredis", "psycopg")


class _ToLoguru(logging.Handler):
    """Hands a standard-library log record to loguru, at its level, naming its logger."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info is not None and record.exc_info[0] is not None
                   ).log(level, "{}: {}", record.name, record.getMessage())


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for ``cert`` (a PEM chain) and its unencrypted ``key``."""

    def refuse_password() -> str:
        # Without this OpenSSL would prompt for a passphrase on the terminal.
        raise ValueError("the key is encrypted; trio-relay needs an unencrypted key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key, password=refuse_password)
    return context


#: A full collection follows every this many connections ended, or as many as are open if
#: that is more (`collect_after_closes`).
GC_AFTER_CLOSES: Final = 1000


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


async def collect_after_closes(
    counters: RelayCounters, *, at_least: int = GC_AFTER_CLOSES, interval: float = 1.0
) -> None:
    """With thresholds this high, cyclic garbage is seldom collected, and every finished
    WebSocket leaves some: wsproto's frame parser holds a generator of itself. A full
    collection after every ``max(at_least, open connections)`` connections ended keeps that
    garbage bounded at a cost proportional to the connections closed (a collection scans
    the open ones)."""
    collected_at = counters.connections_closed
    while True:
        await trio.sleep(interval)
        closed = counters.connections_closed
        still_open = counters.connections_accepted - closed
        if closed - collected_at >= max(at_least, still_open):
            gc.collect()
            collected_at = closed


async def open_listeners(
    host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[list[trio.abc.Listener[Any]], int]:
    """Bind ``host``:``port``; return the listeners and the bound port (`PortInUse` if the
    port is taken)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        tcp = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"{shown} is already in use; choose another with --port") from None
        raise
    bound: int = tcp[0].socket.getsockname()[1]
    if ssl_context is None:
        return list(tcp), bound
    # https_compatible: see Relay.serve.
    return [trio.SSLListener(listener, ssl_context, https_compatible=True)
            for listener in tcp], bound


async def serve(
    settings: ServeSettings, data_dir: Path, ssl_context: ssl.SSLContext | None = None
) -> None:
    # Bound before anything is written: a start that fails on a busy port leaves no data dir.
    listeners, port = await open_listeners(settings.host, settings.port, ssl_context)
    async with AsyncExitStack() as stack:
        try:
            # Reached before anything is written too: nor does an unreachable broker or
            # database.
            broker = await _open_broker(stack, settings)
            database = await _open_database(stack, settings)
            devices = FileDeviceStore(data_dir / PAIRING_FILE)
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        backend: Store = (
            database if database is not None
            else await stack.enter_async_context(open_sqlite_backend(data_dir))
        )
        await _serve(settings, data_dir, ssl_context, listeners, port, devices, broker, backend)


async def _open_database(stack: AsyncExitStack, settings: ServeSettings) -> Store | None:
    """The PostgreSQL store of ``settings.database`` (None without one: SQLite)."""
    if settings.database is None:
        return None
    from .._store.postgres import open_postgres_backend  # only with trio-relay[postgres]

    return await stack.enter_async_context(open_postgres_backend(
        settings.database, lease=settings.database_lease,
        pool_size=settings.database_pool_size,
    ))


async def _open_broker(stack: AsyncExitStack, settings: ServeSettings) -> Bus | None:
    """The Redis bus of ``settings.broker.url`` (None without one), opened on ``stack`` as
    `open_relay` would open it for the URL."""
    if settings.broker.url is None:
        return None
    return await stack.enter_async_context(open_broker(settings.broker.url, settings.relay))


async def _serve(
    settings: ServeSettings, data_dir: Path, ssl_context: ssl.SSLContext | None,
    listeners: list[trio.abc.Listener[Any]], port: int, devices: FileDeviceStore,
    broker: Bus | None, backend: Store,
) -> None:
    if settings.model_profiles is not None:
        # The config file's profiles replace the database's; their commands stay here.
        await backend.set_model_profiles(
            [profile.wire() for profile in settings.model_profiles], settings.agents()
        )
    async with open_relay(
        backend, pin=settings.pin, config=settings.relay, devices=devices,
        broker=broker,
    ) as relay:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.serve_listeners, listeners)
                nursery.start_soon(collect_after_closes, relay.counters)
                host = f"[{settings.host}]" if ":" in settings.host else settings.host
                scheme = "ws" if ssl_context is None else "wss"
                # Printed, not logged: the PIN must never reach a log line.
                print(f"trio-relay serving {scheme}://{host}:{port}/ws", flush=True)
                if settings.pin is not None:
                    print(f"PIN: {relay.pin}", flush=True)
                else:
                    print(f"PIN: {relay.pin} (kept in {PAIRING_FILE}; `trio-relay pin --new`"
                          " replaces it)", flush=True)
                print(f"data: {data_dir}", flush=True)
                if settings.database is not None:
                    print(f"database: {getattr(backend, 'where', 'PostgreSQL')}", flush=True)
                if settings.broker.url is not None:
                    print(f"broker: {redact_url(settings.broker.url)}", flush=True)
                if settings.relay.web_client:
                    web = "http" if ssl_context is None else "https"
                    print(f"web client: {web}://{host}:{port}/", flush=True)
                async for signum in signals:
                    logger.info("received {}, shutting down", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()  # stop accepting first
        # Leaving open_relay closes every client with 1001.
    logger.info("stopped")


def _missing_extra(settings: ServeSettings, exc: ImportError) -> str | None:
    """What to install, when ``exc`` is a driver of an extra the settings ask for."""
    name = exc.name or ""
    if settings.broker.url is not None and name.startswith("coredis"):
        return "a Redis broker needs `pip install 'trio-relay[redis]'`"
    if settings.database is not None and name.startswith(("psycopg", "psycopg_pool")):
        return "a PostgreSQL database needs `pip install 'trio-relay[postgres]'`"
    return None


def redact_url(url: str) -> str:
    """``url`` without its password, fit for a terminal or a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


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
    if args.command in ("pin", "devices"):
        try:
            return pin_command(args) if args.command == "pin" else devices_command(args)
        except (SettingsError, PairingFileError) as exc:
            print(f"trio-relay: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, SettingsError) else 1
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
            trio.run(serve, settings, data_dir, ssl_context)
        except (OSError, PortInUse, PairingFileError, BusError, BackendError) as exc:
            print(f"trio-relay: {exc}", file=sys.stderr)
            return 1
        except ImportError as exc:
            extra = _missing_extra(settings, exc)
            if extra is None:
                raise
            print(f"trio-relay: {extra} ({exc})", file=sys.stderr)
            return 1
        return 0
    if args.command == "chat":
        try:
            return int(trio.run(run_chat, args))
        except KeyboardInterrupt:
            return 130
    return 2  # pragma: no cover - argparse rejects unknown commands
