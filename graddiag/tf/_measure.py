"""What the TensorFlow adapter computes in the graph: sums of squares, scaling that keeps
`IndexedSlices`, detail statistics and histogram rows."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from graddiag.host import HIST_BINS, HIST_WIDTH, TINY_SUMSQ

#: Gradients up to this many elements are always summed in float64 (a cast, then `l2_loss`: as
#: many ops as a float32 sum and no branch; measured in benchmarks/bench_tf.py --measure); larger
#: ones in float32, re-measured only when that sum may be wrong.
EXACT_MAX_NUMEL = 4096


def scaled_half_sum_squares(v) -> tf.Tensor:
    """Half the sum of squares of `v` in float64, computed as max|v|^2 * l2_loss(v / max|v|) with a
    float32 pass: neither overflow nor underflow for finite float32/bf16/fp16 values (NaN/Inf
    stay non-finite). Cheaper on the CPU than a float64 cast for large tensors (docs/tensorflow.md)."""
    v = tf.cast(v, tf.float32) if v.dtype != tf.float32 else v
    m = tf.reduce_max(tf.abs(v)) if v.shape.num_elements() != 0 else tf.constant(0.0)
    m = tf.where(m > 0.0, m, 1.0)  # an all-zero gradient stays exactly 0
    m64 = tf.cast(m, tf.float64)
    return tf.cast(tf.nn.l2_loss(v / m), tf.float64) * m64 * m64


def sums_of_squares(grads: list) -> tf.Tensor:
    """float64 vector of the gradients' sums of squares (tensors or deduplicated IndexedSlices),
    right for every finite float32/bf16/fp16 gradient, at the cost of float32 sums.

    Small gradients (up to `EXACT_MAX_NUMEL` elements) are summed in float64 directly. Larger ones
    get one float32 `l2_loss` each; entries that may be wrong there — +inf (finite elements above
    ~1e19 overflow) or below `TINY_SUMSQ` (elements below ~1e-19 underflow, exactly 0 included) —
    are measured again with a scaled sum (`scaled_half_sum_squares`), each in its own `tf.cond`
    inside one `rare_cond` on "any entry suspicious", so a healthy step pays one predicate and
    one call of the cheap branch. So
    non-finite is decided by the elements (the sum of finite values is finite), and a gradient
    reads exactly 0 only when every element is 0."""
    values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
    small = [
        v.shape.num_elements() is not None and v.shape.num_elements() <= EXACT_MAX_NUMEL
        for v in values
    ]
    half: list = [
        tf.nn.l2_loss(v if v.dtype == tf.float64 else tf.cast(v, tf.float64)) if s else None
        for v, s in zip(values, small, strict=True)
    ]
    large = [i for i, s in enumerate(small) if not s]
    if large:
        big = [values[i] for i in large]
        fast = tf.stack(
            [tf.nn.l2_loss(v if v.dtype == tf.float32 else tf.cast(v, tf.float32)) for v in big]
        )
        suspicious = tf.math.is_inf(fast) | (fast < TINY_SUMSQ / 2)  # NaN: neither, stays NaN

        def exact():
            return tf.stack(
                [
                    tf.cond(
                        suspicious[j],
                        lambda v=v: scaled_half_sum_squares(v),
                        lambda j=j: tf.cast(fast[j], tf.float64),
                    )
                    for j, v in enumerate(big)
                ]
            )

        # a function call taken on suspicious steps only: lowered, every step would schedule
        # the exact branch's ops (dead) for each large gradient
        checked = rare_cond(tf.reduce_any(suspicious), exact, lambda: tf.cast(fast, tf.float64))
        if len(large) == len(values):
            return checked * 2.0
        for i, h in zip(large, tf.unstack(checked, num=len(large)), strict=True):
            half[i] = h
    return tf.stack(half) * 2.0


def rare_cond(pred, true_fn, false_fn):
    """`tf.cond` for a branch taken on few steps (detail statistics, histograms, the log-step
    read-back). In a graph, TensorFlow lowers a cond into the step graph (Switch/Merge), so every
    step schedules each op of both branches (untaken ones as dead); here the `If` op is kept as
    a function call instead, so an ordinary step pays one call of the cheap `false_fn` only
    (benchmarks/bench_tf.py --fit, docs/tensorflow.md). Under XLA and eagerly: a plain `tf.cond`."""
    out = tf.cond(pred, true_fn, false_fn)
    op = getattr(out, "op", None)
    if op is not None and op.type == "Identity" and op.inputs:
        op = op.inputs[0].op
    if op is not None and op.type in ("If", "StatelessIf"):
        try:
            lowered = op.get_attr("_lower_using_switch_merge")
        except ValueError:  # not set (XLA): left to the compiler
            return out
        if lowered:
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return out


def sum_squares(g) -> tf.Tensor:
    """Sum of squares of one gradient, accumulated in float32 (IndexedSlices: of the dense sum)."""
    if isinstance(g, tf.IndexedSlices):
        g = dedup(g).values
    if g.dtype != tf.float32:
        g = tf.cast(g, tf.float32)
    return 2.0 * tf.nn.l2_loss(g)


def dedup(g: tf.IndexedSlices) -> tf.IndexedSlices:
    """Sum the rows of repeated indices, so norms and value clipping see the dense gradient."""
    unique, idx = tf.unique(g.indices)
    values = tf.math.unsorted_segment_sum(g.values, idx, tf.size(unique))
    return tf.IndexedSlices(values, unique, g.dense_shape)


def map_values(fn, g):
    """`fn(g)`, or on the values of an `IndexedSlices`."""
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(fn(g.values), g.indices, g.dense_shape)
    return fn(g)


def scale_grad(g, factor):
    """`g * factor` (factor: float32 scalar or broadcastable), keeping dtype and IndexedSlices."""
    return map_values(lambda v: v * tf.cast(factor, v.dtype), g)


def unit_norms(x, scale=None):
    """float32 norms per output unit (the last axis of a Keras kernel), shaped to broadcast; one
    unit for vectors/scalars. Deduplicated IndexedSlices: over their rows (the others are zero)."""
    if isinstance(x, tf.IndexedSlices):
        x = x.values
    x = tf.convert_to_tensor(x)
    x = tf.cast(x, tf.float32) if x.dtype != tf.float32 else x
    if scale is not None:
        x = x / scale
    axes = list(range(x.shape.rank - 1)) if x.shape.rank > 1 else None
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=x.shape.rank > 1))


def zero_unless(ok, g):
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(zero_unless(ok, g.values), g.indices, g.dense_shape)
    return tf.where(ok, g, tf.zeros_like(g))


def identity(g):
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(tf.identity(g.values), g.indices, g.dense_shape)
    return tf.identity(g)


def detail_columns(by_slot: dict, variables: list, inv_scale2=None) -> tf.Tensor:
    """Detail statistics of one step (`graddiag.host.DETAIL_FIELDS` x variables): max |g|, non-zero,
    NaN and Inf counts of each gradient in `by_slot` (variable index -> gradient), and each
    variable's sum of squares."""
    n = len(variables)
    cols = []
    for i, v in enumerate(variables):
        g = by_slot.get(i)
        p = tf.convert_to_tensor(v)
        psq = sum_squares(p if p.dtype.is_floating else tf.cast(p, tf.float32))
        if g is None:
            cols.append(tf.stack([0.0, 0.0, 0.0, 0.0, psq]))
            continue
        values = g.values if isinstance(g, tf.IndexedSlices) else g
        a = tf.abs(tf.cast(values, tf.float32))
        if inv_scale2 is not None:
            a = a * tf.sqrt(inv_scale2)
        # NaN/Inf counted only when the sum of |g| is not finite (NaN, Inf or a float32 overflow
        # of finite values): two passes fewer on a healthy step
        nonfinite = tf.cond(
            tf.math.is_finite(tf.reduce_sum(a)),
            lambda: tf.zeros([2]),
            lambda a=a: tf.stack([_count(tf.math.is_nan(a)), _count(tf.math.is_inf(a))]),
        )
        cols.append(
            tf.concat(
                [
                    tf.stack(
                        [
                            tf.reduce_max(a) if a.shape.num_elements() != 0 else 0.0,
                            _count(tf.not_equal(a, 0.0)),
                        ]
                    ),
                    nonfinite,
                    tf.reshape(psq, [1]),
                ],
                0,
            )
        )
    assert len(cols) == n
    return tf.stack(cols, axis=1)


