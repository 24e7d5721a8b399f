"""Lightning integration: one callback that measures the real gradients of every optimizer step.

Lightning calls `on_before_optimizer_step` once per optimizer step, after the backward pass of the
last accumulated micro-batch, after AMP unscaling (`precision="16-mixed"` unscales first) and
before its own `gradient_clip_val` clipping. `GradDiagCallback` measures there, through a
`graddiag.torch.GradientMonitor` in manual mode, numbering the step with `trainer.global_step`;
with `clip=` graddiag's policies (adaptive ones included) clip in place of `gradient_clip_val`.

Logs go to the trainer's `TensorBoardLogger` directory (one run in TensorBoard beside Lightning's
own scalars), or to `<default_root_dir>/graddiag` without one. Only global rank 0 writes.

Example:
    >>> trainer = L.Trainer(max_epochs=3, callbacks=[GradDiagCallback()])

Works with `lightning.pytorch`; `graddiag.integrations.pytorch_lightning` holds the same callback
for the older `pytorch_lightning` package.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from graddiag.findings import Finding
from graddiag.settings import Settings

from ._torch import TorchRun, shared_kwargs

try:
    from lightning.pytorch import Callback
except ImportError:  # only the older package installed
    from pytorch_lightning import Callback


class GradDiagMixin:
    """The callback's logic, shared by the `lightning.pytorch` and `pytorch_lightning` classes.

    Args:
        logdir: TensorBoard run directory; None (default): the trainer's `TensorBoardLogger`
            `log_dir`, or `<default_root_dir>/graddiag` when it has none; False: no event files.
        every: read statistics back (and log them) once every `every` optimizer steps.
        clip: a clipping policy from `graddiag.clip` (or a list, or a number: global norm),
            applied in place of Lightning's clipping; leave `gradient_clip_val` unset with it.
        nonfinite: "warn", "skip" (a non-finite step's gradients are dropped, so the optimizer
            step changes nothing) or "raise" (`NonFiniteGradientError` stops `fit`).
        detectors: detector settings, see `graddiag.detectors.build_detectors`.
        detail_every: max |g|, zero fraction and parameter norm every this many steps (0: never).
        hist_every: gradient histograms every this many steps (0: never).
        trace_nonfinite: find the module where a NaN/Inf is born (one host sync per step).
        history: how many recent `StepStats` the monitor keeps.
        flush_secs: event-file flush interval.
        print_summary: print the findings summary at the end of each `fit`.

    Attributes:
        monitor: the run's `graddiag.torch.GradientMonitor` (None before training). One run
            spans every `fit` of the same module (one event file, one step count, detectors that
            keep their state); `close()` ends it (interpreter exit does too).

    Raises:
        ValueError: for a bad argument (at construction), or `clip` together with the trainer's
            `gradient_clip_val` (at `setup`).
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
        super().__init__()
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

    def setup(self, trainer, pl_module, stage: str) -> None:
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if self.settings.clip is not None and clip_val:
            raise ValueError(
                f"GradDiagCallback(clip={self._run.kwargs['clip']!r}) clips in place of "
                f"Lightning; remove Trainer(gradient_clip_val={clip_val!r}) or the `clip` argument"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        # global_step is restored from a checkpoint after on_fit_start, before on_train_start
        self._run.start(pl_module, self._logdir(trainer), trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._run.step(trainer.global_step, params)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run.end(self.print_summary and trainer.is_global_zero)

    def _logdir(self, trainer) -> str | os.PathLike | None:
        logdir = self._run.logdir
        if logdir is False or not trainer.is_global_zero:
            return None
        if logdir is not None:
            return logdir
        for logger in trainer.loggers:
            if type(logger).__name__ == "TensorBoardLogger":
                return logger.log_dir
        return os.path.join(trainer.default_root_dir, "graddiag")


class GradDiagCallback(GradDiagMixin, Callback):
    __doc__ = (
        "Monitor gradients during `Trainer.fit`.\n\n" + GradDiagMixin.__doc__.split("\n\n", 1)[1]
    )
