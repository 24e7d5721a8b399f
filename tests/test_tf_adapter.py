"""graddiag.tf.GradientMonitor against TensorFlow's own reference computations."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from graddiag import clip as cliplib  # noqa: E402
from graddiag.monitor import NonFiniteGradientError  # noqa: E402
from graddiag.tf import GradientMonitor, TFOps  # noqa: E402

#: float32 sums of squares of a few hundred elements vs. tf.norm: rounding only.
REL = 1e-5
#: our clip coefficient is max_norm / (norm + NORM_EPS), TF's is max_norm / max(norm, max_norm).
CLIP_REL = 1e-5
NO_SPIKE = {"spike": False}


def mlp(seed: int = 0, hidden: int = 8, depth: int = 2, activation: str = "tanh"):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,))]
    layers += [
        keras.layers.Dense(hidden, activation=activation, name=f"fc{i}") for i in range(depth)
    ]
    layers.append(keras.layers.Dense(1, name="head"))
    return keras.Sequential(layers, name="net")


def batch(seed: int = 1, n: int = 16):
    rng = np.random.default_rng(seed)
    return (
        tf.constant(rng.normal(size=(n, 4)), tf.float32),
        tf.constant(rng.normal(size=(n, 1)), tf.float32),
    )


def grads_of(model, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    return tape.gradient(loss, model.trainable_variables)


def layer_norms_ref(model, grads):
    """Per-layer norms from tf.norm of each gradient, grouped by owning layer."""
    out = {}
    for v, g in zip(model.trainable_variables, grads, strict=True):
        layer = v.path.split("/")[-2]
        out[layer] = out.get(layer, 0.0) + float(tf.norm(tf.convert_to_tensor(g))) ** 2
    return {k: math.sqrt(s) for k, s in out.items()}


def test_layer_norms_equal_tf_norm_of_each_gradient():
    model = mlp()
    x, y = batch()
    grads = grads_of(model, x, y)
    mon = GradientMonitor(model, every=1, detectors=NO_SPIKE)
    mon.step(grads, model.trainable_variables)
    s = mon.history[-1]
    ref = layer_norms_ref(model, grads)
    assert mon.info.layers == ("fc0", "fc1", "head")
    np.testing.assert_allclose(s.grad_norm, [ref[n] for n in mon.info.layers], rtol=REL)
    for v, g in zip(model.trainable_variables, grads, strict=True):
        name = v.path.split("/", 1)[1].replace("/", ".")
        assert mon.last_variable_norms[name] == pytest.approx(float(tf.norm(g)), rel=REL)
    assert s.global_norm == pytest.approx(float(tf.linalg.global_norm(grads)), rel=REL)
    assert s.has_grad.all() and not s.nonfinite.any()


def test_detail_statistics_every_detail_every_steps_match_references():
    model = mlp(activation="relu")
    x, y = batch()
    grads = grads_of(model, x, y)
    mon = GradientMonitor(model, every=1, detail_every=2, detectors=NO_SPIKE)
    for _ in range(2):
        mon.step(grads, model.trainable_variables)
    first, second = mon.history
    assert first.grad_max is None  # not a detail step
    by_layer = {}
    for v, g in zip(model.trainable_variables, grads, strict=True):
        by_layer.setdefault(v.path.split("/")[-2], []).append((v, g))
    for i, name in enumerate(mon.info.layers):
        gs = [tf.reshape(g, [-1]) for _, g in by_layer[name]]
        flat = tf.concat(gs, 0)
        assert second.grad_max[i] == pytest.approx(float(tf.reduce_max(tf.abs(flat))), rel=REL)
        assert second.zero_frac[i] == pytest.approx(
            float(tf.reduce_mean(tf.cast(flat == 0, tf.float32)))
        )
        pn = tf.linalg.global_norm([v for v, _ in by_layer[name]])
        assert second.param_norm[i] == pytest.approx(float(pn), rel=REL)
    assert second.nan_count is None


def test_global_norm_clip_equals_tf_clip_by_global_norm():
    model = mlp()
    x, y = batch()
    grads = grads_of(model, x, y)
    norm = float(tf.linalg.global_norm(grads))
    mon = GradientMonitor(model, every=1, clip=cliplib.GlobalNormClip(norm / 4), detectors=NO_SPIKE)
    ours = mon.step(grads, model.trainable_variables)
    ref, ref_norm = tf.clip_by_global_norm(grads, norm / 4)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=CLIP_REL, atol=1e-9)
    assert mon.history[-1].clip_coef == pytest.approx(0.25, rel=CLIP_REL)
    assert mon.history[-1].global_norm == pytest.approx(float(ref_norm), rel=REL)


def test_eager_and_tf_function_give_same_stats_and_bounded_traces():
    x, y = batch()
    runs = []
    for compiled in (False, True):
        model = mlp()
        opt = keras.optimizers.SGD(0.05)
        mon = GradientMonitor(
            model,
            every=4,
            clip=[cliplib.ZClip(warmup=3), cliplib.GlobalNormClip(2.0)],
            detectors=NO_SPIKE,
        )

        def train_step(x, y, model=model, opt=opt, mon=mon):
            with mon.tape() as tape:
                loss = tf.reduce_mean((model(x) - y) ** 2)
            g = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(g, model.trainable_variables, strict=True))
            return loss

        fn = tf.function(train_step) if compiled else train_step
        for _ in range(12):
            fn(x, y)
        if compiled:
            # one trace plus TF's retrace after the optimizer created its variables, never per step
            assert fn.experimental_get_tracing_count() <= 2
        mon.close()
        runs.append(mon.history)
    eager, graph = runs
    assert [s.step for s in eager] == [s.step for s in graph] == list(range(12))
    for a, b in zip(eager, graph, strict=True):
        np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=REL)
        assert a.clip_coef == pytest.approx(b.clip_coef, rel=REL)


def test_host_reads_only_on_log_steps():
    model = mlp()
    x, y = batch()
    mon = GradientMonitor(model, every=5, detectors=NO_SPIKE)
    calls = []
    real = mon._process
    mon._process = lambda *a, **k: calls.append(a[0]) or real(*a, **k)

    @tf.function
    def train_step(x, y):
        with mon.tape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    for _ in range(12):
        train_step(x, y)
    assert calls == [5, 10]
    assert [s.step for s in mon.history] == list(range(10))
    mon.close()
    assert [s.step for s in mon.history] == list(range(12))


@pytest.mark.parametrize("nonfinite", ["warn", "skip"])
def test_eager_log_steps_are_diagnosed_on_the_worker_under_warn_only(monkeypatch, nonfinite):
    """A log step read back by an eager step hands its rows to the host path's background worker
    under "warn" (the step goes on); "skip"/"raise" diagnose them at once, off the worker. (Inside
    a compiled step the read-back's `tf.py_function` diagnoses them itself: measured faster.)"""
    import threading

    from graddiag.host import HostPath

    threads = []
    real = HostPath._ingest_block

    def ingest(self, steps):  # one thread name per step ingested
        threads.extend([threading.current_thread().name] * len(steps))
        return real(self, steps)

    monkeypatch.setattr(HostPath, "_ingest_block", ingest)
    model = mlp()
    x, y = batch()
    mon = GradientMonitor(model, every=5, detectors=NO_SPIKE, nonfinite=nonfinite)
    for _ in range(10):
        with mon.tape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        tape.gradient(loss, model.trainable_variables)
    assert [s.step for s in mon.history] == list(range(10))
    on_worker = [name == "graddiag-host" for name in threads]
    assert on_worker == [nonfinite == "warn"] * 10
    mon.close()


def test_rare_branches_are_function_calls_not_lowered_into_the_step(tmp_path):
    """The detail, histogram and log-step read-back work is one `If` function call in the
    traced step (an ordinary step schedules none of their ops, and pays one call), and each
    still runs on its steps."""
    model = mlp()
    x, y = batch()
    mon = GradientMonitor(model, tmp_path, every=4, detail_every=3, hist_every=5)

    @tf.function
    def train_step(x, y):
        with mon.tape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    for _ in range(6):
        train_step(x, y)
    graph = train_step.get_concrete_function(x, y).graph
    conds = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert len(conds) == 1  # detail, histogram and read-back in one call
    assert not any(op.get_attr("_lower_using_switch_merge") for op in conds)
    # inside it each part is a call of its own: lowered there, a log step would schedule the
    # other parts' ops dead (+0.6 ms a step on an 8x1024 MLP)
    rare = graph._get_function(conds[0].get_attr("then_branch").name).graph
    inner = [op for op in rare.get_operations() if op.type in ("If", "StatelessIf")]
    assert len(inner) == 3  # detail, histogram, read-back
    assert not any(op.get_attr("_lower_using_switch_merge") for op in inner)
    mon.close()
    hist = mon.history
    assert [s.step for s in hist] == list(range(6))
    detail = [s.step for s in hist if s.grad_max is not None]
    assert detail == [2, 5]  # (step + 1) % detail_every == 0
    from tensorboard.backend.event_processing import event_accumulator

    ea = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    ea.Reload()
    assert [e.step for e in ea.Histograms("graddiag/hist/fc1")] == [0, 5]  # step % hist_every


@pytest.mark.parametrize("read_back", ["callback", "poll"])
def test_rare_work_pattern_matches_each_period(read_back, tmp_path):
    """The one lookup that decides the rare work (`_due` with a table) agrees with the log,
    detail and histogram predicates over several periods, also for periods too long to tabulate."""
    model = mlp()
    rng = np.random.default_rng(3)
    for every, detail_every, hist_every in [(10, 100, 100), (4, 3, 5), (1, 7, 0), (7, 0, 9)] + [
        tuple(int(k) for k in rng.integers(1, 40, size=3)) for _ in range(6)
    ]:
        mon = GradientMonitor(
            model,
            tmp_path / f"{every}-{detail_every}-{hist_every}",
            every=every,
            detail_every=detail_every,
            hist_every=hist_every,
            read_back=read_back,
        )
        mon._resolve()
        log = read_back == "callback"
        every, detail_every, hist_every = mon.every, mon.detail_every, mon.hist_every
        period = math.lcm(every, detail_every or 1, hist_every or 1)
        steps = tf.range(2 * period + 5, dtype=tf.int64)
        got = mon._due(steps, log=log, detail=True, hist=True, table=True).numpy()
        s = steps.numpy()
        want = np.zeros(len(s), bool)
        if log:
            want |= (s + 1) % every == 0
        if detail_every:
            want |= (s + 1) % detail_every == 0
        if hist_every:
            want |= s % hist_every == 0
        np.testing.assert_array_equal(got, want, err_msg=str((every, detail_every, hist_every)))
        plain = mon._due(steps, log=log, detail=True, hist=True, table=False).numpy()
        np.testing.assert_array_equal(plain, want)
        mon.close()


def test_poll_mode_reads_after_the_compiled_step():
    model = mlp()
    x, y = batch()
    mon = GradientMonitor(model, every=3, read_back="poll", detectors=NO_SPIKE)

    @tf.function(jit_compile=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        return mon.step(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    for i in range(7):
        train_step(x, y)
        mon.poll(i + 1)
    assert [s.step for s in mon.history] == list(range(6))


def make_grads(model, scale_by_layer=None, nan_layers=(), none_layers=()):
    out = []
    for v in model.trainable_variables:
        layer = v.path.split("/")[-2]
        g = tf.ones_like(v) * (scale_by_layer or {}).get(layer, 0.1)
        if layer in nan_layers:
            g = g * math.nan
        out.append(None if layer in none_layers else g)
    return out


def test_nonfinite_names_first_layer_in_backward_order_at_its_step():
    model = mlp()
    mon = GradientMonitor(model, every=4, detectors=NO_SPIKE)
    for step in range(8):
        bad = ("fc0", "fc1") if step == 5 else ()
        mon.step(make_grads(model, nan_layers=bad), model.trainable_variables)
    mon.close()
    [f] = [f for f in mon.findings if f.kind == "nonfinite"]
    assert (f.step, f.layer, f.severity) == (5, "fc1", "error")


def test_healthy_run_has_no_warnings():
    model = mlp()
    x, y = batch()
    opt = keras.optimizers.SGD(0.01)
    mon = GradientMonitor(model, every=5)
    for _ in range(30):
        with mon.tape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        g = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(g, model.trainable_variables, strict=True))
    mon.close()
    assert [f for f in mon.findings if f.severity != "info"] == []


def test_vanishing_and_exploding_name_the_layer_and_step():
    model = mlp()
    mon = GradientMonitor(model, every=5, detectors={"spike": False, "vanishing": {"patience": 4}})
    for _ in range(6):
        mon.step(make_grads(model, {"fc0": 1e-10}), model.trainable_variables)
    for _ in range(3):  # exploding is relative to the first steps and must persist (patience 3)
        mon.step(make_grads(model, {"head": 1e4}), model.trainable_variables)
    mon.close()
    [v] = [f for f in mon.findings if f.kind == "vanishing"]
    assert (v.layer, v.step) == ("fc0", 3)
    [e] = [f for f in mon.findings if f.kind == "exploding"]
    assert (e.layer, e.step) == ("head", 6)


class TwoHeads(keras.Model):
    """`unused` owns variables but the forward pass never reaches it; `frozen` is not trainable."""

    def __init__(self):
        super().__init__(name="two_heads")
        self.used = keras.layers.Dense(3, name="used")
        self.unused = keras.layers.Dense(3, name="unused")
        self.frozen = keras.layers.Dense(1, name="frozen")
        self.frozen.trainable = False

    def build(self, shape):
        for layer in (self.used, self.unused):
            layer.build(shape)
        self.frozen.build((None, 3))

    def call(self, x):
        return self.frozen(self.used(x))


def test_disconnected_layer_is_detached_and_non_trainable_layer_is_frozen():
    keras.utils.set_random_seed(0)
    model = TwoHeads()
    x, _ = batch()
    model(x)
    mon = GradientMonitor(model, every=2, detectors={"spike": False, "detached": {"patience": 3}})
    for _ in range(4):
        with mon.tape() as tape:
            loss = tf.reduce_sum(model(x))
        grads = tape.gradient(loss, model.trainable_variables)
    assert grads[2] is None  # None passes through for apply_gradients to skip
    mon.close()
    [d] = [f for f in mon.findings if f.kind == "detached"]
    assert (d.layer, d.step) == ("unused", 2)
    [fr] = [f for f in mon.findings if f.kind == "frozen"]
    assert (fr.layer, fr.severity) == ("frozen", "info")
    assert mon.info.frozen == ("frozen.kernel", "frozen.bias")


def test_embedding_indexed_slices_norm_counts_repeated_rows_once_summed():
    keras.utils.set_random_seed(0)
    emb = keras.layers.Embedding(10, 3, name="emb")
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            emb,
            keras.layers.Flatten(),
            keras.layers.Dense(1, name="head"),
        ]
    )
    ids = tf.constant([[1, 1, 2, 1], [2, 3, 3, 1]])
    mon = GradientMonitor(model, every=1, clip=cliplib.ValueClip(0.05), detectors=NO_SPIKE)
    with mon.tape() as tape:
        loss = tf.reduce_sum(model(ids))
    clipped = tape.gradient(loss, model.trainable_variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(ids))
    raw = tape.gradient(loss, model.trainable_variables)
    assert isinstance(raw[0], tf.IndexedSlices)
    dense = tf.convert_to_tensor(raw[0])
    assert mon.history[-1].grad_norm[0] == pytest.approx(float(tf.norm(dense)), rel=REL)
    np.testing.assert_allclose(
        tf.convert_to_tensor(clipped[0]).numpy(),
        tf.clip_by_value(dense, -0.05, 0.05).numpy(),
        rtol=1e-6,
    )


