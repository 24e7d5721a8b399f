"""The report model: what `analyze` found, per run and in all (`Report.to_dict` is the JSON).

`analyze(logdir)` reads the logs (`graddiag.reader`), diagnoses each run
(`graddiag.analysis.diagnosis`) and returns a `Report`. Renderings of a report (terminal table,
markdown, CSV, HTML) are in `graddiag.analysis.render`; the `to_*` methods here are shortcuts to
them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graddiag import tags
from graddiag.analysis._numeric import finite_or_none, quiet_nan_warnings
from graddiag.analysis.diagnosis import Coverage, Series, diagnose_run
from graddiag.findings import SEVERITIES, Finding, severity_rank
from graddiag.reader import LogData, LogReadError, ReadStats, read_logs

__all__ = ["SCHEMA", "Report", "RunReport", "analyze", "analyze_logs"]

#: Version tag of the JSON document printed by ``graddiag analyze --format json``.
SCHEMA = "graddiag.report/1"


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
    coverage: Coverage | None = None

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
        with np.errstate(all="ignore"), quiet_nan_warnings():
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
                        "median_grad_norm": finite_or_none(med[j]),
                        "max_grad_norm": finite_or_none(mx[j]),
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
            "coverage": None if self.coverage is None else self.coverage.to_dict(),
            "notes": list(self.notes),
        }


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
                   "clip_rate": float|null, "coverage": {"logged_steps": int, "first": int|null,
                   "last": int|null, "layer_steps": int, "layer_first": int|null,
                   "layer_last": int|null, "stride": int|null, "partial_layers": {str: int},
                   "partial": bool}, "notes": [str]}],
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

    def findings_rows(self) -> list[dict[str, Any]]:
        """One flat dict per finding, with its run (for CSV)."""
        return [{"run": r.run, **f.to_dict()} for r in self.runs for f in r.findings]

    def to_csv(self) -> str:
        """One row per finding (see `graddiag.analysis.render.to_csv`)."""
        from graddiag.analysis import render

        return render.to_csv(self)

    def to_markdown(self) -> str:
        """The report as GitHub markdown (see `graddiag.analysis.render.to_markdown`)."""
        from graddiag.analysis import render

        return render.to_markdown(self)

    def to_html(self, plots: bool = True) -> str:
        """One self-contained HTML page (see `graddiag.analysis.render.to_html`)."""
        from graddiag.analysis import render

        return render.to_html(self, plots=plots)


def analyze_logs(
    data: LogData, *, detectors: Mapping[str, Any] | None = None, top: int = 5
) -> Report:
    """Analyze already-read logs (see `analyze`)."""
    runs = []
    notes = list(data.read_stats.notes)  # restarted/concurrent runs, corrupt stretches, ...
    for run in data.runs:
        diag = diagnose_run(data, run, detectors)
        if diag is None:
            notes.append(f"run {run.run!r}: no gradient tags, skipped")
            continue
        runs.append(
            RunReport(
                run=run.run,
                path=run.path,
                source="graddiag" if run.graddiag else "foreign",
                framework=diag.info.framework,
                series=diag.series,
                findings=diag.findings,
                notes=diag.notes,
                top=top,
                backward_order=diag.info.backward_order,
                coverage=diag.coverage,
            )
        )
    if not runs and data.read_stats.unreadable_files:
        path, reason = data.read_stats.unreadable_files[0]
        raise LogReadError(f"{path}: cannot read event file ({reason})")
    rs = data.read_stats
    lo, hi = data.steps
    if not runs and (lo is not None or hi is not None) and rs.first_step is not None:
        wanted = f"{'' if lo is None else lo}:{'' if hi is None else hi}"
        raise LogReadError(
            f"{data.logdir}: no logged steps in --steps {wanted} (the logs hold steps "
            f"{rs.first_step} to {rs.last_step})"
        )
    if not runs and rs.corrupt_records and not rs.scalars:
        raise LogReadError(
            f"{data.logdir}: no intact events: skipped {rs.corrupt_records} corrupt record(s) "
            f"({rs.corrupt_bytes} bytes); " + "; ".join(rs.notes[:3])
        )
    if not runs:
        raise LogReadError(
            f"{data.logdir}: no gradient tags found (looked for "
            f"{tags.layer_prefix('grad_norm')}*, grad_norm/*, Lightning's grad_2.0_norm/*, gradient "
            f"histograms); map other tags with --tag-pattern"
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
