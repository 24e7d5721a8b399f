"""`graddiag.clip.ClipOps` in TensorFlow float32: the clipping engine's operations, usable inside
`tf.function` (functional: gradient lists are returned, not changed)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from graddiag import clip as cliplib
from graddiag.tf._measure import map_values, scale_grad, sum_squares, unit_norms


class TFOps:
    """`graddiag.clip.ClipOps` in TensorFlow float32, usable inside `tf.function` (functional: the
    gradient-list operations return new lists).

    Gradients may be `tf.IndexedSlices` (deduplicated, see `dedup`). AGC units are the last axis of
    a Keras kernel.

    Args:
        scale: the loss scale the gradients carry (a float32 scalar) or None. Sums of squares, unit
            norms and the clamp limit then refer to the unscaled gradients; factors need no change.
    """

    def __init__(self, scale: Any = None) -> None:
        self.loss_scale = scale

    @staticmethod
    def sqrt(x):
        return tf.sqrt(x)

    @staticmethod
    def minimum1(x):
        return tf.minimum(x, 1.0)

    @staticmethod
    def maximum(x, floor: float):
        return tf.maximum(x, floor)

    @staticmethod
    def where(cond, a, b):
        a = tf.cast(a, tf.float32)
        b = tf.cast(b, tf.float32)
        shape = tf.broadcast_dynamic_shape(tf.shape(a), tf.shape(b))
        return tf.where(cond, tf.broadcast_to(a, shape), tf.broadcast_to(b, shape))

    @staticmethod
    def sum(x):
        return tf.reduce_sum(x)

    @staticmethod
    def full(n: int, value: float):
        return tf.fill([n], tf.constant(value, tf.float32))

    @staticmethod
    def scalar(value: float):
        return tf.constant(value, tf.float32)

    @staticmethod
    def quantile_first(x, n, q: float):
        n = tf.cast(n, tf.int32)
        last = tf.maximum(n - 1, 0)
        ranked = tf.sort(x)
        pos = tf.cast(q, tf.float32) * tf.cast(last, tf.float32)
        lo = tf.cast(tf.floor(pos), tf.int32)
        hi = tf.minimum(lo + 1, last)
        a, b = tf.gather(ranked, lo), tf.gather(ranked, hi)
        value = a + (b - a) * (pos - tf.cast(lo, tf.float32))
        return tf.where(n > 0, value, tf.constant(cliplib.EMPTY, tf.float32))

    @staticmethod
    def roll_in(buf, index, value):
        i = tf.math.floormod(tf.cast(index, tf.int32), tf.shape(buf)[0])
        return tf.tensor_scatter_nd_update(buf, [[i]], tf.reshape(tf.cast(value, buf.dtype), [1]))

    @staticmethod
    def segment_sum(x, segments, n: int):
        return tf.math.unsorted_segment_sum(x, segments, n)

    @staticmethod
    def gather(x, index):
        return tf.gather(x, index)

    def sumsq(self, grads):
        if not grads:
            return tf.zeros([0])
        vec = tf.stack([sum_squares(g) for g in grads])
        return vec if self.loss_scale is None else vec * (1.0 / (self.loss_scale * self.loss_scale))

    @staticmethod
    def scale(grads, factors):
        if factors.shape.rank == 0:
            return [scale_grad(g, factors) for g in grads]
        return [scale_grad(g, f) for g, f in zip(grads, tf.unstack(factors), strict=True)]

    def clamp(self, grads, limit: float):
        c = limit if self.loss_scale is None else limit * self.loss_scale
        return [
            map_values(lambda v: tf.clip_by_value(v, -tf.cast(c, v.dtype), tf.cast(c, v.dtype)), g)
            for g in grads
        ]

    def unit_norms(self, grads, params) -> tuple[list, list]:
        return [unit_norms(g, self.loss_scale) for g in grads], [unit_norms(p) for p in params]

    @staticmethod
    def scale_units(grads, factors: list):
        return [scale_grad(g, f) for g, f in zip(grads, factors, strict=True)]
