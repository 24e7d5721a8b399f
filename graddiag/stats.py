"""Framework-neutral step statistics: what adapters measure and detectors read.

Adapters compute these on the device and fetch them once per log step; from then on they are plain
NumPy arrays indexed by layer (the order of `ModelInfo.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ModelInfo:
    """Static facts about the monitored model.

    Attributes:
        layers: qualified names of the layers that own trainable parameters (adapter order).
        param_counts: number of trainable elements per layer.
        backward_order: the layers in the order their gradients were produced by the first backward
            pass (closest to the loss first), when the adapter observed it; else None.
        frozen: names of parameters with `requires_grad=False` / non-trainable variables.
        unoptimized: names of trainable parameters that the optimizer does not hold.
        framework: "torch", "tensorflow" or "" (post-hoc analysis of foreign logs).
        shared: parameter names that appear under more than one module (counted once).
    """

    layers: tuple[str, ...]
    param_counts: tuple[int, ...] = ()
    backward_order: tuple[str, ...] | None = None
    frozen: tuple[str, ...] = ()
    unoptimized: tuple[str, ...] = ()
    framework: str = ""
    shared: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "param_counts": list(self.param_counts),
            "backward_order": None if self.backward_order is None else list(self.backward_order),
            "frozen": list(self.frozen),
            "unoptimized": list(self.unoptimized),
            "framework": self.framework,
            "shared": list(self.shared),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        bo = d.get("backward_order")
        return cls(
            layers=tuple(d["layers"]),
            param_counts=tuple(d.get("param_counts", ())),
            backward_order=None if bo is None else tuple(bo),
            frozen=tuple(d.get("frozen", ())),
            unoptimized=tuple(d.get("unoptimized", ())),
            framework=d.get("framework", ""),
            shared=tuple(d.get("shared", ())),
        )


@dataclass
class StepStats:
    """Gradient statistics of one optimizer step, per layer (arrays follow `ModelInfo.layers`).

    Attributes:
        step: optimizer step (0-based).
        grad_norm: L2 norm of each layer's gradient before clipping (0 where `has_grad` is False;
            NaN/Inf where the gradient holds NaN/Inf).
        has_grad: whether the layer received any gradient this step.
        nonfinite: > 0 where the layer's gradient holds NaN/Inf (an exact element count on detail
            steps, else 1).
        grad_max, zero_frac, param_norm, update_ratio: detail statistics, None on steps where they
            were not computed.
        global_norm: L2 norm over all gradients before clipping.
        clip_coef: global gradient norm after clipping / before (1.0: not clipped; see
            `graddiag.clip.clip_gradients`); None without clipping or on a skipped step.
        layer_clip_coef: each layer's norm after / before, with a per-layer policy in the chain;
            else None.
        grad_reset: whether gradients were reset since the previous optimizer step (None: unknown).
        backward_calls: backward passes accumulated into this step (None: unknown).
        skipped: whether the optimizer step was skipped by the non-finite policy.
        loss: the loss, when the caller passed it.
        nonfinite_origin: the module where a NaN/Inf was born, when traced.
        grads_modified: whether user code changed the gradients in place between backward() and
            the optimizer step (None: unknown).
        nonfinite_pass: where it was born: "forward" (the module's output turned non-finite from
            finite inputs) or "backward" (its gradient did), when traced.
        nonfinite_ranks: under DDP, the ranks whose local gradients (before the all-reduce) held
            NaN/Inf at this step; None: unknown or not distributed.
        trainable: per layer, whether any of its parameters still requires a gradient at this step
            (`requires_grad` / `trainable`), when the adapter reports it; None: unknown. It tells a
            layer frozen mid-run apart from one whose gradient died or stopped flowing.
    """

    step: int
    grad_norm: np.ndarray
    has_grad: np.ndarray
    nonfinite: np.ndarray
    global_norm: float
    grad_max: np.ndarray | None = None
    zero_frac: np.ndarray | None = None
    param_norm: np.ndarray | None = None
    update_ratio: np.ndarray | None = None
    nan_count: np.ndarray | None = None
    inf_count: np.ndarray | None = None
    clip_coef: float | None = None
    layer_clip_coef: np.ndarray | None = None
    grad_reset: bool | None = None
    backward_calls: int | None = None
    skipped: bool = False
    loss: float | None = None
    nonfinite_origin: str | None = None
    trainable: np.ndarray | None = None
    nonfinite_pass: str | None = None
    grads_modified: bool | None = None
    nonfinite_ranks: tuple[int, ...] | None = None

    @property
    def any_nonfinite(self) -> bool:
        return bool(np.any(self.nonfinite > 0)) or not np.isfinite(self.global_norm)


def aggregate_layers(
    sumsq: np.ndarray, has: np.ndarray, layer_of: np.ndarray, n_layers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-layer statistics from per-parameter sums of squares (what adapters fetch each step).

    Args:
        sumsq: sum of squares per parameter (NaN/Inf where its gradient is non-finite).
        has: per parameter, whether it received a gradient (other entries are ignored).
        layer_of: layer index of each parameter.
        n_layers: number of layers.

    Returns:
        `(grad_norm, has_grad, nonfinite, global_norm)`: per-layer norms, per-layer "any parameter
        had a gradient", per-layer count of parameters with non-finite gradients, global norm.
    """
    has = np.asarray(has, dtype=bool)
    sumsq = np.asarray(sumsq, dtype=np.float64)
    sq = np.where(has, sumsq, 0.0)
    layer_sq = np.bincount(layer_of, weights=sq, minlength=n_layers)
    bad = np.bincount(
        layer_of, weights=(has & ~np.isfinite(sumsq)).astype(np.float64), minlength=n_layers
    )
    layer_has = np.bincount(layer_of, weights=has.astype(np.float64), minlength=n_layers) > 0
    return np.sqrt(layer_sq), layer_has, bad, float(np.sqrt(np.sum(sq)))