def _count(mask) -> tf.Tensor:
    return tf.cast(tf.math.count_nonzero(mask), tf.float32)


def histogram_rows(by_slot: dict, layer_index: np.ndarray, n_layers: int, inv_scale2=None):
    """Per-layer histogram rows (`graddiag.host.HIST_WIDTH` each) of one step's finite gradient
    values, with fixed shapes (no boolean masks), so the branch also compiles under XLA.

    A layer whose values are all finite (and whose sum of squares fits float32) is binned tensor
    by tensor with `bincount` on the layer's range, without copying its tensors into one; else
    (NaN/Inf present) the masked form runs (`_masked_histogram_row`). Both give the same bins:
    floor((v - min) / width * HIST_BINS) in float32 (an 8x1024 MLP's histograms: 135 -> ~30 ms
    on the CPU; docs/tensorflow.md)."""
    rows = []
    for li in range(n_layers):
        parts = []
        for i in np.flatnonzero(layer_index == li):
            g = by_slot.get(int(i))
            if g is not None:
                g = g.values if isinstance(g, tf.IndexedSlices) else g
                v = tf.reshape(tf.cast(g, tf.float32), [-1])
                if inv_scale2 is not None:
                    v = v * tf.sqrt(inv_scale2)
                parts.append(v)
        if not parts:
            rows.append(tf.zeros([HIST_WIDTH]))
            continue
        sums = [tf.reduce_sum(v) for v in parts]
        squares = [tf.reduce_sum(v * v) for v in parts]
        total, total_sq = tf.add_n(sums), tf.add_n(squares)
        finite = tf.reduce_all(tf.math.is_finite(tf.stack(sums + squares)))
        rows.append(
            tf.cond(
                finite,
                lambda parts=parts, total=total, total_sq=total_sq: _finite_histogram_row(
                    parts, total, total_sq
                ),
                lambda parts=parts: _masked_histogram_row(parts),
            )
        )
    return tf.stack(rows)


