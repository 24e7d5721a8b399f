"""Post-hoc analysis: run graddiag's detectors over the series read back from event files.

`analyze(logdir)` rebuilds, for each run, the `ModelInfo` and detector settings that the live run
wrote under ``graddiag/model`` (defaults for foreign logs), turns the recorded series back into one
`StepStats` per logged step and feeds them to the same `Diagnoser` the live run used. A live run and
a later analysis of its logs therefore report the same findings, up to float32 rounding of the logged
values (a value within float32 rounding of a detector threshold may flip) and what the logs do not
hold; `StepStats.nonfinite_origin` (backward tracing) is read from ``graddiag/nonfinite_origin``.

Rendering (markdown, HTML, CSV, plots) lives here too so that it can be used without the CLI.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graddiag.detectors import DETECTORS, Diagnoser
from graddiag.findings import SEVERITIES, Finding, severity_rank
from graddiag.reader import LogData, LogReadError, ReadStats, RunData, read_logs
from graddiag.stats import ModelInfo, StepStats

__all__ = ["Report", "RunReport", "Series", "analyze", "analyze_logs", "plot_run", "series_of"]

#: Version tag of the JSON document printed by ``graddiag analyze --format json``.
SCHEMA = "graddiag.report/1"
_GLOBALS = ("grad_norm", "clip_coef", "grad_reset", "backward_calls", "skipped", "loss")


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
            out.append(
                StepStats(
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
                    nonfinite_origin=self.origins.get(int(step)),
                )
            )
        return out


def _opt(v: float, cast):
    return None if math.isnan(v) else cast(v)


def series_of(data: LogData, run: RunData, layers: Sequence[str] | None = None) -> Series:
    """Dense `Series` of one run from `read_logs` output.

    Args:
        data: the `read_logs` result holding `run` (for its code tables).
        run: the run.
        layers: the layer order (e.g. from the live run's `ModelInfo`); default: layers with a
            logged gradient norm, in order of first appearance. Layers not listed are ignored.
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
    steps = np.unique(run.step[is_grad])
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
    )


@dataclass
class RunReport:
    """The diagnosis of one run (see `Report.to_dict` for the JSON shape)."""

    run: str
    path: str
    source: str
    framework: str
    series: Series
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    top: int = 5
    backward_order: tuple[str, ...] | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        return self.series.layers

    @property
    def steps(self) -> np.ndarray:
        return self.series.steps

    def first_nonfinite(self) -> dict[str, Any] | None:
        """First step with a NaN/Inf gradient and the first layer hit there, in backward order."""
        s = self.series
        bad = s.bad()
        gbad = s.glob_logged["grad_norm"] & ~np.isfinite(s.glob["grad_norm"])
        rows = np.flatnonzero(bad.any(axis=1) | gbad)
        if not len(rows):
            return None
        i = int(rows[0])
        order = self._backward_order()
        layer = next((s.layers[j] for j in order if bad[i, j]), None)
        return {"step": int(s.steps[i]), "layer": layer}

    def _backward_order(self) -> list[int]:
        index = {n: j for j, n in enumerate(self.series.layers)}
        bo = self.backward_order or tuple(reversed(self.series.layers))
        return [index[n] for n in bo if n in index]

    def clip_rate(self) -> float | None:
        """Fraction of steps where clipping scaled the gradients (None if no clipping was logged)."""
        s = self.series
        coef = np.fmin(
            s.glob["clip_coef"],
            np.nanmin(np.where(np.isnan(s.layer_clip), np.inf, s.layer_clip), axis=1)
            if s.layer_clip.size
            else np.inf,
        )
        coef = np.where(np.isinf(coef), np.nan, coef)
        seen = ~np.isnan(coef)
        if not seen.any():
            return None
        return float(np.mean(coef[seen] < 1.0))

    def worst_layers(self) -> list[dict[str, Any]]:
        """The `top` layers ranked by worst finding, then number of findings, then NaN/Inf steps,
        then how far their median norm is from the model's median layer norm (log10)."""
        s = self.series
        if not s.layers:
            return []
        by_layer: dict[str, list[Finding]] = {}
        for f in self.findings:
            if f.layer is not None:
                by_layer.setdefault(f.layer, []).append(f)
        finite = np.where(s.has_grad & np.isfinite(s.grad_norm), s.grad_norm, np.nan)
        with np.errstate(all="ignore"), _quiet():
            med = np.nanmedian(finite, axis=0) if len(s.steps) else np.full(len(s.layers), np.nan)
            mx = np.nanmax(finite, axis=0) if len(s.steps) else np.full(len(s.layers), np.nan)
            pos = med[(med > 0) & np.isfinite(med)]
            ref = float(np.median(pos)) if len(pos) else float("nan")
            dev = np.abs(np.log10(med / ref)) if ref > 0 else np.zeros(len(s.layers))
        bad_steps = s.bad().sum(axis=0)
        rows = []
        for j, name in enumerate(s.layers):
            fs = by_layer.get(name, [])
            worst = max((severity_rank(f.severity) for f in fs), default=-1)
            d = float(dev[j]) if np.isfinite(dev[j]) else 0.0
            rows.append(
                (
                    (worst, len(fs), int(bad_steps[j]), d),
                    {
                        "layer": name,
                        "findings": len(fs),
                        "max_severity": SEVERITIES[worst] if worst >= 0 else None,
                        "kinds": sorted({f.kind for f in fs}),
                        "median_grad_norm": _num(med[j]),
                        "max_grad_norm": _num(mx[j]),
                        "nonfinite_steps": int(bad_steps[j]),
                        "grad_steps": int(s.has_grad[:, j].sum()),
                    },
                )
            )
        rows.sort(key=lambda r: r[0], reverse=True)
        return [r[1] for r in rows[: self.top]]

    def to_dict(self) -> dict[str, Any]:
        st = self.series.steps
        return {
            "run": self.run,
            "path": self.path,
            "source": self.source,
            "framework": self.framework,
            "steps": {
                "count": int(len(st)),
                "first": int(st[0]) if len(st) else None,
                "last": int(st[-1]) if len(st) else None,
            },
            "layers": len(self.series.layers),
            "findings": [f.to_dict() for f in self.findings],
            "worst_layers": self.worst_layers(),
            "first_nonfinite": self.first_nonfinite(),
            "clip_rate": self.clip_rate(),
            "notes": list(self.notes),
        }


