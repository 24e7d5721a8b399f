"""The main job: a short real training run with a known gradient problem, graddiag attached.

A 16-layer sigmoid MLP trained with SGD: the layers near the input get gradients a billion times
smaller than the top ones (vanishing gradients), and one layer is accidentally left out of the
forward pass (detached). Run it with `graddiag demo` (or `python -m graddiag.demo`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def run_demo(logdir: str | os.PathLike = "runs/demo", steps: int = 80, seed: int = 0):
    """Train the demo model with a `GradientMonitor` writing to `logdir`; returns the monitor.

    Raises:
        ImportError: if PyTorch is not installed (`pip install graddiag[torch]`).
    """
    try:
        import torch
        from torch import nn
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError("the demo trains a PyTorch model: pip install 'graddiag[torch]'") from e
    from graddiag.torch import GradientMonitor

    class DeepSigmoidNet(nn.Module):
        def __init__(self, d: int = 16, width: int = 32, depth: int = 16) -> None:
            super().__init__()
            dims = [d] + [width] * depth
            self.blocks = nn.ModuleList(
                nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
            )
            self.unused_proj = nn.Linear(width, width)  # the bug: never called in forward()
            self.head = nn.Linear(width, 1)

        def forward(self, x):
            for block in self.blocks:
                x = torch.sigmoid(block(x))
            return self.head(x)

    torch.manual_seed(seed)
    x = torch.randn(1024, 16)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    model = DeepSigmoidNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, opt, logdir=logdir, every=10) as monitor:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,))
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            monitor.log_loss(loss)  # the hooked step() takes no loss: give it for the loss panel
            opt.step()
    return monitor


def _tensorboard_exe() -> str:
    """How to call the tensorboard installed beside this Python (a venv not activated: its path)."""
    here = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    on_path = shutil.which("tensorboard")
    if not os.path.exists(here) or (on_path and os.path.samefile(on_path, here)):
        return "tensorboard"
    rel = os.path.relpath(here)
    return shlex.quote(rel if not rel.startswith("..") else here)


def tensorboard_hint(logdir: str | os.PathLike) -> str:
    """The closing lines of the demo: the exact command that shows its runs in TensorBoard's
    Gradients tab (graddiag's TensorBoard plugin, installed with graddiag)."""
    cmd = f"{_tensorboard_exe()} --logdir {shlex.quote(os.fspath(logdir))}"
    return (
        f"See the gradients in TensorBoard (Gradients tab):\n  {cmd}\n"
        f"then open http://localhost:6006/#graddiag"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logdir = argv[0] if argv else "runs/demo"
    monitor = run_demo(logdir)
    print(monitor.summary("warning"))
    print("\n" + tensorboard_hint(os.path.dirname(os.path.normpath(logdir)) or logdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
