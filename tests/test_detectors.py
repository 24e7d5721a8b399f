"""Detectors on synthetic `StepStats` streams: healthy streams stay silent; each broken stream gives
the right kind, layer and step, once per episode."""

import math

import numpy as np
import pytest

from graddiag.detectors import (
    DETECTORS,
    DetachedDetector,
    Diagnoser,
    ExplodingDetector,
    SpikeDetector,
    VanishingDetector,
    build_detectors,
)
from graddiag.stats import ModelInfo, StepStats


def stats(step, norms, has=None, **kw):
    norms = np.asarray(norms, dtype=float)
    has = np.ones(len(norms), bool) if has is None else np.asarray(has, bool)
    return StepStats(
        step=step,
        grad_norm=np.where(has, norms, 0.0),
        has_grad=has,
        nonfinite=np.zeros(len(norms)),
        global_norm=float(np.sqrt(np.sum(np.where(has, norms, 0.0) ** 2))),
        **kw,
    )


def diagnose(info, stream, detectors=None):
    d = Diagnoser(info, detectors)
    for s in stream:
        d.update(s)
    d.finalize()
    return d.findings


def noisy(rng, scales, steps, start=0):
    """A healthy stream: log-normal noise around fixed per-layer scales."""
    scales = np.asarray(scales, float)
    return [
        stats(start + t, scales * np.exp(rng.normal(0, 0.2, len(scales)))) for t in range(steps)
    ]


def keys(findings):
    return [(f.kind, f.layer, f.step) for f in findings]


# ------------------------------------------------------------------------------ vanishing
def test_vanishing_has_no_absolute_floor():
    """A layer at 6e-6 of the largest for 100 steps: one finding at step 9 (the old 1e-7 absolute
    floor hid it, since its norm is 6e-6)."""
    info = ModelInfo(layers=("in", "mid", "out"))
    rng = np.random.default_rng(0)
    stream = noisy(rng, [6e-6, 0.5, 1.0], 100)
    found = diagnose(info, stream)
    assert keys(found) == [("vanishing", "in", 9)]
    assert found[0].value == pytest.approx(6e-6, rel=0.6)
    assert "Still present at the last step, 99" in found[0].message


def test_vanishing_follows_the_depth_profile_of_a_sigmoid_mlp():
    """10 layers shrinking 5x per layer toward the input: every layer below 1e-4 of the top, and
    those below 1e-3 at the bottom of the steady decay, are reported -- not only the ones under an
    absolute floor."""
    layers = tuple(f"fc{i}" for i in range(10))
    info = ModelInfo(
        layers=layers, param_counts=(256,) * 10, backward_order=tuple(reversed(layers))
    )
    scales = 5.0 ** -np.arange(9, -1, -1)  # fc9 = 1, fc4 = 3.2e-4, fc0 = 5^-9 = 5.1e-7
    rng = np.random.default_rng(1)
    found = diagnose(info, noisy(rng, scales, 30))
    reported = {f.layer for f in found if f.kind == "vanishing"}
    expected = {layers[i] for i in range(10) if scales[i] < 1e-3}  # fc0..fc4
    assert reported == expected
    assert {f.step for f in found} == {9}
    assert "shrinking about 4.9x per layer" in found[0].message


def test_vanishing_ignores_small_layers_and_a_uniformly_small_model():
    # a scalar gain (1 parameter) has a tiny norm but an ordinary per-element gradient
    info = ModelInfo(layers=("gain", "big"), param_counts=(1, 1_000_000))
    rng = np.random.default_rng(2)
    assert diagnose(info, noisy(rng, [5e-5, 1.0], 50)) == []
    # everything small alike: converged or scaled, not vanishing
    info = ModelInfo(layers=("a", "b", "c"))
    assert diagnose(info, noisy(rng, [1e-9, 2e-9, 1e-9], 50)) == []


def test_vanishing_is_one_finding_per_episode_with_its_duration():
    info = ModelInfo(layers=("in", "out"))
    rng = np.random.default_rng(3)
    stream = noisy(rng, [1e-6, 1.0], 30)
    # flicker: back to normal on every 4th step for a while -- still the same episode
    stream += [stats(30 + t, [1e-6 if t % 4 else 0.5, 1.0]) for t in range(20)]
    stream += noisy(rng, [0.5, 1.0], 30, start=50)
    (f,) = diagnose(info, stream)
    assert (f.kind, f.layer, f.step) == ("vanishing", "in", 9)
    assert "Lasted 41 steps (steps 9-49)" in f.message


