"""The host path every adapter shares: row layout, decoding, detail statistics, histograms,
update ratios, the raise policy and run metadata — checked against hand-computed numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from graddiag.findings import Finding
from graddiag.host import DETAIL_FIELDS, HIST_BINS, HIST_WIDTH, HostPath, RowLayout
from graddiag.monitor import NonFiniteGradientError
from graddiag.settings import Settings
from graddiag.stats import ModelInfo

#: float32 rows decoded in float64
REL = 1e-6
# three parameters in two layers: a.w, a.b -> layer 0; b.w -> layer 1
LAYER_OF = np.array([0, 0, 1])
NAMES = ["a.w", "a.b", "b.w"]
NUMEL = [6, 2, 4]


def host(**settings) -> HostPath:
    h = HostPath(Settings(**settings), LAYER_OF, NAMES, NUMEL, "torch", "0.0")
    h.start(ModelInfo(layers=("a", "b")))
    return h


def row(layout: RowLayout, sumsq, **scalars) -> np.ndarray:
    r = layout.blank()
    r[layout.sumsq] = sumsq
    for name, value in scalars.items():
        r[layout.col[name]] = value
    return r


def test_layout_columns_are_named_and_blank_means_nothing_measured():
    lay = RowLayout(3, 2, layer_coef=True)
    assert lay.width == 3 + len(RowLayout.SCALARS) + 2
    assert list(lay.col) == list(RowLayout.SCALARS)
    assert lay.col["clip_coef"] == 3 and lay.layer_coef == slice(3 + len(RowLayout.SCALARS), 11)
    stats, has, _ = lay.decode(0, lay.blank(), LAYER_OF)
    assert not has.any() and not stats.has_grad.any() and stats.global_norm == 0.0
    assert stats.clip_coef is None and stats.loss is None and stats.grad_reset is None
    assert stats.backward_calls is None and stats.skipped is False
    assert stats.layer_clip_coef is None  # no clip coefficient: no per-layer one either


def test_decode_norms_and_scalars_by_hand():
    lay = RowLayout(3, 2, layer_coef=True)
    r = row(lay, [9.0, 16.0, RowLayout.NO_GRAD], clip_coef=0.5, has_loss=1, loss=2.5)
    r[lay.layer_coef] = [0.25, 1.0]
    stats, has, sumsq = lay.decode(7, r, LAYER_OF, grad_reset=True)
    assert has.tolist() == [True, True, False] and sumsq.tolist() == [9.0, 16.0, 0.0]
    np.testing.assert_allclose(stats.grad_norm, [5.0, 0.0], rtol=REL)  # sqrt(9 + 16)
    assert stats.has_grad.tolist() == [True, False]
    assert stats.global_norm == pytest.approx(5.0, rel=REL)
    assert stats.clip_coef == 0.5 and stats.loss == 2.5 and stats.grad_reset is True
    np.testing.assert_allclose(stats.layer_clip_coef, [0.25, 1.0])


def test_host_known_values_override_the_row():
    lay = RowLayout(3, 2)
    r = row(lay, [1.0, 1.0, 1.0], has_loss=1, loss=3.0)
    stats, has, _ = lay.decode(0, r, LAYER_OF, has=np.array([True, False, False]), loss=None)
    assert has.tolist() == [True, False, False] and stats.loss is None
    assert stats.grad_norm.tolist() == [1.0, 0.0]


def test_nonfinite_parameter_marks_its_layer():
    lay = RowLayout(3, 2)
    stats, _, _ = lay.decode(0, row(lay, [1.0, np.inf, 4.0]), LAYER_OF)
    assert stats.nonfinite.tolist() == [1.0, 0.0] and stats.any_nonfinite


def test_ingest_attaches_detail_statistics_by_hand():
    h = host()
    detail = np.zeros((len(DETAIL_FIELDS), 3))
    detail[0] = [0.5, 2.0, 3.0]  # max |g| per parameter
    detail[1] = [6, 0, 2]  # non-zero elements
    detail[2:4] = np.nan  # NaN/Inf not counted (the adapter saw only finite maxima)
    detail[4] = [1.0, 3.0, 4.0]  # parameter sums of squares
    h.ingest(0, row(h.layout, [1.0, 4.0, 9.0]), detail=detail)
    s = h.core.history[-1]
    np.testing.assert_allclose(s.grad_max, [2.0, 3.0])
    np.testing.assert_allclose(s.zero_frac, [2 / 8, 2 / 4])
    np.testing.assert_allclose(s.param_norm, [2.0, 2.0])  # sqrt(1 + 3), sqrt(4)
    assert s.nan_count is None and s.inf_count is None
    assert h.last_param_norms == {"a.w": 1.0, "a.b": 2.0, "b.w": 3.0}


def test_counted_nan_raises_the_layer_nonfinite_count():
    h = host()
    detail = np.zeros((len(DETAIL_FIELDS), 3))
    detail[0] = [np.nan, 1.0, 1.0]
    detail[2] = [3, 0, 0]  # 3 NaN in a.w
    h.ingest(0, row(h.layout, [np.nan, 1.0, 1.0]), detail=detail)
    s = h.core.history[-1]
    assert s.nonfinite.tolist() == [3.0, 0.0] and s.nan_count.tolist() == [3.0, 0.0]


def test_update_ratio_by_hand():
    h = host()
    h.ingest(0, row(h.layout, [1.0, 1.0, 1.0]))
    h.record_update(0, np.array([[1.0, 0.0, 4.0], [16.0, 9.0, 100.0]]))
    np.testing.assert_allclose(h.core.history[-1].update_ratio, [1 / 5, 2 / 10])


def test_raise_policy_raises_after_logging_every_time(tmp_path):
    h = host(nonfinite="raise", logdir=tmp_path)
    h.ingest(0, row(h.layout, [1.0, 1.0, 1.0]))
    for step in (1, 2):
        with pytest.raises(NonFiniteGradientError, match=f"step {step}") as err:
            h.ingest(step, row(h.layout, [1.0, np.nan, 1.0]))
        assert err.value.finding.layer == "a" and h.error is err.value
    assert [s.step for s in h.core.history] == [0, 1, 2]


def test_histograms_written_from_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from graddiag import tags

    h = host(logdir=tmp_path, hist_every=1)
    values = np.array([-1.0, 0.0, 0.5, 1.0, 2.0])
    counts, _ = np.histogram(values, bins=HIST_BINS, range=(values.min(), values.max()))
    hist = np.zeros((2, HIST_WIDTH))
    hist[0, :HIST_BINS] = counts
    hist[0, HIST_BINS:] = [values.min(), values.max(), values.sum(), values @ values, 5, 1, 2]
    h.ingest(0, row(h.layout, [1.0, 1.0, RowLayout.NO_GRAD]), hist=hist)
    h.core.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    hv = acc.Histograms(tags.hist_tag("a"))[0].histogram_value
    assert hv.num == 5 and hv.min == -1.0 and hv.max == 2.0 and hv.sum_squares == 6.25
    assert list(hv.bucket) == counts.tolist()
    assert tags.hist_tag("b") not in acc.Tags()["histograms"]  # layer b had no gradient
    assert acc.Scalars(tags.tag("nan_count", "a"))[0].value == 1.0


def _meta(logdir: str) -> dict:
    from graddiag.reader import read_logs

    data = read_logs(logdir)
    return data.runs[0].meta


def test_run_metadata_has_the_same_keys_in_both_frameworks(tmp_path):
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    from graddiag import tf as gd_tf
    from graddiag import torch as gd_torch

    net = torch.nn.Linear(3, 2)
    with gd_torch.GradientMonitor(net, logdir=tmp_path / "t", every=1) as mon:
        net(torch.ones(1, 3)).sum().backward()
        mon.step()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with gd_tf.GradientMonitor(model, tmp_path / "k", every=1) as kmon:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(tf.ones((1, 3))))
        kmon.step(tape.gradient(loss, model.trainable_variables))
    mt, mk = _meta(str(tmp_path / "t")), _meta(str(tmp_path / "k"))
    assert set(mt) == set(mk)
    assert mt["framework"] == "torch" and mk["framework"] == "tensorflow"
    assert mt["info"]["framework"] == "torch" and mk["info"]["framework"] == "tensorflow"
    assert mt["parameters"] == ["weight", "bias"] and len(mk["parameters"]) == 2
    assert json.loads(json.dumps(mt)) == mt and not math.isnan(mt["every"])


def test_with_block_keeps_the_users_exception_when_close_raises(monkeypatch):
    """If closing fails (e.g. `nonfinite="raise"` draining a NaN step) inside a `with` block that
    is already unwinding the user's own exception, the user's exception wins (with a warning);
    without one, the close error is raised."""
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    def failing_drain():
        raise NonFiniteGradientError(Finding(3, "a", "nonfinite", "error", None, "NaN", ""))

    model = torch.nn.Linear(2, 1)
    with pytest.raises(KeyError, match="users"), pytest.warns(UserWarning, match="closing"):
        with GradientMonitor(model) as mon:
            monkeypatch.setattr(mon, "_drain", failing_drain)
            raise KeyError("users")
    with pytest.raises(NonFiniteGradientError):
        with GradientMonitor(model) as mon:
            monkeypatch.setattr(mon, "_drain", failing_drain)


def test_imprecise_marks_overflow_and_underflow_of_float32_sums_only():
    from graddiag.host import imprecise

    v = np.array([np.inf, 1e-35, 0.0, 0.0, 1.0, np.nan, 1e-35, np.inf])
    has = np.array([True, True, True, True, True, True, True, False])
    exact = np.array([False, False, False, False, False, False, True, False])
    true_zero = np.array([False, False, False, True, False, False, False, False])
    assert imprecise(v, has, exact, true_zero).tolist() == [
        True,  # +inf: finite elements may have overflowed
        True,  # tiny: elements may have underflowed
        True,  # zero, not known to be truly zero
        False,  # known truly zero
        False,  # ordinary
        False,  # NaN is an element's NaN, not a float32 artefact
        False,  # measured exactly already
        False,  # no gradient
    ]


# ------------------------------------------------------------------ blocks of steps
def _random_steps(
    layout: RowLayout, rng, n: int, bad_at: frozenset = frozenset(), plain: bool = False
):
    """`(step, row, keywords)` of `n` steps: float32 sums over 1e-12..1e6, a parameter without a
    gradient now and then, a NaN on the steps in `bad_at`, loss on some steps, detail on one;
    `plain`: every parameter has a gradient and every step a loss and a clip coefficient."""
    steps = []
    for t in range(n):
        sumsq = (10.0 ** rng.uniform(-12, 6, layout.n_params)).astype(np.float32)
        if rng.uniform() < 0.2 and not plain:
            sumsq[rng.integers(layout.n_params)] = RowLayout.NO_GRAD
        if t in bad_at:
            sumsq[rng.integers(layout.n_params)] = np.nan
        scalars = {"clip_coef": rng.uniform() if plain else rng.choice([-1.0, 1.0, rng.uniform()])}
        if plain or rng.uniform() < 0.5:
            scalars.update(has_loss=1.0, loss=rng.uniform(0, 3))
        kw = {"grad_reset": bool(rng.uniform() < 0.9), "trainable": np.ones(2, bool)}
        if t == 3:
            kw["detail"] = np.stack(
                [rng.uniform(0, 1, 3), np.array([6.0, 2.0, 4.0]), *np.zeros((2, 3))]
                + [rng.uniform(1, 2, 3)]
            )
            kw["update"] = rng.uniform(0.1, 1.0, (2, 3))
        steps.append((t, row(layout, sumsq, **scalars), kw))
    return steps


def _assert_same_stats(a, b) -> None:
    """Two `StepStats` hold the same values (NaN where the other has NaN)."""
    assert vars(a).keys() == vars(b).keys()
    for name, x in vars(a).items():
        y = getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=name)
        elif isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), name
        else:
            assert x == y and type(x) is type(y), (name, x, y)


@pytest.mark.parametrize("seed", range(4))
def test_decode_block_by_hand_row_by_row(seed):
    """Vectorised decoding of a log step's rows: each row's layer norms, NaN marks and global norm
    are `aggregate_layers` of that row alone (a NaN stays in its own layer and row), its scalars
    are its own columns, and known values override the row."""
    from graddiag.stats import aggregate_layers

    rng = np.random.default_rng(seed)
    lay = RowLayout(3, 2, layer_coef=bool(seed % 2))
    steps = _random_steps(lay, rng, 12, bad_at=frozenset({2, 7}))
    rows = np.stack([r for _, r, _ in steps])
    has_in = [r[:3] != RowLayout.NO_GRAD for _, r, _ in steps]
    known = [
        {"has": h, "grad_reset": kw["grad_reset"]}
        for h, (_, _, kw) in zip(has_in, steps, strict=True)
    ]
    block, has, sumsq = lay.decode_block(list(range(12)), rows, LAYER_OF, known)
    assert sum(s.any_nonfinite for s in block) == 2 and block[2].any_nonfinite
    for k, (step, r, kw) in enumerate(steps):
        sq = np.where(has_in[k], r[:3].astype(np.float64), 0.0)
        norms, layer_has, bad, gnorm = aggregate_layers(sq, has_in[k], LAYER_OF, 2)
        s = block[k]
        assert s.step == step and has[k].tolist() == has_in[k].tolist()
        np.testing.assert_array_equal(sumsq[k], sq)
        np.testing.assert_array_equal(s.grad_norm, norms)
        np.testing.assert_array_equal(s.nonfinite, bad)
        assert s.has_grad.tolist() == layer_has.tolist()
        assert s.global_norm == gnorm or (math.isnan(gnorm) and math.isnan(s.global_norm))
        coef = float(r[lay.col["clip_coef"]])
        assert s.clip_coef == (None if coef < 0 else coef)
        assert (s.layer_clip_coef is None) == (coef < 0 or lay.layer_coef is None)
        loss = float(r[lay.col["loss"]]) if r[lay.col["has_loss"]] > 0 else None
        assert s.loss == loss and s.grad_reset is kw["grad_reset"]
        _assert_same_stats(
            s, lay.decode(step, r, LAYER_OF, has=has_in[k], grad_reset=kw["grad_reset"])[0]
        )


@pytest.mark.parametrize("nonfinite, plain", [("warn", False), ("raise", False), ("warn", True)])
def test_ingest_block_equals_ingest_step_by_step(tmp_path, nonfinite, plain):
    """A block of steps ingested at once (what a log step reads back) gives the findings, history
    and logged events of ingesting them one by one; under "raise" both stop after the first
    non-finite step, raising the same error."""
    from graddiag.reader import read

    rng = np.random.default_rng(7)
    lay = RowLayout(3, 2)
    steps = _random_steps(lay, rng, 30, bad_at=frozenset({17, 18}), plain=plain)
    results = []
    for mode in ("steps", "block"):
        h = host(logdir=str(tmp_path / mode), nonfinite=nonfinite, flush_secs=0)
        h.background = False
        error = None
        try:
            if mode == "steps":
                for step, r, kw in steps:
                    h.ingest(step, r, **kw)
            else:
                h.ingest_block(steps)
        except NonFiniteGradientError as e:
            error = e.finding
        h.close()
        hist = list(h.core.history)
        df = read(str(tmp_path / mode)).drop(columns=["run", "wall_time"], errors="ignore")
        results.append((h.core.findings, hist, error, df))
    (f1, h1, e1, s1), (f2, h2, e2, s2) = results
    assert f1 == f2 and e1 == e2
    assert len(h1) == len(h2) == (30 if nonfinite == "warn" else 18)
    for a, b in zip(h1, h2, strict=True):
        _assert_same_stats(a, b)
    assert any(f.kind == "nonfinite" and f.step == 17 for f in f1)  # the test is not vacuous
    import pandas as pd

    keys = [c for c in s1.columns if c != "value"]
    pd.testing.assert_frame_equal(
        s1.sort_values(keys).reset_index(drop=True), s2.sort_values(keys).reset_index(drop=True)
    )
    assert len(s1) >= 5 * len(h1)  # every step logged its scalars


def test_blocks_of_the_wrong_shape_are_refused_by_name():
    """A block whose rows do not match the layout fails with a message naming the argument, the
    step and the shapes, before anything is diagnosed or logged."""
    h = host()
    good = row(h.layout, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"`rows` of shape \(2, 9\).*got shape \(2, 8\)"):
        h.layout.decode_block([0, 1], np.stack([good[:-1], good[:-1]]), LAYER_OF, [{}, {}])
    with pytest.raises(
        ValueError, match=r"row in `steps` to have shape \(9,\), got step 1: \(1, 9\)"
    ):
        h.ingest_block([(0, good, {}), (1, good[None], {})])
    assert not h.core.history  # nothing ingested
    h.ingest_block([(0, good, {}), (1, good, {})])
    assert [s.step for s in h.core.history] == [0, 1]


def test_a_block_writes_the_bytes_of_its_steps_written_one_by_one(tmp_path, monkeypatch):
    """`TensorBoardSink.write_block` (runs of plain steps taken from the stacked fields and
    encoded at once) writes exactly the event file `write_step` step by step writes: plain runs
    with and without a loss, reset flag, clip coefficients (global and per layer), broken by steps
    without a gradient in a layer, non-finite ones, detail statistics and a text tag."""
    import graddiag.events
    from graddiag.monitor import TensorBoardSink
    from graddiag.stats import StepStats

    monkeypatch.setattr(graddiag.events.time, "time", lambda: 1000.0)  # one wall time for all
    rng = np.random.default_rng(3)
    info = ModelInfo(layers=("a", "b", "c"))
    stream = []
    for t in range(60):
        g = np.exp(rng.normal(0, 1, 3))
        has, bad = np.ones(3, bool), np.zeros(3)
        kw = {}
        if 10 <= t < 30:
            kw.update(loss=float(rng.normal()), grad_reset=bool(t % 7))
        if 20 <= t < 40:
            kw["clip_coef"] = float(rng.uniform(0.1, 1.0))
            if t >= 35:
                kw["layer_clip_coef"] = rng.uniform(0.1, 1.0, 3)
        if t in (5, 33):
            has[1], g[1] = False, 0.0
        if t == 41:
            bad[2], g[2] = 1.0, np.inf
        if t == 45:
            kw.update(grad_max=g / 2, update_ratio=np.full(3, 1e-3))
        if t == 50:
            kw.update(nonfinite_origin="a", backward_calls=2, grads_modified=True)
        gn = float(np.sqrt(np.sum(g**2)))
        stream.append(StepStats(t, g, has, bad, gn, **kw))
    found = [int(x) for x in rng.integers(0, 3, 60)]
    files = []
    for mode in ("steps", "block"):
        sink = TensorBoardSink(tmp_path / mode, info, {"run": 1}, flush_secs=0)
        if mode == "steps":
            for s, n in zip(stream, found, strict=True):
                sink.write_step(s, n)
        else:
            for a in range(0, 60, 13):  # blocks cutting runs in the middle
                sink.write_block(stream[a : a + 13], found[a : a + 13])
        sink.close()
        with open(sink.writer.path, "rb") as f:
            files.append(f.read())
    assert files[0] == files[1] and len(files[0]) > 60 * 3 * 4
