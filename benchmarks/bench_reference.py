"""Reference engine speed on a matmul-dominated MLP (CPU, float64), side by side with torch.

Measures, in one process and on the same weights and batch:
- engine forward alone (graph recorded), engine forward + backward,
- torch float64 eager forward + backward (when torch is installed),
and prints medians and ratios as a markdown table. Not a test; run it by hand:

    PYTHONPATH=. python benchmarks/bench_reference.py [--batch 256] [--width 1024] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from graddiag.reference import Tensor
from graddiag.reference import functional as F


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: BLAS threads, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sizes = [args.width] * (args.depth + 1) + [10]
    weights = [
        rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    biases = [np.zeros(o) for o in sizes[1:]]
    x = rng.standard_normal((args.batch, sizes[0]))
    labels = rng.integers(0, 10, args.batch)

    def engine_loss() -> tuple[Tensor, list[Tensor]]:
        params = [Tensor(a, requires_grad=True) for a in (*weights, *biases)]
        h: Tensor | np.ndarray = x
        for i in range(len(weights)):
            h = F.linear(h, params[i], params[len(weights) + i])
            h = F.tanh(h) if i < len(weights) - 1 else h
        return F.cross_entropy(h, labels), params

    def engine_forward() -> None:
        engine_loss()

    def engine_step() -> None:
        engine_loss()[0].backward()

    rows = []
    fwd = median_seconds(engine_forward, args.repeats)
    step = median_seconds(engine_step, args.repeats)
    rows.append(("engine (NumPy float64)", fwd, step))

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        tw = [torch.from_numpy(w).requires_grad_() for w in weights]
        tb = [torch.from_numpy(b).requires_grad_() for b in biases]
        tx, ty = torch.from_numpy(x), torch.from_numpy(labels)

        def torch_loss() -> object:
            h = tx
            for i, (w, b) in enumerate(zip(tw, tb, strict=True)):
                h = torch.nn.functional.linear(h, w, b)
                h = torch.tanh(h) if i < len(tw) - 1 else h
            return torch.nn.functional.cross_entropy(h, ty)

        def torch_step() -> None:
            torch_loss().backward()
            for p in (*tw, *tb):
                p.grad = None

        rows.append(
            (
                f"torch {torch.__version__} eager float64",
                median_seconds(torch_loss, args.repeats),
                median_seconds(torch_step, args.repeats),
            )
        )

    print(
        f"MLP {' -> '.join(map(str, sizes))}, batch {args.batch}, tanh, cross-entropy; "
        f"median of {args.repeats} runs\n"
    )
    print("| implementation | forward (ms) | forward+backward (ms) | backward/forward |")
    print("|---|---:|---:|---:|")
    for name, f, s in rows:
        print(f"| {name} | {f * 1e3:.2f} | {s * 1e3:.2f} | {(s - f) / f:.2f}x |")
    if len(rows) == 2:
        print(
            f"\nengine / torch, forward+backward: {rows[0][2] / rows[1][2]:.2f}x "
            f"(forward: {rows[0][1] / rows[1][1]:.2f}x)"
        )


if __name__ == "__main__":
    main()
