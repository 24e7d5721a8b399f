"""Detectors: small stateful units that turn `StepStats` into `Finding`s.

Each detector is pure scoring plus a little state (windows of recent steps, running moments),
torchmetrics-style: `start(info)` reports static facts, `update(stats)` returns the step's new
findings, `finalize(step)` returns end-of-run summaries, `state_dict()`/`load_state_dict()`
checkpoint it. The same detectors run live (in the adapters) and post-hoc (`graddiag.analyze` over
event files), so both agree.

Findings are per episode: a condition is reported once when it starts (judged from rates over a
window of recent steps, so it neither flickers nor waits for an unbroken streak), and when the
episode ends -- or the run does -- that finding's message is completed with its duration
(`Diagnoser.findings` holds the completed finding; `take_amendments()` hands the pairs over).
Everything is judged relative to the run itself (its largest layer, its first steps, its running
history); absolute limits are kept only where they are physical (float32 overflow).

A log step hands over a block of consecutive steps (`update_block`). A detector takes the quiet first
steps of the block at once, vectorised over steps (`_bulk`: nothing reported, no episode ended --
only windows, baselines and running moments advance), and the steps from the first eventful one on
through `update`: a block gives exactly the findings, amendments and state of its steps one by one.
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from graddiag._checks import in_range, positive
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
        "Lower the learning rate or add warmup, clip gradients (graddiag's clip=GlobalNormClip(...), "
        "clip_grad_norm_ or tf.clip_by_global_norm), and check the initialization and input scaling."
    ),
    "exploding_clipped": (
        "Clipping already bounds the step, but the gradients themselves keep growing: lower the "
        "learning rate or add warmup, and check the initialization and input scaling."
    ),
    "spike": (
        "Inspect the batch at this step for outliers or bad labels; if jumps recur, lower the learning "
        "rate or add warmup, or enable adaptive clipping (ZClip/AutoClip)."
    ),
    "spike_clipped": (
        "Clipping limits the damage of this step; inspect its batch for outliers or bad labels, and if "
        "jumps recur or persist, lower the learning rate or add warmup."
    ),
    "divergence": (
        "Lower the learning rate (often 3-10x) or add warmup; check the loss for a missing "
        "normalization (mean vs sum) and the inputs/labels of the first batches."
    ),
    "large_update": (
        "Lower the learning rate until a step moves the weights by about 1e-3 of their norm, or add "
        "warmup; layers with tiny weights (zero-initialized) may need their own parameter group."
    ),
    "frozen_flag": "Intended if you fine-tune part of the model; else set requires_grad=True / trainable=True.",
    "frozen_opt": (
        "Pass these parameters to an optimizer (e.g. optimizer = Adam(model.parameters())); with "
        "several optimizers, every trainable parameter should be in one of them."
    ),
    "frozen_mid": (
        "Nothing to do if you froze it on purpose. If not: a layer that goes silent after training "
        "for a while has dead units (lower the LR, use LeakyReLU/GELU) or sits on a branch the forward "
        "pass stopped using."
    ),
    "dead": (
        "The layer's gradient is exactly zero: check for dead ReLUs (try LeakyReLU/GELU, a lower LR, "
        "a smaller negative bias), a zero multiplier or mask upstream, or a saturated activation."
    ),
    "detached": (
        "Check for .detach(), torch.no_grad()/tf.stop_gradient, .item()/.numpy() round trips, or a "
        "branch of the model that the forward pass never uses."
    ),
    "starved": (
        "Expected for mixture-of-experts experts and rarely used embeddings. If the rate keeps "
        "falling, balance the routing (auxiliary load-balancing loss, capacity factor) or check the "
        "condition that sends inputs to this layer."
    ),
    "zero_gradient": (
        "Look for batches whose loss is masked out entirely (all labels ignored, empty masks), a loss "
        "multiplied by 0 on some steps, or zero_grad() called between backward() and the optimizer "
        "step on some steps."
    ),
    "modified": (
        "Let graddiag clip instead (remove your clip_grad_norm_/clip_grad_value_ and pass clip=... "
        "to the monitor), or do not pass the optimizer and call monitor.step() right after "
        "backward(), before your own changes."
    ),
    "accumulation": (
        "Call optimizer.zero_grad() once per optimizer step (gradient accumulation over micro-batches "
        "should still reset after each step)."
    ),
    "clipped": (
        "Clipping on most steps by a large factor means the threshold is far below the typical norm: "
        "the learning rate alone sets the step size. Raise the threshold, or lower the learning rate."
    ),
    "clipped_info": (
        "Fine if intended (e.g. a recurrent network); if the pre-clip norm keeps rising, lower the "
        "learning rate."
    ),
    "clipped_rare": "Clipping an occasional outlier step is what clipping is for; nothing to do.",
}

#: A window must show a condition on at least this fraction of its steps to open an episode ...
OPEN_RATE = 0.8
#: ... and an open episode ends when the fraction falls to this or below (hysteresis: no flicker).
CLOSE_RATE = 0.2
#: Steps a run-level condition must be absent before its episode ends.
CALM_STEPS = 5
#: A first-steps value enters a baseline only within this factor of the baseline so far (so an
#: explosion at step 1 does not become the reference).
ADMIT = 10.0
#: Prior belief about the step-to-step spread of log(global norm) (log-scale std), worth this many
#: steps: lets the spike detector judge step 1 against step 0 without a blind warm-up.
PRIOR_SIGMA = 0.5
PRIOR_STEPS = 5


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _group_by_module(names: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(_module_of(n), []).append(n)
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class StepBlock(Sequence[StepStats]):
    """Consecutive steps, with the fields that detectors vectorise over stacked once (steps x
    layers, or one value per step) and shared between the detectors, which only read them."""

    def __init__(self, steps: Iterable[StepStats]) -> None:
        self._steps = list(steps)
        self._stacked: dict[Hashable, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self._steps)

    def __getitem__(self, i):  # a step, or a list of steps for a slice
        return self._steps[i]

    def __iter__(self) -> Iterator[StepStats]:
        return iter(self._steps)

    def field(self, name: str) -> np.ndarray:
        """`StepStats.<name>` of every step, stacked."""
        if name not in self._stacked:
            self._stacked[name] = np.array([getattr(s, name) for s in self._steps])
        return self._stacked[name]

    def detail(self, name: str, absent: float) -> np.ndarray | None:
        """A detail field (None on most steps) stacked, `absent` on the steps without it; None when
        no step has it."""
        key = (name, absent)
        if key not in self._stacked:
            rows = [getattr(s, name) for s in self._steps]
            out = None
            if any(r is not None for r in rows):
                out = np.full((len(rows), len(self._steps[0].grad_norm)), float(absent))
                for k, r in enumerate(rows):
                    if r is not None:
                        out[k] = r
            self._stacked[key] = out
        return self._stacked[key]

    def all_zero(self) -> np.ndarray:
        """Per step: the whole gradient is exactly zero (or absent)."""
        if "all_zero" not in self._stacked:
            self._stacked["all_zero"] = _all_zero(
                self.field("global_norm"), self.field("nonfinite")
            )
        return self._stacked["all_zero"]


def _clipped(block: Sequence[StepStats]) -> bool:
    """Whether clipping ran on any of these steps."""
    return any(s.clip_coef is not None or s.layer_clip_coef is not None for s in block)


def _first(mask: np.ndarray) -> int:
    """Index of the first True in `mask`, or its length."""
    i = int(mask.argmax()) if len(mask) else 0
    return i if len(mask) and mask[i] else len(mask)


def _last_steps(mask: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The columns of a steps x layers `mask` that are True somewhere, and the last step where."""
    if not len(mask):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cols = np.flatnonzero(mask.any(axis=0))
    return cols, steps[len(mask) - 1 - np.argmax(mask[::-1], axis=0)[cols]]


def _all_zero(global_norm: float | np.ndarray, nonfinite: np.ndarray) -> np.ndarray:
    """Per step: the whole gradient is exactly zero (or absent)."""
    return (global_norm == 0) & ~(nonfinite > 0).any(axis=-1)


