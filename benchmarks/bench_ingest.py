"""Host cost of a log step: `HostPath._ingest_block` on the 10 rows it reads back at the default
`every=10` (decode, detectors, TensorBoard events), for a small 3-layer Keras-like MLP (6
variables) with a logdir, a loss on every step and nothing to report.

Each round runs every variant in a fresh subprocess (this checkout, and with ``--before REV`` the
graddiag package of git revision REV, extracted beside it), one after the other; the table gives
the median over rounds of the mean per block (CPU time of the process, and wall time) and the
ratio to REV's. ``--profile`` prints a cProfile of this checkout's blocks instead. Not a timed test.

Usage::

    python benchmarks/bench_ingest.py [--blocks 500] [--rounds 5] [--before REV] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 50
#: variables (kernel, bias of 3 dense layers) and their layers and sizes: 32-64-64-1
LAYER_OF = [0, 0, 1, 1, 2, 2]
NUMEL = [32 * 64, 64, 64 * 64, 64, 64, 1]


def run_blocks(n_blocks: int, profile: bool) -> dict[str, float]:
    """Ingest `n_blocks` 10-row blocks after `WARMUP` warm-up blocks; seconds per block."""
    import numpy as np

    from graddiag.host import HostPath
    from graddiag.settings import Settings
    from graddiag.stats import ModelInfo

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as logdir:
        names = [f"dense{i // 2}/{('kernel', 'bias')[i % 2]}" for i in range(6)]
        host = HostPath(Settings(logdir=logdir), LAYER_OF, names, NUMEL, "tensorflow", "-")
        host.background = False  # the work itself, in this thread
        layers = ("dense0", "dense1", "dense2")
        host.start(ModelInfo(layers, (2112, 4160, 65), tuple(reversed(layers))))
        lay = host.layout
        blocks = []
        for b in range(WARMUP + n_blocks):
            steps = []
            for t in range(b * 10, b * 10 + 10):
                row = lay.blank()
                row[lay.sumsq] = np.exp(rng.normal(0, 0.2, 6)) * np.tile([1.0, 0.1], 3)
                row[lay.col["has_loss"]], row[lay.col["loss"]] = 1.0, 2.0 - t * 1e-4
                steps.append((t, row, {"trainable": host.trainable([True] * 6)}))
            blocks.append(steps)
        for steps in blocks[:WARMUP]:
            host._ingest_block(steps)
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        for steps in blocks[WARMUP:]:
            host._ingest_block(steps)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if profile:
            prof.disable()
            pstats.Stats(prof).sort_stats(os.environ.get("SORT", "cumulative")).print_stats(30)
        host.close()
    return {"cpu": cpu / n_blocks, "wall": wall / n_blocks}


def extract(rev: str) -> str:
    """A directory holding the graddiag package of git revision `rev`."""
    data = subprocess.run(
        ["git", "archive", rev, "graddiag"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    out = tempfile.mkdtemp(prefix="graddiag-")
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    return out


def measure(path: str, n_blocks: int) -> dict[str, float]:
    """`run_blocks` in a subprocess importing graddiag from `path`."""
    env = {**os.environ, "PYTHONPATH": path}
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
    code += "import json, graddiag, bench_ingest as b; "
    code += f"assert graddiag.__file__.startswith({path!r}), graddiag.__file__; "
    code += f"print(json.dumps(b.run_blocks({n_blocks}, False)))"
    out = subprocess.run(  # run outside the checkout: `-c` puts the working directory first
        [sys.executable, "-c", code],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"the variant at {path} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", help="git revision to compare with")
    ap.add_argument("--profile", action="store_true", help="cProfile this checkout's blocks")
    args = ap.parse_args()
    if args.profile:
        run_blocks(args.blocks, True)
        return
    variants = {"this checkout": str(ROOT)}
    if args.before:
        variants = {args.before: extract(args.before), **variants}
    times: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for name, path in variants.items():
            times[name].append(measure(path, args.blocks))
    med = {
        v: {k: statistics.median(r[k] for r in rounds) for k in ("cpu", "wall")}
        for v, rounds in times.items()
    }
    ref = next(iter(variants))
    print(f"{args.blocks} blocks of 10 rows, median of {args.rounds} rounds; ms per block")
    print(f"(and {ref}'s time / the variant's: above 1 is faster)\n")
    print("| variant | CPU | wall |")
    print("|---|---|---|")
    for v, m in med.items():
        cells = [f"{m[k] * 1e3:.3f} ({med[ref][k] / m[k]:.2f}x)" for k in ("cpu", "wall")]
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
