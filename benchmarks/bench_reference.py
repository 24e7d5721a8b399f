"""Reference engine speed (CPU, float64), side by side with torch.

1. A matmul-dominated MLP, in one process and on the same weights and batch: engine forward
   alone (graph recorded), engine forward + backward, torch float64 eager forward + backward.
2. With ``--models``: what `validate` pays on a small causal transformer LM and a 2-layer LSTM
   classifier — the one-time `torch.export` import, and the engine's replay (forward +
   backward of model + loss) against torch's own float64 forward + backward, interleaved.

Prints medians and ratios as markdown tables. Not a test; run it by hand:

    PYTHONPATH=. python benchmarks/bench_reference.py [--batch 256] [--width 1024] [--repeats 15]
    PYTHONPATH=. python benchmarks/bench_reference.py --models [--repeats 15]
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


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn (a, b, a, b, ...) so load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_models(repeats: int) -> None:
    import torch
    from torch import nn

    from graddiag.reference.importers.torch_export import import_torch_export

    class CausalLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.pos = nn.Embedding(100, 64), nn.Parameter(torch.randn(32, 64) * 0.1)
            self.block = nn.TransformerEncoderLayer(
                64, 4, 128, dropout=0.0, batch_first=True, norm_first=True
            )
            self.head = nn.Linear(64, 100)

        def forward(self, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            t = tokens.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(t)
            h = self.block(self.embed(tokens) + self.pos[:t], src_mask=mask, is_causal=True)
            return nn.functional.cross_entropy(self.head(h).reshape(-1, 100), y.reshape(-1))

    class LSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(16, 64, 2, batch_first=True), nn.Linear(64, 10)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(self.head(self.rnn(x)[0][:, -1]), y)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cases = [
        (
            "causal transformer LM (d=64, 4 heads, batch 8 x 32 tokens)",
            CausalLM(),
            (
                torch.randint(0, 100, (8, 32), generator=g),
                torch.randint(0, 100, (8, 32), generator=g),
            ),
        ),
        (
            "2-layer LSTM (16 -> 64, batch 8 x 32 steps)",
            LSTMClassifier(),
            (torch.randn(8, 32, 16, generator=g), torch.randint(0, 10, (8,), generator=g)),
        ),
    ]
    print(
        "\n| model | torch.export import (ms, once) | engine fwd+bwd (ms) | torch float64 "
        "fwd+bwd (ms) | engine / torch |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, model, args in cases:
        model = model.double()
        args = tuple(a.double() if a.is_floating_point() else a for a in args)
        start = time.perf_counter()
        graph = import_torch_export(model, args)
        export_s = time.perf_counter() - start

        def engine(graph: object = graph, args: tuple = args) -> None:
            params = {k: Tensor(v, requires_grad=True) for k, v in graph.parameters.items()}
            graph(params, *args).backward()

        def framework(model: nn.Module = model, args: tuple = args) -> None:
            model.zero_grad(set_to_none=True)
            model(*args).backward()

        t = interleaved_medians({"engine": engine, "torch": framework}, repeats)
        print(
            f"| {name} | {export_s * 1e3:.0f} | {t['engine'] * 1e3:.2f} | "
            f"{t['torch'] * 1e3:.2f} | {t['engine'] / t['torch']:.1f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--models", action="store_true", help="the transformer and LSTM validate benchmark"
    )
    args = parser.parse_args()
    if args.models:
        print(f"median of {args.repeats} interleaved runs, CPU, float64")
        bench_models(args.repeats)
        return

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