class Window:
    """The last `size` rows of per-layer 0/1 (or real) values with their running sum: rates over a
    window of steps, and the steps they came from."""

    def __init__(self, size: int, width: int) -> None:
        self.buf = np.zeros((size, width))
        self.steps = np.full(size, -1, dtype=np.int64)
        self.sum = np.zeros(width)
        self.pos = 0
        self.n = 0

    def push(self, row: np.ndarray, step: int) -> None:
        self.sum += row - self.buf[self.pos]
        self.buf[self.pos] = row
        self.steps[self.pos] = step
        self.pos = (self.pos + 1) % len(self.steps)
        self.n = min(self.n + 1, len(self.steps))

    @property
    def full(self) -> bool:
        return self.n == len(self.steps)

    def rate(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    def span(self) -> tuple[int, int]:
        """First and last step in the window."""
        first = self.steps[self.pos] if self.full else self.steps[0]
        return int(first), int(self.steps[self.pos - 1])

    def values(self) -> np.ndarray:
        """The rows held, oldest first."""
        if not self.full:
            return self.buf[: self.n]
        return np.roll(self.buf, -self.pos, axis=0)

    def sums_after(self, rows: np.ndarray) -> np.ndarray:
        """The running sum after pushing each of `rows` in turn, by the same floating-point
        operations as `push` (an accumulating sum is sequential), without pushing them."""
        k = len(rows)
        if self.pos + k <= len(self.steps):
            left = self.buf[self.pos : self.pos + k]
        else:
            left = np.concatenate([self.buf[self.pos :], self.buf[: self.pos], rows])[:k]
        change = rows - left
        change[:1] += self.sum  # sum + change[0], then + change[1], ...: `push`'s order
        return np.cumsum(change, axis=0)

    def counts_after(self, k: int) -> np.ndarray:
        """`n` after pushing each of `k` rows."""
        return np.minimum(self.n + np.arange(1, k + 1), len(self.steps))

    def extend(self, rows: np.ndarray, steps: np.ndarray, sums: np.ndarray) -> None:
        """`push` each of `rows` in turn, given `sums_after(rows)`."""
        k, size = len(rows), len(self.steps)
        if not k:
            return
        kept = min(k, size)  # the last rows written
        start = (self.pos + k - kept) % size
        head = min(kept, size - start)  # before the end of the ring, then from its start
        for ring, new in ((self.buf, rows[k - kept :]), (self.steps, steps[k - kept :])):
            ring[start : start + head] = new[:head]
            ring[: kept - head] = new[head:]
        self.sum[:] = sums[-1]
        self.pos = (self.pos + k) % size
        self.n = min(self.n + k, size)


class Detector:
    """Base class: subclasses set `name` and implement `update`.

    Attributes:
        retired: settings of earlier graddiag versions that are ignored (with a warning) so that
            logs written by them can still be analyzed, mapped to why.
    """

    name = ""
    retired: Mapping[str, str] = {}

    def __init__(self) -> None:
        self.info = ModelInfo(layers=())
        Detector.reset(self)

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

    def update_block(self, block: Sequence[StepStats]) -> list[list[Finding]]:
        """`update` over consecutive steps: each step's new findings. The result, the amendments
        and the state afterwards are those of calling `update` on each step in turn: the quiet
        first steps are taken at once (`_bulk`), the rest one by one."""
        k = 0
        if len(block) > 1:
            k = self._bulk(block if isinstance(block, StepBlock) else StepBlock(block))
        return [[] for _ in range(k)] + [self.update(s) for s in block[k:]]

    def _bulk(self, block: StepBlock) -> int:
        """Take the longest first part of `block` on which `update` would report nothing and end
        no episode, vectorised over its steps; return its length. Default: none."""
        return 0

    def finalize(self, step: int) -> list[Finding]:
        """End of run: complete the findings of episodes still open."""
        for key in list(self._episodes):
            self._close(key, step)
        return []

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._episodes: dict[Hashable, list] = {}
        self._amended: list[tuple[Finding, Finding]] = []

    def state_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k.startswith("_")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, copy.deepcopy(v))

    def take_amendments(self) -> list[tuple[Finding, Finding]]:
        """`(reported, completed)` pairs for findings whose episode has ended since the last call."""
        out, self._amended = self._amended, []
        return out

    # ---- episodes: one finding per occurrence of a condition --------------------------------
    def _episode(self, key: Hashable) -> Finding | None:
        ep = self._episodes.get(key)
        return None if ep is None else ep[0]

    def _open(self, key: Hashable, finding: Finding, last: int | None = None) -> Finding:
        self._episodes[key] = [finding, finding.step if last is None else int(last)]
        return finding

    def _hold(self, key: Hashable, step: int) -> None:
        """The condition of an open episode is still present at `step`."""
        self._episodes[key][1] = int(step)

    def _close(self, key: Hashable, end: int | None = None) -> None:
        """End an episode; `end` is the run's last step when the run ends first."""
        f, last = self._episodes.pop(key)[:2]
        n = last - f.step + 1
        if end is not None and last >= end:
            note = f" Still present at the last step, {last} ({_plural(n, 'step')} since step {f.step})."
        else:
            note = f" Lasted {_plural(n, 'step')} (steps {f.step}-{last})."
        self._amended.append((f, replace(f, message=f.message + note)))

    def _finding(
        self,
        stats_step: int,
        layer: str | None,
        severity: str,
        value: float | None,
        message: str,
        suggestion_key: str | None = None,
        kind: str | None = None,
    ) -> Finding:
        return Finding(
            step=int(stats_step),
            layer=layer,
            kind=kind or self.name,
            severity=severity,
            value=None if value is None else float(value),
            message=message,
            suggestion=SUGGEST[suggestion_key or kind or self.name],
        )


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _admit(baseline: list[float], size: int, value: float, ok: bool) -> None:
    """Grow a first-steps baseline with `value` unless it is full or `value` is abnormal."""
    if ok and len(baseline) < size:
        baseline.append(float(value))


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
        return self._report(s)

    def _bulk(self, block: StepBlock) -> int:
        finite = np.isfinite(block.field("global_norm")) & ~block.field("nonfinite").any(axis=1)
        k = _first(~finite)
        if k:
            self._active, self._run = False, 0
        return k

    def _report(self, s: StepStats) -> list[Finding]:
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
        if s.nonfinite_origin and s.nonfinite_pass == "forward":
            layer = s.nonfinite_origin
            where = (
                f"born in the forward pass in module {s.nonfinite_origin!r} (its output is "
                f"non-finite while its inputs were finite); first parameter layer {first!r}"
            )
        elif s.nonfinite_origin:
            layer = s.nonfinite_origin
            where = (
                f"born in the backward pass in module {s.nonfinite_origin!r} (its gradient input "
                f"is non-finite while its gradient output was finite); first parameter layer "
                f"{first!r}"
            )
        # DDP/FSDP2 ranks, tf.distribute replicas: local gradients before the all-reduce
        unit = "replica" if self.info.framework == "tensorflow" else "rank"
        if s.nonfinite_ranks:
            ranks = ", ".join(map(str, s.nonfinite_ranks))
            plural = "s" if len(s.nonfinite_ranks) > 1 else ""
            where += (
                f"; it first appeared on {unit}{plural} {ranks} (local gradients before they "
                f"were reduced across {unit}s)"
            )
        elif s.nonfinite_ranks == ():
            where += (
                f"; no {unit}'s local gradients held NaN/Inf (their sum across {unit}s overflowed)"
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
    """Layers whose gradient is tiny relative to the rest of the model, most of a window long.

    A layer is tiny at a step when its norm is below `rel_threshold` of the largest layer's (and,
    when parameter counts are known, so is its per-element RMS, so that a small layer such as a
    scalar gain or a sparsely used embedding is not called vanishing for its size alone) -- or below
    `profile_threshold` of it at the bottom of a steady decay: every layer from the largest one down
    to it, in backward order, smaller than the one before (the signature of gradients shrinking
    layer by layer toward the input). No absolute floor: a whole model with small gradients has
    converged or is scaled down, not vanishing; a float32 underflow to an all-zero norm on a layer
    whose gradient is not all zeros (`zero_frac` < 1) counts as tiny.

    Args:
        rel_threshold: fraction of the largest layer below which a layer is tiny.
        profile_threshold: the same, for a layer at the bottom of a steady decay (backward order
            known).
        patience: window length in steps; an episode opens when a layer was tiny on 80% of the
            window and ends when that falls to 20%.
    """

    name = "vanishing"
    retired = {"abs_threshold": "vanishing is judged relative to the model, without absolute floor"}

    def __init__(
        self, rel_threshold: float = 1e-4, profile_threshold: float = 1e-3, patience: int = 10
    ) -> None:
        super().__init__()
        self.rel_threshold = in_range("rel_threshold", rel_threshold, 0.0, 1.0)
        self.profile_threshold = in_range("profile_threshold", profile_threshold, 0.0, 1.0)
        self.patience = positive("patience", patience, integer=True)

    def config(self) -> dict[str, Any]:
        return {
            "rel_threshold": self.rel_threshold,
            "profile_threshold": self.profile_threshold,
            "patience": self.patience,
        }

    def reset(self) -> None:
        super().reset()
        self._tiny = Window(self.patience, len(self.info.layers))

    def start(self, info: ModelInfo) -> list[Finding]:
        super().start(info)
        n = len(info.layers)
        counts = np.asarray(info.param_counts, dtype=np.float64)
        self._sqrt_n = np.sqrt(counts) if len(counts) == n and (counts > 0).all() else None
        index = {name: i for i, name in enumerate(info.layers)}
        bo = info.backward_order
        self._order = (
            None if not bo else np.array([index[b] for b in bo if b in index], dtype=np.int64)
        )
        return []

    def _live(self, g: np.ndarray, has: np.ndarray, zero_frac: np.ndarray | None) -> np.ndarray:
        """Per step (rows): the layers whose norm is compared -- finite and positive, or an
        underflowed norm of a gradient that is not all zeros."""
        live = has & np.isfinite(g) & (g > 0)
        if zero_frac is not None:
            live |= has & (g == 0) & (zero_frac < 1.0)
        return live

    def _measure(self, g: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per step (rows, each with 2+ live layers): each layer's ratio to the largest one, and
        whether it is tiny."""
        if live.all():  # (the common case, with fewer operations)
            ratio = g / g.max(axis=1, keepdims=True)
        else:
            top = np.where(live, g, -1.0).max(axis=1, keepdims=True)
            ratio = np.where(live, g / top, 1.0)
        tiny = ratio < self.rel_threshold  # live layers only: the others' ratio is 1
        profile = ratio < self.profile_threshold
        if self._sqrt_n is not None and (tiny | profile).any():
            rms = np.where(live, g / self._sqrt_n, 0.0)
            rms_ratio = rms / rms.max(axis=1, keepdims=True)
            tiny &= rms_ratio < self.rel_threshold
            profile &= rms_ratio < self.profile_threshold
        if profile.any():
            profile &= self._steady_decay(g, live)
        return ratio, tiny | profile

    def _steady_decay(self, g: np.ndarray, live: np.ndarray) -> np.ndarray:
        """Per step (rows): the layers on a steady decay below the largest one (backward order:
        each live layer smaller than the live one before it)."""
        out = np.zeros(g.shape, bool)
        if self._order is None or len(self._order) < 2:
            return out
        go, lo = g[:, self._order], live[:, self._order]
        pos = np.arange(len(self._order))
        if lo.all():
            top = np.argmax(go, axis=1)[:, None]
        else:  # a layer without a usable norm takes the last live one's: no rise there
            top = np.argmax(np.where(lo, go, -np.inf), axis=1)[:, None]
            go = np.take_along_axis(go, np.maximum.accumulate(np.where(lo, pos, 0), axis=1), 1)
        below = lo[:, 1:] & (pos[1:] > top)
        rises = below & (go[:, 1:] > go[:, :-1])
        out[:, self._order[1:]] = below & ~np.logical_or.accumulate(rises, axis=1)
        return out

    def _depth(self, g: np.ndarray, live: np.ndarray, i: int) -> int:
        """How many live layers layer `i` sits below the largest one in backward order (0 when it
        is not below it)."""
        if self._order is None:
            return 0
        seq = self._order[live[self._order]].tolist()
        if i not in seq:
            return 0
        return max(seq.index(i) - int(np.argmax(g[seq])), 0)

    def update(self, s: StepStats) -> list[Finding]:
        g = s.grad_norm[None]
        live = self._live(g, s.has_grad[None], None if s.zero_frac is None else s.zero_frac[None])
        if np.count_nonzero(live) < 2:
            return []  # nothing to compare with: the step says nothing about vanishing
        ratio, tiny = (a[0] for a in self._measure(g, live))
        self._tiny.push(tiny.astype(np.float64), s.step)
        if self._tiny.n < self.patience:
            return []
        count = self._tiny.sum
        out = []
        for i in list(self._episodes):
            if count[i] <= CLOSE_RATE * self.patience:
                self._close(i)
            elif tiny[i]:
                self._hold(i, s.step)
        for i in np.flatnonzero(count >= math.ceil(OPEN_RATE * self.patience)):
            i = int(i)
            if self._episode(i) is None:
                out.append(self._open(i, self._report(s, i, ratio, live[0], int(count[i]))))
        return out

    def _bulk(self, block: StepBlock) -> int:
        g = block.field("grad_norm")
        live = self._live(g, block.field("has_grad"), block.detail("zero_frac", 1.0))
        pushed = np.arange(len(block))
        if g.shape[1] < 2 or not live.all():  # steps with < 2 live layers say nothing: left out
            pushed = np.flatnonzero(np.count_nonzero(live, axis=1) >= 2)
            if not len(pushed):
                return len(block)
            g, live = g[pushed], live[pushed]
        tiny = self._measure(g, live)[1]
        rows = tiny.astype(np.float64)
        if not self._episodes and not tiny.any() and not self._tiny.sum.any():
            # no tiny layer in the window nor in the block: every count stays 0, nothing opens
            steps = block.field("step")[pushed]
            self._tiny.extend(rows, steps, np.zeros(rows.shape))
            return len(block)
        count = self._tiny.sums_after(rows)
        judged = self._tiny.counts_after(len(rows)) >= self.patience
        flips = count >= math.ceil(OPEN_RATE * self.patience)  # an episode opens ...
        if self._episodes:  # ... or ends
            is_open = np.zeros(g.shape[1], bool)
            is_open[list(self._episodes)] = True
            flips = np.where(is_open, count <= CLOSE_RATE * self.patience, flips)
        e = _first(judged & flips.any(axis=1))
        steps = block.field("step")[pushed[:e]]
        if self._episodes:
            held = judged[:e, None] & tiny[:e] & is_open
            for i, step in zip(*_last_steps(held, steps), strict=True):
                self._hold(int(i), step)
        self._tiny.extend(rows[:e], steps, count[:e])
        return int(pushed[e]) if e < len(pushed) else len(block)

    def _report(self, s, i, ratio, live, count) -> Finding:
        ref_i = int(np.argmax(np.where(live, s.grad_norm, -1.0)))
        layers = self.info.layers
        name, top = layers[i], layers[ref_i]
        a, b = self._tiny.span()
        depth = self._depth(s.grad_norm, live, i)
        shrink = ""
        if depth > 0:
            per_layer = ratio[i] ** (-1.0 / depth)
            shrink = (
                f" In backward order it sits {_plural(depth, 'layer')} below {top!r}, the "
                f"gradient shrinking about {per_layer:.1f}x per layer toward the input."
            )
        below = self.rel_threshold if ratio[i] < self.rel_threshold else self.profile_threshold
        return self._finding(
            s.step,
            name,
            "warning",
            ratio[i],
            f"Gradient of {name!r} is {ratio[i]:.1e} of the largest layer's ({top!r}, "
            f"{s.grad_norm[ref_i]:.2e}; this layer {s.grad_norm[i]:.2e}); it was below "
            f"{below:.0e} of it on {count} of the last {self._tiny.n} steps ({a}-{b}): it receives "
            f"almost no learning signal compared with the rest of the model.{shrink}",
        )


class ExplodingDetector(Detector):
    """The global gradient norm far above the run's own baseline, or near float32 overflow.

    The baseline is the median norm of the run's first `baseline` steps (a step `ADMIT`x above the
    baseline so far is left out of it, so an explosion at step 1 is not its own reference). A
    sum-reduced loss or a large batch scales every norm of the run alike and changes nothing here.

    Args:
        factor: the norm must exceed this multiple of the baseline ...
        patience: ... on this many consecutive steps (a single outlier step is a `spike`).
        abs_threshold: a norm above this is reported at once, regardless of the baseline: float32
            squares of such values (squared norms, Adam's second moment) overflow near 1.8e19.
        baseline: number of first steps forming the baseline.
    """

    name = "exploding"
    retired = {
        "threshold": "replaced by `factor` (relative to the run's first steps) and `abs_threshold`",
        "layer_threshold": "replaced by `factor` and `abs_threshold`",
    }

    def __init__(
        self,
        factor: float = 100.0,
        patience: int = 3,
        abs_threshold: float = 1e18,
        baseline: int = 5,
    ) -> None:
        super().__init__()
        self.factor = in_range("factor", factor, 1.0, math.inf, lo_open=False)
        self.patience = positive("patience", patience, integer=True)
        self.abs_threshold = positive("abs_threshold", abs_threshold)
        self.baseline = positive("baseline", baseline, integer=True)

    def config(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "patience": self.patience,
            "abs_threshold": self.abs_threshold,
            "baseline": self.baseline,
        }

    def reset(self) -> None:
        super().reset()
        self._base: list[float] = []
        self._run = 0
        self._calm = 0
        self._clipping = False

    def update(self, s: StepStats) -> list[Finding]:
        self._clipping |= _clipped([s])
        gn = s.global_norm
        if not (math.isfinite(gn) and gn > 0):
            return []  # non-finite: the nonfinite detector's; zero: nothing exploded
        ref = _median(self._base) if self._base else None
        over_abs = gn > self.abs_threshold
        over = over_abs or (ref is not None and gn > self.factor * ref)
        _admit(self._base, self.baseline, gn, not over and (ref is None or gn <= ADMIT * ref))
        self._run = self._run + 1 if over else 0
        self._calm = 0 if over else self._calm + 1
        if self._episode("global") is not None:
            if over:
                self._hold("global", s.step)
            elif self._calm >= CALM_STEPS:
                self._close("global")
            return []
        if self._run < self.patience and not over_abs:
            return []
        g = np.where(s.has_grad & np.isfinite(s.grad_norm), s.grad_norm, 0.0)
        worst = int(np.argmax(g)) if g.size else None
        name = None if worst is None else self.info.layers[worst]
        at = f"; the largest layer is {name!r} ({g[worst]:.3g})" if name else ""
        onset = s.step - self._run + 1
        if over_abs:
            msg = (
                f"Gradient norm {gn:.3g} exceeds {self.abs_threshold:.0e}{at}: float32 arithmetic on "
                f"these gradients (squared norms, Adam's second moment) is about to overflow."
            )
        else:
            steps = _plural(len(self._base), "step")
            run = f" on {_plural(self._run, 'consecutive step')} since step {onset}"
            msg = (
                f"Gradient norm {gn:.3g} is {gn / ref:.0f}x the run's baseline {ref:.3g} (median of "
                f"its first {steps}){run}{at}: updates this much larger than at the start "
                f"destabilize training."
            )
        key = "exploding_clipped" if self._clipping else "exploding"
        return [self._open("global", self._finding(onset, name, "warning", gn, msg, key), s.step)]

    def _bulk(self, block: StepBlock) -> int:
        if self._episodes or len(self._base) < self.baseline:
            return 0  # the baseline is still growing, or an episode may end: step by step
        gn = block.field("global_norm")
        judged = np.isfinite(gn) & (gn > 0)
        over = judged & ((gn > self.abs_threshold) | (gn > self.factor * _median(self._base)))
        k = _first(over)
        self._clipping |= _clipped(block[:k])
        calm = int(np.count_nonzero(judged[:k]))
        if calm:
            self._run, self._calm = 0, self._calm + calm
        return k


class SpikeDetector(Detector):
    """A sudden jump of the global gradient norm: z-score of log-norm against its running history.

    The history is an exponential moving mean and variance of log(norm), blended with a prior spread
    (`PRIOR_SIGMA`, worth `PRIOR_STEPS` steps) so that step 1 is judged against step 0 with no blind
    warm-up: early, only a large jump (about 15x at step 1) counts; as history accrues, its own
    spread takes over. Spike steps stay out of the history; consecutive spike steps are one episode.
    The finding names the layer that contributes most of the increase of the squared norm over its
    own typical value (a layer silent until now counts from zero).

    Args:
        z_threshold: z-score above which a step is a spike.
        min_ratio: ... and the norm must be at least this multiple of the running (geometric) mean.
        window: span of the moving average, in steps.
    """

    name = "spike"
    retired = {"warmup": "spikes are judged from step 1 (a prior spread replaces the warm-up)"}

    def __init__(self, z_threshold: float = 6.0, min_ratio: float = 3.0, window: int = 100) -> None:
        super().__init__()
        self.z_threshold = positive("z_threshold", z_threshold)
        self.min_ratio = positive("min_ratio", min_ratio)
        self.window = positive("window", window, integer=True)

    def config(self) -> dict[str, Any]:
        return {"z_threshold": self.z_threshold, "min_ratio": self.min_ratio, "window": self.window}

    def reset(self) -> None:
        super().reset()
        self._n = 0
        self._mean = 0.0
        self._var = 0.0
        self._layer_sq = np.zeros(len(self.info.layers))
        self._clipping = False

    def z_score(self, norm: float) -> float:
        """The z-score of `norm` against the history so far (NaN before the first step)."""
        if self._n == 0:
            return math.nan
        n = min(self._n, self.window)
        var = (n * self._var + PRIOR_STEPS * PRIOR_SIGMA**2) / (n + PRIOR_STEPS)
        return (math.log(norm) - self._mean) / math.sqrt(var)

    @staticmethod
    def _layer_squares(g: np.ndarray, has: np.ndarray) -> np.ndarray:
        """Each layer's squared norm (0 without a finite gradient)."""
        return np.where(has & np.isfinite(g), g, 0.0) ** 2

    def _jumped(self, gn: float) -> float | None:
        """The z-score of a spike step, else None."""
        z = self.z_score(gn)
        jumped = z > self.z_threshold and math.log(gn) - self._mean > math.log(self.min_ratio)
        return z if jumped else None

    def update(self, s: StepStats) -> list[Finding]:
        self._clipping |= _clipped([s])
        gn = s.global_norm
        if not (math.isfinite(gn) and gn > 0):
            return []
        sq = self._layer_squares(s.grad_norm, s.has_grad)
        z = self._jumped(gn)
        if z is not None:
            if self._episode("spike") is not None:
                self._hold("spike", s.step)
                return []
            return [self._open("spike", self._report(s, z, sq))]  # kept out of the history
        if self._episode("spike") is not None:
            self._close("spike")
        self._absorb(math.log(gn), sq)
        return []

    def _bulk(self, block: StepBlock) -> int:
        if self._episodes:
            return 0  # the next step holds or ends the episode
        k, taken, alphas = len(block), [], []
        for i, s in enumerate(block):  # the running moments: a recurrence, step by step
            gn = s.global_norm
            if math.isfinite(gn) and gn > 0:
                if self._jumped(gn) is not None:
                    k = i
                    break
                alphas.append(self._absorb_moments(math.log(gn)))
                taken.append(i)
        if taken:
            sq = self._layer_squares(block.field("grad_norm"), block.field("has_grad"))
            self._absorb_layers(sq if len(taken) == len(block) else sq[taken], alphas)
        self._clipping |= _clipped(block[:k])
        return k

    def _absorb(self, x: float, sq: np.ndarray) -> None:
        """Add a step's log-norm `x` and layer squares `sq` to the history."""
        self._absorb_layers(sq[None], [self._absorb_moments(x)])

    def _absorb_moments(self, x: float) -> float | None:
        """Add a log-norm `x` to the running moments; return its weight (None: the first step,
        which the history takes as it is) for `_absorb_layers`."""
        alpha = 1.0 / (self._n + 1) if self._n < self.window else 2.0 / (self.window + 1)
        self._n += 1
        if self._n == 1:
            self._mean = x
            return None
        d = x - self._mean
        self._mean += alpha * d
        self._var = (1 - alpha) * (self._var + alpha * d * d)
        return alpha

    def _absorb_layers(self, sq: np.ndarray, alphas: list[float | None]) -> None:
        """Add layer squares (rows of `sq`, one per step) to the history with `alphas` in turn:
        `layer_sq + alpha * (sq - layer_sq)`, in plain floats for a few layers (the same
        arithmetic, without NumPy's per-call cost)."""
        if sq.shape[1] > 16:
            layer = self._layer_sq
            for row, alpha in zip(sq, alphas, strict=True):
                layer = row if alpha is None else layer + alpha * (row - layer)
            self._layer_sq = layer
            return
        acc = self._layer_sq.tolist()
        for row, alpha in zip(sq.tolist(), alphas, strict=True):
            acc = (
                row
                if alpha is None
                else [a + alpha * (r - a) for a, r in zip(acc, row, strict=True)]
            )
        self._layer_sq = np.array(acc, dtype=np.float64)

    def _report(self, s: StepStats, z: float, sq: np.ndarray) -> Finding:
        rise = sq - self._layer_sq
        name = at = None
        if rise.size and rise.max() > 0:
            i = int(np.argmax(rise))
            name = self.info.layers[i]
            share = rise[i] / rise[rise > 0].sum()
            typical = math.sqrt(self._layer_sq[i])
            was = f"typically {typical:.3g}" if typical > 0 else "silent before"
            at = f"; {share:.0%} of the increase is in {name!r} ({math.sqrt(sq[i]):.3g}, {was})"
        ratio = math.exp(math.log(s.global_norm) - self._mean)
        key = "spike_clipped" if self._clipping else "spike"
        return self._finding(
            s.step,
            name,
            "warning",
            z,
            f"Gradient norm jumped to {s.global_norm:.3g}, {ratio:.1f}x its running mean "
            f"{math.exp(self._mean):.3g} over {_plural(self._n, 'earlier step')} (z={z:.1f} on log "
            f"scale){at or ''}.",
            key,
        )


class DivergenceDetector(Detector):
    """The loss (`StepStats.loss`, when the caller passes it) far above its first steps, or NaN/Inf.

    A loss `loss_factor` times its baseline's magnitude above the baseline is diverging on its own;
    one `confirm_factor` times above it is when the global gradient norm is also `ADMIT`x above its
    own first-steps baseline at the same step (a loss that rises alone, as a GAN generator's may
    while its discriminator learns, needs the larger margin).

    Args:
        loss_factor: margin, in multiples of the baseline's magnitude, for the loss alone (9: ten
            times a positive baseline).
        confirm_factor: margin when the gradient norm confirms it (2: three times).
        patience: consecutive diverging steps before reporting (NaN/Inf losses count).
        baseline: number of first steps forming the baselines (medians; a loss more than twice, or a
            norm `ADMIT`x, the baseline so far is left out of them).
    """

    name = "divergence"

    def __init__(
        self,
        loss_factor: float = 9.0,
        confirm_factor: float = 2.0,
        patience: int = 2,
        baseline: int = 5,
    ) -> None:
        super().__init__()
        self.loss_factor = positive("loss_factor", loss_factor)
        self.confirm_factor = in_range("confirm_factor", confirm_factor, 0.0, self.loss_factor)
        self.patience = positive("patience", patience, integer=True)
        self.baseline = positive("baseline", baseline, integer=True)

    def config(self) -> dict[str, Any]:
        return {
            "loss_factor": self.loss_factor,
            "confirm_factor": self.confirm_factor,
            "patience": self.patience,
            "baseline": self.baseline,
        }

    def reset(self) -> None:
        super().reset()
        self._base: list[float] = []
        self._norm_base: list[float] = []
        self._run = 0
        self._calm = 0

    def _norm_jumped(self, gn: float) -> bool:
        """Whether the gradient norm is `ADMIT`x its first-steps baseline (which it then skips)."""
        if not (math.isfinite(gn) and gn > 0):
            return not math.isfinite(gn)
        ref = _median(self._norm_base) if self._norm_base else None
        jumped = ref is not None and gn > ADMIT * ref
        _admit(self._norm_base, self.baseline, gn, not jumped)
        return jumped

    def update(self, s: StepStats) -> list[Finding]:
        loss = s.loss
        if loss is None:
            return []
        jumped = self._norm_jumped(s.global_norm)
        ref = _median(self._base) if self._base else None
        if math.isfinite(loss):
            scale = abs(ref) if ref else None
            bad = scale is not None and (
                loss > ref + self.loss_factor * scale
                or (jumped and loss > ref + self.confirm_factor * scale)
            )
            _admit(
                self._base, self.baseline, loss, ref is None or loss <= ref + (scale or math.inf)
            )
        else:
            bad = True
        self._run = self._run + 1 if bad else 0
        self._calm = 0 if bad else self._calm + 1
        if self._episode("loss") is not None:
            if bad:
                self._hold("loss", s.step)
            elif self._calm >= CALM_STEPS:
                self._close("loss")
            return []
        if self._run < self.patience or ref is None:
            return []
        onset = s.step - self._run + 1
        now = f"{loss:.4g}" if math.isfinite(loss) else str(loss)
        also = (
            f", with the gradient norm over {ADMIT:.0f}x its own first steps"
            if jumped and math.isfinite(loss) and loss <= ref + self.loss_factor * abs(ref)
            else ""
        )
        msg = (
            f"Loss rose from its baseline {ref:.4g} (median of the first "
            f"{_plural(len(self._base), 'step')}) to {now}{also}, on {_plural(self._run, 'step')} "
            f"in a row since step {onset}: training is diverging."
        )
        return [self._open("loss", self._finding(onset, None, "error", loss, msg), s.step)]

    def _bulk(self, block: StepBlock) -> int:
        losses = [s.loss for s in block]
        at = [k for k, x in enumerate(losses) if x is not None]  # the others change nothing
        if not at:
            return len(block)
        if (
            self._episodes
            or len(self._base) < self.baseline
            or len(self._norm_base) < self.baseline
        ):
            return at[0]  # step by step from the first loss on
        # both baselines full (nothing more is admitted), no episode: `update`'s decisions, in
        # plain floats (as cheap as NumPy over a block of 10, and the same arithmetic)
        ref = _median(self._base)
        scale = abs(ref) if ref else None
        if scale is not None:
            alone, confirmed = ref + self.loss_factor * scale, ref + self.confirm_factor * scale
            norm_limit = ADMIT * _median(self._norm_base)
        run, calm, isfinite = self._run, self._calm, math.isfinite
        for k in at:
            loss = losses[k]
            if not isfinite(loss):
                bad = True
            elif scale is None or loss <= confirmed:
                bad = False
            elif loss > alone:
                bad = True
            else:  # above the margin that the gradient norm confirms
                gn = block[k].global_norm
                bad = not isfinite(gn) or (gn > 0 and gn > norm_limit)
            if bad:
                if run + 1 >= self.patience:
                    self._run, self._calm = run, calm
                    return k  # reported there
                run, calm = run + 1, 0
            else:
                run, calm = 0, calm + 1
        self._run, self._calm = run, calm
        return len(block)


class LargeUpdateDetector(Detector):
    """Optimizer steps that move the weights by a large fraction of their norm (`StepStats.update_ratio`,
    on the steps that have it): the learning rate is too high for these weights.

    Healthy training moves a layer by about 1e-3 of its weights per step. The median over layers is
    judged, so a zero-initialized layer (whose ratio is huge at first) does not count alone.

    Args:
        max_ratio: the median layer's update/weight ratio must exceed this ...
        patience: ... on this many consecutive measured steps.
    """

    name = "large_update"

    def __init__(self, max_ratio: float = 0.1, patience: int = 2) -> None:
        super().__init__()
        self.max_ratio = positive("max_ratio", max_ratio)
        self.patience = positive("patience", patience, integer=True)

    def config(self) -> dict[str, Any]:
        return {"max_ratio": self.max_ratio, "patience": self.patience}

    def reset(self) -> None:
        super().reset()
        self._run = 0
        self._onset = -1

    def update(self, s: StepStats) -> list[Finding]:
        r = s.update_ratio
        if r is None:
            return []
        ok = np.isfinite(r)
        if not ok.any():
            return []
        med = float(np.median(r[ok]))
        bad = med > self.max_ratio
        if bad and self._run == 0:
            self._onset = s.step
        self._run = self._run + 1 if bad else 0
        if self._episode("lr") is not None:
            if bad:
                self._hold("lr", s.step)
            else:
                self._close("lr")
            return []
        if self._run < self.patience:
            return []
        top = np.argsort(np.where(ok, -r, np.inf))[:3]
        worst = ", ".join(f"{self.info.layers[i]!r} {r[i]:.2g}" for i in top if ok[i])
        msg = (
            f"A typical layer moves by {med:.2g} of its weights per optimizer step (median "
            f"update/weight ratio over layers; healthy training is near 1e-3), above "
            f"{self.max_ratio:g} on {_plural(self._run, 'measured step')} since step "
            f"{self._onset} (largest: {worst}): the learning rate is too high."
        )
        return [self._open("lr", self._finding(self._onset, None, "warning", med, msg), s.step)]

    def _bulk(self, block: StepBlock) -> int:
        for k, s in enumerate(block):
            r = s.update_ratio
            if r is None:
                continue
            ok = np.isfinite(r)
            if not ok.any():
                continue
            bad = float(np.median(r[ok])) > self.max_ratio
            if self._episode("lr") is not None:
                if not bad:
                    return k  # the episode ends there
                self._run += 1
                self._hold("lr", s.step)
            elif not bad:
                self._run = 0
            elif self._run + 1 < self.patience:
                if self._run == 0:
                    self._onset = s.step
                self._run += 1
            else:
                return k  # reported there
        return len(block)


class FrozenDetector(Detector):
    """Parameters that cannot learn, from the model description.

    Reports `requires_grad=False` parameters (info: often intended) and trainable parameters that no
    optimizer holds (warning: they never update; adapters pass the union over all optimizers).
    Layers that go silent during the run are the `detached` detector's.
    """

    name = "frozen"
    retired = {"patience": "exactly-zero gradients are judged by the `detached` detector's window"}

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
                    f"{len(names)} trainable parameter(s) of {module!r} are in no optimizer "
                    f"and will never update: {', '.join(names)}.",
                    "frozen_opt",
                )
            )
        return out

    def update(self, s: StepStats) -> list[Finding]:
        return []

    def _bulk(self, block: StepBlock) -> int:
        return len(block)


