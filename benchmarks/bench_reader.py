"""Read 2 million scalars back into a DataFrame: graddiag vs tbparse vs TensorBoard's EventAccumulator.

The log is written by graddiag's own writer (`TensorBoardSink`: one event per step with a grad_norm
per layer plus three global values), 10,000 steps x 200 layers by default. Each reader produces a
long DataFrame of every scalar (step, tag or layer/stat, value, wall time):

* ``graddiag``: `graddiag.read(logdir)` (CRC checks on, chunked reads);
* ``tbparse``: `SummaryReader(logdir, pivot=False, extra_columns={"wall_time"}).scalars`;
* ``EventAccumulator``: `EventAccumulator(logdir, size_guidance={"scalars": 0})` (keep all),
  `Reload()`, then one DataFrame from `Scalars(tag)` of every tag.

All three run side by side in this process (TensorFlow importable, if installed: TensorBoard and
tbparse then use TF's record reader), and again in a subprocess where ``import tensorflow`` is
blocked (the TF-free path). Not a timed test; prints a markdown table of medians and ratios.

Usage::

    python benchmarks/bench_reader.py [--steps 10000] [--layers 200] [--repeat 3] [--logdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc


def write_log(logdir: str, steps: int, layers: int) -> int:
    """Write the benchmark log with graddiag's writer; return the number of scalars."""
    import numpy as np

    from graddiag.monitor import TensorBoardSink
    from graddiag.stats import ModelInfo, StepStats

    names = tuple(f"model.blocks.{i // 2}.mlp.fc{i % 2}" for i in range(layers))
    info = ModelInfo(layers=names)
    sink = TensorBoardSink(logdir, info, {"info": info.to_dict(), "detectors": {}})
    rng = np.random.default_rng(0)
    has = np.ones(layers, bool)
    zero = np.zeros(layers)
    for s in range(steps):
        g = rng.lognormal(0.0, 0.5, layers)
        sink.write_step(
            StepStats(
                step=s,
                grad_norm=g,
                has_grad=has,
                nonfinite=zero,
                global_norm=float(np.sqrt(np.sum(g**2))),
            ),
            0,
        )
    sink.close()
    return steps * (layers + 3)


def read_graddiag(logdir: str):
    import graddiag.reader

    return graddiag.reader.read(logdir, progress=False)


def read_tbparse(logdir: str):
    from tbparse import SummaryReader

    return SummaryReader(logdir, pivot=False, extra_columns={"wall_time"}).scalars


def read_event_accumulator(logdir: str):
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = [d for d, _, files in os.walk(logdir) if any("tfevents" in f for f in files)][0]
    ea = EventAccumulator(run, size_guidance={"scalars": 0})
    ea.Reload()
    frames = []
    for tag in ea.Tags()["scalars"]:
        ev = ea.Scalars(tag)
        frames.append(
            pd.DataFrame(
                {
                    "step": [e.step for e in ev],
                    "tag": tag,
                    "value": [e.value for e in ev],
                    "wall_time": [e.wall_time for e in ev],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


READERS = {
    "graddiag": read_graddiag,
    "tbparse": read_tbparse,
    "EventAccumulator": read_event_accumulator,
}


def time_readers(logdir: str, repeat: int, slow_repeat: int) -> dict[str, dict]:
    """Median wall time of each reader in this process, and the rows it returned."""
    import pandas  # noqa: F401 - imports are not part of the timings
    import tbparse  # noqa: F401
    from tensorboard.backend.event_processing import event_accumulator  # noqa: F401

    import graddiag.reader  # noqa: F401

    out = {}
    for name, fn in READERS.items():
        n = repeat if name == "graddiag" else slow_repeat
        times, rows = [], 0
        for _ in range(n):
            t = time.perf_counter()
            df = fn(logdir)
            times.append(time.perf_counter() - t)
            rows = len(df)
            del df
        out[name] = {"median_s": statistics.median(times), "runs": n, "rows": rows}
    return out


def graddiag_peak_memory(logdir: str) -> tuple[float, float]:
    """(peak traced MiB while reading, MiB of the returned DataFrame)."""
    tracemalloc.start()
    df = read_graddiag(logdir)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, df.memory_usage(deep=True).sum() / 2**20


def tf_version() -> str | None:
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf.__version__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--layers", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5, help="runs of graddiag (median)")
    p.add_argument("--slow-repeat", type=int, default=3, help="runs of tbparse/EventAccumulator")
    p.add_argument("--logdir", default=None, help="reuse/write the log here (default: temp dir)")
    p.add_argument("--child", choices=["notf"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child == "notf":
        sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError
        print(json.dumps(time_readers(args.logdir, args.repeat, args.slow_repeat)))
        return

    logdir = args.logdir or tempfile.mkdtemp(prefix="graddiag-bench-")
    if not any("tfevents" in f for _, _, fs in os.walk(logdir) for f in fs):
        n = write_log(logdir, args.steps, args.layers)
    else:
        n = args.steps * (args.layers + 3)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(logdir) for f in fs)
    tfv = tf_version()
    with_tf = time_readers(logdir, args.repeat, args.slow_repeat)
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "notf",
            "--logdir",
            logdir,
            "--repeat",
            str(args.repeat),
            "--slow-repeat",
            str(args.slow_repeat),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    without_tf = json.loads(child.stdout.strip().splitlines()[-1])
    peak, df_mib = graddiag_peak_memory(logdir)

    print(
        f"\n{n:,} scalars ({args.steps:,} steps x {args.layers} layers + 3 globals), "
        f"{size / 2**20:.0f} MiB event file; TensorFlow {tfv or 'not installed'}; "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| reader | TensorFlow importable | median s (runs) | scalars/s | vs graddiag |")
    print("|---|---|---:|---:|---:|")
    for label, res in (("yes", with_tf), ("no", without_tf)):
        if label == "yes" and tfv is None:
            continue
        base = res["graddiag"]["median_s"]
        for name, r in res.items():
            assert r["rows"] == n, f"{name} returned {r['rows']} rows, expected {n}"
            print(
                f"| {name} | {label} | {r['median_s']:.2f} ({r['runs']}) | "
                f"{n / r['median_s']:,.0f} | {r['median_s'] / base:.1f}x |"
            )
    print(
        f"\ngraddiag peak memory while reading (tracemalloc): {peak:.0f} MiB, of which the "
        f"returned DataFrame is {df_mib:.0f} MiB (reads are {8} MiB chunks)."
    )


if __name__ == "__main__":
    main()
