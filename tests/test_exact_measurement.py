"""Norms are right for every finite float32 gradient: float32 sums of squares overflow for elements
above ~1e19 and underflow below ~1e-19; graddiag decides non-finite from the elements and measures
such parameters in float64 (the current step at once, later steps from then on)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graddiag.torch import GradientMonitor  # noqa: E402

#: float64 reference vs graddiag's float64 measurement of the same float32 values
REL = 1e-6


class Scaled(nn.Module):
    """Eight parallel layers whose gradients are scaled by `factor` in the backward pass (through a
    custom function), then an ordinary head. Eight same-shape tensors take the adapter's fastest
    path for small tensors (stacked, one float32 row-wise norm), where squares under/overflow."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.first = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))
        self.second = nn.Linear(16, 1)
        self.factor = factor

    def forward(self, x):
        h = sum(_GradScale.apply(layer(x), self.factor) for layer in self.first)
        return self.second(torch.tanh(h))


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _exact_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))


def _run(factor, steps=4, **kw):
    torch.manual_seed(0)
    model = Scaled(factor)
    mon = GradientMonitor(model, every=kw.pop("every", 1), **kw)
    norms = []
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        norms.append(_exact_norm(model.first[0].parameters()))
        mon.step()
    mon.close()
    return mon, norms


@pytest.mark.parametrize("factor", [1e-24, 1e-30])
def test_underflowing_gradients_are_measured_not_zero(factor):
    mon, norms = _run(factor)
    assert min(norms) > 0
    got = [s.grad_norm[0] for s in mon.history]
    assert got == pytest.approx(norms, rel=REL, abs=0)
    bad = [f for f in mon.findings if f.kind in ("dead", "frozen", "zero_gradient")]
    assert bad == []


def test_overflowing_finite_gradients_are_not_nonfinite():
    mon, norms = _run(1e21)
    got = [s.grad_norm[0] for s in mon.history]
    assert all(math.isfinite(n) for n in norms)
    assert got == pytest.approx(norms, rel=REL, abs=0)
    assert not [f for f in mon.findings if f.kind == "nonfinite"]


def test_skip_policy_does_not_skip_a_finite_overflowing_step():
    mon, _ = _run(1e21, nonfinite="skip", every=10)
    assert not any(s.skipped for s in mon.history)
    assert not [f for f in mon.findings if f.kind == "nonfinite"]


def test_later_steps_are_measured_exactly_after_a_log_step():
    """every=2: the first log step measures the suspicious parameter again; from then on it is in
    the plan's float64 group, so even steps between log steps are exact."""
    mon, norms = _run(1e-24, steps=7, every=2)
    got = [s.grad_norm[0] for s in mon.history]
    assert got[1:] == pytest.approx(
        norms[1:], rel=REL, abs=0
    )  # step 0 is before anything was known


def test_a_truly_zero_layer_stays_zero_and_is_not_remeasured_forever():
    torch.manual_seed(0)
    model = Scaled(0.0)
    mon = GradientMonitor(model, every=1)
    for _ in range(5):
        model.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        mon.step()
    assert [s.grad_norm[0] for s in mon.history] == [0.0] * 5
    assert 0 in mon._true_zero and 0 not in mon._exact


def test_a_steps_gradients_are_not_kept_alive_after_it():
    """The re-measurement at a log step needs the step's gradients; they are released after it."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = Scaled(1.0)
    mon = GradientMonitor(model, every=3)
    model(torch.randn(8, 16)).square().mean().backward()
    mon.step()
    ref = weakref.ref(model.second.weight.grad)
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert ref() is None


def test_an_overflow_between_log_steps_reads_as_exploding_not_nonfinite():
    """every=10: steps 0-8 are read at step 9 as float32 sums of squares (+inf for these finite
    gradients); the log step's exact measurement shows the parameter finite and huge, so the
    earlier +inf are overflows — recorded as a lower bound, never a NaN/Inf error."""
    mon, norms = _run(1e21, steps=10, every=10)
    assert all(math.isfinite(n) for n in norms)
    assert not [f for f in mon.findings if f.kind == "nonfinite"]
    got = [s.grad_norm[0] for s in mon.history]
    assert all(math.isfinite(g) for g in got)
    assert got[-1] == pytest.approx(norms[-1], rel=REL, abs=0)  # the log step: exact
    assert all(g >= 1.8e19 for g in got[:-1])  # the bound: at least what float32 could not hold
    assert not any(s.nonfinite.any() for s in mon.history)
    assert ("exploding", "first.0", 0) in [(f.kind, f.layer, f.step) for f in mon.findings]


class _InfOnce(torch.autograd.Function):
    """Identity whose backward returns +inf at the step `at` (a real Inf, not an overflow)."""

    step = 0
    at = 3

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * (math.inf if _InfOnce.step == _InfOnce.at else 1.0)


def test_a_real_inf_between_log_steps_is_still_nonfinite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1))
    mon = GradientMonitor(model, every=10)
    for step in range(10):
        _InfOnce.step = step
        model.zero_grad()
        h = _InfOnce.apply(model[0](torch.randn(8, 16)).abs() + 1)
        model[1](h).sum().backward()
        mon.step()
    mon.close()
    bad = [f for f in mon.findings if f.kind == "nonfinite"]
    assert bad and bad[0].step == 3
