"""A resumed run continues its step count (`start_step=`), in both frameworks, and the reader sees
the two sessions as one run."""

from __future__ import annotations

import numpy as np
import pytest

import graddiag


def _torch_session(logdir, start_step, steps, every=4):
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, opt, logdir=logdir, every=every, start_step=start_step) as mon:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            opt.step()
    return mon


def _tf_session(logdir, start_step, steps, every=4):
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    from graddiag.tf import GradientMonitor

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    with GradientMonitor(model, logdir, every=every, start_step=start_step) as mon:
        for _ in range(steps):
            with mon.tape() as tape:
                loss = tf.reduce_mean(tf.square(model(tf.random.normal((8, 3)))))
            tape.gradient(loss, model.trainable_variables)
    return mon


@pytest.mark.parametrize("session", [_torch_session, _tf_session], ids=["torch", "tf"])
def test_resumed_run_continues_the_step_count(session, tmp_path):
    logdir = str(tmp_path / "run")
    first = session(logdir, 0, 6)
    second = session(logdir, 6, 7)
    assert [s.step for s in first.history] == list(range(6))
    assert [s.step for s in second.history] == list(range(6, 13))
    df = graddiag.read(logdir)
    steps = np.unique(df[df.stat == "grad_norm"].step)
    assert steps.tolist() == list(range(13))
    assert df.run.nunique() == 1


def test_start_step_must_be_a_non_negative_int():
    from graddiag.settings import Settings

    with pytest.raises(ValueError, match="`start_step`.*-1"):
        Settings(start_step=-1)
