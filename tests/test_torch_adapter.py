"""PyTorch adapter: statistics against torch computed by hand, clipping against torch's own."""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graddiag.clip import (  # noqa: E402
    AGC,
    AutoClip,
    GlobalNormClip,
    LayerNormClip,
    NumpyOps,
    ValueClip,
    ZClip,
    chain,
)
from graddiag.torch import GradientMonitor, NonFiniteGradientError  # noqa: E402

FP32_RTOL = 1e-5  # float32 sums of squares vs torch.linalg.vector_norm
CLIP_ATOL = 1e-6  # the bar for clipping equality


def layer_norms_by_hand(model, names):
    out = {}
    for n in names:
        mod = model.get_submodule(n) if n in dict(model.named_modules()) else model
        gs = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
        out[n] = torch.linalg.vector_norm(
            torch.stack(
                [
                    torch.linalg.vector_norm(
                        g.to_dense() if g.is_sparse else g, dtype=torch.float64
                    )
                    for g in gs
                ]
            )
        ).item()
    return out


class Mixed(nn.Module):
    """Same-shape small tensors (stacked), a large one (> STACK_MAX_NUMEL), a sparse embedding,
    a conv, and a weight shared by two modules."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, sparse=True)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.big = nn.Linear(16, 5000)
        self.conv = nn.Conv1d(1, 4, 3)
        self.tied = nn.Linear(16, 16, bias=False)
        self.tied2 = nn.Linear(16, 16, bias=False)
        self.tied2.weight = self.tied.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = torch.tanh(self.b(torch.tanh(self.a(h))))
        h = self.tied2(self.tied(h))
        c = self.conv(h[:, None, :]).mean()
        return self.big(h).square().mean() + c


def _run_mixed(every, steps=3, dtype=torch.float32):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    mon = GradientMonitor(model, every=every)
    seen = []
    for _s in range(steps):
        model.zero_grad()
        model(torch.randint(0, 50, (8,))).backward()
        mon.step()
        mon.flush()
        seen.append(layer_norms_by_hand(model, mon.layers))
    mon.close()
    return mon, seen


def test_layer_norms_equal_vector_norm_per_layer():
    mon, by_hand = _run_mixed(every=1)
    assert mon.layers == ["emb", "a", "b", "big", "conv", "tied"]
    assert len(mon.history) == 3
    for stats, ref in zip(mon.history, by_hand, strict=True):
        np.testing.assert_allclose(stats.grad_norm, [ref[n] for n in mon.layers], rtol=FP32_RTOL)
        assert stats.global_norm == pytest.approx(
            np.sqrt(sum(v**2 for v in ref.values())), rel=FP32_RTOL
        )


def test_ring_buffer_gives_same_stats_as_every_step():
    a, _ = _run_mixed(every=1, steps=7)
    b, _ = _run_mixed(every=4, steps=7)
    assert [s.step for s in b.history] == list(range(7))
    for x, y in zip(a.history, b.history, strict=True):
        np.testing.assert_allclose(x.grad_norm, y.grad_norm, rtol=1e-7)


def test_float64_and_bfloat16_models():
    mon, ref = _run_mixed(every=1, dtype=torch.float64)
    np.testing.assert_allclose(
        mon.history[-1].grad_norm, [ref[-1][n] for n in mon.layers], rtol=FP32_RTOL
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 1)).to(torch.bfloat16)
    mon = GradientMonitor(model, every=1)
    model(torch.randn(4, 8, dtype=torch.bfloat16)).sum().backward()
    mon.step()
    by_hand = layer_norms_by_hand(model, mon.layers)  # float64 accumulation of bf16 values
    np.testing.assert_allclose(
        mon.history[-1].grad_norm, [by_hand[n] for n in mon.layers], rtol=1e-5
    )


def test_shared_parameter_counted_once():
    mon, _ = _run_mixed(every=1, steps=1)
    assert "tied" in mon.layers and "tied2" not in mon.layers
    assert mon.core.info.shared == ("tied2.weight",)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def _grads_after(policy, model, x):
    mon = GradientMonitor(model, every=1, clip=policy)
    model.zero_grad()
    (model(x) * 50).square().mean().backward()
    mon.step()
    mon.close()
    return [p.grad.clone() for p in model.parameters()], mon


@pytest.mark.parametrize("max_norm", [0.01, 1.0, 1e6])
def test_global_norm_clip_equals_clip_grad_norm_(max_norm):
    x = torch.randn(16, 8)
    ours, mon = _grads_after(GlobalNormClip(max_norm), _mlp(), x)
    ref_model = _mlp()
    (ref_model(x) * 50).square().mean().backward()
    total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
    for a, p in zip(ours, ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=CLIP_ATOL, rtol=CLIP_ATOL)
    assert mon.history[-1].global_norm == pytest.approx(total.item(), rel=FP32_RTOL)
    expected = min(1.0, max_norm / (total.item() + 1e-6))
    assert mon.history[-1].clip_coef == pytest.approx(expected, rel=1e-5)


def test_value_clip_equals_clip_grad_value_():
    x = torch.randn(16, 8)
    ours, mon = _grads_after(ValueClip(0.05), _mlp(), x)
    ref_model = _mlp()
    (ref_model(x) * 50).square().mean().backward()
    torch.nn.utils.clip_grad_value_(ref_model.parameters(), 0.05)
    for a, p in zip(ours, ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=CLIP_ATOL, rtol=0)
    assert mon.history[-1].clip_coef < 1.0


def test_layer_norm_clip_by_hand():
    x = torch.randn(16, 8)
    ours, mon = _grads_after(LayerNormClip(0.5), _mlp(), x)
    ref_model = _mlp()
    (ref_model(x) * 50).square().mean().backward()
    expected_coefs = []
    for m in ref_model:
        ps = list(m.parameters(recurse=False))
        if ps:
            norm = torch.nn.utils.clip_grad_norm_(ps, 0.5).item()
            expected_coefs.append(min(1.0, 0.5 / (norm + 1e-6)))
    for a, p in zip(ours, ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=CLIP_ATOL, rtol=CLIP_ATOL)
    np.testing.assert_allclose(mon.history[-1].layer_clip_coef, expected_coefs, rtol=FP32_RTOL)
    assert min(expected_coefs) < 1.0


def test_agc_by_hand():
    x = torch.randn(16, 8)
    ours, _ = _grads_after(AGC(clipping=0.01), _mlp(), x)
    ref_model = _mlp()
    (ref_model(x) * 50).square().mean().backward()
    for a, p in zip(ours, ref_model.parameters(), strict=True):
        g = p.grad
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        wn = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True).clamp(min=1e-3)
        expected = torch.where(gn > 0.01 * wn, g * (0.01 * wn / gn), g)
        torch.testing.assert_close(a, expected, atol=CLIP_ATOL, rtol=1e-5)


@pytest.mark.parametrize(
    "policy",
    [AutoClip(percentile=30, history=8), ZClip(warmup=3, z_threshold=1.0)],
    ids=["autoclip", "zclip"],
)
def test_adaptive_policies_on_device_match_numpy_reference(policy):
    """The same policy math runs on torch tensors in the adapter and on NumPy here."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: norms depend on the batch
    mon = GradientMonitor(model, opt, every=1, clip=policy)
    state = policy.init(3, NumpyOps)
    for s in range(12):
        opt.zero_grad()
        scale = 20.0 if s in (6, 9) else 1.0
        (model(torch.randn(16, 8) * scale)).square().mean().backward()
        opt.step()
        st = mon.history[-1]
        scale_np, state = policy.factors(
            st.grad_norm, np.float64(st.global_norm), state, NumpyOps()
        )
        assert st.clip_coef == pytest.approx(float(scale_np.global_coef), rel=1e-4), s
    mon.close()
    assert any(s.clip_coef < 1 for s in mon.history)


