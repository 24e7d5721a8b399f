"""Overhead of graddiag's TensorFlow adapter in a compiled training step, side by side.

A Keras MLP of 8 Dense(1024) layers, batch 64, one `tf.function` train step per variant:

- plain: tape, gradients, `apply_gradients`;
- `tf.clip_by_global_norm` on the gradients;
- `tf.debugging.check_numerics` on every gradient;
- one `tf.nn.l2_loss` per gradient (reading each gradient once: what any exact per-tensor
  measurement costs at least);
- graddiag: per-layer statistics + non-finite check + `GlobalNormClip` + TensorBoard logging
  (`every=10`);
- `tf.debugging.enable_check_numerics()` (global, so it runs last).

The variants run interleaved in short rounds (so drift and other load hit all of them alike); the
table reports the median time per step over the rounds, its ratio to the plain step, and the best
round's ratio (less sensitive to other processes on a shared machine).

`--fit` measures Keras `fit` instead, plain against `GradDiagCallback()` at its default settings
(and `every=100, detail_every=0, hist_every=0`), interleaved fits of `--batches` batches in one
process, after one warm-up fit of each (the trace and XLA compilation, reported apart): a small MLP
(32-64-64-1, Adam, batch 32), a 512-wide MLP, the keras-io `addition_rnn` LSTM, and a custom loop
of the small MLP with `monitor.tape()` against a plain `tf.GradientTape` (one `tf.function` step).
Times are whole-fit wall times (and the process's CPU time, steadier on a shared machine) divided by
the batches, so per-fit work is included. Not a test: run it by hand::

    TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python benchmarks/bench_tf.py [--rounds 60 --steps 3]
    TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python benchmarks/bench_tf.py --fit [--rounds 15]
    TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python benchmarks/bench_tf.py --measure [--rounds 15]

`--measure` times one gradient's sum of squares by size (float32, float64, scaled float32).

`--baseline REV` adds the graddiag rows of git revision REV (e.g. `main`), run side by side in the
same process: its `graddiag` and `integrations` packages are copied (`git archive`) into a
temporary folder as `graddiag_base` and `integrations_base`, so before/after are interleaved.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from graddiag.tf import GradientMonitor  # noqa: E402

WIDTH, DEPTH, BATCH = 1024, 8, 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_baseline(rev: str):
    """`(GradientMonitor, GradDiagCallback)` of git revision `rev`, imported from a copy of its
    packages renamed `graddiag_base` and `integrations_base` (so both versions run in one
    process)."""
    folder = tempfile.mkdtemp(prefix="graddiag_base_")
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", rev, "graddiag", "integrations"],
        check=True,
        capture_output=True,
    ).stdout
    tar_path = os.path.join(folder, "src.tar")
    with open(tar_path, "wb") as f:
        f.write(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, filter="data")
    renames = {"graddiag": "graddiag_base", "integrations": "integrations_base"}
    imports = re.compile(r"\b(from|import) (graddiag|integrations)\b")
    for old, new in renames.items():
        os.rename(os.path.join(folder, old), os.path.join(folder, new))
        for base, _dirs, files in os.walk(os.path.join(folder, new)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(base, name)
                    with open(path) as f:
                        text = f.read()
                    text = imports.sub(lambda m: f"{m[1]} {renames[m[2]]}", text)
                    text = text.replace('("graddiag.', '("graddiag_base.')
                    with open(path, "w") as f:
                        f.write(text)
    sys.path.insert(0, folder)
    tf_mod = importlib.import_module("graddiag_base.tf")
    keras_mod = importlib.import_module("integrations_base.keras")
    return tf_mod.GradientMonitor, keras_mod.GradDiagCallback


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


def variants(logdir: str, every: int, baseline=None, rev: str = ""):
    def plain(g, v):
        return g

    def clip_global(g, v):
        return tf.clip_by_global_norm(g, 1.0)[0]

    def check_each(g, v):
        return [tf.debugging.check_numerics(x, "gradient") for x in g]

    sink = []

    def read_once(g, v):
        # one float32 l2_loss per gradient, kept in a variable: the one read of every gradient
        # that any exact per-tensor measurement needs (the floor for graddiag's statistics)
        if not sink:
            with tf.init_scope():
                sink.append(tf.Variable(tf.zeros([len(g)]), trainable=False))
        with tf.control_dependencies([sink[0].assign(tf.stack([tf.nn.l2_loss(x) for x in g]))]):
            return [tf.identity(x) for x in g]

    monitors = {}

    def monitored(key, cls, folder):
        # the policy class of the monitor's own package (a baseline has its own)
        clip_class = importlib.import_module(cls.__module__.split(".")[0] + ".clip").GlobalNormClip

        def transform(g, v):
            mon = monitors.get(key)
            if mon is None:
                policy = None if key.endswith("noclip") else clip_class(1.0)
                mon = monitors[key] = cls(v, folder, every=every, clip=policy)
            return mon.step(g, v)

        return transform

    out = [
        ("plain compiled step", plain),
        ("tf.clip_by_global_norm", clip_global),
        ("check_numerics on every gradient", check_each),
        ("tf.nn.l2_loss of every gradient (one read: the floor)", read_once),
        (
            f"graddiag (stats + non-finite + clip + logging, every={every})",
            monitored("m", GradientMonitor, logdir),
        ),
        (
            f"graddiag diagnosis only (no clipping, every={every})",
            monitored("m-noclip", GradientMonitor, os.path.join(logdir, "noclip")),
        ),
    ]
    if baseline is not None:
        out.append((f"graddiag @ {rev}", monitored("base", baseline, os.path.join(logdir, "base"))))
    return out, monitors


def time_steps(step, x, y, n: int, monitor=None) -> float:
    """Seconds per step of `n` steps; with a `monitor`, its background host work is waited for
    inside the timed window."""
    step(x, y).numpy()
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step(x, y)
    loss.numpy()
    if monitor is not None:
        monitor.history  # noqa: B018 - waits for the host work of these steps
    return (time.perf_counter() - t0) / n


def fit_models():
    """(name, build, data): Keras models for the `fit` rows, each with its data of `n` batches."""

    def mlp(width, inputs):
        def build():
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [keras.Input((inputs,))]
                + [keras.layers.Dense(width, activation="relu") for _ in range(2)]
                + [keras.layers.Dense(1)]
            )
            model.compile(optimizer="adam", loss="mse")
            return model

        def data(n, rng):
            x = rng.normal(size=(32 * n, inputs)).astype("float32")
            return x, rng.normal(size=(32 * n, 1)).astype("float32")

        return build, data

    def rnn():  # keras-io addition_rnn: "123+45" -> "168" as one-hot characters
        def build():
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((7, 12)),
                    keras.layers.LSTM(128),
                    keras.layers.RepeatVector(4),
                    keras.layers.LSTM(128, return_sequences=True),
                    keras.layers.Dense(12, activation="softmax"),
                ]
            )
            model.compile(optimizer="adam", loss="categorical_crossentropy")
            return model

        def data(n, rng):
            x = np.eye(12, dtype="float32")[rng.integers(0, 12, size=(32 * n, 7))]
            return x, np.eye(12, dtype="float32")[rng.integers(0, 12, size=(32 * n, 4))]

        return build, data

    return [
        ("MLP 32-64-64-1", *mlp(64, 32)),
        ("MLP 512-512-512-1", *mlp(512, 512)),
        ("addition_rnn (LSTM 128)", *rnn()),
    ]


def custom_loop(monitor_class=None, apply: bool = False):
    """The small MLP trained by a `tf.function` step with a tape, Adam, batch 32: a plain
    `tf.GradientTape`, or `monitor.tape()` of a `monitor_class` (a graddiag `GradientMonitor`);
    with `apply`, the optimizer step goes through `monitor.apply` (update/weight ratios)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    opt = keras.optimizers.Adam()
    mon = monitor_class(model) if monitor_class is not None else None

    @tf.function
    def step(x, y):
        with mon.tape() if mon is not None else tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        if apply:
            mon.apply(opt, grads, model.trainable_variables)
        else:
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    return step, mon


