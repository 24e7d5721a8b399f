"""The gradient-flow figure of a run (matplotlib, imported only when a figure is drawn).

Heatmap of log10 layer norm (layers x steps, every layer labelled, cells exactly zero / missing /
non-finite drawn in their own colours, findings marked), with the global norm, the clip
coefficient and the loss on log axes where their values span decades, aligned under it. Figures of
several runs (`plot_runs`, ``graddiag plot`` of a logdir with several runs) share one colour scale
so that they can be compared by eye.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from graddiag.analysis.heatmap import MISSING, NONFINITE, ZERO, bin_series, heat_grid
from graddiag.analysis.render import escape

if TYPE_CHECKING:
    from graddiag.analysis.report import RunReport

__all__ = [
    "comparison_figure",
    "plot_comparison",
    "plot_run",
    "plot_runs",
    "run_figure",
    "run_title",
    "shared_range",
]

_MAX_COLUMNS = 1500
#: Inches per heatmap row: every row gets a readable label.
ROW_INCHES = 0.14
#: Inches of the panels under the heatmap (global norm, clip coefficient, loss) and margins.
PANELS_INCHES = 5.5
#: Colours of the cells that have no log10 norm (the same as the TensorBoard Gradients tab's).
CELL_COLORS = {ZERO: "#ffffff", MISSING: "#c8c8c8", NONFINITE: "#ff1f5a"}
_SEVERITY_COLORS = {"error": "#d7191c", "warning": "#f28e00", "info": "#1f9bde"}


def run_title(r: RunReport) -> str:
    """A run's display name: its run name, or its directory's name for the logdir itself."""
    if r.run not in (".", ""):
        return r.run
    return os.path.basename(os.path.normpath(os.path.abspath(r.path))) or r.path


def shared_range(runs: Sequence[RunReport]) -> tuple[float, float] | None:
    """(min, max) log10 norm over all `runs` (one colour scale for several figures)."""
    ranges = [g for g in (heat_grid(r.series, _MAX_COLUMNS).z_range() for r in runs) if g]
    if not ranges:
        return None
    return min(g[0] for g in ranges), max(g[1] for g in ranges)


def _edges(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Cell edges of columns covering steps first[i]..last[i] (each at least one step wide)."""
    if len(first) == 0:
        return np.array([0.0, 1.0])
    return np.concatenate([first - 0.5, [last[-1] + 0.5]]).astype(float)


def _log_if_decades(ax, lo: np.ndarray, hi: np.ndarray) -> None:
    v = np.concatenate([lo, hi])
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() >= 100:
        ax.set_yscale("log")


def _line_panel(ax, x: np.ndarray, values, logged, stride: int, label: str, color: str) -> None:
    lo, hi, bad = bin_series(values, logged, stride)
    ok = np.isfinite(hi)
    if ok.any():
        ax.plot(x[ok], hi[ok], lw=1, color=color)
        if stride > 1:
            ax.fill_between(x, lo, hi, where=ok, color=color, alpha=0.2, lw=0)
        _log_if_decades(ax, lo, hi)
    for xb in x[bad]:
        ax.axvline(xb, color=CELL_COLORS[NONFINITE], lw=0.8)
    if not ok.any():
        what = "NaN/Inf only" if bad.any() else f"no {label} logged"
        ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_ylabel(label + (" (log)" if ax.get_yscale() == "log" else ""))


def plot_run(
    r: RunReport,
    path: str | os.PathLike | None = None,
    *,
    width: float = 12.0,
    dpi: int = 100,
    vrange: tuple[float, float] | None = None,
) -> bytes:
    """Gradient-flow figure of one run (`run_figure`). Returns the PNG bytes (and writes them to
    `path` when given).

    Args:
        r: the run's report.
        path: PNG file to write, or None.
        width: figure width in inches; the height grows with the layer count
            (`ROW_INCHES` per layer, so every layer name is printed).
        dpi: resolution.
        vrange: (min, max) of the colour scale in log10 norm (`shared_range` of several runs);
            default: this run's range.
    """
    return _save(run_figure(r, width=width, dpi=dpi, vrange=vrange), path, dpi)


def plot_comparison(
    runs: Sequence[RunReport],
    path: str | os.PathLike | None = None,
    *,
    width: float = 12.0,
    dpi: int = 100,
) -> bytes:
    """`comparison_figure` as PNG bytes (written to `path` when given)."""
    return _save(comparison_figure(runs, width=width, dpi=dpi), path, dpi)


def _save(fig, path: str | os.PathLike | None, dpi: int) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    png = buf.getvalue()
    if path is not None:
        with open(path, "wb") as fh:
            fh.write(png)
    return png


def _height(r: RunReport) -> float:
    return max(2.5, ROW_INCHES * len(r.series.layers)) + PANELS_INCHES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def run_figure(
    r: RunReport,
    *,
    width: float = 12.0,
    dpi: int = 100,
    vrange: tuple[float, float] | None = None,
):
    """The matplotlib figure `plot_run` draws; axes: heatmap, global norm, clip coef, loss (and
    the colour bar). The caller closes it."""
    fig = _figure(width, _height(r), dpi)
    _draw(fig, r, vrange)
    return fig


