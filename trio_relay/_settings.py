"""Settings of ``trio-relay serve``: defaults < config file < environment < command line.

One attrs class tree (`ServeSettings`, holding a `RelayConfig` as its ``relay`` table) and one
private cattrs converter define everything. Every leaf field of the tree is, automatically:

- a key of the TOML config file: top-level fields at the top, ``RelayConfig`` fields in the
  ``[relay]`` table (``relay.max_message_size``);
- an environment variable ``TRIO_RELAY_<NAME>`` (``TRIO_RELAY_MAX_MESSAGE_SIZE``);
- a command-line flag ``--<name-with-dashes>`` (``--max-message-size``),

documented by the field's ``#:`` comment (or a ``metadata={"help": ...}`` on the field), so a
new field gets all three, with help text, without touching this module. Fields of types with
no text form are config-file keys only: ``model_profiles``, an array of tables, each a
`EchoProfile`, a `CommandProfile` or a `SilentProfile` according to its ``agent`` key.

Every problem, whatever its source, is raised as one `SettingsError` whose message names
where the value came from and the key: ``relay.toml: relay.max_message_size: must be
positive, got -1``, ``TRIO_RELAY_PORT: expected an integer, got 'x'``, ``--port: ...``,
``relay.toml: model_profiles[1].timeout: must be positive, got 0``. Messages never contain
the PIN.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import math
import os
import re
import shutil
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
)
from cattrs.gen import make_dict_structure_fn, override

from ._agents import PROMPT_MODES, Agent, CommandAgent, SilentAgent
from ._config import RelayConfig
from ._echo_agent import EchoAgent
from ._wire.protocol import JSON

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = [
    "ENV_PREFIX",
    "unknown_variables",
    "LOG_LEVELS",
    "CommandProfile",
    "EchoProfile",
    "ModelProfile",
    "SilentProfile",
    "ServeSettings",
    "Setting",
    "SettingsError",
    "add_arguments",
    "all_settings",
    "check_programs",
    "flag_values",
    "load_settings",
    "markdown_table",
]

ENV_PREFIX: Final = "TRIO_RELAY_"
LOG_LEVELS: Final = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(Exception):
    """Settings that cannot be used; ``problems`` holds one message per problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class _Invalid(ValueError):
    """A value our hooks refuse; its message is shown as is, after the source and key."""


