"""The strict cattrs converter that turns loaded settings into `ServeSettings`, and the one
place that words its errors: (key path, message) for each problem, whatever its source.

Strict on purpose: a config file that says ``port = "8765"`` or ``max_message_size = 1.5`` is
wrong, not silently converted. Environment variables and flags are parsed to these types
first (`load`), so all three sources meet the same checks.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, override

from .settings import (
    PROFILE_KINDS,
    Invalid,
    InvalidBelow,
    ModelProfile,
    ServeSettings,
    is_str_tuple,
)

__all__ = ["KeyPath", "dotted", "problems", "structure", "toml_type"]

#: Where a problem is: attribute names, ``[index]`` for an array item.
KeyPath = tuple[str, ...]

_KINDS: Final = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                 (list, "an array"), (dict, "a table"))


def toml_type(value: object) -> str:
    """A value's TOML type, for messages; never the value itself (it could be the PIN)."""
    for tp, kind in _KINDS:
        if isinstance(value, tp):
            return kind
    return "a date or time" if hasattr(value, "isoformat") else type(value).__name__


def _structure_int(value: object, _: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected an integer, got {toml_type(value)}")
    return value


def _structure_float(value: object, _: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected a number, got {toml_type(value)}")
    if not math.isfinite(value):
        raise Invalid(f"expected a finite number, got {value}")
    return float(value)


def _structure_bool(value: object, _: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {toml_type(value)}")
    return value


def _structure_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {toml_type(value)}")
    return value


def _structure_path(value: object, _: object) -> Path:
    if not isinstance(value, str):
        raise Invalid(f"expected a path (a string), got {toml_type(value)}")
    if not value:
        raise Invalid("expected a path, got an empty string")
    return Path(value).expanduser()


def _structure_str_tuple(value: object, _: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise Invalid(f"expected an array of strings, got {toml_type(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise Invalid(f"item {index}: expected a string, got {toml_type(item)}")
    return tuple(value)


def _structure_str_dict(value: object, _: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid(f"expected a table of strings, got {toml_type(value)}")
    found = [((str(key),), "not a variable name") for key in value
                if not key or "=" in key]
    found += [((str(key),), f"expected a string, got {toml_type(item)}")
                 for key, item in value.items() if not isinstance(item, str)]
    if found:
        raise InvalidBelow(found)
    return dict(value)


def _structure_profile(value: object) -> ModelProfile:
    if not isinstance(value, dict):
        raise Invalid(f"expected a table, got {toml_type(value)}")
    kind = value.get("agent")
    cls = PROFILE_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        *first, last = (f'"{name}"' for name in PROFILE_KINDS)
        names = f"{', '.join(first)} or {last}"
        got = "it is missing" if kind is None else f"got {_shown(kind)}"
        raise InvalidBelow([(("agent",), f"must be {names}; {got}")])
    profile: ModelProfile = _converter.structure(value, cls)
    return profile


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else toml_type(value)


def _structure_profiles(value: object, _: object) -> tuple[ModelProfile, ...]:
    if not isinstance(value, list):
        raise Invalid(f"expected an array of tables ([[model_profiles]]), got {toml_type(value)}")
    if not value:
        raise Invalid("expected at least one profile")
    found: list[tuple[KeyPath, str]] = []
    profiles: list[ModelProfile] = []
    first: dict[str, int] = {}
    for index, item in enumerate(value):
        try:
            profile = _structure_profile(item)
        except Exception as exc:
            found.extend(problems(exc, (f"[{index}]",)))
            continue
        profiles.append(profile)
        if profile.id in first:
            found.append(((f"[{index}]", "id"), f"{profile.id!r} is already the id of"
                          f" model_profiles[{first[profile.id]}]"))
        first.setdefault(profile.id, index)
    if found:
        raise InvalidBelow(found)
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
        except Invalid:
            raise
        except (TypeError, ValueError) as exc:
            # `positive` (trio_relay._errors) starts with the field's name; the key shows it.
            raise Invalid(str(exc).removeprefix(f"{field.name} ")) from None
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
            raise Invalid(f"expected a table, got {toml_type(value)}")
        return generated(value, tp)

    return structure


_converter: Final = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(float, _structure_float)
_converter.register_structure_hook(bool, _structure_bool)
_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(Path, _structure_path)
_converter.register_structure_hook_func(is_str_tuple, _structure_str_tuple)
_converter.register_structure_hook_func(lambda tp: tp == dict[str, str], _structure_str_dict)
_converter.register_structure_hook_func(
    lambda tp: tp == tuple[ModelProfile, ...], _structure_profiles
)
_converter.register_structure_hook_factory(attrs.has, _structure_attrs_factory)


def problems(exc: BaseException, path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    """(key path, message) for every leaf of a cattrs error tree."""
    if isinstance(exc, ForbiddenExtraKeysError) and exc.cl in PROFILE_KINDS.values():
        known = [field.name for field in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            others = [kind for kind, cls in PROFILE_KINDS.items()
                      if key in attrs.fields_dict(cls)]
            close = difflib.get_close_matches(key, known, n=1)
            hint = (f' (only agent = "{others[0]}" takes it)' if others
                    else f" (did you mean {close[0]}?)" if close else "")
            yield (*path, key), f"unknown key{hint}"
    elif isinstance(exc, ClassValidationError):
        for sub in exc.exceptions:
            names = [note.name for note in getattr(sub, "__notes__", ())
                     if isinstance(note, AttributeValidationNote)]
            yield from problems(sub, (*path, *names[-1:]))
    elif isinstance(exc, InvalidBelow):
        for below, message in exc.problems:
            yield (*path, *below), message
    elif isinstance(exc, Invalid):
        yield path, str(exc)
    elif isinstance(exc, KeyError):  # cattrs: a required key is missing
        yield path, "required, but missing"
    else:
        yield path, str(exc) or type(exc).__name__


def structure(raw: Mapping[str, Any]) -> ServeSettings:
    """``raw`` (a config file's tables, as TOML types) as settings; raises what `problems`
    reads."""
    settings: ServeSettings = _converter.structure(raw, ServeSettings)
    return settings


def dotted(path: KeyPath) -> str:
    """A key path as the messages show it: ``relay.max_message_size``, ``model_profiles[1].id``."""
    return "".join(part if part.startswith("[") or i == 0 else f".{part}"
                   for i, part in enumerate(path))
