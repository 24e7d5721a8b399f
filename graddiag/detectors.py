"""Detectors: small stateful units that turn `StepStats` into `Finding`s.

Each detector is pure scoring plus a little state (counters, running moments), torchmetrics-style:
`start(info)` reports static facts, `update(stats)` returns the step's new findings, `finalize(step)`
returns end-of-run summaries, `state_dict()`/`load_state_dict()` checkpoint it. The same detectors
run live (in the adapters) and post-hoc (`graddiag.analyze` over event files), so both agree.

Findings are edge-triggered: a condition is reported when it starts, not on every step it lasts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from graddiag._checks import positive
from graddiag.findings import Finding
from graddiag.stats import ModelInfo, StepStats

SUGGEST = {
    "nonfinite": (
        "Find the op that produced NaN/Inf (log/sqrt/div near 0, exp overflow, fp16 overflow): add an "
        "epsilon or clamp its input, lower the learning rate, clip gradients, or use bf16/GradScaler."
    ),
    "nonfinite_amp": (
        "The loss scale keeps overflowing: check for real NaN/Inf in the forward pass, lower the LR, "
        "or start GradScaler with a smaller init_scale."
    ),
    "vanishing": (
        "Use ReLU/GELU instead of sigmoid/tanh, add residual connections and normalization "
        "(LayerNorm/BatchNorm), and use He/Xavier initialization."
    ),
    "exploding": (
        "Clip gradients (graddiag's clip=GlobalNormClip(1.0), clip_grad_norm_ or "
        "tf.clip_by_global_norm), lower the learning rate or add warmup, and check the "
        "initialization and input scaling."
    ),
    "spike": (
        "Enable adaptive clipping (ZClip/AutoClip), lower the learning rate or add warmup, and inspect "
        "the batch at this step for outliers or bad labels."
    ),
    "frozen_flag": "Intended if you fine-tune part of the model; else set requires_grad=True / trainable=True.",
    "frozen_opt": "Pass these parameters to the optimizer (e.g. optimizer = Adam(model.parameters())).",
    "frozen_zero": (
        "The layer's gradient is exactly zero: check for dead ReLUs (try LeakyReLU/GELU, lower LR), "
        "a zero multiplier or mask upstream, or a saturated activation."
    ),
    "detached": (
        "Check for .detach(), torch.no_grad()/tf.stop_gradient, .item()/.numpy() round trips, or a "
        "branch of the model that the forward pass never uses."
    ),
    "accumulation": (
        "Call optimizer.zero_grad() once per optimizer step (gradient accumulation over micro-batches "
        "should still reset after each step)."
    ),
    "clipped": (
        "Clipping on most steps means the threshold is below the typical norm: raise it, or lower the "
        "learning rate."
    ),
}


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _group_by_module(names: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(_module_of(n), []).append(n)
    return out


class Detector:
    """Base class: subclasses set `name` and implement `update`."""

    name = ""

    def __init__(self) -> None:
        self.info = ModelInfo(layers=())

    def config(self) -> dict[str, Any]:
        """Constructor arguments, so post-hoc analysis can rebuild the same detector."""
        return {}

    def start(self, info: ModelInfo) -> list[Finding]:
        """Take the model description; return static findings."""
        self.info = info
        self.reset()
        return []

    def update(self, stats: StepStats) -> list[Finding]:
        raise NotImplementedError

    def finalize(self, step: int) -> list[Finding]:
        return []

    def reset(self) -> None:
        """Forget everything seen so far."""

    def state_dict(self) -> dict[str, Any]:
        return {
            k: (v.copy() if isinstance(v, np.ndarray) else v)
            for k, v in vars(self).items()
            if k.startswith("_")
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def _finding(
        self,
        stats_step: int,
        layer: str | None,
        severity: str,
        value: float | None,
        message: str,
        suggestion_key: str | None = None,
    ) -> Finding:
        return Finding(
            step=int(stats_step),
            layer=layer,
            kind=self.name,
            severity=severity,
            value=None if value is None else float(value),
            message=message,
            suggestion=SUGGEST[suggestion_key or self.name],
        )

    def _zeros(self, dtype=np.int64) -> np.ndarray:
        return np.zeros(len(self.info.layers), dtype=dtype)


class NonFiniteDetector(Detector):
    """NaN/Inf in the gradients, naming the first layer where it appeared in backward order.

    Args:
        amp: gradients come from a GradScaler: an overflow step is expected (the scaler skips it);
            only `amp_patience` consecutive overflow steps are reported.
        amp_patience: consecutive overflow steps before reporting under `amp`.
    """

    name = "nonfinite"

    def __init__(self, amp: bool = False, amp_patience: int = 10) -> None:
        super().__init__()
        self.amp = bool(amp)
        self.amp_patience = positive("amp_patience", amp_patience, integer=True)

    def config(self) -> dict[str, Any]:
        return {"amp": self.amp, "amp_patience": self.amp_patience}

    def reset(self) -> None:
        self._active = False
        self._run = 0

    def start(self, info: ModelInfo) -> list[Finding]:
        super().start(info)
        order = info.backward_order or tuple(reversed(info.layers))
        index = {n: i for i, n in enumerate(info.layers)}
        self._order = np.array([index[n] for n in order if n in index], dtype=np.int64)
        return []

    def update(self, s: StepStats) -> list[Finding]:
        if math.isfinite(s.global_norm) and not s.nonfinite.any():  # the common case, cheaply
            self._active, self._run = False, 0
            return []
        bad = (s.nonfinite > 0) | (s.has_grad & ~np.isfinite(s.grad_norm))
        self._run += 1
        if self.amp:
            if self._run != self.amp_patience:
                return []
        elif self._active:
            return []
        self._active = True
        layers = self.info.layers
        hit = [i for i in self._order if bad[i]]
        first = layers[hit[0]] if hit else None
        where = f"first in layer {first!r} (backward order)" if first else "in the gradients"
        extra = f"; {len(hit) - 1} more layer(s) affected" if len(hit) > 1 else ""
        layer = first
        if s.nonfinite_origin:
            layer = s.nonfinite_origin
            where = (
                f"born in module {s.nonfinite_origin!r} (its gradient input is non-finite while "
                f"its gradient output was finite); first parameter layer {first!r}"
            )
        value = float(s.nonfinite[hit[0]]) if hit else None
        if self.amp:
            msg = (
                f"Gradients overflowed for {self._run} consecutive steps under GradScaler, {where}"
                f"{extra}."
            )
            return [self._finding(s.step, layer, "error", value, msg, "nonfinite_amp")]
        return [self._finding(s.step, layer, "error", value, f"NaN/Inf gradient {where}{extra}.")]


class VanishingDetector(Detector):
    """A layer's gradient tiny in absolute terms and relative to the largest layer, for `patience` steps.

    Args:
        abs_threshold: a layer norm below this is tiny in absolute terms.
        rel_threshold: ... and below this fraction of the largest layer norm of the step.
        patience: consecutive steps before reporting.
    """

    name = "vanishing"

    def __init__(
        self, abs_threshold: float = 1e-7, rel_threshold: float = 1e-4, patience: int = 10
    ) -> None:
        super().__init__()
        self.abs_threshold = positive("abs_threshold", abs_threshold)
        self.rel_threshold = positive("rel_threshold", rel_threshold)
        self.patience = positive("patience", patience, integer=True)

    def config(self) -> dict[str, Any]:
        return {
            "abs_threshold": self.abs_threshold,
            "rel_threshold": self.rel_threshold,
            "patience": self.patience,
        }

    def reset(self) -> None:
        self._count = self._zeros()
        self._any = False

    def update(self, s: StepStats) -> list[Finding]:
        g = s.grad_norm
        if g.min() >= self.abs_threshold:  # nothing tiny (NaN compares False: handled below)
            if self._any:
                self._count[:] = 0
                self._any = False
            return []
        ok = s.has_grad & np.isfinite(g) & (g > 0)
        if not ok.any():
            return []
        ref = float(np.max(g[ok]))
        tiny = ok & (g < self.abs_threshold) & (g < self.rel_threshold * ref)
        self._count = np.where(tiny, self._count + 1, 0)
        self._any = bool(tiny.any())
        out = []
        for i in np.flatnonzero(self._count == self.patience):
            name = self.info.layers[i]
            out.append(
                self._finding(
                    s.step,
                    name,
                    "warning",
                    g[i],
                    f"Gradient norm of {name!r} is {g[i]:.2e} for {self.patience} steps, "
                    f"{g[i] / ref:.1e} of the largest layer ({ref:.2e}): this layer has almost stopped "
                    f"learning.",
                )
            )
        return out


class ExplodingDetector(Detector):
    """Global (or one layer's) gradient norm above an absolute threshold.

    Args:
        threshold: global-norm threshold.
        layer_threshold: per-layer threshold (default: `threshold`).
    """

    name = "exploding"

    def __init__(self, threshold: float = 1e3, layer_threshold: float | None = None) -> None:
        super().__init__()
        self.threshold = positive("threshold", threshold)
        self.layer_threshold = (
            self.threshold
            if layer_threshold is None
            else positive("layer_threshold", layer_threshold)
        )

    def config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "layer_threshold": self.layer_threshold}

    def reset(self) -> None:
        self._active = False

    def update(self, s: StepStats) -> list[Finding]:
        if not math.isfinite(s.global_norm) or not s.grad_norm.size:
            return []
        if s.global_norm <= self.threshold and s.grad_norm.max() <= self.layer_threshold:
            self._active = False
            return []
        g = np.where(s.has_grad & np.isfinite(s.grad_norm), s.grad_norm, 0.0)
        worst = int(np.argmax(g))
        over = s.global_norm > self.threshold or g[worst] > self.layer_threshold
        if not over:
            self._active = False
            return []
        if self._active:
            return []
        self._active = True
        name = self.info.layers[worst]
        return [
            self._finding(
                s.step,
                name,
                "warning",
                s.global_norm,
                f"Gradient norm {s.global_norm:.3g} exceeds {self.threshold:.3g}; the largest layer is "
                f"{name!r} ({g[worst]:.3g}).",
            )
        ]


class SpikeDetector(Detector):
    """A sudden jump of the global gradient norm: z-score of log-norm against its running history.

    The history is an exponential moving mean and variance of log(norm); spikes do not update it.

    Args:
        z_threshold: z-score above which a step is a spike.
        min_ratio: ... and the norm must be at least this multiple of the running (geometric) mean.
        window: span of the moving average, in steps.
        warmup: steps observed before any spike is reported.
    """

    name = "spike"

    def __init__(
        self, z_threshold: float = 6.0, min_ratio: float = 3.0, window: int = 100, warmup: int = 20
    ) -> None:
        super().__init__()
        self.z_threshold = positive("z_threshold", z_threshold)
        self.min_ratio = positive("min_ratio", min_ratio)
        self.window = positive("window", window, integer=True)
        self.warmup = positive("warmup", warmup, integer=True, allow_zero=True)

    def config(self) -> dict[str, Any]:
        return {
            "z_threshold": self.z_threshold,
            "min_ratio": self.min_ratio,
            "window": self.window,
            "warmup": self.warmup,
        }

    def reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._var = 0.0
        self._layer_mean = np.zeros(len(self.info.layers))

    def update(self, s: StepStats) -> list[Finding]:
        if not (math.isfinite(s.global_norm) and s.global_norm > 0):
            return []
        x = math.log(s.global_norm)
        valid = s.has_grad & np.isfinite(s.grad_norm) & (s.grad_norm > 0)
        # log of a safe stand-in where invalid (np.errstate costs ~80 us per use on NumPy 2.x)
        lx = np.where(valid, np.log(np.where(valid, s.grad_norm, 1.0)), np.nan)
        out = []
        if self._n >= max(self.warmup, 2):
            std = math.sqrt(max(self._var, 1e-12))
            z = (x - self._mean) / std
            if z > self.z_threshold and x - self._mean > math.log(self.min_ratio):
                jump = lx - self._layer_mean
                i = int(np.nanargmax(jump)) if np.isfinite(jump).any() else None
                name = self.info.layers[i] if i is not None else None
                at = f"; the largest jump is in {name!r} ({math.exp(jump[i]):.1f}x)" if name else ""
                out.append(
                    self._finding(
                        s.step,
                        name,
                        "warning",
                        z,
                        f"Gradient norm spiked to {s.global_norm:.3g}, {math.exp(x - self._mean):.1f}x its "
                        f"running mean (z={z:.1f} on log scale){at}.",
                    )
                )
                return out  # keep the spike out of the history
        alpha = 1.0 / (self._n + 1) if self._n < self.window else 2.0 / (self.window + 1)
        self._n += 1
        if self._n == 1:
            self._mean = x
            self._layer_mean = np.where(np.isfinite(lx), lx, 0.0)
            return out
        d = x - self._mean
        self._mean += alpha * d
        self._var = (1 - alpha) * (self._var + alpha * d * d)
        self._layer_mean = np.where(
            np.isfinite(lx), self._layer_mean + alpha * (lx - self._layer_mean), self._layer_mean
        )
        return out


class FrozenDetector(Detector):
    """Parameters that cannot learn.

    Reports `requires_grad=False` parameters (info: often intended), trainable parameters the
    optimizer does not hold (warning: they never update), and layers whose gradient is exactly zero
    for `patience` consecutive steps (warning).

    Args:
        patience: consecutive all-zero steps before reporting.
    """

    name = "frozen"

    def __init__(self, patience: int = 20) -> None:
        super().__init__()
        self.patience = positive("patience", patience, integer=True)

    def config(self) -> dict[str, Any]:
        return {"patience": self.patience}

    def reset(self) -> None:
        self._count = self._zeros()
        self._any = False

    def start(self, info: ModelInfo) -> list[Finding]:
        super().start(info)
        out = []
        for module, names in _group_by_module(info.frozen).items():
            out.append(
                self._finding(
                    0,
                    module,
                    "info",
                    len(names),
                    f"{len(names)} parameter(s) of {module!r} do not require "
                    f"gradients: {', '.join(names)}.",
                    "frozen_flag",
                )
            )
        for module, names in _group_by_module(info.unoptimized).items():
            out.append(
                self._finding(
                    0,
                    module,
                    "warning",
                    len(names),
                    f"{len(names)} trainable parameter(s) of {module!r} are not in "
                    f"the optimizer and will never update: {', '.join(names)}.",
                    "frozen_opt",
                )
            )
        return out

    def update(self, s: StepStats) -> list[Finding]:
        zero = s.has_grad & (s.grad_norm == 0)
        if not zero.any():
            if self._any:
                self._count[:] = 0
                self._any = False
            return []
        self._any = True
        self._count = np.where(zero, self._count + 1, 0)
        return [
            self._finding(
                s.step,
                self.info.layers[i],
                "warning",
                0.0,
                f"Gradient of {self.info.layers[i]!r} has been exactly zero for "
                f"{self.patience} steps.",
                "frozen_zero",
            )
            for i in np.flatnonzero(self._count == self.patience)
        ]


class DetachedDetector(Detector):
    """Trainable layers that have never received a gradient after `patience` steps.

    Args:
        patience: steps without any gradient before reporting.
    """

    name = "detached"

    def __init__(self, patience: int = 3) -> None:
        super().__init__()
        self.patience = positive("patience", patience, integer=True)

    def config(self) -> dict[str, Any]:
        return {"patience": self.patience}

    def reset(self) -> None:
        self._ever = np.zeros(len(self.info.layers), dtype=bool)
        self._steps = 0

    def update(self, s: StepStats) -> list[Finding]:
        if self._steps >= self.patience:
            return []
        self._ever |= s.has_grad
        self._steps += 1
        if self._steps != self.patience:
            return []
        return [
            self._finding(
                s.step,
                self.info.layers[i],
                "warning",
                None,
                f"Trainable layer {self.info.layers[i]!r} has received no gradient in "
                f"{self.patience} steps: it is cut off from the loss.",
            )
            for i in np.flatnonzero(~self._ever)
        ]


class AccumulationDetector(Detector):
    """Gradients carried over from the previous optimizer step (a forgotten `zero_grad`).

    Reads `StepStats.grad_reset`, which adapters derive from observing the reset itself; several
    backward passes between resets (intentional micro-batch accumulation) do not count.
    """

    name = "accumulation"

    def reset(self) -> None:
        self._active = False

    def update(self, s: StepStats) -> list[Finding]:
        if s.grad_reset is None or s.grad_reset:
            self._active = False
            return []
        if self._active:
            return []
        self._active = True
        return [
            self._finding(
                s.step,
                None,
                "warning",
                None,
                "Gradients were not reset since the previous optimizer step: this step "
                "applies the sum of all gradients so far (zero_grad was not called).",
            )
        ]


#: A clip coefficient within this of 1 means "not clipped" (norm ratios carry rounding).
CLIP_TOL = 1e-6


class ClipRateDetector(Detector):
    """Reports, at the end of a run, how often clipping changed the gradients.

    Args:
        warn_rate: clipping on more than this fraction of steps is a warning, else info.
    """

    name = "clipped"

    def __init__(self, warn_rate: float = 0.5) -> None:
        super().__init__()
        self.warn_rate = positive("warn_rate", warn_rate)

    def config(self) -> dict[str, Any]:
        return {"warn_rate": self.warn_rate}

    def reset(self) -> None:
        self._seen = 0
        self._clipped = 0

    def update(self, s: StepStats) -> list[Finding]:
        if s.clip_coef is not None and math.isfinite(s.clip_coef):
            self._seen += 1
            self._clipped += int(s.clip_coef < 1.0 - CLIP_TOL)
        return []

    def finalize(self, step: int) -> list[Finding]:
        if not self._seen:
            return []
        rate = self._clipped / self._seen
        severity = "warning" if rate > self.warn_rate else "info"
        return [
            self._finding(
                step,
                None,
                severity,
                rate,
                f"Clipping changed the gradients on {self._clipped} of {self._seen} "
                f"steps ({rate:.1%}).",
            )
        ]


DETECTORS: dict[str, type[Detector]] = {
    d.name: d
    for d in (
        NonFiniteDetector,
        VanishingDetector,
        ExplodingDetector,
        SpikeDetector,
        FrozenDetector,
        DetachedDetector,
        AccumulationDetector,
        ClipRateDetector,
    )
}


def build_detectors(spec: Mapping[str, Any] | Iterable[Detector] | None = None) -> list[Detector]:
    """The detector set: defaults, adjusted by `spec`.

    Args:
        spec: None (all defaults); a mapping from detector name to `False` (disable), `True`/`{}`
            (defaults) or a dict of constructor arguments; or an iterable of `Detector` instances.

    Raises:
        ValueError: for an unknown detector name or a bad setting (naming it).
    """
    if spec is None:
        return [cls() for cls in DETECTORS.values()]
    if not isinstance(spec, Mapping):
        dets = list(spec)
        for d in dets:
            if not isinstance(d, Detector):
                raise ValueError(f"Expected `detectors` to hold Detector instances, got {d!r}")
        return dets
    unknown = set(spec) - set(DETECTORS)
    if unknown:
        raise ValueError(
            f"Unknown detector name(s) in `detectors`: {sorted(unknown)}; "
            f"known: {sorted(DETECTORS)}"
        )
    out = []
    for name, cls in DETECTORS.items():
        cfg = spec.get(name, True)
        if cfg is False:
            continue
        if cfg is True:
            cfg = {}
        if not isinstance(cfg, Mapping):
            raise ValueError(
                f"Expected `detectors[{name!r}]` to be a bool or a dict of settings, got {cfg!r}"
            )
        try:
            out.append(cls(**cfg))
        except TypeError as e:
            raise ValueError(f"Bad settings for detector {name!r}: {e}") from None
    return out


class Diagnoser:
    """Runs a set of detectors over a stream of `StepStats` and keeps every finding.

    Args:
        info: the model description.
        detectors: see `build_detectors`.
    """

    def __init__(
        self, info: ModelInfo, detectors: Mapping[str, Any] | Iterable[Detector] | None = None
    ) -> None:
        self.info = info
        self.detectors = build_detectors(detectors)
        self.findings: list[Finding] = []
        self.last_step = -1
        for d in self.detectors:
            self.findings.extend(d.start(info))

    def config(self) -> dict[str, dict[str, Any]]:
        return {d.name: d.config() for d in self.detectors}

    def update(self, stats: StepStats) -> list[Finding]:
        new: list[Finding] = []
        for d in self.detectors:
            new.extend(d.update(stats))
        self.findings.extend(new)
        self.last_step = max(self.last_step, stats.step)
        return new

    def finalize(self) -> list[Finding]:
        new: list[Finding] = []
        for d in self.detectors:
            new.extend(d.finalize(max(self.last_step, 0)))
        self.findings.extend(new)
        return new
