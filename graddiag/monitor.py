"""The framework-neutral half of a monitor: detectors, history and the TensorBoard sink.

Adapters (`graddiag.torch`, `graddiag.tf`) measure gradients on the device and hand this class
`StepStats` once per log step; everything after that point is shared.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graddiag import tags
from graddiag._checks import int_at_least as check_int
from graddiag.dashboard import ALWAYS_WRITTEN, custom_scalars_layout
from graddiag.detectors import Detector, Diagnoser, StepBlock
from graddiag.events import EventFileWriter, flush_all
from graddiag.findings import Finding, severity_rank
from graddiag.settings import NONFINITE_POLICIES
from graddiag.stats import ModelInfo, StepStats

log = logging.getLogger("graddiag")

__all__ = ["NONFINITE_POLICIES", "MonitorCore", "NonFiniteGradientError", "StepReport"]


class NonFiniteGradientError(FloatingPointError):
    """Raised under `nonfinite="raise"`; the message names the step and the first layer."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(f"step {finding.step}: {finding.message}")
        self.finding = finding


@dataclass
class StepReport:
    """What `monitor.step()` returns.

    Attributes:
        step: the optimizer step just measured.
        findings: findings made during this call. Under `every=N`, statistics are fetched from the
            device on log steps only, so findings for the steps since the last log step arrive then.
        logged: whether this was a log step.
        skipped: whether the optimizer step should be / was skipped (non-finite policy "skip").
        stats: the step's statistics on log steps, else None.
    """

    step: int
    findings: list[Finding] = field(default_factory=list)
    logged: bool = False
    skipped: bool = False
    stats: StepStats | None = None

    #: host work still running in the background (`graddiag.host.Deferred`): `findings` and
    #: `stats` wait for it when read
    deferred: Any = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """False when the optimizer step should not be applied."""
        return not self.skipped


def _resolved(name: str) -> property:
    """A `StepReport` attribute that first collects what the background host work made."""

    def get(self: StepReport):
        d = self.__dict__.get("deferred")
        if d is not None:
            self.__dict__["deferred"] = None
            d.result()
            self.__dict__["findings"] = self.__dict__.get("findings", []) + d.findings
            self.__dict__["stats"] = d.stats
        return self.__dict__.get(name)

    def set_(self: StepReport, value) -> None:
        self.__dict__[name] = value

    return property(get, set_)


StepReport.findings = _resolved("findings")  # after @dataclass: its __init__ sets through these
StepReport.stats = _resolved("stats")


def close_at_exit_hook(obj: Any):
    """Register `obj.close()` to run at interpreter exit and on SIGTERM (through a weak reference,
    so the hook does not keep `obj` alive); returns the hook for `atexit.unregister`.

    Closing there never raises: a failure is logged. SIGTERM: see `_on_sigterm`.
    """
    ref = weakref.ref(obj)

    def hook() -> None:
        o = ref()
        if o is not None:
            _close_quietly(o)

    atexit.register(hook)
    _open.add(obj)
    _install_sigterm()
    return hook


_open: weakref.WeakSet = weakref.WeakSet()
_prev_sigterm: Any = None


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception as e:  # noqa: BLE001 - at exit or on a signal nothing may escape
        log.warning("graddiag: closing %s failed: %s: %s", type(obj).__name__, type(e).__name__, e)


def _install_sigterm() -> None:
    """Flush (and, when the process is about to die, close) the monitors on SIGTERM, then do
    what the previous handler did: call it, or die of SIGTERM as before. Installed once, from the
    main thread, and only over Python's default action or a Python handler (never over
    SIG_IGN or a handler installed outside Python)."""
    global _prev_sigterm
    if _prev_sigterm is not None or threading.current_thread() is not threading.main_thread():
        return
    try:
        prev = signal.getsignal(signal.SIGTERM)
        if prev is signal.SIG_IGN or prev is None:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
        _prev_sigterm = prev
    except (ValueError, OSError, AttributeError):  # no SIGTERM here, or not allowed
        return


