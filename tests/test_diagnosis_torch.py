"""Every detector: silent on healthy training, and on a broken run it names the right layer and step."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graddiag.torch import GradientMonitor  # noqa: E402


def kinds(mon):
    return sorted({f.kind for f in mon.findings})


def by_kind(mon, kind):
    return [f for f in mon.findings if f.kind == kind]


# ------------------------------------------------------------------------------ healthy runs
def test_healthy_residual_layernorm_mlp_adam_has_no_findings():
    from healthy import run

    mon = run(steps=300)
    assert mon.findings == []


def _train_classifier(model, x, y, steps, lr=1e-3, micro_batches=1, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mon = GradientMonitor(model, opt, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro_batches):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) / micro_batches
            loss.backward()
        opt.step()
    mon.close()
    return mon


def test_healthy_small_cnn_has_no_findings():
    torch.manual_seed(0)
    x = torch.randn(256, 1, 12, 12)
    y = (x[:, 0, :6].mean((1, 2)) > 0).long()
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    mon = _train_classifier(model, x, y, steps=150)
    assert mon.findings == []


class TinyTransformer(nn.Module):
    def __init__(self, vocab=32, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def test_healthy_small_transformer_has_no_findings():
    torch.manual_seed(0)
    x = torch.randint(0, 32, (256, 10))
    y = (x[:, 0] < 16).long()
    mon = _train_classifier(TinyTransformer(), x, y, steps=120)
    assert mon.findings == []


def test_intentional_accumulation_over_micro_batches_is_silent():
    from forgot_zero_grad import run

    mon = run(steps=30, zero_grad=True, micro_batches=4)
    assert mon.findings == []
    assert all(s.backward_calls == 4 for s in list(mon.history)[1:])
    assert all(s.grad_reset for s in list(mon.history)[1:])


def test_healthy_run_with_clipping_reports_only_clip_rate():
    from healthy import run

    from graddiag.clip import GlobalNormClip

    mon = run(steps=100, clip=GlobalNormClip(1e-3))
    assert kinds(mon) == ["clipped"]
    (f,) = mon.findings
    assert f.value == pytest.approx(1.0) and f.severity == "warning"


# ------------------------------------------------------------------------------ broken runs
def test_vanishing_names_the_layers_near_the_input():
    from vanishing import run

    mon = run(steps=40)
    found = by_kind(mon, "vanishing")
    assert kinds(mon) == ["vanishing"]
    assert {f.step for f in found} == {9}  # patience 10: first reported at step 9
    layers = [f.layer for f in found]
    assert layers[0] == "0"  # the input layer is the worst
    assert "32" not in layers and "30" not in layers  # the top of the stack still learns
    assert all(f.value < 1e-3 for f in found)  # relative to the largest layer


@pytest.mark.parametrize("trace, layer", [(False, "mid"), (True, "norm")])
def test_nonfinite_names_first_layer_and_step(trace, layer):
    from nan_layer import NAN_STEP, run

    mon = run(steps=40, trace_nonfinite=trace)
    (f,) = by_kind(mon, "nonfinite")
    assert (f.step, f.layer, f.severity) == (NAN_STEP, layer, "error")
    assert "'mid'" in f.message
    assert kinds(mon) == ["nonfinite"]


def test_frozen_and_detached():
    from frozen_detached import run

    mon = run(steps=40)
    got = {(f.kind, f.layer, f.severity, f.step) for f in mon.findings}
    assert got == {
        ("frozen", "embed", "info", 0),  # requires_grad=False
        ("frozen", "extra", "warning", 0),  # not in the optimizer
        ("dead", "gate", "warning", 19),  # an exactly-zero gradient on the first 20 steps
        ("detached", "aux", "warning", 19),  # no gradient on the first 20 steps
    }


def test_forgotten_zero_grad_is_reported_at_step_1():
    from forgot_zero_grad import run

    mon = run(steps=20)
    (f,) = mon.findings
    assert (f.kind, f.step, f.layer) == ("accumulation", 1, None)
    assert all(s.grad_reset is False for s in list(mon.history)[1:])


def test_forgotten_zero_grad_with_set_to_none_false_neighbour_is_detected_correctly():
    """zero_grad(set_to_none=False) zeroes in place: a reset, not accumulation."""
    from healthy import build

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = GradientMonitor(model, opt, every=1)
    for _ in range(5):
        opt.zero_grad(set_to_none=False)
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
    mon.close()
    assert mon.findings == []


def test_exploding_is_judged_against_the_runs_first_steps():
    """Large gradients from step 0 on (a deep linear stack at a big init, LR 0) are the run's own
    scale, not an explosion; the same net whose weights grow 2x at step 5 explodes from there."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32, bias=False) for _ in range(8)])
    for m in model:
        nn.init.normal_(m.weight, std=1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = GradientMonitor(model, opt, every=1)
    for step in range(12):
        if step == 5:
            with torch.no_grad():
                for m in model:
                    m.weight.mul_(2.0)  # gradients grow ~2^7 = 128x
        opt.zero_grad()
        model(torch.randn(16, 32)).square().mean().backward()
        opt.step()
    mon.close()
    assert mon.history[0].global_norm > 1e3  # the old absolute threshold fired here
    (f,) = by_kind(mon, "exploding")
    norms = mon.history[5].grad_norm
    assert (f.step, f.layer) == (5, mon.layers[int(norms.argmax())])
    assert f.value > 100 * mon.history[0].global_norm


def test_spike_at_the_bad_batch():
    from healthy import build

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = GradientMonitor(model, opt)
    g = torch.Generator().manual_seed(0)
    for step in range(80):
        opt.zero_grad()
        x = torch.randn(64, 16, generator=g)
        y = torch.randn(64, 1, generator=g) * (300.0 if step == 50 else 1.0)  # one corrupted batch
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    mon.close()
    (f,) = by_kind(mon, "spike")
    assert f.step == 50 and f.value > 6
    assert f.layer == "6"  # the output layer carries most of the jump
    assert kinds(mon) == ["spike"]  # one outlier step: a spike, not an explosion
