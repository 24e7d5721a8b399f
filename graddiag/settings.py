"""The settings every monitor shares, validated completely when they are made.

`graddiag.torch.GradientMonitor`, `graddiag.tf.GradientMonitor` and every integration callback build
one `Settings` in their constructor, so a bad detector name, threshold, `flush_secs`, `every`,
`clip` or logdir fails there — before training starts — with a message naming the argument and
the value, the same in every framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from graddiag import _checks
from graddiag.clip import Chain, as_chain
from graddiag.detectors import Detector, build_detectors

#: What to do with a step whose gradients hold NaN/Inf.
NONFINITE_POLICIES = ("warn", "skip", "raise")


@dataclass(frozen=True)
class Settings:
    """Monitor settings shared by all adapters (see `graddiag.torch.GradientMonitor` for each one).

    Args:
        logdir: TensorBoard run directory (created now; must be writable), or None.
        every: host reads of the statistics every this many steps.
        clip: a policy, a list of policies, a `Chain`, a number (global-norm clipping) or None;
            stored as a `Chain` (or None).
        nonfinite: "warn", "skip" or "raise".
        detectors: detector settings (`graddiag.detectors.build_detectors`); built once here to
            check them.
        detail_every: detail statistics every this many steps (0: never).
        hist_every: histograms every this many steps (0: never; also 0 without a logdir).
        history: how many recent `StepStats` to keep in memory.
        flush_secs: event-file flush interval in seconds (>= 0; 0 flushes every write).
        trace_nonfinite: find the module where a NaN/Inf is born (a bool).
        start_step: the number of the first step measured (a resumed run continues its count).
        run_meta: extra JSON-able facts written with the model description.
        per_rank_logs: under `torch.distributed`, every rank writes its own logs (rank k into
            `logdir/rank<k>`; rank 0 into `logdir`), not rank 0 alone (a bool).

    Raises:
        ValueError: for a bad setting, naming the argument and showing the value.
        OSError: if `logdir` cannot be created or written.
    """

    logdir: str | None = None
    every: int = 10
    clip: Chain | None = None
    nonfinite: str = "warn"
    detectors: Mapping[str, Any] | tuple[Detector, ...] | None = None
    detail_every: int = 100
    hist_every: int = 100
    history: int = 1000
    flush_secs: float = 2.0
    trace_nonfinite: bool = False
    start_step: int = 0
    run_meta: Mapping[str, Any] = field(default_factory=dict)
    per_rank_logs: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "logdir", _checks.logdir(self.logdir))
        set_(self, "every", _checks.int_at_least("every", self.every))
        chain = as_chain(self.clip)
        if chain is not None and not chain.policies:
            raise ValueError(f"Expected `clip` to hold at least one policy, got {self.clip!r}")
        set_(self, "clip", chain)
        set_(self, "nonfinite", _checks.choice("nonfinite", self.nonfinite, NONFINITE_POLICIES))
        detectors = self.detectors
        if detectors is not None and not isinstance(detectors, Mapping):
            if isinstance(detectors, (str, bytes)) or not isinstance(detectors, Iterable):
                raise ValueError(
                    "Expected `detectors` to be a dict of detector settings, a list of "
                    f"Detector instances or None, got {detectors!r:.80}"
                )
            detectors = tuple(detectors)
        build_detectors(detectors)  # unknown names, bad keys and thresholds fail here
        set_(self, "detectors", detectors)
        set_(self, "detail_every", _checks.int_at_least("detail_every", self.detail_every, 0))
        hist_every = _checks.int_at_least("hist_every", self.hist_every, 0)
        set_(self, "hist_every", hist_every if self.logdir is not None else 0)
        set_(self, "history", _checks.int_at_least("history", self.history, 0))
        set_(
            self,
            "flush_secs",
            float(_checks.positive("flush_secs", self.flush_secs, allow_zero=True)),
        )
        if not isinstance(self.trace_nonfinite, bool):
            raise ValueError(
                f"Expected `trace_nonfinite` to be True or False, got {self.trace_nonfinite!r}"
            )
        set_(self, "start_step", _checks.int_at_least("start_step", self.start_step, 0))
        if not isinstance(self.run_meta, Mapping):
            raise ValueError(f"Expected `run_meta` to be a dict or None, got {self.run_meta!r}")
        set_(self, "run_meta", dict(self.run_meta))
        if not isinstance(self.per_rank_logs, bool):
            raise ValueError(
                f"Expected `per_rank_logs` to be True or False, got {self.per_rank_logs!r}"
            )

    def with_detector_defaults(self, name: str, **defaults: Any) -> Settings:
        """These settings with `defaults` added to detector `name`'s settings unless the user set
        them (e.g. the non-finite detector's `amp=True` under loss scaling). Detector instances
        the user built are left as they are."""
        spec = self.detectors
        if spec is not None and not isinstance(spec, Mapping):
            return self
        spec = dict(spec or {})
        own = spec.get(name, {})
        if not isinstance(own, Mapping):  # False (disabled) or True (defaults)
            if own is False:
                return self
            own = {}
        spec[name] = {**defaults, **own}
        return dataclasses.replace(self, detectors=spec)

    def meta(self) -> dict[str, Any]:
        """The settings as written into a run's metadata (same keys in every framework)."""
        return {
            "every": self.every,
            "clip": repr(self.clip) if self.clip is not None else None,
            "nonfinite_policy": self.nonfinite,
            "detail_every": self.detail_every,
            "hist_every": self.hist_every,
            "trace_nonfinite": self.trace_nonfinite,
            "start_step": self.start_step,
            "per_rank_logs": self.per_rank_logs,
        }
