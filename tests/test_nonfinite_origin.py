"""`trace_nonfinite=True` finds where a NaN/Inf is born: in the forward pass (the first module whose
output is non-finite while its inputs were finite) or in the backward pass; the finding says
which, and the post-hoc analysis of the logs agrees."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import graddiag  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402


class LogBlock(nn.Module):
    """A block whose forward takes a log: -inf where its input is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.log(torch.relu(self.lin(x)) + self.eps)

    eps = 1e-3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.block = LogBlock()
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.block(torch.tanh(self.embed(x))))))


class BadGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class BadBackwardBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return BadGrad.apply(self.lin(x))


def _train(model, logdir, bad_at, steps=6):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights do not move: one NaN step
    mon = GradientMonitor(model, opt, logdir=logdir, every=2, trace_nonfinite=True)
    torch.manual_seed(0)
    for step in range(steps):
        opt.zero_grad()
        if step == bad_at and isinstance(model.block, LogBlock):
            model.block.eps = 0.0  # log(0) = -inf inside the block, at this step only
        model(torch.randn(16, 4)).square().mean().backward()
        model.block.eps = 1e-3 if isinstance(model.block, LogBlock) else None
        opt.step()
    mon.close()
    return mon


def test_nan_born_in_the_forward_pass_is_named_with_its_module(tmp_path):
    mon = _train(Net(), tmp_path / "run", bad_at=3)
    nf = [f for f in mon.findings if f.kind == "nonfinite"]
    assert len(nf) == 1 and nf[0].step == 3
    assert nf[0].layer == "block" and "forward pass" in nf[0].message
    post = [f for f in graddiag.analyze(str(tmp_path / "run")).findings if f.kind == "nonfinite"]
    assert [(f.step, f.layer) for f in post] == [(3, "block")]
    assert "forward pass" in post[0].message


def test_nan_born_in_the_backward_pass_is_named_as_such(tmp_path):
    model = Net()
    model.block = BadBackwardBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, opt, every=1, trace_nonfinite=True) as mon:
        opt.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()
    nf = [f for f in mon.findings if f.kind == "nonfinite"]
    assert nf and nf[0].layer == "block" and "backward pass" in nf[0].message


def test_tracing_hooks_do_not_make_torch_warn_about_the_users_model():
    import warnings

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    mon = GradientMonitor(model, trace_nonfinite=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.filterwarnings("always", append=True)  # after the filters already in place
        model(torch.randn(16, 4)).square().mean().backward()  # inputs need no gradient
        mon.step()
    mon.close()
    assert [str(w.message) for w in seen if issubclass(w.category, UserWarning)] == []
