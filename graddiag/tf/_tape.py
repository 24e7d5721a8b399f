"""`MonitoredTape`: a drop-in `tf.GradientTape` whose `gradient()` goes through a monitor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tensorflow as tf

from graddiag.tf import _distribute
from graddiag.tf._model import key_of

if TYPE_CHECKING:
    from graddiag.tf.monitor import GradientMonitor


class MonitoredTape(tf.GradientTape):
    """A drop-in `tf.GradientTape` whose `gradient()` goes through a `GradientMonitor`.

    Without accumulation buffers, each `gradient()` call is one optimizer step: the gradients of
    monitored variables are measured and returned clipped (sources that are not monitored variables
    pass through). With `accumulators=` set on the monitor, `gradient()` only counts the micro-batch
    and checks the buffers were reset; call `monitor.step(accumulators, variables)` before applying.
    """

    def __init__(
        self,
        monitor: GradientMonitor,
        persistent: bool = False,
        watch_accessed_variables: bool = True,
    ) -> None:
        super().__init__(persistent=persistent, watch_accessed_variables=watch_accessed_variables)
        self._monitor = monitor

    @tf.autograph.experimental.do_not_convert
    def gradient(
        self,
        target,
        sources,
        output_gradients=None,
        unconnected_gradients=tf.UnconnectedGradients.NONE,
    ):
        grads = super().gradient(
            target,
            sources,
            output_gradients=output_gradients,
            unconnected_gradients=unconnected_gradients,
        )
        m = self._monitor
        m._resolve()
        if m._accumulators is not None:
            _distribute.check_replica(m)  # counting micro-batches per replica would not add up
            m._on_backward()
            return grads
        single = len(tf.nest.flatten(sources)) == 1 and not isinstance(sources, (list, tuple, dict))
        flat_src = tf.nest.flatten(sources)
        flat_g = [grads] if single else tf.nest.flatten(grads)
        pick = [i for i, s in enumerate(flat_src) if key_of(s) in m._index]
        if not pick:
            return grads
        # a scalar target is the step's loss (logged, and read by the divergence detector), as
        # `GradientMonitor.log_loss` gives it in PyTorch; a loss-scaled target is not the loss
        loss = None
        if m.loss_scale is None and tf.is_tensor(target) and target.shape.rank == 0:
            loss = tf.stop_gradient(target)
        clipped = m.step([flat_g[i] for i in pick], [flat_src[i] for i in pick], loss)
        for i, g in zip(pick, clipped, strict=True):
            flat_g[i] = g
        if single:
            return flat_g[0]
        return tf.nest.pack_sequence_as(grads, flat_g)
