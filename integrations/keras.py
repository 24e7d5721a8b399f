"""Keras `fit` integration: one callback that monitors the real gradients of each training step.

`GradDiagCallback` wraps the model's optimizer for the duration of `fit`: at `on_train_begin` it
sets an `apply` attribute on the optimizer *instance* that passes the gradients through a
`graddiag.tf.GradientMonitor` (measured, clipped) before the optimizer's own `apply`, and installs
a train function traced with it (traced once per callback and model: a later `fit` with the same
callback reuses it, so only the first `fit` pays the trace and XLA compilation); `on_train_end`
deletes the attribute (the class method is back) and puts the model's plain train function back.
The step's loss is the one Keras' train step hands the optimizer's `scale_loss` (wrapped the same
way, for the duration of `fit`): logged as `graddiag/global/loss` and watched by the divergence
detector, as in a custom loop.
The optimizer's class, config and variables never change, so `model.save`/`keras.models.load_model`
see a plain model, during and after the run.

Statistics are read back from the device once every `every` steps (no host op inside the compiled
step, so XLA `jit_compile` keeps working). The callback counts steps on the host from the batch
index Keras passes to `on_train_batch_begin` and reads the device only when a log step has passed
(under `nonfinite="warn"`; no per-batch read of the step counter).

Steps are numbered by the optimizer's `iterations`: one callback reused across several `fit` calls
on the same model (or a model whose optimizer state was restored) continues one run — one event
file, one step count, detectors that keep their state. `on_train_end` logs every step and flushes
the file; the run ends with `callback.close()` (or at interpreter exit), which adds the end-of-run
findings such as the clipping rate.

Example:
    >>> model.fit(x, y, epochs=3, callbacks=[GradDiagCallback(logdir="runs/fit")])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import keras
import tensorflow as tf

from graddiag.findings import Finding
from graddiag.settings import Settings
from graddiag.tf import GradientMonitor
from graddiag.tf._distribute import check_supported


class GradDiagCallback(keras.callbacks.Callback):
    """Monitor gradients during `model.fit` (TensorFlow backend).

    Args:
        logdir: TensorBoard run directory, or None for in-memory findings only.
        every: read statistics back (and log them) once every `every` optimizer steps.
        clip: clipping policy (see `graddiag.tf.GradientMonitor`); applied to the gradients the
            optimizer receives.
        nonfinite: "warn", "skip" (the optimizer step is not taken on a non-finite step) or "raise"
            (`NonFiniteGradientError` from `on_train_batch_end`, at the end of the offending batch
            under `steps_per_execution=1`, of its execution otherwise). "skip" and "raise" read one
            flag from the device per batch in `on_train_batch_end`; "warn" reads nothing between
            log steps.
        detectors: detector settings, see `graddiag.detectors.build_detectors`.
        detail_every: max |g|, zero fraction, parameter norm and NaN/Inf counts every this many
            steps (0: never).
        hist_every: gradient histograms every this many steps, with a `logdir` (0: never).
        history: how many recent `StepStats` the monitor keeps.
        flush_secs: event-file flush interval.
        print_summary: print the findings summary at the end of training.

    Attributes:
        monitor: the `GradientMonitor` of the current or last run (None before training).
            Its steps are the optimizer's `iterations`. A step Keras does not count (skipped
            under `nonfinite="skip"`, a loss-scale overflow) still gets its own number, so the
            count runs ahead of `iterations` by the skipped steps; it never goes back.

    Under `steps_per_execution=N` Keras calls back once per N steps; the monitor's ring buffer
    then holds `every + N - 1` rows, so every step is still logged under its own number.

    Raises:
        ValueError: for a bad argument (at construction) or a non-TensorFlow backend / a model
            without optimizer (at `on_train_begin`).
        NotImplementedError: at `on_train_begin` under a `tf.distribute` strategy other than
            `MirroredStrategy` and `OneDeviceStrategy` (see docs/distributed.md).
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None = None,
        *,
        every: int = 10,
        clip: Any = None,
        nonfinite: str = "warn",
        detectors: Mapping[str, Any] | Iterable[Any] | None = None,
        detail_every: int = 100,
        hist_every: int = 100,
        history: int = 1000,
        flush_secs: float = 2.0,
        print_summary: bool = True,
    ) -> None:
        super().__init__()
        # fail at construction, not at the start of training, with the monitors' own checks
        self.settings = Settings(
            logdir=logdir,
            every=every,
            clip=clip,
            nonfinite=nonfinite,
            detectors=detectors,
            detail_every=detail_every,
            hist_every=hist_every,
            history=history,
            flush_secs=flush_secs,
        )
        self._kwargs = {
            "every": every,
            "clip": clip,
            "nonfinite": nonfinite,
            "detectors": detectors,
            "history": history,
            "flush_secs": flush_secs,
            "detail_every": detail_every,
            "hist_every": hist_every,
        }
        self.logdir = logdir
        self.print_summary = bool(print_summary)
        self.monitor: GradientMonitor | None = None
        self._optimizer = None
        self._base = 0  # the monitor's step count at the start of the current epoch
        self._traced: tuple[tuple, Any] | None = None  # (key, train function with the monitor)
        self._plain: Any = None  # the model's train function before this fit's
        self._per_poll = 1  # optimizer steps per call of the train function
        self._rare_next = True  # whether the next batch has detail/histogram/update-ratio work
        self._quiet = 0  # batches starting before this step need no poll and no rare work
        if nonfinite != "warn":  # an instance attribute: other modes only have a batch-end hook
            self.on_train_batch_end = self._check_batch_end

    @property
    def findings(self) -> list[Finding]:
        return [] if self.monitor is None else self.monitor.findings

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"GradDiagCallback needs the TensorFlow backend, got {keras.backend.backend()!r}"
            )
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("GradDiagCallback: the model has no optimizer; call model.compile().")
        check_supported(model, "GradDiagCallback")
        # Keras calls on_train_batch_end once per execution of `steps_per_execution` steps
        per_poll = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        iterations = int(optimizer.iterations.numpy())
        mon = self.monitor
        if mon is not None and (mon._target is not model or mon._optimizer is not optimizer):
            self.close()  # another model or a recompiled one: a new run
            mon = None
        if mon is None or mon.core is not None and mon.core.closed:
            self.monitor = GradientMonitor(
                model,
                self.logdir,
                read_back="poll",
                loss_scale=optimizer if lso else None,
                optimizer=optimizer,
                start_step=iterations,
                steps_per_poll=per_poll,
                **self._kwargs,
            )
            self.monitor._resolve()
        else:
            self._continue(iterations)
            self.monitor._set_steps_per_poll(per_poll)
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        monitor = self.monitor
        original = type(optimizer).apply.__get__(optimizer)
        skip = self._kwargs["nonfinite"] == "skip" and not lso  # a LossScaleOptimizer skips itself

        original_scale = type(optimizer).scale_loss.__get__(optimizer)
        losses: list = []  # the loss Keras' train step hands `scale_loss` before `apply`

        def scale_loss(loss):
            losses[:] = [loss]
            return original_scale(loss)

        def apply(grads, trainable_variables=None):
            variables = list(
                trainable_variables
                if trainable_variables is not None
                else model.trainable_variables
            )
            loss = losses.pop() if losses else None
            grads = monitor.step(list(grads), variables, loss=loss if _same_trace(loss) else None)
            return monitor._update_vars(
                optimizer, variables, lambda: original(grads, variables), skip=skip
            )

        optimizer.apply = apply
        optimizer.scale_loss = scale_loss
        self._optimizer = optimizer
        if self._traced is None or model.train_function is not self._traced[1]:
            self._plain = model.train_function  # (not ours: a fit that raised left ours there)
        key = self._trace_key()
        self._per_poll, self._rare_next, self._quiet = per_poll, True, 0
        if self._traced is not None and self._traced[0] == key:
            model.train_function = self._traced[1]  # traced (and compiled) by an earlier fit
        else:
            self._traced = (key, self._make_train_function())
            model.train_function = self._traced[1]

    def _make_train_function(self):
        """The train function with the monitor: two Keras train functions, one traced without
        the detail, histogram and update-ratio work (no `tf.cond` for them in the step), one with
        it, picked per batch on the host, which counts the steps (`on_train_batch_begin`)."""
        model, mon = self.model, self.monitor
        model.make_train_function(force=True)
        rare = model.train_function
        if mon._detail is None and mon._hist is None:
            return rare
        model.make_train_function(force=True)
        plain = model.train_function

        def train_function(iterator):
            due = self._rare_next
            mon._rare_work = None if due else False  # read when Keras traces the function
            try:
                return (rare if due else plain)(iterator)
            finally:
                mon._rare_work = None

        return train_function

    def _trace_key(self) -> tuple:
        """What a traced train function depends on: the monitor (its ring buffer is replaced when
        `steps_per_execution` grows), the optimizer, the trainable variables and how Keras
        compiles."""
        model, mon = self.model, self.monitor
        return (
            id(mon),
            id(mon._rows),
            id(self._optimizer),
            tuple(id(v) for v in model.trainable_variables),
            getattr(model, "jit_compile", None),
            getattr(model, "run_eagerly", None),
            getattr(model, "steps_per_execution", None),
        )

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self.monitor is not None and self._optimizer is not None:
            self._base = int(self.monitor._count.numpy())  # one scalar per epoch
        self._quiet = 0  # checked afresh at the epoch's first batch

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # `batch` steps of this epoch are done: read the device only if a log step has passed
        mon = self.monitor
        if mon is None or self._optimizer is None:
            return
        step = self._base + batch
        if step < self._quiet:  # nothing due before then: no Python per batch beyond this
            self._rare_next = False
            return
        self._rare_next = mon._rare_due(step, self._per_poll)
        if mon._log_due(step):
            mon._poll(
                step, later=True
            )  # reads the buffer (`step` steps done); diagnosed off-thread
        self._quiet = mon._quiet_until(step + 1, self._per_poll)

    def _check_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """`on_train_batch_end` under "skip"/"raise": a non-finite step is reported at once."""
        if self.monitor is not None and self._optimizer is not None:
            self.monitor.poll()  # reads the step counter (one scalar); the buffer when due

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self.monitor is not None and self._optimizer is not None:
            self.monitor._poll(later=True)  # the log steps of the epoch's last batches

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._restore()
        if self.monitor is not None:
            self.monitor.flush()  # every step of this fit logged and on disk; the run goes on
            if self.print_summary:
                print(self.monitor.summary())

    def close(self) -> list[Finding]:
        """End the run: end-of-run findings (e.g. the clipping rate), close the event file."""
        return [] if self.monitor is None else self.monitor.close()

    def _continue(self, iterations: int) -> None:
        """A later `fit` of the same run: steps the optimizer took without the callback (or
        restored from a checkpoint) move the count forward to `iterations`."""
        self.monitor.continue_at(iterations)

    def _restore(self) -> None:
        if self._optimizer is not None:
            self._optimizer.__dict__.pop("apply", None)
            self._optimizer.__dict__.pop("scale_loss", None)
            self._optimizer = None
            self.model.train_function = self._plain  # the model trains without the monitor
            self._plain = None


def _same_trace(loss: Any) -> bool:
    """Whether `loss` belongs to the graph being traced now (or both are eager): a loss left from
    another trace (a custom `train_step` that skipped `apply`) is not used."""
    if loss is None or not tf.is_tensor(loss) or loss.shape.num_elements() != 1:
        return False
    if tf.executing_eagerly():
        return isinstance(loss, tf.__internal__.EagerTensor)
    return getattr(loss, "graph", None) is tf.compat.v1.get_default_graph()
