"""``trio-relay chat URL``: a terminal client of the relay, built on `trio_relay.client` alone.

It authenticates, lists the projects and their chats, attaches to one chat, prints its
history and then everything that happens in it as it happens (agent replies stream in piece
by piece), and sends each line typed. Lines starting with ``/`` are commands (``/help``).

On a terminal it edits the input line itself, over a raw tty: output scrolls above the line
being typed, which is redrawn after each piece, so an incoming message or a streaming reply
never breaks what you are typing. Otherwise (input from a pipe or a file) it reads lines as
they come and prints plainly, and end of input leaves once the replies to what was sent have
come (within ``--linger`` seconds). Connection trouble is reported while the client
reconnects and resumes by itself.

This module signs in (a saved device token, else the PIN, asked again if typed wrong), picks
the screen, wires Ctrl-C, and turns errors into the exit status; `session.Session` is the
rest.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import trio

from .._errors import single_error
from ..client import AuthFailed, Connect, RelayClientError, TokenInvalid, open_relay_client
from .cli import PIN_VARIABLE
from .devices import SavedDevices, devices_file
from .screen import PlainScreen
from .session import Session
from .terminal import TerminalScreen

__all__ = ["run_chat"]


class _WrongPin(Exception):
    """The PIN typed at the prompt was refused on connecting: ask again."""


class _Unpaired(Exception):
    """The saved token was refused on connecting: pair again with the PIN."""


async def _ask_pin(args: argparse.Namespace, env: Mapping[str, str],
                   stdin: trio.abc.ReceiveStream | None) -> str:
    pin = args.pin or env.get(PIN_VARIABLE)
    if not pin and stdin is None:
        # getpass turns echo off and back on; abandoned in its thread by Ctrl-C it never
        # turns it back on, so the terminal's settings are put back here.
        saved = _terminal_settings()
        try:
            pin = await trio.to_thread.run_sync(getpass.getpass, "PIN: ", abandon_on_cancel=True)
        except EOFError:
            pin = ""
        except BaseException:
            if saved is not None:
                import termios

                termios.tcsetattr(saved[0], termios.TCSADRAIN, saved[1])
                sys.stderr.write("\n")
            raise
    return pin or ""


def _terminal_settings() -> tuple[int, list[Any]] | None:
    """The terminal's fd and settings, when stdin is one."""
    try:
        if not sys.stdin.isatty():
            return None
        import termios

        fd = sys.stdin.fileno()
        return fd, termios.tcgetattr(fd)
    except (OSError, ValueError, ImportError):
        return None