class DetachedDetector(Detector):
    """Layers that get no gradient, or only exactly-zero ones, judged by rates over a window.

    Per layer, over the last `patience` steps (steps where the whole gradient is zero are left to
    the `zero_gradient` detector):

    - no gradient at all (`has_grad` False) on a fraction >= `rate`: **detached** (warning), with the
      cut point -- the nearest layer toward the loss that still gets a gradient;
    - a gradient that exists but is exactly zero (or absent) on >= `rate`: **dead** (warning), e.g.
      dead ReLUs, a zero mask;
    - a layer that had gradients before the window and now has none or zero ones was either frozen
      mid-run or died: with `StepStats.trainable` the adapter says which (frozen: info; still
      trainable: dead/detached warning); without it, a `frozen` info naming both;
    - no or zero gradient on a fraction >= `starved_rate` only, in separate runs (intermittent, not
      one block of a layer going silent or waking up): **starved** (info with the rate), as for
      mixture-of-experts experts.

    A "zero" step is an exact-zero norm, or `zero_frac == 1` where detail statistics were taken (an
    underflowed norm of a non-zero gradient is not zero). Runs shorter than the window are judged at
    the end on what they have (at least `MIN_STEPS` steps).

    Args:
        patience: window length in steps (the first report comes when it is full).
        rate: fraction of the window that makes a layer detached or dead.
        starved_rate: fraction that makes it starved.
    """

    name = "detached"
    MIN_STEPS = 5

    def __init__(self, patience: int = 20, rate: float = 0.95, starved_rate: float = 0.1) -> None:
        super().__init__()
        self.patience = positive("patience", patience, integer=True)
        self.rate = in_range("rate", rate, 0.0, 1.0)
        self.starved_rate = in_range("starved_rate", starved_rate, 0.0, self.rate)

    def config(self) -> dict[str, Any]:
        return {"patience": self.patience, "rate": self.rate, "starved_rate": self.starved_rate}

    def reset(self) -> None:
        super().reset()
        n = len(self.info.layers)
        self._none = Window(self.patience, n)
        self._zero = Window(self.patience, n)
        self._first_live = np.full(n, -1, dtype=np.int64)
        self._last_live = np.full(n, -1, dtype=np.int64)
        self._trainable: np.ndarray | None = None

    @staticmethod
    def _exact_zero(g: np.ndarray, has: np.ndarray, zero_frac: np.ndarray | None) -> np.ndarray:
        """Layers whose gradient exists but is exactly zero."""
        zero = has & (g == 0)
        if zero_frac is not None:
            zero &= zero_frac >= 1.0
        return zero

    def update(self, s: StepStats) -> list[Finding]:
        if s.global_norm == 0 and _all_zero(s.global_norm, s.nonfinite):
            return []
        has = s.has_grad
        zero = self._exact_zero(s.grad_norm, has, s.zero_frac)
        live = has & ~zero
        self._first_live[live & (self._first_live < 0)] = s.step
        self._last_live[live] = s.step
        self._none.push((~has).astype(np.float64), s.step)
        self._zero.push(zero.astype(np.float64), s.step)
        if s.trainable is not None:
            self._trainable = np.asarray(s.trainable, dtype=bool).copy()
        if not self._none.full:
            return []
        return self._judge(s.step, ~live)

    def _bulk(self, block: StepBlock) -> int:
        kept = np.flatnonzero(~block.all_zero())
        if not len(kept):
            return len(block)
        g, has, zero_frac = (
            block.field("grad_norm"),
            block.field("has_grad"),
            block.detail("zero_frac", 1),
        )
        if len(kept) < len(block):
            g, has = g[kept], has[kept]
            zero_frac = None if zero_frac is None else zero_frac[kept]
        zero = self._exact_zero(g, has, zero_frac)
        live = has & ~zero
        if live.all() and not self._episodes and self.starved_rate > 0 and not self._missed():
            # no layer missed a step in the window nor in the block: every rate stays 0
            steps = block.field("step")[kept]
            self._first_live[self._first_live < 0] = steps[0]
            self._last_live[:] = steps[-1]
            rows = np.zeros(g.shape)
            self._none.extend(rows, steps, rows)
            self._zero.extend(rows, steps, rows)
            self._take_trainable(block, kept)
            return len(block)
        none_rows, zero_rows = (~has).astype(np.float64), zero.astype(np.float64)
        none_sum, zero_sum = self._none.sums_after(none_rows), self._zero.sums_after(zero_rows)
        e, judged, is_open = self._first_flagged(none_sum, zero_sum)
        if not e:
            return int(kept[0])
        steps = block.field("step")[kept[:e]]
        live = live[:e]
        fresh = (self._first_live < 0) & live.any(axis=0)
        if fresh.any():
            self._first_live[fresh] = steps[np.argmax(live, axis=0)[fresh]]
        cols, last = _last_steps(live, steps)
        self._last_live[cols] = last
        if self._episodes:
            held = judged[:e, None] & ~live & is_open
            for i, step in zip(*_last_steps(held, steps), strict=True):
                self._hold(int(i), step)
        self._none.extend(none_rows[:e], steps, none_sum[:e])
        self._zero.extend(zero_rows[:e], steps, zero_sum[:e])
        self._take_trainable(block, kept[:e])
        return int(kept[e]) if e < len(kept) else len(block)

    def _take_trainable(self, block: StepBlock, taken: np.ndarray) -> None:
        """Keep the last `trainable` flags reported on the steps `taken` of `block`."""
        for i in reversed(taken.tolist()):
            if block[i].trainable is not None:
                self._trainable = np.asarray(block[i].trainable, dtype=bool).copy()
                return

    def _missed(self) -> bool:
        """Whether a layer missed a step in the window."""
        return bool(self._none.sum.any() or self._zero.sum.any())

    def _first_flagged(
        self, none_sum: np.ndarray, zero_sum: np.ndarray
    ) -> tuple[int, np.ndarray, np.ndarray]:
        """For the window sums after each step of a block: the first step where `_judge` would
        act (open, end or change an episode), which steps are judged, and the open episodes."""
        n = self._none.counts_after(len(none_sum))
        none_r = none_sum / n[:, None]  # `rate()`; n >= 1 after a push
        miss = none_r + zero_sum / n[:, None]
        judged = n == self.patience
        is_open = np.zeros(none_sum.shape[1], bool)
        if not self._episodes:  # as `_judge`: nothing to do unless a layer is flagged
            acts = (miss >= self.starved_rate).any(axis=1)
        else:  # each open episode must be kept as it is, and no other layer be flagged
            starved = np.zeros(none_sum.shape[1], bool)
            for i, ep in self._episodes.items():
                is_open[i], starved[i] = True, ep[2] == "starved"
            absent = none_r >= self.rate
            zero = ~absent & (miss >= self.rate)
            keep = np.where(  # a "starved" episode is kept whatever its runs of misses
                starved, ~absent & ~zero & (miss >= self.starved_rate / 2), miss >= self.rate / 2
            )
            acts = ~np.where(is_open, keep, miss < self.starved_rate).all(axis=1)
        return _first(judged & acts), judged, is_open

    def finalize(self, step: int) -> list[Finding]:
        out = []
        if not self._none.full and self._none.n >= self.MIN_STEPS:
            out = self._judge(step, None)
        super().finalize(step)
        return out

    def _judge(self, step: int, missing_now: np.ndarray | None) -> list[Finding]:
        none_r, miss = self._none.rate(), self._none.rate() + self._zero.rate()
        if not self._episodes and not (miss >= self.starved_rate).any():
            return []  # the common, healthy case, cheaply
        m = (self._none.values() + self._zero.values()) > 0
        # separate runs of missing steps: intermittent (starved), not a layer going silent or
        # waking up once
        runs = m[0].astype(np.int64) + np.count_nonzero(m[1:] & ~m[:-1], axis=0)
        first, last = self._none.span()
        was_live = (self._first_live >= 0) & (self._first_live < first)
        absent = none_r >= self.rate
        zero = ~absent & (miss >= self.rate)
        starved = ~absent & ~zero & (miss >= self.starved_rate) & (runs >= 2)
        out = []
        for i in sorted(
            set(np.flatnonzero(absent | zero | starved).tolist()) | set(self._episodes)
        ):
            cond = (
                "absent" if absent[i] else "zero" if zero[i] else "starved" if starved[i] else None
            )
            if self._episode(i) is not None:
                if self._episodes[i][2] == "starved":
                    keep = cond == "starved" or (cond is None and miss[i] >= self.starved_rate / 2)
                else:
                    keep = miss[i] >= self.rate / 2
                if keep:
                    if missing_now is not None and missing_now[i]:
                        self._hold(i, step)
                    continue
                self._close(i)
            if cond is not None:
                f = self._report(step, i, cond, bool(was_live[i]), none_r, miss, first, last)
                self._open(i, f)
                self._episodes[i].append(cond)
                out.append(f)
        return out

    def _cut_point(self, i: int, miss: np.ndarray) -> str | None:
        """The nearest layer toward the loss that still gets a gradient: before the layer in
        backward order when it is listed there, else after it in the adapter's (forward) order."""
        layers = self.info.layers
        flowing = miss < 0.5
        bo = self.info.backward_order
        if bo and layers[i] in bo:
            index = {n: j for j, n in enumerate(layers)}
            for name in reversed(bo[: bo.index(layers[i])]):
                if name in index and flowing[index[name]]:
                    return name
            return None
        after = [j for j in range(i + 1, len(layers)) if flowing[j]]
        before = [j for j in range(i - 1, -1, -1) if flowing[j]]
        j = after[0] if after else before[0] if before else None
        return None if j is None else layers[j]

    def _report(self, step, i, cond, was_live, none_r, miss, first, last) -> Finding:
        name = self.info.layers[i]
        n = self._none.n
        k = round(miss[i] * n)
        span = f"{k} of the last {n} steps ({first}-{last})"
        if cond == "starved":
            got = n - k
            msg = (
                f"{name!r} got a usable gradient on only {got} of the last {n} steps ({first}-{last}; "
                f"none or all-zero on {miss[i]:.0%}): it learns only from the batches that reach it."
            )
            return self._finding(step, name, "info", miss[i], msg, kind="starved")
        what = "no gradient" if cond == "absent" else "an exactly-zero gradient"
        if cond == "absent":
            k = round(none_r[i] * n)
            span = f"{k} of the last {n} steps ({first}-{last})"
        if was_live:
            since = int(self._last_live[i]) + 1
            trainable = None if self._trainable is None else bool(self._trainable[i])
            if trainable is False:
                msg = (
                    f"{name!r} had gradients until step {since - 1} and was frozen then "
                    f"(requires_grad/trainable off): {what} on {span}."
                )
                return self._finding(step, name, "info", miss[i], msg, "frozen_flag", "frozen")
            if trainable is None:
                cause = (
                    "zero_grad(set_to_none=False) leaves a zero gradient"
                    if cond == "zero"
                    else "its gradient is then None"
                )
                died = "its units died" if cond == "zero" else "the forward pass stopped using it"
                msg = (
                    f"{name!r} had gradients until step {since - 1}, then {what} on {span}: it was "
                    f"frozen mid-run (requires_grad_(False); {cause}) or, if not, {died}."
                )
                return self._finding(step, name, "info", miss[i], msg, "frozen_mid", "frozen")
            kind = "detached" if cond == "absent" else "dead"
            msg = (
                f"{name!r} had gradients until step {since - 1} but, still trainable, has had {what} "
                f"on {span}: it stopped learning."
            )
            return self._finding(step, name, "warning", miss[i], msg, kind=kind)
        if cond == "zero":
            msg = (
                f"Gradient of {name!r} exists but is exactly zero on {span}: its parameters get no "
                f"learning signal."
            )
            return self._finding(step, name, "warning", miss[i], msg, kind="dead")
        cut = self._cut_point(i, miss)
        where = (
            f"; the gradient stops at {cut!r}, the nearest layer toward the loss that still gets "
            f"one: look between it and {name!r}"
            if cut
            else ""
        )
        msg = (
            f"Trainable layer {name!r} received no gradient on {span}: it is cut off from the "
            f"loss{where}."
        )
        return self._finding(step, name, "warning", none_r[i], msg, kind="detached")