def test_half_precision_gradients_accumulate_in_float32():
    v = tf.Variable(tf.zeros([1000], tf.float16), name="w")
    g = tf.fill([1000], tf.constant(300.0, tf.float16))  # 300**2 * 1000 overflows float16
    mon = GradientMonitor([v], every=1, detectors=NO_SPIKE)
    out = mon.step([g], [v])
    assert out[0].dtype == tf.float16
    assert mon.history[-1].grad_norm[0] == pytest.approx(300.0 * math.sqrt(1000), rel=1e-4)
    assert not mon.history[-1].any_nonfinite


def test_loss_scale_is_divided_out_of_the_statistics():
    model = mlp()
    x, y = batch()
    grads = grads_of(model, x, y)
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=1024.0)
    opt.build(model.trainable_variables)
    ref = layer_norms_ref(model, grads)
    for scale in (opt, tf.Variable(1024.0), 1024.0):
        mon = GradientMonitor(model, every=1, loss_scale=scale, detectors=NO_SPIKE)
        mon.step([g * 1024.0 for g in grads], model.trainable_variables)
        np.testing.assert_allclose(
            mon.history[-1].grad_norm, [ref[n] for n in mon.info.layers], rtol=REL
        )


@pytest.mark.parametrize(
    "policy",
    [
        cliplib.ValueClip(0.05),
        cliplib.AGC(clipping=0.01),
        cliplib.LayerNormClip(0.1),
        cliplib.chain(cliplib.ValueClip(0.05), cliplib.GlobalNormClip(0.1)),
    ],
    ids=["value", "agc", "layer", "value+global"],
)
def test_clipping_scaled_gradients_equals_clipping_unscaled_ones(policy):
    """Thresholds refer to the unscaled gradients: clipping loss-scaled gradients gives the
    clipped unscaled gradients times the scale, and the same coefficients."""
    model = mlp()
    grads = grads_of(model, *batch())
    plain = GradientMonitor(model, every=1, clip=policy, detectors=NO_SPIKE)
    ref = plain.step(grads, model.trainable_variables)
    scaled = GradientMonitor(model, every=1, clip=policy, loss_scale=1024.0, detectors=NO_SPIKE)
    out = scaled.step([g * 1024.0 for g in grads], model.trainable_variables)
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a.numpy() / 1024.0, b.numpy(), rtol=1e-5, atol=1e-9)
    a, b = scaled.history[-1], plain.history[-1]
    assert a.clip_coef == pytest.approx(b.clip_coef, rel=1e-5) and a.clip_coef < 1.0
    if b.layer_clip_coef is not None:
        np.testing.assert_allclose(a.layer_clip_coef, b.layer_clip_coef, rtol=1e-5)


