"""Argument validation shared by the public entry points: errors name the argument and the value."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

import numpy as np


def positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> Any:
    """`value` if it is a positive (or, with `allow_zero`, non-negative) finite int/number."""
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, numbers.Real)
    if (
        isinstance(value, bool)
        or not ok_type
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "int" if integer else "number"
        qualifier = "non-negative" if allow_zero else "positive"
        raise ValueError(f"Expected `{name}` to be a {qualifier} {kind}, got {value!r}")
    return value


def in_range(
    name: str, value: Any, lo: float = 0.0, hi: float = math.inf, lo_open: bool = True
) -> float:
    """`value` as a float if it is finite and in (lo, hi] (or [lo, hi] when not `lo_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Expected `{name}` to be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        left = "(" if lo_open else "["
        right = ")" if hi == math.inf else "]"
        raise ValueError(f"Expected `{name}` to be in {left}{lo:g}, {hi:g}{right}, got {value!r}")
    return float(value)


def int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int if it is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, got {value!r}")
    return int(value)


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices}, got {value!r}")
    return value


def logdir(value: Any) -> str | None:
    """A log directory, created now so that an unusable path fails at construction, not later."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"Expected `logdir` to be a path or None, got {value!r}")
    path = os.fspath(value)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create logdir {path!r}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"logdir {path!r} is not writable")
    return path
