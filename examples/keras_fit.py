"""`model.fit` with huge gradients, diagnosed by one callback.

The inputs are raw, unnormalized features (values in the thousands) and the targets are in the
thousands too: every MSE gradient is huge from the first step on, and global-norm clipping at 1.0
scales every step's gradients down by orders of magnitude (clipped: a warning that the threshold,
or rather the input scaling, is off). Standardizing the inputs fixes it.

    TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python examples/keras_fit.py [--logdir runs/keras_fit]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from graddiag.clip import GlobalNormClip  # noqa: E402

try:  # installed: graddiag.integrations; from a checkout: the integrations/ folder
    from graddiag.integrations.keras import GradDiagCallback
except ImportError:
    from integrations.keras import GradDiagCallback


def run(logdir=None, epochs: int = 3, **callback_kwargs) -> GradDiagCallback:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1024, 8)) * 1000 + 3000).astype("float32")  # the problem: unscaled
    y = (x @ rng.normal(size=(8, 1)) / 8).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="regressor",
    )
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    callback_kwargs.setdefault("clip", GlobalNormClip(1.0))
    cb = GradDiagCallback(logdir, every=8, print_summary=False, **callback_kwargs)
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=[cb])
    cb.close()  # the end of the run: adds end-of-run findings (the clipping rate)
    return cb


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--logdir", default=None, help="TensorBoard run directory (default: none)")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    cb = run(args.logdir, args.epochs)
    print(cb.monitor.summary())
    if cb.monitor.logdir:
        print(f"TensorBoard logs: {cb.monitor.logdir}  (tensorboard --logdir {cb.monitor.logdir})")