def test_chain_composes_in_order():
    x = torch.randn(16, 8)
    ours, _ = _grads_after(chain(ValueClip(0.05), GlobalNormClip(0.1)), _mlp(), x)
    ref_model = _mlp()
    (ref_model(x) * 50).square().mean().backward()
    torch.nn.utils.clip_grad_value_(ref_model.parameters(), 0.05)
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
    for a, p in zip(ours, ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=CLIP_ATOL, rtol=CLIP_ATOL)


def test_nonfinite_skip_leaves_weights_untouched():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, opt, nonfinite="skip")
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    (model(torch.full((4, 8), float("nan")))).sum().backward()
    opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], equal_nan=True)
    assert mon.history[-1].skipped
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
    mon.close()


def test_nonfinite_raise_names_step_and_layer():
    from nan_layer import NAN_STEP, run

    with pytest.raises(NonFiniteGradientError, match=f"step {NAN_STEP}:.*'mid'"):
        run(nonfinite="raise")


def test_amp_grad_scaler_stats_are_unscaled():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mon = GradientMonitor(model, opt, scaler=scaler, every=1)
    x = torch.randn(16, 8)
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    ref = np.sqrt(sum(float((g.double() / 1024.0).square().sum()) for g in scaled))
    assert mon.history[-1].global_norm == pytest.approx(ref, rel=FP32_RTOL)
    mon.close()