class _InvalidBelow(_Invalid):
    """Problems found below the key being structured: (key path under it, message) each."""

    def __init__(self, problems: Sequence[tuple[tuple[str, ...], str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(message for _, message in self.problems))


# --- the settings ------------------------------------------------------------------------------


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise _Invalid(f"must be between 0 and 65535, got {value}")


def _log_level(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in LOG_LEVELS:
        raise _Invalid(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")


def _not_empty(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    # Never shows the value: this guards the PIN.
    if value is not None and not value:
        raise _Invalid("must not be empty")


def _profile_id(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise _Invalid("must not be empty")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise _Invalid(f"must not be negative, got {value}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise _Invalid(f"must be positive, got {value}")


def _one_of(*choices: str) -> Callable[[object, attrs.Attribute[Any], str], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            names = " or ".join(f'"{choice}"' for choice in choices)
            raise _Invalid(f"must be {names}, got {value!r}")

    return check


def _argv(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise _Invalid("must name a program: expected at least one item")
    if not value[0]:
        raise _Invalid("item 0: the program must not be empty")


_COMMAND_DEFAULTS: Final = {field.name: field.default for field in attrs.fields(CommandAgent)}


@attrs.frozen(kw_only=True)
class EchoProfile:
    """A ``[[model_profiles]]`` entry with ``agent = "echo"``: the demo agent."""

    #: The profile's id, unique among the profiles: what a chat's ``modelProfileId`` names.
    id: str = attrs.field(validator=_profile_id)
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

    id: str = attrs.field(validator=_profile_id)
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
    timeout: float = attrs.field(default=_COMMAND_DEFAULTS["timeout"], validator=_positive)
    #: Bytes of output a run may print.
    max_output: int = attrs.field(default=_COMMAND_DEFAULTS["max_output"], validator=_positive)
    #: Seconds between SIGTERM and SIGKILL when a run is stopped.
    stop_grace: float = attrs.field(default=_COMMAND_DEFAULTS["stop_grace"],
                                    validator=_positive)

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

    id: str = attrs.field(validator=_profile_id)
    name: str | None = attrs.field(default=None, validator=_not_empty)
    agent: str = attrs.field(default="silent", validator=_one_of("silent"))

    def wire(self) -> dict[str, JSON]:
        """The profile as clients see it."""
        return {"id": self.id, "name": self.name or self.id, "agent": self.agent}

    def make_agent(self) -> SilentAgent:
        return SilentAgent()


#: One ``[[model_profiles]]`` table; its ``agent`` key says which.
ModelProfile: TypeAlias = EchoProfile | CommandProfile | SilentProfile
_PROFILE_KINDS: Final[dict[str, type[ModelProfile]]] = {
    "echo": EchoProfile, "command": CommandProfile, "silent": SilentProfile,
}


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
    #: Log verbosity on stderr: TRACE, DEBUG, INFO, WARNING or ERROR.
    log_level: str = attrs.field(default="INFO", validator=_log_level)
    #: PEM certificate chain to serve ``wss://`` with; needs ``tls_key``.
    tls_cert: Path | None = attrs.field(default=None, metadata={"default_text": "none (`ws://`)"})
    #: PEM private key (unencrypted) of ``tls_cert``.
    tls_key: Path | None = attrs.field(default=None, metadata={"default_text": "none (`ws://`)"})
    #: Limits and timeouts of the relay.
    relay: RelayConfig = attrs.field(factory=RelayConfig)
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

    @property
    def name(self) -> str:
        return self.path[-1]

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
        return _is_str_tuple(self.type)


@functools.cache
def all_settings() -> tuple[Setting, ...]:
    """Every leaf of `ServeSettings` that has a text form, in declaration order."""
    found = tuple(_leaves(ServeSettings, ()))
    names = [setting.name for setting in found]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # flags and variables use the bare name, so it must be unique
        raise RuntimeError(f"settings share a name: {', '.join(duplicates)}")
    return found


def _leaves(cls: type, prefix: tuple[str, ...]) -> Iterator[Setting]:
    attrs.resolve_types(cls)
    docs = _field_docs(cls)
    for field in attrs.fields(cls):
        path = (*prefix, field.name)
        if isinstance(field.type, type) and attrs.has(field.type):
            yield from _leaves(field.type, path)
            continue
        value_type = _without_none(field.type)
        if value_type not in _TEXT_PARSERS and not _is_str_tuple(value_type):
            continue  # no text form: a config-file key only
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        doc = str(field.metadata.get("help") or docs.get(field.name, ""))
        yield Setting(
            path=path,
            type=value_type,
            default=default,
            doc=doc,
            default_text=str(field.metadata.get("default_text") or _show(default)),
        )


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


def _is_str_tuple(tp: Any) -> bool:
    return get_origin(tp) is tuple and get_args(tp) == (str, ...)


# --- text (environment variables and flags) to the values a TOML file would hold --------------


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Invalid(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Invalid(f"expected a number, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise _Invalid(f"expected true or false, got {text!r}")


def _parse_text(text: str) -> str:
    return text


_TEXT_PARSERS: Final[dict[Any, Callable[[str], object]]] = {
    int: _parse_int,
    float: _parse_float,
    bool: _parse_bool,
    str: _parse_text,
    Path: _parse_text,
}


def _split_list(items: Sequence[str]) -> list[str]:
    """``["a,b", "c"]`` (a repeated flag, or a comma-separated variable): ``["a", "b", "c"]``."""
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


# --- the converter ---------------------------------------------------------------------------

_KINDS: Final = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                 (list, "an array"), (dict, "a table"))


def _kind(value: object) -> str:
    """A value's TOML type, for messages; never the value itself (it could be the PIN)."""
    for tp, kind in _KINDS:
        if isinstance(value, tp):
            return kind
    return "a date or time" if hasattr(value, "isoformat") else type(value).__name__


def _structure_int(value: object, _: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_kind(value)}")
    return value


def _structure_float(value: object, _: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"expected a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise _Invalid(f"expected a finite number, got {value}")
    return float(value)


def _structure_bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_kind(value)}")
    return value


def _structure_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_kind(value)}")
    return value


def _structure_path(value: object, _: object) -> Path:
    if not isinstance(value, str):
        raise _Invalid(f"expected a path (a string), got {_kind(value)}")
    if not value:
        raise _Invalid("expected a path, got an empty string")
    return Path(value).expanduser()


def _structure_str_tuple(value: object, _: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Invalid(f"expected an array of strings, got {_kind(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _Invalid(f"item {index}: expected a string, got {_kind(item)}")
    return tuple(value)


def _structure_str_dict(value: object, _: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table of strings, got {_kind(value)}")
    problems = [((str(key),), "not a variable name") for key in value
                if not key or "=" in key]
    problems += [((str(key),), f"expected a string, got {_kind(item)}")
                 for key, item in value.items() if not isinstance(item, str)]
    if problems:
        raise _InvalidBelow(problems)
    return dict(value)


def _structure_profile(value: object) -> ModelProfile:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table, got {_kind(value)}")
    kind = value.get("agent")
    cls = _PROFILE_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        *first, last = (f'"{name}"' for name in _PROFILE_KINDS)
        names = f"{', '.join(first)} or {last}"
        got = "it is missing" if kind is None else f"got {_shown(kind)}"
        raise _InvalidBelow([(("agent",), f"must be {names}; {got}")])
    profile: ModelProfile = _converter.structure(value, cls)
    return profile


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else _kind(value)


def _structure_profiles(value: object, _: object) -> tuple[ModelProfile, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"expected an array of tables ([[model_profiles]]), got {_kind(value)}")
    if not value:
        raise _Invalid("expected at least one profile")
    problems: list[tuple[_Path, str]] = []
    profiles: list[ModelProfile] = []
    first: dict[str, int] = {}
    for index, item in enumerate(value):
        try:
            profile = _structure_profile(item)
        except Exception as exc:
            problems.extend(_problems(exc, (f"[{index}]",)))
            continue
        profiles.append(profile)
        if profile.id in first:
            problems.append(((f"[{index}]", "id"), f"{profile.id!r} is already the id of"
                             f" model_profiles[{first[profile.id]}]"))
        first.setdefault(profile.id, index)
    if problems:
        raise _InvalidBelow(problems)
    return tuple(profiles)


def _validated(field: attrs.Attribute[Any]) -> Callable[[object, object], object]:
    """Structures one field and runs its attrs validator, so that an invalid value is
    reported under its own key rather than as a failure of the whole class."""
    validator, field_type = field.validator, field.type
    assert validator is not None and field_type is not None

    def structure(value: object, _: object) -> object:
        result = _converter.structure(value, field_type)
        try:
            validator(None, field, result)
        except _Invalid:
            raise
        except (TypeError, ValueError) as exc:
            # RelayConfig's messages start with the field's name, which the key already shows.
            raise _Invalid(str(exc).removeprefix(f"{field.name} ")) from None
        return result

    return structure


def _structure_attrs_factory(cls: type) -> Callable[[object, object], object]:
    attrs.resolve_types(cls)
    overrides = {
        field.name: override(struct_hook=_validated(field))
        for field in attrs.fields(cls)
        if field.validator is not None
    }
    generated: Callable[[Mapping[str, Any], Any], object]
    generated = make_dict_structure_fn(cls, _converter, **overrides)  # type: ignore[arg-type]

    def structure(value: object, tp: object) -> object:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected a table, got {_kind(value)}")
        return generated(value, tp)

    return structure


# Strict: a config file that says `port = "8765"` or `max_message_size = 1.5` is wrong, not
# silently converted. Environment variables and flags are parsed to these types first.
_converter: Final = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(float, _structure_float)
_converter.register_structure_hook(bool, _structure_bool)
_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(Path, _structure_path)
_converter.register_structure_hook_func(_is_str_tuple, _structure_str_tuple)
_converter.register_structure_hook_func(lambda tp: tp == dict[str, str], _structure_str_dict)
_converter.register_structure_hook_func(
    lambda tp: tp == tuple[ModelProfile, ...], _structure_profiles
)
_converter.register_structure_hook_factory(attrs.has, _structure_attrs_factory)


# --- loading ---------------------------------------------------------------------------------

_Path = tuple[str, ...]


def _dotted(path: _Path) -> str:
    """A key path as the messages show it: ``relay.max_message_size``, ``model_profiles[1].id``."""
    return "".join(part if part.startswith("[") or i == 0 else f".{part}"
                   for i, part in enumerate(path))


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``TRIO_RELAY_*`` variables that name no setting: most likely typos, which would
    otherwise be ignored without a word. Names only; a value may be a secret."""
    known = {setting.env for setting in all_settings()}
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def load_settings(
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | Sequence[str]] | None = None,
) -> ServeSettings:
    """Settings from defaults, then ``config_file`` (TOML), then ``environ``, then ``flags``.

    ``environ`` is read for ``TRIO_RELAY_<NAME>`` variables (pass ``os.environ``); ``flags``
    maps setting keys (``"port"``, ``"relay.max_message_size"``) to the text given on the
    command line, a sequence of texts for a list (`flag_values` builds it from argparse). An
    empty variable or flag counts as unset. Relative paths in the config file are relative to
    the file's directory. Raises `SettingsError`.
    """
    raw: dict[str, Any] = {}
    where: dict[_Path, str] = {}  # where each overridden value came from, for messages
    file_label = os.fspath(config_file) if config_file is not None else None
    if config_file is not None:
        raw = _read_toml(Path(config_file))

    problems: list[str] = []
    layers: list[tuple[Callable[[Setting], str | Sequence[str] | None], Callable[[Setting], str]]]
    layers = [
        (lambda s: (environ or {}).get(s.env), lambda s: s.env),
        (lambda s: (flags or {}).get(s.key), lambda s: s.flag),
    ]
    for lookup, label in layers:
        for setting in all_settings():
            given = lookup(setting)
            if given is None:
                continue
            texts = [given] if isinstance(given, str) else list(given)
            try:
                value = _from_text(setting, texts)
            except _Invalid as exc:
                problems.append(f"{label(setting)}: {exc}")
                continue
            if value is not None and _put(raw, setting.path, value):
                where[setting.path] = label(setting)
    if problems:
        raise SettingsError(problems)

    def describe(path: _Path) -> str:
        for length in range(len(path), 0, -1):
            if path[:length] in where:
                return where[path[:length]] + _dotted(("", *path[length:]))
        key = _dotted(path) or "settings"
        return f"{file_label}: {key}" if file_label is not None else key

    if ("tls_cert" in raw) != ("tls_key" in raw):
        given, missing = ("tls_cert", "tls_key") if "tls_cert" in raw else ("tls_key", "tls_cert")
        raise SettingsError(
            [f"{describe((given,))}: needs {missing} as well; give both or neither"]
        )
    try:
        settings: ServeSettings = _converter.structure(raw, ServeSettings)
    except Exception as exc:  # cattrs reports every problem at once, in a tree
        raise SettingsError(
            [f"{describe(path)}: {message}" for path, message in _problems(exc, ())]
        ) from None
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise SettingsError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise SettingsError([f"{path}: invalid TOML: not UTF-8"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"{path}: invalid TOML: {exc}"]) from None
    _anchor_paths(data, path.parent)
    _anchor_profile_paths(data, path.parent)
    return data


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to the file, wherever it is run from."""
    for setting in all_settings():
        if setting.type is not Path:
            continue
        table: Any = data
        for part in setting.path[:-1]:
            table = table.get(part) if isinstance(table, dict) else None
        value = table.get(setting.name) if isinstance(table, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            table[setting.name] = str(base / value)


def _anchor_profile_paths(data: dict[str, Any], base: Path) -> None:
    """A profile's ``cwd``, and its program when given as a relative path (``bin/agent``,
    not a bare name, which is looked up on PATH), are relative to the config file."""
    profiles = data.get("model_profiles")
    for profile in profiles if isinstance(profiles, list) else ():
        if not isinstance(profile, dict):
            continue
        cwd = profile.get("cwd")
        if isinstance(cwd, str) and cwd and not Path(cwd).expanduser().is_absolute():
            profile["cwd"] = str(base / cwd)
        argv = profile.get("argv")
        if isinstance(argv, list) and argv and isinstance(argv[0], str) and "/" in argv[0]:
            program = Path(argv[0]).expanduser()
            argv[0] = str(program if program.is_absolute() else base / program)


def _from_text(setting: Setting, texts: list[str]) -> object:
    """What a config file would hold for these texts, or None if they count as unset."""
    if setting.is_list:
        items = _split_list(texts)
        return items or None
    text = texts[-1]
    if not text:
        return None
    return _TEXT_PARSERS[setting.type](text)


def _put(raw: dict[str, Any], path: _Path, value: object) -> bool:
    table = raw
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            return False  # the file has a non-table here; structuring reports that
    table[path[-1]] = value
    return True


def _problems(exc: BaseException, path: _Path) -> Iterator[tuple[_Path, str]]:
    """(key path, message) for every leaf of a cattrs error tree."""
    if isinstance(exc, ForbiddenExtraKeysError) and exc.cl in _PROFILE_KINDS.values():
        known = [field.name for field in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            others = [kind for kind, cls in _PROFILE_KINDS.items()
                      if key in attrs.fields_dict(cls)]
            close = difflib.get_close_matches(key, known, n=1)
            hint = (f' (only agent = "{others[0]}" takes it)' if others
                    else f" (did you mean {close[0]}?)" if close else "")
            yield (*path, key), f"unknown key{hint}"
    elif isinstance(exc, ForbiddenExtraKeysError):
        # A key one table off (`max_message_size` at the top) is a likely slip: name its place.
        known = [".".join(s.path[len(path):]) for s in all_settings() if s.path[:len(path)] == path]
        if path == ():
            known.append("model_profiles")
        for key in sorted(exc.extra_fields):
            nested = [name for name in known if name.rpartition(".")[2] == key]
            close = nested or difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            yield (*path, key), f"unknown key{hint}"
    elif isinstance(exc, ClassValidationError):
        for sub in exc.exceptions:
            names = [note.name for note in getattr(sub, "__notes__", ())
                     if isinstance(note, AttributeValidationNote)]
            yield from _problems(sub, (*path, *names[-1:]))
    elif isinstance(exc, _InvalidBelow):
        for below, message in exc.problems:
            yield (*path, *below), message
    elif isinstance(exc, _Invalid):
        yield path, str(exc)
    elif isinstance(exc, KeyError):  # cattrs: a required key is missing
        yield path, "required, but missing"
    else:
        yield path, str(exc) or type(exc).__name__


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


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and a flag for every setting; `flag_values` reads them back."""
    parser.add_argument("--config", metavar="FILE", type=Path, default=None,
                        help="read settings from this TOML file (docs/operations.md)")
    groups: dict[_Path, Any] = {}
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


# --- documentation ---------------------------------------------------------------------------


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
            rows.append(f"| `{setting.name}` | `{setting.flag}` | `{setting.env}` | {default} |"
                        f" {setting.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - a helper for keeping the docs in step
    for prefix in sorted({s.path[:-1] for s in all_settings()}):
        print(f"[{'.'.join(prefix)}]" if prefix else "(top level)")
        print(markdown_table(prefix), end="\n\n")
