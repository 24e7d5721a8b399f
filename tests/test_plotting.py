"""`graddiag plot`'s figure: every row labelled, the run's own name, zero / missing / NaN cells in
their own colours, log axes where values span decades, a loss panel, one colour scale for several
runs. Checked on the figure itself (pixels read back from the rendered canvas)."""

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from graddiag.analysis import analyze  # noqa: E402
from graddiag.analysis.heatmap import MISSING, NONFINITE, ZERO  # noqa: E402
from graddiag.analysis.plotting import (  # noqa: E402
    CELL_COLORS,
    plot_runs,
    run_figure,
    run_title,
    shared_range,
)
from graddiag.monitor import MonitorCore  # noqa: E402
from graddiag.stats import ModelInfo, StepStats  # noqa: E402

LAYERS = tuple(f"blocks.{i}.fc" for i in range(15))
#: RGB channels may differ from the colour asked for by antialiasing at a cell's edge only.
RGB_ATOL = 3


def write(logdir, scale=1.0, steps=12):
    """Layer 2 exactly zero, layer 5 without gradient, layer 7 NaN at step 6; clip 1e-4 at 4."""
    core = MonitorCore(ModelInfo(layers=LAYERS), str(logdir), close_at_exit=False)
    for step in range(steps):
        g = scale * np.linspace(1.0, 2.0, len(LAYERS))
        has = np.ones(len(LAYERS), bool)
        nf = np.zeros(len(LAYERS))
        g[2] = 0.0
        has[5], g[5] = False, 0.0
        if step == 6:
            g[7], nf[7] = np.nan, 1
        core.process(
            StepStats(
                step=step,
                grad_norm=g,
                has_grad=has,
                nonfinite=nf,
                global_norm=float(np.sqrt(np.nansum(g**2))),
                clip_coef=1e-4 if step == 4 else 1.0,
                loss=1.0 / (step + 1),
            )
        )
    core.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot") / "my-experiment"
    write(d)
    return analyze(d).runs[0]


@pytest.fixture
def fig(run):
    import matplotlib.pyplot as plt

    f = run_figure(run, width=8, dpi=60)
    f.canvas.draw()
    yield f
    plt.close(f)


def test_a_single_run_is_titled_by_its_directory(run, fig):
    assert run.run == "."
    assert run_title(run) == "my-experiment"
    assert "my-experiment" in fig.axes[0].get_title() and "run ." not in fig.axes[0].get_title()


def test_every_layer_row_is_labelled(fig):
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(LAYERS)
    assert list(ax.get_yticks()) == [j + 0.5 for j in range(len(LAYERS))]


def pixel(fig, ax, step, row):
    """The colour of cell (step, row), off its centre, where a finding's marker may be drawn."""
    x, y = ax.transData.transform((step - 0.3, row + 0.25))
    buf = np.asarray(fig.canvas.buffer_rgba())
    return buf[int(round(buf.shape[0] - y)), int(round(x)), :3].astype(int)


def rgb(hex_color):
    return np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])


def test_zero_missing_and_nonfinite_cells_have_their_own_colours(fig):
    ax = fig.axes[0]
    for step, row, kind in ((3, 2, ZERO), (3, 5, MISSING), (6, 7, NONFINITE)):
        assert np.abs(pixel(fig, ax, step, row) - rgb(CELL_COLORS[kind])).max() <= RGB_ATOL
    assert len({CELL_COLORS[k] for k in (ZERO, MISSING, NONFINITE)}) == 3
    value = pixel(fig, ax, 3, 0)
    assert all(np.abs(value - rgb(CELL_COLORS[k])).max() > 20 for k in (ZERO, MISSING, NONFINITE))


def test_clip_axis_is_logarithmic_and_loss_is_drawn(fig):
    _, ax_g, ax_c, ax_l = fig.axes[:4]
    assert ax_c.get_yscale() == "log"
    assert ax_c.get_ylim()[0] <= 1e-4
    (line,) = [ln for ln in ax_l.get_lines() if len(ln.get_xdata()) > 2]  # not finding marks
    assert list(line.get_ydata()) == pytest.approx([1.0 / (s + 1) for s in range(12)], rel=1e-6)
    assert ax_l.get_yscale() == "linear"  # 1/12..1 spans about one decade only
    assert "loss" in ax_l.get_ylabel()


def heat_clim(f):
    return f.axes[0].collections[1].get_clim()


