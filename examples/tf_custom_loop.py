"""A custom TensorFlow training loop with two known gradient problems, found by graddiag.

1. `NormFeature` appends ||h|| to its input. At step 30 the batch is all zeros, so h == 0 and the
   gradient of the norm at 0 is NaN: `mid` and `inp` (below it) get NaN gradients, `mid` first in
   backward order; the head stays finite. With `nonfinite="skip"`, `monitor.apply` skips the
   optimizer call for that step, so the weights stay finite.
2. `aux` is computed under `tf.stop_gradient`: it never receives a gradient (detached).

The only changes to a plain loop: `monitor.tape()` instead of `tf.GradientTape()` and
`monitor.apply(...)` instead of `optimizer.apply_gradients(...)` (needed only for "skip").

    TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python examples/tf_custom_loop.py [--logdir runs/tf_loop]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from graddiag.tf import GradientMonitor  # noqa: E402

NAN_STEP = 30


class Net(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="net")
        self.inp = keras.layers.Dense(32, activation="tanh", use_bias=False, name="inp")
        self.mid = keras.layers.Dense(32, use_bias=False, name="mid")
        self.aux = keras.layers.Dense(32, name="aux")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        h = self.mid(self.inp(x))
        h = h + tf.stop_gradient(self.aux(x))  # bug 2: aux is cut off from the loss
        feature = tf.norm(h, axis=-1, keepdims=True)  # bug 1: NaN gradient where h == 0
        return self.head(tf.concat([h, feature], -1))


def regression_data(n: int = 512, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = (rng.normal(size=(d, 1)) / d**0.5).astype("float32")
    return x, np.sin(x @ w * 3)


def run(logdir=None, steps: int = 40, **monitor_kwargs) -> GradientMonitor:
    keras.utils.set_random_seed(0)
    model = Net()
    x, y = regression_data()
    model(x[:1])
    optimizer = keras.optimizers.Adam(1e-3)
    monitor_kwargs.setdefault("nonfinite", "skip")
    monitor = GradientMonitor(model, logdir, every=10, **monitor_kwargs)

    @tf.function
    def train_step(xb, yb):
        with monitor.tape() as tape:  # was: tf.GradientTape()
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        monitor.apply(optimizer, grads, model.trainable_variables)  # was: apply_gradients
        return loss

    for step in range(steps):
        i = step % 8 * 64
        xb, yb = x[i : i + 64], y[i : i + 64]
        if step == NAN_STEP:
            xb = np.zeros_like(xb)
        train_step(tf.constant(xb), tf.constant(yb))
    monitor.close()
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    return monitor


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--logdir", default=None, help="TensorBoard run directory (default: none)")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    mon = run(args.logdir, args.steps)
    print(mon.summary())
    if mon.logdir:
        print(f"TensorBoard logs: {mon.logdir}  (tensorboard --logdir {mon.logdir})")
