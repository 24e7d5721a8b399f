"""integrations.keras.GradDiagCallback: real gradients from model.fit, clipping, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from graddiag.monitor import NonFiniteGradientError  # noqa: E402

try:  # a checkout first (an editable install maps graddiag.integrations to its own tree)
    from integrations.keras import GradDiagCallback
except ImportError:  # installed: graddiag.integrations
    from graddiag.integrations.keras import GradDiagCallback

#: float32 norms of the same gradients computed by two code paths.
REL = 1e-5
NO_SPIKE = {"spike": False}
BATCH = 16


def model_and_data(seed: int = 0, optimizer=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="fc"),
            keras.layers.Dense(1, name="head"),
        ],
        name="net",
    )
    model.compile(optimizer or keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    return model, x, y


def first_batch_grads(model, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x[:BATCH]) - y[:BATCH]) ** 2)
    return tape.gradient(loss, model.trainable_variables)


def test_fit_monitors_the_real_gradients_and_clips_them():
    model, x, y = model_and_data()
    grads = first_batch_grads(model, x, y)
    start = [v.numpy().copy() for v in model.trainable_variables]
    max_norm = float(tf.linalg.global_norm(grads)) / 2
    cb = GradDiagCallback(every=2, clip=max_norm, detectors=NO_SPIKE, print_summary=False)
    model.fit(
        x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb]
    )
    s = cb.monitor.history[0]
    ref = [
        math.hypot(float(tf.norm(grads[0])), float(tf.norm(grads[1]))),
        math.hypot(float(tf.norm(grads[2])), float(tf.norm(grads[3]))),
    ]
    np.testing.assert_allclose(s.grad_norm, ref, rtol=REL)
    assert s.clip_coef == pytest.approx(0.5, rel=REL)
    clipped, _ = tf.clip_by_global_norm(grads, max_norm)
    for v, w0, g in zip(model.trainable_variables, start, clipped, strict=True):
        np.testing.assert_allclose(v.numpy(), w0 - 0.1 * g.numpy(), rtol=1e-5, atol=1e-7)


def test_every_step_is_seen_and_the_optimizer_is_restored(tmp_path):
    model, x, y = model_and_data()
    cb = GradDiagCallback(tmp_path / "run", every=3, detectors=NO_SPIKE, print_summary=False)
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras"))
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[cb, ckpt])
    assert [s.step for s in cb.monitor.history] == list(range(8))
    assert "apply" not in vars(model.optimizer)
    assert list(tmp_path.glob("run/events.out.tfevents.*"))
    for path in (tmp_path / "ckpt.keras", tmp_path / "final.keras"):
        if path.name == "final.keras":
            model.save(path)
        loaded = keras.models.load_model(path)
        assert type(loaded.optimizer) is type(model.optimizer)
    np.testing.assert_allclose(
        loaded.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0), rtol=1e-6
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # plain again, no monitor traced in
    assert len(cb.monitor.history) == 8


def test_nan_batch_is_reported_at_its_step_and_skipped():
    model, x, y = model_and_data()
    x[3 * BATCH] = np.nan  # the fourth batch (step 3)
    cb = GradDiagCallback(every=10, nonfinite="skip", detectors=NO_SPIKE, print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    [f] = [f for f in cb.findings if f.kind == "nonfinite"]
    assert (f.step, f.layer) == (3, "head")
    assert cb.monitor.history[3].skipped
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def test_raise_policy_stops_fit_with_the_step_and_layer():
    model, x, y = model_and_data()
    x[BATCH] = np.nan
    cb = GradDiagCallback(every=10, nonfinite="raise", detectors=NO_SPIKE, print_summary=False)
    with pytest.raises(NonFiniteGradientError, match="step 1.*'head'"):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])


def test_loss_scale_optimizer_statistics_are_unscaled():
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**10)
    model, x, y = model_and_data(optimizer=opt)
    grads = first_batch_grads(model, x, y)
    cb = GradDiagCallback(every=1, detectors=NO_SPIKE, print_summary=False)
    model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    ref = math.sqrt(sum(float(tf.norm(g)) ** 2 for g in grads[2:]))
    assert cb.monitor.history[0].grad_norm[1] == pytest.approx(ref, rel=REL)
    # the loss logged is the batch's loss before the update (a fresh copy of the initial model
    # computes it), not the loss times the 1024 loss scale
    initial = model_and_data()[0]
    before = float(tf.reduce_mean((initial(x[:BATCH]) - y[:BATCH]) ** 2))
    assert cb.monitor.history[0].loss == pytest.approx(before, rel=REL)


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="`every`.*0"):
        GradDiagCallback(every=0)
    with pytest.raises(ValueError, match="`nonfinite`.*'never'"):
        GradDiagCallback(nonfinite="never")
    with pytest.raises(ValueError, match="`clip`.*'big'"):
        GradDiagCallback(clip="big")
    with pytest.raises(ValueError, match="Unknown detector"):
        GradDiagCallback(detectors={"explode": True})


def test_needs_a_compiled_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    cb = GradDiagCallback(print_summary=False)
    cb.set_model(model)
    with pytest.raises(ValueError, match="no optimizer; call model.compile"):
        cb.on_train_begin()


def test_keras_fit_example_finds_heavy_clipping():
    """Unscaled inputs make every gradient huge from step 0: that is the run's own scale (not an
    explosion), and clipping at 1.0 scales every step down by orders of magnitude (a warning)."""
    import keras_fit

    cb = keras_fit.run(epochs=1)
    got = {(f.kind, f.layer, f.step, f.severity) for f in cb.findings}
    assert ("clipped", None, 15, "warning") in got
    assert not [f for f in cb.findings if f.kind == "exploding"]


def test_works_under_xla_jit_compile(tmp_path):
    model, x, y = model_and_data()
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)
    grads = first_batch_grads(model, x, y)
    cb = GradDiagCallback(
        tmp_path,
        every=2,
        clip=1.0,
        detail_every=2,
        hist_every=2,
        detectors=NO_SPIKE,
        print_summary=False,
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert [s.step for s in cb.monitor.history] == [0, 1, 2, 3]
    ref = math.sqrt(sum(float(tf.norm(g)) ** 2 for g in grads[2:]))
    assert cb.monitor.history[0].grad_norm[1] == pytest.approx(ref, rel=REL)
    assert cb.monitor.history[1].grad_max is not None  # the detail branch ran under XLA


def test_mixed_float16_policy_statistics_are_unscaled():
    model, x, y = model_and_data()
    ref = first_batch_grads(model, x, y)
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model, x, y = model_and_data()  # same weights, float16 compute, LossScaleOptimizer
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        cb = GradDiagCallback(every=1, detectors=NO_SPIKE, print_summary=False)
        model.fit(x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    fp16_rel = 5e-3  # float16 forward/backward against the float32 reference
    got = cb.monitor.history[0].grad_norm[0]
    assert got == pytest.approx(
        math.hypot(float(tf.norm(ref[0])), float(tf.norm(ref[1]))), rel=fp16_rel
    )


def test_fit_update_ratio_is_lr_times_grad_norm_over_weight_norm_and_nothing_unoptimized():
    model, x, y = model_and_data()
    grads = first_batch_grads(model, x, y)
    layers = [model.trainable_variables[:2], model.trainable_variables[2:]]
    ratio = [
        0.1
        * float(tf.linalg.global_norm(grads[2 * i : 2 * i + 2]))
        / float(tf.linalg.global_norm([tf.convert_to_tensor(v) for v in vs]))
        for i, vs in enumerate(layers)
    ]
    cb = GradDiagCallback(every=2, detail_every=1, detectors=NO_SPIKE, print_summary=False)
    model.fit(
        x[:BATCH], y[:BATCH], batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[cb]
    )
    np.testing.assert_allclose(cb.monitor.history[0].update_ratio, ratio, rtol=REL)
    assert all(s.update_ratio is not None for s in cb.monitor.history)
    # the detail statistics (computed in the update's tf.cond) describe the step's gradients
    gmax = [max(float(tf.reduce_max(tf.abs(g))) for g in grads[2 * i : 2 * i + 2]) for i in (0, 1)]
    np.testing.assert_allclose(cb.monitor.history[0].grad_max, gmax, rtol=REL)
    assert cb.monitor.info.unoptimized == ()
    assert [f for f in cb.findings if f.kind == "frozen"] == []


def test_later_fits_reuse_the_traced_step_and_plain_fits_stay_plain(monkeypatch):
    """The train function with the monitor is traced (and XLA-compiled) once per callback and
    model, not at every `fit`: Python runs `GradientMonitor.step` only while tracing."""
    from graddiag.tf import GradientMonitor

    traced = []
    real = GradientMonitor.step
    monkeypatch.setattr(
        GradientMonitor, "step", lambda self, *a, **k: traced.append(1) or real(self, *a, **k)
    )
    model, x, y = model_and_data()
    cb = GradDiagCallback(every=2, detectors=NO_SPIKE, print_summary=False)
    fit = {"batch_size": BATCH, "epochs": 1, "shuffle": False, "verbose": 0}
    model.fit(x, y, callbacks=[cb], **fit)
    first = len(traced)
    assert first >= 1
    model.fit(x, y, **fit)  # plain: neither measured nor traced with the monitor
    assert len(cb.monitor.history) == 4 and len(traced) == first
    model.fit(x, y, callbacks=[cb], **fit)
    model.fit(x, y, callbacks=[cb], **fit)
    assert len(traced) == first
    # one run: 4 steps, 4 steps the optimizer took without the callback, then 8 more
    assert [s.step for s in cb.monitor.history] == [0, 1, 2, 3, *range(8, 16)]


def test_warn_mode_reads_the_device_at_log_steps_only(monkeypatch):
    """Under the default `nonfinite="warn"` the callback reads the device only around log steps
    (it counts steps on the host), not every batch."""
    from graddiag.tf import GradientMonitor

    cb = GradDiagCallback(every=4, detail_every=0, hist_every=0, print_summary=False)
    polls = []
    real = GradientMonitor._poll
    monkeypatch.setattr(
        GradientMonitor, "_poll", lambda self, *a, **k: polls.append(1) or real(self, *a, **k)
    )
    model, x, y = model_and_data()
    x, y = np.concatenate([x] * 4), np.concatenate([y] * 4)  # 16 batches
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert [s.step for s in cb.monitor.history] == list(range(16))
    assert 1 <= len(polls) <= 16 // 4 + 1  # after steps 3, 7, 11 and at the epoch's end


def test_warn_mode_diagnoses_log_steps_on_the_worker_thread(monkeypatch):
    """Under "warn" the log steps' host work (decode, detectors, logs) runs on the host path's
    background worker, not in the training thread; the results are the same once read."""
    import threading

    from graddiag.host import HostPath

    threads = []
    real = HostPath._ingest_block

    def ingest(self, steps):  # one thread name per step ingested
        threads.extend([threading.current_thread().name] * len(steps))
        return real(self, steps)

    monkeypatch.setattr(HostPath, "_ingest_block", ingest)
    model, x, y = model_and_data()
    cb = GradDiagCallback(every=2, detectors=NO_SPIKE, print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert [s.step for s in cb.monitor.history] == [0, 1, 2, 3]
    # steps 0-1 and 2-3 at the batches after them; none left for on_train_end's flush
    assert threads == ["graddiag-host"] * 4


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_detail_work_runs_only_in_the_batches_that_need_it(monkeypatch, run_eagerly):
    """The callback picks, per batch on the host, a train function with the detail/update-ratio
    work or one without it (no per-step `tf.cond` for it): ordinary steps are measured without
    that work, detail steps get their detail statistics and update ratio as before."""
    from graddiag.tf import GradientMonitor

    seen = []  # (trace or eager call of the step graph) whether it had the rare work
    real = GradientMonitor._step_graph

    def step_graph(self, *a, **k):
        seen.append(self._rare_work is not False)
        return real(self, *a, **k)

    monkeypatch.setattr(GradientMonitor, "_step_graph", step_graph)
    model, x, y = model_and_data()
    model.compile(keras.optimizers.SGD(0.1), "mse", run_eagerly=run_eagerly)
    x, y = np.concatenate([x] * 2), np.concatenate([y] * 2)  # 8 batches
    cb = GradDiagCallback(every=2, detail_every=3, detectors=NO_SPIKE, print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    if run_eagerly:  # one call per batch: with the work at steps 2 and 5 only
        assert seen == [s in (2, 5) for s in range(8)]
    else:  # traced once without the work, once with it
        assert sorted(seen) == [False, True]
    hist = cb.monitor.history
    assert [s.step for s in hist] == list(range(8))
    assert [s.step for s in hist if s.grad_max is not None] == [2, 5]
    assert [s.step for s in hist if s.update_ratio is not None] == [2, 5]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_logs_each_batch_loss(tmp_path, jit_compile):
    """The loss of every batch is logged (history and `graddiag/global/loss`): each equals the
    batch's loss recovered from Keras' own running epoch mean (k*m_k - (k-1)*m_(k-1)), over two
    epochs (the mean restarts at each)."""
    from graddiag.reader import read

    model, x, y = model_and_data()
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
    means: list[float] = []

    class Means(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            means.append((batch, float(logs["loss"])))

    cb = GradDiagCallback(logdir=str(tmp_path), every=3, detectors=NO_SPIKE, print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[cb, Means()])
    per_batch = []
    for (k, m), prev in zip(means, [None, *means[:-1]], strict=True):
        per_batch.append(m if k == 0 else (k + 1) * m - k * prev[1])
    logged = [s.loss for s in cb.monitor.history]
    assert len(logged) == len(per_batch) == 8 and None not in logged
    np.testing.assert_allclose(logged, per_batch, rtol=1e-4)  # float32 running means
    cb.close()
    df = read(str(tmp_path))
    loss = df[df["stat"] == "loss"].sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(loss, logged, rtol=REL)


def test_fit_without_the_loss_through_scale_loss_still_monitors():
    """A custom `train_step` that never calls `optimizer.scale_loss`: no loss logged, the
    statistics as usual, and the optimizer's `scale_loss` is its own again after `fit`."""
    model, x, y = model_and_data()

    class Custom(keras.Model):
        def train_step(self, data):
            xb, yb = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((self(xb, training=True) - yb) ** 2)
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": loss}

    inner = model
    custom = Custom(inner.inputs, inner.outputs)
    custom.compile(keras.optimizers.SGD(0.1))
    cb = GradDiagCallback(every=2, detectors=NO_SPIKE, print_summary=False)
    custom.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert [s.loss for s in cb.monitor.history] == [None] * 4
    assert all(s.global_norm > 0 for s in cb.monitor.history)
    assert "scale_loss" not in vars(custom.optimizer)
    cb.close()