def test_several_runs_share_one_colour_scale(tmp_path):
    import matplotlib.pyplot as plt

    write(tmp_path / "healthy")
    write(tmp_path / "broken", scale=1e-6)
    runs = analyze(tmp_path).runs
    lo, hi = shared_range(runs)
    assert lo == pytest.approx(math.log10(1e-6), abs=1e-6)
    assert hi == pytest.approx(math.log10(2.0), abs=1e-6)
    for r in runs:
        f = run_figure(r, width=6, dpi=40, vrange=(lo, hi))
        assert heat_clim(f) == pytest.approx((lo, hi))
        plt.close(f)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    pngs = plot_runs(runs, paths, width=6, dpi=40)
    assert [p.read_bytes() for p in paths] == pngs
    alone = run_figure(runs[0], width=6, dpi=40)  # own range: differs from the shared one
    assert heat_clim(alone) != pytest.approx((lo, hi))
    plt.close(alone)


def test_plot_runs_needs_one_path_per_run(run):
    with pytest.raises(ValueError, match="one path per run"):
        plot_runs([run], [])


def test_cli_plot_of_several_runs_uses_one_scale(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import graddiag.analysis.plotting as plotting
    from graddiag.cli import app

    write(tmp_path / "logs" / "healthy")
    write(tmp_path / "logs" / "broken", scale=1e-6)
    seen = []
    real = plotting.plot_run
    monkeypatch.setattr(
        plotting, "plot_run", lambda r, p, **kw: seen.append(kw["vrange"]) or real(r, p, **kw)
    )
    out = tmp_path / "flow.png"
    r = CliRunner().invoke(app, ["plot", str(tmp_path / "logs"), "-o", str(out), "--dpi", "30"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path))[:2] == ["flow-broken.png", "flow-healthy.png"]
    assert len(seen) == 2 and seen[0] == seen[1] == pytest.approx(
        (math.log10(1e-6), math.log10(2.0)), abs=1e-6
    )


def test_comparison_draws_both_runs_side_by_side_on_one_scale(tmp_path):
    import matplotlib.pyplot as plt

    from graddiag.analysis.plotting import comparison_figure

    write(tmp_path / "healthy")
    write(tmp_path / "broken", scale=1e-6)
    runs = analyze(tmp_path).runs
    fig = comparison_figure(runs, width=6, dpi=40)
    heat = [sub.axes[0] for sub in fig.subfigs]
    assert [ax.get_title().split()[2] for ax in heat] == ["broken", "healthy"]
    lo, hi = math.log10(1e-6), math.log10(2.0)
    for ax in heat:
        assert ax.collections[1].get_clim() == pytest.approx((lo, hi), abs=1e-6)
    assert tuple(fig.get_size_inches()) == pytest.approx((12.0, 2.5 + 5.5))
    plt.close(fig)


def test_cli_compare_writes_the_side_by_side_plot(tmp_path):
    from test_analysis import png_size
    from typer.testing import CliRunner

    from graddiag.cli import app

    write(tmp_path / "a")
    write(tmp_path / "b", scale=1e-6)
    out = tmp_path / "cmp.png"
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--format", "json"]
    r = CliRunner().invoke(app, args + ["--plot", str(out)])
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # the JSON on stdout is untouched
    assert png_size(out.read_bytes()) == (2 * 12 * 100, (2.5 + 5.5) * 100)
    bad = CliRunner().invoke(app, args + ["--plot", str(tmp_path / "cmp.jpg")])
    assert bad.exit_code == 2 and "cmp.jpg" in bad.output


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"width": 0}, "`width`.*got 0"),
        ({"width": -3.0}, "`width`.*got -3.0"),
        ({"width": float("nan")}, "`width`.*got nan"),
        ({"dpi": 0}, "`dpi`.*got 0"),
        ({"dpi": 72.5}, "`dpi`.*got 72.5"),
    ],
)
def test_bad_width_or_dpi_is_refused_naming_the_argument(run, tmp_path, kw, needle):
    from graddiag.analysis.plotting import comparison_figure, plot_run

    with pytest.raises(ValueError, match=needle):
        plot_run(run, tmp_path / "x.png", **kw)
    with pytest.raises(ValueError, match=needle):
        comparison_figure([run, run], **kw)
    assert not (tmp_path / "x.png").exists()


def test_comparison_of_no_runs_is_refused():
    from graddiag.analysis.plotting import comparison_figure

    with pytest.raises(ValueError, match="at least one run.*none"):
        comparison_figure([])
