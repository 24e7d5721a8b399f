"""Run the reference checks with GPU arrays and compare with the NumPy CPU result.

Two checks, each on every GPU backend found (CuPy, then torch CUDA tensors):

1. The engine itself on GPU arrays (the same engine code through the array-API backend): a
   conv net, a causal attention block (embedding gather, layer norm, GELU MLP) and an unrolled
   LSTM, loss and gradients against NumPy in float64.
2. `graddiag.validate` on torch models that live on the GPU (a transformer encoder layer, a
   causal transformer LM, 2-layer LSTM and GRU, and the LM with a planted wrong custom
   backward): torch's CUDA kernels (cuDNN RNNs, fused attention) against the float64 engine.

Exit status: 0 if everything agrees (or no GPU is available: the checks are then skipped,
with a message), 1 on a mismatch.

    PYTHONPATH=. python scripts/gpu_check_reference.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from graddiag.reference import Tensor
from graddiag.reference import functional as F
from graddiag.reference.backend import to_numpy
from graddiag.reference.gradcheck import relative_error

GPU_RTOL = 1e-10  # float64 on both sides; GPU reductions sum in another order


def conv_net(x: Any, kernel: Any, w1: Any, w2: Any, labels: Any) -> Tensor:
    h = F.max_pool2d(F.relu(F.conv2d(x, kernel, padding=1)), 2)
    h = F.reshape(h, (h.shape[0], -1))
    h = F.layer_norm(F.gelu(F.matmul(h, w1)), (w1.shape[1],))
    return F.cross_entropy(F.matmul(h, w2), labels)


def attention_block(
    embed: Any, wqkv: Any, w1: Any, w2: Any, head: Any, tokens: Any, causal: Any, labels: Any
) -> Tensor:
    """Embedding gather + pre-norm causal self-attention (one head) + GELU MLP + LM head."""
    x = F.index(embed, (tokens,))
    d = x.shape[-1]
    qkv = F.matmul(F.layer_norm(x, (d,)), wqkv)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    scores = F.matmul(q, F.transpose(k, (0, 2, 1))) * (1.0 / d**0.5)
    x = x + F.matmul(F.softmax(F.where(causal, scores, causal * 0.0 - 1e9), axis=-1), v)
    x = x + F.matmul(F.gelu(F.matmul(F.layer_norm(x, (d,)), w1)), w2)
    return F.cross_entropy(F.matmul(x, head), labels)


def lstm(w_x: Any, w_h: Any, bias: Any, head: Any, xs: Any, labels: Any) -> Tensor:
    """A one-layer LSTM unrolled over time, classifying from the last hidden state."""
    u = w_h.shape[0]
    h = c = xs[:, 0, :1] * 0.0 + bias[:u] * 0.0  # zeros of shape (batch, u) on the device
    for t in range(xs.shape[1]):
        z = F.matmul(xs[:, t], w_x) + F.matmul(h, w_h) + bias
        i, f = F.sigmoid(z[:, :u]), F.sigmoid(z[:, u : 2 * u])
        g, o = F.tanh(z[:, 2 * u : 3 * u]), F.sigmoid(z[:, 3 * u :])
        c = f * c + i * g
        h = o * F.tanh(c)
    return F.cross_entropy(F.matmul(h, head), labels)


def engine_cases(rng: np.random.Generator) -> list[tuple[str, Callable[..., Tensor], list, list]]:
    """(name, network, parameter arrays, constant arrays) for the engine-on-GPU check."""
    tokens = rng.integers(0, 11, (2, 6))
    causal = np.broadcast_to(np.tril(np.ones((6, 6), dtype=bool)), (2, 6, 6)).copy()
    return [
        (
            "conv net",
            conv_net,
            [
                rng.standard_normal((8, 3, 16, 16)),
                rng.standard_normal((4, 3, 3, 3)),
                rng.standard_normal((256, 32)),
                rng.standard_normal((32, 10)),
            ],
            [rng.integers(0, 10, 8)],
        ),
        (
            "causal attention block",
            attention_block,
            [
                rng.standard_normal((11, 8)),
                rng.standard_normal((8, 24)) / 3,
                rng.standard_normal((8, 16)) / 3,
                rng.standard_normal((16, 8)) / 4,
                rng.standard_normal((8, 11)) / 3,
            ],
            [tokens, causal, rng.integers(0, 11, (2, 6))],
        ),
        (
            "LSTM",
            lstm,
            [
                rng.standard_normal((4, 32)) / 2,
                rng.standard_normal((8, 32)) / 3,
                rng.standard_normal(32) / 4,
                rng.standard_normal((8, 3)),
            ],
            [rng.standard_normal((3, 5, 4)), rng.integers(0, 3, 3)],
        ),
    ]


def run(
    network: Callable[..., Tensor],
    convert: Callable[[np.ndarray], Any],
    arrays: list[np.ndarray],
    constants: list[np.ndarray],
) -> tuple[float, list[np.ndarray]]:
    params = [Tensor(convert(a), requires_grad=True) for a in arrays]
    loss = network(*params, *[convert(c) for c in constants])
    loss.backward()
    return float(to_numpy(loss.value)), [to_numpy(p.grad) for p in params]


def gpu_backends() -> dict[str, Callable[[np.ndarray], Any]]:
    found = {}
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            found["cupy"] = cupy.asarray
    except Exception:  # noqa: BLE001 - no CuPy, or no driver: not a GPU backend here
        pass
    try:
        import torch

        if torch.cuda.is_available():
            found["torch-cuda"] = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to("cuda")
    except ImportError:
        pass
    return found


def torch_device() -> str | None:
    """The torch device for the validate check ("cuda"), or None without one."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def check_engine(backends: dict[str, Callable[[np.ndarray], Any]]) -> bool:
    ok_all = True
    for case, network, arrays, constants in engine_cases(np.random.default_rng(0)):
        ref_loss, ref_grads = run(network, lambda a: a, arrays, constants)
        for name, convert in backends.items():
            loss, grads = run(network, convert, arrays, constants)
            errs = [relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True)]
            loss_err = relative_error(loss, ref_loss)
            ok = loss_err <= GPU_RTOL and max(errs) <= GPU_RTOL
            ok_all &= ok
            print(
                f"{name}: {case}: loss rel err {loss_err:.2e}, max grad rel err {max(errs):.2e} "
                f"-> {'ok' if ok else 'MISMATCH'}"
            )
    return ok_all