def test_skip_policy_zeroes_the_step_and_reports_it_at_once():
    model = mlp()
    mon = GradientMonitor(model, every=100, nonfinite="skip", detectors=NO_SPIKE)
    mon.step(make_grads(model), model.trainable_variables)
    out = mon.step(make_grads(model, nan_layers=("head",)), model.trainable_variables)
    assert all(float(tf.reduce_sum(tf.abs(g))) == 0.0 for g in out)
    assert mon.history[-1].skipped and mon.history[-1].step == 1
    assert [f.kind for f in mon.findings] == ["nonfinite"]


def test_skip_policy_apply_leaves_adam_untouched():
    model = mlp()
    opt = keras.optimizers.Adam(0.1)
    mon = GradientMonitor(model, every=100, nonfinite="skip", detectors=NO_SPIKE)
    before = [v.numpy().copy() for v in model.trainable_variables]
    grads = mon.step(make_grads(model, nan_layers=("fc0",)), model.trainable_variables)
    mon.apply(opt, grads, model.trainable_variables)
    for v, b in zip(model.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b)
    assert int(opt.iterations) == 0


def test_raise_policy_raises_eagerly_and_inside_tf_function():
    model = mlp()
    mon = GradientMonitor(model, every=100, nonfinite="raise", detectors=NO_SPIKE)
    with pytest.raises(NonFiniteGradientError, match="step 0.*'head'"):
        mon.step(make_grads(model, nan_layers=("head",)), model.trainable_variables)

    mon2 = GradientMonitor(model, every=100, nonfinite="raise", detectors=NO_SPIKE)
    step = tf.function(lambda g: mon2.step(g, model.trainable_variables))
    with pytest.raises(tf.errors.OpError, match="NonFiniteGradientError: step 0: NaN/Inf gradient"):
        step(make_grads(model, nan_layers=("fc1",)))
    assert isinstance(mon2.error, NonFiniteGradientError) and mon2.error.finding.layer == "fc1"


