"""PyTorch adapter: measure per-layer gradient statistics on the device, clip, and diagnose.

Usage::

    monitor = GradientMonitor(model, optimizer, logdir="runs/exp1", clip=GlobalNormClip(1.0))
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()          # hooked: stats, clipping and findings happen here
    monitor.close()
    print(monitor.summary())

Cost model (see docs/benchmarks.md): every step runs a handful of fused device ops (stacked
same-shape gradients reduced with one row-wise norm, one dot per large tensor) and writes a row into a
device ring buffer; the host reads that buffer once per log step (`every`), so detectors still see
every step. `nonfinite="skip"`/`"raise"` and `trace_nonfinite=True` add one host sync per step.
"""

from graddiag.monitor import NonFiniteGradientError
from graddiag.torch._measure import STACK_MAX_NUMEL, STACK_MIN, Plan, sum_squares
from graddiag.torch._ops import TorchOps
from graddiag.torch.monitor import GradientMonitor, UnmonitoredWarning, UnusedParameterWarning

__all__ = [
    "STACK_MAX_NUMEL",
    "STACK_MIN",
    "GradientMonitor",
    "NonFiniteGradientError",
    "Plan",
    "TorchOps",
    "UnmonitoredWarning",
    "UnusedParameterWarning",
    "sum_squares",
]
