"""A healthy run: residual MLP with LayerNorm, Adam. graddiag should report nothing."""

from __future__ import annotations

import torch
from _common import cli, report, train
from torch import nn

from graddiag.torch import GradientMonitor


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def build(d: int = 16, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d, 32), *[Block(32) for _ in range(depth)], nn.LayerNorm(32), nn.Linear(32, 1)
    )


def run(logdir=None, steps: int = 200, **monitor_kwargs) -> GradientMonitor:
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = GradientMonitor(model, opt, logdir=logdir, **monitor_kwargs)
    return train(model, opt, mon, steps)


if __name__ == "__main__":
    args = cli(__doc__)
    report(run(args.logdir, args.steps or 200))