def test_unreset_accumulation_buffers_are_reported():
    model = mlp()
    x, y = batch()
    opt = keras.optimizers.SGD(0.01)
    acc = [tf.Variable(tf.zeros_like(v), trainable=False) for v in model.trainable_variables]
    mon = GradientMonitor(model, every=2, accumulators=acc, detectors=NO_SPIKE)

    @tf.function
    def micro(x, y):
        with mon.tape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        for a, g in zip(acc, tape.gradient(loss, model.trainable_variables), strict=True):
            a.assign_add(g)

    @tf.function
    def apply(reset):
        opt.apply_gradients(
            zip(mon.step(acc, model.trainable_variables), model.trainable_variables, strict=True)
        )
        if reset:
            for a in acc:
                a.assign(tf.zeros_like(a))

    for step in range(4):
        for _ in range(3):
            micro(x, y)
        apply(step != 1)  # the buffers are not reset after step 1
    mon.close()
    assert [s.backward_calls for s in mon.history] == [3, 3, 3, 3]
    assert [s.grad_reset for s in mon.history] == [True, True, False, True]
    [f] = [f for f in mon.findings if f.kind == "accumulation"]
    assert f.step == 2


@pytest.mark.parametrize(
    "policy",
    [
        cliplib.AutoClip(percentile=50, history=4),
        cliplib.ZClip(warmup=3, z_threshold=1.0),
        cliplib.LayerNormClip(0.5),
    ],
)
def test_stateful_policies_in_graph_match_numpy(policy):
    rng = np.random.default_rng(0)
    norms = rng.lognormal(size=(12, 3)) * np.array([1, 1, 1])[None]
    norms[7] *= 20  # an outlier
    np_state = policy.init(3)
    tf_state = policy.init(3, TFOps())
    for row in norms:
        g = float(np.sqrt(np.sum(row**2)))
        np_scale, np_state = policy.factors(row, g, np_state, cliplib.NumpyOps())
        tf_scale, tf_state = policy.factors(
            tf.constant(row, tf.float32), tf.constant(g, tf.float32), tf_state, TFOps()
        )
        for a, b in (
            (np_scale.global_coef, tf_scale.global_coef),
            (np_scale.layer_coef, tf_scale.layer_coef),
        ):
            if a is not None:
                np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5)


