"""Vanishing gradients: a deep stack of sigmoid layers trained with SGD.

The layers near the input get gradients ~1e-9 of the layers near the output; graddiag names them.
"""

from __future__ import annotations

import torch
from _common import cli, report, train
from torch import nn

from graddiag.torch import GradientMonitor


def build(d: int = 16, width: int = 32, depth: int = 16) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(d, width), nn.Sigmoid()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def run(logdir=None, steps: int = 60, **monitor_kwargs) -> GradientMonitor:
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = GradientMonitor(model, opt, logdir=logdir, **monitor_kwargs)
    return train(model, opt, mon, steps)


if __name__ == "__main__":
    args = cli(__doc__)
    report(run(args.logdir, args.steps or 60))
