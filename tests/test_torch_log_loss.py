"""`GradientMonitor.log_loss`: the loss of a step whose optimizer `step()` is hooked (and takes
no loss) is logged with that step, read back post hoc, and drives the divergence detector."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import graddiag  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402


def _train(tmp_path, steps=12, lr=1e-2, every=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    with GradientMonitor(model, opt, logdir=str(tmp_path), every=every) as mon:
        for _ in range(steps):
            x = torch.randn(32, 8)
            opt.zero_grad()
            loss = (model(x) - x[:, :1]).square().mean()
            loss.backward()
            mon.log_loss(loss)
            losses.append(loss.item())
            opt.step()
    return mon, losses


def test_logged_loss_is_each_steps_own_live_and_post_hoc(tmp_path):
    mon, losses = _train(tmp_path)
    assert [s.loss for s in mon.history] == pytest.approx(losses, rel=1e-6)
    df = graddiag.read(tmp_path)
    got = df[(df.stat == "loss") & (df.layer == "")].sort_values("step").value.tolist()
    assert got == pytest.approx(losses, rel=1e-6)


def test_a_loss_given_once_is_used_once(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, opt, every=1)
    for i in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        if i == 0:
            mon.log_loss(2.5)
        opt.step()
    mon.close()
    assert [s.loss for s in mon.history] == [2.5, None, None]


def test_a_diverging_loss_given_through_log_loss_is_found(tmp_path):
    mon, losses = _train(tmp_path, steps=20, lr=3.0, every=1)
    assert not math.isfinite(losses[-1]) or losses[-1] > 100 * losses[0]
    (div,) = [f for f in mon.findings if f.kind == "divergence"]  # needs the loss: log_loss
    assert div.step == 1 and "Loss rose" in div.message


@pytest.mark.parametrize(
    "bad, err, words",
    [
        (torch.ones(3), ValueError, "`loss` to be a scalar, got a tensor of shape (3,)"),
        ("1.0", TypeError, "`loss` to be a scalar tensor or a number, got str: '1.0'"),
        (True, TypeError, "got bool: True"),
    ],
)
def test_bad_loss_names_the_argument_and_value(bad, err, words):
    mon = GradientMonitor(nn.Linear(2, 1))
    with pytest.raises(err) as e:
        mon.log_loss(bad)
    assert words in str(e.value)
    mon.close()
