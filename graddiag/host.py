"""The host half of every adapter, once: device rows in, `StepStats`, findings and logs out.

An adapter (`graddiag.torch`, `graddiag.tf`) measures on the device and keeps a ring buffer of rows
laid out by `RowLayout`. When it reads rows back (a log step) it hands them to `HostPath.ingest`,
which decodes them into `StepStats`, attaches the detail statistics, histograms and update/weight
ratios the adapter measured, runs the detectors, writes the logs and applies the host side of the
non-finite policy. `MonitorAPI` gives every adapter the same public surface (`findings`,
`history`, `summary()`, context manager).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from graddiag import __version__, tags
from graddiag.events import Worker
from graddiag.findings import Finding
from graddiag.monitor import MonitorCore, NonFiniteGradientError
from graddiag.settings import Settings
from graddiag.stats import (
    ModelInfo,
    StepStats,
    aggregate_detail,
    aggregate_update_ratio,
)

#: Bins of the gradient histograms, in every framework.
HIST_BINS = 30
#: A histogram row per layer: HIST_BINS counts of finite values, then these.
HIST_FIELDS = ("min", "max", "sum", "sum_squares", "num", "nan", "inf")
HIST_WIDTH = HIST_BINS + len(HIST_FIELDS)
#: Below this a float32 sum of squares may have lost elements to underflow (elements < ~1e-19).
TINY_SUMSQ = 1e-30
#: Detail rows (one column per parameter), in this order.
DETAIL_FIELDS = ("grad_max", "nonzero", "nan", "inf", "param_sumsq")


class RowLayout:
    """One step's row of an adapter's device ring buffer (float32).

    Columns: the sum of squares of each parameter's gradient (`NO_GRAD` where it has none), then
    the scalars in `SCALARS`, then — with a per-layer clipping policy — one clip coefficient per
    layer. The device never holds NaN sentinels (TensorFlow's `enable_check_numerics` would trip):
    a scalar column that has no value holds `NONE`, and `has_loss` says whether `loss` is set.

    Args:
        n_params: number of monitored parameters (variables).
        n_layers: number of layers.
        layer_coef: whether rows carry per-layer clip coefficients.
    """

    SCALARS = ("clip_coef", "skipped", "grad_reset", "backward_calls", "has_loss", "loss")
    NO_GRAD = -1.0
    NONE = -1.0

    def __init__(self, n_params: int, n_layers: int, layer_coef: bool = False) -> None:
        self.n_params = n_params
        self.n_layers = n_layers
        self.sumsq = slice(0, n_params)
        self.col = {name: n_params + i for i, name in enumerate(self.SCALARS)}
        end = n_params + len(self.SCALARS)
        self.layer_coef = slice(end, end + n_layers) if layer_coef else None
        self.width = end + (n_layers if layer_coef else 0)
        #: rows -> (layer_of, the (row, layer) cell of each row's parameters) for `decode_block`
        self._cells: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def blank(self) -> np.ndarray:
        """A row meaning "nothing measured": no gradients, no values, layer coefficients 1."""
        row = np.full(self.width, self.NONE, dtype=np.float32)
        row[self.col["skipped"]] = row[self.col["has_loss"]] = row[self.col["loss"]] = 0.0
        if self.layer_coef is not None:
            row[self.layer_coef] = 1.0
        return row

    def decode_block(
        self,
        steps: Sequence[int],
        rows: np.ndarray,
        layer_of: np.ndarray,
        known: Sequence[dict[str, Any]],
    ) -> tuple[list[StepStats], np.ndarray, np.ndarray]:
        """`decode` of consecutive rows at once (a log step's read-back), vectorised over rows:
        each row's `StepStats`, and per row which parameters had a gradient and their sums of
        squares (zero where none). `known[k]` is row k's `known` (it is consumed)."""
        r = np.asarray(rows, dtype=np.float64)
        n, L = len(steps), self.n_layers
        if r.shape != (n, self.width) or len(known) != n:
            raise ValueError(
                f"Expected `rows` of shape ({n}, {self.width}) (one row of this layout per step) "
                f"and {n} `known` dicts, got shape {r.shape} and {len(known)}"
            )
        sumsq = r[:, self.sumsq]
        has = sumsq != self.NO_GRAD
        for k, kw in enumerate(known):
            h = kw.pop("has", None)
            if h is not None:
                has[k] = h
        all_have = bool(has.all())
        sq = sumsq if all_have else np.where(has, sumsq, 0.0)
        # per (row, layer) sums by bincount: a NaN stays in its own layer (a matmul would spread it)
        cached = self._cells.get(n)
        if cached is not None and cached[0] is layer_of:
            cell = cached[1]
        else:
            cell = (np.arange(n)[:, None] * L + layer_of[None, :]).ravel()
            self._cells[n] = (layer_of, cell)
        size = n * L
        norms = np.sqrt(np.bincount(cell, weights=sq.ravel(), minlength=size)).reshape(n, L)
        finite = np.isfinite(sumsq)
        if all_have and finite.all():  # the common case: every layer present, nothing non-finite
            bad = np.zeros((n, L))
            layer_has = np.bincount(layer_of, minlength=L)[None, :].repeat(n, axis=0) > 0
        else:
            weights = (has & ~finite).ravel().astype(np.float64)
            bad = np.bincount(cell, weights=weights, minlength=size).reshape(n, L)
            counts = np.bincount(cell, weights=has.ravel().astype(np.float64), minlength=size)
            layer_has = counts.reshape(n, L) > 0
        gnorm = np.sqrt(sq.sum(axis=1)).tolist()
        scalars = r[:, self.n_params : self.n_params + len(self.SCALARS)].tolist()
        coefs = None if self.layer_coef is None else r[:, self.layer_coef].copy()
        out = []
        for k, step in enumerate(steps):
            clip, skipped, reset, calls, has_loss, loss = scalars[k]
            stats = StepStats(
                step=step,
                grad_norm=norms[k],
                has_grad=layer_has[k],
                nonfinite=bad[k],
                global_norm=gnorm[k],
                clip_coef=None if clip < 0 else clip,
                layer_clip_coef=None if coefs is None or clip < 0 else coefs[k],
                grad_reset=None if reset < 0 else bool(reset),
                backward_calls=None if calls <= 0 else int(calls),
                skipped=skipped > 0,
                loss=loss if has_loss > 0 else None,
            )
            for name, value in known[k].items():
                setattr(stats, name, value)
            out.append(stats)
        return out, has, sq

    def decode(
        self, step: int, row: np.ndarray, layer_of: np.ndarray, **known: Any
    ) -> tuple[StepStats, np.ndarray, np.ndarray]:
        """The `StepStats` of one row, which parameters had a gradient, and their sums of squares.

        `known` holds what the adapter knows on the host already (`has`: which parameters got a
        gradient; any `StepStats` field, e.g. `grad_reset`) and overrides the row's column of the
        same name."""
        (stats,), has, sumsq = self.decode_block([step], np.asarray(row)[None], layer_of, [known])
        return stats, has[0], sumsq[0]


#: `ingest` keywords that are not `StepStats` fields (a step's own extra rows)
_ROW_EXTRAS = frozenset({"detail", "hist", "update"})


class HostPath:
    """Everything an adapter does on the host, for any framework.

    Args:
        settings: the validated settings.
        layer_of: the layer index of each monitored parameter.
        param_names: the parameters' qualified names.
        numel: the number of elements of each parameter.
        framework: "torch" or "tensorflow".
        framework_version: the framework's version string.
    """

    #: run the log-step host work on the background worker; False runs it in the training
    #: thread, as before the worker existed (benchmarks/bench_torch.py compares both)
    background = True

    def __init__(
        self,
        settings: Settings,
        layer_of: np.ndarray,
        param_names: Sequence[str],
        numel: Sequence[float],
        framework: str,
        framework_version: str,
    ) -> None:
        self.settings = settings
        self.layer_of = np.asarray(layer_of, dtype=np.int64)
        self.param_names = list(param_names)
        self.numel = np.asarray(numel, dtype=np.float64)
        self.n_layers = int(self.layer_of.max()) + 1 if self.layer_of.size else 0
        chain = settings.clip
        self.layout = RowLayout(
            len(self.param_names), self.n_layers, chain is not None and chain.has_layer_coef
        )
        self.framework = framework
        self.framework_version = framework_version
        self.core: MonitorCore | None = None
        self.error: NonFiniteGradientError | None = None
        self.last_param_norms: dict[str, float] = {}
        #: the background thread for log-step host work: the event writer's (one thread per
        #: monitor), or an own one without a logdir; set by `start()`
        self.worker: Worker | None = None
        self._own_worker = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, info: ModelInfo, amp: bool = False) -> MonitorCore:
        """Create the core (detectors, history, sink) for the model `info` describes.

        Args:
            info: the model description (the adapter knows it at its first step).
            amp: gradients are loss-scaled: overflow steps are expected (the non-finite detector
                defaults to `amp=True` unless the user set it).
        """
        s = self.settings
        if amp:
            s = s.with_detector_defaults("nonfinite", amp=True)
        info = dataclasses.replace(info, framework=self.framework)
        if s.logdir is not None and s.start_step == 0:
            _warn_if_reused(s.logdir)
        meta = {
            "framework": self.framework,
            "framework_version": self.framework_version,
            "graddiag_version": __version__,
            "parameters": self.param_names,
            **s.meta(),
            **s.run_meta,
        }
        self.core = MonitorCore(
            info,
            s.logdir,
            s.detectors,
            history=s.history,
            flush_secs=s.flush_secs,
            run_meta=meta,
            close_at_exit=False,
        )
        if not self.background or s.flush_secs == 0:  # flush_secs=0: everything in this thread
            self.worker = None
        elif self.core.sink is not None:
            self.worker = self.core.sink.writer.worker
        else:
            self.worker, self._own_worker = Worker("graddiag-host"), True
        return self.core

    def defer(self, job, *args, **kwargs) -> int:
        """Run `job(*args, **kwargs)` on the worker, after the host work queued before it (in
        the caller's thread when there is no worker). Returns a ticket for `wait`."""
        if self.worker is None:
            job(*args, **kwargs)
            return 0
        return self.worker.submit(job, *args, **kwargs)

    def wait(self, ticket: int | None = None) -> None:
        """Wait until the deferred host work (up to `ticket`) has run."""
        if self.worker is not None and self.worker.pending:
            self.worker.wait(ticket)

    def ingest_later(
        self,
        steps: Sequence[tuple[int, np.ndarray, dict[str, Any]]],
        also: Sequence[Finding] = (),
    ) -> Deferred:
        """`ingest` each `(step, row, keywords)` on the worker; the training thread goes on.
        `also`: findings the adapter made for these steps itself, recorded after theirs.

        Returns a `Deferred` whose `result()` waits for them and gives their findings. A
        `NonFiniteGradientError` (policy "raise") is kept in `self.error`, not raised: a step the
        adapter decided non-finite on the device is ingested with `ingest` in its own thread.
        """
        out = Deferred(self)

        def job() -> None:
            rest = list(steps)
            while rest:  # under "raise", each non-finite step ends a block
                new, done, error = self._ingest_block(rest)
                out.findings += new
                if error is not None and error.finding not in new:
                    out.findings.append(error.finding)
                rest = rest[done:]
            for f in also:
                self.core.add_finding(f)
            out.findings += also
            out.stats = self.core.history[-1] if self.core.history else None

        out.ticket = self.defer(job)
        return out

    def close(self) -> list[Finding]:
        """Run the deferred host work, then the end-of-run findings; close the log."""
        self.wait()
        new = self.core.close() if self.core is not None else []
        if self._own_worker and self.worker is not None:
            self.worker.close()
        return new

    @property
    def started(self) -> bool:
        return self.core is not None

    # ------------------------------------------------------------------ steps
    def ingest(
        self,
        step: int,
        row: np.ndarray,
        *,
        detail: np.ndarray | None = None,
        hist: np.ndarray | None = None,
        update: np.ndarray | None = None,
        **known: Any,
    ) -> list[Finding]:
        """Decode, diagnose and log one step.

        Args:
            step: the optimizer step of `row`.
            row: the step's ring-buffer row (`RowLayout`).
            detail: this step's detail rows (`DETAIL_FIELDS` x parameters; `nan`/`inf` rows may be
                NaN when the adapter did not count them), or None.
            hist: this step's histogram rows (layers x `HIST_WIDTH`), or None.
            update: this step's update rows (2 x parameters: sum of squares of the update, of the
                weights before it), or None.
            known: host-known `StepStats` fields (and `has`), see `RowLayout.decode`.

        Returns:
            The step's new findings. Under `nonfinite="raise"` a non-finite step raises
            `NonFiniteGradientError` (after it was logged).
        """
        return self.ingest_block(
            [(step, row, {"detail": detail, "hist": hist, "update": update, **known})]
        )

    def ingest_block(
        self, steps: Sequence[tuple[int, np.ndarray, dict[str, Any]]]
    ) -> list[Finding]:
        """`ingest` each `(step, row, keywords)` of consecutive steps, vectorised over them
        (decoding, detectors): what a log step reads back. The same results as `ingest` step by
        step: under `nonfinite="raise"` the first non-finite step raises after it was logged,
        and the steps after it are not ingested."""
        new, _, error = self._ingest_block(steps)
        if error is not None:
            raise error
        return new

    def _ingest_block(
        self, steps: Sequence[tuple[int, np.ndarray, dict[str, Any]]]
    ) -> tuple[list[Finding], int, NonFiniteGradientError | None]:
        """`ingest_block` without raising: the findings, how many steps were ingested, and the
        error a non-finite step makes under `nonfinite="raise"` (also kept in `self.error`)."""
        if not steps:
            return [], 0, None
        core = self.core
        known = [{k: v for k, v in kw.items() if k not in _ROW_EXTRAS} for _, _, kw in steps]
        bad = [(step, np.shape(r)) for step, r, _ in steps if np.shape(r) != (self.layout.width,)]
        if bad:
            raise ValueError(
                f"Expected each step's row in `steps` to have shape ({self.layout.width},), got "
                f"step {bad[0][0]}: {bad[0][1]}"
            )
        if len(steps) == 1:
            rows = np.asarray(steps[0][1])[None]
        else:
            rows = np.array([r for _, r, _ in steps])  # shapes checked above
        block, has, sumsq = self.layout.decode_block(
            [step for step, _, _ in steps], rows, self.layer_of, known
        )
        for stats, (_, _, kw), h in zip(block, steps, has, strict=True):
            if kw.get("detail") is not None:
                self._attach_detail(stats, np.asarray(kw["detail"], dtype=np.float64), h)
            if kw.get("update") is not None:
                stats.update_ratio = self.update_ratio(kw["update"])
        raising = self.settings.nonfinite == "raise"
        if raising:  # the steps after the first non-finite one are not ingested
            first = next((k for k, st in enumerate(block) if st.any_nonfinite), len(block) - 1)
            block = block[: first + 1]
        self.last_param_norms = dict(
            zip(self.param_names, np.sqrt(sumsq[len(block) - 1]).tolist(), strict=True)
        )
        per_step = core.process_block(block)
        for stats, (_, _, kw) in zip(block, steps, strict=False):
            if kw.get("hist") is not None:
                hist = np.asarray(kw["hist"], dtype=np.float64)
                core.write_histograms(stats.step, hist, stats.has_grad)
        new = [f for found in per_step for f in found]
        if not (raising and block[-1].any_nonfinite):
            return new, len(block), None
        bad = [f for f in per_step[-1] if f.kind == "nonfinite"]
        self.error = NonFiniteGradientError(bad[0] if bad else self._nonfinite_finding(block[-1]))
        return new, len(block), self.error

    def _nonfinite_finding(self, stats: StepStats) -> Finding:
        """A finding for a non-finite step the (edge-triggered) detectors did not report anew."""
        layers = self.core.info.layers
        order = self.core.info.backward_order or layers
        bad = [n for n in order if n in layers and stats.nonfinite[layers.index(n)] > 0]
        where = f" in layer {bad[0]!r}" if bad else ""
        return Finding(
            stats.step,
            bad[0] if bad else None,
            "nonfinite",
            "error",
            None,
            f"NaN/Inf gradient{where} (again).",
            "",
        )

    def _attach_detail(self, stats: StepStats, detail: np.ndarray, has: np.ndarray) -> None:
        gmax, nnz, nan, inf, psq = detail
        counted = not (np.isnan(nan).any() or np.isnan(inf).any())
        d = aggregate_detail(
            self.layer_of,
            self.n_layers,
            has,
            self.numel,
            gmax,
            nnz,
            psq,
            nan if counted else None,
            inf if counted else None,
        )
        if counted and (d["nan_count"].any() or d["inf_count"].any()):
            stats.nonfinite = np.maximum(d["nan_count"] + d["inf_count"], stats.nonfinite)
        else:
            d.pop("nan_count", None)
            d.pop("inf_count", None)
        for k, v in d.items():
            setattr(stats, k, v)

    def trainable(self, flags: Sequence[bool]) -> np.ndarray:
        """Per layer, whether any of its parameters still trains, from per-parameter `flags`."""
        w = np.asarray(flags, dtype=np.float64)
        return np.bincount(self.layer_of, weights=w, minlength=self.n_layers) > 0

    def update_ratio(self, update: np.ndarray) -> np.ndarray:
        """Per-layer ||w_after - w_before|| / ||w_before|| from per-parameter sums of squares."""
        delta, weights = np.asarray(update, dtype=np.float64)
        return aggregate_update_ratio(delta, weights, self.layer_of, self.n_layers)

    def record_update(self, step: int, update: np.ndarray) -> None:
        """Log the update/weight ratio of a step already ingested (known only after its update)."""
        if self.core is not None:
            self.core.record_update_ratio(step, self.update_ratio(update))


class Deferred:
    """The findings (and last `StepStats`) of host work queued on the worker; `result()` waits."""

    def __init__(self, host: HostPath) -> None:
        self._host = host
        self.ticket: int | None = None
        self.findings: list[Finding] = []
        self.stats: StepStats | None = None

    def result(self) -> list[Finding]:
        self._host.wait(self.ticket)
        return self.findings


class MonitorAPI:
    """The public surface every adapter shares. Subclasses set `self._settings` in their
    constructor and `self._host` (a `HostPath`) once they know the model's parameters, and
    implement `flush()` and `close()`."""

    _settings: Settings
    _host: HostPath | None = None

    @property
    def settings(self) -> Settings:
        return self._settings

    def _settled(self) -> HostPath | None:
        """The host path once its deferred work has run (results read after it are complete)."""
        self._before_results()
        if self._host is not None:
            self._host.wait()
        return self._host

    def _before_results(self) -> None:
        """Adapters that delay reads land them here (results are read right after)."""

    @property
    def core(self) -> MonitorCore | None:
        host = self._settled()
        return None if host is None else host.core

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far."""
        return [] if self.core is None else self.core.findings

    @property
    def history(self) -> list[StepStats]:
        """Recent `StepStats`, oldest first."""
        return [] if self.core is None else list(self.core.history)

    @property
    def logdir(self) -> str | None:
        logdir = self._settings.logdir
        return None if logdir is None else os.fspath(logdir)

    @property
    def every(self) -> int:
        return self._settings.every

    @property
    def nonfinite(self) -> str:
        return self._settings.nonfinite

    @property
    def chain(self):
        return self._settings.clip

    @property
    def detail_every(self) -> int:
        return self._settings.detail_every

    @property
    def hist_every(self) -> int:
        return self._settings.hist_every

    @property
    def error(self) -> NonFiniteGradientError | None:
        """The last `NonFiniteGradientError` raised under `nonfinite="raise"`, if any."""
        host = self._settled()
        return None if host is None else host.error

    @property
    def last_variable_norms(self) -> dict[str, float]:
        """Gradient norm of each parameter at the last step read back."""
        host = self._settled()
        return {} if host is None else host.last_param_norms

    def summary(self, min_severity: str = "info") -> str:
        """A plain-text summary of the findings so far, grouped by kind (worst first)."""
        return "graddiag: no findings." if self.core is None else self.core.summary(min_severity)

    def flush(self) -> list[Finding]:  # pragma: no cover - every adapter overrides
        raise NotImplementedError

    def close(self) -> list[Finding]:  # pragma: no cover - every adapter overrides
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the user's exception comes first: never replace it with ours
            self.close()
        except Exception as e:  # noqa: BLE001 - reported, then the user's exception goes on
            warnings.warn(
                f"graddiag: closing the monitor after an exception failed: {e!r}", stacklevel=2
            )


def imprecise(
    sumsq: np.ndarray, has: np.ndarray, exact: np.ndarray, true_zero: np.ndarray
) -> np.ndarray:
    """Parameters whose float32 sum of squares may be wrong: +inf (finite elements above ~1e19
    overflow) or below `TINY_SUMSQ` (elements below ~1e-19 underflow; exactly 0 counts unless the
    parameter is known to be truly zero). Entries measured exactly (`exact`) or without a
    gradient are not. Every adapter asks this of its float32 measurements."""
    tiny = ((sumsq > 0) & (sumsq < TINY_SUMSQ)) | ((sumsq == 0) & ~true_zero)
    return has & ~exact & (np.isposinf(sumsq) | tiny)


class ReusedLogdirWarning(UserWarning):
    """A new run from step 0 writes into a directory that already holds a graddiag run."""


def _warn_if_reused(logdir: str) -> None:
    """Warn when `logdir` already holds graddiag event files: TensorBoard would draw this run over
    the earlier one, and `graddiag analyze` reads it as a restart of the same model (its steps
    supersede the earlier ones) or, with other layers, as a run of its own."""
    try:
        names = [n for n in os.listdir(logdir) if "tfevents" in n and tags.EVENT_SUFFIX in n]
    except OSError:
        return
    if names:
        warnings.warn(
            f"graddiag: logdir {logdir!r} already holds a graddiag run ({len(names)} event "
            "file(s)) and this one starts at step 0: TensorBoard draws both on the same charts, "
            "and `graddiag analyze` reads this one as a restart (its steps supersede the earlier "
            "ones) unless it logs other layers. Use a new logdir per run, or pass `start_step=` "
            "to continue a run.",
            ReusedLogdirWarning,
            stacklevel=4,
        )
