"""The custom-scalars dashboard selects tags that a run actually writes."""

import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from graddiag import monitor, tags
from graddiag.dashboard import ALWAYS_WRITTEN, CHARTS, custom_scalars_layout
from graddiag.monitor import MonitorCore
from graddiag.stats import ModelInfo, StepStats

LAYERS = ("encoder.0", "head[1]", "x+y")  # regex metacharacters in layer names


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(tags written, layout written) by a MonitorCore run that logs every optional statistic."""
    logdir = tmp_path_factory.mktemp("dashboard")
    core = MonitorCore(ModelInfo(layers=LAYERS), str(logdir), close_at_exit=False)
    n = len(LAYERS)
    for step in range(5):
        norms = np.array([1.0, 0.5, 0.25]) * (step + 1)
        core.process(
            StepStats(
                step=step,
                grad_norm=norms,
                has_grad=np.ones(n, bool),
                nonfinite=np.zeros(n),
                global_norm=float(np.linalg.norm(norms)),
                grad_max=norms / 2,
                zero_frac=np.zeros(n),
                param_norm=np.ones(n),
                update_ratio=np.full(n, 1e-3),
                clip_coef=0.5,
                layer_clip_coef=np.full(n, 0.9),
                grad_reset=True,
                backward_calls=1,
                loss=1.0 / (step + 1),
            )
        )
    core.close()
    return read_back(logdir)


def read_back(logdir):
    """(scalar tags written, the layout TensorBoard shows: the run's latest)."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    config = acc.Tensors("custom_scalars__config__")
    steps = [e.step for e in config]
    assert steps == sorted(steps)  # never back in steps: TensorBoard would purge the run
    layout = layout_pb2.Layout.FromString(config[-1].tensor_proto.string_val[0])
    return set(acc.Tags()["scalars"]), layout


def chart_regexes(layout):
    return [(c.title, rx) for cat in layout.category for c in cat.chart for rx in c.multiline.tag]


def test_written_layout_is_the_dashboard(written):
    _, layout = written
    assert layout == custom_scalars_layout()
    assert [c.title for c in layout.category] == [title for title, _ in CHARTS]


def test_every_chart_regex_matches_a_written_tag(written):
    scalars, layout = written
    for title, rx in chart_regexes(layout):
        # TensorBoard's server matches from the start of a tag, its browser code searches
        assert any(re.match(rx, t) for t in scalars), f"chart {title!r}: {rx!r} matches nothing"
        assert {t for t in scalars if re.match(rx, t)} == {t for t in scalars if re.search(rx, t)}


def test_per_layer_charts_match_each_layer_and_no_global_tag(written):
    scalars, _ = written
    rx = tags.tag_regex("grad_norm", per_layer=True)
    assert {t for t in scalars if re.match(rx, t)} == {tags.tag("grad_norm", n) for n in LAYERS}


def test_global_chart_matches_exactly_its_tag(written):
    scalars, _ = written
    rx = tags.tag_regex("clip_coef")
    assert [t for t in scalars if re.match(rx, t)] == [tags.tag("clip_coef")]


def test_charts_use_stats_of_the_tag_scheme():
    for _, charts in CHARTS:
        for _, series in charts:
            for stat, per_layer in series:
                assert stat in (tags.LAYER_STATS if per_layer else tags.GLOBAL_STATS)


def test_monitor_still_exports_the_layout():
    assert monitor.custom_scalars_layout is custom_scalars_layout


def minimal_run(logdir, steps=6, loss_from=None):
    """A run that logs only what every run logs (no clipping, no detail statistics), and the loss
    from step `loss_from` on."""
    core = MonitorCore(ModelInfo(layers=LAYERS), str(logdir), close_at_exit=False)
    n = len(LAYERS)
    for step in range(steps):
        core.process(
            StepStats(
                step=step,
                grad_norm=np.ones(n),
                has_grad=np.ones(n, bool),
                nonfinite=np.zeros(n),
                global_norm=float(np.sqrt(n)),
                loss=None if loss_from is None or step < loss_from else 1.0,
            )
        )
    core.close()


def test_no_chart_is_left_empty(tmp_path):
    minimal_run(tmp_path)
    scalars, layout = read_back(tmp_path)
    for title, rx in chart_regexes(layout):
        assert any(re.match(rx, t) for t in scalars), f"chart {title!r}: {rx!r} matches nothing"
    assert "graddiag: clipping" not in [c.title for c in layout.category]


def test_a_chart_appears_when_its_statistic_is_first_written(tmp_path):
    minimal_run(tmp_path, loss_from=3)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    layouts = {
        e.step: layout_pb2.Layout.FromString(e.tensor_proto.string_val[0])
        for e in acc.Tensors("custom_scalars__config__")
    }
    titles = {s: [c.title for cat in lay.category for c in cat.chart] for s, lay in layouts.items()}
    assert "loss" not in titles[0] and "loss" in titles[3]
    # writing the layout again never made TensorBoard drop data
    assert [e.step for e in acc.Scalars(tags.tag("grad_norm"))] == list(range(6))


def test_layout_keeps_only_charts_of_written_statistics():
    layout = custom_scalars_layout(ALWAYS_WRITTEN | {("clip_coef", False)})
    charts = [(cat.title, c.title) for cat in layout.category for c in cat.chart]
    assert ("graddiag: clipping", "global clip coefficient") in charts
    assert all(c != "per-layer clip coefficient" for _, c in charts)
    assert all(c != "loss" for _, c in charts)
    full = custom_scalars_layout()
    assert sum(len(cat.chart) for cat in full.category) == sum(len(c) for _, c in CHARTS)