def _on_sigterm(signum: int, frame: Any) -> None:
    prev = _prev_sigterm
    if callable(prev):  # the user's handler decides whether training goes on: flush only
        flush_all()
        prev(signum, frame)
        return
    for obj in list(_open):  # the default action ends the process: close first
        _close_quietly(obj)
    flush_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


#: the optional step scalars of a plain step, in `write_step`'s order after grad_norm,
#: nonfinite and findings (skipped is written only when True: never on a plain step)
_PLAIN_SCALARS = ("clip_coef", "grad_reset", "backward_calls", "grads_modified", "loss")


def _plain_signature(s: StepStats, whole: bool) -> tuple[bool, ...] | None:
    """Which of `_PLAIN_SCALARS` and per-layer clip coefficients a plain step carries (None: not
    a plain step; see `TensorBoardSink.write_block`); `whole`: every layer has a gradient and
    none is non-finite."""
    if (
        not whole
        or s.skipped
        or s.nonfinite_origin
        or s.nonfinite_ranks is not None
        or s.grad_max is not None
        or s.zero_frac is not None
        or s.param_norm is not None
        or s.update_ratio is not None
        or s.nan_count is not None
        or s.inf_count is not None
    ):
        return None
    return (
        s.clip_coef is not None,
        s.grad_reset is not None,
        s.backward_calls is not None,
        s.grads_modified is not None,
        s.loss is not None,
        s.layer_clip_coef is not None,
    )


