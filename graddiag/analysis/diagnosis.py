"""Series and diagnosis: rebuild a run's per-step statistics from its logs and run the detectors.

For each run, `diagnose_run` rebuilds the `ModelInfo` and detector settings that the live run wrote
under ``graddiag/model`` (defaults for foreign logs), turns the recorded series back into one
`StepStats` per logged step (`Series.step_stats`) and feeds them to the same `Diagnoser` the live
run used. A live run and a later analysis of its logs therefore report the same findings, up to
float32 rounding of the logged values (a value within float32 rounding of a detector threshold may
flip) and what the logs do not hold; `StepStats.nonfinite_origin` (backward tracing) is read from
``graddiag/nonfinite_origin``, `StepStats.nonfinite_ranks` (torch.distributed) from
``graddiag/nonfinite_ranks``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graddiag.detectors import DETECTORS, Diagnoser
from graddiag.findings import Finding
from graddiag.reader import LogData, LogReadError, RunData
from graddiag.stats import ModelInfo, StepStats

__all__ = ["Coverage", "RunDiagnosis", "Series", "diagnose_run", "series_of"]

_GLOBALS = (
    "grad_norm",
    "clip_coef",
    "grad_reset",
    "backward_calls",
    "skipped",
    "loss",
    "grads_modified",
)
#: Per-layer statistics logged on detail steps only, read back into `StepStats` where present.
_DETAIL = ("grad_max", "zero_frac", "param_norm", "update_ratio")

#: steps handed to the detectors at once (`Diagnoser.update_block`; 100: 4-7x faster than one by one,
#: benchmarks/bench_detectors.py)
_BLOCK = 100


@dataclass
class Series:
    """A run's gradient series as dense arrays (steps x layers); NaN marks "not logged".

    Attributes:
        steps: logged optimizer steps, ascending.
        layers: layer names (the live run's order for graddiag logs; first appearance otherwise).
        grad_norm: per-layer gradient norm (NaN where not logged, and where the norm was NaN).
        has_grad: whether the layer had a gradient (a logged norm) at that step.
        nonfinite: per-layer non-finite marker/count (0 where not logged).
        layer_clip: per-layer clip coefficient (NaN where not logged).
        glob: whole-model series by stat (grad_norm, clip_coef, grad_reset, backward_calls,
            skipped, loss), NaN where not logged.
        glob_logged: where each `glob` series was logged (a logged value may itself be NaN).
        wall_time: wall-clock time of each step (the latest event of the step).
        detail: per-layer detail statistics by stat (`_DETAIL`), NaN where not logged.
        ranks: step -> ``graddiag/nonfinite_ranks`` text (torch.distributed).
    """

    steps: np.ndarray
    layers: tuple[str, ...]
    grad_norm: np.ndarray
    has_grad: np.ndarray
    nonfinite: np.ndarray
    layer_clip: np.ndarray
    glob: dict[str, np.ndarray]
    glob_logged: dict[str, np.ndarray]
    wall_time: np.ndarray
    origins: dict[int, str] = field(default_factory=dict)
    detail: dict[str, np.ndarray] = field(default_factory=dict)
    ranks: dict[int, str] = field(default_factory=dict)

    def global_norm(self) -> np.ndarray:
        """Logged global norm, or the root-sum-square of the layer norms where it was not logged."""
        g = self.glob["grad_norm"].copy()
        miss = ~self.glob_logged["grad_norm"] & self.has_grad.any(axis=1)
        if miss.any():
            sq = np.where(self.has_grad, self.grad_norm, 0.0) ** 2
            g[miss] = np.sqrt(sq[miss].sum(axis=1))
        return g

    def bad(self) -> np.ndarray:
        """(steps x layers) True where a layer's gradient held NaN/Inf."""
        return (self.nonfinite > 0) | (self.has_grad & ~np.isfinite(self.grad_norm))

    def step_stats(self) -> list[StepStats]:
        """One `StepStats` per logged step, as the live monitor had them (from the logged values)."""
        out = []
        gnorm = self.global_norm()
        miss_global = ~self.glob_logged["grad_norm"] & ~self.has_grad.any(axis=1)
        g = self.glob
        for i, step in enumerate(self.steps.tolist()):
            has = self.has_grad[i]
            lc = self.layer_clip[i]
            present = ~np.isnan(lc)
            stats = StepStats(
                step=int(step),
                grad_norm=np.where(has, self.grad_norm[i], 0.0),
                has_grad=has.copy(),
                nonfinite=self.nonfinite[i].copy(),
                global_norm=0.0 if miss_global[i] else float(gnorm[i]),
                clip_coef=_opt(g["clip_coef"][i], float),
                layer_clip_coef=np.where(present, lc, 1.0) if present.any() else None,
                grad_reset=_opt(g["grad_reset"][i], bool),
                backward_calls=_opt(g["backward_calls"][i], int),
                skipped=bool(_opt(g["skipped"][i], bool) or False),
                loss=_opt(g["loss"][i], float),
                grads_modified=_opt(g["grads_modified"][i], bool),
                nonfinite_origin=self.origins.get(int(step)),
                nonfinite_ranks=_ranks(self.ranks.get(int(step))),
            )
            if stats.nonfinite_origin and stats.nonfinite_origin.startswith("forward:"):
                stats.nonfinite_origin = stats.nonfinite_origin[len("forward:") :]
                stats.nonfinite_pass = "forward"
            elif stats.nonfinite_origin:
                stats.nonfinite_pass = "backward"
            for stat, arr in self.detail.items():
                row = arr[i]
                if not np.isnan(row).all():  # live: 0 for layers without a gradient
                    setattr(stats, stat, row if stat == "update_ratio" else np.nan_to_num(row))
            out.append(stats)
        return out


def _ranks(text: str | None) -> tuple[int, ...] | None:
    """`graddiag/nonfinite_ranks` text ("1", "0,1", "-" for none) as `StepStats.nonfinite_ranks`."""
    if text is None:
        return None
    return tuple(int(r) for r in text.split(",") if r.strip().isdigit())


def _opt(v: float, cast):
    return None if math.isnan(v) else cast(v)


def series_of(
    data: LogData, run: RunData, layers: Sequence[str] | None = None, layer_steps: bool = False
) -> Series:
    """Dense `Series` of one run from `read_logs` output.

    Args:
        data: the `read_logs` result holding `run` (for its code tables).
        run: the run.
        layers: the layer order (e.g. from the live run's `ModelInfo`); default: layers with a
            logged gradient norm, in order of first appearance. Layers not listed are ignored.
        layer_steps: keep only the steps with a per-layer gradient norm (foreign logs, where a
            global norm logged more often than the layers' must not read as "no gradient").
    """
    scode = {s: i for i, s in enumerate(data.stats)}
    gn = scode.get("grad_norm", -2)
    global_code = data.layers.index("") if "" in data.layers else -2
    is_grad = run.stat == gn
    if layers is None:
        codes = run.layer[is_grad & (run.layer != global_code)]
        _, first = np.unique(codes, return_index=True)
        layers = [data.layers[c] for c in codes[np.sort(first)]]
    layers = tuple(layers)
    lut = np.full(len(data.layers) + 1, -1, np.int64)
    for i, name in enumerate(layers):
        try:
            lut[data.layers.index(name)] = i
        except ValueError:
            pass
    if global_code >= 0:
        lut[global_code] = len(layers)  # a pseudo-column for whole-model values
    per_layer = is_grad & (run.layer != global_code)
    steps = np.unique(run.step[per_layer if layer_steps and per_layer.any() else is_grad])
    S, L = len(steps), len(layers)
    col = lut[run.layer]
    pos = np.searchsorted(steps, run.step)
    on_step = (
        (pos < S) & (steps[np.minimum(pos, max(S - 1, 0))] == run.step)
        if S
        else np.zeros(len(run.step), bool)
    )

    def dense(stat: str, fill: float, glob: bool = False) -> tuple[np.ndarray, np.ndarray]:
        code = scode.get(stat, -2)
        sel = on_step & (run.stat == code) & ((col == L) if glob else (col >= 0) & (col < L))
        shape = (S,) if glob else (S, L)
        arr = np.full(shape, fill, np.float64)
        mask = np.zeros(shape, bool)
        idx = pos[sel] if glob else (pos[sel], col[sel])
        arr[idx] = run.value[sel]
        mask[idx] = True
        return arr, mask

    grad_norm, has_grad = dense("grad_norm", np.nan)
    nonfinite, _ = dense("nonfinite", 0.0)
    layer_clip, _ = dense("clip_coef", np.nan)
    dense_glob = {s: dense(s, np.nan, glob=True) for s in _GLOBALS}
    glob = {s: v[0] for s, v in dense_glob.items()}
    glob_logged = {s: v[1] for s, v in dense_glob.items()}
    wall = np.full(S, np.nan)
    if S:
        np.fmax.at(wall, pos[on_step], run.wall_time[on_step])
    return Series(
        steps,
        layers,
        grad_norm,
        has_grad,
        nonfinite,
        layer_clip,
        glob,
        glob_logged,
        wall,
        dict(run.nonfinite_origins),
        {stat: dense(stat, np.nan)[0] for stat in _DETAIL if stat in scode},
        dict(run.nonfinite_ranks),
    )


@dataclass
class Coverage:
    """How much of a run the per-layer gradient data covers.

    Attributes:
        logged_steps, first, last: distinct steps with any logged scalar (loss, global norm, ...)
            and their range.
        layer_steps, layer_first, layer_last: steps with a per-layer gradient norm, their range.
        stride: the step between consecutive per-layer steps when it is constant and > 1.
        partial_layers: layer -> steps with a gradient norm, for layers of a foreign run that miss
            some of the per-layer steps (in graddiag's logs a missing norm means "no gradient").
    """

    logged_steps: int
    first: int | None
    last: int | None
    layer_steps: int
    layer_first: int | None
    layer_last: int | None
    stride: int | None = None
    partial_layers: dict[str, int] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return self.layer_steps < self.logged_steps or bool(self.partial_layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "logged_steps": self.logged_steps,
            "first": self.first,
            "last": self.last,
            "layer_steps": self.layer_steps,
            "layer_first": self.layer_first,
            "layer_last": self.layer_last,
            "stride": self.stride,
            "partial_layers": dict(self.partial_layers),
            "partial": self.partial,
        }

    def notes(self) -> list[str]:
        """One line per gap, e.g. "per-layer gradients cover 100 of 1000 logged steps (0-99)"."""
        out = []
        if self.layer_steps < self.logged_steps:
            span = (
                "none"
                if not self.layer_steps
                else f"{self.layer_first}-{self.layer_last}"
                + (f", every {self.stride} steps" if self.stride else "")
            )
            out.append(
                f"per-layer gradients cover {self.layer_steps} of {self.logged_steps} logged "
                f"steps ({span}); steps {self.first}-{self.last} are logged: findings and "
                f"NaN/Inf checks cover only the steps with per-layer gradients"
            )
        if self.partial_layers:
            shown = ", ".join(
                f"{k} ({v} of {self.layer_steps} steps)"
                for k, v in list(self.partial_layers.items())[:5]
            )
            more = len(self.partial_layers) - 5
            out.append(
                f"{len(self.partial_layers)} layer(s) have gradient data on only some of the "
                f"{self.layer_steps} per-layer steps: {shown}"
                + (f" and {more} more" if more > 0 else "")
            )
        return out


def coverage_of(run: RunData, series: Series, foreign: bool) -> Coverage:
    """The `Coverage` of `series` against every step logged in `run`."""
    logged = np.unique(run.step)
    rows = series.has_grad.any(axis=1) if series.layers else np.zeros(len(series.steps), bool)
    ls = series.steps[rows]
    diffs = np.unique(np.diff(ls)) if len(ls) > 2 else np.empty(0, np.int64)
    partial = {}
    if foreign and len(ls):
        counts = series.has_grad[rows].sum(axis=0)
        partial = {n: int(c) for n, c in zip(series.layers, counts, strict=True) if c < len(ls)}
    return Coverage(
        logged_steps=len(logged),
        first=int(logged[0]) if len(logged) else None,
        last=int(logged[-1]) if len(logged) else None,
        layer_steps=len(ls),
        layer_first=int(ls[0]) if len(ls) else None,
        layer_last=int(ls[-1]) if len(ls) else None,
        stride=int(diffs[0]) if len(diffs) == 1 and diffs[0] > 1 else None,
        partial_layers=partial,
    )


@dataclass
class RunDiagnosis:
    """What the detectors found in one run, and what they ran on.

    Attributes:
        series: the run's dense series.
        info: the live run's model description (or one built from the logged layers).
        findings: the detectors' findings, in the order they were made.
        notes: what could not be rebuilt (unreadable model description, custom detectors), and
            where the per-layer data covers only part of the run (`Coverage.notes`).
        coverage: how much of the run the per-layer gradient data covers.
    """

    series: Series
    info: ModelInfo
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    coverage: Coverage | None = None


def _detector_spec(meta: Mapping[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
    """The live run's detector settings (detectors it did not run stay off); None: defaults."""
    if not meta or not isinstance(meta.get("detectors"), Mapping):
        return None
    cfg = meta["detectors"]
    unknown = sorted(set(cfg) - set(DETECTORS))
    if unknown:
        notes.append(
            f"custom detector(s) {', '.join(unknown)} of the live run cannot be rebuilt "
            f"post hoc and were skipped"
        )
    return {name: dict(cfg[name]) if name in cfg else False for name in DETECTORS}


def diagnose_run(
    data: LogData, run: RunData, detectors: Mapping[str, Any] | None = None
) -> RunDiagnosis | None:
    """Run the detectors over one run of `read_logs` output; None if it holds no gradient tags.

    Args:
        data: the `read_logs` result holding `run`.
        run: the run.
        detectors: detector settings (see `graddiag.detectors.build_detectors`); default: the live
            run's settings for graddiag logs, defaults for foreign logs.

    Raises:
        LogReadError: if the detector settings are invalid (the message names the run).
    """
    notes: list[str] = []
    meta = run.meta if isinstance(run.meta, Mapping) else None
    info = None
    if meta and isinstance(meta.get("info"), Mapping):
        try:
            info = ModelInfo.from_dict(meta["info"])
        except (KeyError, TypeError, ValueError) as e:
            notes.append(f"unreadable model description ({e}); using the logged layers")
    series = series_of(data, run, None if info is None else info.layers, not run.graddiag)
    if not len(series.steps) or not series.layers:
        return None
    if info is None:
        info = ModelInfo(layers=series.layers)
    spec = detectors if detectors is not None else _detector_spec(meta, notes)
    try:
        diag = Diagnoser(info, spec)
    except ValueError as e:
        raise LogReadError(f"run {run.run!r}: bad detector settings: {e}") from None
    block: list = []
    for st in series.step_stats():  # in blocks of steps: the same findings, vectorised
        block.append(st)
        if len(block) == _BLOCK:
            diag.update_block(block)
            block = []
    diag.update_block(block)
    diag.finalize()
    coverage = coverage_of(run, series, not run.graddiag)
    notes += coverage.notes()
    return RunDiagnosis(series, info, list(diag.findings), notes, coverage)