def fit_main(args, baseline=None) -> None:
    from integrations.keras import GradDiagCallback

    rng = np.random.default_rng(0)
    n = args.batches
    variants = [
        ("plain fit", lambda: []),
        ("GradDiagCallback()", lambda: [GradDiagCallback(print_summary=False)]),
        (
            "GradDiagCallback(every=100, detail_every=0, hist_every=0)",
            lambda: [
                GradDiagCallback(every=100, detail_every=0, hist_every=0, print_summary=False)
            ],
        ),
    ]
    if baseline is not None:
        base_cb = baseline[1]
        variants.insert(
            1, (f"GradDiagCallback() @ {args.baseline}", lambda: [base_cb(print_summary=False)])
        )
    print(
        f"Keras fit, tf {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds of one {n}-batch fit per "
        "variant, interleaved; ms per batch = fit wall time / batches\n"
    )
    print(
        "| model | variant | first fit (s) | median ms/batch | ratio (median) "
        "| CPU ms/batch | ratio (CPU) |\n|---|---|---:|---:|---:|---:|---:|"
    )
    models = fit_models()
    if args.models:
        models = [m for m in models if any(k.lower() in m[0].lower() for k in args.models)]
    for name, build, data in models:
        x, y = data(n, rng)
        runs = []
        for label, callbacks in variants:
            model, cbs = build(), callbacks()
            t0 = time.perf_counter()
            model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, callbacks=cbs)
            runs.append((label, model, cbs, time.perf_counter() - t0))
        times: dict[str, list[float]] = {label: [] for label, *_ in runs}
        cpu: dict[str, list[float]] = {label: [] for label, *_ in runs}
        for _ in range(args.rounds):
            for label, model, cbs, _first in runs:
                t0, c0 = time.perf_counter(), time.process_time()
                model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, callbacks=cbs)
                times[label].append((time.perf_counter() - t0) / n)
                cpu[label].append((time.process_time() - c0) / n)
        base = statistics.median(times["plain fit"])
        cbase = statistics.median(cpu["plain fit"])
        for label, _model, cbs, first in runs:
            med, cmed = statistics.median(times[label]), statistics.median(cpu[label])
            print(
                f"| {name} | {label} | {first:.2f} | {med * 1e3:.3f} | {med / base:.3f}x "
                f"| {cmed * 1e3:.3f} | {cmed / cbase:.3f}x |"
            )
            for cb in cbs:
                cb.close()
    # custom loop: one tf.function step per batch, interleaved in rounds of `n` steps; a
    # monitor's background host work is waited for inside its round (`history`)
    from graddiag.tf import GradientMonitor

    x = tf.constant(rng.normal(size=(32, 32)), tf.float32)
    y = tf.constant(rng.normal(size=(32, 1)), tf.float32)

    class EmptyCallback(GradientMonitor):
        """The monitor with its read-back's Python work removed: what the in-graph work and the
        call into Python cost alone (the floor of `read_back="callback"` on this step)."""

        def _host_callback(self, done, *arrays):
            self._fetched = int(done)  # read (nothing lost at close), not diagnosed
            return np.bool_(True)

    loops = {
        "plain tape": custom_loop(),
        "monitor.tape()": custom_loop(GradientMonitor),
        "monitor.tape(), read-back emptied (diagnostic)": custom_loop(EmptyCallback),
        "monitor.tape() + monitor.apply()": custom_loop(GradientMonitor, apply=True),
    }
    if baseline is not None:
        loops[f"monitor.tape() @ {args.baseline}"] = custom_loop(baseline[0])
        loops[f"monitor.tape() + monitor.apply() @ {args.baseline}"] = custom_loop(
            baseline[0], apply=True
        )
    times = {label: [] for label in loops}
    cpu = {label: [] for label in loops}
    for step, _ in loops.values():
        for _ in range(3):
            step(x, y)
    for _ in range(args.rounds):
        for label, (step, mon) in loops.items():
            c0 = time.process_time()
            times[label].append(time_steps(step, x, y, n, mon))
            cpu[label].append((time.process_time() - c0) / (n + 1))
    base, cbase = statistics.median(times["plain tape"]), statistics.median(cpu["plain tape"])
    for label, (_, mon) in loops.items():
        med, cmed = statistics.median(times[label]), statistics.median(cpu[label])
        print(
            f"| custom loop, MLP 32-64-64-1 | {label} | - | {med * 1e3:.3f} | {med / base:.3f}x "
            f"| {cmed * 1e3:.3f} | {cmed / cbase:.3f}x |"
        )
        if mon is not None:
            mon.close()