# ------------------------------------------------------------------------------ no / zero gradients
MOE = ModelInfo(
    layers=("router", "expert0", "expert1", "head"),
    backward_order=("head", "expert0", "expert1", "router"),
)


def test_moe_expert_without_tokens_is_starved_not_detached():
    """expert1 gets no tokens in its first 3 steps and on half of the later ones."""
    rng = np.random.default_rng(4)
    stream = []
    for t in range(60):
        got = t >= 3 and t % 2 == 0
        stream.append(stats(t, rng.lognormal(0, 0.2, 4), has=[True, True, got, True]))
    found = diagnose(MOE, stream)
    assert keys(found) == [("starved", "expert1", 19)]
    (f,) = found
    assert f.severity == "info" and f.value == pytest.approx(12 / 20)
    assert "8 of the last 20 steps" in f.message


def test_detached_dead_and_their_cut_point():
    """expert1 never gets a gradient (detached: the finding names 'head', the nearest layer toward
    the loss in backward order that still gets one); expert0's exists but is exactly zero (dead)."""
    stream = [stats(t, [1.0, 0.0, 1.0, 1.0], has=[True, True, False, True]) for t in range(25)]
    found = diagnose(MOE, stream)
    assert sorted(keys(found)) == [("dead", "expert0", 19), ("detached", "expert1", 19)]
    det = next(f for f in found if f.kind == "detached")
    assert det.severity == "warning" and "stops at 'expert0'" not in det.message
    assert "'head'" in det.message


def test_cut_point_in_forward_order_when_the_layer_is_not_in_backward_order():
    info = ModelInfo(
        layers=("backbone.0", "backbone.1", "head"), backward_order=("head",)
    )  # the backbone never produced a gradient, so the adapter never saw it in backward order
    stream = [stats(t, [0, 0, 1.0], has=[False, False, True]) for t in range(20)]
    found = diagnose(info, stream)
    assert keys(found) == [("detached", "backbone.0", 19), ("detached", "backbone.1", 19)]
    assert all("stops at 'head'" in f.message for f in found)


def test_short_run_is_judged_at_the_end():
    stream = [stats(t, [1.0, 1.0, 0.0, 1.0], has=[1, 1, 0, 1]) for t in range(8)]
    assert keys(diagnose(MOE, stream)) == [("detached", "expert1", 7)]


def test_layer_frozen_mid_run_is_not_a_warning():
    """requires_grad_(False) at step 30 under zero_grad(set_to_none=False): the gradient stays an
    all-zero tensor. Unknown trainability: a `frozen` info naming both causes; reported trainable:
    a dead warning; reported frozen: a frozen info."""
    info = ModelInfo(layers=("a", "b"))

    def stream(trainable=None):
        out = []
        for t in range(60):
            tr = None if trainable is None else np.array([trainable if t >= 30 else True, True])
            out.append(stats(t, [0.0 if t >= 30 else 1.0, 1.0], trainable=tr))
        return out

    (f,) = diagnose(info, stream())
    assert (f.kind, f.layer, f.severity, f.step) == ("frozen", "a", "info", 48)
    assert "until step 29" in f.message and "dead" not in f.suggestion.split(".")[0]
    (f,) = diagnose(info, stream(trainable=True))
    assert (f.kind, f.severity) == ("dead", "warning")
    (f,) = diagnose(info, stream(trainable=False))
    assert (f.kind, f.severity) == ("frozen", "info") and "was frozen then" in f.message


def test_all_zero_gradient_every_other_step():
    info = ModelInfo(layers=("a", "b"))
    stream = [stats(t, [1.0, 1.0] if t % 2 else [0.0, 0.0]) for t in range(40)]
    found = diagnose(info, stream)
    assert keys(found) == [("zero_gradient", None, 19)]
    assert found[0].value == pytest.approx(0.5)
    assert "10 of the last 20 steps" in found[0].message


def test_underflowed_norm_is_not_dead():
    """A norm that underflowed to 0 while `zero_frac` says the gradient is not all zeros."""
    info = ModelInfo(layers=("a", "b"))
    stream = [stats(t, [0.0, 1.0], zero_frac=np.array([0.1, 0.0])) for t in range(30)]
    found = diagnose(info, stream)
    assert keys(found) == [("vanishing", "a", 9)]


# ------------------------------------------------------------------------------ exploding / spikes
def test_large_but_steady_norm_is_not_exploding():
    """A sum-reduced loss (VAE) gives norms ~1e5 from step 0: the run's own scale."""
    info = ModelInfo(layers=("enc", "dec"))
    rng = np.random.default_rng(5)
    assert diagnose(info, noisy(rng, [1e5, 3e5], 200)) == []