def test_agc_scales_each_output_unit():
    w = tf.Variable([[1.0, 10.0], [0.0, 0.0]], name="k")  # unit norms (columns): 1, 10
    g = tf.constant([[1.0, 1.0], [0.0, 0.0]])
    mon = GradientMonitor([w], every=1, clip=cliplib.AGC(clipping=0.5), detectors=NO_SPIKE)
    [out] = mon.step([g], [w])
    np.testing.assert_allclose(out.numpy(), [[0.5, 1.0], [0.0, 0.0]], rtol=1e-5)


def test_agc_on_indexed_slices_equals_agc_on_the_dense_gradient():
    """An embedding's IndexedSlices stays sparse under AGC; its units (columns) see the rows it
    holds, which are all the non-zero rows of the dense gradient."""
    emb = tf.Variable(tf.random.stateless_normal((6, 3), seed=(1, 2)), name="emb")
    rows = tf.IndexedSlices(
        tf.constant([[3.0, -1.0, 0.5], [0.2, 4.0, -2.0]]), tf.constant([4, 1]), (6, 3)
    )
    sparse = GradientMonitor([emb], every=1, clip=cliplib.AGC(0.1), detectors=NO_SPIKE)
    dense = GradientMonitor([emb], every=1, clip=cliplib.AGC(0.1), detectors=NO_SPIKE)
    [a] = sparse.step([rows], [emb])
    [b] = dense.step([tf.convert_to_tensor(rows)], [emb])
    assert isinstance(a, tf.IndexedSlices)
    np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), b.numpy(), rtol=1e-6)
    assert sparse.history[-1].clip_coef == pytest.approx(dense.history[-1].clip_coef, rel=1e-6)
    assert dense.history[-1].clip_coef < 1.0


def test_writes_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    model = mlp()
    mon = GradientMonitor(model, tmp_path / "run", every=2, detectors=NO_SPIKE)
    for _ in range(4):
        mon.step(make_grads(model), model.trainable_variables)
    mon.close()
    ea = event_accumulator.EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    ea.Reload()
    tags = ea.Tags()["tensors"] + ea.Tags()["scalars"]
    assert "graddiag/grad_norm/fc0" in tags and "graddiag/global/grad_norm" in tags


