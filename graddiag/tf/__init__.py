"""TensorFlow 2 / Keras 3 adapter: per-layer gradient statistics inside the compiled step.

`GradientMonitor.step(grads, variables)` runs in the graph (eagerly or under `tf.function`): one
fused pass computes each variable's sum of squares (``2 * tf.nn.l2_loss``, float32), the global norm
and a single `is_finite` check on it, applies the clipping policies of `graddiag.clip` (their math
runs here through `TFOps`, with their state in `tf.Variable`s) and writes one row of a
`tf.Variable` ring buffer of `every` rows. Python sees the buffer only on log steps: through a
`tf.numpy_function` inside the step's one `tf.cond` for rare work (default), or when the caller
polls after the compiled step (`read_back="poll"`, XLA-friendly; the Keras callback does this). From there on, the framework-neutral
`MonitorCore` runs the detectors and writes TensorBoard events.

Example:
    >>> monitor = GradientMonitor(model, "runs/exp1", clip=GlobalNormClip(1.0))
    >>> @tf.function
    ... def train_step(x, y):
    ...     with monitor.tape() as tape:          # was: tf.GradientTape()
    ...         loss = loss_fn(y, model(x, training=True))
    ...     grads = tape.gradient(loss, model.trainable_variables)   # monitored and clipped
    ...     optimizer.apply_gradients(zip(grads, model.trainable_variables))
"""

from graddiag.monitor import NonFiniteGradientError
from graddiag.tf._ops import TFOps
from graddiag.tf._tape import MonitoredTape
from graddiag.tf.monitor import GradientMonitor

__all__ = ["GradientMonitor", "MonitoredTape", "NonFiniteGradientError", "TFOps"]
