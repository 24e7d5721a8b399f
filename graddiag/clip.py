"""Gradient clipping policies: small, composable, framework-neutral.

Every policy, element-wise ones included, is an optax-style pair working on a `Gradients` bundle::

    state = policy.init(n_layers, ops)
    grads, state = policy.update(grads, state, ops)

`grads` carries the adapter's gradient arrays and what is known about them (per-tensor sums of
squares, the layer of each tensor, the parameters); `ops` is the framework's `ClipOps`, so all the
math runs on the device (no host sync in PyTorch, inside `tf.function` in TensorFlow). `chain(...)`
composes policies and is a policy itself, so chains nest.

Adapters call one entry point, `clip_gradients`, which runs a policy and measures what it did:

- ``clip_coef`` = global L2 norm after clipping / global L2 norm before (1.0: unchanged; NaN when
  the norm before is not finite). For one global-norm policy it is the scale applied; for a chain or
  an element-wise policy it is the net effect on the norm.
- ``layer_coef`` (only when the policy holds a per-layer policy, `LayerNormClip`) = per layer, the
  layer's L2 norm after clipping / before; 1.0 for a layer with a zero or no gradient.

Norm policies that follow one another compose analytically: their factors multiply, the sums of
squares follow, and the gradients are multiplied once. An element-wise policy (`ValueClip`, `AGC`)
applies what is pending first; the next norm policy re-measures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

import numpy as np

from graddiag._checks import in_range, positive

#: torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); we match it exactly.
NORM_EPS = 1e-6
#: Marks an empty slot of a policy's history: finite (device state never holds NaN/Inf, so
#: `tf.debugging.enable_check_numerics` stays quiet) and larger than any finite float32 norm.
EMPTY = 3.0e38


class ClipOps(Protocol):
    """The array operations a framework supplies to the clipping engine.

    Scalars and vectors are the framework's own arrays (float32 on a device; float64 in NumPy).
    A *gradient list* is the list the adapter put in `Gradients.tensors` (no None entries); the
    list operations may return a new list (functional, as TensorFlow must) or update the tensors in
    place and return the same list (PyTorch).
    """

    # -- scalar and vector math (what the policies compute with)
    def sqrt(self, x): ...

    def sum(self, x):
        """Sum of all entries."""

    def minimum1(self, x):
        """`min(x, 1)` elementwise."""

    def maximum(self, x, floor: float):
        """`max(x, floor)` elementwise."""

    def where(self, cond, a, b):
        """Elementwise select; `a`/`b` may be Python floats."""

    def full(self, n: int, value: float):
        """A vector of `n` copies of `value`."""

    def scalar(self, value: float): ...

    def quantile_first(self, x, n, q: float):
        """Quantile `q` (linear interpolation) of the `n` smallest entries of `x`; `EMPTY` if n=0."""

    def roll_in(self, buf, index, value):
        """`buf` with `buf[index % len(buf)] = value` (functional)."""

    def segment_sum(self, x, segments, n: int):
        """Length-`n` vector: entry k sums `x[i]` over the i with `segments[i] == k`."""

    def gather(self, x, index):
        """`x[index]` for an integer index vector."""

    # -- gradient lists (what the engine and the element-wise policies need)
    def sumsq(self, grads):
        """Sum of squares of each gradient (a vector, float32 accumulation; a sparse gradient
        counts as its dense value; scaled by 1/loss_scale² where the adapter has one)."""

    def scale(self, grads, factors):
        """Multiply every gradient by `factors`: one scalar, or a vector with one per gradient."""

    def clamp(self, grads, limit: float):
        """Clamp every element to [-limit, limit] (of the unscaled gradient)."""

    def unit_norms(self, grads, params) -> tuple[list, list]:
        """Per-unit L2 norms of each gradient and of its parameter, shaped to broadcast against
        the gradient (a unit is one output unit: dim 0 of a torch weight, the last axis of a
        Keras kernel; a vector or scalar is one unit)."""

    def scale_units(self, grads, factors: list):
        """Multiply each gradient by its own (broadcastable) factor array."""


class NumpyOps:
    """`ClipOps` in NumPy float64, for tests and post-hoc use.

    Args:
        unit_axis: the axis of an AGC unit in a weight (0: the torch layout (out, in); -1: Keras).
    """

    def __init__(self, unit_axis: int = 0) -> None:
        self.unit_axis = unit_axis

    sqrt = staticmethod(np.sqrt)
    sum = staticmethod(np.sum)

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
    def full(n: int, value: float):
        return np.full(n, value, dtype=np.float64)

    @staticmethod
    def scalar(value: float):
        return np.float64(value)

    @staticmethod
    def quantile_first(x, n, q: float):
        n = int(n)
        if n == 0:
            return np.float64(EMPTY)
        return np.float64(np.quantile(np.sort(x)[:n], q))

    @staticmethod
    def roll_in(buf, index, value):
        out = buf.copy()
        out[int(index) % out.shape[0]] = value
        return out

    @staticmethod
    def segment_sum(x, segments, n: int):
        return np.bincount(np.asarray(segments), weights=x, minlength=n).astype(np.float64)

    @staticmethod
    def gather(x, index):
        return np.asarray(x)[np.asarray(index)]

    @staticmethod
    def sumsq(grads):
        return np.array([np.sum(np.square(g, dtype=np.float64)) for g in grads], np.float64)

    @staticmethod
    def scale(grads, factors):
        if np.ndim(factors) == 0:
            return [g * factors for g in grads]
        return [g * f for g, f in zip(grads, factors, strict=True)]

    @staticmethod
    def clamp(grads, limit: float):
        return [np.clip(g, -limit, limit) for g in grads]

    def unit_norms(self, grads, params) -> tuple[list, list]:
        def norms(x):
            x = np.asarray(x, np.float64)
            if x.ndim < 2:
                return np.sqrt(np.sum(x * x))
            axes = tuple(a for a in range(x.ndim) if a != self.unit_axis % x.ndim)
            return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))

        return [norms(g) for g in grads], [norms(p) for p in params]

    @staticmethod
    def scale_units(grads, factors: list):
        return [g * f for g, f in zip(grads, factors, strict=True)]


#: The default `ops` of `init`.
NUMPY = NumpyOps()


@dataclass(frozen=True)
class Gradients:
    """The gradients a policy transforms, with what the engine knows about them.

    All sequences are aligned, one entry per gradient tensor the adapter clips.

    Attributes:
        tensors: the gradient list (the framework's arrays; see `ClipOps`).
        params: the parameters they belong to (AGC reads their unit norms).
        layer_index: per tensor, the index of its layer (an integer vector of `ops`).
        n_layers: number of layers.
        sumsq: per-tensor sums of squares, or None when unknown (after an element-wise policy).
        pending: a factor (scalar or per-tensor vector) already counted in `sumsq` but not yet
            multiplied into `tensors`; None when there is none.
        total: the sum of `sumsq` (the global sum of squares) when already reduced, else None.
    """

    tensors: Any
    params: Any
    layer_index: Any
    n_layers: int
    sumsq: Any = None
    pending: Any = None
    total: Any = None

    def measured(self, ops: ClipOps) -> Gradients:
        """These gradients with their sums of squares known."""
        if self.sumsq is not None:
            return self
        return replace(self, sumsq=ops.sumsq(self.tensors))

    def applied(self, ops: ClipOps) -> Gradients:
        """These gradients with any pending factor multiplied in."""
        if self.pending is None:
            return self
        return replace(self, tensors=ops.scale(self.tensors, self.pending), pending=None)

    def scaled(self, factors, ops: ClipOps) -> Gradients:
        """Scaled by `factors` (scalar or per tensor), lazily: sums of squares follow at once."""
        g = self.measured(ops)
        pending = factors if g.pending is None else g.pending * factors
        return replace(g, sumsq=g.sumsq * (factors * factors), pending=pending, total=None)

    def with_tensors(self, tensors) -> Gradients:
        """New gradient values (of an element-wise policy): sums of squares unknown."""
        return replace(self, tensors=tensors, sumsq=None, pending=None, total=None)

    def global_sumsq(self, ops: ClipOps):
        """The global sum of squares (`total` when already reduced)."""
        return self.total if self.total is not None else ops.sum(self.measured(ops).sumsq)

    def global_norm(self, ops: ClipOps):
        return ops.sqrt(self.global_sumsq(ops))

    def layer_sumsq(self, ops: ClipOps):
        return ops.segment_sum(self.measured(ops).sumsq, self.layer_index, self.n_layers)


@dataclass
class ClipScale:
    """Scales to multiply the gradients by: a global scalar and/or one per layer (None: no change)."""

    global_coef: Any = None
    layer_coef: Any = None


class Policy:
    """A clipping policy: `init(n_layers, ops) -> state`, `update(grads, state, ops) -> (grads,
    state)`. `per_layer` is True when it scales layers separately (a per-layer `clip_coef` is
    recorded then)."""

    per_layer = False

    def init(self, n_layers: int, ops: ClipOps | None = None) -> Any:
        """The initial state (`ops` default: NumPy)."""
        return {}

    def update(self, grads: Gradients, state: Any, ops: ClipOps) -> tuple[Gradients, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return dict(vars(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class NormPolicy(Policy):
    """A policy that scales gradients from their norms: subclasses define `factors` (which
    returns a `layer_coef` only when `per_layer`)."""

    def factors(
        self, layer_norms, global_norm, state: dict[str, Any], ops: ClipOps
    ) -> tuple[ClipScale, dict[str, Any]]:
        """The scales for these norms (`layer_norms` is None unless `per_layer`), and the state."""
        raise NotImplementedError

    def update(self, grads, state, ops):
        grads = grads.measured(ops)
        layer_norms = ops.sqrt(grads.layer_sumsq(ops)) if self.per_layer else None
        scale, state = self.factors(layer_norms, grads.global_norm(ops), state, ops)
        if scale.layer_coef is not None:
            grads = grads.scaled(ops.gather(scale.layer_coef, grads.layer_index), ops)
        if scale.global_coef is not None:
            grads = grads.scaled(scale.global_coef, ops)
        return grads, state


class GlobalNormClip(NormPolicy):
    """Scale all gradients so their global L2 norm is at most `max_norm`.

    Same result as `torch.nn.utils.clip_grad_norm_` / `tf.clip_by_global_norm`.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = in_range("max_norm", max_norm)

    def factors(self, layer_norms, global_norm, state, ops):
        return ClipScale(global_coef=ops.minimum1(self.max_norm / (global_norm + NORM_EPS))), state


class LayerNormClip(NormPolicy):
    """Scale each layer's gradient so its L2 norm is at most `max_norm`."""

    per_layer = True

    def __init__(self, max_norm: float) -> None:
        self.max_norm = in_range("max_norm", max_norm)

    def factors(self, layer_norms, global_norm, state, ops):
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

    def init(self, n_layers, ops=None):
        ops = ops or NUMPY
        return {"norms": ops.full(self.history, EMPTY), "count": ops.scalar(0.0)}

    def factors(self, layer_norms, global_norm, state, ops):
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

    def init(self, n_layers, ops=None):
        ops = ops or NUMPY
        z = ops.scalar(0.0)
        return {"count": z, "sum": z, "sumsq": z, "mean": z, "var": z}

    def factors(self, layer_norms, global_norm, state, ops):
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


class ValueClip(Policy):
    """Clamp every gradient element to [-clip_value, clip_value] (`clip_grad_value_`)."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = in_range("clip_value", clip_value)

    def update(self, grads, state, ops):
        grads = grads.applied(ops)
        return grads.with_tensors(ops.clamp(grads.tensors, self.clip_value)), state


class AGC(Policy):
    """Adaptive gradient clipping: scale each unit's gradient so ||g_u|| <= clipping * max(||w_u||, eps).

    A unit is one output unit of a weight (a row of a torch weight, a column of a Keras kernel: the
    adapter's `ClipOps.unit_norms` knows which); vectors and scalars are one unit each.

    Args:
        clipping: the ratio lambda (0.01 in the paper for batch size 4096; larger for small batches).
        eps: floor on the parameter norm, so zero-initialized parameters can still move.

    References:
        Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", 2021.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        self.clipping = in_range("clipping", clipping)
        self.eps = in_range("eps", eps)

    def factors(self, grad_unit_norm, param_unit_norm, ops: ClipOps):
        """The per-unit factor (<= 1) given unit norms of gradient and parameter."""
        max_norm = self.clipping * ops.maximum(param_unit_norm, self.eps)
        return ops.where(
            grad_unit_norm > max_norm, max_norm / ops.maximum(grad_unit_norm, 1e-6), 1.0
        )

    def update(self, grads, state, ops):
        grads = grads.applied(ops)
        g_norms, p_norms = ops.unit_norms(grads.tensors, grads.params)
        factors = [self.factors(g, p, ops) for g, p in zip(g_norms, p_norms, strict=True)]
        return grads.with_tensors(ops.scale_units(grads.tensors, factors)), state


class Chain(Policy):
    """Policies applied in order; a policy itself (chains nest). Its state is the tuple of its
    policies' states."""

    def __init__(self, *policies: Policy) -> None:
        for p in policies:
            if not isinstance(p, Policy):
                raise ValueError(
                    f"Expected clipping policies (GlobalNormClip, ValueClip, ...), got {p!r}"
                )
        self.policies = tuple(policies)

    @property
    def per_layer(self) -> bool:
        return any(p.per_layer for p in self.policies)

    @property
    def has_layer_coef(self) -> bool:
        """Whether `clip_gradients` returns per-layer coefficients for this chain."""
        return self.per_layer

    def init(self, n_layers, ops=None):
        return tuple(p.init(n_layers, ops) for p in self.policies)

    def update(self, grads, state, ops):
        new = []
        for p, st in zip(self.policies, state, strict=True):
            grads, st = p.update(grads, st, ops)
            new.append(st)
        return grads, tuple(new)

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.policies))})"


