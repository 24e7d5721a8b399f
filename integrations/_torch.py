"""What the PyTorch trainer callbacks (Lightning, Hugging Face) share: settings checked at
construction, one `graddiag.torch.GradientMonitor` per run measured in manual mode at the trainer's
pre-optimizer-step hook, and the trainer's own step number."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from graddiag.findings import Finding, severity_rank
from graddiag.settings import Settings


def check_logdir(logdir: Any) -> str | os.PathLike | None:
    """`logdir` as a path, or None for "the trainer's own" (False: no event files)."""
    if logdir is None or logdir is False or isinstance(logdir, (str, os.PathLike)):
        return logdir
    raise ValueError(
        "Expected `logdir` to be a path, None (the trainer's log directory) or False (no event "
        f"files), got {logdir!r}"
    )


class TorchRun:
    """The monitor settings of a trainer callback and the monitor of its run.

    Args:
        logdir: a path, None (resolved from the trainer by the callback) or False (no files).
        kwargs: the shared monitor settings; all of them are validated now (`Settings`).
    """

    def __init__(self, logdir: Any, **kwargs: Any) -> None:
        self.logdir = check_logdir(logdir)
        path = self.logdir if isinstance(self.logdir, (str, os.PathLike)) else None
        self.settings = Settings(logdir=path, **kwargs)
        self.kwargs = kwargs
        self.monitor = None

    def start(self, model, logdir: str | os.PathLike | None, step: int, **overrides: Any):
        """The run's monitor for `model`, created at the first start (`start_step=step`) and kept
        across later starts that continue it (same model, `step` not behind the monitor's count),
        so a second `fit` continues the same event file and the detectors keep their state.
        Anything else (another model, a trainer that starts over) closes the old run first."""
        from graddiag.torch import GradientMonitor

        mon = self.monitor
        if mon is not None and (mon.closed or mon.model is not model or step < mon.step_count):
            mon.close()
            mon = None
        if mon is None:
            kwargs = {**self.kwargs, **overrides}
            mon = GradientMonitor(model, None, logdir, start_step=step, **kwargs)
            self.monitor = mon
        return mon

    def step(self, step: int, params: Iterable[Any]):
        """Measure (and clip) the current gradients as optimizer step `step`. A non-finite step
        under `nonfinite="skip"` drops the gradients of `params` (torch optimizers skip a
        parameter without a gradient, so the update, moments included, does not happen)."""
        mon = self.monitor
        if mon.step_count != step:  # the trainer's count is the truth (resumed, or without us)
            mon.continue_at(step)
        report = mon.step()
        if report.skipped:
            for p in params:
                p.grad = None
        return report

    def end(self, print_summary: bool) -> None:
        """End of a `fit`: every measured step logged and on disk; the run stays open."""
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.flush()
            if self.monitor.core is not None:
                self.monitor.core.flush()
            if print_summary:
                print(self.monitor.summary())

    def close(self) -> list[Finding]:
        return [] if self.monitor is None else self.monitor.close()


def shared_kwargs(
    every: int,
    clip: Any,
    nonfinite: str,
    detectors: Mapping[str, Any] | Iterable[Any] | None,
    detail_every: int,
    hist_every: int,
    trace_nonfinite: bool,
    history: int,
    flush_secs: float,
) -> dict[str, Any]:
    return {
        "every": every,
        "clip": clip,
        "nonfinite": nonfinite,
        "detectors": detectors,
        "detail_every": detail_every,
        "hist_every": hist_every,
        "trace_nonfinite": trace_nonfinite,
        "history": history,
        "flush_secs": flush_secs,
    }


def brief(findings: list[Finding], limit: int = 3) -> str:
    """A one-line summary of `findings`, worst first: `nonfinite@3 h.1.mlp (error); ...`."""
    worst = sorted(findings, key=lambda f: (-severity_rank(f.severity), f.step))
    parts = [f"{f.kind}@{f.step} {f.layer or '(model)'} ({f.severity})" for f in worst[:limit]]
    if len(worst) > limit:
        parts.append(f"+{len(worst) - limit} more")
    return "; ".join(parts)