class _quiet:
    """Silence NumPy's all-NaN-slice RuntimeWarnings."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Report:
    """The result of `analyze`: one `RunReport` per run, plus what the reader had to skip.

    ``to_dict()`` is exactly the document ``graddiag analyze --format json`` prints::

        {"schema": "graddiag.report/1", "logdir": str,
         "summary": {"runs": int, "findings": int, "by_severity": {"info": int, "warning": int,
                     "error": int}, "max_severity": "info"|"warning"|"error"|null},
         "runs": [{"run": str, "path": str, "source": "graddiag"|"foreign", "framework": str,
                   "steps": {"count": int, "first": int|null, "last": int|null}, "layers": int,
                   "findings": [<finding>], "worst_layers": [{"layer": str, "findings": int,
                   "max_severity": str|null, "kinds": [str], "median_grad_norm": float|null,
                   "max_grad_norm": float|null, "nonfinite_steps": int, "grad_steps": int}],
                   "first_nonfinite": {"step": int, "layer": str|null}|null,
                   "clip_rate": float|null, "notes": [str]}],
         "read": <ReadStats.to_dict()>, "notes": [str]}
    """

    logdir: str
    runs: list[RunReport]
    read_stats: ReadStats
    notes: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.runs for f in r.findings]

    def max_severity(self) -> str | None:
        ranks = [severity_rank(f.severity) for f in self.findings]
        return SEVERITIES[max(ranks)] if ranks else None

    def to_dict(self) -> dict[str, Any]:
        fs = self.findings
        return {
            "schema": SCHEMA,
            "logdir": self.logdir,
            "summary": {
                "runs": len(self.runs),
                "findings": len(fs),
                "by_severity": {s: sum(f.severity == s for f in fs) for s in SEVERITIES},
                "max_severity": self.max_severity(),
            },
            "runs": [r.to_dict() for r in self.runs],
            "read": self.read_stats.to_dict(),
            "notes": list(self.notes),
        }

    # ---- renderings ---------------------------------------------------------------------------
    def findings_rows(self) -> list[dict[str, Any]]:
        """One flat dict per finding, with its run (for CSV)."""
        return [{"run": r.run, **f.to_dict()} for r in self.runs for f in r.findings]

    def to_csv(self) -> str:
        import csv

        buf = io.StringIO()
        cols = ["run", "step", "layer", "kind", "severity", "value", "message", "suggestion"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in self.findings_rows():
            w.writerow({k: ("" if row[k] is None else row[k]) for k in cols})
        return buf.getvalue()

    def to_markdown(self) -> str:
        out = [f"# graddiag report: `{_md(self.logdir)}`", ""]
        for r in self.runs:
            d = r.to_dict()
            out += [f"## run `{_md(r.run)}`", "", _md(_summary_line(d)), ""]
            out += [
                "| step | severity | kind | layer | message | suggestion |",
                "|---:|---|---|---|---|---|",
            ]
            for f in r.findings:
                out.append(
                    f"| {f.step} | {f.severity} | {f.kind} | {_md(f.layer or '(model)')} | "
                    f"{_md(f.message)} | {_md(f.suggestion)} |"
                )
            if not r.findings:
                out.append("| | | | | no findings | |")
            out += [
                "",
                "**Worst layers**",
                "",
                "| layer | findings | worst | median norm | max norm |",
                "|---|---:|---|---:|---:|",
            ]
            for w in d["worst_layers"]:
                out.append(
                    f"| {_md(w['layer'])} | {w['findings']} | {w['max_severity'] or ''} | "
                    f"{_fmt(w['median_grad_norm'])} | {_fmt(w['max_grad_norm'])} |"
                )
            out.append("")
        return "\n".join(out)

    def to_html(self, plots: bool = True) -> str:
        """One self-contained HTML page (plots embedded as base64 PNG); every name is escaped."""
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            "<html><head><meta charset='utf-8'>",
            f"<title>graddiag report: {e(self.logdir)}</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
            ".error{color:#b00}.warning{color:#a60}.info{color:#06a}</style></head><body>",
            f"<h1>graddiag report: <code>{e(self.logdir)}</code></h1>",
        ]
        for r in self.runs:
            d = r.to_dict()
            parts.append(f"<h2>run <code>{e(r.run)}</code></h2><p>{e(_summary_line(d))}</p>")
            if plots and len(r.steps):
                png = plot_run(r)
                parts.append(
                    f"<img alt='gradient flow of run {e(r.run)}' "
                    f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                )
            parts.append(
                "<table><tr><th>step</th><th>severity</th><th>kind</th><th>layer</th>"
                "<th>message</th><th>suggestion</th></tr>"
            )
            for f in r.findings:
                parts.append(
                    f"<tr class='{e(f.severity)}'><td>{f.step}</td><td>{e(f.severity)}</td>"
                    f"<td>{e(f.kind)}</td><td>{e(f.layer or '(model)')}</td>"
                    f"<td>{e(f.message)}</td><td>{e(f.suggestion)}</td></tr>"
                )
            parts.append(
                "</table><h3>worst layers</h3><table><tr><th>layer</th><th>findings</th>"
                "<th>worst</th><th>median norm</th><th>max norm</th></tr>"
            )
            for w in d["worst_layers"]:
                parts.append(
                    f"<tr><td>{e(w['layer'])}</td><td>{w['findings']}</td>"
                    f"<td>{e(w['max_severity'] or '')}</td>"
                    f"<td>{_fmt(w['median_grad_norm'])}</td>"
                    f"<td>{_fmt(w['max_grad_norm'])}</td></tr>"
                )
            parts.append("</table>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _md(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("\n", " ")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
    )


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def _summary_line(d: Mapping[str, Any]) -> str:
    st = d["steps"]
    nf = d["first_nonfinite"]
    nf_text = (
        f"first NaN/Inf at step {nf['step']} in {nf['layer'] or '(model)'}"
        if nf
        else "no NaN/Inf gradients"
    )
    clip = "no clipping logged" if d["clip_rate"] is None else f"clip rate {d['clip_rate']:.1%}"
    span = f"steps {st['first']}..{st['last']}" if st["count"] else "no steps"
    return (
        f"{st['count']} logged steps ({span}), {d['layers']} layers, "
        f"{len(d['findings'])} findings; {nf_text}; {clip}."
    )


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


def analyze_logs(
    data: LogData, *, detectors: Mapping[str, Any] | None = None, top: int = 5
) -> Report:
    """Analyze already-read logs (see `analyze`)."""
    runs = []
    notes = []
    for run in data.runs:
        run_notes: list[str] = []
        meta = run.meta if isinstance(run.meta, Mapping) else None
        info = None
        if meta and isinstance(meta.get("info"), Mapping):
            try:
                info = ModelInfo.from_dict(meta["info"])
            except (KeyError, TypeError, ValueError) as e:
                run_notes.append(f"unreadable model description ({e}); using the logged layers")
        series = series_of(data, run, None if info is None else info.layers)
        if not len(series.steps) or not series.layers:
            notes.append(f"run {run.run!r}: no gradient tags, skipped")
            continue
        if info is None:
            info = ModelInfo(layers=series.layers)
        spec = detectors if detectors is not None else _detector_spec(meta, run_notes)
        try:
            diag = Diagnoser(info, spec)
        except ValueError as e:
            raise LogReadError(f"run {run.run!r}: bad detector settings: {e}") from None
        for st in series.step_stats():
            diag.update(st)
        diag.finalize()
        rr = RunReport(
            run=run.run,
            path=run.path,
            source="graddiag" if run.graddiag else "foreign",
            framework=info.framework,
            series=series,
            findings=list(diag.findings),
            notes=run_notes,
            top=top,
            backward_order=info.backward_order,
        )
        runs.append(rr)
    if not runs and data.read_stats.unreadable_files:
        path, reason = data.read_stats.unreadable_files[0]
        raise LogReadError(f"{path}: cannot read event file ({reason})")
    if not runs:
        raise LogReadError(
            f"{data.logdir}: no gradient tags found (looked for graddiag/grad_norm/*, Lightning's "
            f"grad_2.0_norm/*, gradient histograms); map other tags with --tag-pattern"
        )
    return Report(data.logdir, runs, data.read_stats, notes)


def analyze(
    logdir: str | os.PathLike,
    *,
    run: str | Sequence[str] | None = None,
    steps: str | tuple | slice | None = None,
    tag_pattern: str | None = None,
    detectors: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    top: int = 5,
) -> Report:
    """Diagnose the gradients recorded under `logdir`, with the same detectors as a live run.

    Args:
        logdir: TensorBoard log directory (or one event file).
        run, steps, tag_pattern, progress: as `graddiag.read`. With `steps`, detectors start at the
            first step of the range (findings may differ from the live run's).
        detectors: override the detector settings (see `graddiag.detectors.build_detectors`);
            default: the live run's settings for graddiag logs, defaults for foreign logs.
        top: how many worst layers to report per run.

    Returns:
        A `Report`; ``report.to_dict()`` is the JSON document of ``graddiag analyze --format json``.

    Raises:
        LogReadError: if `logdir` is missing, holds no event files or no gradient tags.

    Example:
        >>> report = graddiag.analyze("runs/exp1")  # doctest: +SKIP
        >>> [f.kind for f in report.findings]  # doctest: +SKIP
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise LogReadError(f"Expected `top` to be an int >= 0, got {top!r}")
    data = read_logs(logdir, run=run, steps=steps, tag_pattern=tag_pattern, progress=progress)
    return analyze_logs(data, detectors=detectors, top=top)


_MAX_COLUMNS = 1500


def _edges(x: np.ndarray, last: float) -> np.ndarray:
    """Cell edges for column positions `x` (the last cell ends just after step `last`)."""
    if len(x) == 0:
        return np.array([0.0, 1.0])
    if len(x) == 1:
        return np.array([x[0] - 0.5, max(last, x[0]) + 0.5])
    return np.concatenate(
        [[x[0] - (x[1] - x[0]) / 2], (x[1:] + x[:-1]) / 2, [max(last, x[-1]) + (x[-1] - x[-2]) / 2]]
    )


def plot_run(
    r: RunReport, path: str | os.PathLike | None = None, *, width: float = 12.0, dpi: int = 100
) -> bytes:
    """Gradient-flow figure of one run: heatmap of log10 layer norm (layers x steps) with findings
    marked, and the global norm and clip coefficient over time. Returns the PNG bytes (and writes
    them to `path` when given).

    Readable with hundreds of layers: the heatmap height grows with the layer count (capped) and
    only a subset of layer names is labelled.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = r.series
    L = len(s.layers)
    heat_h = min(max(2.5, 0.12 * L), 14.0)
    fig, axes = plt.subplots(
        3,
        1,
        figsize=(width, heat_h + 4.0),
        dpi=dpi,
        sharex=True,
        gridspec_kw={"height_ratios": [heat_h, 2.0, 1.5]},
    )
    ax, ax_g, ax_c = axes
    with np.errstate(all="ignore"):
        z = np.where(
            s.has_grad & np.isfinite(s.grad_norm) & (s.grad_norm > 0),
            np.log10(np.where(s.grad_norm > 0, s.grad_norm, 1.0)),
            np.nan,
        )
    steps = s.steps.astype(float)
    if len(steps) > _MAX_COLUMNS:
        # keep one-step spikes visible: each column shows the largest norm of its bin
        k = math.ceil(len(steps) / _MAX_COLUMNS)
        pad = (-len(steps)) % k
        zp = np.concatenate([z, np.full((pad, L), np.nan)]).reshape(-1, k, L)
        with _quiet():
            z = np.nanmax(zp, axis=1)
        steps_h = np.concatenate([steps, np.full(pad, steps[-1])]).reshape(-1, k)[:, 0]
    else:
        steps_h = steps
    edges = _edges(steps_h, steps[-1] if len(steps) else 0.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    finite = z[np.isfinite(z)]
    vmin, vmax = np.percentile(finite, [1, 99]) if finite.size else (-1.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    mesh = ax.pcolormesh(
        edges,
        np.arange(L + 1),
        np.ma.masked_invalid(z.T),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        shading="flat",
        rasterized=True,
    )
    fig.colorbar(mesh, ax=axes, label="log10 gradient norm", fraction=0.03, pad=0.01)
    bad = s.bad()
    if bad.any():
        bi, bj = np.nonzero(bad)
        ax.scatter(steps[bi], bj + 0.5, marker="s", s=12, c="red", label="NaN/Inf")
    index = {n: j for j, n in enumerate(s.layers)}
    colors = {"error": "red", "warning": "orange", "info": "deepskyblue"}
    for sev, color in colors.items():
        fs = [f for f in r.findings if f.severity == sev]
        at = [(f.step, index[f.layer] + 0.5) for f in fs if f.layer in index]
        if at:
            ax.scatter(*zip(*at, strict=True), marker="x", s=40, c=color, linewidths=1.5)
        for x in sorted({f.step for f in fs if f.layer not in index}):
            ax.axvline(x, color=color, lw=0.8, ls="--")
    n_labels = max(1, int(heat_h * 5))
    stride = max(1, math.ceil(L / n_labels))
    ax.set_yticks(np.arange(0, L, stride) + 0.5)
    ax.set_yticklabels([s.layers[j][-40:] for j in range(0, L, stride)], fontsize=7)
    ax.set_ylim(L, 0)
    ax.set_ylabel(f"layer ({L})")
    ax.set_title(f"gradient flow: run {r.run} ({len(r.findings)} findings; x = finding)")
    gn = s.global_norm()
    ok = np.isfinite(gn) & (gn > 0)
    ax_g.plot(steps[ok], gn[ok], lw=1, color="k")
    for x in steps[~np.isfinite(gn) & (s.glob_logged["grad_norm"] | s.has_grad.any(axis=1))]:
        ax_g.axvline(x, color="red", lw=0.8)
    if ok.any():
        ax_g.set_yscale("log")
    ax_g.set_ylabel("global norm")
    cc = s.glob["clip_coef"]
    has_cc = ~np.isnan(cc)
    if has_cc.any():
        ax_c.plot(steps[has_cc], cc[has_cc], lw=1, color="tab:blue")
        ax_c.set_ylim(0, 1.05)
    else:
        ax_c.text(
            0.5,
            0.5,
            "no clipping logged",
            transform=ax_c.transAxes,
            ha="center",
            va="center",
            color="gray",
        )
    ax_c.set_ylabel("clip coef")
    ax_c.set_xlabel("step")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    png = buf.getvalue()
    if path is not None:
        with open(path, "wb") as fh:
            fh.write(png)
    return png
