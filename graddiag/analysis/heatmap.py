"""The layer x step grid behind every gradient-flow heatmap (`graddiag plot`, the TensorBoard
Gradients tab), downsampled for display only.

Each cell is one of four kinds, told apart everywhere they are drawn: a finite positive norm
(coloured by its log10), exactly zero, missing (the layer had no gradient, or nothing was logged)
and non-finite (NaN/Inf). When there are more steps than columns, a column covers `k` consecutive
steps and shows the worst of them: non-finite if any step was, else the largest norm (a one-step
explosion stays visible), else zero, else missing. The findings are never downsampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graddiag.analysis._numeric import quiet_nan_warnings
from graddiag.analysis.diagnosis import Series

__all__ = ["MISSING", "NONFINITE", "VALUE", "ZERO", "HeatGrid", "bin_series", "heat_grid"]

#: Cell kinds, ordered so that the larger one wins when steps are binned into a column.
MISSING, ZERO, VALUE, NONFINITE = 0, 1, 2, 3


@dataclass
class HeatGrid:
    """A run's heatmap, columns x layers.

    Attributes:
        first, last: the first and last step each column covers (equal without downsampling).
        stride: steps per column (1: every logged step has its own column).
        index: (n_steps,) the column of each logged step.
        kind: (columns, layers) int8 cell kinds (`MISSING`, `ZERO`, `VALUE`, `NONFINITE`).
        z: (columns, layers) log10 gradient norm where `kind` is `VALUE`, else NaN.
    """

    first: np.ndarray
    last: np.ndarray
    stride: int
    index: np.ndarray
    kind: np.ndarray
    z: np.ndarray

    def column_of(self, step: int) -> int:
        """The column showing `step` (the nearest column for a step that was not logged)."""
        if not len(self.first):
            return 0
        return int(
            np.clip(np.searchsorted(self.first, step, side="right") - 1, 0, len(self.first) - 1)
        )

    def z_range(self) -> tuple[float, float] | None:
        """(min, max) of the finite log10 norms on display, None when there are none."""
        finite = self.z[np.isfinite(self.z)]
        return (float(finite.min()), float(finite.max())) if finite.size else None


def _stride(n: int, max_cols: int) -> int:
    if isinstance(max_cols, bool) or not isinstance(max_cols, int) or max_cols < 1:
        raise ValueError(f"Expected `max_cols` to be a positive int, got {max_cols!r}")
    return max(1, math.ceil(n / max_cols))


def _binned(a: np.ndarray, k: int, fill) -> np.ndarray:
    """`a` (steps x ...) reshaped to (columns, k, ...), padded with `fill`."""
    pad = (-len(a)) % k
    if pad:
        a = np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)])
    return a.reshape((-1, k) + a.shape[1:])


def heat_grid(s: Series, max_cols: int = 1500) -> HeatGrid:
    """The heatmap of `s` with at most `max_cols` columns.

    Raises:
        ValueError: if `max_cols` is not a positive int.
    """
    n = len(s.steps)
    k = _stride(n, max_cols)
    finite = s.has_grad & np.isfinite(s.grad_norm)
    kind = np.full(s.grad_norm.shape, MISSING, np.int8)
    kind[finite & (s.grad_norm == 0)] = ZERO
    kind[finite & (s.grad_norm > 0)] = VALUE
    kind[s.bad()] = NONFINITE
    with np.errstate(all="ignore"):
        z = np.where(kind == VALUE, np.log10(np.where(kind == VALUE, s.grad_norm, 1.0)), np.nan)
    steps = s.steps.astype(np.int64)
    if k > 1:
        kind = _binned(kind, k, MISSING).max(axis=1)
        with quiet_nan_warnings():
            z = np.nanmax(_binned(z, k, np.nan), axis=1)
        z[kind != VALUE] = np.nan
        first = steps[::k]
        last = steps[np.minimum(np.arange(len(first)) * k + k - 1, n - 1)]
    else:
        first = last = steps
    return HeatGrid(first, last, k, np.arange(n) // k, kind, z)


def bin_series(
    values: np.ndarray, logged: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of `stride` steps: (min, max) of the finite logged values (NaN: none) and
    whether a logged value was NaN/Inf."""
    v = np.where(logged & np.isfinite(values), values, np.nan)
    bad = logged & ~np.isfinite(values)
    if stride == 1:
        return v, v, bad
    vb = _binned(v, stride, np.nan)
    with quiet_nan_warnings():
        return np.nanmin(vb, axis=1), np.nanmax(vb, axis=1), _binned(bad, stride, False).any(axis=1)
