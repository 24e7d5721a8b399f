"""Gradient clipping policies: small, composable, framework-neutral.

A policy is an optax-style pair: `init(n_layers, ops) -> state` and
`update(layer_norms, global_norm, state, ops) -> (ClipScale, state)`. The math is written against a
tiny array namespace (`ops`) so adapters run it *on the device* with their own tensors (no host
sync); `NumpyOps` serves tests and post-hoc use. Adapters apply the scales in place.

Two policies act on elements rather than on norms: `ValueClip` (clamp each element) and `AGC`
(unit-wise ratio of gradient to parameter norm). Adapters apply those with `value_clip`/`agc_scale`;
norm policies placed after them see re-measured norms.

Compose with `chain(...)`, e.g. ``chain(ZClip(), GlobalNormClip(1.0))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graddiag._checks import in_range, positive

#: torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); we match it exactly.
NORM_EPS = 1e-6
#: Marks an empty slot of a policy's history: finite (device state never holds NaN/Inf, so
#: `tf.debugging.enable_check_numerics` stays quiet) and larger than any finite float32 norm.
EMPTY = 3.0e38


class NumpyOps:
    """The array namespace policies compute with; adapters provide torch/TF versions."""

    @staticmethod
    def asarray(x):
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def sqrt(x):
        return np.sqrt(x)

    @staticmethod
    def minimum1(x):
        return np.minimum(x, 1.0)

    @staticmethod
    def maximum(x, floor: float):
        return np.maximum(x, floor)

    @staticmethod
    def where(cond, a, b):
        return np.where(cond, a, b)

    @staticmethod
    def sum(x):
        return np.sum(x)

    @staticmethod
    def full(n: int, value: float):
        return np.full(n, value, dtype=np.float64)

    @staticmethod
    def scalar(value: float):
        return np.float64(value)

    @staticmethod
    def quantile_first(x, n, q: float):
        """Quantile `q` (linear interpolation) of the `n` smallest entries of `x` — the filled part
        of a ring buffer whose empty slots hold `EMPTY`; `EMPTY` when `n` is 0."""
        n = int(n)
        if n == 0:
            return np.float64(EMPTY)
        return np.float64(np.quantile(np.sort(x)[:n], q))

    @staticmethod
    def roll_in(buf, index, value):
        """Return `buf` with `buf[index % len(buf)] = value` (functional)."""
        out = buf.copy()
        out[int(index) % out.shape[0]] = value
        return out


@dataclass
class ClipScale:
    """Scales to multiply the gradients by: a global scalar and/or one per layer (None: no change)."""

    global_coef: Any = None
    layer_coef: Any = None


class NormPolicy:
    """A policy that scales gradients based on their norms."""

    elementwise = False

    def init(self, n_layers: int, ops=NumpyOps) -> dict[str, Any]:
        return {}

    def update(self, layer_norms, global_norm, state: dict[str, Any], ops=NumpyOps):
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return dict(vars(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class GlobalNormClip(NormPolicy):
    """Scale all gradients so their global L2 norm is at most `max_norm`.

    Same result as `torch.nn.utils.clip_grad_norm_` / `tf.clip_by_global_norm`.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = in_range("max_norm", max_norm)

    def update(self, layer_norms, global_norm, state, ops=NumpyOps):
        return ClipScale(global_coef=ops.minimum1(self.max_norm / (global_norm + NORM_EPS))), state


