"""Keras `fit` in unusual setups: `steps_per_execution > 1` logs every step under its own number
(`tf.distribute`: tests/test_tf_distribute.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import graddiag  # noqa: E402
import graddiag.tf  # noqa: E402

try:  # a checkout first (an editable install maps graddiag.integrations to its own tree)
    from integrations.keras import GradDiagCallback
except ImportError:  # installed: graddiag.integrations
    from graddiag.integrations.keras import GradDiagCallback

BATCH = 8
STEPS = 16
#: float32 norms of the same gradients computed in one execution of 1 or of 4 steps.
REL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def fit(logdir, steps_per_execution: int, every: int, nan_batch: int | None = None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, name="fc"), keras.layers.Dense(1, name="head")]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=steps_per_execution)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")
    y = rng.normal(size=(STEPS * BATCH, 1)).astype("float32")
    if nan_batch is not None:
        x[nan_batch * BATCH] = np.nan
    cb = GradDiagCallback(logdir, every=every, detectors={"spike": False}, print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    cb.close()
    return cb


def grad_norms(logdir) -> dict[int, float]:
    df = graddiag.read(logdir)
    g = df[(df.stat == "grad_norm") & (df.layer == "")]
    return dict(zip(g.step.astype(int), g.value, strict=True))


@pytest.mark.parametrize("every", [1, 3])
def test_steps_per_execution_logs_every_step_under_its_own_number(tmp_path, every):
    fit(tmp_path / "one", 1, every)
    cb = fit(tmp_path / "four", 4, every)
    assert [s.step for s in cb.monitor.history] == list(range(STEPS))
    expected, got = grad_norms(tmp_path / "one"), grad_norms(tmp_path / "four")
    assert sorted(got) == list(range(STEPS))
    for step in range(STEPS):  # the same gradients as one step per execution, step by step
        assert got[step] == pytest.approx(expected[step], rel=REL)


@pytest.mark.parametrize("every", [1, 3])
def test_steps_per_execution_reports_a_nan_at_its_step(tmp_path, every):
    cb = fit(tmp_path / "run", 4, every, nan_batch=5)
    first = min(f.step for f in cb.findings if f.kind == "nonfinite")
    assert first == 5
    assert sorted(grad_norms(tmp_path / "run")) == list(range(STEPS))


def test_a_later_fit_with_more_steps_per_execution_keeps_every_step(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="head")])
    x = np.ones((8 * BATCH, 4), "float32")
    y = np.zeros((8 * BATCH, 1), "float32")
    cb = GradDiagCallback(tmp_path / "run", every=1, print_summary=False)
    opt = keras.optimizers.SGD(0.01)
    for spe in (1, 4):  # recompiled with the same optimizer: one run, steps 0-7 then 8-15
        model.compile(opt, "mse", steps_per_execution=spe)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert cb.monitor._capacity == 4
    cb.close()
    assert sorted(grad_norms(tmp_path / "run")) == list(range(16))


def test_nonfinite_skip_reports_a_nan_in_the_middle_of_an_execution_at_once():
    """`every` 10 > 4 steps per execution and the steps after the NaN are finite again: the
    device flag stays set until the poll after the execution has read step 1 back."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="head")])
    model.compile(keras.optimizers.SGD(0.01), "mse", steps_per_execution=4)
    x = np.ones((8 * BATCH, 4), "float32")
    x[1 * BATCH] = np.nan
    y = np.zeros((8 * BATCH, 1), "float32")
    cb = GradDiagCallback(every=10, nonfinite="skip", print_summary=False)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(
            [f.step for f in cb.findings if f.kind == "nonfinite"]
        )
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb, record])
    assert seen == [[1], [1]]  # after the first execution already, not at the end of the fit
    assert np.isfinite(model.get_weights()[0]).all()  # the NaN step was skipped


def test_steps_per_poll_is_validated():
    with pytest.raises(ValueError, match="`steps_per_poll` to be an int >= 1, got 0"):
        graddiag.tf.GradientMonitor([tf.Variable(1.0)], read_back="poll", steps_per_poll=0)