async def run_chat(
    args: argparse.Namespace,
    *,
    stdin: trio.abc.ReceiveStream | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    connect: Connect | None = None,
    environ: Mapping[str, str] | None = None,
    interactive: bool | None = None,
) -> int:
    """Run ``trio-relay chat``; returns the exit status (0, 1 on failure, 130 on Ctrl-C).

    The keyword arguments are for tests and embedding: input lines from a stream instead of
    the process's stdin, output to other files, the client's ``connect``, the environment
    (the PIN, where device tokens are kept), and whether to ask which chat (default: when
    stdin is a terminal). The line editor is used when both stdin and stdout are the
    process's own and are a terminal.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    if interactive is None:
        interactive = stdin is None and sys.stdin.isatty()
    name = (args.name or "").strip() or socket.gethostname()[:64] or "Terminal"
    if len(name) > 64 or not name.isprintable():
        err.write("trio-relay chat: --name must be 1 to 64 characters, without control"
                  " characters\n")
        return 1
    ssl_context = None
    if args.cafile:
        try:
            ssl_context = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            err.write(f"trio-relay chat: cannot load {args.cafile}: {exc}\n")
            return 1
    saved = SavedDevices(devices_file(env), err)
    token = saved.token(args.url)
    typed = False  # the PIN came from the prompt, not from --pin or the environment
    while True:
        pin = None
        if token is None:
            typed = stdin is None and not (args.pin or env.get(PIN_VARIABLE))
            pin = await _ask_pin(args, env, stdin)
            if not pin:
                err.write(f"trio-relay chat: no PIN: pass --pin or set ${PIN_VARIABLE}\n")
                return 1
        try:
            return await _run(
                args, pin=pin, token=token, name=name, ssl_context=ssl_context, saved=saved,
                stdin=stdin, out=out, err=err, connect=connect, env=env,
                interactive=interactive, typed=typed)
        except _WrongPin as exc:
            err.write(f"trio-relay chat: {exc}; try again\n")  # (the user asked anew)
            err.flush()
        except _Unpaired:
            saved.forget(args.url)
            err.write("trio-relay chat: the relay no longer knows this device (revoked, or its"
                      " pairings were reset): sign in with the PIN to pair it again\n")
            err.flush()
            token = None


async def _run(
    args: argparse.Namespace, *, pin: str | None, token: str | None, name: str,
    ssl_context: ssl.SSLContext | None, saved: SavedDevices,
    stdin: trio.abc.ReceiveStream | None, out: TextIO, err: TextIO, connect: Connect | None,
    env: Mapping[str, str], interactive: bool, typed: bool,
) -> int:
    """One sign-in and the session after it; `_Unpaired` if the saved token was refused,
    `_WrongPin` if the PIN ``typed`` at the prompt was."""
    interrupted = False
    signed_in = False
    # What Ctrl-C cancels: connecting at first, then only the session, so that leaving the
    # client's block closes the connection with the client's tasks still running (they read
    # the relay's answer to our close; cancelled, the close waited for its 2 s timeout).
    target: trio.CancelScope | None = None

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        if target is not None:
            target.cancel()

    editing = (stdin is None and out is sys.stdout and sys.stdin.isatty()
               and sys.stdout.isatty() and env.get("TERM", "") != "dumb")
    io: PlainScreen | TerminalScreen
    if editing:
        io = TerminalScreen(sys.stdin.fileno(), out, on_interrupt=interrupt,
                         color="NO_COLOR" not in env)
    else:
        io = PlainScreen(stdin, out, err)
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            target = nursery.cancel_scope
            if threading.current_thread() is threading.main_thread():
                async def on_ctrl_c(task_status: trio.TaskStatus[None]) -> None:
                    with trio.open_signal_receiver(signal.SIGINT) as signals:
                        task_status.started()
                        async for _ in signals:
                            interrupt()

                await nursery.start(on_ctrl_c)
                if isinstance(io, TerminalScreen):
                    async def on_resize() -> None:
                        with trio.open_signal_receiver(signal.SIGWINCH) as signals:
                            async for _ in signals:
                                io.redraw()

                    nursery.start_soon(on_resize)
            async with open_relay_client(
                args.url, pin=pin, token=token, device_name=name if pin else None,
                request_timeout=args.timeout, ssl_context=ssl_context, connect=connect,
            ) as client:
                signed_in = True
                if client.device is not None:
                    saved.save(args.url, client.device)
                with trio.CancelScope() as target:
                    if interrupted:
                        target.cancel()
                    device_id = client.device.id if client.device is not None else None
                    session = Session(client, args, io, interactive=interactive,
                                       device_id=device_id)
                    if isinstance(io, TerminalScreen):
                        with io.raw():
                            status = await session.run()
                    else:
                        status = await session.run()
            nursery.cancel_scope.cancel()
    except BaseException as exc:
        error = single_error(exc)
        if isinstance(error, TokenInvalid):
            if not signed_in:
                raise _Unpaired from None
            saved.forget(args.url)  # refused on a reconnect: the next run asks for the PIN
        elif isinstance(error, AuthFailed) and error.code == "auth_failed" and typed and (
            not signed_in
        ):
            raise _WrongPin(error.error) from None
        if isinstance(error, RelayClientError):
            return _failed(error, out, err)
        if isinstance(error, ValueError):  # a malformed URL
            err.write(f"trio-relay chat: {error}\n")
            return 1
        if not isinstance(error, KeyboardInterrupt):
            raise
        interrupted = True
    if interrupted:
        if not editing:
            out.write("\n")
            out.flush()
        return 130
    return status


def _failed(exc: RelayClientError, out: TextIO, err: TextIO) -> int:
    out.flush()
    err.write(f"\ntrio-relay chat: {exc}\n")
    err.flush()
    return 1