class LayerNormClip(NormPolicy):
    """Scale each layer's gradient so its L2 norm is at most `max_norm`."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = in_range("max_norm", max_norm)

    def update(self, layer_norms, global_norm, state, ops=NumpyOps):
        return ClipScale(layer_coef=ops.minimum1(self.max_norm / (layer_norms + NORM_EPS))), state


class AutoClip(NormPolicy):
    """Clip the global norm to a percentile of the norms seen so far.

    Args:
        percentile: in (0, 100]; 10 is the paper's recommendation.
        history: number of recent steps kept (a ring buffer on the device).

    References:
        Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
        MLSP 2020.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000) -> None:
        self.percentile = in_range("percentile", percentile, 0.0, 100.0)
        self.history = positive("history", history, integer=True)

    def init(self, n_layers, ops=NumpyOps):
        return {"norms": ops.full(self.history, EMPTY), "count": ops.scalar(0.0)}

    def update(self, layer_norms, global_norm, state, ops=NumpyOps):
        finite = (global_norm == global_norm) & (global_norm < EMPTY)  # NaN/Inf never enter it
        norms = ops.where(
            finite, ops.roll_in(state["norms"], state["count"], global_norm), state["norms"]
        )
        count = state["count"] + ops.where(finite, 1.0, 0.0)
        filled = ops.where(count < self.history, count, float(self.history))
        threshold = ops.quantile_first(norms, filled, self.percentile / 100.0)
        coef = ops.minimum1(threshold / (global_norm + NORM_EPS))
        return ClipScale(global_coef=coef), {"norms": norms, "count": count}


class ZClip(NormPolicy):
    """Clip global-norm outliers by z-score against an EMA of the norm's mean and variance.

    After `warmup` steps (whose mean/variance seed the EMA), a norm with z-score above `z_threshold`
    is scaled down to ``mean + z_threshold * std``; the EMA is updated with the clipped norm.

    Args:
        alpha: EMA decay (the paper's 0.97).
        z_threshold: z-score above which the norm is clipped.
        warmup: steps used to initialize mean and variance.
        eps: floor for the standard deviation.

    References:
        Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025.
    """

    def __init__(
        self, alpha: float = 0.97, z_threshold: float = 2.5, warmup: int = 25, eps: float = 1e-6
    ) -> None:
        self.alpha = in_range("alpha", alpha, 0.0, 1.0)
        if alpha == 1.0:
            raise ValueError(f"Expected `alpha` to be in (0, 1), got {alpha!r}")
        self.z_threshold = in_range("z_threshold", z_threshold)
        self.warmup = positive("warmup", warmup, integer=True)
        self.eps = in_range("eps", eps)

    def init(self, n_layers, ops=NumpyOps):
        z = ops.scalar(0.0)
        return {"count": z, "sum": z, "sumsq": z, "mean": z, "var": z}

    def update(self, layer_norms, global_norm, state, ops=NumpyOps):
        n = state["count"]
        finite = global_norm == global_norm
        g = ops.where(finite, global_norm, 0.0)
        warming = n < self.warmup
        std = ops.sqrt(ops.maximum(state["var"], 0.0))
        std = ops.maximum(std, self.eps)
        z = (g - state["mean"]) / std
        target = state["mean"] + self.z_threshold * std
        clip = finite & ~warming & (z > self.z_threshold)
        coef = ops.where(clip, target / (g + NORM_EPS), 1.0)
        g_used = ops.where(clip, target, g)
        # warmup: accumulate plain moments; at its end they seed the EMA
        s1 = state["sum"] + ops.where(warming & finite, g, 0.0)
        s2 = state["sumsq"] + ops.where(warming & finite, g * g, 0.0)
        n_new = n + ops.where(finite, 1.0, 0.0)
        done_now = warming & (n_new >= self.warmup)
        wm = s1 / ops.maximum(n_new, 1.0)
        wv = s2 / ops.maximum(n_new, 1.0) - wm * wm
        d = g_used - state["mean"]
        em = state["mean"] + (1 - self.alpha) * d
        ev = self.alpha * (state["var"] + (1 - self.alpha) * d * d)
        upd = finite & ~warming
        mean = ops.where(done_now, wm, ops.where(upd, em, state["mean"]))
        var = ops.where(done_now, wv, ops.where(upd, ev, state["var"]))
        return ClipScale(global_coef=ops.minimum1(coef)), {
            "count": n_new,
            "sum": s1,
            "sumsq": s2,
            "mean": mean,
            "var": var,
        }


class ValueClip:
    """Clamp every gradient element to [-clip_value, clip_value] (`clip_grad_value_`)."""

    elementwise = True

    def __init__(self, clip_value: float) -> None:
        self.clip_value = in_range("clip_value", clip_value)

    def config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    def __repr__(self) -> str:
        return f"ValueClip(clip_value={self.clip_value!r})"


