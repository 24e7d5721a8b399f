"""The engine against torch float64 autograd, the fx importer, and `validate` on torch models."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
tnf = torch.nn.functional

from graddiag.reference import Tensor, validate  # noqa: E402
from graddiag.reference.importers.torch_fx import UnsupportedOpError, import_torch  # noqa: E402
from reference.torch_functions import Square, WrongSquare  # noqa: E402

FRAMEWORK_RTOL = 1e-10  # same float64 math, different summation order


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU MLP, written out so every op is visible to fx."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .reshape(b, t, 3, self.heads, d // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = TransformerBlock(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)))


def mlp():
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 4)
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def engine_vs_torch(model, inputs, loss_fn, target):
    model = model.double()
    torch_inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    loss = loss_fn(model(*torch_inputs), target)
    loss.backward()
    graph = import_torch(model)
    params = {k: Tensor(v, requires_grad=True) for k, v in graph.parameters.items()}
    out = graph(params, *[x.numpy() for x in torch_inputs])
    return loss, out, params, dict(model.named_parameters())


CASES = {
    "mlp": (mlp, lambda g: [torch.randn(5, 6, generator=g)], "mse", (5, 4)),
    "cnn": (cnn, lambda g: [torch.randn(3, 2, 8, 8, generator=g)], "ce", 3),
    "transformer": (
        TinyLM,
        lambda g: [torch.randint(0, 11, (2, 5), generator=g)],
        "ce_seq",
        (2, 5),
    ),
}


def cnn_eval():
    model = cnn()
    bn = model[1]
    bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 4))
    bn.running_var.copy_(torch.linspace(0.5, 2.0, 4))
    return model.eval()


CASES["cnn_eval"] = (cnn_eval, *CASES["cnn"][1:])


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_matches_torch_float64_autograd(case):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    factory, make_inputs, loss_kind, target_shape = CASES[case]
    with torch.no_grad():
        model = factory()
    inputs = make_inputs(g)
    from graddiag.reference import functional as F

    if loss_kind == "mse":
        target = torch.randn(*target_shape, generator=g, dtype=torch.float64)
        torch_loss, engine_loss = tnf.mse_loss, lambda out: F.mse(out, target.numpy())
    elif loss_kind == "ce":
        target = torch.randint(0, 3, (target_shape,), generator=g)
        torch_loss, engine_loss = (
            tnf.cross_entropy,
            lambda out: F.cross_entropy(out, target.numpy()),
        )
    else:
        target = torch.randint(0, 11, target_shape, generator=g)

        def torch_loss(out, y):
            return tnf.cross_entropy(out.reshape(-1, 11), y.reshape(-1))

        def engine_loss(out):
            return F.cross_entropy(out, target.numpy())

    loss, out, params, torch_params = engine_vs_torch(model, inputs, torch_loss, target)
    ours = engine_loss(out)
    ours.backward()
    assert float(ours.value) == pytest.approx(loss.item(), rel=FRAMEWORK_RTOL)
    for name, p in params.items():
        np.testing.assert_allclose(
            p.grad, torch_params[name].grad.numpy(), rtol=FRAMEWORK_RTOL, atol=1e-13, err_msg=name
        )


class WithCustom(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.a, self.b = fn, nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.fn.apply(self.a(x)))


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)


def test_validate_passes_a_correct_float32_model():
    torch.manual_seed(0)
    x, y = batch()
    report = validate(
        nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.2), nn.Linear(8, 3)),
        x,
        nn.CrossEntropyLoss(),
        y,
    )
    assert report.ok, report.findings
    assert [a.layer for a in report.layers] == ["0", "3"]
    assert all(a.max_rel_err_f64 < 1e-12 and a.max_rel_err < 1e-3 for a in report.layers)
    assert any("dropout" in n for n in report.notes)


def test_validate_catches_and_names_a_wrong_custom_function():
    torch.manual_seed(0)
    x, y = batch()
    report = validate(WithCustom(WrongSquare), x, tnf.cross_entropy, y)
    assert not report.ok
    errors = {f.layer: f for f in report.findings if f.severity == "error"}
    assert "autograd.Function WrongSquare" in errors
    assert "a" in errors and "b" not in errors  # only the layer upstream of the bad backward
    assert errors["autograd.Function WrongSquare"].value == pytest.approx(1 / 3, rel=1e-4)


def test_validate_accepts_a_correct_custom_function():
    torch.manual_seed(0)
    x, y = batch()
    report = validate(WithCustom(Square), x, tnf.cross_entropy, y)
    assert report.ok, report.findings
    assert [c.ok for c in report.custom_ops] == [True]


def test_validate_warns_on_half_precision_beyond_its_tolerance():
    torch.manual_seed(0)
    x, y = batch()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    report = validate(model, x.to(torch.bfloat16), tnf.cross_entropy, y, rtol=1e-6)
    assert report.dtype == "bfloat16"
    assert {f.severity for f in report.findings} == {"warning"}


def test_validate_judges_an_exactly_zero_gradient_on_the_models_scale():
    # A conv bias followed by batch norm (training mode) has gradient 0 in exact arithmetic:
    # both sides are rounding noise, which must not read as a mismatch.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    report = validate(model, x, tnf.cross_entropy, y)
    assert report.ok, report.findings


def test_validate_does_not_touch_the_users_model():
    torch.manual_seed(0)
    x, y = batch()
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    validate(model, x, tnf.cross_entropy, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_unsupported_module_is_named_by_the_fx_importer():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU())
    with pytest.raises(UnsupportedOpError, match="`1` of type PReLU is not supported"):
        import_torch(model)({}, np.ones((2, 4)))


def test_unsupported_function_is_named():
    class UsesCumsum(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 0)

    graph = import_torch(UsesCumsum())
    with pytest.raises(UnsupportedOpError, match="cumsum"):
        graph({}, np.ones((2, 2)))


def test_untraceable_control_flow_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedOpError, match="could not trace Branchy"):
        import_torch(Branchy())


def test_validate_rejects_non_models():
    with pytest.raises(
        TypeError, match="`model` to be a torch.nn.Module or a keras.Model, got str"
    ):
        validate("resnet", None, None, None)


def test_validate_rejects_nonpositive_rtol():
    with pytest.raises(ValueError, match="`rtol` > 0, got -1"):
        validate(nn.Linear(2, 2), torch.ones(1, 2), tnf.mse_loss, torch.ones(1, 2), rtol=-1)


def test_tracing_restores_autograd_function_apply():
    import_torch(WithCustom(Square))
    x = torch.ones(2, requires_grad=True)
    Square.apply(x).sum().backward()
    assert torch.equal(x.grad, 2 * torch.ones(2))


def test_validate_a_small_language_model_with_a_python_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    tokens, targets = (
        torch.randint(0, 11, (2, 5), generator=g),
        torch.randint(0, 11, (2, 5), generator=g),
    )

    def sequence_loss(logits, y):
        return tnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    report = validate(TinyLM(), tokens, sequence_loss, targets)
    assert report.ok, report.findings
    assert {"embed", "block.qkv", "head"} <= {a.layer for a in report.layers}
