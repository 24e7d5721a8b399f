"""Overhead of graddiag under `tf.distribute.MirroredStrategy`, side by side.

Two logical CPU devices (one machine), a Keras MLP of 4 Dense(512) layers, global batch 64, SGD;
one compiled `strategy.run` train step per variant:

- plain: tape, gradients, `apply_gradients` (which all-reduces);
- Keras `global_clipnorm=1.0` (Keras clips each replica's *local* gradients before its
  all-reduce: cheap, but not the clip of the gradients it applies);
- the clip of the applied gradients by hand: `all_reduce` + `tf.clip_by_global_norm` + each
  replica's 1/n share (what graddiag's clipping equals; one extra all-reduce);
- graddiag: statistics + non-finite check + TensorBoard logging (`every=10`), through
  `monitor.tape()`, without and with `GlobalNormClip(1.0)`.

Variants run interleaved in short rounds; the table reports the median time per step, its ratio
to the plain step and the best round's ratio. Not a test: run it by hand::

    TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python benchmarks/bench_tf_distribute.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from bench_tf import time_steps  # noqa: E402  (benchmarks/ is on the path when run as a script)

from graddiag.clip import GlobalNormClip  # noqa: E402
from graddiag.tf import GradientMonitor  # noqa: E402

WIDTH, DEPTH, BATCH = 512, 4, 64


def make_step(strategy, variant: str, logdir: str):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((WIDTH,))]
            + [keras.layers.Dense(WIDTH, activation="relu") for _ in range(DEPTH - 1)]
            + [keras.layers.Dense(WIDTH)]
        )
        clipnorm = 1.0 if variant == "keras" else None
        opt = keras.optimizers.SGD(1e-4, global_clipnorm=clipnorm)
        opt.build(model.trainable_variables)
    variables = model.trainable_variables
    monitor = None
    if variant.startswith("graddiag"):
        clip = GlobalNormClip(1.0) if variant == "graddiag" else None
        monitor = GradientMonitor(model, f"{logdir}/{variant}", every=10, clip=clip)

    def replica_step(x, y):
        with monitor.tape() if monitor else tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(x, training=True) - y)) / (BATCH * WIDTH)
        grads = tape.gradient(loss, variables)
        if variant == "by_hand":
            ctx = tf.distribute.get_replica_context()
            total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            clipped, _ = tf.clip_by_global_norm(total, 1.0)
            grads = [g / ctx.num_replicas_in_sync for g in clipped]
        opt.apply_gradients(zip(grads, variables, strict=True))
        return loss

    @tf.function
    def step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    return step, monitor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = ap.parse_args()

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensors(
        (
            rng.normal(size=(BATCH, WIDTH)).astype("float32"),
            rng.normal(size=(BATCH, WIDTH)).astype("float32"),
        )
    )
    x, y = next(iter(strategy.experimental_distribute_dataset(data)))
    names = {
        "plain": "plain MirroredStrategy step",
        "keras": "Keras global_clipnorm (clips each replica's local gradients)",
        "by_hand": "all_reduce + tf.clip_by_global_norm by hand (clips the applied gradients)",
        "graddiag_stats": "graddiag without clipping (stats + non-finite + logging, every=10)",
        "graddiag": "graddiag (stats + non-finite + GlobalNormClip + logging, every=10)",
    }
    with tempfile.TemporaryDirectory() as logdir:
        steps = {k: make_step(strategy, k, logdir) for k in names}
        times: dict[str, list[float]] = {k: [] for k in names}
        for step, _ in steps.values():  # trace and warm up
            for _ in range(3):
                step(x, y)
        for _ in range(args.rounds):
            for k, (step, monitor) in steps.items():
                times[k].append(time_steps(step, x, y, args.steps, monitor))
        for _, monitor in steps.values():
            if monitor is not None:
                monitor.close()

    base, best = statistics.median(times["plain"]), min(times["plain"])
    print(
        f"MirroredStrategy, 2 logical CPU devices; Keras MLP {DEPTH}x{WIDTH}, global batch "
        f"{BATCH}, SGD, tf {tf.__version__}, {os.cpu_count()} CPUs; "
        f"{args.rounds} rounds x {args.steps} steps\n"
    )
    print(
        "| variant | median ms/step | ratio (median) | ratio (best round) |\n|---|---:|---:|---:|"
    )
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"| {names[k]} | {med * 1e3:.2f} | {med / base:.3f}x | {min(ts) / best:.3f}x |")


if __name__ == "__main__":
    main()
