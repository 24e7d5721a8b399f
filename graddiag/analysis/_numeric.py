"""Small numeric helpers shared by the report, plotting and comparison."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def finite_or_none(x) -> float | None:
    """`x` as a float, or None when it is NaN/Inf (strict JSON has no such numbers)."""
    x = float(x)
    return x if math.isfinite(x) else None


@contextmanager
def quiet_nan_warnings() -> Iterator[None]:
    """Silence NumPy's all-NaN-slice RuntimeWarnings (an all-NaN column is a valid answer here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
