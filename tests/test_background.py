"""The log-step host work on the background worker, delayed reads (CUDA's path, run here on the
CPU) and the device-side skip of a non-finite step: same results as the synchronous path."""

import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import graddiag.torch.monitor as torch_monitor  # noqa: E402
from graddiag.detectors import Detector  # noqa: E402
from graddiag.events import Worker, WorkerWarning  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402

#: float64 host sums of the same float64 rows: identical up to summation order
NORM_RTOL = 1e-12


# ---------------------------------------------------------------------------- the worker
def test_worker_runs_jobs_in_order_and_wait_returns_after_them():
    w = Worker("t")
    seen, gate = [], threading.Event()
    w.submit(gate.wait, 5)
    tickets = [w.submit(seen.append, i) for i in range(5)]
    assert w.pending >= 5  # held back by the gate
    gate.set()
    w.wait(tickets[2])
    assert seen[:3] == [0, 1, 2]
    w.wait()
    assert seen == [0, 1, 2, 3, 4] and w.pending == 0
    w.close()
    w.submit(seen.append, 5)  # after close: runs at once in this thread
    assert seen[-1] == 5


def test_worker_failure_warns_once_and_work_goes_on():
    w = Worker("t")
    seen = []
    with pytest.warns(WorkerWarning, match="ZeroDivisionError"):
        w.submit(lambda: 1 / 0)
        w.submit(seen.append, 1)
        w.wait()
        w.close()  # a warning raised in the thread is recorded by the (process-wide) filter
    assert seen == [1] and w.failures == 1
    w2 = Worker("t2")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            w2.submit(lambda: 1 / 0)
        w2.close()
    assert w2.failures == 3
    assert sum(issubclass(r.category, WorkerWarning) for r in rec) == 1


def test_worker_close_runs_queued_jobs_and_a_last_tick():
    ticks = []
    w = Worker("t", tick=lambda: ticks.append(1), interval=60.0)
    seen = []
    for i in range(3):
        w.submit(seen.append, i)
    w.close()
    assert seen == [0, 1, 2] and ticks  # the last tick (the writer's final flush) ran


# ---------------------------------------------------------------------------- monitors
def _broken_run(background: bool, delayed: bool, monkeypatch, tmp_path, every=5, steps=23):
    """A model whose first layer's gradient explodes at step 12 and is NaN at step 17."""
    monkeypatch.setattr(torch_monitor, "_reads_delayed", lambda device: delayed)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = GradientMonitor(
        model, opt, logdir=tmp_path / f"{background}{delayed}", every=every, detail_every=4
    )
    mon._host.background = background
    x = torch.randn(32, 8)
    for step in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step == 12:
            model[0].weight.grad.mul_(1e6)
        if step == 17:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()  # hooked: measures
    mon.close()
    hist = mon.history
    findings = [(f.step, f.kind, f.layer, f.severity) for f in mon.findings]
    return mon, hist, findings


@pytest.mark.parametrize("delayed", [False, True])
def test_background_and_delayed_reads_give_the_same_results(monkeypatch, tmp_path, delayed):
    _, ref_hist, ref_findings = _broken_run(False, False, monkeypatch, tmp_path)
    mon, hist, findings = _broken_run(True, delayed, monkeypatch, tmp_path)
    assert findings == ref_findings
    assert {k for _, k, _, _ in findings} >= {"nonfinite", "spike"}
    assert [s.step for s in hist] == [s.step for s in ref_hist] == list(range(23))
    for a, b in zip(hist, ref_hist, strict=True):
        np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=NORM_RTOL)
        assert a.skipped == b.skipped and a.clip_coef == b.clip_coef


def test_report_findings_wait_for_the_background_work(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    mon = GradientMonitor(model, logdir=tmp_path, every=2, hist_every=0, detail_every=0)
    x = torch.randn(8, 4)
    model(x).sum().backward()
    mon.step()
    model.zero_grad()
    model(x).sum().backward()
    model[0].weight.grad[0, 0] = float("inf")
    report = mon.step()  # log step: diagnosed in the background
    assert report.logged
    assert [f.kind for f in report.findings] == ["nonfinite"]  # reading it waits
    assert report.stats.step == 1 and report.stats.any_nonfinite
    mon.close()


class _Broken(Detector):
    name = "broken"

    def update(self, stats):
        raise RuntimeError("a detector bug")


def test_background_failure_is_a_warning_not_a_training_error(tmp_path):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, opt, logdir=tmp_path, every=2, detectors=[_Broken()])
    with pytest.warns(WorkerWarning, match="a detector bug"):
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
        mon.close()
    assert mon.step_count == 6


def test_delayed_read_lands_one_step_later(monkeypatch):
    """CUDA's path on the CPU: the log step's rows are copied, read at the next step."""
    monkeypatch.setattr(torch_monitor, "_reads_delayed", lambda device: True)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, opt, every=3, hist_every=0, detail_every=0)
    seen = []
    for _ in range(7):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        mon._host.wait()
        seen.append(len(mon._host.core.history))
    # steps 0-2 are read at step 3, steps 3-5 at step 6: nothing is diagnosed before it lands
    assert seen == [0, 0, 0, 3, 3, 3, 6]
    mon.close()
    assert len(mon.history) == 7


@pytest.mark.parametrize("fused", [True, False])
def test_skip_on_the_device_with_a_fused_optimizer(monkeypatch, fused):
    """Under nonfinite="skip" with delayed reads, a fused optimizer is handed the step's
    non-finite flag (`found_inf`, as GradScaler does) and skips the update itself: no host read
    on the step. Without fused, the step is decided on the host (one read)."""
    monkeypatch.setattr(torch_monitor, "_reads_delayed", lambda device: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    mon = GradientMonitor(model, opt, every=4, nonfinite="skip", hist_every=0, detail_every=0)
    x = torch.randn(8, 4)
    reads = {"n": 0}
    orig = torch.Tensor.__bool__

    def counting(self):
        reads["n"] += 1
        return orig(self)

    before_bad = None
    for step in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step == 2:
            model[0].bias.grad[0] = float("nan")
            before_bad = [p.detach().clone() for p in model.parameters()]
        monkeypatch.setattr(torch.Tensor, "__bool__", counting)
        opt.step()
        monkeypatch.setattr(torch.Tensor, "__bool__", orig)
        if step == 2:
            for p, q in zip(model.parameters(), before_bad, strict=True):
                assert torch.equal(p.detach(), q)  # the update was skipped
    mon.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [s.skipped for s in mon.history] == [False, False, True, False, False, False]
    assert int(opt.state[model[0].weight]["step"]) == 5  # the skipped step did not count
    assert (reads["n"] == 0) if fused else (reads["n"] >= 6)
