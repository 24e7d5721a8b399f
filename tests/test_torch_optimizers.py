"""Every optimizer the user has: several optimizers, parameter groups added later, a GAN's two
optimizers under one monitor, and an accumulation probe that freezes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graddiag.torch import GradientMonitor  # noqa: E402


def kinds(mon, severity=("warning", "error")):
    return [(f.kind, f.layer) for f in mon.findings if f.severity in severity]


def test_two_optimizers_hold_everything_no_false_unoptimized():
    """SparseAdam for the embedding, Adam for the rest: nothing is "not in the optimizer"."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, sparse=True)
    head = nn.Linear(8, 1)
    model = nn.ModuleDict({"emb": emb, "head": head})
    sparse = torch.optim.SparseAdam(emb.parameters(), lr=1e-2)
    dense = torch.optim.Adam(head.parameters(), lr=1e-2)
    mon = GradientMonitor(model, [sparse, dense], every=1)
    for _ in range(6):
        sparse.zero_grad()
        dense.zero_grad()
        ids = torch.randint(0, 50, (16,))
        head(emb(ids)).square().mean().backward()
        sparse.step()
        dense.step()
    mon.close()
    assert not [f for f in mon.findings if f.kind == "frozen" and f.severity != "info"]
    assert ("accumulation", None) not in kinds(mon)


def test_one_optimizer_of_two_missing_is_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    mon = GradientMonitor(model, opt, every=1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    mon.close()
    frozen = [f for f in mon.findings if f.kind == "frozen" and f.severity == "warning"]
    assert [f.layer for f in frozen] == ["0"]


def test_add_param_group_after_construction_is_seen():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    mon = GradientMonitor(model, opt, every=1)
    opt.add_param_group({"params": model[0].parameters()})
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    mon.close()
    assert not [f for f in mon.findings if f.kind == "frozen" and f.severity != "info"]


def _gan_step(g, d, og, od, bce, z):
    real = torch.randn(16, 2) + 3.0
    od.zero_grad()
    fake = g(z).detach()
    loss_d = bce(d(real), torch.ones(16, 1)) + bce(d(fake), torch.zeros(16, 1))
    loss_d.backward()
    od.step()
    og.zero_grad()
    loss_g = bce(d(g(z)), torch.ones(16, 1))
    loss_g.backward()
    og.step()


@pytest.mark.parametrize("forget", [False, True])
def test_gan_with_one_monitor_over_two_optimizers(forget):
    """Each optimizer's reset is checked on its own probe: a healthy GAN has no accumulation
    finding (it had 30 in 60 steps); forgetting the generator's zero_grad is found."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    d = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    og = torch.optim.Adam(g.parameters(), lr=1e-3)
    od = torch.optim.Adam(d.parameters(), lr=1e-3)
    model = nn.ModuleDict({"g": g, "d": d})
    mon = GradientMonitor(model, [od, og], every=5)
    bce = nn.BCEWithLogitsLoss()
    if forget:
        og.zero_grad = lambda *a, **k: None
    for _ in range(30):
        _gan_step(g, d, og, od, bce, torch.randn(16, 4))
    mon.close()
    acc = [f for f in mon.findings if f.kind == "accumulation"]
    assert bool(acc) == forget


def test_frozen_probe_is_chosen_again_and_still_finds_a_forgotten_zero_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = GradientMonitor(model, opt, every=1)
    for step in range(12):
        if step < 4:
            opt.zero_grad()
        if step == 3:
            model[2].requires_grad_(False)  # the head: the first parameters in backward order
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    mon.close()
    acc = [f for f in mon.findings if f.kind == "accumulation"]
    assert acc and acc[0].step <= 6


def test_freezing_mid_run_under_set_to_none_false_is_not_a_warning():
    """`requires_grad_(False)` mid-run with `zero_grad(set_to_none=False)`: the layer's stale
    gradient stays exactly zero; the adapter tells the detectors the layer no longer trains, so it
    is info (frozen on purpose), not a `dead`/`frozen` warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = GradientMonitor(model, opt, every=5)
    for step in range(40):
        if step == 10:
            model[0].requires_grad_(False)
        opt.zero_grad(set_to_none=False)
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    mon.close()
    assert kinds(mon) == []
    assert mon.history[-1].trainable.tolist() == [False, True]


@pytest.mark.parametrize("own_clip", [False, True])
def test_gradients_changed_between_backward_and_step_are_reported(own_clip):
    """A loop that keeps its own clip_grad_norm_ makes graddiag measure clipped gradients: it
    says so once (a `modified` warning); a plain loop gets no such finding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = GradientMonitor(model, opt, every=4)
    for _ in range(12):
        opt.zero_grad()
        (model(torch.randn(8, 4)) * 100).square().mean().backward()
        if own_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
    mon.close()
    modified = [f for f in mon.findings if f.kind == "modified"]
    if own_clip:
        assert len(modified) == 1 and modified[0].step == 1 and modified[0].severity == "warning"
        assert mon.history[-1].global_norm == pytest.approx(0.25, rel=1e-4)  # what it measured
    else:
        assert modified == []


@pytest.mark.parametrize("own_clip", [False, True])
def test_amp_loop_that_unscales_and_clips_itself(own_clip):
    """The documented AMP recipe (unscale_, clip_grad_norm_, scaler.step) is reported; unscale_
    alone is not a change of the gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    mon = GradientMonitor(model, opt, every=4, scaler=scaler)
    for _ in range(8):
        opt.zero_grad()
        scaler.scale((model(torch.randn(8, 4)) * 100).square().mean()).backward()
        scaler.unscale_(opt)
        if own_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        scaler.step(opt)
        scaler.update()
    mon.close()
    assert bool([f for f in mon.findings if f.kind == "modified"]) == own_clip
