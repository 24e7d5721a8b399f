"""graddiag.torch with a model that is not fixed when the monitor is built: lazy modules before
their first forward pass (a clear error), parameters that begin to train later (one warning and an
`unmonitored` info finding naming them)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graddiag.torch import GradientMonitor, UnmonitoredWarning  # noqa: E402


def train(model, mon, steps: int) -> None:
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        mon.step()


def test_lazy_module_before_its_first_forward_is_a_clear_error():
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 1))
    with pytest.raises(
        ValueError, match=r"uninitialized \(lazy\) parameters: 0\.weight \(LazyLinear\)"
    ):
        GradientMonitor(model)
    with pytest.raises(ValueError, match="Run one forward pass first"):
        GradientMonitor(model)


def test_lazy_module_after_one_forward_pass_is_monitored():
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 1))
    model(torch.randn(2, 4))
    mon = GradientMonitor(model, every=1)
    train(model, mon, 3)
    assert mon.layers == ["0", "2"]
    assert [s.step for s in mon.history] == [0, 1, 2]
    assert all(s.grad_norm[0] > 0 for s in mon.history)
    mon.close()


def unfreeze(model):
    model[0].weight.requires_grad_(True)
    return ["0.weight"]


def append_layer(model):
    model.append(nn.Linear(1, 1))
    return ["3.weight", "3.bias"]


def weight_norm(model):
    nn.utils.parametrizations.weight_norm(model[2])
    return ["2.parametrizations.weight.original0", "2.parametrizations.weight.original1"]


@pytest.mark.parametrize("change", [unfreeze, append_layer, weight_norm])
def test_parameters_that_begin_to_train_later_are_reported_once(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    mon = GradientMonitor(model, every=2, detectors={"spike": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmonitoredWarning)
        train(model, mon, 4)
    names = change(model)
    with pytest.warns(UnmonitoredWarning, match="not monitored: " + names[0]) as caught:
        train(model, mon, 6)
    assert len([w for w in caught if w.category is UnmonitoredWarning]) == 1
    found = [f for f in mon.findings if f.kind == "unmonitored"]
    assert len(found) == 1
    assert found[0].step == 5  # the first log step after the change
    assert found[0].severity == "info" and found[0].value == len(names)
    assert all(n in found[0].message for n in names)
    assert "start_step" in found[0].suggestion
    assert mon.unmonitored == names
    mon.close()
