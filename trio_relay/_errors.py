"""The few rules every layer shares about errors and checked values, each written once.

- `CodedError`: an error that carries a wire error ``code`` (``not_found``, ...) beside its
  text; the relay's, the broadcaster's and the client's refusals all are one.
- `raise_single` / `single_error`: a nursery wraps even one error in an exception group; a
  public API raises that one error as itself (and the group only when there are several).
- `positive`: the attrs validator for every duration, size and rate that must be > 0.
"""

from __future__ import annotations

import math
import sys
from typing import Any, NoReturn

import attrs
import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["CodedError", "leaves", "positive", "raise_single", "single_error"]


class CodedError(Exception):
    """An error with the wire's stable error ``code`` and a text a person can read."""

    def __init__(self, code: str, error: str) -> None:
        # args match the constructor, so that copy and pickle can make it again.
        super().__init__(code, error)
        self.code = code
        self.error = error

    def __str__(self) -> str:
        return self.error


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions a (possibly nested) group stands for, in order; ``[exc]`` if not one."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for sub in exc.exceptions for leaf in leaves(sub)]


def single_error(exc: BaseException) -> BaseException:
    """The one real error ``exc`` stands for (a `trio.Cancelled` beside it does not count),
    else ``exc`` itself."""
    found = leaves(exc)
    errors = [leaf for leaf in found if not isinstance(leaf, trio.Cancelled)] or found
    return errors[0] if len(errors) == 1 else exc


def raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one real error of ``group`` as itself, keeping its cause and context (not
    chained to the group); else the group."""
    error = single_error(group)
    if error is group:
        raise group
    context, cause = error.__context__, error.__cause__
    try:
        raise error
    finally:
        # Raised inside `except group`, it would get the group as its context; undo that.
        error.__context__, error.__cause__ = context, cause
        del error


def positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    """attrs validator: a finite number greater than zero (NaN refused too)."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")