def test_gradient_histograms_every_hist_every_steps(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    model = mlp()
    x, y = batch()
    grads = grads_of(model, x, y)
    grads[0] = tf.tensor_scatter_nd_update(grads[0], [[0, 0]], [math.inf])
    mon = GradientMonitor(model, tmp_path / "run", every=5, hist_every=3, detectors=NO_SPIKE)
    step = tf.function(lambda g: mon.step(g, model.trainable_variables))
    for _ in range(7):
        step(grads)
    mon.close()
    ea = event_accumulator.EventAccumulator(str(tmp_path / "run"), size_guidance={"histograms": 0})
    ea.Reload()
    events = ea.Histograms("graddiag/hist/fc1")
    assert [e.step for e in events] == [0, 3, 6]
    h = events[0].histogram_value
    flat = tf.concat([tf.reshape(g, [-1]) for g in grads[2:4]], 0)
    assert h.num == flat.shape[0] and sum(h.bucket) == h.num
    assert h.min == pytest.approx(float(tf.reduce_min(flat)), rel=REL)
    assert h.max == pytest.approx(float(tf.reduce_max(flat)), rel=REL)
    assert h.sum_squares == pytest.approx(float(tf.reduce_sum(flat**2)), rel=REL)
    assert (
        ea.Histograms("graddiag/hist/fc0")[0].histogram_value.num == 4 * 8 + 8 - 1
    )  # Inf left out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "`every`.*0"),
        ({"nonfinite": "ignore"}, "`nonfinite`.*'ignore'"),
        ({"clip": "1.0"}, "`clip`.*'1.0'"),
        ({"read_back": "sometimes"}, "`read_back`.*'sometimes'"),
        ({"loss_scale": -2.0}, "`loss_scale`.*-2.0"),
        ({"logdir": 3}, "`logdir`.*3"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(mlp(), **kwargs)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match="`model_or_variables`.*42"):
        GradientMonitor(42)
    model = mlp()
    mon = GradientMonitor(model, detectors=NO_SPIKE)
    other = tf.Variable(1.0, name="stranger")
    with pytest.raises(ValueError, match=r"variables\[0\] \('stranger'\) is not monitored"):
        mon.step([tf.constant(1.0)], [other])
    with pytest.raises(ValueError, match="one gradient per variable"):
        mon.step([None], model.trainable_variables)


def test_custom_loop_example_finds_its_two_problems():
    import tf_custom_loop

    mon = tf_custom_loop.run(steps=tf_custom_loop.NAN_STEP + 2)
    got = {(f.kind, f.layer, f.step) for f in mon.findings}
    # detached: no gradient on (nearly) all of the first 20 steps
    assert got == {("nonfinite", "mid", tf_custom_loop.NAN_STEP), ("detached", "aux", 19)}
    assert mon.history[tf_custom_loop.NAN_STEP].skipped


def train_with_apply(mon, model, opt, steps, variables, compiled=True):
    """A custom loop that measures all gradients but applies only `variables`."""
    x, y = batch()

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = mon.step(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        picked = {id(v) for v in variables}
        pairs = [
            (g, v) for g, v in zip(grads, model.trainable_variables, strict=True) if id(v) in picked
        ]
        mon.apply(opt, [g for g, _ in pairs], [v for _, v in pairs])

    step = tf.function(train_step) if compiled else train_step
    for _ in range(steps):
        step(x, y)
    mon.close()


@pytest.mark.parametrize("compiled", [True, False])
def test_variables_left_out_of_apply_are_reported_as_never_updated(compiled):
    model = mlp()
    model(batch()[0])
    opt = keras.optimizers.SGD(0.01)
    # eagerly the first read happens inside step(); `optimizer=` makes it wait for apply
    mon = GradientMonitor(model, every=2, detectors=NO_SPIKE, optimizer=None if compiled else opt)
    kept = [v for v in model.trainable_variables if "fc1" not in v.path]
    train_with_apply(mon, model, opt, 3, kept, compiled)
    assert mon.info.unoptimized == ("fc1.kernel", "fc1.bias")
    [f] = [f for f in mon.findings if f.kind == "frozen"]
    assert (f.step, f.layer, f.severity) == (0, "fc1", "warning")
    assert "never update" in f.message


def test_apply_of_every_variable_reports_nothing_unoptimized():
    model = mlp()
    mon = GradientMonitor(model, every=2, detectors=NO_SPIKE)
    model(batch()[0])
    train_with_apply(mon, model, keras.optimizers.SGD(0.01), 3, model.trainable_variables)
    assert mon.info.unoptimized == ()
    assert [f for f in mon.findings if f.kind == "frozen"] == []


def test_optimizer_built_without_a_layer_reports_it():
    model = mlp()
    x, y = batch()
    model(x)
    kept = [v for v in model.trainable_variables if "head" not in v.path]
    opt = keras.optimizers.SGD(0.01)
    opt.build(kept)
    mon = GradientMonitor(model, every=1, detectors=NO_SPIKE, optimizer=opt)
    g = grads_of(model, x, y)
    mon.step(g, model.trainable_variables)
    opt.apply_gradients(zip(g[: len(kept)], kept, strict=True))
    mon.close()
    assert [(f.kind, f.layer, f.severity) for f in mon.findings if f.kind == "frozen"] == [
        ("frozen", "head", "warning")
    ]


@pytest.mark.parametrize("compiled", [True, False])
def test_update_ratio_of_sgd_is_lr_times_grad_norm_over_weight_norm(compiled):
    model = mlp()
    x, y = batch()
    lr = 0.1
    grads = grads_of(model, x, y)
    ref_g = layer_norms_ref(model, grads)
    ref_w = layer_norms_ref(model, model.trainable_variables)
    mon = GradientMonitor(model, every=5, detail_every=2, detectors=NO_SPIKE)
    train_with_apply(mon, model, keras.optimizers.SGD(lr), 3, model.trainable_variables, compiled)
    assert [s.update_ratio is not None for s in mon.history] == [False, True, False]
    model2 = mlp()  # same seed, same weights: step 0 against the hand computation
    mon2 = GradientMonitor(model2, every=5, detail_every=1, detectors=NO_SPIKE)
    train_with_apply(
        mon2, model2, keras.optimizers.SGD(lr), 1, model2.trainable_variables, compiled
    )
    want = [lr * ref_g[n] / ref_w[n] for n in mon2.info.layers]
    np.testing.assert_allclose(mon2.history[0].update_ratio, want, rtol=REL)


TF_EXIT_SCRIPT = """
import sys
import keras
import numpy as np
import tensorflow as tf
from graddiag.tf import GradientMonitor
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
mon = GradientMonitor(model, sys.argv[1], every=5)
opt = keras.optimizers.SGD(0.1)
x = tf.constant(np.random.default_rng(0).normal(size=(8, 4)), tf.float32)
for _ in range(23):
    with mon.tape() as tape:
        loss = tf.reduce_mean(model(x) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
"""  # no close(): the exit hook must read back and log the unread steps


def test_unclosed_monitor_logs_every_step_at_exit(tmp_path):
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from graddiag import tags

    logdir = str(tmp_path / "run")
    out = subprocess.run(
        [sys.executable, "-c", TF_EXIT_SCRIPT, logdir],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars(tags.tag("grad_norm"))] == list(range(23))


def test_autoclip_state_is_check_numerics_safe():
    """Policy state holds no NaN/Inf sentinels, so TF's global check_numerics mode stays quiet."""
    var = tf.Variable(tf.ones((4,)))
    mon = GradientMonitor([var], every=2, clip=cliplib.AutoClip(percentile=50, history=4))
    tf.debugging.enable_check_numerics()
    try:
        for _ in range(3):
            with mon.tape() as tape:
                loss = tf.reduce_sum(var**2)
            tape.gradient(loss, [var])
    finally:
        tf.debugging.disable_check_numerics()
    mon.close()
    assert len(mon.history) == 3


def test_unwritable_logdir_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="logdir"):
        GradientMonitor([tf.Variable(tf.ones((2,)))], blocker / "run")


def test_skipped_step_is_not_clipped_and_records_no_clip_coef():
    """As in graddiag.torch: a step skipped for NaN/Inf has no clip coefficient (not NaN)."""
    model = mlp()
    mon = GradientMonitor(
        model, every=100, nonfinite="skip", clip=cliplib.GlobalNormClip(0.1), detectors=NO_SPIKE
    )
    mon.step(make_grads(model), model.trainable_variables)
    mon.step(make_grads(model, nan_layers=("head",)), model.trainable_variables)
    first, skipped = mon.history
    assert first.clip_coef is not None and first.clip_coef < 1.0
    assert skipped.skipped and skipped.clip_coef is None


def test_a_monitored_tape_logs_its_scalar_target_as_the_loss():
    """The tape's target is the step's loss: logged with its step (as PyTorch's log_loss)."""
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
    opt = tf.keras.optimizers.SGD(0.1)
    mon = GradientMonitor(model, every=1)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(3):
        x = tf.constant(rng.normal(size=(8, 4)), tf.float32)
        with mon.tape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(loss))
    mon.close()
    assert [s.loss for s in mon.history] == pytest.approx(losses, rel=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_step_loss_of_any_one_element_shape_is_logged_and_others_refused(compiled):
    """`step(loss=...)`: a float64 loss is logged at full precision, a [1, 1] one as its value;
    a loss of several elements is refused naming `loss` (it would shift the row's columns)."""
    model = mlp()
    grads = grads_of(model, *batch())
    mon = GradientMonitor(model, every=1)

    def step(loss):
        return mon.step(grads, model.trainable_variables, loss=loss)

    run = tf.function(step) if compiled else step
    loss64 = tf.constant(1.0 + 1e-12, tf.float64)  # not a float32 value
    run(loss64)
    run(tf.constant([[2.5]]))
    assert [s.loss for s in mon.history] == [1.0 + 1e-12, 2.5]
    with pytest.raises(ValueError, match=r"`loss`.*\(3,\)"):
        run(tf.ones([3]))
    mon.close()


def test_quiet_until_is_the_first_batch_that_needs_a_poll_or_the_rare_work():
    """`_quiet_until` (the Keras callback's per-batch shortcut) against what it stands for —
    a poll due, or a detail/histogram step in the batch, by the traced step formulas —,
    evaluated batch by batch, over random settings, read-back points and batch sizes:
    every batch before it needs neither, and the batch at it needs one."""
    rng = np.random.default_rng(0)
    model = mlp()
    for _ in range(300):
        every, detail, hist = (
            int(rng.integers(1, 9)),
            int(rng.integers(0, 9)),
            int(rng.integers(0, 9)),
        )
        mon = GradientMonitor(model, every=every, detail_every=detail, hist_every=hist)
        mon._fetched = int(rng.integers(0, 40))
        first = mon._fetched + int(rng.integers(0, 10))
        steps = int(rng.integers(1, 5))

        def due(b, mon=mon, steps=steps, d=mon.detail_every, h=mon.hist_every):  # as traced
            rare = any((d and (s + 1) % d == 0) or (h and s % h == 0) for s in range(b, b + steps))
            return mon._log_due(b) or rare

        quiet = mon._quiet_until(first, steps)
        assert not any(due(b) for b in range(first, quiet))
        assert due(max(quiet, first)) or not any(due(b) for b in range(first, first + 200))


def test_histogram_rows_fast_path_bins_as_the_masked_form_and_numpy():
    """A finite layer is binned tensor by tensor (`bincount`, no copy); the result equals the
    masked form's row (bins exactly, sums to float32 rounding) and numpy's reference; a layer
    with NaN/Inf takes the masked form and counts them; both compile under XLA."""
    from graddiag.host import HIST_BINS
    from graddiag.tf._measure import _masked_histogram_row, histogram_rows

    rng = np.random.default_rng(7)
    parts = [
        rng.normal(size=(64, 32)).astype("float32") * 1e-3,
        rng.standard_t(2, size=32).astype("float32"),
        np.zeros((0,), "float32"),
    ]
    bad = rng.normal(size=50).astype("float32")
    bad[[3, 9]] = [np.nan, -np.inf]
    by_slot = {0: tf.constant(parts[0]), 1: tf.constant(parts[1]), 2: tf.constant(parts[2])}
    by_slot[3] = tf.constant(bad)
    layer_index = np.array([0, 0, 0, 1])
    for jit in (False, True):
        rows = tf.function(lambda: histogram_rows(by_slot, layer_index, 2), jit_compile=jit)()
        rows = rows.numpy()
        flat = [tf.reshape(tf.constant(p), [-1]) for p in parts]
        masked = _masked_histogram_row(flat).numpy()
        np.testing.assert_array_equal(rows[0][:HIST_BINS], masked[:HIST_BINS])
        np.testing.assert_allclose(rows[0][HIST_BINS:], masked[HIST_BINS:], rtol=1e-6)
        v = np.concatenate([p.ravel() for p in parts]).astype(np.float64)
        lo, hi = v.min(), v.max()
        want, _ = np.histogram(v, bins=HIST_BINS, range=(lo, hi))
        # float32 binning vs numpy's float64 edges: a value on an edge may move one bin
        assert np.abs(rows[0][:HIST_BINS] - want).sum() <= 2
        assert rows[0][:HIST_BINS].sum() == v.size
        assert rows[0][HIST_BINS + 4] == v.size  # finite count
        fin = bad[np.isfinite(bad)]
        assert rows[1][:HIST_BINS].sum() == fin.size
        assert rows[1][HIST_BINS] == fin.min() and rows[1][HIST_BINS + 1] == fin.max()
        assert rows[1][HIST_BINS + 5 :].tolist() == [1.0, 1.0]  # one NaN, one Inf


@pytest.mark.parametrize("compiled", [False, True])
def test_detail_counts_nan_and_inf_per_layer_also_past_a_float32_overflow(compiled):
    """Detail statistics count NaN/Inf only when the sum of |g| is not finite: a layer with
    NaN/Inf gets its counts, one whose finite values overflow that sum counts zero, and the
    maximum stays right in both."""
    model = mlp()
    grads = grads_of(model, *batch())
    grads[0] = tf.tensor_scatter_nd_update(
        grads[0], [[0, 0], [1, 1], [2, 2]], [math.nan, math.nan, -math.inf]
    )
    grads[2] = tf.fill(grads[2].shape, 3e38)  # finite; their sum overflows float32
    mon = GradientMonitor(model, every=1, detail_every=1, detectors=NO_SPIKE)

    def step(g):
        return mon.step(g, model.trainable_variables)

    (tf.function(step) if compiled else step)(grads)
    mon.close()
    (s,) = mon.history
    assert s.nan_count.tolist() == [2.0, 0.0, 0.0] and s.inf_count.tolist() == [1.0, 0.0, 0.0]
    assert s.grad_max[1] == pytest.approx(3e38, rel=REL)


def test_apply_measures_the_update_in_an_unlowered_call_and_on_detail_steps_only():
    """`monitor.apply` in a `tf.function`: the update-ratio measurement is an `If` call (lowered,
    an ordinary step would schedule its ops dead), the optimizer still updates on every step,
    and the ratio lands on the detail steps ((s + 1) % detail_every == 0) only."""
    model = mlp()
    x, y = batch()
    opt = keras.optimizers.SGD(0.1)
    mon = GradientMonitor(model, every=2, detail_every=3, detectors=NO_SPIKE)

    @tf.function
    def train_step(x, y):
        with mon.tape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        mon.apply(opt, grads, model.trainable_variables)

    before = [v.numpy().copy() for v in model.trainable_variables]
    for _ in range(6):
        train_step(x, y)
    graph = train_step.get_concrete_function(x, y).graph
    conds = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert len(conds) == 2  # the rare work, the update (-ratio) call
    assert not any(op.get_attr("_lower_using_switch_merge") for op in conds)
    assert int(opt.iterations.numpy()) == 6
    assert all(
        not np.allclose(b, v.numpy())
        for b, v in zip(before, model.trainable_variables, strict=True)
    )
    mon.close()
    assert [s.step for s in mon.history if s.update_ratio is not None] == [2, 5]