def _figure(width: float, height: float, dpi: int, columns: int = 1):
    """A new figure of `columns` panels `width` x `height` inches; a bad `width` or `dpi` (the
    caller's) is refused first."""
    if not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise ValueError(f"Expected `width` to be a positive number of inches, got {width!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"Expected `dpi` to be a positive int, got {dpi!r}")
    return _pyplot().figure(figsize=(width * columns, height), dpi=dpi, layout="constrained")


def comparison_figure(runs: Sequence[RunReport], *, width: float = 12.0, dpi: int = 100):
    """The runs side by side (each `width` inches wide), on one colour scale (`shared_range`)."""
    if not runs:
        raise ValueError("Expected at least one run to compare, got none")
    vrange = shared_range(runs)
    fig = _figure(width, max(_height(r) for r in runs), dpi, columns=len(runs))
    subs = fig.subfigures(1, len(runs), squeeze=False)[0]
    for sub, r in zip(subs, runs, strict=True):
        _draw(sub, r, vrange)
    return fig


def _draw(fig, r: RunReport, vrange: tuple[float, float] | None) -> None:
    """Draw run `r` into `fig` (a Figure or SubFigure)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    s = r.series
    L = len(s.layers)
    grid = heat_grid(s, _MAX_COLUMNS)
    heat_h = max(2.5, ROW_INCHES * L)
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [heat_h, 1.6, 1.2, 1.2]})
    ax, ax_g, ax_c, ax_l = axes
    edges = _edges(grid.first, grid.last)
    rows = np.arange(L + 1)
    special = np.ma.masked_where(grid.kind.T == 2, grid.kind.T)
    ax.pcolormesh(
        edges,
        rows,
        special,
        cmap=ListedColormap(
            [CELL_COLORS[MISSING], CELL_COLORS[ZERO], "#000000", CELL_COLORS[NONFINITE]]
        ),
        vmin=-0.5,
        vmax=3.5,
        shading="flat",
        rasterized=True,
    )
    lim = vrange or grid.z_range() or (-1.0, 1.0)
    vmin, vmax = lim if lim[0] < lim[1] else (lim[0] - 0.5, lim[1] + 0.5)
    mesh = ax.pcolormesh(
        edges,
        rows,
        np.ma.masked_invalid(grid.z.T),
        cmap="viridis",
        vmin=vmin,
        vmax=vmax,
        shading="flat",
        rasterized=True,
    )
    fig.colorbar(
        mesh,
        ax=ax,
        label="log10 gradient norm" + (" (shared scale)" if vrange else ""),
        fraction=0.03,
        pad=0.01,
    )
    index = {n: j for j, n in enumerate(s.layers)}
    for sev, color in _SEVERITY_COLORS.items():
        fs = [f for f in r.findings if f.severity == sev]
        at = [(f.step, index[f.layer] + 0.5) for f in fs if f.layer in index]
        if at:
            ax.scatter(*zip(*at, strict=True), marker="x", s=40, c=color, linewidths=1.5)
        for x in sorted({f.step for f in fs if f.layer not in index}):
            for a in axes:
                a.axvline(x, color=color, lw=0.8, ls="--")
    ax.set_yticks(np.arange(L) + 0.5)
    ax.set_yticklabels([escape(n[-48:], "matplotlib") for n in s.layers], fontsize=7)
    ax.set_ylim(L, 0)
    ax.set_ylabel(f"layer ({L}, model order)")
    ax.set_title(
        f"gradient flow: {escape(run_title(r), 'matplotlib')} "
        f"({len(r.findings)} findings; x = finding, dashed = whole-model finding)"
    )
    ax.legend(
        handles=[
            Patch(facecolor=CELL_COLORS[ZERO], edgecolor="#888", label="exactly zero"),
            Patch(facecolor=CELL_COLORS[MISSING], edgecolor="#888", label="no gradient"),
            Patch(facecolor=CELL_COLORS[NONFINITE], edgecolor="#888", label="NaN/Inf"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        frameon=False,
    )
    x = grid.first.astype(float)
    g_logged = s.glob_logged["grad_norm"] | s.has_grad.any(axis=1)
    _line_panel(ax_g, x, s.global_norm(), g_logged, grid.stride, "global norm", "k")
    for name, a, color in (("clip_coef", ax_c, "tab:blue"), ("loss", ax_l, "tab:green")):
        label = "clip coef" if name == "clip_coef" else name
        _line_panel(a, x, s.glob[name], s.glob_logged[name], grid.stride, label, color)
    ax_l.set_xlabel("step")


def plot_runs(
    runs: Sequence[RunReport],
    paths: Sequence[str | os.PathLike | None],
    *,
    width: float = 12.0,
    dpi: int = 100,
) -> list[bytes]:
    """`plot_run` for each run, all with one colour scale (`shared_range`)."""
    if len(runs) != len(paths):
        raise ValueError(f"Expected one path per run, got {len(paths)} paths for {len(runs)} runs")
    vrange = shared_range(runs) if len(runs) > 1 else None
    return [
        plot_run(r, p, width=width, dpi=dpi, vrange=vrange)
        for r, p in zip(runs, paths, strict=True)
    ]