def validate_models(device: str) -> bool:
    """`validate` on torch models living on `device`: clean ones agree, the planted bug shows."""
    import torch
    from torch import nn

    from graddiag.reference import validate

    class WrongSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * g * x  # should be 2

    class LM(nn.Module):
        def __init__(self, fn: Any = None) -> None:
            super().__init__()
            self.fn = fn
            self.embed, self.pos = nn.Embedding(11, 16), nn.Parameter(torch.randn(8, 16) * 0.1)
            self.block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True)
            self.head = nn.Linear(16, 11)

        def forward(self, tokens: Any) -> Any:
            t = tokens.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
            h = self.block(self.embed(tokens) + self.pos[:t], src_mask=mask, is_causal=True)
            return self.head(self.fn.apply(h) if self.fn is not None else h)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.head = nn.Linear(16, 11)

        def forward(self, x: Any) -> Any:
            return self.head(self.enc(x))

    class Recurrent(nn.Module):
        def __init__(self, cell: Any) -> None:
            super().__init__()
            self.rnn, self.head = cell(16, 8, 2, batch_first=True), nn.Linear(8, 11)

        def forward(self, x: Any) -> Any:
            return self.head(self.rnn(x)[0])

    def loss(out: Any, y: Any) -> Any:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (2, 6), generator=g).to(device)
    labels = torch.randint(0, 11, (2, 6), generator=g).to(device)
    seqs = torch.randn(2, 6, 16, generator=g).to(device)
    cases = [
        ("transformer encoder layer", Encoder(), seqs, True),
        ("causal LM", LM(), tokens, True),
        ("LSTM", Recurrent(nn.LSTM), seqs, True),
        ("GRU", Recurrent(nn.GRU), seqs, True),
        ("causal LM, wrong custom backward", LM(WrongSquare), tokens, False),
    ]
    ok_all = True
    for name, model, x, clean in cases:
        report = validate(model.to(device), x, loss, labels)
        worst = report.worst(1)[0]
        errors = {f.layer for f in report.findings if f.severity == "error"}
        ok = report.ok if clean else ("head" not in errors and "embed" in errors)
        ok_all &= ok
        print(
            f"validate on {device}: {name}: ok={report.ok}, worst {worst.name} "
            f"(f64 rel err {worst.max_rel_err_f64:.1e}) -> {'ok' if ok else 'MISMATCH'}"
        )
    return ok_all


def main() -> int:
    backends = gpu_backends()
    device = torch_device()
    if not backends and device is None:
        print("no GPU available (neither CuPy nor torch CUDA), skipped")
        return 0
    ok = check_engine(backends)
    if device is not None:
        ok &= validate_models(device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
