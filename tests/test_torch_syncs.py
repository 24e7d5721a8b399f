"""Host syncs: none on ordinary steps, one read of the ring buffer per log step, none per tensor.

On CPU a "sync" is any device-to-host read; we count every way torch offers one.
"""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graddiag.clip import GlobalNormClip  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture
def count_reads(monkeypatch):
    counts = {"n": 0}
    for name in READS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, **k):
            counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def test_one_host_read_per_log_step(count_reads, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(50)])  # 100 tensors
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 16)
    mon = GradientMonitor(
        model,
        opt,
        logdir=tmp_path,
        every=5,
        clip=GlobalNormClip(1e-3),
        hist_every=0,
        detail_every=0,
    )
    per_step = []
    for _ in range(15):
        opt.zero_grad()
        model(x).square().mean().backward()
        before = count_reads["n"]
        opt.step()
        per_step.append(count_reads["n"] - before)
    mon.close()
    assert per_step == [0, 0, 0, 0, 1] * 3
    assert len(mon.history) == 15


def test_skip_policy_costs_one_read_per_step(count_reads):
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(10)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = GradientMonitor(model, opt, every=5, nonfinite="skip", hist_every=0, detail_every=0)
    per_step = []
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        before = count_reads["n"]
        opt.step()
        per_step.append(count_reads["n"] - before)
    mon.close()
    assert per_step == [1, 1, 1, 1, 2]  # the finiteness check; plus the buffer read on the log step