class ClipResult(NamedTuple):
    """What `clip_gradients` returns."""

    grads: Any
    state: Any
    clip_coef: Any
    layer_coef: Any


def clip_gradients(policy: Policy, grads: Gradients, state: Any, ops: ClipOps) -> ClipResult:
    """Run `policy` on `grads` and measure its effect: the one entry point of the adapters.

    Args:
        policy: a policy or `Chain`.
        grads: the gradients (pass `sumsq` when the adapter has measured them already).
        state: the policy's state (from `policy.init`, then from the previous call).
        ops: the framework's `ClipOps`.

    Returns:
        `ClipResult(grads, state, clip_coef, layer_coef)`: the clipped gradient list, the new
        state, global norm after / before (a scalar of `ops`), and per layer, norm after / before
        (None unless `policy.per_layer`). A zero norm before gives 1.0; a non-finite one, NaN.

    Example:
        >>> grads = Gradients([np.array([3.0, 4.0])], [np.zeros(2)], np.array([0]), 1)
        >>> policy = GlobalNormClip(1.0)
        >>> out = clip_gradients(policy, grads, policy.init(1), NumpyOps())
        >>> round(float(out.clip_coef), 6)
        0.2
    """
    before = grads.measured(ops)
    total = before.global_sumsq(ops)  # reduced once, used by the policies and for clip_coef
    scalings = _global_scalings(policy)
    if scalings is not None:
        return _clip_globally(policy, scalings, before.tensors, total, state, ops)
    before = replace(before, total=total)
    after, state = policy.update(before, state, ops)
    after = after.applied(ops).measured(ops)
    coef = _norm_ratio(after.global_sumsq(ops), before.total, ops)
    layer_coef = None
    if policy.per_layer:
        layer_coef = _norm_ratio(after.layer_sumsq(ops), before.layer_sumsq(ops), ops)
    return ClipResult(after.tensors, state, coef, layer_coef)


