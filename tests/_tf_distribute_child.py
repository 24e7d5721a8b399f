"""Training runs for tests/test_tf_distribute.py (not a test module).

``python _tf_distribute_child.py CASE LOGDIR``: configures 2 logical CPU devices before TensorFlow
initialises them, runs CASE under `tf.distribute` and on one device (same problem, same global
batch, same seed) and prints one line ``RESULT <json>`` with the raw numbers; the test compares.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import graddiag  # noqa: E402
import graddiag.tf  # noqa: E402
from graddiag.clip import GlobalNormClip, ValueClip  # noqa: E402
from integrations.keras import GradDiagCallback  # noqa: E402

DEVICES = ["/cpu:0", "/cpu:1"]
BATCH = 8  # global batch: 4 examples per replica


def data(n: int = 32, nan_row: int | None = None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    if nan_row is not None:
        x[nan_row, 0] = np.nan
    return x, y


def embedding_model():
    """Embedding gradients are `tf.IndexedSlices`; Adam squares their rows."""
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(20, 4, name="emb"),
            keras.layers.Flatten(),
            keras.layers.Dense(1, name="head"),
        ]
    )
    m.compile(keras.optimizers.Adam(0.01), "mse")
    return m


def mlp(optimizer=None):
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    m.compile(optimizer or keras.optimizers.Adam(0.01), "mse")
    return m


def under(strategy, fn):
    if strategy is None:
        return fn()
    with strategy.scope():
        return fn()


def history(monitor) -> list[dict]:
    return [
        {
            "step": s.step,
            "global_norm": s.global_norm,
            "grad_norm": [float(v) for v in s.grad_norm],
            "clip_coef": s.clip_coef,
            "skipped": s.skipped,
            "loss": s.loss,
        }
        for s in monitor.history
    ]


def findings(monitor) -> list[dict]:
    return [
        {"step": f.step, "layer": f.layer, "kind": f.kind, "message": f.message}
        for f in monitor.findings
    ]


def weights(model) -> list[list[float]]:
    return [np.asarray(w.numpy(), np.float64).ravel().tolist() for w in model.trainable_variables]


def replica_copies_agree(model) -> bool:
    """Every replica holds the same value of every variable (no replica diverged)."""
    for w in model.trainable_variables:
        copies = [c.numpy() for c in getattr(w.value, "values", [w.value])]
        if any(not np.array_equal(copies[0], c, equal_nan=True) for c in copies[1:]):
            return False
    return True


def event_files(logdir: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), logdir)
        for d, _, files in os.walk(logdir)
        for f in files
        if "tfevents" in f
    )


def fit_run(
    strategy, logdir=None, clip=None, nonfinite="warn", nan_row=None, optimizer=None, ids=False
):
    model = under(strategy, embedding_model if ids else lambda: mlp(optimizer))
    x, y = data(nan_row=nan_row)
    if ids:
        x = np.random.default_rng(1).integers(0, 20, size=(len(x), 3)).astype("int32")
    cb = GradDiagCallback(
        logdir, every=1, clip=clip, nonfinite=nonfinite, print_summary=False, hist_every=2
    )
    error = None
    try:
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[cb], shuffle=False)
    except graddiag.tf.NonFiniteGradientError as e:
        error = str(e)
    cb.close()
    out = {
        "history": history(cb.monitor),
        "findings": findings(cb.monitor),
        "weights": weights(model),
        "agree": replica_copies_agree(model),
        "error": error,
        "iterations": int(model.optimizer.iterations.numpy()),
    }
    if logdir:
        out["files"] = event_files(logdir)
        df = graddiag.read(logdir)
        norms = df[df["stat"] == "grad_norm"]
        out["logged"] = {
            f"{r.layer}@{int(r.step)}": float(r.value)
            for r in norms.itertuples()
            if isinstance(r.layer, str)
        }
    return out


def case_fit(logdir: str) -> dict:
    mirrored = tf.distribute.MirroredStrategy(DEVICES)
    return {
        "single": fit_run(None, os.path.join(logdir, "single")),
        "mirrored": fit_run(mirrored, os.path.join(logdir, "mirrored")),
        "one_device": fit_run(tf.distribute.OneDeviceStrategy("/cpu:1")),
        "embedding_single": fit_run(None, ids=True),
        "embedding_mirrored": fit_run(mirrored, ids=True),
        "replicas": mirrored.num_replicas_in_sync,
    }


def case_clip(logdir: str) -> dict:
    mirrored = tf.distribute.MirroredStrategy(DEVICES)
    chain = [ValueClip(0.05), GlobalNormClip(0.5)]
    return {
        "keras_clipnorm": fit_run(None, optimizer=keras.optimizers.Adam(0.01, global_clipnorm=0.5)),
        "single": fit_run(None, clip=GlobalNormClip(0.5)),
        "mirrored": fit_run(mirrored, clip=GlobalNormClip(0.5)),
        "single_chain": fit_run(None, clip=chain),
        "mirrored_chain": fit_run(mirrored, clip=chain),
    }


class Net(keras.Model):
    """A frozen layer, an unused one (never called: its variables get no gradient) and a head."""

    def __init__(self):
        super().__init__(name="net")
        self.frozen = keras.layers.Dense(8, activation="tanh", name="frozen")
        self.unused = keras.layers.Dense(8, name="unused")
        self.head = keras.layers.Dense(1, name="head")
        self.frozen.trainable = False

    def call(self, x):
        return self.head(self.frozen(x))


def loop_run(
    strategy, steps: int = 24, nonfinite="warn", nan_step=None, clip=None, eager=False
) -> dict:
    """A custom loop: `strategy.run` of a step that uses `monitor.tape()` and `monitor.apply`
    (in a `tf.function`, or eagerly)."""
    keras.utils.set_random_seed(0)

    def build():
        net = Net()
        net(tf.zeros([1, 4]))
        net.unused.build((None, 4))
        opt = keras.optimizers.SGD(0.05)
        opt.build(net.trainable_variables)
        return net, opt

    net, opt = under(strategy, build)
    monitor = graddiag.tf.GradientMonitor(
        net, every=4, nonfinite=nonfinite, clip=clip, detail_every=4
    )
    x, y = data(steps * BATCH)
    n = 1 if strategy is None else strategy.num_replicas_in_sync

    def step(xb, yb):
        with monitor.tape() as tape:
            pred = net(xb)
            loss = tf.reduce_sum(tf.square(pred - yb)) / BATCH  # mean over the global batch
        grads = tape.gradient(loss, net.trainable_variables)
        monitor.apply(opt, grads, net.trainable_variables)
        return loss

    def train(xb, yb):
        if strategy is None:
            return step(xb, yb)
        per_replica = strategy.run(step, args=(xb, yb))
        return strategy.reduce("SUM", per_replica, axis=None)

    if not eager:
        train = tf.function(train)

    error = None
    for i in range(steps):
        xb, yb = x[i * BATCH : (i + 1) * BATCH].copy(), y[i * BATCH : (i + 1) * BATCH]
        if i == nan_step:
            xb[BATCH - 1, 0] = np.nan  # the last example: replica 1's shard under 2 replicas
        if strategy is not None:
            xb = split(strategy, xb, n)
            yb = split(strategy, yb, n)
        try:
            train(xb, yb)
        except tf.errors.OpError as e:
            error = str(e)
            break
    monitor.close()
    return {
        "history": history(monitor),
        "findings": findings(monitor),
        "weights": weights(net),
        "agree": replica_copies_agree(net),
        "error": error,
        "info_frozen": list(monitor.info.frozen),
    }


def split(strategy, array, n):
    """Replica k gets the k-th contiguous shard of the global batch."""
    shards = np.split(array, n)
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group])
    )


def case_loop(logdir: str) -> dict:
    mirrored = tf.distribute.MirroredStrategy(DEVICES)
    return {
        "single": loop_run(None),
        "mirrored": loop_run(mirrored),
        "single_clip": loop_run(None, steps=6, clip=ValueClip(0.05)),
        "mirrored_clip": loop_run(mirrored, steps=6, clip=ValueClip(0.05)),
        "mirrored_clip_eager": loop_run(mirrored, steps=6, clip=ValueClip(0.05), eager=True),
    }


def case_nan(logdir: str) -> dict:
    mirrored = tf.distribute.MirroredStrategy(DEVICES)
    row = BATCH + BATCH - 1  # step 1, the last example: replica 1's shard
    out = {}
    for policy in ("skip", "raise"):
        out[f"fit_{policy}_single"] = fit_run(None, nonfinite=policy, nan_row=row)
        out[f"fit_{policy}_mirrored"] = fit_run(mirrored, nonfinite=policy, nan_row=row)
        out[f"loop_{policy}_single"] = loop_run(None, steps=6, nonfinite=policy, nan_step=2)
        out[f"loop_{policy}_mirrored"] = loop_run(mirrored, steps=6, nonfinite=policy, nan_step=2)
    return out


def case_unsupported(logdir: str) -> dict:
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except NotImplementedError as e:
            out[name] = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[name] = f"OTHER {type(e).__name__}: {e}"

    central = tf.distribute.experimental.CentralStorageStrategy(DEVICES)
    model = under(central, mlp)
    x, y = data()
    cb = GradDiagCallback(every=1, print_summary=False)
    attempt("fit", lambda: model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[cb]))
    attempt("model", lambda: graddiag.tf.GradientMonitor(model))
    v = tf.Variable([1.0, 2.0])
    mon = graddiag.tf.GradientMonitor([v], every=1)
    attempt("replica", lambda: central.run(lambda: mon.step([tf.ones([2])], [v])))
    multi = tf.distribute.MultiWorkerMirroredStrategy()
    attempt("multi_worker", lambda: under(multi, lambda: graddiag.tf.GradientMonitor([v])))
    mirrored = tf.distribute.MirroredStrategy(DEVICES)
    acc = under(mirrored, lambda: [tf.Variable([0.0, 0.0])])
    counted = graddiag.tf.GradientMonitor([v], accumulators=acc)

    def micro():
        with counted.tape() as tape:
            loss = tf.reduce_sum(v * v)
        return tape.gradient(loss, [v])

    attempt("accumulators", lambda: mirrored.run(tf.function(micro)))
    out["names"] = {"central": type(central).__name__, "multi_worker": type(multi).__name__}
    return out


if __name__ == "__main__":
    case, logdir = sys.argv[1], sys.argv[2]
    result = globals()[f"case_{case}"](logdir)
    print("RESULT " + json.dumps(result))
