"""The settings of ``trio-relay serve``, declared once as attrs classes.

One class tree, `ServeSettings` holding a `RelayConfig` as its ``relay`` table, defines every
setting. typed-settings lists its leaves (`all_settings`), and each leaf is, automatically:

- a key of the TOML config file: top-level fields at the top, ``RelayConfig`` fields in the
  ``[relay]`` table (``relay.max_message_size``);
- an environment variable ``TRIO_RELAY_<NAME>`` (``TRIO_RELAY_MAX_MESSAGE_SIZE``);
- a command-line flag ``--<name-with-dashes>`` (``--max-message-size``),

documented by the field's ``#:`` comment (or a ``metadata={"help": ...}`` on the field), so a
new field gets all three, with help text, without touching this package. Fields of types with
no text form are config-file keys only: ``model_profiles``, an array of tables, each a
`EchoProfile`, a `CommandProfile` or a `SilentProfile` according to its ``agent`` key.

`load.load_settings` reads them, in increasing precedence: defaults, config file, environment,
command line. Every problem is one `SettingsError` naming where the value came from and the
key (``relay.toml: relay.max_message_size: must be positive, got -1``); never the PIN.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import shutil
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias, Union, get_args, get_origin

import attrs
from typed_settings.cls_utils import deep_options

from .._agents.agent import Agent
from .._agents.command import PROMPT_MODES, CommandAgent
from .._agents.echo import EchoAgent
from .._agents.silent import SilentAgent
from .._config import RelayConfig
from .._errors import positive
from .._wire.protocol import JSON

__all__ = [
    "ENV_PREFIX",
    "PROFILE_KINDS",
    "is_str_tuple",
    "Invalid",
    "InvalidBelow",
    "LOG_LEVELS",
    "CommandProfile",
    "EchoProfile",
    "ModelProfile",
    "SilentProfile",
    "ServeSettings",
    "Setting",
    "SettingsError",
    "all_settings",
    "check_programs",
    "markdown_table",
]

ENV_PREFIX: Final = "TRIO_RELAY_"
LOG_LEVELS: Final = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(Exception):
    """Settings that cannot be used; ``problems`` holds one message per problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class Invalid(ValueError):
    """A value our hooks refuse; its message is shown as is, after the source and key."""