class TensorBoardSink:
    """Writes `StepStats` and findings as TensorBoard events, one event per step for all scalars."""

    def __init__(
        self,
        logdir: str | os.PathLike,
        info: ModelInfo,
        run_meta: Mapping[str, Any],
        flush_secs: float = 2.0,
    ) -> None:
        # the logdir was checked when the monitor was built; if it breaks since, the writer warns
        # and retries instead of raising into a training step
        self.writer = EventFileWriter(
            logdir, flush_secs=flush_secs, filename_suffix=tags.EVENT_SUFFIX, fail_fast=False
        )
        self.info = info
        self._layer_tags = {
            s: tuple(tags.tag(s, n) for n in info.layers)
            for s in (
                "grad_norm",
                "grad_max",
                "nonfinite",
                "nan_count",
                "inf_count",
                "zero_frac",
                "param_norm",
                "update_ratio",
                "clip_coef",
            )
        }
        self._keys: dict[tuple, tuple[str, ...]] = {}
        #: (stat, per_layer) written so far: the dashboard shows charts of these only
        self._written = set(ALWAYS_WRITTEN)
        self.writer.add_custom_scalars_layout(custom_scalars_layout(self._written))
        self.writer.add_text(
            0, tags.MODEL, json.dumps(dict(run_meta), sort_keys=True, default=str), header=True
        )

    def write_block(self, block: Sequence[StepStats], n_findings: Sequence[int]) -> None:
        """`write_step` for consecutive steps. Runs of plain steps (every layer has a gradient,
        all finite, no detail statistics, no text) that carry the same scalars share one layout:
        their values are taken from the block's stacked fields and encoded at once."""
        if len(block) == 1:
            self.write_step(block[0], n_findings[0])
            return
        if not isinstance(block, StepBlock):
            block = StepBlock(block)
        whole = block.field("has_grad").all(axis=1) & ~block.field("nonfinite").any(axis=1)
        sigs = [_plain_signature(s, w) for s, w in zip(block, whole.tolist(), strict=True)]
        k, n = 0, len(block)
        while k < n:
            s, sig = block[k], sigs[k]
            if sig is None or k + 1 == n or sigs[k + 1] != sig:
                self.write_step(s, n_findings[k])
                k += 1
                continue
            end = k + 2
            while end < n and sigs[end] == sig:
                end += 1
            tag_tuple = self._scalars(s, n_findings[k])[0]  # the run's layout
            cols = [block.field("global_norm")[k:end], np.zeros(end - k)]
            cols.append(np.asarray(n_findings[k:end], dtype=np.float64))
            for stat, present in zip(_PLAIN_SCALARS, sig, strict=False):
                if present:  # (an object array where other steps of the block lack it)
                    cols.append(block.field(stat)[k:end].astype(np.float64))
            values = [np.stack(cols, axis=1), block.field("grad_norm")[k:end]]
            if sig[-1]:
                values.append(np.stack([st.layer_clip_coef for st in block[k:end]]))
            rows = np.concatenate(values, axis=1)
            self.writer.add_scalars_rows(block.field("step")[k:end].tolist(), tag_tuple, rows)
            k = end

    def write_step(self, s: StepStats, n_findings: int) -> tuple[str, ...]:
        """All scalars of one step, as one event; returns their tags."""
        tag_tuple, values = self._scalars(s, n_findings)
        self.writer.add_scalars(s.step, tag_tuple, values)
        if s.nonfinite_origin:  # "forward:<module>" for the forward pass, "<module>" backward
            prefix = "forward:" if s.nonfinite_pass == "forward" else ""
            self.writer.add_text(s.step, tags.NONFINITE_ORIGIN, prefix + s.nonfinite_origin)
        if s.nonfinite_ranks is not None:
            text = ",".join(map(str, s.nonfinite_ranks)) or "-"
            self.writer.add_text(s.step, tags.NONFINITE_RANKS, text)
        return tag_tuple

    def _scalars(self, s: StepStats, n_findings: int) -> tuple[tuple[str, ...], np.ndarray]:
        """The tags and values of a step's scalars event (a new layout's charts are shown)."""
        gnames: list[str] = []
        gvals: list[float] = []
        for stat, value in (
            ("grad_norm", s.global_norm),
            ("nonfinite", int(np.count_nonzero(s.nonfinite))),
            ("findings", n_findings),
            ("clip_coef", s.clip_coef),
            ("grad_reset", None if s.grad_reset is None else int(s.grad_reset)),
            ("backward_calls", s.backward_calls),
            ("skipped", 1 if s.skipped else None),
            ("grads_modified", None if s.grads_modified is None else int(s.grads_modified)),
            ("loss", s.loss),
        ):
            if value is not None:
                gnames.append(stat)
                gvals.append(float(value))
        has = s.has_grad
        all_have = bool(has.all())
        bad = s.nonfinite > 0
        any_bad = bool(bad.any())
        per_layer = [("grad_norm", s.grad_norm, None if all_have else has)]
        if any_bad:
            per_layer.append(("nonfinite", s.nonfinite, bad))
        for stat, arr, mask in (
            ("grad_max", s.grad_max, has),
            ("zero_frac", s.zero_frac, has),
            ("param_norm", s.param_norm, None),
            ("update_ratio", s.update_ratio, None),
            ("nan_count", s.nan_count, None),
            ("inf_count", s.inf_count, None),
            ("clip_coef", s.layer_clip_coef, has),
        ):
            if arr is not None:
                per_layer.append((stat, arr, None if mask is None or all_have else mask))
        key = (tuple(gnames),) + tuple(
            (stat, None if m is None else m.tobytes()) for stat, _, m in per_layer
        )
        tag_tuple = self._keys.get(key)
        if tag_tuple is None:
            all_tags = [tags.tag(n) for n in gnames]
            for stat, _, mask in per_layer:
                lt = self._layer_tags[stat]
                all_tags.extend(
                    lt if mask is None else [t for t, m in zip(lt, mask, strict=True) if m]
                )
            if len(self._keys) > 256:
                self._keys.clear()
            tag_tuple = self._keys[key] = tuple(all_tags)
            self.show_charts(
                {(n, False) for n in gnames} | {(stat, True) for stat, _, _ in per_layer}, s.step
            )
        values = [np.asarray(gvals)] + [
            arr if m is None else np.asarray(arr)[m] for _, arr, m in per_layer
        ]
        return tag_tuple, np.concatenate(values)

    def show_charts(self, stats: set[tuple[str, bool]], step: int) -> None:
        """Note the ``(stat, per_layer)`` pairs written at `step`; when one is new, write the
        dashboard layout again with its chart (TensorBoard shows a run's latest layout)."""
        if not stats <= self._written:
            self._written |= stats
            layout = custom_scalars_layout(self._written)
            self.writer.add_custom_scalars_layout(layout, step, header=False)

    def write_findings(self, step: int, findings: list[Finding]) -> None:
        rows = ["| severity | kind | layer | message | suggestion |", "|---|---|---|---|---|"]
        for f in findings:
            cells = [f.severity, f.kind, f.layer or "(model)", f.message, f.suggestion]
            rows.append(
                "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
            )
        self.writer.add_text(step, tags.FINDINGS, "\n".join(rows))

    def write_histogram(
        self,
        step: int,
        layer: str,
        counts,
        edges,
        vmin,
        vmax,
        vsum,
        vsumsq,
        num,
        nan: int,
        inf: int,
    ) -> None:
        """A layer's histogram of finite gradient values, with its NaN/Inf counts beside it."""
        if num > 0:
            self.writer.add_histogram(
                step, tags.hist_tag(layer), counts, edges, vmin, vmax, vsum, vsumsq, num
            )
        self.writer.add_scalars(
            step, (tags.tag("nan_count", layer), tags.tag("inf_count", layer)), [nan, inf]
        )

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MonitorCore:
    """Detectors + in-memory history + optional TensorBoard sink.

    Args:
        info: the model description.
        logdir: TensorBoard run directory, or None for no event files.
        detectors: see `graddiag.detectors.build_detectors`.
        history: how many recent `StepStats` to keep in memory (`monitor.history`).
        flush_secs: event-file flush interval.
        run_meta: extra JSON-able facts written with the model description (settings, versions).
        close_at_exit: close (flush) at interpreter exit if `close()` was not called.
    """

    def __init__(
        self,
        info: ModelInfo,
        logdir: str | os.PathLike | None = None,
        detectors: Mapping[str, Any] | Iterable[Detector] | None = None,
        history: int = 1000,
        flush_secs: float = 2.0,
        run_meta: Mapping[str, Any] | None = None,
        close_at_exit: bool = True,
    ) -> None:
        check_int("history", history, 0)
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise ValueError(f"Expected `logdir` to be a path or None, got {logdir!r}")
        self.info = info
        self.diagnoser = Diagnoser(info, detectors)
        self.history: deque[StepStats] = deque(maxlen=history)
        meta = {"info": info.to_dict(), "detectors": self.diagnoser.config(), **(run_meta or {})}
        self.sink = TensorBoardSink(logdir, info, meta, flush_secs) if logdir is not None else None
        self.closed = False
        start = list(self.diagnoser.findings)
        if start:
            self._emit(0, start)
        self._atexit = None
        if close_at_exit:  # adapters pass False and close themselves (draining their buffers first)
            self._atexit = close_at_exit_hook(self)

    @property
    def findings(self) -> list[Finding]:
        return self.diagnoser.findings

    @property
    def logdir(self) -> str | None:
        return None if self.sink is None else self.sink.writer.logdir

    def process(self, stats: StepStats) -> list[Finding]:
        """Run the detectors on one step, log it, and return its new findings."""
        return self.process_block([stats])[0]

    def process_block(self, block: list[StepStats]) -> list[list[Finding]]:
        """`process` over consecutive steps at once: each step's new findings."""
        if len(block) > 1:  # stacked fields shared by the detectors and the sink
            block = StepBlock(block)
        per_step = self.diagnoser.update_block(block)
        self.history.extend(block)
        if self.sink is not None:
            self.sink.write_block(block, [len(new) for new in per_step])
        for stats, new in zip(block, per_step, strict=True):
            if new:
                self._emit(stats.step, new)
        return per_step

    def add_finding(self, finding: Finding) -> None:
        """Record and log a finding an adapter made itself (not a detector's)."""
        self.diagnoser.findings.append(finding)
        self._emit(finding.step, [finding])

    def write_histograms(self, step: int, rows: np.ndarray, has: np.ndarray) -> None:
        """Write one step's per-layer histograms: `rows` holds a `graddiag.host.HIST_WIDTH` row
        per layer (bin counts of the finite values over [min, max], then min, max, sum, sum of
        squares, count of finite values, NaN count, Inf count); layers without `has` are left out.
        """
        if self.sink is None:
            return
        bins = rows.shape[1] - 7
        for li, name in enumerate(self.info.layers):
            if not has[li]:
                continue
            r = rows[li]
            lo, hi, vsum, vsumsq, num, nan, inf = (float(x) for x in r[bins:])
            if num > 0:
                edges = np.linspace(lo, max(hi, lo + 1e-12), bins + 1)[1:]
                counts = r[:bins]
            else:
                counts = edges = []
            self.sink.write_histogram(
                step, name, counts, edges, lo, hi, vsum, vsumsq, num, int(nan), int(inf)
            )

    def record_update_ratio(self, step: int, ratio: np.ndarray) -> None:
        """Log a step's per-layer update/weight ratio, known only after its optimizer step, and
        attach it to that step's `StepStats` if it is still in the history."""
        if self.sink is not None:
            self.sink.writer.add_scalars(
                step, tuple(tags.tag("update_ratio", n) for n in self.info.layers), ratio
            )
            self.sink.show_charts({("update_ratio", True)}, step)
        for s in reversed(self.history):
            if s.step == step:
                s.update_ratio = ratio
                break

    def _emit(self, step: int, new: list[Finding]) -> None:
        for f in new:
            level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}[
                f.severity
            ]
            log.log(level, "graddiag: %s", f)
        if self.sink is not None:
            self.sink.write_findings(step, new)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def close(self) -> list[Finding]:
        """Run end-of-run summaries, flush and close the event file. Idempotent."""
        if self.closed:
            return []
        self.closed = True
        if self._atexit is not None:
            atexit.unregister(self._atexit)
        new = self.diagnoser.finalize()
        if new:
            self._emit(max(self.diagnoser.last_step, 0), new)
        if self.sink is not None:
            self.sink.close()
        return new

    def summary(self, min_severity: str = "info", per_kind: int = 5) -> str:
        """A plain-text summary of the findings so far, grouped by kind (worst first), with each
        kind's suggestion once.

        Args:
            min_severity: leave out findings below this severity.
            per_kind: list at most this many findings of a kind (the rest are counted).
        """
        rank = severity_rank(min_severity)
        fs = [f for f in self.findings if severity_rank(f.severity) >= rank]
        if not fs:
            return "graddiag: no findings."
        groups: dict[str, list[Finding]] = {}
        for f in sorted(fs, key=lambda f: f.step):
            groups.setdefault(f.kind, []).append(f)
        order = sorted(
            groups,
            key=lambda k: (-max(severity_rank(f.severity) for f in groups[k]), groups[k][0].step),
        )
        lines = [f"graddiag: {len(fs)} finding(s)"]
        for kind in order:
            g = groups[kind]
            worst = max((f.severity for f in g), key=severity_rank)
            lines.append(f"  {kind} ({len(g)}, {worst}), first at step {g[0].step}:")
            for f in g[:per_kind]:
                where = f" in {f.layer}" if f.layer else ""
                lines.append(f"    [{f.severity}] step {f.step}{where}: {f.message}")
            if len(g) > per_kind:
                lines.append(f"    ... and {len(g) - per_kind} more")
            for suggestion in dict.fromkeys(f.suggestion for f in g):
                lines.append(f"    -> {suggestion}")
        return "\n".join(lines)