def test_persistent_explosion_is_one_finding_with_its_duration():
    info = ModelInfo(layers=("a", "b"))
    rng = np.random.default_rng(6)
    stream = noisy(rng, [1.0, 1.0], 20) + noisy(rng, [1e3, 2e3], 50, start=20)
    stream += noisy(rng, [1.0, 1.0], 30, start=70)
    found = [f for f in diagnose(info, stream, {"spike": False}) if f.kind == "exploding"]
    (f,) = found
    assert (f.step, f.layer) == (20, "b")
    assert "Lasted 50 steps (steps 20-69)" in f.message


def test_float32_overflow_risk_is_reported_at_once():
    info = ModelInfo(layers=("a",))
    (f,) = diagnose(info, [stats(0, [1e20])])
    assert (f.kind, f.step) == ("exploding", 0) and "overflow" in f.message


def test_divergence_at_step_1_from_the_norm_and_the_loss():
    """LR 50x too high: norm 0.17 -> 49 and loss 9.8 -> 106 at step 1."""
    info = ModelInfo(layers=("embed", "lstm", "head"))
    rng = np.random.default_rng(7)
    stream = [stats(0, [0.05, 0.1, 0.13], loss=9.8)]
    for t in range(1, 40):
        norms = np.array([15.0, 30.0, 35.0]) * np.exp(rng.normal(0, 0.3, 3))
        stream.append(stats(t, norms, loss=float(106 * np.exp(rng.normal(0, 0.2)))))
    found = diagnose(info, stream)
    got = {(f.kind, f.step) for f in found}
    assert ("spike", 1) in got and ("divergence", 1) in got and ("exploding", 1) in got
    assert len(found) == 3  # one finding per episode, not one per step
    div = next(f for f in found if f.kind == "divergence")
    assert div.severity == "error" and "9.8" in div.message


def test_healthy_loss_curve_and_update_ratio_are_silent():
    info = ModelInfo(layers=("a", "b"))
    rng = np.random.default_rng(8)
    stream = []
    for t in range(200):
        s = stats(t, np.exp(rng.normal(0, 0.3, 2)), loss=2.3 * math.exp(-t / 80) + 0.1)
        if t % 10 == 9:
            s.update_ratio = np.array([2e-3, 1e-3])
        stream.append(s)
    assert diagnose(info, stream) == []


def test_sustained_large_update_ratio_means_the_learning_rate_is_too_high():
    info = ModelInfo(layers=("a", "b", "zero_init"))
    stream = []
    for t in range(10):
        s = stats(t, [1.0, 1.0, 1.0])
        s.update_ratio = np.array([0.49, 0.3, np.nan]) if t >= 2 else np.array([2e-3, 2e-3, 5.0])
        stream.append(s)
    (f,) = diagnose(info, stream)
    assert (f.kind, f.step, f.layer) == ("large_update", 2, None)
    assert f.value == pytest.approx(0.395)
    assert "learning rate is too high" in f.message


def test_spike_from_step_1_without_warmup():
    det = SpikeDetector()
    det.start(ModelInfo(layers=("a",)))
    assert det.update(stats(0, [0.17])) == []
    (f,) = det.update(stats(1, [49.0]))
    assert f.step == 1 and "288" in f.message or "288.2x" in f.message


def test_spike_names_the_layer_that_jumped_not_a_stale_one():
    """Layer '0' was silent (zero) and jumps to 40; layer '1' moves 1.1x."""
    info = ModelInfo(layers=("0", "1"))
    rng = np.random.default_rng(9)
    stream = [stats(t, [0.0, 1.0 * math.exp(rng.normal(0, 0.05))]) for t in range(30)]
    stream.append(stats(30, [40.0, 1.1]))
    found = [f for f in diagnose(info, stream, {"detached": False}) if f.kind == "spike"]
    (f,) = found
    assert (f.step, f.layer) == (30, "0")
    assert "silent before" in f.message


def test_advice_fits_a_run_that_already_clips():
    info = ModelInfo(layers=("a",))
    stream = [stats(t, [1.0], clip_coef=1.0) for t in range(10)]
    stream += [stats(10 + t, [500.0], clip_coef=0.002) for t in range(5)]
    found = diagnose(info, stream, {"clipped": False})
    assert {f.kind for f in found} == {"spike", "exploding"}
    for f in found:
        assert "learning rate" in f.suggestion and "Clip gradients" not in f.suggestion
        assert "enable adaptive clipping" not in f.suggestion


# ------------------------------------------------------------------------------ clipping
def test_clipping_that_never_fired_reports_nothing():
    info = ModelInfo(layers=("a",))
    assert diagnose(info, [stats(t, [1.0], clip_coef=1.0) for t in range(5)]) == []


