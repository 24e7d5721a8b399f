"""Validate a small Keras model's gradients against the reference engine (CPU, seconds).

TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=. python examples/validate_keras_model.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from graddiag.reference import validate  # noqa: E402


@tf.custom_gradient
def clipped_identity(x):
    """Identity whose gradient is (wrongly) zeroed where |x| > 0.5."""
    return tf.identity(x), lambda g: g * tf.cast(tf.abs(x) <= 0.5, g.dtype)


class ClippedIdentity(keras.layers.Layer):
    def call(self, x):
        return clipped_identity(x)


def factory(custom: bool = False):
    """(model, inputs, targets, loss) for `validate` and for `graddiag validate`."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = ClippedIdentity()(h) if custom else h
    h = keras.layers.Dense(16, activation="tanh")(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 8)
    return model, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def main() -> None:
    for title, custom in (("correct model", False), ("model with a wrong custom_gradient", True)):
        model, x, y, loss = factory(custom)
        report = validate(model, x, loss, y)
        print(f"--- {title}: {'ok' if report.ok else 'MISMATCH'}")
        for a in report.layers:
            print(f"{a.layer:12s} {a.dtype} rel err {a.max_rel_err:.1e} (tol {a.tolerance:.0e})")
        for finding in report.findings:
            print(finding)


if __name__ == "__main__":
    main()