def measure_main(args) -> None:
    """Cost of one gradient's sum of squares by size: float32 `l2_loss` (what healthy steps pay
    for large gradients), a float64 cast + `l2_loss` (what small gradients always get) and the
    scaled float32 sum (`scaled_half_sum_squares`, the re-measure of suspicious large ones)."""
    from graddiag.tf._measure import scaled_half_sum_squares

    out = tf.Variable(tf.zeros([], tf.float64))
    kinds = {
        "float32 l2_loss": lambda g: tf.cast(tf.nn.l2_loss(g), tf.float64),
        "float64 cast + l2_loss": lambda g: tf.nn.l2_loss(tf.cast(g, tf.float64)),
        "scaled float32 (max-abs)": scaled_half_sum_squares,
        "empty step (call overhead)": lambda g: tf.constant(0.0, tf.float64),
    }
    fns = {k: tf.function(lambda g, fn=fn: out.assign(fn(g))) for k, fn in kinds.items()}
    print(f"tf {tf.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("\n| elements | " + " | ".join(kinds) + " |\n|---:|" + "---:|" * len(kinds))
    for n in (1024, 4096, 16384, 65536, 1 << 20):
        g = tf.constant(np.random.default_rng(0).normal(size=n).astype("float32"))
        reps = max(20, 2_000_000 // n)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn(g)
        for _ in range(args.rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(g)
                times[k].append((time.perf_counter() - t0) / reps)
        cells = [f"{statistics.median(times[k]) * 1e6:.1f} us" for k in fns]
        print(f"| {n} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--optimizer", default="SGD", help="Keras optimizer class name")
    ap.add_argument("--fit", action="store_true", help="Keras fit and custom-loop rows instead")
    ap.add_argument("--batches", type=int, default=200, help="batches per fit (with --fit)")
    ap.add_argument("--measure", action="store_true", help="sum-of-squares cost by size instead")
    ap.add_argument("--baseline", help="also run graddiag of this git revision, side by side")
    ap.add_argument("--models", nargs="*", help="with --fit: only the models whose name has these")
    args = ap.parse_args()
    if args.measure:
        measure_main(args)
        return
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.fit:
        fit_main(args, baseline)
        return

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, WIDTH)), tf.float32)
    y = tf.constant(rng.normal(size=(BATCH, WIDTH)), tf.float32)
    with tempfile.TemporaryDirectory() as logdir:
        named, monitors = variants(
            logdir, args.every, baseline and baseline[0], args.baseline or ""
        )
        steps = [(name, make_step(fn, args.optimizer)) for name, fn in named]
        times: dict[str, list[float]] = {name: [] for name, _ in steps}
        for _name, step in steps:  # trace and warm up
            for _ in range(3):
                step(x, y)
        owner = {named[3][0]: "m", named[4][0]: "m-noclip"}
        if len(named) > 5:
            owner[named[5][0]] = "base"
        for _ in range(args.rounds):
            for name, step in steps:
                mon = monitors.get(owner.get(name))
                times[name].append(time_steps(step, x, y, args.steps, mon))
        for mon in monitors.values():
            mon.close()
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