def test_close_restores_optimizer_step_and_context_manager():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, opt) as mon:
        assert "step" in vars(opt)
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    assert "step" not in vars(opt)
    assert mon.step_count == 1 and len(mon.history) == 1
    with pytest.raises(RuntimeError, match="closed"):
        mon.step()


def test_manual_step_with_hooked_optimizer_is_an_error():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = GradientMonitor(model, opt)
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(RuntimeError, match="do not also call monitor.step"):
        mon.step()
    mon.close()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every=0), "`every`.*0"),
        (dict(every=2.5), "`every`.*2.5"),
        (dict(nonfinite="ignore"), "`nonfinite`.*'ignore'"),
        (dict(clip="big"), "`clip`.*'big'"),
        (dict(clip=GlobalNormClip), "`clip`"),
        (dict(detectors={"spike": {"z_threshold": -1}}), "`z_threshold`.*-1"),
        (dict(detectors={"nope": {}}), "nope"),
        (dict(hist_every=-1), "`hist_every`.*-1"),
    ],
)
def test_bad_settings_name_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mon = GradientMonitor(_mlp(), **kwargs)
        mon.step()  # detectors are built on the first step


def test_bad_model_and_optimizer():
    with pytest.raises(TypeError, match="`model`.*list"):
        GradientMonitor([1, 2])
    with pytest.raises(TypeError, match="`optimizer`"):
        GradientMonitor(_mlp(), optimizer="adam")
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradientMonitor(frozen)
    with pytest.raises(ValueError, match="max_norm.*-1"):
        GlobalNormClip(-1)


def test_unwritable_logdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="logdir"):
        GradientMonitor(_mlp(), logdir=blocker / "run")


