"""A forgotten `optimizer.zero_grad()`: gradients pile up across optimizer steps.

graddiag reports `accumulation` at step 1, the first step that carries gradients of step 0.
Intentional accumulation (several backward passes per step, zero_grad once per step) is silent.
"""

from __future__ import annotations

import torch
from _common import cli, report, train
from healthy import build

from graddiag.torch import GradientMonitor


def run(
    logdir=None, steps: int = 30, zero_grad: bool = False, micro_batches: int = 1, **monitor_kwargs
) -> GradientMonitor:
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = GradientMonitor(model, opt, logdir=logdir, **monitor_kwargs)
    return train(model, opt, mon, steps, zero_grad=zero_grad, micro_batches=micro_batches)


if __name__ == "__main__":
    args = cli(__doc__)
    report(run(args.logdir, args.steps or 30))
