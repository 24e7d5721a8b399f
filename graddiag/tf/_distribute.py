"""graddiag under `tf.distribute`: the monitor sees the aggregated gradients, once.

Inside a replica context (`strategy.run`, Keras `fit` under a strategy) each replica holds its
local gradients. `step` all-reduces them (SUM: what the optimizer applies), then enters the
cross-replica context (`merge_call`) and runs the monitor's ordinary step there once, on the first
replica's copy: one row written, one step counted, one clip-state update, one event file. The
first replica returns the clipped gradients, the others zeros, so the optimizer's own SUM
all-reduce applies exactly the monitored, clipped gradients. The optimizer step goes through
`merge_call` too (`update_vars`), so a skipped non-finite step and the update/weight measurement
are one `tf.cond` in the cross-replica context, deciding for every replica at once (TensorFlow
refuses a `merge_call` inside a `tf.cond` of a replica context).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
from tensorflow.python.distribute.numpy_dataset import SingleDevice

from graddiag.tf._model import is_model

#: Strategies whose replicas all live in this process and share a `merge_call`.
SUPPORTED = (tf.distribute.MirroredStrategy, tf.distribute.OneDeviceStrategy)


def strategy_of(model: Any = None) -> Any | None:
    """The `tf.distribute` strategy in effect, if it is not the default one: the current scope's
    or replica context's, or the one a Keras model was created under (Keras keeps it)."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    strategy = getattr(model, "_distribute_strategy", None)  # set only under a strategy scope
    if strategy is not None and strategy is not tf.distribute.get_strategy():
        return strategy
    return None


def check_supported(model: Any, who: str) -> None:
    """Raise graddiag's own error for a strategy it cannot monitor (TensorFlow's would be a
    `merge_call` RuntimeError from deep inside the optimizer)."""
    strategy = strategy_of(model if is_model(model) else None)
    if strategy is None or type(strategy) in SUPPORTED:
        return
    public = vars(type(strategy)).get("_tf_api_names")  # the name users type, set by tf_export
    name = f"tf.{public[0]}" if public else type(strategy).__name__
    raise NotImplementedError(
        f"{who}: training under {name} is not supported by "
        "graddiag; MirroredStrategy (one machine, any number of devices) and OneDeviceStrategy "
        "are. Diagnose the same model under MirroredStrategy or on one device (a few hundred "
        "steps are usually enough), or train with this strategy without graddiag."
    )


@contextlib.contextmanager
def own_variables() -> Iterator[None]:
    """Variables created here (the monitor's state) are ordinary ones on the first device, also
    inside a strategy's scope: the monitor writes them once per step, in the cross-replica
    context, so one copy is enough (and mirrored copies would refuse `scatter_nd_update`)."""
    if not tf.distribute.has_strategy():
        yield
        return
    # `SingleDevice` is TensorFlow's own marker for "not mirrored", which every strategy honours
    device = SingleDevice(tf.distribute.get_strategy().extended.worker_devices[0])

    def creator(next_creator, **kwargs):
        kwargs["colocate_with"] = device
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        yield


def in_replica_context() -> bool:
    """Whether this code runs for one replica of a (non-default) strategy."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def _first(strategy: Any, value: Any) -> Any:
    """The first replica's copy of a per-replica value (a plain value stays as it is)."""
    return None if value is None else strategy.experimental_local_results(value)[0]


def check_replica(monitor: Any) -> None:
    """In a replica context, raise graddiag's own error for what it cannot monitor there."""
    if not in_replica_context():
        return
    who = "graddiag.tf.GradientMonitor"
    check_supported(None, who)
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        raise NotImplementedError(
            f"{who}: this step runs without `merge_call` (MirroredStrategy on GPUs under XLA, "
            "`jit_compile=True`), which graddiag needs to measure the step once for all "
            "replicas; compile the step without XLA (Keras' default under a strategy)."
        )
    if monitor._accumulators is not None:
        raise NotImplementedError(
            f"{who}: `accumulators` are not supported under tf.distribute; accumulate inside "
            "the replica function and call monitor.step() once per optimizer step."
        )


