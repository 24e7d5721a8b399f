"""How the TensorFlow adapter sees a model: its variables, their layers and names."""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def is_model(obj: Any) -> bool:
    return hasattr(obj, "trainable_variables") and hasattr(obj, "weights")


def key_of(v: Any) -> int:
    """Identity of a variable; a Keras variable and the tf.Variable it wraps share one key."""
    if isinstance(v, tf.Variable):
        return id(v)
    inner = getattr(v, "_value", None)  # keras.Variable (TF backend) holds its tf.Variable here
    return id(inner) if isinstance(inner, tf.Variable) else id(v)


def var_path(v: Any) -> str:
    path = getattr(v, "path", None) or v.name
    return path[:-2] if path.endswith(":0") else path


def layer_and_var(path: str, prefix: str) -> tuple[str, str]:
    """Split a variable path into (layer, variable name), dropping the model's own name."""
    if prefix and path.startswith(prefix + "/"):
        path = path[len(prefix) + 1 :]
    layer, _, name = path.rpartition("/")
    return (layer or name), name


def frozen_variables(model: Any, trainable: set[int]) -> list[Any]:
    """Variables that would be trained but for `layer.trainable = False` (not BatchNorm statistics,
    which Keras creates non-trainable)."""
    flatten = getattr(model, "_flatten_layers", None)
    out, seen = [], set(trainable)
    for layer in flatten(include_self=True) if flatten else [model]:
        if getattr(layer, "trainable", True):
            continue
        for v in getattr(layer, "_trainable_variables", ()):
            if key_of(v) not in seen:
                seen.add(key_of(v))
                out.append(v)
    return out
