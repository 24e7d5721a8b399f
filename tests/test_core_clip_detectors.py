"""The neutral core on its own (NumPy only): clipping math by hand, detectors on synthetic stats."""

import math

import numpy as np
import pytest

from graddiag.clip import (
    AGC,
    AutoClip,
    GlobalNormClip,
    Gradients,
    LayerNormClip,
    NumpyOps,
    ValueClip,
    ZClip,
    as_chain,
    chain,
    clip_gradients,
)
from graddiag.detectors import PRIOR_SIGMA, PRIOR_STEPS, Diagnoser, SpikeDetector, build_detectors
from graddiag.monitor import MonitorCore
from graddiag.stats import ModelInfo, StepStats

EXACT = 1e-12


def stats(step, norms, has=None, nonfinite=None, **kw):
    norms = np.asarray(norms, dtype=float)
    has = np.ones(len(norms), bool) if has is None else np.asarray(has)
    nf = np.zeros(len(norms)) if nonfinite is None else np.asarray(nonfinite, float)
    return StepStats(
        step=step,
        grad_norm=norms,
        has_grad=has,
        nonfinite=nf,
        global_norm=float(np.sqrt(np.sum(np.where(has, norms, 0) ** 2))),
        **kw,
    )


# ------------------------------------------------------------------------ clipping, by hand
NP = NumpyOps()


def test_global_norm_clip_matches_torch_formula():
    scale, _ = GlobalNormClip(2.0).factors(None, np.float64(8.0), {}, NP)
    assert scale.global_coef == pytest.approx(2.0 / (8.0 + 1e-6), rel=EXACT)
    scale, _ = GlobalNormClip(2.0).factors(None, np.float64(1.0), {}, NP)
    assert scale.global_coef == 1.0


def test_autoclip_uses_percentile_of_history_including_current():
    policy = AutoClip(percentile=25, history=4)
    state = policy.init(1)
    seen = []
    for g in [4.0, 1.0, 3.0, 2.0, 10.0, 0.5]:
        seen.append(g)
        scale, state = policy.factors(None, np.float64(g), state, NP)
        threshold = np.percentile(seen[-4:], 25)
        assert scale.global_coef == pytest.approx(min(1.0, threshold / (g + 1e-6)), rel=EXACT)


def test_autoclip_ignores_nonfinite_norms_and_keeps_finite_state():
    from graddiag.clip import EMPTY

    policy = AutoClip(percentile=50, history=3)
    state = policy.init(1)
    _, state = policy.factors(None, np.float64(2.0), state, NP)
    _, state = policy.factors(None, np.float64(np.nan), state, NP)
    _, state = policy.factors(None, np.float64(np.inf), state, NP)
    assert state["count"] == 1.0 and np.count_nonzero(state["norms"] < EMPTY) == 1
    assert np.isfinite(state["norms"]).all()  # no NaN/Inf sentinels (enable_check_numerics-safe)
    scale, _ = policy.factors(None, np.float64(8.0), state, NP)  # history [2, 8]: median 5
    assert scale.global_coef == pytest.approx(5.0 / (8.0 + 1e-6), rel=EXACT)


def test_zclip_warmup_then_ema_by_hand():
    policy = ZClip(alpha=0.9, z_threshold=2.0, warmup=3)
    state = policy.init(1)
    for g in (1.0, 2.0, 3.0):  # warmup: no clipping; seeds mean 2, population var 2/3
        scale, state = policy.factors(None, np.float64(g), state, NP)
        assert scale.global_coef == 1.0
    assert state["mean"] == pytest.approx(2.0) and state["var"] == pytest.approx(2 / 3)
    std = math.sqrt(2 / 3)
    scale, state = policy.factors(None, np.float64(10.0), state, NP)  # z = 8/std >> 2
    target = 2.0 + 2.0 * std
    assert scale.global_coef == pytest.approx(target / (10.0 + 1e-6), rel=1e-12)
    d = target - 2.0  # the EMA is updated with the clipped norm
    assert state["mean"] == pytest.approx(2.0 + 0.1 * d, rel=1e-12)
    assert state["var"] == pytest.approx(0.9 * (2 / 3 + 0.1 * d * d), rel=1e-12)