def aggregate_detail(
    layer_of: np.ndarray,
    n_layers: int,
    has: np.ndarray,
    numel: np.ndarray,
    grad_max: np.ndarray,
    nonzero: np.ndarray,
    param_sumsq: np.ndarray,
    nan: np.ndarray | None = None,
    inf: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-layer detail statistics from per-parameter ones (entries where `has` is False ignored).

    Returns a dict of `StepStats` fields: grad_max (NaN where a parameter's max is NaN), zero_frac,
    param_norm, and nan_count/inf_count when `nan`/`inf` are given.
    """
    has = np.asarray(has, dtype=bool)
    lo = layer_of[has]
    gmax = np.asarray(grad_max, dtype=np.float64)[has]
    lmax = np.zeros(n_layers)
    np.fmax.at(lmax, lo, gmax)
    lmax[np.bincount(lo, weights=np.isnan(gmax).astype(np.float64), minlength=n_layers) > 0] = (
        np.nan
    )
    zeros = np.bincount(lo, weights=(numel - nonzero)[has], minlength=n_layers)
    count = np.bincount(lo, weights=np.asarray(numel, dtype=np.float64)[has], minlength=n_layers)
    out = {
        "grad_max": lmax,
        "zero_frac": np.divide(zeros, count, out=np.zeros(n_layers), where=count > 0),
        "param_norm": np.sqrt(np.bincount(layer_of, weights=param_sumsq, minlength=n_layers)),
    }
    if nan is not None and inf is not None:
        out["nan_count"] = np.bincount(
            lo, weights=np.asarray(nan, dtype=np.float64)[has], minlength=n_layers
        )
        out["inf_count"] = np.bincount(
            lo, weights=np.asarray(inf, dtype=np.float64)[has], minlength=n_layers
        )
    return out


def aggregate_update_ratio(
    delta_sumsq: np.ndarray, param_sumsq: np.ndarray, layer_of: np.ndarray, n_layers: int
) -> np.ndarray:
    """Per-layer ||w_after - w_before|| / ||w_before|| from per-parameter sums of squares of the
    update and of the weights before it (NaN for a layer whose weights were all zero)."""
    d = np.sqrt(
        np.bincount(layer_of, weights=np.asarray(delta_sumsq, np.float64), minlength=n_layers)
    )
    w = np.sqrt(
        np.bincount(layer_of, weights=np.asarray(param_sumsq, np.float64), minlength=n_layers)
    )
    return np.divide(d, w, out=np.full(n_layers, np.nan), where=w > 0)
