"""Parameters that cannot learn, four ways (detached and dead are judged over the first 20 steps).

- `embed` has requires_grad=False (reported as info: often intended);
- `aux` is trainable but never used in forward (detached: no gradient ever);
- `extra` is used but not given to the optimizer (frozen: it will never update);
- `gate` multiplies its input by a zero mask, so its gradient exists but is exactly zero (dead).
"""

from __future__ import annotations

import torch
from _common import cli, report, train
from torch import nn

from graddiag.torch import GradientMonitor


class Net(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(d, 32)
        self.embed.requires_grad_(False)
        self.body = nn.Linear(32, 32)
        self.gate = nn.Linear(32, 32, bias=False)
        self.extra = nn.Linear(32, 32)
        self.aux = nn.Linear(32, 32)
        self.head = nn.Linear(32, 1)
        self.register_buffer("mask", torch.zeros(32))

    def forward(self, x):
        h = torch.relu(self.body(self.embed(x)))
        h = h + self.gate(h * self.mask)  # mask == 0: gate's weight gradient is exactly zero
        return self.head(torch.tanh(self.extra(h)))


def run(logdir=None, steps: int = 40, **monitor_kwargs) -> GradientMonitor:
    torch.manual_seed(0)
    model = Net()
    params = [
        p for n, p in model.named_parameters() if not n.startswith("extra") and p.requires_grad
    ]
    opt = torch.optim.Adam(params, lr=1e-3)
    mon = GradientMonitor(model, opt, logdir=logdir, **monitor_kwargs)
    return train(model, opt, mon, steps)


if __name__ == "__main__":
    args = cli(__doc__)
    report(run(args.logdir, args.steps or 40))