def test_agc_unit_factors_by_hand():
    agc = AGC(clipping=0.1, eps=1e-3)
    s = agc.factors(np.array([1.0, 0.01, 5.0]), np.array([2.0, 2.0, 0.0]), NP)
    np.testing.assert_allclose(s, [0.2 / 1.0, 1.0, 1e-4 / 5.0], rtol=EXACT)


# three "layers": a (2, 3) weight and a bias in layer 0, a zero gradient in layer 1, a vector in 2
LAYERS = np.array([0, 0, 1, 2])


def _grads():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(2, 3)), rng.normal(size=2), np.zeros(3), rng.normal(size=4) * 5]


def _params():
    rng = np.random.default_rng(1)
    return [rng.normal(size=(2, 3)), rng.normal(size=2), rng.normal(size=3), rng.normal(size=4)]


def _clip(policy, grads=None, state=None):
    grads = _grads() if grads is None else grads
    view = Gradients(grads, _params(), LAYERS, 3)
    return clip_gradients(policy, view, policy.init(3) if state is None else state, NP)


def _norm(gs):
    return math.sqrt(sum(float(np.sum(g**2)) for g in gs))


def _layer_norms(gs):
    return np.array(
        [_norm([g for g, k in zip(gs, LAYERS, strict=True) if k == i]) for i in range(3)]
    )


def test_clip_coef_is_global_norm_after_over_before_for_every_policy():
    for policy in (
        GlobalNormClip(1.0),
        ValueClip(0.5),
        LayerNormClip(1.0),
        AutoClip(percentile=50, history=4),
        ZClip(warmup=1),
        AGC(clipping=0.1),
        chain(ValueClip(0.5), GlobalNormClip(1.0)),
    ):
        out = _clip(policy)
        assert out.clip_coef == pytest.approx(_norm(out.grads) / _norm(_grads()), rel=EXACT)


def test_value_clip_then_global_norm_remeasures_by_hand():
    out = _clip(chain(ValueClip(0.5), GlobalNormClip(1.0)))
    clamped = [np.clip(g, -0.5, 0.5) for g in _grads()]
    factor = min(1.0, 1.0 / (_norm(clamped) + 1e-6))
    for a, b in zip(out.grads, clamped, strict=True):
        np.testing.assert_allclose(a, b * factor, rtol=EXACT)
    assert out.clip_coef == pytest.approx(_norm(clamped) * factor / _norm(_grads()), rel=EXACT)
    assert out.layer_coef is None


def test_layer_clip_then_global_composes_and_records_layer_norm_ratios():
    out = _clip(chain(LayerNormClip(1.0), GlobalNormClip(1.0)))
    before = _layer_norms(_grads())
    lc = np.minimum(1.0, 1.0 / (before + 1e-6))
    after_layer = [g * lc[k] for g, k in zip(_grads(), LAYERS, strict=True)]
    gc = min(1.0, 1.0 / (_norm(after_layer) + 1e-6))
    for a, b in zip(out.grads, after_layer, strict=True):
        np.testing.assert_allclose(a, b * gc, rtol=EXACT)
    # per layer: norm after / before; the zero layer (1) is 1.0
    np.testing.assert_allclose(out.layer_coef, [lc[0] * gc, 1.0, lc[2] * gc], rtol=EXACT)
    ratio = _layer_norms(out.grads)[[0, 2]] / before[[0, 2]]
    np.testing.assert_allclose(out.layer_coef[[0, 2]], ratio, rtol=EXACT)


def test_norm_policy_before_elementwise_policy_is_applied_first():
    out = _clip(chain(GlobalNormClip(1.0), ValueClip(0.1)))
    factor = 1.0 / (_norm(_grads()) + 1e-6)
    for a, g in zip(out.grads, _grads(), strict=True):
        np.testing.assert_allclose(a, np.clip(g * factor, -0.1, 0.1), rtol=EXACT)


