"""Shared bits of the examples: synthetic data and a small training loop with graddiag attached."""

from __future__ import annotations

import argparse

import torch

from graddiag.torch import GradientMonitor


def regression_data(n: int = 512, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random regression problem: y = sin(x @ w)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g) / d**0.5
    return x, torch.sin(x @ w * 3)


def train(
    model,
    optimizer,
    monitor: GradientMonitor,
    steps: int,
    batch=None,
    loss_fn=None,
    zero_grad: bool = True,
    micro_batches: int = 1,
    seed: int = 0,
) -> GradientMonitor:
    """Plain PyTorch loop: the monitor hooks `optimizer.step()`; `batch(step)` gives (x, y)."""
    torch.manual_seed(seed)
    x_all, y_all = regression_data(d=next(model.parameters()).shape[-1])
    loss_fn = loss_fn or torch.nn.functional.mse_loss
    for step in range(steps):
        if zero_grad:
            optimizer.zero_grad()
        for _ in range(micro_batches):
            if batch is None:
                idx = torch.randint(0, len(x_all), (64,))
                x, y = x_all[idx], y_all[idx]
            else:
                x, y = batch(step)
            loss = loss_fn(model(x), y) / micro_batches
            loss.backward()
        optimizer.step()
    monitor.close()
    return monitor


def cli(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--logdir", default=None, help="TensorBoard run directory (default: none)")
    p.add_argument("--steps", type=int, default=None)
    return p.parse_args()


def report(monitor: GradientMonitor) -> None:
    print(monitor.summary())
    if monitor.logdir:
        print(f"TensorBoard logs: {monitor.logdir}  (tensorboard --logdir {monitor.logdir})")
