"""Hugging Face `Trainer` integration: one callback that measures each optimizer step's gradients.

The Trainer calls `on_pre_optimizer_step` once per optimizer step, after the last accumulated
micro-batch's backward pass and after unscaling, but also after its own `max_grad_norm` clipping.
So that graddiag measures the gradients *before* clipping, the callback takes the clipping over
for the run: at `on_train_begin` it sets `args.max_grad_norm` to 0 (restored at `on_train_end`)
and clips with `GlobalNormClip(max_grad_norm)` itself — the same result as the Trainer's
`clip_grad_norm_` — or with the policies given as `clip=` (adaptive ones included), which
replace the Trainer's clipping. The Trainer still logs the same pre-clip `grad_norm`.

Steps are `state.global_step`, so resuming from a checkpoint continues the count; logs go to the
Trainer's `logging_dir` (`$TENSORBOARD_LOGGING_DIR` in transformers 5, which dropped the argument;
otherwise `<output_dir>/runs/graddiag`), and each `on_log` adds a short findings summary to the
Trainer's logs (`state.log_history`): `graddiag/findings`, `graddiag/warnings`, `graddiag/errors`
(new since the last log) and, when there are any, `graddiag/summary`.

Example:
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradDiagCallback()])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import TrainerCallback

from graddiag.clip import GlobalNormClip
from graddiag.findings import Finding
from graddiag.settings import Settings

from ._torch import TorchRun, brief, shared_kwargs

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    raise ImportError("graddiag.integrations.huggingface needs transformers>=4.47")


class GradDiagCallback(TrainerCallback):
    """Monitor gradients during `Trainer.train`.

    Args:
        logdir: TensorBoard run directory; None (default): the Trainer's logging directory (see
            the module docstring); False: no event files.
        every: read statistics back (and log them) once every `every` optimizer steps.
        clip: clipping policies from `graddiag.clip` (a policy, a list, or a number: global norm)
            used instead of the Trainer's `max_grad_norm`; None: graddiag applies the Trainer's
            `max_grad_norm` itself, after measuring.
        nonfinite: "warn", "skip" (a non-finite step's gradients are dropped, so the optimizer
            step changes nothing) or "raise" (`NonFiniteGradientError` stops training).
        detectors: detector settings, see `graddiag.detectors.build_detectors`.
        detail_every: max |g|, zero fraction and parameter norm every this many steps (0: never).
        hist_every: gradient histograms every this many steps (0: never).
        trace_nonfinite: find the module where a NaN/Inf is born (one host sync per step).
        history: how many recent `StepStats` the monitor keeps.
        flush_secs: event-file flush interval.
        print_summary: print the findings summary at the end of training.

    Attributes:
        monitor: the run's `graddiag.torch.GradientMonitor` (None before training); a later
            `train()` of the same model that continues the step count continues the run.

    Raises:
        ValueError: for a bad argument, naming it (at construction).
    """

    def __init__(
        self,
        logdir: str | os.PathLike | None | bool = None,
        *,
        every: int = 10,
        clip: Any = None,
        nonfinite: str = "warn",
        detectors: Mapping[str, Any] | Iterable[Any] | None = None,
        detail_every: int = 100,
        hist_every: int = 100,
        trace_nonfinite: bool = False,
        history: int = 1000,
        flush_secs: float = 2.0,
        print_summary: bool = True,
    ) -> None:
        self._run = TorchRun(
            logdir,
            **shared_kwargs(
                every,
                clip,
                nonfinite,
                detectors,
                detail_every,
                hist_every,
                trace_nonfinite,
                history,
                flush_secs,
            ),
        )
        self.print_summary = bool(print_summary)
        self._max_grad_norm: float | None = None
        self._reported = 0

    @property
    def settings(self) -> Settings:
        return self._run.settings

    @property
    def monitor(self):
        return self._run.monitor

    @property
    def findings(self) -> list[Finding]:
        return [] if self.monitor is None else self.monitor.findings

    def close(self) -> list[Finding]:
        """End the run: end-of-run findings (e.g. the clipping rate), close the event file."""
        return self._run.close()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        run = self._run
        max_norm = args.max_grad_norm or 0.0
        overrides = {}
        if max_norm > 0:  # measure before clipping: clip here instead of the Trainer
            self._max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
            if run.settings.clip is None:
                overrides["clip"] = GlobalNormClip(max_norm)
        mon = run.start(model, self._logdir(args, state), state.global_step, **overrides)
        self._reported = len(mon.findings)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._run.step(state.global_step, model.parameters())

    def on_log(self, args, state, control, logs=None, **kwargs):
        mon = self.monitor
        if mon is None or mon.closed:
            return
        mon.flush()
        new = mon.findings[self._reported :]
        self._reported += len(new)
        entry = {
            "graddiag/findings": len(new),
            "graddiag/warnings": sum(f.severity == "warning" for f in new),
            "graddiag/errors": sum(f.severity == "error" for f in new),
        }
        if new:
            entry["graddiag/summary"] = brief(new)
        if logs is not None:
            logs.update(entry)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entry)  # the Trainer stored a copy of `logs`

    def on_train_end(self, args, state, control, **kwargs):
        if self._max_grad_norm is not None:
            args.max_grad_norm = self._max_grad_norm
            self._max_grad_norm = None
        self._run.end(self.print_summary and state.is_world_process_zero)

    def _logdir(self, args, state) -> str | os.PathLike | None:
        logdir = self._run.logdir
        if logdir is False or not state.is_world_process_zero:
            return None
        if logdir is not None:
            return logdir
        return (
            getattr(args, "logging_dir", None)
            or os.environ.get("TENSORBOARD_LOGGING_DIR")
            or os.path.join(args.output_dir, "runs", "graddiag")
        )
