"""Validate a small causal transformer LM and a 2-layer LSTM against the reference engine.

Both go through `torch.export` into the float64 engine; the second LM hides a wrong custom
backward between its transformer block and its head, which is named, together with the
parameters upstream of it. Runs in under a minute on a CPU.

    PYTHONPATH=. python examples/validate_transformer.py
    graddiag validate examples/validate_transformer.py:factory
"""

from __future__ import annotations

import torch
from torch import nn

from graddiag.reference import validate


class LeakySquare(torch.autograd.Function):
    """x² with a hand-written backward that has a bug (3x instead of 2x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * grad * x


class CausalLM(nn.Module):
    """Token embedding + learned positions + a pre-norm encoder layer under a causal mask."""

    def __init__(self, vocab: int = 50, dim: int = 32, max_len: int = 16, custom=None) -> None:
        super().__init__()
        self.custom = custom
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.block = nn.TransformerEncoderLayer(
            dim, 4, 4 * dim, dropout=0.1, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.block(self.embed(tokens) + self.pos[:t], src_mask=mask, is_causal=True)
        return self.head(self.custom.apply(h) if self.custom else h)


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(8, 32, 2, batch_first=True), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def factory(custom: type | None = None):
    """(model, inputs, targets, loss) for `validate` and for `graddiag validate`."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (4, 12))
    return CausalLM(custom=custom), tokens[:, :-1], tokens[:, 1:], lm_loss


def main() -> None:
    cases = [("causal LM", factory()), ("causal LM with a buggy custom op", factory(LeakySquare))]
    torch.manual_seed(0)
    cases.append(
        (
            "2-layer LSTM",
            (LSTMClassifier(), torch.randn(4, 10, 8), torch.randint(0, 5, (4,)), lm_loss),
        )
    )
    for title, (model, x, y, loss) in cases:
        report = validate(model, x, loss, y)
        print(f"--- {title}: {'ok' if report.ok else 'MISMATCH'}")
        print(report.format(limit=6))


if __name__ == "__main__":
    main()