def _global_scalings(policy: Policy) -> tuple[NormPolicy, ...] | None:
    """The policies of `policy` when each only scales all gradients by one factor computed from the
    global norm (`GlobalNormClip`, `AutoClip`, `ZClip`, a flat chain of them); else None."""
    policies = policy.policies if isinstance(policy, Chain) else (policy,)
    if all(isinstance(p, NormPolicy) and not p.per_layer for p in policies):
        return policies
    return None


def _clip_globally(policy, scalings, tensors, total, state, ops: ClipOps) -> ClipResult:
    """`clip_gradients` for global scalings only: their factors multiply into one, the norm
    follows analytically, the gradients are multiplied once, and the norm after / before is that
    factor (nothing is measured again)."""
    states = state if isinstance(policy, Chain) else (state,)
    norm, net, new = ops.sqrt(total), None, []
    for k, (p, st) in enumerate(zip(scalings, states, strict=True)):
        scale, st = p.factors(None, norm, st, ops)
        if scale.layer_coef is not None:
            raise ValueError(f"{p!r} returned per-layer factors but its `per_layer` is False")
        new.append(st)
        net = scale.global_coef if net is None else net * scale.global_coef
        if k + 1 < len(scalings):
            norm = norm * scale.global_coef
    tensors = ops.scale(tensors, net)
    # as `_norm_ratio`: 1 for a zero norm before, NaN for a non-finite one (`total * 0` is 0 or
    # NaN: no NaN constant, so `tf.debugging.enable_check_numerics` stays quiet on finite steps)
    coef = ops.where(total == 0, 1.0, net + total * 0.0)
    return ClipResult(tensors, tuple(new) if isinstance(policy, Chain) else new[0], coef, None)


def _norm_ratio(after_sq, before_sq, ops: ClipOps):
    """sqrt(after_sq / before_sq); 1 where before_sq is 0 (no 0/0 is ever computed, so
    `tf.debugging.enable_check_numerics` stays quiet)."""
    zero = before_sq == 0
    return ops.where(zero, 1.0, ops.sqrt(after_sq / ops.where(zero, 1.0, before_sq)))


def chain(*policies: Policy) -> Chain:
    """Compose clipping policies, applied in the given order.

    Example:
        >>> chain(ValueClip(1e-2), GlobalNormClip(0.05))
        chain(ValueClip(clip_value=0.01), GlobalNormClip(max_norm=0.05))
    """
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
    if isinstance(clip, Policy):
        return Chain(clip)
    raise ValueError(
        f"Expected `clip` to be a clipping policy, a list of them, a number or None, got {clip!r}"
    )
