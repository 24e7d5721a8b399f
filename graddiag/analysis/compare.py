"""Run comparison: the data behind ``graddiag compare RUN_A RUN_B``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from graddiag.analysis._numeric import finite_or_none, quiet_nan_warnings
from graddiag.analysis.diagnosis import Series
from graddiag.analysis.report import RunReport, analyze
from graddiag.reader import LogReadError

__all__ = ["compare_runs", "plot_compared"]


def _one_run(path: str | os.PathLike, tag_pattern: str | None) -> RunReport:
    rep = analyze(path, tag_pattern=tag_pattern)
    if len(rep.runs) != 1:
        names = ", ".join(r.run for r in rep.runs)
        raise LogReadError(
            f"{os.fspath(path)}: holds {len(rep.runs)} runs ({names}); point at one run directory"
        )
    return rep.runs[0]


def _median_norms(s: Series, js: list[int]) -> np.ndarray:
    x = np.where(s.has_grad & np.isfinite(s.grad_norm), s.grad_norm, np.nan)[:, js]
    with quiet_nan_warnings():
        return np.nanmedian(x, axis=0) if len(x) else np.full(len(js), np.nan)


def _finding_keys(r: RunReport) -> set[tuple[str, str | None, str]]:
    return {(f.kind, f.layer, f.severity) for f in r.findings}


def _as_list(keys: set[tuple[str, str | None, str]]) -> list[dict[str, Any]]:
    return [
        {"kind": k, "layer": n, "severity": s}
        for k, n, s in sorted(keys, key=lambda t: (t[0], t[1] or "", t[2]))
    ]


def compare_runs(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    rtol: float = 1e-3,
    tag_pattern: str | None = None,
) -> dict[str, Any]:
    """Compare two runs: first step of divergence, per-layer median norms, findings in one only.

    Args:
        a, b: run directories (or log directories holding one run).
        rtol: relative difference of a norm that counts as divergence (NaN vs a number counts).
        tag_pattern: as `graddiag.read`.

    Returns:
        ``{"a": {...}, "b": {...}, "common_steps", "common_layers", "divergence": {"step", "layer",
        "a", "b"} | None, "layers": [{"layer", "a", "b", "ratio"}] (sorted by |log ratio|,
        descending), "only_a": [finding key], "only_b": [finding key]}`` where a finding key is
        ``{"kind", "layer", "severity"}`` (JSON-ready).

    Raises:
        LogReadError: if either path holds no gradient logs or more than one run.
    """
    ra, rb = _one_run(a, tag_pattern), _one_run(b, tag_pattern)
    sa, sb = ra.series, rb.series
    steps, ia, ib = np.intersect1d(sa.steps, sb.steps, return_indices=True)
    in_b = set(sb.layers)
    layers = [n for n in sa.layers if n in in_b]
    ja = [sa.layers.index(n) for n in layers]
    jb = [sb.layers.index(n) for n in layers]
    divergence = None
    ga, gb = sa.global_norm()[ia], sb.global_norm()[ib]
    xa, xb = sa.grad_norm[np.ix_(ia, ja)], sb.grad_norm[np.ix_(ib, jb)]
    with np.errstate(all="ignore"):

        def differs(x, y):
            scale = np.maximum(np.abs(x), np.abs(y))
            nan_mismatch = np.isnan(x) != np.isnan(y)
            return nan_mismatch | (np.abs(x - y) > rtol * np.where(scale > 0, scale, 1.0))

        dl = differs(xa, xb) if len(layers) else np.zeros((len(steps), 0), bool)
        dg = differs(ga, gb)
    rows = np.flatnonzero(dl.any(axis=1) | dg)
    if len(rows):
        i = int(rows[0])
        if dl[i].any():
            j = int(np.argmax(dl[i]))
            divergence = {
                "step": int(steps[i]),
                "layer": layers[j],
                "a": finite_or_none(xa[i, j]),
                "b": finite_or_none(xb[i, j]),
            }
        else:
            divergence = {
                "step": int(steps[i]),
                "layer": None,
                "a": finite_or_none(ga[i]),
                "b": finite_or_none(gb[i]),
            }
    ma, mb = _median_norms(sa, ja), _median_norms(sb, jb)
    table = []
    for n, x, y in zip(layers, ma, mb, strict=True):
        ratio = y / x if x > 0 and np.isfinite(x) and np.isfinite(y) else float("nan")
        table.append(
            {
                "layer": n,
                "a": finite_or_none(x),
                "b": finite_or_none(y),
                "ratio": finite_or_none(ratio),
            }
        )
    table.sort(key=lambda r: -abs(np.log(r["ratio"])) if r["ratio"] else 0.0)
    ka, kb = _finding_keys(ra), _finding_keys(rb)

    def side(path, s: Series, r: RunReport) -> dict[str, Any]:
        return {
            "path": path,
            "steps": int(len(s.steps)),
            "layers": len(s.layers),
            "findings": len(r.findings),
        }

    return {
        "a": side(os.fspath(a), sa, ra),
        "b": side(os.fspath(b), sb, rb),
        "common_steps": int(len(steps)),
        "common_layers": len(layers),
        "divergence": divergence,
        "layers": table,
        "only_a": _as_list(ka - kb),
        "only_b": _as_list(kb - ka),
    }


def plot_compared(
    a: str | os.PathLike,
    b: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    tag_pattern: str | None = None,
    width: float = 12.0,
    dpi: int = 100,
) -> bytes:
    """Both runs' gradient-flow figures side by side, on one colour scale (PNG bytes, written to
    `path` when given; see `graddiag.analysis.plotting.comparison_figure`).

    Raises:
        LogReadError: if either path holds no gradient logs or more than one run.
    """
    from graddiag.analysis.plotting import plot_comparison

    runs = [_one_run(a, tag_pattern), _one_run(b, tag_pattern)]
    return plot_comparison(runs, path, width=width, dpi=dpi)
