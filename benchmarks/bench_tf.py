"""Overhead of graddiag's TensorFlow adapter in a compiled training step, side by side.

A Keras MLP of 8 Dense(1024) layers, batch 64, one `tf.function` train step per variant:

- plain: tape, gradients, `apply_gradients`;
- `tf.clip_by_global_norm` on the gradients;
- `tf.debugging.check_numerics` on every gradient;
- graddiag: per-layer statistics + non-finite check + `GlobalNormClip` + TensorBoard logging
  (`every=10`);
- `tf.debugging.enable_check_numerics()` (global, so it runs last).

The variants run interleaved in short rounds (so drift and other load hit all of them alike); the
table reports the median time per step over the rounds, its ratio to the plain step, and the best
round's ratio (less sensitive to other processes on a shared machine). Not a test: run it by hand::

    TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python benchmarks/bench_tf.py [--rounds 60 --steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from graddiag.clip import GlobalNormClip  # noqa: E402
from graddiag.tf import GradientMonitor  # noqa: E402

WIDTH, DEPTH, BATCH = 1024, 8, 64


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((WIDTH,))]
        + [keras.layers.Dense(WIDTH, activation="relu") for _ in range(DEPTH - 1)]
        + [keras.layers.Dense(WIDTH)]
    )


def make_step(transform, optimizer_name: str):
    """A compiled train step whose gradients pass through `transform(grads, variables)`."""
    model = make_model()
    opt = keras.optimizers.get({"class_name": optimizer_name, "config": {"learning_rate": 1e-4}})
    variables = model.trainable_variables

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = transform(tape.gradient(loss, variables), variables)
        opt.apply_gradients(zip(grads, variables, strict=True))
        return loss

    return step


def variants(logdir: str, every: int):
    def plain(g, v):
        return g

    def clip_global(g, v):
        return tf.clip_by_global_norm(g, 1.0)[0]

    def check_each(g, v):
        return [tf.debugging.check_numerics(x, "gradient") for x in g]

    monitors = {}

    def graddiag(g, v):
        mon = monitors.get("m")
        if mon is None:
            mon = monitors["m"] = GradientMonitor(v, logdir, every=every, clip=GlobalNormClip(1.0))
        return mon.step(g, v)

    return [
        ("plain compiled step", plain),
        ("tf.clip_by_global_norm", clip_global),
        ("check_numerics on every gradient", check_each),
        (f"graddiag (stats + non-finite + clip + logging, every={every})", graddiag),
    ], monitors


def time_steps(step, x, y, n: int) -> float:
    step(x, y).numpy()
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step(x, y)
    loss.numpy()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--optimizer", default="SGD", help="Keras optimizer class name")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, WIDTH)), tf.float32)
    y = tf.constant(rng.normal(size=(BATCH, WIDTH)), tf.float32)
    with tempfile.TemporaryDirectory() as logdir:
        named, monitors = variants(logdir, args.every)
        steps = [(name, make_step(fn, args.optimizer)) for name, fn in named]
        times: dict[str, list[float]] = {name: [] for name, _ in steps}
        for _name, step in steps:  # trace and warm up
            for _ in range(3):
                step(x, y)
        for _ in range(args.rounds):
            for name, step in steps:
                times[name].append(time_steps(step, x, y, args.steps))
        monitors["m"].close()
        tf.debugging.enable_check_numerics()
        name, step = (
            "tf.debugging.enable_check_numerics()",
            make_step(lambda g, v: g, args.optimizer),
        )
        for _ in range(3):
            step(x, y)
        times[name] = [time_steps(step, x, y, args.steps) for _ in range(max(3, args.rounds // 3))]

    base = statistics.median(times["plain compiled step"])
    best = min(times["plain compiled step"])
    print(
        f"Keras MLP {DEPTH}x{WIDTH}, batch {BATCH}, {args.optimizer}, tf {tf.__version__}, "
        f"{os.cpu_count()} CPUs; {args.rounds} rounds x {args.steps} steps\n"
    )
    print(
        "| variant | median ms/step | ratio (median) | ratio (best round) |\n|---|---:|---:|---:|"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.3f}x | {min(ts) / best:.3f}x |")


if __name__ == "__main__":
    main()