class ZeroGradientDetector(Detector):
    """Steps on which the whole gradient is exactly zero (or absent), on a sizeable fraction of a
    window: those optimizer steps carry no learning signal.

    Args:
        patience: window length in steps.
        rate: fraction of zero steps in the window that is reported.
    """

    name = "zero_gradient"

    def __init__(self, patience: int = 20, rate: float = 0.2) -> None:
        super().__init__()
        self.patience = positive("patience", patience, integer=True)
        self.rate = in_range("rate", rate, 0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"patience": self.patience, "rate": self.rate}

    def reset(self) -> None:
        super().reset()
        self._win = Window(self.patience, 1)

    def update(self, s: StepStats) -> list[Finding]:
        zero = s.global_norm == 0 and bool(_all_zero(s.global_norm, s.nonfinite))
        self._win.push(np.array([float(zero)]), s.step)
        if not self._win.full:
            return []
        rate = float(self._win.rate()[0])
        if self._episode("zero") is not None:
            if rate < self.rate / 2:
                self._close("zero")
            elif zero:
                self._hold("zero", s.step)
            return []
        if rate < self.rate:
            return []
        first, last = self._win.span()
        k = round(rate * self._win.n)
        msg = (
            f"The whole gradient was exactly zero (or absent) on {k} of the last {self._win.n} "
            f"steps ({first}-{last}, {rate:.0%}): those optimizer steps apply no learning signal, "
            f"only momentum and weight decay."
        )
        return [self._open("zero", self._finding(s.step, None, "warning", rate, msg))]

    def _bulk(self, block: StepBlock) -> int:
        zero = block.all_zero()
        rows = zero[:, None].astype(np.float64)
        held = self._episode("zero") is not None
        if held or not self.rate > 0 or zero.any() or self._win.sum.any():
            sums = self._win.sums_after(rows)
            n = self._win.counts_after(len(block))
            rate = sums[:, 0] / n  # `rate()`; n >= 1 after a push
            judged = n == self.patience
            e = _first(judged & ((rate < self.rate / 2) if held else (rate >= self.rate)))
        else:  # no zero step in the window nor in the block: the rate stays 0
            sums, e = np.zeros(rows.shape), len(block)
        steps = block.field("step")[:e]
        if held:
            hold = np.flatnonzero(judged[:e] & zero[:e])
            if len(hold):
                self._hold("zero", steps[hold[-1]])
        self._win.extend(rows[:e], steps, sums[:e])
        return e