def _bins(v, lo, width):
    """Each value's bin on [lo, lo + width]: floor((v - lo) / width * HIST_BINS), clamped."""
    return tf.clip_by_value(
        tf.cast(tf.floor((v - lo) / width * HIST_BINS), tf.int32), 0, HIST_BINS - 1
    )


def _finite_histogram_row(parts: list, total, total_sq):
    """The histogram row of finite values held in `parts` (flat float32 tensors)."""
    lo = tf.reduce_min(tf.stack([tf.reduce_min(v) if v.shape[0] != 0 else math.inf for v in parts]))
    hi = tf.reduce_max(
        tf.stack([tf.reduce_max(v) if v.shape[0] != 0 else -math.inf for v in parts])
    )
    width = tf.maximum(hi - lo, 1e-12)
    none = tf.zeros([0], tf.float32)  # no weights: float32 counts
    counts = tf.add_n(
        [  # the raw op: its size a constant, as XLA needs
            tf.raw_ops.DenseBincount(input=_bins(v, lo, width), size=HIST_BINS, weights=none)
            for v in parts
        ]
    )
    n = tf.cast(tf.add_n([tf.size(v) for v in parts]), tf.float32)
    return tf.concat([counts, tf.stack([lo, hi, total, total_sq, n, 0.0, 0.0])], 0)


def _masked_histogram_row(parts: list):
    """The histogram row of the finite values among `parts`, with their NaN and Inf counts."""
    v = tf.concat(parts, 0)
    fin = tf.math.is_finite(v)
    finf = tf.cast(fin, tf.float32)
    vf = tf.where(fin, v, 0.0)
    lo = tf.reduce_min(tf.where(fin, v, math.inf))
    hi = tf.reduce_max(tf.where(fin, v, -math.inf))
    width = tf.maximum(hi - lo, 1e-12)
    counts = tf.math.unsorted_segment_sum(finf, _bins(vf, lo, width), HIST_BINS)
    nan = tf.reduce_sum(tf.cast(tf.math.is_nan(v), tf.float32))
    return tf.concat(
        [
            counts,
            tf.stack(
                [
                    lo,
                    hi,
                    tf.reduce_sum(vf),
                    tf.reduce_sum(vf * vf),
                    tf.reduce_sum(finf),
                    nan,
                    tf.cast(tf.size(v), tf.float32) - tf.reduce_sum(finf) - nan,
                ]
            ),
        ],
        0,
    )