def test_persistent_clipping_is_reported_while_it_happens():
    info = ModelInfo(layers=("a",))
    stream = [stats(t, [100.0], clip_coef=0.01) for t in range(30)]
    stream += [stats(30 + t, [0.5], clip_coef=1.0) for t in range(30)]
    (f,) = diagnose(info, stream)
    assert (f.kind, f.step, f.severity) == ("clipped", 19, "warning")
    assert "Lasted" in f.message


def test_moderate_steady_clipping_is_info_and_rare_clipping_a_summary():
    info = ModelInfo(layers=("a",))
    (f,) = diagnose(info, [stats(t, [2.0], clip_coef=0.5) for t in range(40)])
    assert (f.kind, f.severity) == ("clipped", "info")
    rare = [stats(t, [1.0], clip_coef=0.5 if t == 7 else 1.0) for t in range(40)]
    (f,) = diagnose(info, rare)
    assert (f.kind, f.severity, f.step, f.value) == ("clipped", "info", 39, 1 / 40)


def test_per_layer_clip_coefficients_count():
    info = ModelInfo(layers=("a", "b"))
    stream = [
        stats(t, [1.0, 1.0], clip_coef=1.0, layer_clip_coef=np.array([1.0, 0.05]))
        for t in range(25)
    ]
    (f,) = diagnose(info, stream)
    assert (f.kind, f.severity) == ("clipped", "warning")


# ------------------------------------------------------------------------------ API
def test_state_dict_round_trip_continues_the_same_episodes():
    info = MOE
    rng = np.random.default_rng(10)
    stream = []
    for t in range(80):
        norms = rng.lognormal(0, 0.2, 4) * [1, 1, 1e-6, 1]
        if 40 <= t < 50:
            norms = norms * 1e3
        s = stats(t, norms, has=[True, t % 3 != 0, True, True], loss=1.0, clip_coef=0.5)
        stream.append(s)
    whole = diagnose(info, stream)
    assert {f.kind for f in whole} >= {"vanishing", "starved", "exploding", "spike", "clipped"}
    first = Diagnoser(info)
    for s in stream[:45]:
        first.update(s)
    second = Diagnoser(info)
    second.findings = list(first.findings)
    for a, b in zip(first.detectors, second.detectors, strict=True):
        b.load_state_dict(a.state_dict())
    for s in stream[45:]:
        second.update(s)
    second.finalize()
    assert second.findings == whole


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_config_rebuilds_the_same_detector(name):
    det = DETECTORS[name]()
    assert type(DETECTORS[name](**det.config())) is type(det)
    assert DETECTORS[name](**det.config()).config() == det.config()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VanishingDetector(rel_threshold=2.0), "rel_threshold.*2.0"),
        (lambda: ExplodingDetector(factor=0.5), "factor.*0.5"),
        (lambda: DetachedDetector(rate=1.5), "rate.*1.5"),
        (lambda: DetachedDetector(rate=0.5, starved_rate=0.6), "starved_rate.*0.6"),
        (lambda: build_detectors({"divergence": {"patience": 0}}), "patience.*0"),
        (lambda: build_detectors({"large_update": {"max_ratio": -1}}), "max_ratio.*-1"),
    ],
)
def test_bad_settings_name_the_argument_and_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_settings_of_earlier_versions_are_ignored_with_a_warning():
    """Logs written by earlier versions carry e.g. exploding.threshold: they still analyze."""
    with pytest.warns(UserWarning, match="'exploding'.*threshold"):
        dets = build_detectors({"exploding": {"threshold": 1e3}})
    assert any(isinstance(d, ExplodingDetector) for d in dets)


@pytest.mark.parametrize(
    "ranks, expected",
    [
        ((1,), "first appeared on rank 1 (local gradients before they were reduced"),
        ((0, 1), "first appeared on ranks 0, 1 (local"),
        ((), "no rank's local gradients held NaN/Inf (their sum across ranks overflowed)"),
        (None, None),
    ],
)
def test_nonfinite_finding_names_the_ranks_of_a_distributed_run(ranks, expected):
    info = ModelInfo(layers=("a", "b"), param_counts=(4, 4))
    s = stats(3, [1.0, math.nan], nonfinite_ranks=ranks)
    s.nonfinite = np.array([0.0, 1.0])
    (finding,) = [f for f in diagnose(info, [s]) if f.kind == "nonfinite"]
    assert finding.layer == "b"
    if expected is None:
        assert "rank" not in finding.message
    else:
        assert expected in finding.message