class AccumulationDetector(Detector):
    """Gradients carried over from the previous optimizer step (a forgotten `zero_grad`).

    Reads `StepStats.grad_reset`, which adapters derive from observing the reset itself; several
    backward passes between resets (intentional micro-batch accumulation) do not count.
    """

    name = "accumulation"

    def reset(self) -> None:
        super().reset()
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

    def _bulk(self, block: StepBlock) -> int:
        active = self._active
        for k, s in enumerate(block):
            if s.grad_reset is None or s.grad_reset:
                active = False
            elif not active:
                self._active = active
                return k  # reported there
        self._active = active
        return len(block)


class ModifiedDetector(Detector):
    """Gradients changed between `backward()` and the optimizer step (user code clipped or scaled
    them): what graddiag measured is not what backward produced. Reported once."""

    name = "modified"

    def reset(self) -> None:
        super().reset()
        self._seen = False

    def update(self, s: StepStats) -> list[Finding]:
        if not s.grads_modified or self._seen:
            return []
        self._seen = True
        return [
            self._finding(
                s.step,
                None,
                "warning",
                None,
                "The gradients were changed in place between backward() and the optimizer step "
                "(e.g. your own clip_grad_norm_): graddiag measured the changed gradients, so its "
                "norms and findings describe them, not what backward produced.",
            )
        ]

    def _bulk(self, block: StepBlock) -> int:
        if self._seen:
            return len(block)
        return next((k for k, s in enumerate(block) if s.grads_modified), len(block))


