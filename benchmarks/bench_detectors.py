"""Host cost of the detectors: `Diagnoser.update` step by step vs `Diagnoser.update_block` over
blocks of consecutive steps (what a log step reads back: 10 rows at the default `every=10`).

A healthy stream (every layer has a finite gradient, log-normal noise, detail statistics on one
step in ten, nothing to report) for models of 4, 12 and 100 layers. Each variant gets a fresh
`Diagnoser` with the default detectors, warmed up on the first steps (windows and baselines full),
then times the same steps; variants run round-robin in this process, and the table gives the
median time per step and its ratio to step by step. With ``--before REV``, the detectors of git
revision REV (`graddiag/detectors.py` there, loaded as a module beside this graddiag) run step by
step and in blocks of 10 in the same rounds. A second table splits the step-by-step and 10-row costs by detector (12
layers). Not a timed test.

Usage::

    python benchmarks/bench_detectors.py [--steps 2000] [--rounds 7] [--before REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from graddiag.detectors import Diagnoser
from graddiag.stats import ModelInfo, StepStats

WARMUP = 100
LAYERS = (4, 12, 100)
#: Spread of the layers' typical norms (natural log): within 20x, or down to 3e-4 of the largest
#: (layers below 1e-3 of it: vanishing's steady-decay check then runs, and still finds nothing).
SPREADS = (3.0, 8.0)
BLOCKS = (1, 10, 100)


def healthy(n_layers: int, steps: int, spread: float) -> tuple[ModelInfo, list[StepStats]]:
    """A transformer-like model description and a stream it would log when all is well."""
    rng = np.random.default_rng(n_layers)
    layers = tuple(
        f"blocks.{i // 4}.{('attn', 'mlp', 'ln1', 'ln2')[i % 4]}" for i in range(n_layers)
    )
    counts = tuple(int(c) for c in rng.integers(512, 4_000_000, n_layers))
    info = ModelInfo(layers, counts, tuple(reversed(layers)))
    scales = np.exp(rng.uniform(-spread, 0, n_layers))
    stream = []
    for t in range(steps):
        g = scales * np.exp(rng.normal(0, 0.2, n_layers))
        detail = {}
        if t % 10 == 0:
            detail = {
                "grad_max": g / 10,
                "zero_frac": np.zeros(n_layers),
                "param_norm": np.full(n_layers, 20.0),
                "update_ratio": np.full(n_layers, 1e-3),
            }
        stream.append(
            StepStats(
                step=t,
                grad_norm=g,
                has_grad=np.ones(n_layers, bool),
                nonfinite=np.zeros(n_layers),
                global_norm=float(np.sqrt(np.sum(g**2))),
                loss=2.0 - t * 1e-4,
                grad_reset=True,
                backward_calls=1,
                **detail,
            )
        )
    return info, stream


def load_before(rev: str):
    """The `Diagnoser` class of graddiag/detectors.py at git revision `rev`."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(
        ["git", "show", f"{rev}:graddiag/detectors.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "detectors_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("detectors_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Diagnoser


def feed(diag, stream: list[StepStats], block: int) -> None:
    """`block` 0: step by step; else `update_block` over blocks of that many steps (`diag`: a
    `Diagnoser` or one detector)."""
    if block == 0:
        for s in stream:
            diag.update(s)
    else:
        for i in range(0, len(stream), block):
            diag.update_block(stream[i : i + block])


def time_variant(info, stream, block, cls=Diagnoser) -> float:
    """Seconds per step of one variant on a fresh, warmed-up `Diagnoser`."""
    diag = cls(info)
    feed(diag, stream[:WARMUP], block)
    t0 = time.perf_counter()
    feed(diag, stream[WARMUP:], block)
    return (time.perf_counter() - t0) / (len(stream) - WARMUP)


def time_detectors(info, stream, block) -> dict[str, float]:
    """Seconds per step of each detector alone (step by step, or blocks of `block` steps)."""
    diag = Diagnoser(info)
    feed(diag, stream[:WARMUP], block or 1)
    out = {}
    rest = stream[WARMUP:]
    for d in diag.detectors:
        t0 = time.perf_counter()
        feed(d, rest, block)
        out[d.name] = (time.perf_counter() - t0) / len(rest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", help="git revision whose detectors also run step by step")
    args = ap.parse_args()
    before = load_before(args.before) if args.before else None
    streams = {(n, w): healthy(n, args.steps + WARMUP, w) for n in LAYERS for w in SPREADS}
    # -1: `before` step by step, -10: `before` in blocks of 10
    modes = (-1, -10, 0, *BLOCKS) if before else (0, *BLOCKS)
    times: dict[tuple, list[float]] = {(*k, b): [] for k in streams for b in modes}
    per_det: dict[tuple, list[dict[str, float]]] = {(w, b): [] for w in SPREADS for b in (0, 10)}
    for _ in range(args.rounds):
        for n, w, b in times:
            cls = before if b < 0 else Diagnoser
            size = 0 if b == -1 else abs(b)
            times[n, w, b].append(time_variant(*streams[n, w], size, cls))
        for w, b in per_det:
            per_det[w, b].append(time_detectors(*streams[12, w], b))

    med = {k: statistics.median(v) for k, v in times.items()}
    ref = -1 if before else 0
    names = {-1: f"{args.before} step by step", -10: f"{args.before} blocks of 10"}
    names[0] = "step by step"
    names.update({b: f"blocks of {b}" for b in BLOCKS})
    print(
        f"{args.steps} steps after {WARMUP} warm-up steps, median of {args.rounds} rounds; ms per"
    )
    print(f"step (and {names[ref]}'s time / the variant's: above 1 is faster)\n")
    print("| layers | norms within | " + " | ".join(names[b] for b in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for n, w in streams:
        cells = [f"{med[n, w, b] * 1e3:.4f} ({med[n, w, ref] / med[n, w, b]:.2f}x)" for b in modes]
        print(f"| {n} | {np.exp(w):.0f}x | " + " | ".join(cells) + " |")

    print("\nPer detector alone, 12 layers, ms per step (this code):\n")
    head = " | ".join(
        f"norms within {np.exp(w):.0f}x: step by step / blocks of 10" for w in SPREADS
    )
    print(f"| detector | {head} |")
    print("|---|" + "---|" * len(SPREADS))
    for name in per_det[SPREADS[0], 0][0]:
        cells = []
        for w in SPREADS:
            a, b = (statistics.median(r[name] for r in per_det[w, k]) for k in (0, 10))
            cells.append(f"{a * 1e3:.4f} / {b * 1e3:.4f} ({a / b:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