@pytest.mark.parametrize("per_execution", [1, 3])
def test_log_steps_read_the_detail_and_histogram_rows_only_when_they_hold_one(
    tmp_path, monkeypatch, per_execution
):
    """Each device read is a round trip: a log-step poll reads the ring buffer, and the detail,
    histogram and update rows only when the steps it reads hold one — yet every detail step
    ((s+1) % 3 == 0), update ratio and histogram (s % 4 == 0) still lands on its own step, also
    with several steps per execution."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from graddiag import tags
    from graddiag.tf import GradientMonitor

    reads = []
    real = GradientMonitor._process

    def process(self, steps_done, arrays, later=False):
        reads.append(sum(a is not None and a.ndim > 0 for a in arrays))  # row blocks read
        return real(self, steps_done, arrays, later)

    monkeypatch.setattr(GradientMonitor, "_process", process)
    model, x, y = model_and_data()
    model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=per_execution)
    x, y = np.concatenate([x] * 3), np.concatenate([y] * 3)  # 12 batches
    cb = GradDiagCallback(
        str(tmp_path),
        every=2,
        detail_every=3,
        hist_every=4,
        detectors=NO_SPIKE,
        print_summary=False,
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    cb.close()
    hist = cb.monitor.history
    assert [s.step for s in hist] == list(range(12))
    assert [s.step for s in hist if s.grad_max is not None] == [2, 5, 8, 11]
    assert [s.step for s in hist if s.update_ratio is not None] == [2, 5, 8, 11]
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Histograms(tags.hist_tag("fc"))] == [0, 4, 8]
    assert min(reads) < max(reads)  # some polls leave rows unread
    if per_execution == 1:
        assert min(reads) == 1  # the buffer alone
