"""A NaN born in the backward pass at a known place.

`NormFeature` appends ||h|| to its input; at step 30 the batch is all zeros, so h == 0 and the
gradient of sqrt at 0 is infinite: the backward pass turns it into NaN inside `NormFeature`, and
every layer below it (`mid` first, in backward order) gets NaN gradients. The head stays finite.
"""

from __future__ import annotations

import torch
from _common import cli, regression_data, report, train
from torch import nn

from graddiag.torch import GradientMonitor

NAN_STEP = 30


class NormFeature(nn.Module):
    def forward(self, h):
        return torch.cat([h, torch.sqrt(h.square().sum(-1, keepdim=True))], dim=-1)


class Net(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(d, 32, bias=False)
        self.mid = nn.Linear(32, 32, bias=False)
        self.norm = NormFeature()
        self.head = nn.Linear(33, 1)

    def forward(self, x):
        return self.head(self.norm(self.mid(torch.tanh(self.inp(x)))))


def run(logdir=None, steps: int = 40, **monitor_kwargs) -> GradientMonitor:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = GradientMonitor(model, opt, logdir=logdir, **monitor_kwargs)
    x, y = regression_data()

    def batch(step):
        xb, yb = x[step % 8 * 64 : (step % 8 + 1) * 64], y[step % 8 * 64 : (step % 8 + 1) * 64]
        return (torch.zeros_like(xb), yb) if step == NAN_STEP else (xb, yb)

    return train(model, opt, mon, steps, batch=batch)


if __name__ == "__main__":
    args = cli(__doc__)
    report(run(args.logdir, args.steps or 40, trace_nonfinite=True))
