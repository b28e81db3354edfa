"""`CommandAgent`: answers each message by running a program and streaming its stdout.

Every message starts the command once, in a process group of its own, so that stopping a run
(a timeout, a cancel, a shutdown) stops everything it started. What it prints is emitted as it
is read; a failure is an `AgentError` that says what happened (docs/agents.md).
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs
import trio
from loguru import logger

from .._errors import positive
from .agent import AgentError, Emit, HistoryItem

__all__ = ["PROMPT_MODES", "CommandAgent"]

#: Where a `CommandAgent` puts the message it answers: on its stdin, or as its last argument.
PROMPT_MODES: Final = ("stdin", "argument")
#: Bytes of a command's stderr kept for the log line of a failed run.
STDERR_TAIL: Final = 2000
#: Seconds to wait for a killed command's process to be reaped before giving up on it.
_REAP_TIMEOUT: Final = 5.0


def _argv(instance: object, attribute: attrs.Attribute[tuple[str, ...]],
          value: tuple[str, ...]) -> None:
    if not value or not value[0]:
        raise ValueError("argv must name a program")


def _prompt(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in PROMPT_MODES:
        raise ValueError(f"prompt must be 'stdin' or 'argument', got {value!r}")


@attrs.frozen(kw_only=True)
class CommandAgent:
    """Answers each message by running ``argv`` and streaming what it prints on stdout.

    Every run is its own process group (a new session), so stopping a run stops everything
    the command started: on a timeout, a cancel or a shutdown the group gets SIGTERM, then
    SIGKILL after ``stop_grace`` seconds. When the command exits by itself, whatever it left
    running in its group is killed at once. The run's reply is its stdout, decoded as UTF-8
    (undecodable bytes become U+FFFD); each piece is emitted as soon as it is read.
    """

    #: The program and its arguments; a bare program name is looked up on ``PATH``.
    argv: tuple[str, ...] = attrs.field(validator=_argv)
    #: Working directory of the command; None: the relay's own.
    cwd: Path | None = None
    #: Environment variables set for the command, over the inherited ones.
    env: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    #: Whether the command inherits the relay's environment (without ``TRIO_RELAY_*``).
    inherit_env: bool = True
    #: ``"stdin"``: the message is written to the command's stdin; ``"argument"``: it is
    #: appended to ``argv``.
    prompt: str = attrs.field(default="stdin", validator=_prompt)
    #: Whether the chat's earlier messages are written to stdin first, as JSON lines.
    history: bool = False
    #: Seconds a run may take before it is stopped and reported as timed out.
    timeout: float = attrs.field(default=600.0, validator=positive)
    #: Bytes of output a run may print before it is stopped and reported.
    max_output: int = attrs.field(default=1 << 20, validator=positive)
    #: Seconds between SIGTERM and SIGKILL when a run is stopped.
    stop_grace: float = attrs.field(default=2.0, validator=positive)
    #: What log lines call it (the model profile's id).
    label: str = "command"

    @property
    def wants_history(self) -> bool:
        """The `Agent` protocol's switch: ``reply`` gets the chat's history with ``history``."""
        return self.history

    def environment(self) -> dict[str, str]:
        """The command's environment. The relay's own settings (``TRIO_RELAY_*``, the PIN
        among them) are never passed on, unless ``env`` sets them."""
        inherited = {} if not self.inherit_env else {
            key: value for key, value in os.environ.items() if not key.startswith("TRIO_RELAY_")
        }
        return {**inherited, **self.env}

    def stdin_bytes(self, content: str, history: Sequence[HistoryItem] = ()) -> bytes | None:
        """What the command reads on stdin, or None for nothing (``/dev/null``).

        Without ``history``: the message as is with ``prompt = "stdin"``, else nothing. With
        it: one JSON object per earlier message, ``{"role": ..., "content": ...}``, a line
        each, then, with ``prompt = "stdin"``, the message itself as a last such line.
        """
        if not self.history:
            return content.encode() if self.prompt == "stdin" else None
        items = [{"role": item["role"], "content": item["content"]} for item in history]
        if self.prompt == "stdin":
            items.append({"role": "user", "content": content})
        return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode()

    async def reply(
        self, content: str, emit: Emit, history: Sequence[HistoryItem] = ()
    ) -> str:
        """Run the command once for ``content``; stream its stdout through ``emit``.

        Raises `AgentError` if the program cannot be started, exits with a non-zero status or
        a signal, prints more than ``max_output`` bytes, or runs longer than ``timeout``. If
        the caller cancels, the process group is stopped before the cancellation goes on.
        """
        argv = [*self.argv, content] if self.prompt == "argument" else list(self.argv)
        data = self.stdin_bytes(content, history)
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL if data is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=self.environment(),
                start_new_session=True,  # its own process group, which we can kill whole
            )
        except OSError as exc:
            raise self._start_error(exc) from None
        logger.debug("agent {} started, pid {}", self.label, process.pid)
        run = _Run(process, emit, self.max_output)
        try:
            with trio.move_on_after(self.timeout) as timer:
                await run.communicate(data, self.stop_grace)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop(process)
        text = run.text()
        tail = run.stderr_tail()
        where = f"{self.label}: {self.argv[0]!r}"
        if timer.cancelled_caught:
            raise AgentError(f"agent timed out after {self.timeout:g} s",
                             f"{where} timed out after {self.timeout:g} s; stopped" + tail)
        if run.overflowed:
            raise AgentError(f"agent printed more than {self.max_output} bytes",
                             f"{where} printed more than {self.max_output} bytes; stopped"
                             + tail)
        status = process.returncode
        if status != 0:
            if status is not None and status < 0:
                how = f"was killed by {_signal_name(-status)}"
            else:
                how = f"exited with status {status}"
            raise AgentError(f"agent {how}", f"{where} {how}" + tail)
        logger.debug("agent {} exited, {} characters", self.label, len(text))
        return text

    def _start_error(self, exc: OSError) -> AgentError:
        program = self.argv[0]
        if self.cwd is not None and str(exc.filename) == str(self.cwd):
            message = f"agent could not start: cannot use directory {str(self.cwd)!r}"
        elif isinstance(exc, FileNotFoundError):
            message = f"agent could not start: program {program!r} not found"
        else:
            message = f"agent could not start {program!r}: {exc.strerror or exc}"
        return AgentError(message, f"{self.label}: {message.removeprefix('agent ')}")

    async def _stop(self, process: trio.Process) -> None:
        """Leave no process of the run's group behind, and close its pipes. Shielded."""
        if process.returncode is None:
            logger.debug("stopping agent {}, pid {}", self.label, process.pid)
            _signal_group(process.pid, signal.SIGTERM)
            with trio.move_on_after(self.stop_grace):
                await process.wait()
        # Whatever is left in the group: the leader if it outlived the grace, and anything it
        # started that is still running. The group id is the leader's pid, which the kernel
        # does not hand out again while any member of the group is alive.
        _signal_group(process.pid, signal.SIGKILL)
        with trio.move_on_after(_REAP_TIMEOUT):
            await process.wait()
        if process.returncode is None:  # pragma: no cover - a process stuck in the kernel
            logger.error("agent {} (pid {}) did not exit after SIGKILL", self.label, process.pid)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # the group is empty: nothing left to stop
    except PermissionError:  # pragma: no cover - not our group any more
        logger.warning("cannot signal process group {}", pgid)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Run:
    """The streams of one running command: stdin fed, stdout streamed, stderr's tail kept."""

    def __init__(self, process: trio.Process, emit: Emit, limit: int) -> None:
        self.process = process
        self.emit = emit
        self.limit = limit
        self.overflowed = False
        self._pieces: list[str] = []
        self._size = 0
        self._stderr = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text(self) -> str:
        return "".join(self._pieces)

    def stderr_tail(self) -> str:
        text = bytes(self._stderr).decode(errors="replace").strip()
        return f"; stderr: {text}" if text else ""

    async def communicate(self, data: bytes | None, grace: float) -> None:
        async with trio.open_nursery() as nursery:
            if data is not None:
                nursery.start_soon(self._feed, data)
            nursery.start_soon(self._read_stderr)
            nursery.start_soon(self._read_stdout, nursery.cancel_scope)
            await self.process.wait()
            # The command is done. Kill what it left in its group, so that nothing holds the
            # pipes open, and give the readers a moment to take what is still in them.
            _signal_group(self.process.pid, signal.SIGKILL)
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline,
                                                trio.current_time() + grace)

    async def _feed(self, data: bytes) -> None:
        stream = self.process.stdin
        assert stream is not None
        try:
            await stream.send_all(data)
            await stream.aclose()  # end of input
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the command stopped reading: not our problem, its exit status tells

    async def _read_stdout(self, scope: trio.CancelScope) -> None:
        stream = self.process.stdout
        assert stream is not None
        while data := await stream.receive_some():
            self._size += len(data)
            if self._size > self.limit:
                self.overflowed = True
                _signal_group(self.process.pid, signal.SIGKILL)
                scope.cancel()
                return
            self._push(self._decoder.decode(data))
        self._push(self._decoder.decode(b"", final=True))

    def _push(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self.emit(piece)

    async def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        while data := await stream.receive_some():
            self._stderr += data
            del self._stderr[:-STDERR_TAIL]