#: A clip coefficient within this of 1 means "not clipped" (norm ratios carry rounding).
CLIP_TOL = 1e-6


class ClipRateDetector(Detector):
    """How often clipping changes the gradients: persistent clipping as it happens, else a summary.

    An episode opens when clipping changed the gradients on at least `warn_rate` of the last
    `window` steps: a warning when it scaled them by less than `warn_coef` (median), i.e. the
    threshold is far below the typical norm and every step is a normalized step; else info (steady,
    moderate clipping, as in many recurrent networks). A run shorter than the window is judged at its
    end. A run that clipped only now and then gets one info summary at the end; a run where clipping
    never changed anything gets nothing. Both the
    global and per-layer clip coefficients count.

    Args:
        warn_rate: fraction of the window with clipping that opens an episode.
        window: window length in steps.
        warn_coef: a median clip coefficient below this makes the episode a warning.
    """

    name = "clipped"

    def __init__(self, warn_rate: float = 0.5, window: int = 20, warn_coef: float = 0.1) -> None:
        super().__init__()
        self.warn_rate = in_range("warn_rate", warn_rate, 0.0, 1.0)
        self.window = positive("window", window, integer=True)
        self.warn_coef = in_range("warn_coef", warn_coef, 0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"warn_rate": self.warn_rate, "window": self.window, "warn_coef": self.warn_coef}

    def reset(self) -> None:
        super().reset()
        self._seen = 0
        self._clipped = 0
        self._episodes_seen = 0
        self._coef = Window(self.window, 1)

    def update(self, s: StepStats) -> list[Finding]:
        coef = s.clip_coef
        if s.layer_clip_coef is not None and s.layer_clip_coef.size:
            layer = float(np.nanmin(s.layer_clip_coef))
            coef = layer if coef is None else min(coef, layer)
        if coef is None or not math.isfinite(coef):
            return []
        clipped = coef < 1.0 - CLIP_TOL
        self._seen += 1
        self._clipped += int(clipped)
        self._coef.push(np.array([coef]), s.step)
        if not self._coef.full:
            return []
        return self._judge(s.step, clipped)

    def _bulk(self, block: StepBlock) -> int:
        for k, s in enumerate(block):  # steps without a clip coefficient change nothing
            if s.clip_coef is not None or (
                s.layer_clip_coef is not None and s.layer_clip_coef.size
            ):
                return k
        return len(block)

    def _judge(self, step: int, clipped: bool) -> list[Finding]:
        coefs = self._coef.values()[:, 0]
        hit = coefs < 1.0 - CLIP_TOL
        rate = float(hit.mean())
        if self._episode("clip") is not None:
            if rate < self.warn_rate / 2:
                self._close("clip")
            elif clipped:
                self._hold("clip", step)
            return []
        if rate < self.warn_rate:
            return []
        med = float(np.median(coefs[hit]))
        first, last = self._coef.span()
        heavy = med < self.warn_coef
        why = (
            "the threshold is far below the typical gradient norm, so the learning rate alone sets "
            "the step size"
            if heavy
            else "steady, moderate clipping"
        )
        msg = (
            f"Clipping changed the gradients on {int(hit.sum())} of the last {len(coefs)} steps "
            f"({first}-{last}, {rate:.0%}), scaling them by {med:.2g} (median): {why}."
        )
        self._episodes_seen += 1
        severity, key = ("warning", "clipped") if heavy else ("info", "clipped_info")
        return [self._open("clip", self._finding(step, None, severity, rate, msg, key))]

    def finalize(self, step: int) -> list[Finding]:
        out = []
        if not self._coef.full and self._coef.n >= DetachedDetector.MIN_STEPS:
            out = self._judge(step, False)  # a run shorter than the window
        if self._clipped and not self._episodes_seen:
            rate = self._clipped / self._seen
            out.append(
                self._finding(
                    step,
                    None,
                    "info",
                    rate,
                    f"Clipping changed the gradients on {self._clipped} of {self._seen} steps "
                    f"({rate:.1%}).",
                    "clipped_rare",
                )
            )
        super().finalize(step)
        return out