def test_amp_overflow_steps_are_expected_not_errors():
    """GradScaler starts far too high: its first steps overflow and are skipped by the scaler —
    expected under AMP, not a finding — and later steps are measured on unscaled gradients."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**108, growth_interval=1000)
    mon = GradientMonitor(model, opt, scaler=scaler, every=1)
    x = torch.randn(16, 8)
    for _ in range(12):
        opt.zero_grad()
        scaler.scale((model(x) * 1e4).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    mon.close()
    overflowed = [s.step for s in mon.history if s.any_nonfinite]
    assert overflowed == list(range(len(overflowed))) and 0 < len(overflowed) < 10
    assert not [f for f in mon.findings if f.kind == "nonfinite"]
    ref = _mlp()
    (ref(x) * 1e4).square().mean().backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    assert mon.history[-1].global_norm == pytest.approx(expected.item(), rel=1e-4)


def test_amp_scaled_squares_beyond_float32_are_not_reported_as_overflow():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # scaled grads finite, squares not
    mon = GradientMonitor(model, opt, scaler=scaler, every=1)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(16, 8)).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    mon.close()
    assert not any(s.any_nonfinite for s in mon.history)
    assert mon.findings == []


def test_amp_collapsing_scale_is_reported():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    mon = GradientMonitor(
        model, opt, scaler=scaler, every=1, detectors={"nonfinite": {"amp_patience": 5}}
    )
    for _ in range(8):
        opt.zero_grad()
        scaler.scale(model(torch.full((4, 8), float("inf"))).sum()).backward()  # a real NaN source
        scaler.step(opt)
        scaler.update()
    mon.close()
    (f,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert f.step == 4 and f.severity == "error" and "GradScaler" in f.message


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_lr_scheduler_in_either_order(scheduler_first, recwarn):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if scheduler_first:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        mon = GradientMonitor(model, opt)
    else:  # the scheduler wraps the monitor's hook: it must be a bound method
        mon = GradientMonitor(model, opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
    mon.close()
    assert mon.step_count == 3 and opt.param_groups[0]["lr"] == pytest.approx(0.1 / 8)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()  # after close the hook, if still wrapped by the scheduler, passes through
    assert mon.step_count == 3


def test_sparse_gradients_detail_histograms_and_clip_errors(tmp_path):
    torch.manual_seed(0)
    model = Mixed()
    mon = GradientMonitor(
        model, logdir=tmp_path, every=1, detail_every=1, hist_every=1, clip=GlobalNormClip(0.1)
    )
    model(torch.randint(0, 50, (8,))).backward()
    emb = model.emb.weight.grad.to_dense()
    mon.step()
    s = mon.history[-1]
    i = mon.layers.index("emb")
    assert s.grad_max[i] == pytest.approx(emb.abs().max().item(), rel=1e-6)
    assert s.zero_frac[i] == pytest.approx((emb == 0).double().mean().item(), rel=1e-6)
    assert s.clip_coef < 1.0  # sparse gradients are scaled like dense ones
    torch.testing.assert_close(
        model.emb.weight.grad.to_dense(), emb * s.clip_coef, rtol=1e-5, atol=1e-7
    )
    mon.close()
    value = GradientMonitor(model, clip=ValueClip(0.1))
    model.zero_grad()
    model(torch.randint(0, 50, (8,))).backward()
    with pytest.raises(
        ValueError, match="ValueClip does not support the sparse gradient of parameter 'emb.weight'"
    ):
        value.step()


def test_wrapped_models_keep_their_layer_names():
    model = _mlp()
    wrapped = torch.nn.DataParallel(model)  # on CPU: a plain wrapper with a `module.` prefix
    mon = GradientMonitor(wrapped)
    assert mon.layers == GradientMonitor(model).layers == ["0", "2", "4"]
    wrapped(torch.randn(4, 8)).sum().backward()
    mon.step()
    mon.flush()
    assert mon.history[-1].has_grad.all()


def test_complex_parameters_are_measured_as_abs_squared(tmp_path):
    """Complex gradients: the norm is sqrt(sum |z|^2), and detail statistics and histograms work
    (they crashed in `aminmax` before)."""
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(300, dtype=torch.cfloat))
    lin = torch.nn.Linear(4, 1)
    model = torch.nn.Module()
    model.z, model.lin = z, lin
    with GradientMonitor(model, logdir=tmp_path, every=1, detail_every=1, hist_every=1) as mon:
        x = torch.randn(8, 4)
        loss = (z * z.conj()).real.sum() * 1e-3 + lin(x).square().mean()
        loss.backward()
        mon.step()
    s = mon.history[-1]
    layer = mon.layers.index(type(model).__name__)
    expected = float(torch.linalg.vector_norm(z.grad))  # sqrt(sum |z|^2)
    assert s.grad_norm[layer] == pytest.approx(expected, rel=1e-5)
    assert s.grad_max[layer] == pytest.approx(float(torch.view_as_real(z.grad).abs().max()))


def test_parametrized_linear_is_one_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    mon = GradientMonitor(model, every=1)
    assert mon.layers == ["0", "2"]
    model(torch.randn(5, 4)).sum().backward()
    mon.step()
    g = model[0].parametrizations.weight
    expected = math.sqrt(
        sum(float(p.grad.square().sum()) for p in (g.original0, g.original1, model[0].bias))
    )
    assert mon.history[-1].grad_norm[0] == pytest.approx(expected, rel=1e-5)


def test_update_ratio_reaches_the_detectors_live_and_post_hoc(tmp_path):
    """The update/weight ratio of a detail step is known only after the optimizer step: the step
    is diagnosed then, so `large_update` fires live, and the analysis of the logs agrees."""
    import graddiag

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # every step moves the weights by ~their size
    quiet = {"spike": False, "exploding": False, "divergence": False}
    with GradientMonitor(
        model, opt, logdir=tmp_path, every=4, detail_every=1, detectors=quiet
    ) as mon:
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
    live = [f for f in mon.findings if f.kind == "large_update"]
    assert live and mon.history[live[0].step].update_ratio is not None
    ratio = mon.history[0].update_ratio
    assert np.all(ratio > 0.1)
    posthoc = graddiag.analyze(str(tmp_path)).findings
    assert [(f.kind, f.step) for f in posthoc if f.kind == "large_update"] == [
        (f.kind, f.step) for f in live
    ]
