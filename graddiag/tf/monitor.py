"""`graddiag.tf.GradientMonitor`: where to hook a TensorFlow step; the device half of a monitor
(the host half is `graddiag.host`)."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from graddiag import clip as cliplib
from graddiag._checks import choice as check_choice
from graddiag._checks import int_at_least
from graddiag.findings import Finding
from graddiag.host import DETAIL_FIELDS, HIST_WIDTH, HostPath, MonitorAPI, RowLayout
from graddiag.monitor import close_at_exit_hook
from graddiag.settings import Settings
from graddiag.stats import ModelInfo
from graddiag.tf import _distribute
from graddiag.tf._measure import (
    dedup,
    detail_columns,
    histogram_rows,
    identity,
    rare_cond,
    sum_squares,
    sums_of_squares,
    zero_unless,
)
from graddiag.tf._model import (
    frozen_variables,
    is_model,
    key_of,
    layer_and_var,
    var_path,
)
from graddiag.tf._ops import TFOps
from graddiag.tf._tape import MonitoredTape

log = logging.getLogger("graddiag")

READ_BACK = ("callback", "poll")
#: Sum of squares written for a variable without a gradient (real sums are >= 0, NaN or Inf).
#: a step number never reached (no such step: detail statistics or histograms off)
_NEVER = 1 << 62
_NO_GRAD = RowLayout.NO_GRAD
#: the longest period of the log/detail/histogram pattern looked up in a table (`_due`)
_DUE_PERIOD = 1 << 16


def _float64_parts(values: list) -> list[tf.Tensor]:
    """`values` (Python numbers, scalar or vector tensors) as float64 vectors to concatenate:
    consecutive numbers as one constant, so a row takes few ops to build."""
    parts: list = []
    for v in values:
        if isinstance(v, (int, float)):
            if parts and isinstance(parts[-1], list):
                parts[-1].append(float(v))
            else:
                parts.append([float(v)])
        else:
            v = v if v.dtype == tf.float64 else tf.cast(v, tf.float64)
            parts.append(v if v.shape.rank == 1 else tf.reshape(v, [1]))
    return [tf.constant(p, tf.float64) if isinstance(p, list) else p for p in parts]


def _host_value(v: tf.Variable) -> np.ndarray:
    """`v.numpy()` by the raw read: about a third of its cost (no Identity op; 7 against 22 µs
    measured), for the reads of every poll."""
    return tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype).numpy()


def _one_value(name: str, x: Any) -> tf.Tensor:
    """`x` as a tensor of one element (any shape), or a ValueError naming `name`."""
    x = tf.convert_to_tensor(x)
    if x.shape.num_elements() not in (None, 1):
        raise ValueError(f"Expected `{name}` to be a scalar, got a tensor of shape {x.shape}")
    return x if x.shape.rank == 1 else tf.reshape(x, [1])


def _clip_variables(state: Any, name: str = "graddiag_clip") -> Any:
    """`tf.Variable`s holding a clip state (nested tuples and dicts of arrays), named by path."""
    if isinstance(state, dict):
        return {k: _clip_variables(v, f"{name}_{k}") for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return tuple(_clip_variables(v, f"{name}_{i}") for i, v in enumerate(state))
    return tf.Variable(state, trainable=False, name=name)


class GradientMonitor(MonitorAPI):
    """Monitors (and optionally clips) the gradients of a Keras model or a list of variables.

    Args:
        model_or_variables: a Keras model/layer (layers are named by their path inside the model,
            e.g. ``"encoder/dense_1"``) or a sequence of variables (named by their path or name).
            An unbuilt model is resolved at the first step.
        logdir: TensorBoard run directory, or None for in-memory findings only.
        every: statistics are gathered on the device every step and read back to Python once every
            `every` steps (a ring buffer of `every` rows).
        clip: a clipping policy from `graddiag.clip`, a list of them, a `Chain`, a number (global
            norm) or None.
        nonfinite: what to do with a step whose gradients hold NaN/Inf: "warn" (report it at the
            next log step), "skip" (report it at once and return all-zero gradients, so plain SGD
            makes no update; stateful optimizers still advance their moments unless you apply
            through `monitor.apply(optimizer, grads, variables)` or the Keras callback, which skip
            the optimizer call) or "raise" (raise
            `NonFiniteGradientError` at that step; under `tf.function` it surfaces as a
            `tf.errors.OpError` (`UnknownError`) carrying the same message, and `monitor.error` holds
            the original).
        detectors: detector settings, see `graddiag.detectors.build_detectors`.
        history: how many recent `StepStats` to keep in memory.
        flush_secs: event-file flush interval.
        loss_scale: the loss scale the gradients are multiplied by (a number, a variable, or a
            Keras `LossScaleOptimizer`, whose `dynamic_scale` is read each step): statistics and
            clipping thresholds refer to the unscaled gradients. Overflow steps are expected then,
            so the non-finite detector defaults to `amp=True`.
        accumulators: your gradient-accumulation buffers (variables, one per monitored variable,
            in the same order). With them, a monitored tape's `gradient()` does not count as an
            optimizer step: it counts micro-batches and, at the first one after a step, checks that
            the buffers were reset to zero. Call `step(accumulators, variables)` before applying.
        read_back: "callback" (a `tf.numpy_function` on log steps reads the buffer; automatic) or
            "poll" (no host op in the graph, e.g. for XLA: call `poll()` after each compiled step).
        detail_every: compute max |g|, zero fraction, parameter norm and NaN/Inf counts every
            this many steps (in a `tf.cond`, so other steps pay nothing; that step is read back at
            once, like a log step); 0 disables.
        hist_every: with a `logdir`, write a histogram of each layer's gradient values (with its
            NaN/Inf counts) every this many steps, computed in the graph on those steps only;
            0 disables.
        run_meta: extra JSON-able facts written with the model description.
        optimizer: the optimizer, when you call its `apply_gradients` yourself: trainable
            variables it was built without are reported (`frozen` warning). `apply()` and the
            Keras callback learn this from the variables they apply instead.
        start_step: the number of the first step (resuming a run: the optimizer steps already
            taken), so the logs continue the run's step count.
        steps_per_poll: with `read_back="poll"`, the most optimizer steps that may run between
            two `poll()` calls (Keras' `steps_per_execution`): the ring buffer holds
            `every + steps_per_poll - 1` rows, so no step is overwritten before it is read back.

    Raises:
        TypeError: if `model_or_variables` is neither a Keras model/layer nor variables.
        ValueError: for a bad setting, naming the argument and showing its value.
        NotImplementedError: under a `tf.distribute` strategy other than `MirroredStrategy` and
            `OneDeviceStrategy` (see docs/distributed.md).
    """

    def __init__(
        self,
        model_or_variables: Any,
        logdir: str | os.PathLike | None = None,
        *,
        every: int = 10,
        clip: Any = None,
        nonfinite: str = "warn",
        detectors: Mapping[str, Any] | Iterable[Any] | None = None,
        history: int = 1000,
        flush_secs: float = 2.0,
        loss_scale: Any = None,
        accumulators: Sequence[Any] | None = None,
        read_back: str = "callback",
        detail_every: int = 100,
        hist_every: int = 100,
        run_meta: Mapping[str, Any] | None = None,
        optimizer: Any = None,
        start_step: int = 0,
        steps_per_poll: int = 1,
    ) -> None:
        _distribute.check_supported(model_or_variables, "graddiag.tf.GradientMonitor")
        if not is_model(model_or_variables):
            if isinstance(model_or_variables, (str, bytes)) or not isinstance(
                model_or_variables, Iterable
            ):
                raise TypeError(
                    "Expected `model_or_variables` to be a Keras model/layer or a "
                    f"sequence of variables, got {model_or_variables!r:.80}"
                )
            model_or_variables = list(model_or_variables)
            bad = [v for v in model_or_variables if not hasattr(v, "assign")]
            if not model_or_variables or bad:
                raise TypeError(
                    "Expected `model_or_variables` to be a Keras model/layer or a "
                    f"non-empty sequence of variables, got {(bad or [[]])[0]!r:.80}"
                )
        self._settings = Settings(
            logdir=logdir,
            every=every,
            clip=clip,
            nonfinite=nonfinite,
            detectors=detectors,
            detail_every=detail_every,
            hist_every=hist_every,
            history=history,
            flush_secs=flush_secs,
            run_meta=run_meta or {},
            start_step=start_step,
        )
        self.read_back = check_choice("read_back", read_back, READ_BACK)
        self._steps_per_poll = int_at_least("steps_per_poll", steps_per_poll)
        if isinstance(loss_scale, bool) or (
            loss_scale is not None
            and not (
                isinstance(loss_scale, (int, float))
                or hasattr(loss_scale, "dynamic_scale")
                or hasattr(loss_scale, "assign")
            )
        ):
            raise ValueError(
                "Expected `loss_scale` to be a number, a variable or a "
                f"LossScaleOptimizer, got {loss_scale!r}"
            )
        if isinstance(loss_scale, (int, float)) and not (
            loss_scale > 0 and math.isfinite(loss_scale)
        ):
            raise ValueError(
                f"Expected `loss_scale` to be a positive finite number, got {loss_scale!r}"
            )
        self.loss_scale = loss_scale
        self._target = model_or_variables
        self._accumulators = None if accumulators is None else list(accumulators)
        self._optimizer = optimizer
        self._applied: set[int] | None = None  # keys of the variables `apply` has updated
        self._ratio_done = -1  # last step whose update ratio was written
        self._atexit = close_at_exit_hook(self)  # reads back and logs unread steps at exit
        self._fetched = (
            self._settings.start_step
        )  # next step whose row has not been processed on the host
        self._ticket: int | None = None  # the host work last deferred to the worker
        #: set while a caller that counts steps on the host traces or runs a step: False — no
        #: detail, histogram or update-ratio work in it (none is due); None — decided in the graph
        self._rare_work: bool | None = None
        if accumulators is not None or not is_model(model_or_variables):
            self._resolve()

    # ------------------------------------------------------------------ setup
    def _resolve(self) -> None:
        """Name the layers and create the device state (eagerly, even when first called in a trace)."""
        if hasattr(self, "_count"):
            return
        target = self._target
        if is_model(target):
            variables = list(target.trainable_variables)
            if not variables:
                raise ValueError(
                    f"The model {getattr(target, 'name', target)!r} has no trainable "
                    "variables yet: build it (call it once) or pass variables."
                )
            frozen_vars = frozen_variables(target, {key_of(v) for v in variables})
            prefix = getattr(target, "path", None) or getattr(target, "name", "")
        else:
            variables, frozen_vars, prefix = list(target), [], ""
        names = [layer_and_var(var_path(v), prefix) for v in variables]
        self.variables = variables
        self.var_names = [f"{layer}.{name}" if layer != name else name for layer, name in names]
        layers: list[str] = []
        for layer, _ in names:
            if layer not in layers:
                layers.append(layer)
        self._layer_index = np.array([layers.index(layer) for layer, _ in names], dtype=np.int64)
        self._index = {key_of(v): i for i, v in enumerate(variables)}
        if len(self._index) != len(variables):
            raise ValueError("Expected `model_or_variables` to hold each variable once.")
        numel = [int(np.prod(v.shape)) for v in variables]
        counts = np.zeros(len(layers), dtype=np.int64)
        np.add.at(counts, self._layer_index, numel)
        frozen = []
        for v in frozen_vars:
            layer, name = layer_and_var(var_path(v), prefix)
            frozen.append(f"{layer}.{name}")
        self.info = ModelInfo(
            layers=tuple(layers),
            param_counts=tuple(int(c) for c in counts),
            backward_order=tuple(reversed(layers)),
            frozen=tuple(frozen),
        )
        if self._accumulators is not None and len(self._accumulators) != len(variables):
            raise ValueError(
                f"Expected `accumulators` to hold one buffer per monitored variable "
                f"({len(variables)}), got {len(self._accumulators)}"
            )
        self._host = HostPath(
            self._settings, self._layer_index, self.var_names, numel, "tensorflow", tf.__version__
        )
        self._layout = self._host.layout
        n, nl = len(variables), len(layers)
        with _distribute.own_variables(), tf.init_scope():  # plain variables under a strategy
            self._rows = self._ring_variable()
            self._ranks = self._ranks_variable()  # tf.distribute: replicas of a NaN/Inf
            # detail rows: max|g|, non-zero count, NaN count, Inf count, parameter sum of squares
            self._detail = (
                tf.Variable(
                    tf.zeros([len(DETAIL_FIELDS), n]), trainable=False, name="graddiag_detail"
                )
                if self.detail_every
                else None
            )
            self._detail_step = tf.Variable(
                -1, dtype=tf.int64, trainable=False, name="graddiag_detail_step"
            )
            # histogram rows per layer: HIST_BINS counts, then min, max, sum, sum of squares,
            # finite count, NaN count, Inf count (of the step in `_hist_step`)
            self._hist = (
                tf.Variable(tf.zeros([nl, HIST_WIDTH]), trainable=False, name="graddiag_hist")
                if self.hist_every
                else None
            )
            self._hist_step = tf.Variable(
                -1, dtype=tf.int64, trainable=False, name="graddiag_hist_step"
            )
            # update rows (written by `apply` on detail steps): per variable the sum of squares
            # of the update, then of the weights before it (of the step in `_update_step`)
            self._update = (
                tf.Variable(tf.zeros([2, n]), trainable=False, name="graddiag_update")
                if self.detail_every
                else None
            )
            self._update_step = tf.Variable(
                -1, dtype=tf.int64, trainable=False, name="graddiag_update_step"
            )
            self._count = tf.Variable(
                self._settings.start_step, dtype=tf.int64, trainable=False, name="graddiag_step"
            )
            self._bad = tf.Variable(False, trainable=False, name="graddiag_nonfinite")
            self._micro = tf.Variable(0.0, trainable=False, name="graddiag_backward_calls")
            self._reset = tf.Variable(-1.0, trainable=False, name="graddiag_grad_reset")
            self._clip_state = (
                _clip_variables(self.chain.init(nl, TFOps())) if self.chain is not None else ()
            )

    @property
    def _capacity(self) -> int:
        """Rows of the ring buffer: a log step's `every` rows, plus the steps that may run after
        the last log step before the next `poll()` (Keras: the rest of an execution)."""
        return self.every + self._steps_per_poll - 1

    def _ring_variable(self) -> tf.Variable:
        with tf.init_scope():
            return tf.Variable(  # float64: an exact sum of squares of float32 values fits
                np.tile(self._layout.blank().astype(np.float64), (self._capacity, 1)),
                trainable=False,
                name="graddiag_rows",
            )

    def _ranks_variable(self) -> tf.Variable | None:
        """Under tf.distribute, one float64 per ring row: the bit mask of the replicas whose own
        gradients held a NaN/Inf before the all-reduce (-1: not measured); None otherwise."""
        target = self._target if is_model(self._target) else None
        if _distribute.strategy_of(target) is None:
            return None
        with tf.init_scope():
            return tf.Variable(
                np.full(self._capacity, -1.0), trainable=False, name="graddiag_nonfinite_replicas"
            )

    def _set_steps_per_poll(self, steps: int) -> None:
        """Grow the ring buffer for `steps` steps between polls (a later Keras `fit` with a larger
        `steps_per_execution`). Call between steps, before the step function is traced again."""
        if steps <= self._steps_per_poll:
            return
        self.flush()  # every row read back: the new buffer may start blank
        self._steps_per_poll = steps
        self._rows = self._ring_variable()
        if self._ranks is not None:
            with _distribute.own_variables():
                self._ranks = self._ranks_variable()

    def _start(self, has: np.ndarray | None) -> None:
        """Start the core at the first read back (as graddiag.torch at its first step), when the
        variables `apply` updates are known. `has`: which variables the first step's gradients
        reach (a variable without any is `detached`, not reported twice)."""
        self.info = dataclasses.replace(self.info, unoptimized=self._unoptimized(has))
        self._host.start(self.info, amp=self.loss_scale is not None)

    def _unoptimized(self, has: np.ndarray | None) -> tuple[str, ...]:
        """Trainable monitored variables the optimizer never updates: left out of every variable
        list `apply` received or, without `apply`, of the variables the optimizer was built with."""
        held = self._applied
        opt = self._optimizer
        if held is None and opt is not None and getattr(opt, "built", False):
            held = {key_of(v) for v in getattr(opt, "_trainable_variables", None) or ()} or None
        if held is None:
            return ()
        has = np.ones(len(self.variables), bool) if has is None else has
        return tuple(
            name
            for v, name, h in zip(self.variables, self.var_names, has, strict=True)
            if h and getattr(v, "trainable", True) and key_of(v) not in held
        )

    # ------------------------------------------------------------------ public API
    def tape(
        self, persistent: bool = False, watch_accessed_variables: bool = True
    ) -> MonitoredTape:
        """A `tf.GradientTape` whose `gradient()` is monitored (see `MonitoredTape`)."""
        return MonitoredTape(
            self, persistent=persistent, watch_accessed_variables=watch_accessed_variables
        )

    @tf.autograph.experimental.do_not_convert
    def step(
        self, grads: Sequence[Any], variables: Sequence[Any] | None = None, loss: Any = None
    ) -> list[Any]:
        """Measure one optimizer step's gradients and return them after clipping.

        Runs eagerly or inside `tf.function` (traced once per input signature; no host sync except
        on log steps).

        Args:
            grads: one gradient per variable (`None`, a tensor or `tf.IndexedSlices`), or the
                accumulation buffers.
            variables: the variables the gradients belong to (default: all monitored variables,
                in order). Monitored variables left out count as receiving no gradient.
            loss: optionally the step's loss (a scalar), logged beside the statistics.

        Returns:
            The gradients after clipping (and zeroed under `nonfinite="skip"` on a non-finite
            step), in the order given, ready for `optimizer.apply_gradients`. In a replica
            context of `tf.distribute`: the all-reduced gradients are measured and clipped, and
            each replica gets its 1/n share, which the optimizer's all-reduce sums back.

        Raises:
            NotImplementedError: in a replica context of an unsupported `tf.distribute` strategy.
        """
        if _distribute.in_replica_context():  # tf.distribute: measured once, see _distribute
            return _distribute.step(self, list(grads), variables, loss)
        _distribute.check_supported(None, "graddiag.tf.GradientMonitor.step")
        self._resolve()
        grads = list(grads)
        variables = self.variables if variables is None else list(variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"Expected one gradient per variable, got {len(grads)} gradients for "
                f"{len(variables)} variables"
            )
        slots = []
        for i, v in enumerate(variables):
            slot = self._index.get(key_of(v))
            if slot is None:
                raise ValueError(
                    f"variables[{i}] ({var_path(v)!r}) is not monitored by this "
                    f"GradientMonitor (monitored: {len(self.variables)} variables)"
                )
            slots.append(slot)
        grads = [tf.convert_to_tensor(g) if hasattr(g, "assign") else g for g in grads]
        grads = [dedup(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        out, ok = self._step_graph(grads, variables, slots, loss)
        self._last_ok = ok
        return out

    @tf.autograph.experimental.do_not_convert
    def apply(self, optimizer: Any, grads: Sequence[Any], variables: Sequence[Any]) -> None:
        """`optimizer.apply_gradients` for gradients this monitor has just measured (by `step()` or
        a monitored tape, in the same step function), skipping the optimizer call entirely on a
        non-finite step under `nonfinite="skip"`, so stateful optimizers (Adam's moments, the
        iteration count) do not move either. On detail steps it also measures each layer's
        update/weight ratio; monitored trainable variables left out of `variables` are reported
        as never updated (`frozen` warning at step 0).

        Raises:
            RuntimeError: if no step was measured before.
        """
        variables = list(variables)
        pairs = list(zip(grads, variables, strict=True))
        self._update_vars(
            optimizer,
            variables,
            lambda: optimizer.apply_gradients(pairs),
            skip=self.nonfinite == "skip",
        )

    def _update_vars(self, optimizer: Any, variables: list[Any], update, skip: bool):
        """Run `update()` (the optimizer step of `variables`, after `step()`): record the variables
        it updates, skip it on a non-finite step if `skip`, and on detail steps measure the update
        in the graph (a `tf.cond`: other steps pay its predicate only)."""
        if _distribute.in_replica_context():  # tf.distribute: decided once, see _distribute
            return _distribute.update_vars(self, optimizer, variables, update, skip)
        self._resolve()
        self._applied = (self._applied or set()) | {key_of(v) for v in variables}
        if self._optimizer is None:
            self._optimizer = optimizer
        ok = getattr(self, "_last_ok", None)
        if skip and ok is None:
            raise RuntimeError(
                "GradientMonitor.apply: measure the gradients first (monitor.step() "
                "or a monitor.tape()'s gradient()) in the same step function"
            )
        if (skip or self._update is not None) and not getattr(optimizer, "built", True):
            with tf.init_scope():  # no variables may be created inside a tf.cond branch
                optimizer.build(variables)

        def run():
            update()
            return tf.constant(True)

        step, due = run, None
        if self._update is not None and self._rare_work is not False:
            # the step just measured (`step()` has counted it) is a detail step
            due = self._due(self._count.read_value() - 1, log=False, detail=True, hist=False)
            # an `If` call: lowered, every step would schedule the measurement's ops dead (a small
            # MLP: 36 µs a step); under tf.distribute the optimizer's update spans the replicas'
            # devices, which one call cannot be placed on, so there it stays a lowered cond
            branch = tf.cond if tf.distribute.has_strategy() else rare_cond
            step = lambda: branch(due, lambda: self._measure_update(run), run)  # noqa: E731
        done = tf.cond(ok, step, lambda: tf.constant(False)) if skip else step()
        if (
            tf.executing_eagerly()
            and self.read_back == "callback"
            and (self._host.core is None or (due is not None and bool(due)))
        ):
            self._fetch(
                int(self._count.numpy()), later=True
            )  # rows deferred by step(), this update
        return done

    def _measure_update(self, run):
        """Run the optimizer step and write each variable's squared update and squared weights
        before it (the weights are read before the update; TensorFlow copies on write)."""
        before = [tf.cast(tf.convert_to_tensor(v), tf.float32) for v in self.variables]
        with tf.control_dependencies(before):
            done = run()
        with tf.control_dependencies([done]):
            after = [tf.cast(tf.convert_to_tensor(v), tf.float32) for v in self.variables]
        rows = tf.stack(
            [
                tf.stack([sum_squares(a - b) for a, b in zip(after, before, strict=True)]),
                tf.stack([sum_squares(b) for b in before]),
            ]
        )
        with tf.control_dependencies([self._update.assign(rows)]):
            return tf.identity(self._update_step.assign(self._count.read_value() - 1) >= 0)

    def poll(self, steps_done: int | None = None) -> list[Finding]:
        """Read the buffer back if a log step has passed (`read_back="poll"`; harmless otherwise).

        Args:
            steps_done: optimizer steps taken so far, if the caller counts them (saves reading the
                step counter from the device).

        Returns:
            The new findings.
        """
        return self._poll(steps_done)

    def _poll(self, steps_done: int | None = None, later: bool = False) -> list[Finding]:
        """`poll`; with `later`, the host work of a log step goes to the background worker
        (under `nonfinite="warn"`) and no findings are returned."""
        if not hasattr(self, "_count"):
            return []
        if steps_done is None:
            steps_done = int(_host_value(self._count))
        due = self._log_due(steps_done)
        if not due and self.nonfinite != "warn" and steps_done > self._fetched:
            due = bool(_host_value(self._bad))
        if not due:
            return []
        if self.nonfinite != "warn":
            self._bad.assign(False)
        return self._fetch(steps_done, later)

    def _next_detail(self, first: int) -> int:
        """The first detail (and update-ratio) step >= `first`: (s + 1) % detail_every == 0, as
        traced; a step never reached without detail statistics."""
        d = self.detail_every
        return ((first // d) + 1) * d - 1 if d else _NEVER

    def _next_hist(self, first: int) -> int:
        """The first histogram step >= `first`: s % hist_every == 0, as traced."""
        h = self.hist_every
        return -(-first // h) * h if h else _NEVER

    def _rare_due(self, first: int, steps: int) -> bool:
        """Whether a detail (and update-ratio) or histogram step is among steps `first` to
        `first + steps - 1`."""
        return min(self._next_detail(first), self._next_hist(first)) < first + steps

    def _quiet_until(self, first: int, steps: int) -> int:
        """The first step from which a batch of `steps` steps may need a poll (`_log_due`) or
        the rare work (`_rare_due`); batches starting before it need neither. For a caller
        that checks once per batch (the Keras callback) instead of evaluating both each time."""
        ks = [k for k in (self.every, self.detail_every, self.hist_every) if k]
        log = min(((self._fetched // k) + 1) * k for k in ks) if ks else _NEVER
        return min(log, min(self._next_detail(first), self._next_hist(first)) - steps + 1)

    def _log_due(self, steps_done: int) -> bool:
        """Whether a log, detail or histogram step is among the steps before `steps_done` that the
        host has not read back yet."""
        return steps_done > self._fetched and any(
            k and steps_done // k > self._fetched // k
            for k in (self.every, self.detail_every, self.hist_every)
        )

    def continue_at(self, step: int) -> list[Finding]:
        """Number the next step `step` (the optimizer stepped without the monitor, or was
        restored); steps measured so far are logged first. Never moves the count back."""
        new = self.flush() if hasattr(self, "_count") else []
        self._resolve()
        if step > int(self._count.numpy()):
            self._count.assign(step)
            self._fetched = step
        return new

    def flush(self) -> list[Finding]:
        """Process every step measured so far (also those before the next log step)."""
        if not hasattr(self, "_count"):
            return []
        steps_done = int(self._count.numpy())
        new = (
            self._fetch(steps_done)
            if steps_done > self._fetched
            or self._host.core is None
            or (int(self._update_step.numpy()) > self._ratio_done)
            else []
        )
        self._host.wait()
        self._host.core.flush()
        return new

    def close(self) -> list[Finding]:
        """Process the remaining steps, run end-of-run summaries and close the event file."""
        if not hasattr(self, "_count") or (self._host.core is not None and self._host.core.closed):
            return []
        atexit.unregister(self._atexit)
        new = self.flush()
        return new + self._host.close()

    # ------------------------------------------------------------------ graph side
    def _scale_value(self):
        ls = self.loss_scale
        if ls is None:
            return None
        ls = getattr(ls, "dynamic_scale", ls)
        return tf.cast(tf.convert_to_tensor(ls), tf.float32)

    def _measure(self, grads, slots, inv_scale2):
        """Per-variable sums of squares (unscaled, float64, exact for every finite gradient; see
        `sums_of_squares`) as one vector over all monitored variables, `_NO_GRAD` where a variable
        has no gradient; and whether they are all finite."""
        n = len(self.variables)
        live = [k for k, g in enumerate(grads) if g is not None]
        if not live:
            return tf.fill([n], tf.constant(_NO_GRAD, tf.float64)), tf.constant(True)
        vec = sums_of_squares([grads[k] for k in live])
        if inv_scale2 is not None:
            vec = vec * tf.cast(inv_scale2, tf.float64)
        ok = tf.reduce_all(tf.math.is_finite(vec))
        at = {slots[k]: j for j, k in enumerate(live)}
        index = [at.get(i, len(live)) for i in range(n)]
        if index != list(range(n)):  # missing or reordered variables
            vec = tf.gather(tf.concat([vec, tf.constant([_NO_GRAD], tf.float64)], 0), index)
        return vec, ok

    def _clip(self, grads, variables, slots, vec, scale):
        """Apply the clipping chain in the graph through `graddiag.clip.clip_gradients`; returns
        (grads, global coef, layer coefs or None)."""
        live = [k for k, g in enumerate(grads) if g is not None]
        pos = np.asarray([slots[k] for k in live], dtype=np.int32)
        view = cliplib.Gradients(
            [grads[k] for k in live],
            [variables[k] for k in live],
            self._layer_index[pos].astype(np.int32),
            len(self.info.layers),
            tf.gather(vec, pos),
        )
        state = tf.nest.map_structure(lambda v: v.read_value(), self._clip_state)
        out = cliplib.clip_gradients(self.chain, view, state, TFOps(scale))
        tf.nest.map_structure(
            lambda var, value: var.assign(value), self._clip_state, out.state, check_types=False
        )
        grads = list(grads)
        for k, g in zip(live, out.grads, strict=True):
            grads[k] = g
        return grads, out.clip_coef, out.layer_coef

    def _step_graph(self, grads, variables, slots, loss):
        scale = self._scale_value()
        inv2 = None if scale is None else 1.0 / (scale * scale)
        vec, ok = self._measure(grads, slots, inv2)
        grads_in = grads
        clip_coef: Any = RowLayout.NONE  # not clipped
        lcoef = None
        if self.chain is not None:
            vec32 = tf.cast(vec, tf.float32)  # the clipping engine works in float32
            grads, clip_coef, lcoef = self._clip(grads, variables, slots, vec32, scale)
        skipped: Any = 0.0
        if self.nonfinite == "skip":
            grads = [None if g is None else zero_unless(ok, g) for g in grads]
            skipped = 1.0 - tf.cast(ok, tf.float32)
            if self.chain is not None:  # a skipped step was not clipped (as in graddiag.torch)
                clip_coef = tf.where(ok, clip_coef, RowLayout.NONE)
        step = self._count.read_value()
        row = tf.math.floormod(step, self._capacity)
        acc = self._accumulators is not None  # else these two stay at their initial values
        scalars = {
            "clip_coef": clip_coef,
            "skipped": skipped,
            "grad_reset": self._reset.read_value() if acc else -1.0,
            "backward_calls": self._micro.read_value() if acc else 0.0,
            "has_loss": 0.0 if loss is None else 1.0,
            "loss": 0.0 if loss is None else _one_value("loss", loss),
        }
        tail = [scalars[k] for k in RowLayout.SCALARS]
        if self._layout.layer_coef is not None:
            tail += [1.0] * len(self.info.layers) if lcoef is None else [lcoef]
        values = tf.concat([vec, *_float64_parts(tail)], 0)
        # one scatter of a row at a scalar index (no index or update reshaping ops)
        writes = [
            tf.raw_ops.ResourceScatterUpdate(
                resource=self._rows.handle, indices=row, updates=values
            )
        ]
        mask, self._replica_mask = getattr(self, "_replica_mask", None), None
        if self._ranks is not None:  # set by _distribute.step for this step
            mask = tf.constant(-1.0, tf.float64) if mask is None else tf.cast(mask, tf.float64)
            writes.append(self._ranks.scatter_nd_update([[row]], tf.reshape(mask, [1])))
        if self.nonfinite != "warn":  # only these modes read `_bad` (poll)
            # `_bad` stays set until a poll() has read the step back (several steps per execution)
            bad = (self._bad.read_value() | ~ok) if self.read_back == "poll" else ~ok
            writes.append(self._bad.assign(bad))
        if acc:
            writes += [self._micro.assign(0.0), self._reset.assign(-1.0)]
        do_detail = self._detail is not None and self._rare_work is not False
        do_hist = self._hist is not None and self._rare_work is not False
        with tf.control_dependencies(writes):
            done = self._count.assign_add(1)
        log = self.read_back == "callback"  # "poll" decides on the host
        if tf.executing_eagerly():
            if do_detail and bool(self._due(step, log=False, detail=True, hist=False)):
                self._write_detail(grads_in, slots, step, inv2)
            if do_hist and bool(self._due(step, log=False, detail=False, hist=True)):
                self._write_hist(grads_in, slots, step, inv2)
            log_now = log and (
                bool(self._due(step, log=True, detail=do_detail, hist=do_hist))
                or (self.nonfinite != "warn" and not bool(ok))
            )
            # given an optimizer, the first read waits until it has updated (`apply`, a later
            # read), so the core knows what it updates; unless this step must be reported first
            if log_now and (
                self._host.core is not None
                or self._optimizer is None
                or not (self.nonfinite == "warn" or bool(ok))
            ):
                self._fetch(int(done), later=True)
            return grads, ok
        if not (log or do_detail or do_hist):
            return grads, ok

        def rare():
            """The detail statistics, the histograms and the read-back, each when due: each an
            `If` call of its own too, since lowered here every log step would schedule the
            others' ops dead (an 8x1024 MLP: +0.6 ms a step, benchmarks/bench_tf.py)."""
            ran = []
            if do_detail:
                ran.append(
                    rare_cond(
                        self._due(step, log=False, detail=True, hist=False),
                        lambda: self._write_detail(grads_in, slots, step, inv2),
                        lambda: tf.constant(False),
                    )
                )
            if do_hist:
                ran.append(
                    rare_cond(
                        self._due(step, log=False, detail=False, hist=True),
                        lambda: self._write_hist(grads_in, slots, step, inv2),
                        lambda: tf.constant(False),
                    )
                )
            if not log:
                with tf.control_dependencies(ran):
                    return tf.constant(True)
            now = self._due(step, log=True, detail=do_detail, hist=do_hist)
            if self.nonfinite != "warn":
                now = now | ~ok
            with tf.control_dependencies(ran):  # the read sees this step's rows
                return rare_cond(now, lambda: self._host_read(done), lambda: tf.constant(False))

        # one `If` call on ordinary steps for all the rare work (each costs a few µs in
        # TensorFlow's executor on a small step; benchmarks/bench_tf.py --fit)
        due = self._due(step, log=log, detail=do_detail, hist=do_hist, table=True)
        if log and self.nonfinite != "warn":
            due = due | ~ok
        fetched = rare_cond(due, rare, lambda: tf.constant(False))
        if log and self.nonfinite == "raise":  # no update may run before the check
            with tf.control_dependencies([fetched]):
                grads = [None if g is None else identity(g) for g in grads]
        return grads, ok

    def _due(self, step, log: bool, detail: bool, hist: bool, table: bool = False):
        """Whether step `step` (an int64 tensor, counted from 0) is a log step (the read-back
        reads when `step + 1` steps are done), a detail step or a histogram step, among those
        asked for. With `table`: one lookup in the pattern the three repeat with (when its period
        is at most `_DUE_PERIOD` steps), instead of a predicate each. The one place for these
        formulas in the graph (the host's are `_next_detail`/`_next_hist`; histograms from step 0,
        as in graddiag.torch)."""
        conds = [
            (k, k - 1) for k, on in ((self.every, log), (self.detail_every, detail)) if on and k
        ]
        conds += [(self.hist_every, 0)] if hist and self.hist_every else []
        period = math.lcm(*[k for k, _ in conds]) if conds else 1
        if table and conds and period <= _DUE_PERIOD:
            pattern = np.zeros(period, dtype=bool)
            for k, offset in conds:
                pattern[offset::k] = True
            return tf.gather(tf.constant(pattern), tf.math.floormod(step, period))
        each = [tf.equal(tf.math.floormod(step, k), offset) for k, offset in conds]
        return functools.reduce(tf.logical_or, each) if each else tf.constant(False)

    def _write_detail(self, grads, slots, step, inv_scale2):
        """Detail statistics of this step (pre-clip), one row per statistic and variable."""
        cols = detail_columns(dict(zip(slots, grads, strict=True)), self.variables, inv_scale2)
        with tf.control_dependencies([self._detail.assign(cols)]):
            return tf.identity(self._detail_step.assign(step) >= 0)

    def _write_hist(self, grads, slots, step, inv_scale2):
        """Per-layer histograms of this step's finite gradient values (pre-clip)."""
        by_slot = dict(zip(slots, grads, strict=True))
        rows = histogram_rows(by_slot, self._layer_index, len(self.info.layers), inv_scale2)
        with tf.control_dependencies([self._hist.assign(rows)]):
            return tf.identity(self._hist_step.assign(step) >= 0)

    def _state(self) -> list[tf.Variable]:
        """The variables the host reads back on a log step."""
        out = [self._rows]
        if self._ranks is not None:
            out.append(self._ranks)
        if self._detail is not None:
            out += [self._detail, self._detail_step]
        if self._hist is not None:
            out += [self._hist, self._hist_step]
        if self._update is not None:
            out += [self._update, self._update_step]
        return out

    def _host_read(self, done):
        # `numpy_function`, not `py_function`: no eager tensors made around the call (measured
        # 0.13 against 0.18 ms a call; docs/tensorflow.md)
        return tf.numpy_function(
            self._host_callback,
            [done, *[v.read_value() for v in self._state()]],
            Tout=tf.bool,
            stateful=True,
        )

    def _host_callback(self, done, *arrays):
        # diagnosed here, in the step: handing it to the worker measured slower (the worker's
        # Python contends for the GIL with the training loop's; docs/tensorflow.md)
        self._process(int(done), [np.asarray(a) for a in arrays])
        return np.bool_(True)

    def _on_backward(self) -> None:
        """Called by a monitored tape under gradient accumulation: count micro-batches and, at the
        first one after an optimizer step, check that the accumulation buffers were reset."""
        first = tf.equal(self._micro.read_value(), 0.0)

        def check():
            total = tf.add_n(
                [tf.reduce_sum(tf.abs(tf.cast(a, tf.float32))) for a in self._accumulators]
            )
            return self._reset.assign(tf.cast(tf.equal(total, 0.0), tf.float32))

        checked = tf.cond(first, check, lambda: self._reset.read_value())
        with tf.control_dependencies([checked]):
            self._micro.assign_add(1.0)

    # ------------------------------------------------------------------ host side
    def _fetch(self, steps_done: int, later: bool = False) -> list[Finding]:
        """Read the buffer and process the steps not yet seen. The detail, histogram and update
        rows are read only when the steps read hold one (each read is a device round trip):
        others get placeholders that `_process` leaves unused."""
        first = max(self._fetched, steps_done - self._capacity)
        detail = self._next_detail(first) < steps_done
        hist = self._next_hist(first) < steps_done
        d = self.detail_every
        before = (first // d) * d - 1 if d else -1  # the last detail step before `first`
        update = detail or before > self._ratio_done
        skip = set()
        if not detail and self._detail is not None:
            skip |= {self._detail.ref(), self._detail_step.ref()}
        if not hist and self._hist is not None:
            skip |= {self._hist.ref(), self._hist_step.ref()}
        if not update and self._update is not None:
            skip |= {self._update.ref(), self._update_step.ref()}

        def read(v: tf.Variable):
            if v.ref() not in skip:
                return _host_value(v)
            return np.asarray(-1) if v.dtype == tf.int64 else None  # "no step": rows unused

        return self._process(steps_done, [read(v) for v in self._state()], later)

    def _process(
        self, steps_done: int, arrays: list[np.ndarray], later: bool = False
    ) -> list[Finding]:
        """Hand the rows of the steps not yet seen (and the detail, histogram and update rows of
        their steps) to the host path.

        With `later` (under `nonfinite="warn"`), the host path diagnoses and logs them on its
        background worker and this returns no findings: results read through the monitor wait
        for the worker (`MonitorAPI._settled`). Otherwise (and always under "skip"/"raise", whose
        non-finite steps are reported at once) it runs here, after the deferred work."""
        host = self._host
        rows = arrays[0]
        state = {v.ref(): a for v, a in zip(self._state()[1:], arrays[1:], strict=True)}

        def block(var, step_var) -> tuple[np.ndarray | None, int]:
            return (None, -1) if var is None else (state[var.ref()], int(state[step_var.ref()]))

        detail, detail_step = block(self._detail, self._detail_step)
        hist, hist_step = block(self._hist, self._hist_step)
        update, update_step = block(self._update, self._update_step)
        if update_step <= self._ratio_done:
            update = None
        first = max(self._fetched, steps_done - self._capacity)
        if first > self._fetched:
            log.warning(
                "graddiag: steps %d-%d were overwritten before being read back; poll() "
                "at least every %d steps (or raise `steps_per_poll`)",
                self._fetched,
                first - 1,
                self._capacity,
            )
        if host.core is None:
            row = rows[first % self._capacity] if first < steps_done else None
            self._start(None if row is None else row[self._layout.sumsq] != _NO_GRAD)
        trainable = host.trainable([getattr(v, "trainable", True) for v in self.variables])
        steps = []
        for step in range(first, steps_done):
            extra = {"trainable": trainable}
            if self._ranks is not None:
                replicas = _distribute.replicas_of(state[self._ranks.ref()][step % self._capacity])
                sumsq = rows[step % self._capacity][self._layout.sumsq]
                if replicas is not None and (replicas or not np.isfinite(sumsq).all()):
                    extra["nonfinite_ranks"] = replicas  # only on non-finite steps (a text tag)
            if step == detail_step:
                extra["detail"] = detail
            if step == hist_step:
                extra["hist"] = hist
            if step == update_step and update is not None:
                extra["update"], update = update, None
                self._ratio_done = step
            steps.append((step, np.array(rows[step % self._capacity]), extra))
        late = None  # the update of a step read back before it (known only after its update)
        if update is not None and update_step < steps_done:
            self._ratio_done = update_step
            late = update_step
        new: list[Finding] = []
        if later and self.nonfinite == "warn":
            self._fetched = steps_done
            if steps:
                host.wait(self._ticket)  # at most one log step's work waits on the worker
                self._ticket = host.ingest_later(steps).ticket
            if late is not None:
                self._ticket = host.defer(host.record_update, late, update)
            return new
        host.wait()  # the deferred steps first
        found, done, error = host._ingest_block(steps)
        new += found
        if error is not None:  # nonfinite="raise": the steps after it were not ingested
            self._fetched = steps[done - 1][0] + 1
            raise error
        self._fetched = steps_done
        if late is not None:
            host.record_update(late, update)
        return new
