"""Keras `fit` callback: the step is `optimizer.iterations`; repeated and resumed `fit` calls
continue one run (one event file, one step count, detectors that keep their state)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import graddiag  # noqa: E402

try:  # a checkout first (an editable install maps graddiag.integrations to its own tree)
    from integrations.keras import GradDiagCallback
except ImportError:  # installed: graddiag.integrations
    from graddiag.integrations.keras import GradDiagCallback

BATCH = 8


class SideNet(keras.Model):
    """`side` is trainable but cut from the loss by `stop_gradient` (detached)."""

    def __init__(self):
        super().__init__(name="sidenet")
        self.fc = keras.layers.Dense(8, activation="tanh", name="fc")
        self.head = keras.layers.Dense(1, name="head")
        self.side = keras.layers.Dense(1, name="side")

    def call(self, x):
        return self.head(self.fc(x)) + 0.0 * tf.stop_gradient(self.side(x))


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def compiled(model=None):
    keras.utils.set_random_seed(0)
    model = model or keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="fc"), keras.layers.Dense(1, name="head")]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


def test_three_fits_are_one_run_numbered_by_optimizer_iterations(tmp_path):
    model = compiled()
    x, y = data(8 * BATCH)
    cb = GradDiagCallback(
        tmp_path / "run", every=3, detectors={"spike": False}, print_summary=False
    )
    for _ in range(3):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations) == 24
    assert [s.step for s in cb.monitor.history] == list(range(24))
    cb.close()
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    df = graddiag.read(tmp_path / "run")
    grad = df[df.stat == "grad_norm"]
    assert sorted(grad.step.unique()) == list(range(24))
    assert grad.groupby(["step", "layer"]).size().max() == 1  # no step written twice
    assert df.run.nunique() == 1


def test_detectors_keep_their_state_across_fits():
    model = SideNet()
    x, y = data(2 * BATCH)
    model(x[:1])
    compiled(model)
    cb = GradDiagCallback(
        every=1, detectors={"spike": False, "detached": {"patience": 3}}, print_summary=False
    )
    for _ in range(3):  # 2 steps a fit: `detached` (a 3-step window) is seen only across fits
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    detached = [(f.step, f.layer) for f in cb.findings if f.kind == "detached"]
    assert detached == [(2, "side")]


def test_training_without_the_callback_or_a_new_callback_continues_from_iterations(tmp_path):
    model = compiled()
    x, y = data(4 * BATCH)
    cb = GradDiagCallback(every=2, print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # steps 4-7, not monitored
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    assert [s.step for s in cb.monitor.history] == [0, 1, 2, 3, 8, 9, 10, 11]
    model.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")  # optimizer state restored
    fresh = GradDiagCallback(every=2, print_summary=False)
    resumed.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[fresh])
    assert [s.step for s in fresh.monitor.history] == [12, 13, 14, 15]


def test_a_recompiled_model_starts_a_new_run():
    model = compiled()
    x, y = data(2 * BATCH)
    cb = GradDiagCallback(every=1, print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    first = cb.monitor
    model.compile(keras.optimizers.SGD(0.05), "mse")  # a new optimizer: iterations start at 0
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])
    assert cb.monitor is not first and first.core.closed
    assert [s.step for s in cb.monitor.history] == [0, 1]
