"""Loading `ServeSettings`: defaults < config file < environment < command line.

Each source is a typed-settings loader: the TOML config file (`TomlFile`, read by
typed-settings' `TomlFormat`), then the ``TRIO_RELAY_<NAME>`` variables and the flags
(`Texts`). typed-settings' `merge_settings` takes each setting from the last source that gives
it and remembers which source that was, so that a problem names the variable, the flag, or the
file and the key. The merged values are then checked by one strict converter (`convert`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from typed_settings.cls_utils import deep_options
from typed_settings.dict_utils import flat2nested, merge_settings, set_path
from typed_settings.exceptions import ConfigFileLoadError, ConfigFileNotFoundError
from typed_settings.loaders import TomlFormat
from typed_settings.types import LoadedSettings, LoaderMeta, OptionList

from .convert import KeyPath, dotted, problems, structure, toml_type
from .settings import (
    ENV_PREFIX,
    Invalid,
    ServeSettings,
    Setting,
    SettingsError,
    all_settings,
)

__all__ = ["TomlFile", "Texts", "load_settings", "unknown_variables"]


def load_settings(
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | Sequence[str]] | None = None,
) -> ServeSettings:
    """Settings from defaults, then ``config_file`` (TOML), then ``environ``, then ``flags``.

    ``environ`` is read for ``TRIO_RELAY_<NAME>`` variables (pass ``os.environ``); ``flags``
    maps setting keys (``"port"``, ``"relay.max_message_size"``) to the text given on the
    command line, a sequence of texts for a list (`cli.flag_values` builds it from argparse).
    An empty variable or flag counts as unset. Relative paths in the config file are relative
    to the file's directory. Raises `SettingsError`: every problem at once, except that a file
    that cannot be read, or a variable or flag that cannot be parsed, stops the rest.
    """
    options = deep_options(ServeSettings)
    file = TomlFile(config_file) if config_file is not None else None
    texts = [Texts("environment", lambda s: (environ or {}).get(s.env), lambda s: s.env),
             Texts("flags", lambda s: (flags or {}).get(s.key), lambda s: s.flag)]
    loaded = [file(ServeSettings, options)] if file is not None else []
    loaded += [source(ServeSettings, options) for source in texts]
    if any(source.problems for source in texts):
        raise SettingsError([problem for source in texts for problem in source.problems])
    merged = merge_settings(options, loaded)
    by_name = {source.name: source for source in texts}

    def describe(path: KeyPath) -> str:
        """Where the value at ``path`` came from, and its key, for a message."""
        for length in range(len(path), 0, -1):
            given = merged.get(".".join(path[:length]))
            source = by_name.get(given.loader_meta.name) if given is not None else None
            if source is not None:
                setting = next(s for s in all_settings() if s.path == path[:length])
                return source.label(setting) + dotted(("", *path[length:]))
        key = dotted(path) or "settings"
        return f"{file.label}: {key}" if file is not None else key

    if ("tls_cert" in merged) != ("tls_key" in merged):
        given, missing = ("tls_cert", "tls_key")
        if "tls_key" in merged:
            given, missing = missing, given
        raise SettingsError(
            [f"{describe((given,))}: needs {missing} as well; give both or neither"]
        )
    found = list(file.problems) if file is not None else []
    try:
        settings = structure(flat2nested(merged))
    except Exception as exc:  # cattrs reports every problem at once, in a tree
        found += problems(exc, ())
    if found:
        raise SettingsError([f"{describe(path)}: {message}" for path, message in found])
    return settings


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``TRIO_RELAY_*`` variables that name no setting: most likely typos, which would
    otherwise be ignored without a word. Names only; a value may be a secret."""
    known = {setting.env for setting in all_settings()}
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


# --- the config file -------------------------------------------------------------------------