def step(monitor: Any, grads: list[Any], variables: list[Any], loss: Any) -> list[Any]:
    """`monitor.step` in a replica context: measure and clip the all-reduced gradients once, and
    return this replica's part of the result (all of it on the first replica, zeros elsewhere)."""
    check_replica(monitor)
    ctx = tf.distribute.get_replica_context()
    live = [i for i, g in enumerate(grads) if g is not None]
    values = [grads[i] for i in live] + ([] if loss is None else [tf.cast(loss, tf.float32)])
    # which replicas' own gradients were non-finite before the sum: bit k of a float64 mask set
    # by replica k, added up in the same all-reduce as the gradients (no extra collective)
    values.append(_nonfinite_bit(ctx, [grads[i] for i in live]))
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)
    total = list(grads)
    for i, g in zip(live, summed, strict=False):
        total[i] = g
    total_loss = None if loss is None else summed[-2]
    mask = summed[-1]

    def once(strategy, total, total_loss, mask):
        monitor._replica_mask = _first(strategy, mask)  # consumed by the step's row (ranks)
        with tf.device(strategy.extended.worker_devices[0]):
            out = monitor.step(
                [_first(strategy, g) for g in total], variables, _first(strategy, total_loss)
            )
        return out, monitor._last_ok

    out, ok = ctx.merge_call(once, args=(total, total_loss, mask))
    monitor._last_ok = ok
    # the optimizer's SUM all-reduce adds up what the replicas return: the first replica returns
    # the clipped gradients and the others zeros, so the sum is exactly them for any number of
    # replicas, also for IndexedSlices (whose rows the all-reduce concatenates); the replica id
    # is a constant under the supported strategies
    if tf.get_static_value(ctx.replica_id_in_sync_group) == 0:
        return out
    return [None if g is None else _zeros_like(g) for g in out]


def _nonfinite_bit(ctx: Any, grads: list[Any]) -> Any:
    """2**k on replica k if any of its local gradients holds a NaN/Inf, else 0 (replicas beyond
    the 24th are not named: a float32 sum stays exact to 2**24)."""
    flags = [
        tf.reduce_all(tf.math.is_finite(g.values if isinstance(g, tf.IndexedSlices) else g))
        for g in grads
    ]
    ok = tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)
    # float32 like the gradients it is all-reduced with (one batch): exact for replicas 0..23
    k = tf.cast(ctx.replica_id_in_sync_group, tf.float32)
    named = tf.logical_and(tf.logical_not(ok), k < 24.0)
    return tf.where(named, tf.pow(2.0, k), 0.0)


def replicas_of(mask: float) -> tuple[int, ...] | None:
    """The replica ids a `_nonfinite_bit` sum names (None: not measured, a negative mask)."""
    if mask < 0:
        return None
    m = int(mask)
    return tuple(k for k in range(m.bit_length()) if m >> k & 1)


def _zeros_like(g: Any) -> Any:
    """Zeros shaped like `g` that do not read it (nothing is copied from the first device); an
    `IndexedSlices` without rows."""
    if isinstance(g, tf.IndexedSlices):
        values = _zeros_like(g.values[:0])
        return tf.IndexedSlices(values, tf.zeros([0], g.indices.dtype), g.dense_shape)
    return tf.zeros(g.shape if g.shape.is_fully_defined() else tf.shape(g), g.dtype)


def update_vars(monitor: Any, optimizer: Any, variables: list[Any], update: Any, skip: bool):
    """`monitor._update_vars` in a replica context: decide once, in the cross-replica context,
    and run each replica's own optimizer step (`update`) there."""

    def once(strategy, updates):
        def run_all():
            strategy.extended.call_for_each_replica(lambda u: u(), args=(updates,))

        return monitor._update_vars(optimizer, variables, run_all, skip)

    return tf.distribute.get_replica_context().merge_call(once, args=(update,))