class InvalidBelow(Invalid):
    """Problems found below the key being structured: (key path under it, message) each."""

    def __init__(self, problems: Sequence[tuple[tuple[str, ...], str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(message for _, message in self.problems))


# --- the settings ------------------------------------------------------------------------------


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise Invalid(f"must be between 0 and 65535, got {value}")


def _log_level(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in LOG_LEVELS:
        raise Invalid(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")


def _not_empty(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    # Never shows the value: this guards the PIN.
    if value is not None and not value:
        raise Invalid("must not be empty")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise Invalid(f"must not be negative, got {value}")


def _one_of(*choices: str) -> Callable[[object, attrs.Attribute[Any], str], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            names = " or ".join(f'"{choice}"' for choice in choices)
            raise Invalid(f"must be {names}, got {value!r}")

    return check


def _argv(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise Invalid("must name a program: expected at least one item")
    if not value[0]:
        raise Invalid("item 0: the program must not be empty")


_COMMAND_DEFAULTS: Final = {field.name: field.default for field in attrs.fields(CommandAgent)}


@attrs.frozen(kw_only=True)
class EchoProfile:
    """A ``[[model_profiles]]`` entry with ``agent = "echo"``: the demo agent."""

    #: The profile's id, unique among the profiles: what a chat's ``modelProfileId`` names.
    id: str = attrs.field(validator=_not_empty)
    #: The name clients show; the id if not given.
    name: str | None = attrs.field(default=None, validator=_not_empty)
    agent: str = attrs.field(default="echo", validator=_one_of("echo"))
    #: Seconds between the echo's pieces.
    chunk_delay: float = attrs.field(default=0.05, validator=_non_negative)

    def wire(self) -> dict[str, JSON]:
        """The profile as clients see it."""
        return {"id": self.id, "name": self.name or self.id, "agent": self.agent}

    def make_agent(self) -> Agent:
        return EchoAgent(chunk_delay=self.chunk_delay)


@attrs.frozen(kw_only=True)
class CommandProfile:
    """A ``[[model_profiles]]`` entry with ``agent = "command"``: a `CommandAgent`."""

    id: str = attrs.field(validator=_not_empty)
    name: str | None = attrs.field(default=None, validator=_not_empty)
    agent: str = attrs.field(default="command", validator=_one_of("command"))
    #: The program and its arguments.
    argv: tuple[str, ...] = attrs.field(validator=_argv)
    #: Working directory of the command.
    cwd: Path | None = None
    #: Environment variables set for the command.
    env: dict[str, str] = attrs.field(factory=dict, hash=False)
    #: Whether the command inherits the relay's environment.
    inherit_env: bool = True
    #: Where the message goes: "stdin" or "argument".
    prompt: str = attrs.field(default="stdin", validator=_one_of(*PROMPT_MODES))
    #: Whether earlier messages of the chat are written to stdin, as JSON lines.
    history: bool = False
    #: Seconds a run may take.
    timeout: float = attrs.field(default=_COMMAND_DEFAULTS["timeout"], validator=positive)
    #: Bytes of output a run may print.
    max_output: int = attrs.field(default=_COMMAND_DEFAULTS["max_output"], validator=positive)
    #: Seconds between SIGTERM and SIGKILL when a run is stopped.
    stop_grace: float = attrs.field(default=_COMMAND_DEFAULTS["stop_grace"],
                                    validator=positive)

    def wire(self) -> dict[str, JSON]:
        """The profile as clients see it: never its command or environment."""
        return {"id": self.id, "name": self.name or self.id, "agent": self.agent}

    def make_agent(self) -> CommandAgent:
        return CommandAgent(
            argv=self.argv, cwd=self.cwd, env=dict(self.env), inherit_env=self.inherit_env,
            prompt=self.prompt, history=self.history, timeout=self.timeout,
            max_output=self.max_output, stop_grace=self.stop_grace, label=self.id,
        )


@attrs.frozen(kw_only=True)
class SilentProfile:
    """A ``[[model_profiles]]`` entry with ``agent = "silent"``: messages get no answer."""

    id: str = attrs.field(validator=_not_empty)
    name: str | None = attrs.field(default=None, validator=_not_empty)
    agent: str = attrs.field(default="silent", validator=_one_of("silent"))

    def wire(self) -> dict[str, JSON]:
        """The profile as clients see it."""
        return {"id": self.id, "name": self.name or self.id, "agent": self.agent}

    def make_agent(self) -> SilentAgent:
        return SilentAgent()


#: One ``[[model_profiles]]`` table; its ``agent`` key says which.
ModelProfile: TypeAlias = EchoProfile | CommandProfile | SilentProfile
PROFILE_KINDS: Final[dict[str, type[ModelProfile]]] = {
    "echo": EchoProfile, "command": CommandProfile, "silent": SilentProfile,
}


@attrs.frozen(kw_only=True)
class BrokerSettings:
    """The ``[broker]`` table: the engine several relays share their streams through."""

    #: ``redis://[:PASSWORD@]HOST:PORT/DB`` (or ``rediss://``) to scale out through Redis
    #: (install ``trio-relay[redis]``); every relay on the same broker and data serves every
    #: client (docs/scaling.md).
    url: str | None = attrs.field(
        default=None, repr=False,
        metadata={"alias": "broker", "default_text": "none: one process, streams in memory"},
    )


@attrs.frozen(kw_only=True)
class ServeSettings:
    """Everything ``trio-relay serve`` needs; `load_settings` builds one."""

    #: Address to bind; the default accepts connections from this machine only.
    host: str = "127.0.0.1"
    #: Port to bind; 0 picks a free one.
    port: int = attrs.field(default=8765, validator=_port)
    #: The PIN clients must send, for this run only: it overrides the PIN kept in the data
    #: dir, without changing it. Prefer the environment variable or a private config file
    #: to the flag: a command line is visible to every user of the machine.
    pin: str | None = attrs.field(
        default=None, validator=_not_empty, repr=False,
        metadata={"default_text": "the PIN kept in `pairing.json` in the data dir (a random"
                  " 6-digit one, made on first start; `trio-relay pin` prints it)"},
    )
    #: Where the SQLite database and `pairing.json` (the PIN and paired devices) live.
    data_dir: Path | None = attrs.field(
        default=None,
        metadata={"default_text": "`$XDG_DATA_HOME/trio-relay`, else"
                  " `~/.local/share/trio-relay`"},
    )
    #: ``postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME`` to keep projects, chats and messages
    #: in a shared PostgreSQL database (install ``trio-relay[postgres]``) instead of the data
    #: dir's SQLite file: relays on several machines then serve the same data (docs/scaling.md).
    database: str | None = attrs.field(
        default=None, repr=False,
        metadata={"default_text": "none: SQLite in the data dir"},
    )
    #: With ``database``: seconds a relay's claim on a reply it runs (or on an event it has not
    #: published yet) holds without renewal; the delay before another relay takes over after
    #: this one died. Shorter means a faster takeover and more database writes.
    database_lease: float = attrs.field(default=10.0, validator=positive)
    #: With ``database``: connections (and worker threads) this relay uses at most.
    database_pool_size: int = attrs.field(default=8, validator=positive)
    #: Log verbosity on stderr: TRACE, DEBUG, INFO, WARNING or ERROR.
    log_level: str = attrs.field(default="INFO", validator=_log_level)
    #: PEM certificate chain to serve ``wss://`` with; needs ``tls_key``.
    tls_cert: Path | None = attrs.field(default=None, metadata={"default_text": "none (`ws://`)"})
    #: PEM private key (unencrypted) of ``tls_cert``.
    tls_key: Path | None = attrs.field(default=None, metadata={"default_text": "none (`ws://`)"})
    #: Limits and timeouts of the relay.
    relay: RelayConfig = attrs.field(factory=RelayConfig)
    #: The broker, to scale out.
    broker: BrokerSettings = attrs.field(factory=BrokerSettings)
    #: The model profiles clients choose from, each naming its agent (``[[model_profiles]]``
    #: tables, config file only); None: keep the ones in the database.
    model_profiles: tuple[ModelProfile, ...] | None = None

    def agents(self) -> dict[str, Agent]:
        """The agent of each configured model profile, by profile id."""
        return {profile.id: profile.make_agent() for profile in self.model_profiles or ()}

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")


# --- the settings as a flat list of leaves -------------------------------------------------------


@attrs.frozen
class Setting:
    """One leaf field of the settings tree, with its config key, variable and flag."""

    #: Attribute names from the root, e.g. ``("relay", "max_message_size")``.
    path: tuple[str, ...]
    #: The field's type with ``None`` taken out of an optional (``Path | None`` is ``Path``).
    type: Any
    default: Any
    #: The field's ``#:`` comment (or ``metadata["help"]``), markdown, on one line.
    doc: str
    #: The default as shown in ``--help`` and the docs.
    default_text: str
    #: The name of its variable and flag, where not the field's own (``broker.url`` is
    #: ``TRIO_RELAY_BROKER`` and ``--broker``).
    alias: str | None = None

    @property
    def name(self) -> str:
        return self.alias or self.path[-1]

    @property
    def key(self) -> str:
        """The config file key, dotted: ``relay.max_message_size``."""
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_list(self) -> bool:
        return is_str_tuple(self.type)


@functools.cache
def all_settings() -> tuple[Setting, ...]:
    """Every leaf of `ServeSettings` that has a text form, in declaration order."""
    found = tuple(_leaves())
    names = [setting.name for setting in found]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # flags and variables use the bare name, so it must be unique
        raise RuntimeError(f"settings share a name: {', '.join(duplicates)}")
    return found


#: Types a value can be written as text, in a variable or a flag (and tuples of strings).
_TEXT_TYPES: Final = (int, float, bool, str, Path)


def _leaves() -> Iterator[Setting]:
    for option in deep_options(ServeSettings):  # typed-settings walks the nested classes
        value_type = _without_none(option.cls)
        if value_type not in _TEXT_TYPES and not is_str_tuple(value_type):
            continue  # no text form: a config-file key only
        field = attrs.fields_dict(option.parent_cls)[option.name]
        default = option.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        doc = field.metadata.get("help") or _field_docs(option.parent_cls).get(option.name, "")
        yield Setting(
            path=tuple(option.path.split(".")),
            type=value_type,
            default=default,
            doc=str(doc),
            default_text=str(field.metadata.get("default_text") or _show(default)),
            alias=field.metadata.get("alias"),
        )


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field of ``cls``, joined into one line of markdown."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (a frozen app): metadata["help"] still works
        return {}
    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:"):
            comment.append(stripped[2:].strip())
            continue
        field = re.match(r"([A-Za-z_]\w*)\s*:", stripped)
        if field and comment:
            docs[field.group(1)] = " ".join(comment).replace("``", "`")
        comment = []
    return docs


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as TOML, the environment and the flag write it
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _without_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        rest = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def is_str_tuple(tp: Any) -> bool:
    return get_origin(tp) is tuple and get_args(tp) == (str, ...)


# --- checks and documentation -----------------------------------------------------------------


def check_programs(settings: ServeSettings) -> list[tuple[str, str]]:
    """(key, problem) for each command profile whose program or working directory cannot be
    found now. Not a settings error: the relay starts anyway, and a run of such a profile
    reports it in its chat; `trio-relay config check` and `serve` warn about them."""
    found: list[tuple[str, str]] = []
    for index, profile in enumerate(settings.model_profiles or ()):
        if not isinstance(profile, CommandProfile):
            continue
        key = f"model_profiles[{index}]"
        if profile.cwd is not None and not profile.cwd.is_dir():
            found.append((f"{key}.cwd", f"no directory {str(profile.cwd)!r}"))
        program = profile.argv[0]
        if "/" in program:
            path = (profile.cwd or Path.cwd()) / program  # an absolute program stays as is
            if not (path.is_file() and os.access(path, os.X_OK)):
                found.append((f"{key}.argv", f"program {program!r} not found or not executable"))
            continue
        search = os.pathsep.join(os.get_exec_path(profile.make_agent().environment()))
        if shutil.which(program, path=search) is None:
            found.append((f"{key}.argv", f"program {program!r} not found on PATH"))
    return found


def markdown_table(table: tuple[str, ...] = ()) -> str:
    """The docs/operations.md table of the settings directly in ``table`` (``()``: the top
    level, ``("relay",)``: the ``[relay]`` table). ``python -m trio_relay._settings`` prints
    every table."""
    rows = ["| setting | flag | environment variable | default | meaning |",
            "|---|---|---|---|---|"]
    for setting in all_settings():
        if setting.path[:-1] == table:
            default = setting.default_text
            if default == _show(setting.default) and setting.default != ():
                default = f"`{default}`"  # a value, not words
            rows.append(f"| `{setting.path[-1]}` | `{setting.flag}` | `{setting.env}` | {default} |"
                        f" {setting.doc} |")
    return "\n".join(rows)