class TomlFile:
    """A typed-settings loader for the one config file.

    Not typed-settings' `FileLoader`: its key check raises at the first file with a list of
    dotted leaves (``server.port``); ours names each unknown key or table once, with a hint,
    in `problems`, reported together with every other problem of the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.label = os.fspath(path)  # as given, relative or not
        self.problems: list[tuple[KeyPath, str]] = []

    def __call__(self, settings_cls: type, options: OptionList) -> LoadedSettings:
        try:
            data = TomlFormat(None)(self.path, settings_cls, options)
        except (ConfigFileNotFoundError, ConfigFileLoadError, OSError) as exc:
            # typed-settings words these its own way; ours name the file and the cause only.
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            problem = (f"cannot read: {cause.strerror or cause}" if isinstance(cause, OSError)
                       else f"invalid TOML: {cause}")
            raise SettingsError([f"{self.path}: {problem}"]) from None
        except UnicodeDecodeError:
            raise SettingsError([f"{self.path}: invalid TOML: not UTF-8"]) from None
        _anchor_paths(data, self.path.parent)
        _anchor_profile_paths(data, self.path.parent)
        known = self._known(data, ())
        return LoadedSettings(known, LoaderMeta("config file", base_dir=self.path.parent))

    def _known(self, table: Mapping[str, Any], prefix: KeyPath) -> dict[str, Any]:
        """The keys of ``table`` that name a setting; a problem for each other one."""
        below = [s.path[len(prefix):] for s in all_settings() if s.path[:len(prefix)] == prefix]
        names = {rest[0] for rest in below if len(rest) == 1}
        if not prefix:
            names.add("model_profiles")  # a config-file key only
        tables = {rest[0] for rest in below if len(rest) > 1}
        kept: dict[str, Any] = {}
        for key, value in table.items():
            if key in tables and not isinstance(value, dict):
                self.problems.append(((*prefix, key), f"expected a table, got {toml_type(value)}"))
            elif key in tables:
                kept[key] = self._known(value, (*prefix, key))
            elif key in names:
                kept[key] = value
        # A key one table off (`max_message_size` at the top) is a likely slip: name its place.
        known = [".".join(rest) for rest in below] + (["model_profiles"] if not prefix else [])
        for key in sorted(set(table) - names - tables):
            nested = [name for name in known if name.rpartition(".")[2] == key]
            close = nested or difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.problems.append(((*prefix, key), f"unknown key{hint}"))
        return kept


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to the file, wherever it is run from."""
    for setting in all_settings():
        if setting.type is not Path:
            continue
        table: Any = data
        for part in setting.path[:-1]:
            table = table.get(part) if isinstance(table, dict) else None
        value = table.get(setting.path[-1]) if isinstance(table, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            table[setting.path[-1]] = str(base / value)


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


# --- variables and flags ---------------------------------------------------------------------


class Texts:
    """A typed-settings loader for settings given as text: the ``TRIO_RELAY_<NAME>``
    variables, or the flags. Each text becomes what a config file would hold (``"8"``: 8),
    so that the converter checks all sources alike; an empty text counts as unset.

    Not typed-settings' `EnvLoader`: it names a ``[relay]`` setting's variable after its
    table (``TRIO_RELAY_RELAY_PING_INTERVAL``), and hands the converter the text."""

    def __init__(
        self,
        name: str,
        lookup: Callable[[Setting], str | Sequence[str] | None],
        label: Callable[[Setting], str],
    ) -> None:
        self.name = name
        self.lookup = lookup
        #: How a message names a setting from this source: its variable, or its flag.
        self.label = label
        self.problems: list[str] = []

    def __call__(self, settings_cls: type, options: OptionList) -> LoadedSettings:
        values: dict[str, Any] = {}
        for setting in all_settings():
            given = self.lookup(setting)
            if given is None:
                continue
            try:
                value = _from_text(setting, [given] if isinstance(given, str) else list(given))
            except Invalid as exc:
                self.problems.append(f"{self.label(setting)}: {exc}")
                continue
            if value is not None:
                set_path(values, setting.key, value)
        return LoadedSettings(values, LoaderMeta(self.name))


def _from_text(setting: Setting, texts: list[str]) -> object:
    """What a config file would hold for these texts, or None if they count as unset."""
    if setting.is_list:
        # ["a,b", "c"] (a repeated flag, or a comma-separated variable): ["a", "b", "c"]
        return [part.strip() for text in texts for part in text.split(",") if part.strip()] or None
    text = texts[-1]
    if not text:
        return None
    return _PARSERS.get(setting.type, str)(text)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Invalid(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise Invalid(f"expected a number, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise Invalid(f"expected true or false, got {text!r}")


#: Text to the value a TOML file would hold; str and Path settings take the text as it is.
_PARSERS: Final[dict[Any, Callable[[str], object]]] = {
    int: _parse_int, float: _parse_float, bool: _parse_bool,
}