def test_agc_by_hand_on_rows():
    out = _clip(AGC(clipping=0.1))
    for a, g, p in zip(out.grads, _grads(), _params(), strict=True):
        axes = tuple(range(1, g.ndim)) or None
        gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=g.ndim > 1))
        pn = np.maximum(np.sqrt(np.sum(p**2, axis=axes, keepdims=g.ndim > 1)), 1e-3)
        np.testing.assert_allclose(
            a, np.where(gn > 0.1 * pn, g * 0.1 * pn / np.maximum(gn, 1e-6), g)
        )


def test_chain_of_chains_equals_the_flat_chain_and_nests_its_state():
    inner = chain(ValueClip(0.5), ZClip(warmup=1))
    nested = chain(inner, AutoClip(percentile=50, history=4))
    flat = chain(ValueClip(0.5), ZClip(warmup=1), AutoClip(percentile=50, history=4))
    s_nested, s_flat = nested.init(3), flat.init(3)
    assert isinstance(s_nested[0], tuple) and len(s_nested) == 2
    for k in range(4):
        grads = [g * (1 + 3 * k) for g in _grads()]
        a, b = _clip(nested, grads, s_nested), _clip(flat, grads, s_flat)
        s_nested, s_flat = a.state, b.state
        assert a.clip_coef == pytest.approx(b.clip_coef, rel=EXACT)
        for x, y in zip(a.grads, b.grads, strict=True):
            np.testing.assert_allclose(x, y, rtol=EXACT)
    assert nested.per_layer is False and chain(inner, LayerNormClip(1.0)).per_layer is True


def test_zero_and_nonfinite_gradients_give_one_and_nan():
    zero = _clip(GlobalNormClip(1.0), [np.zeros_like(g) for g in _grads()])
    assert zero.clip_coef == 1.0
    bad = _grads()
    bad[0][0, 0] = np.nan
    assert math.isnan(_clip(GlobalNormClip(1.0), bad).clip_coef)


def test_chain_of_global_scalings_by_hand_over_steps():
    """GlobalNormClip, AutoClip and ZClip chained: each sees the norm its predecessors left, the
    gradients are scaled by the product, and clip_coef is that product (norm after / before)."""
    policies = (GlobalNormClip(3.0), AutoClip(percentile=50, history=4), ZClip(warmup=1))
    policy = chain(*policies)
    state = policy.init(3)
    hand = [p.init(3) for p in policies]
    for k in range(5):
        grads = [g * (1 + 2 * k) for g in _grads()]
        out = _clip(policy, [g.copy() for g in grads], state)
        state = out.state
        norm, net = _norm(grads), 1.0
        for j, p in enumerate(policies):
            scale, hand[j] = p.factors(None, np.float64(norm), hand[j], NP)
            net *= float(scale.global_coef)
            norm *= float(scale.global_coef)
        for a, g in zip(out.grads, grads, strict=True):
            np.testing.assert_allclose(a, g * net, rtol=EXACT)
        assert out.clip_coef == pytest.approx(_norm(out.grads) / _norm(grads), rel=EXACT)
        assert out.clip_coef == pytest.approx(net, rel=EXACT)


def test_global_scalings_give_one_for_zero_and_nan_for_infinite_gradients():
    # AutoClip's history of zero norms gives a threshold (and factor) of 0: still 1.0 for zeros
    policy = AutoClip(percentile=50, history=4)
    state = policy.init(3)
    for _ in range(3):
        out = _clip(policy, [np.zeros_like(g) for g in _grads()], state)
        state = out.state
        assert out.clip_coef == 1.0
    inf = _grads()
    inf[3][1] = np.inf
    with np.errstate(invalid="ignore"):  # inf * 0, as in the clipped gradient itself
        assert math.isnan(_clip(GlobalNormClip(1.0), inf).clip_coef)
        assert math.isnan(_clip(chain(GlobalNormClip(1.0), ZClip(warmup=1)), inf).clip_coef)


def test_global_policy_returning_layer_factors_is_an_error():
    class Confused(GlobalNormClip):  # per_layer is False, yet per-layer factors come back
        def factors(self, layer_norms, global_norm, state, ops):
            scale, state = super().factors(layer_norms, global_norm, state, ops)
            scale.layer_coef = ops.full(3, 0.5)
            return scale, state

    with pytest.raises(ValueError, match="per_layer"):
        _clip(Confused(1.0))