class AGC:
    """Adaptive gradient clipping: scale each unit's gradient so ||g_u|| <= clipping * max(||w_u||, eps).

    A unit is one output row of a weight (norm over all axes but the first); vectors and scalars are
    one unit each.

    Args:
        clipping: the ratio lambda (0.01 in the paper for batch size 4096; larger for small batches).
        eps: floor on the parameter norm, so zero-initialized parameters can still move.

    References:
        Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", 2021.
    """

    elementwise = True

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        self.clipping = in_range("clipping", clipping)
        self.eps = in_range("eps", eps)

    def config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}

    def scale(self, grad_unit_norm, param_unit_norm, ops=NumpyOps):
        """The per-unit factor (<= 1) given unit norms of gradient and parameter."""
        max_norm = self.clipping * ops.maximum(param_unit_norm, self.eps)
        return ops.where(
            grad_unit_norm > max_norm, max_norm / ops.maximum(grad_unit_norm, 1e-6), 1.0
        )

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping!r}, eps={self.eps!r})"


POLICY_TYPES = (NormPolicy, ValueClip, AGC)


class Chain:
    """Policies applied in order. Norm policies compose analytically (no re-measurement);
    an elementwise policy (ValueClip, AGC) makes the next norm policy work on re-measured norms.
    """

    def __init__(self, *policies) -> None:
        flat = []
        for p in policies:
            if isinstance(p, Chain):
                flat.extend(p.policies)
            elif isinstance(p, POLICY_TYPES):
                flat.append(p)
            else:
                raise ValueError(
                    f"Expected clipping policies (GlobalNormClip, ValueClip, ...), got {p!r}"
                )
        self.policies = tuple(flat)

    def stages(self) -> list[tuple[bool, tuple]]:
        """Consecutive runs of policies: `(elementwise, policies)`."""
        out: list[tuple[bool, tuple]] = []
        for p in self.policies:
            if out and out[-1][0] == p.elementwise and not p.elementwise:
                out[-1] = (False, out[-1][1] + (p,))
            else:
                out.append((p.elementwise, (p,)))
        return out

    def init(self, n_layers: int, ops=NumpyOps) -> list[dict[str, Any]]:
        return [p.init(n_layers, ops) if not p.elementwise else {} for p in self.policies]

    @property
    def has_layer_coef(self) -> bool:
        return any(isinstance(p, LayerNormClip) for p in self.policies)

    def update_norm_stage(
        self, stage_policies, layer_norms, global_norm, states: list, ops=NumpyOps
    ):
        """Run consecutive norm policies.

        Returns `(global_coef, layer_coef, new_states, global_norm_after)`.

        `states` holds the states of `stage_policies`, in order. `layer_norms` may be None when no
        policy of the stage is per-layer.
        """
        gcoef = None
        lcoef = None
        new_states = []
        for p, st in zip(stage_policies, states, strict=False):
            scale, st = p.update(layer_norms, global_norm, st, ops)
            new_states.append(st)
            if scale.layer_coef is not None:
                lcoef = scale.layer_coef if lcoef is None else lcoef * scale.layer_coef
                layer_norms = layer_norms * scale.layer_coef
                global_norm = ops.sqrt(ops.sum(layer_norms * layer_norms))
            if scale.global_coef is not None:
                gcoef = scale.global_coef if gcoef is None else gcoef * scale.global_coef
                if layer_norms is not None:
                    layer_norms = layer_norms * scale.global_coef
                global_norm = global_norm * scale.global_coef
        return gcoef, lcoef, new_states, global_norm

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.policies))})"


def chain(*policies) -> Chain:
    """Compose clipping policies, applied in the given order."""
    return Chain(*policies)


def as_chain(clip) -> Chain | None:
    """Normalize a user's `clip=` argument: None, a policy, a list of policies or a Chain.

    A bare number means `GlobalNormClip(number)`.
    """
    if clip is None:
        return None
    if isinstance(clip, Chain):
        return clip
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        return Chain(GlobalNormClip(clip))
    if isinstance(clip, (list, tuple)):
        return Chain(*clip)
    if isinstance(clip, POLICY_TYPES):
        return Chain(clip)
    raise ValueError(
        f"Expected `clip` to be a clipping policy, a list of them, a number or None, got {clip!r}"
    )
