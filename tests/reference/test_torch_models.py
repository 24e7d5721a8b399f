"""`validate` on the architectures people train, through torch.export's core ATen graph:
a transformer encoder layer, a causal transformer LM, LSTM / GRU, a Hugging Face GPT-2 built
from a config. Each is checked against torch's own float64 gradients; a planted wrong custom
backward inside them is caught at the right parameters; an op without a rule is graddiag's
error naming the module and the op."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
tnf = torch.nn.functional

from graddiag.reference import Tensor, validate  # noqa: E402
from graddiag.reference.importers.torch_export import import_torch_export  # noqa: E402
from graddiag.reference.importers.torch_fx import UnsupportedOpError  # noqa: E402
from reference.torch_functions import Square, WrongSquare  # noqa: E402

#: Engine float64 vs torch float64 gradients: the same math, summed in another order.
F64_RTOL = 1e-10
#: The wrong backwards below are off by a factor 3/2 (1.5 instead of 1): far outside.
PLANTED_MIN_ERR = 1e-3


class WrongScaledGather(torch.autograd.Function):
    """``x[:, idx] * scale`` (+ bias when given), its backward off by 3/2 on x."""

    @staticmethod
    def forward(ctx, x, idx, scale, bias):
        ctx.save_for_backward(idx)
        ctx.scale, ctx.shape = scale, x.shape
        out = x[:, idx] * scale
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        dx = g.new_zeros(ctx.shape)
        dx.index_add_(1, idx, g * ctx.scale * 1.5)
        return dx, None, None, None


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class CausalLM(nn.Module):
    """Embedding + learned positions sliced to the sequence length + a pre-norm encoder layer
    under a causal mask; `fn` (a custom Function) may sit between the block and the head."""

    def __init__(self, vocab: int = 11, dim: int = 16, max_len: int = 8, fn=None) -> None:
        super().__init__()
        self.fn = fn
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.1)
        self.block = nn.TransformerEncoderLayer(
            dim, 2, 32, dropout=0.1, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.block(h, src_mask=mask, is_causal=True)
        if self.fn is not None:
            h = self.fn.apply(h)
        return self.head(h)


class Recurrent(nn.Module):
    def __init__(self, cell, fn=None) -> None:
        super().__init__()
        self.fn = fn
        self.rnn = cell(4, 8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        last = out[:, -1]
        return self.head(self.fn.apply(last) if self.fn is not None else last)


def sequence_loss(logits, y):
    return tnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def tokens(vocab=11, shape=(2, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g), torch.randint(0, vocab, shape, generator=g)


def sequences(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 4, generator=g), torch.randint(0, 3, (3,), generator=g)


def assert_clean(report, expected_layers):
    assert report.ok, [f.message for f in report.findings]
    layers = {a.layer: a for a in report.layers}
    assert expected_layers <= set(layers)
    for a in report.layers:
        assert a.max_rel_err_f64 <= F64_RTOL, a


def errors(report):
    return {f.layer: f for f in report.findings if f.severity == "error"}


def test_transformer_encoder_layer_validates_clean():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 16, generator=g), torch.randint(0, 3, (2,), generator=g)
    report = validate(Encoder(), x, tnf.cross_entropy, y)
    assert_clean(report, {"enc.self_attn", "enc.linear1", "enc.norm2", "head"})
    assert any("dropout" in n for n in report.notes)


def test_causal_lm_validates_clean_and_its_loss_matches_torch():
    torch.manual_seed(0)
    x, y = tokens()
    model = CausalLM()
    report = validate(model, x, sequence_loss, y)
    assert_clean(report, {"pos", "embed", "block.self_attn", "block.norm1", "head"})
    model.eval()
    with torch.no_grad():
        expected = float(sequence_loss(model.double()(x), y))
    assert report.loss == pytest.approx(expected, rel=F64_RTOL)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_two_layer_recurrent_nets_validate_clean(cell):
    torch.manual_seed(0)
    x, y = sequences()
    report = validate(Recurrent(cell), x, tnf.cross_entropy, y)
    assert_clean(report, {"rnn", "head"})
    assert len(report.layers[0].parameters) == 8  # 2 layers x (w_ih, w_hh, b_ih, b_hh)


def test_wrong_custom_backward_inside_a_causal_lm_is_caught_upstream_only():
    torch.manual_seed(0)
    x, y = tokens()
    report = validate(CausalLM(fn=WrongSquare), x, sequence_loss, y)
    found = errors(report)
    assert "autograd.Function WrongSquare" in found
    assert found["autograd.Function WrongSquare"].value > PLANTED_MIN_ERR
    # upstream of the bad backward: wrong; the head (downstream) is right
    assert {"embed", "pos", "block.linear1", "block.self_attn"} <= set(found)
    assert "head" not in found


def test_correct_custom_backward_inside_a_causal_lm_passes():
    torch.manual_seed(0)
    x, y = tokens()
    report = validate(CausalLM(fn=Square), x, sequence_loss, y)
    assert report.ok, [f.message for f in report.findings]
    assert [c.ok for c in report.custom_ops] == [True]


def test_wrong_custom_backward_after_an_lstm_is_caught_at_the_lstm():
    torch.manual_seed(0)
    x, y = sequences()
    report = validate(Recurrent(nn.LSTM, fn=WrongSquare), x, tnf.cross_entropy, y)
    found = errors(report)
    assert {"autograd.Function WrongSquare", "rnn"} <= set(found)
    assert "head" not in found


@pytest.mark.slow
def test_hugging_face_tiny_gpt2_from_a_config_validates_clean():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    x, y = tokens(vocab=50)
    report = validate(model, x, lambda out, t: sequence_loss(out.logits, t), y)
    # lm_head.weight is tied to wte: one parameter, checked once
    assert_clean(report, {"transformer.wte", "transformer.h.0.attn.c_attn", "transformer.ln_f"})


class Gathering(nn.Module):
    def __init__(self, keyword: bool = False) -> None:
        super().__init__()
        self.keyword = keyword
        self.stem, self.head = nn.Linear(4, 6), nn.Linear(5, 3)
        self.register_buffer("idx", torch.tensor([0, 2, 2, 5, 1]))

    def forward(self, x):
        h = self.stem(x)
        if self.keyword:
            return self.head(WrongScaledGather.apply(h, self.idx, 2.0, bias=None))
        return self.head(WrongScaledGather.apply(h, self.idx, 2.0, None))


def test_custom_function_with_index_float_and_none_arguments_is_checked():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    report = validate(Gathering(), x, tnf.cross_entropy, y)
    found = errors(report)
    assert "autograd.Function WrongScaledGather" in found
    assert found["autograd.Function WrongScaledGather"].value == pytest.approx(1 / 3, rel=1e-4)
    assert "stem" in found and "head" not in found


def test_custom_function_called_with_keywords_is_a_clear_error():
    with pytest.raises(UnsupportedOpError, match="WrongScaledGather is called with keyword"):
        validate(
            Gathering(keyword=True), torch.randn(5, 4), tnf.cross_entropy, torch.zeros(5).long()
        )


def test_an_internal_error_while_replaying_is_graddiags_own_error(monkeypatch):
    from graddiag.reference.importers import torch_export

    def broken(*args, **kwargs):
        raise IndexError("boom")

    monkeypatch.setitem(torch_export.ATEN, "addmm", broken)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedOpError, match=r"in `0` \(Linear\).*`addmm` \(IndexError: boom"):
        validate(model, torch.randn(2, 4), tnf.mse_loss, torch.randn(2, 4))


class Cumulative(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


class UsesCumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.inner = Cumulative()

    def forward(self, x):
        return self.inner(self.proj(x))


def test_an_op_without_a_rule_is_named_with_its_module():
    with pytest.raises(UnsupportedOpError, match=r"in `inner` \(Cumulative\).*`cumsum`"):
        validate(UsesCumsum(), torch.randn(2, 4), tnf.mse_loss, torch.randn(2, 4))


def test_an_embedding_with_padding_idx_gives_its_padding_row_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Flatten(), nn.Linear(6, 2))
    x = torch.tensor([[0, 1], [2, 0]])
    report = validate(model, x, tnf.cross_entropy, torch.tensor([0, 1]))
    assert_clean(report, {"0", "2"})


def test_a_cnn_in_training_mode_with_pooling_validates_clean():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),  # training mode: batch statistics
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.AvgPool2d(1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    assert_clean(validate(model, x, tnf.cross_entropy, y), {"0", "1", "4", "8"})


def test_activations_norms_and_losses_as_decomposed_validate_clean():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(64, 8),
        nn.RMSNorm(8),
        nn.Mish(),
        nn.PReLU(),
        nn.Linear(8, 8),
        nn.Hardswish(),
        nn.ELU(),
        nn.LeakyReLU(),
        nn.Softplus(),
        nn.Linear(8, 3),
    )

    def losses(out, y):
        soft = (y > 0).to(out.dtype)
        return (
            tnf.smooth_l1_loss(out, y)
            + tnf.huber_loss(out, y)
            + tnf.l1_loss(out, y)
            + tnf.binary_cross_entropy_with_logits(out, soft)
            + tnf.kl_div(tnf.log_softmax(out, -1), tnf.softmax(y, -1), reduction="batchmean")
            + nn.CrossEntropyLoss(label_smoothing=0.1)(out, y.argmax(-1))
        )

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 2, 6, 6, generator=g), torch.randn(3, 3, generator=g)
    assert_clean(validate(model, x, losses, y), {"0", "1", "4", "6", "12"})


@pytest.mark.slow
def test_hugging_face_tiny_bert_from_a_config_validates_clean():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=0,
    )
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50, (2, 6), generator=g), torch.randint(0, 3, (2,), generator=g)
    report = validate(model, x, lambda out, t: tnf.cross_entropy(out.logits, t), y)
    assert_clean(report, {"bert.embeddings.word_embeddings", "classifier"})


def test_a_model_neither_importer_can_read_is_one_clear_error():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            h = self.lin(x)
            return h if h.sum() > 0 else -h  # data-dependent control flow

    with pytest.raises(UnsupportedOpError, match="torch.export could not export.*torch.fx"):
        validate(Branchy(), torch.ones(1, 2), tnf.mse_loss, torch.ones(1, 2))


def test_export_importer_replays_the_loss_and_the_gradients_of_torch():
    # The importer alone, on a model mixing conv1d, batch norm (eval), gather and clamp.
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm1d(3)
            self.lin = nn.Linear(3, 4)

        def forward(self, x, idx):
            h = self.bn(self.conv(x)).clamp(-0.5, 0.5).mean(-1)
            return torch.gather(tnf.silu(self.lin(h)), 1, idx).sum()

    torch.manual_seed(0)
    model = Mixed().double().eval()
    g = torch.Generator().manual_seed(5)
    x, idx = (
        torch.randn(4, 2, 6, generator=g, dtype=torch.float64),
        torch.tensor([[0], [3], [3], [1]]),
    )
    graph = import_torch_export(model, (x, idx))
    params = {k: Tensor(v, requires_grad=True) for k, v in graph.parameters.items()}
    out = graph(params, x, idx)
    out.backward()
    loss = model(x, idx)
    loss.backward()
    assert float(out.value) == pytest.approx(float(loss), rel=F64_RTOL)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(params[name].grad, p.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_report_ranks_a_hundred_parameters_worst_first_with_tolerances_stated():
    torch.manual_seed(0)
    layers = []
    for _ in range(25):
        layers += [nn.Linear(4, 4), nn.LayerNorm(4)]  # 4 parameters per pair: 100 in all
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    model = nn.Sequential(*layers[:-2], nn.Linear(4, 4))

    class Scaled(nn.Module):  # a wrong backward in the middle of the stack
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x):
            h = self.net[:20](x)
            return self.net[20:](WrongSquare.apply(h))

    report = validate(Scaled(), x, tnf.mse_loss, y)
    assert len(report.parameters) == len(list(model.parameters()))
    ranked = report.worst()
    assert [p.badness for p in ranked] == sorted((p.badness for p in ranked), reverse=True)
    assert not ranked[0].ok and ranked[0].name.startswith("net.")
    assert int(ranked[0].name.split(".")[1]) < 20  # upstream of the wrong backward
    assert all(p.ok for p in report.parameters if int(p.name.split(".")[1]) >= 20)
    text = report.format(limit=10)
    assert "<= 1e-07" in text and "<= 1e-03" in text
    assert text.count("MISMATCH") >= 10 and f"... {len(ranked) - 10} more" in text
    assert "gradient mismatch found" in text.splitlines()[-1]


def test_forward_mode_through_an_exported_causal_lm_matches_torch():
    # Every ATen rule is built from engine ops with JVPs: the engine's forward-mode directional
    # derivative of the loss along a random parameter direction equals <torch's float64
    # gradient, direction> (torch has no forward AD for its attention kernels).
    from graddiag.reference import jvp

    torch.manual_seed(0)
    model = CausalLM().double()
    for m in model.modules():  # dropout off (training mode otherwise, as validate runs it)
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    x, y = tokens()

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens, targets):
            return sequence_loss(self.model(tokens), targets)

    graph = import_torch_export(WithLoss(), (x, y), prefix="model.")
    names = list(graph.parameters)
    rng = np.random.default_rng(0)
    directions = [rng.standard_normal(graph.parameters[n].shape) for n in names]

    def loss(*values):
        return graph(dict(zip(names, values, strict=True)), x, y)

    _, ours = jvp(loss, [graph.parameters[n] for n in names], directions)
    sequence_loss(model(x), y).backward()
    params = dict(model.named_parameters())
    theirs = sum(
        float((params[n].grad * torch.from_numpy(d)).sum())
        for n, d in zip(names, directions, strict=True)
    )
    assert float(ours) == pytest.approx(theirs, rel=F64_RTOL)


def test_variance_and_standard_deviation_with_each_correction_match_torch():
    class Spread(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

        def forward(self, x):
            h = self.w * x
            return h.var(1).sum() + h.var(unbiased=False) + torch.std(h, 0, correction=0).sum()

    torch.manual_seed(0)
    model, x = Spread(), torch.randn(3, 4, dtype=torch.float64)
    graph = import_torch_export(model, (x,))
    params = {k: Tensor(v, requires_grad=True) for k, v in graph.parameters.items()}
    out = graph(params, x)
    out.backward()
    loss = model(x)
    loss.backward()
    assert float(out.value) == pytest.approx(float(loss), rel=F64_RTOL)
    np.testing.assert_allclose(params["w"].grad, model.w.grad.numpy(), rtol=F64_RTOL, atol=1e-14)


def test_scatter_index_put_and_item_assignment_match_torch():
    class Scatters(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
            self.v = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))

        def forward(self, x, idx):
            h = self.w * x
            a = torch.scatter_add(h, 1, idx, self.v)  # idx repeats a column: accumulates
            b = torch.scatter(h, 1, idx[:, :1], self.v[:, :1])
            c = h.scatter(1, idx[:, 1:], 0.5)
            d = h.index_put((torch.tensor([0, 2]),), self.v[:2, :1] * 2.0, accumulate=True)
            e = h.clone()
            e[1] = self.v[0, 0]  # in place: select + copy, functionalized
            return (a**2).sum() + (b**3).sum() + (c * b).sum() + (d**2).sum() + (e**2).sum()

    torch.manual_seed(0)
    model = Scatters()
    x, idx = torch.randn(3, 4, dtype=torch.float64), torch.tensor([[0, 3], [1, 1], [2, 0]])
    graph = import_torch_export(model, (x, idx))
    params = {k: Tensor(v, requires_grad=True) for k, v in graph.parameters.items()}
    out = graph(params, x, idx)
    out.backward()
    loss = model(x, idx)
    loss.backward()
    assert float(out.value) == pytest.approx(float(loss), rel=F64_RTOL)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(params[name].grad, p.grad.numpy(), rtol=F64_RTOL, atol=1e-13)


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("not a model", (torch.ones(1, 2),), "Expected `model` to be a torch.nn.Module, got str"),
        (
            nn.Linear(2, 2),
            torch.ones(1, 2),
            "Expected `args` to be a tuple or list of example inputs, got Tensor",
        ),
    ],
)
def test_import_torch_export_names_a_bad_argument(model, args, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        import_torch_export(model, args)