def test_as_chain_normalizes_the_clip_argument():
    assert as_chain(0.5).policies[0].max_norm == 0.5
    assert as_chain(None) is None
    c = chain(GlobalNormClip(1.0))
    assert as_chain(c) is c
    assert as_chain([ValueClip(1.0), AGC()]).policies[1].clipping == 0.01


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GlobalNormClip(0), "max_norm.*0"),
        (lambda: GlobalNormClip(float("inf")), "max_norm.*inf"),
        (lambda: LayerNormClip("1"), "max_norm.*'1'"),
        (lambda: ValueClip(-0.1), "clip_value.*-0.1"),
        (lambda: AutoClip(percentile=0), "percentile.*0"),
        (lambda: AutoClip(percentile=101), "percentile.*101"),
        (lambda: AutoClip(history=0), "history.*0"),
        (lambda: ZClip(alpha=1.0), "alpha.*1.0"),
        (lambda: ZClip(warmup=0), "warmup.*0"),
        (lambda: AGC(clipping=-1), "clipping.*-1"),
        (lambda: chain(GlobalNormClip(1.0), "x"), "clipping policies.*'x'"),
        (lambda: as_chain(True), "clip.*True"),
    ],
)
def test_bad_clipping_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------ detectors
INFO = ModelInfo(layers=("in", "mid", "out"))


def run(stream, **detectors):
    d = Diagnoser(INFO, detectors or None)
    for s in stream:
        d.update(s)
    d.finalize()
    return d.findings


def test_healthy_noisy_stream_has_no_findings():
    rng = np.random.default_rng(0)
    stream = [stats(t, np.exp(rng.normal(0, 0.3, 3)) * [0.5, 1.0, 2.0]) for t in range(500)]
    assert run(stream) == []


def test_spike_z_score_by_hand():
    det = SpikeDetector(z_threshold=3.0, min_ratio=2.0, window=10)
    det.start(INFO)
    base = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0]
    for t, g in enumerate(base):
        assert det.update(stats(t, [g, g, g])) == []
    (f,) = det.update(stats(6, [1.0, 50.0, 1.0]))
    assert f.layer == "mid" and f.step == 6
    # recompute the EMA of log-norms by hand (the global norm is sqrt(3) x the layer norm)
    xs = [math.log(math.sqrt(3) * g) for g in base]
    mean, var = xs[0], 0.0
    for n, x in enumerate(xs[1:], start=1):
        a = 1.0 / (n + 1)
        d = x - mean
        mean += a * d
        var = (1 - a) * (var + a * d * d)
    # the spread is blended with the prior (PRIOR_SIGMA, worth PRIOR_STEPS steps)
    n = len(base)
    var = (n * var + PRIOR_STEPS * PRIOR_SIGMA**2) / (n + PRIOR_STEPS)
    z = (math.log(math.sqrt(1 + 2500 + 1)) - mean) / math.sqrt(var)
    assert f.value == pytest.approx(z, rel=1e-9)
    assert "'mid'" in f.message and "silent" not in f.message


def test_vanishing_needs_absolute_and_relative_smallness():
    tiny_everywhere = [stats(t, [1e-9, 1e-9, 1e-9]) for t in range(20)]
    assert (
        run(tiny_everywhere) == []
    )  # small but not relative to the rest: converged, not vanishing
    stream = [stats(t, [1e-12, 1e-3, 1.0]) for t in range(20)]
    (f,) = run(stream)
    assert (f.kind, f.layer, f.step) == ("vanishing", "in", 9)


def test_nonfinite_is_edge_triggered_and_names_backward_first():
    info = ModelInfo(layers=("in", "mid", "out"), backward_order=("out", "mid", "in"))
    d = Diagnoser(info)
    for t in range(6):
        nf = [1, 1, 0] if t in (2, 3) else [0, 0, 0]
        d.update(stats(t, [1.0, 1.0, 1.0], nonfinite=nf))
    (f,) = d.findings
    assert (f.kind, f.step, f.layer, f.severity) == ("nonfinite", 2, "mid", "error")