DETECTORS: dict[str, type[Detector]] = {
    d.name: d
    for d in (
        NonFiniteDetector,
        VanishingDetector,
        ExplodingDetector,
        SpikeDetector,
        DivergenceDetector,
        LargeUpdateDetector,
        FrozenDetector,
        DetachedDetector,
        ZeroGradientDetector,
        AccumulationDetector,
        ModifiedDetector,
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
        old = sorted(set(cfg) & set(cls.retired))
        if old:
            warnings.warn(
                f"Detector {name!r}: setting(s) {old} of an earlier graddiag version are ignored ("
                + "; ".join(f"{k}: {cls.retired[k]}" for k in old)
                + ")",
                stacklevel=3,
            )
            cfg = {k: v for k, v in cfg.items() if k not in cls.retired}
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
        """Run every detector on one step; returns the findings it opened (as first reported)."""
        new: list[Finding] = []
        for d in self.detectors:
            new.extend(d.update(stats))
        self.findings.extend(new)
        self._amend()
        self.last_step = max(self.last_step, stats.step)
        return new

    def update_block(self, block: Sequence[StepStats]) -> list[list[Finding]]:
        """`update` over consecutive steps at once (what a log step reads back): each step's new
        findings, in the order and with the state `update` step by step would give."""
        if len(block) < 2:
            return [self.update(s) for s in block]
        if not isinstance(block, StepBlock):
            block = StepBlock(block)
        per_detector = [d.update_block(block) for d in self.detectors]
        out = [[f for found in per_detector for f in found[k]] for k in range(len(block))]
        for new in out:
            self.findings.extend(new)
        self._amend()
        self.last_step = max(self.last_step, max(s.step for s in block))
        return out

    def finalize(self) -> list[Finding]:
        """End of run: summaries, and the durations of episodes still open."""
        new: list[Finding] = []
        for d in self.detectors:
            new.extend(d.finalize(max(self.last_step, 0)))
        self.findings.extend(new)
        self._amend()
        return new

    def _amend(self) -> None:
        """Replace the findings of ended episodes by their completed versions (with durations)."""
        for d in self.detectors:
            for old, done in d.take_amendments():
                for i in range(len(self.findings) - 1, -1, -1):
                    if self.findings[i] is old or self.findings[i] == old:
                        self.findings[i] = done
                        break
