"""The gradient-flow figure of one run (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING

import numpy as np

from graddiag.analysis._numeric import quiet_nan_warnings
from graddiag.analysis.render import escape

if TYPE_CHECKING:
    from graddiag.analysis.report import RunReport

__all__ = ["plot_run"]

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
        with quiet_nan_warnings():
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
    ax.set_yticklabels(
        [escape(s.layers[j][-40:], "matplotlib") for j in range(0, L, stride)], fontsize=7
    )
    ax.set_ylim(L, 0)
    ax.set_ylabel(f"layer ({L})")
    ax.set_title(
        f"gradient flow: run {escape(r.run, 'matplotlib')} "
        f"({len(r.findings)} findings; x = finding)"
    )
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