def test_amp_nonfinite_reports_only_persistent_overflow():
    d = Diagnoser(INFO, {"nonfinite": {"amp": True, "amp_patience": 3}})
    for t in range(10):
        d.update(stats(t, [1.0, 1.0, 1.0], nonfinite=[1, 0, 0] if t in (1, 4, 5, 6) else None))
    (f,) = d.findings
    assert (f.step, f.kind) == (6, "nonfinite")


def test_accumulation_reads_grad_reset():
    stream = [stats(0, [1, 1, 1])] + [stats(t, [1, 1, 1], grad_reset=t != 3) for t in range(1, 6)]
    (f,) = run(stream)
    assert (f.kind, f.step, f.layer) == ("accumulation", 3, None)


def test_build_detectors_rejects_bad_specs():
    with pytest.raises(ValueError, match="Unknown detector.*'bogus'"):
        build_detectors({"bogus": {}})
    with pytest.raises(ValueError, match="detectors\\['spike'\\].*3"):
        build_detectors({"spike": 3})
    with pytest.raises(ValueError, match="Bad settings for detector 'frozen'"):
        build_detectors({"frozen": {"nope": 1}})
    with pytest.raises(ValueError, match="patience.*0"):
        build_detectors({"detached": {"patience": 0}})
    assert [d.name for d in build_detectors({"spike": False})].count("spike") == 0


def test_monitor_core_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="history.*-1"):
        MonitorCore(INFO, history=-1)
    with pytest.raises(ValueError, match="logdir.*42"):
        MonitorCore(INFO, logdir=42)


# ------------------------------------------------------------------------ per-layer aggregation
def test_aggregate_layers_by_hand():
    from graddiag.stats import aggregate_layers

    sumsq = np.array([9.0, 16.0, 1.0, np.nan, 4.0])
    has = np.array([True, True, False, True, True])
    layer_of = np.array([0, 0, 1, 2, 2])
    norms, layer_has, bad, g = aggregate_layers(sumsq, has, layer_of, 4)
    np.testing.assert_allclose(norms[:2], [5.0, 0.0])
    assert np.isnan(norms[2]) and norms[3] == 0.0
    assert layer_has.tolist() == [True, False, True, False]
    assert bad.tolist() == [0, 0, 1, 0]
    assert math.isnan(g)


def test_aggregate_detail_by_hand():
    from graddiag.stats import aggregate_detail

    layer_of = np.array([0, 0, 1])
    has = np.array([True, True, False])
    out = aggregate_detail(
        layer_of,
        2,
        has,
        numel=np.array([4.0, 2.0, 3.0]),
        grad_max=np.array([0.5, 2.0, 9.0]),
        nonzero=np.array([3.0, 0.0, 3.0]),
        param_sumsq=np.array([1.0, 3.0, 4.0]),
        nan=np.array([0.0, 1.0, 5.0]),
        inf=np.zeros(3),
    )
    assert out["grad_max"].tolist() == [2.0, 0.0]
    assert out["zero_frac"].tolist() == [3 / 6, 0.0]
    np.testing.assert_allclose(out["param_norm"], [2.0, 2.0])
    assert out["nan_count"].tolist() == [1.0, 0.0]


def test_summary_groups_by_kind_worst_first():
    info = ModelInfo(layers=tuple(f"l{i}" for i in range(8)))
    core = MonitorCore(info)
    for t in range(12):
        nf = np.zeros(8)
        nf[7] = 1 if t == 11 else 0
        core.process(stats(t, [1e-12] * 7 + [1.0], nonfinite=nf))
    text = core.summary(per_kind=3)
    lines = text.splitlines()
    assert lines[0] == "graddiag: 8 finding(s)"
    assert lines[1].startswith("  nonfinite (1, error), first at step 11")  # errors first
    vanishing = lines.index("  vanishing (7, warning), first at step 9:")
    assert lines[vanishing + 4] == "    ... and 4 more"
    assert sum(line.startswith("    -> Use ReLU/GELU") for line in lines) == 1
    assert core.summary("error").count("[warning]") == 0
