"""Validate a small torch CNN's gradients against the reference engine (runs in seconds on CPU).

    PYTHONPATH=. python examples/validate_torch_model.py

`factory` doubles as a CLI factory (once `graddiag validate` is registered):

    graddiag validate examples/validate_torch_model.py:factory
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


class SmallCNN(nn.Module):
    def __init__(self, custom: type | None = None) -> None:
        super().__init__()
        self.custom = custom
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 7 * 7, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 10)
        )

    def forward(self, x):
        h = self.features(x)
        return self.head(self.custom.apply(h) if self.custom else h)


def factory(custom: type | None = None):
    """(model, inputs, targets, loss) for `validate` and for `graddiag validate`."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 14, 14), torch.randint(0, 10, (16,))
    return SmallCNN(custom), x, y, nn.CrossEntropyLoss()


def main() -> None:
    for title, custom in (("correct model", None), ("model with a buggy custom op", LeakySquare)):
        model, x, y, loss = factory(custom)
        report = validate(model, x, loss, y)
        print(f"--- {title}: {'ok' if report.ok else 'MISMATCH'}")
        for a in report.layers:
            print(
                f"{a.layer:12s} {a.dtype} rel err {a.max_rel_err:.1e} (tol {a.tolerance:.0e}), "
                f"vs torch float64 {a.max_rel_err_f64:.1e}"
            )
        for finding in report.findings:
            print(finding)


if __name__ == "__main__":
    main()
