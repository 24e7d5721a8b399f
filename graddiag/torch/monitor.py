"""`graddiag.torch.GradientMonitor`: where to hook a PyTorch training loop; the device half of a
monitor (the host half is `graddiag.host`)."""

from __future__ import annotations

import atexit
import functools
import os
import types
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from graddiag.clip import Gradients, clip_gradients
from graddiag.detectors import Detector
from graddiag.findings import Finding, name_list
from graddiag.host import TINY_SUMSQ, HostPath, MonitorAPI, imprecise
from graddiag.monitor import StepReport, close_at_exit_hook
from graddiag.settings import Settings
from graddiag.stats import ModelInfo
from graddiag.torch._distributed import attach
from graddiag.torch._measure import (
    Plan,
    detail_rows,
    exact_sum_squares,
    f32,
    histogram_rows,
    measured,
    sum_squares,
)
from graddiag.torch._model import layers_of, lazy_parameters, new_trainable, unwrap
from graddiag.torch._ops import TorchOps

#: an exact sum of squares this large at a log step marks earlier +inf rows as overflows
OVERFLOW_HINT = 1e30
#: what an overflowed float32 sum of squares is recorded as: a lower bound (norm >= 1.8e19)
F32_MAX_SUMSQ = float(np.finfo(np.float32).max)


class GradientMonitor(MonitorAPI):
    """Watches a PyTorch model's gradients: per-layer statistics, clipping, findings, TensorBoard.

    Args:
        model: the `torch.nn.Module` to watch.
        optimizer: an optimizer or a list of them (e.g. `SparseAdam` for an embedding and `Adam`
            for the rest, or a GAN's two): each one's `step()` is hooked so no call to
            `monitor.step()` is needed, and each hooked step is one monitored step;
            "not in the optimizer" findings mean "in none of them"
            (statistics are taken just before the update; `nonfinite="skip"` skips the update).
        logdir: TensorBoard run directory, or None to keep results in memory only.
        every: host reads of the statistics happen every `every` steps (the log step); all steps are
            still measured, diagnosed and written.
        clip: a clipping policy from `graddiag.clip`, a list of them (applied in order), a number
            (global-norm clipping to that value), or None.
        nonfinite: "warn" (report at the log step; no extra sync), "skip" (check every step — one
            host sync per step — and skip the optimizer step when a gradient is NaN/Inf; on CUDA a
            fused optimizer is handed the flag as `found_inf` and skips it itself, without a
            sync), or "raise" (same check; raise `NonFiniteGradientError` naming the step and the
            layer). Latency per policy: docs/guarantees.md.
        detectors: detector settings (see `graddiag.detectors.build_detectors`).
        detail_every: compute max |g|, zero fraction and parameter norm every this many steps (a
            host read at that step), and the update/weight ratio when the optimizer is hooked
            (it needs the weights before and after the step); 0 disables.
        hist_every: write gradient histograms every this many steps (0 disables).
        scaler: the `torch.amp.GradScaler` in use, if any (requires `optimizer`): its `step()` is
            hooked, the gradients are unscaled (`scaler.unscale_`, which `scaler.step` would do
            anyway) before they are measured and clipped, and overflow steps are expected.
        trace_nonfinite: find the module where a NaN/Inf is born in the backward pass (full backward
            hooks on every module and one host sync per step; opt-in).
        history: how many recent `StepStats` to keep in `monitor.history`.
        flush_secs: event-file flush interval; `close()` always flushes.
        start_step: the number of the first step (resuming a run: the optimizer steps already
            taken), so the logs continue the run's step count.
        per_rank_logs: under `torch.distributed` (DDP, FSDP2) rank 0 alone writes to `logdir`;
            True makes rank k write its own logs into `logdir/rank<k>` too
            (see docs/distributed.md).

    Raises:
        TypeError: if `model` is not an `nn.Module` or `optimizer` not a `torch.optim.Optimizer`.
        ValueError: for bad settings (the message names the argument and the value), a model with
            no trainable parameters, or one with lazy parameters not materialized yet (run one
            forward pass first).
        OSError: if `logdir` cannot be written.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with GradientMonitor(model, opt) as mon:
        ...     model(torch.randn(8, 4)).square().mean().backward()
        ...     opt.step()
        >>> mon.step_count
        1
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        logdir: str | os.PathLike | None = None,
        *,
        every: int = 10,
        clip: Any = None,
        nonfinite: str = "warn",
        detectors: Mapping[str, Any] | Iterable[Detector] | None = None,
        detail_every: int = 100,
        hist_every: int = 100,
        scaler: Any = None,
        trace_nonfinite: bool = False,
        history: int = 1000,
        flush_secs: float = 2.0,
        start_step: int = 0,
        per_rank_logs: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}: {model!r:.80}"
            )
        optimizers = [] if optimizer is None else _optimizers(optimizer)
        if scaler is not None and optimizer is None:
            raise ValueError(
                "`scaler` needs `optimizer` (to know whether gradients are unscaled yet)"
            )
        # distributed (graddiag/torch/_distributed.py): which rank writes; FSDP2 measures shards
        self._dist = attach(model, per_rank_logs)
        settings = Settings(
            logdir=logdir if self._dist is None else self._dist.logdir(logdir),
            every=every,
            clip=clip,
            nonfinite=nonfinite,
            detectors=detectors,
            detail_every=detail_every,
            hist_every=hist_every,
            history=history,
            flush_secs=flush_secs,
            trace_nonfinite=trace_nonfinite,
            start_step=start_step,
            per_rank_logs=per_rank_logs,
            run_meta={} if self._dist is None else self._dist.meta(),
        )

        base = unwrap(model)
        lazy = lazy_parameters(base)
        if lazy:
            names = name_list([f"{name} ({cls})" for name, cls in lazy], shown=5)
            raise ValueError(
                f"`model` {type(model).__name__} has uninitialized (lazy) parameters: "
                f"{names}. Run one forward pass first (e.g. `model(example_batch)`), "
                "so their shapes are known, then create the GradientMonitor (and the optimizer)."
            )
        layers, params, pnames, layer_of, frozen, shared = layers_of(base)
        if not params:
            raise ValueError(
                f"`model` {type(model).__name__} has no trainable parameters (requires_grad=True)"
            )
        self.model = model
        self.optimizer = optimizer
        self.optimizers = optimizers
        self.scaler = scaler
        self.layers = layers
        self.params = params
        self.param_names = pnames
        self.layer_of = layer_of
        self._n_layers = len(layers)
        self._frozen, self._shared = frozen, shared
        self._numel = np.asarray([p.numel() for p in params], dtype=np.float64)
        self._complex = [i for i, p in enumerate(params) if p.is_complex()]
        self._settings = settings
        self._host = HostPath(
            settings, layer_of, pnames, self._numel, "torch", torch.__version__.split("+")[0]
        )
        self._layout = self._host.layout
        self.device: torch.device | None = None  # fixed at the first step (the model may move)
        self._atexit = close_at_exit_hook(self)  # drains the ring buffer into the log at exit
        self.step_count = settings.start_step
        self.closed = False
        self._plans: dict[tuple, Plan] = {}
        self._clip_views: dict[Plan, tuple] = {}  # per plan: order, parameters, TorchOps
        self._trainable: tuple = ((), None)  # requires_grad flags -> trainable layers
        self._exact: frozenset[int] = frozenset()  # measured in float64 (see _exactness)
        self._true_zero: set[int] = set()  # an exact measurement found them exactly zero
        self._current: tuple | None = None
        self._pending: list[tuple[int, dict[str, Any]]] = []  # steps in the ring, host facts
        self._no_grad = np.zeros(len(params), dtype=bool)
        self._param_ids = {id(p) for p in params}
        self.unmonitored: list[str] = []  # parameters that began to train after construction
        self._frozen_params = [p for p in base.parameters() if not p.requires_grad]
        self._registry = _RegistrationFlag()  # set when any module registers a parameter/module
        self._probes: dict[int, _Probe] = {}  # accumulation probe per optimizer (0: manual)
        self._snapshot: tuple[int, list[torch.Tensor]] | None = None
        self._handles: list[Any] = []
        self._order_seen: list[int] = []
        self._order_handles = [
            p.register_post_accumulate_grad_hook(self._make_order_hook(i))
            for i, p in enumerate(params)
        ]
        self._trace: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._ftrace: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        if settings.trace_nonfinite:
            # torch warns when a hooked module's inputs need no gradient (the first layer): that
            # is expected of hooks on every module, and says nothing about the user's model
            warnings.filterwarnings(
                "ignore",
                "Full backward hook is firing when gradients are computed with respect "
                "to module outputs",
                UserWarning,
            )
            for name, m in base.named_modules():
                label = name or type(base).__name__
                self._handles.append(m.register_full_backward_hook(self._make_trace_hook(label)))
                self._handles.append(m.register_forward_hook(self._make_forward_hook(label)))
        self._restore: list[tuple[Any, str, Any]] = []
        for k, opt in enumerate(optimizers):
            self._wrap(opt, "step", functools.partial(self._hooked_optimizer_step, k))
        if scaler is not None:
            self._wrap(scaler, "step", self._hooked_scaler_step)
        self._in_scaler_step = False
        # distributed: histograms of shards are collectives, taken on every rank alike
        sharded = self._dist is not None and self._dist.sharded
        self._hist_every = hist_every if sharded and logdir is not None else settings.hist_every
        if self._dist is not None:
            self._dist.install(model)
        self._loss_next: torch.Tensor | float | None = None  # log_loss() for the next step
        self._delay_reads = False  # fixed at the first step: `_reads_delayed(device)`
        self._inflight: tuple | None = None  # a log step's rows on their way to the host
        self._found_inf: torch.Tensor | None = None  # the step's device skip flag (see _on_step)

    # ----------------------------------------------------------------------------- hooks
    def _wrap(self, obj: Any, attr: str, make) -> None:
        """Replace `obj.attr` by a *bound method* around it: LR schedulers created later wrap
        `optimizer.step` again and require a bound method (`step.__func__`)."""
        orig = getattr(obj, attr)
        had_instance_attr = attr in vars(obj)
        inner = make(orig)

        def method(_self, *args, **kwargs):
            return inner(*args, **kwargs)

        wrapper = types.MethodType(functools.wraps(orig)(method), obj)
        setattr(obj, attr, wrapper)
        self._restore.append((obj, attr, (had_instance_attr, orig, wrapper)))

    def _hooked_optimizer_step(self, k: int, orig):
        def step(*args, **kwargs):
            if self.closed or self._in_scaler_step:
                return orig(*args, **kwargs)
            closure = kwargs.pop("closure", args[0] if args else None)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            report = self._on_step(loss, opt=k)
            if report.skipped:
                return loss
            found, self._found_inf = self._found_inf, None
            if found is not None:  # a fused optimizer skips the update itself when found_inf
                self.optimizers[k].found_inf = found
            try:
                out = orig() if closure is None else orig(lambda: loss)
            finally:
                if found is not None:
                    del self.optimizers[k].found_inf
            self._after_update()
            return out

        return step

    def _hooked_scaler_step(self, orig):
        def step(optimizer, *args, **kwargs):
            k = next((i for i, o in enumerate(self.optimizers) if o is optimizer), None)
            if self.closed or k is None:
                return orig(optimizer, *args, **kwargs)
            if self._host.core is None:
                self._start()
            probe = self._probe(k)
            reset = probe.reset()  # before unscale_ bumps the gradients' versions
            modified = probe.modified()
            try:  # measure and clip true gradients (scaled sums of squares can overflow float32)
                self.scaler.unscale_(optimizer)
            except RuntimeError as e:  # the user unscaled already (e.g. to clip themselves)
                if "already been called" not in str(e):
                    raise
                bumps = probe.bumps()  # beyond what their unscale_ did, the change is their own
                modified = None if bumps is None else bumps > _unscale_bumps(self.device)
            report = self._on_step(None, reset, opt=k, modified=modified)
            if report.skipped:
                return None
            self._in_scaler_step = True
            try:
                out = orig(optimizer, *args, **kwargs)
            finally:
                self._in_scaler_step = False
            self._after_update()
            return out

        return step

    def _make_order_hook(self, i: int):
        def hook(_p):
            self._order_seen.append(i)

        return hook

    def _make_forward_hook(self, name: str):
        def hook(_module, inputs, output):
            outs = _float_tensors(output)
            if outs:
                ins = _float_tensors(inputs)
                fi = (
                    _all_finite(ins)
                    if ins
                    else torch.ones((), dtype=torch.bool, device=outs[0].device)
                )
                self._ftrace.append((name, fi, _all_finite(outs)))

        return hook

    def _make_trace_hook(self, name: str):
        def hook(_module, grad_input, grad_output):
            outs = [g for g in grad_output if g is not None]
            ins = [g for g in grad_input if g is not None]
            if outs and ins:
                fo = torch.stack([torch.isfinite(g).all() for g in outs]).all()
                fi = torch.stack([torch.isfinite(g).all() for g in ins]).all()
                self._trace.append((name, fo, fi))

        return hook

    # ----------------------------------------------------------------------------- public API
    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Give the loss of the step about to be taken when the optimizer's `step()` is hooked
        (it takes no loss): call after `backward()`, before `optimizer.step()`. It is logged as
        `graddiag/global/loss` with that step and drives the divergence detector; no host sync
        (a tensor is copied on the device). Ignored if no step follows before the next call.

        Args:
            loss: a scalar tensor or a number.
        """
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"Expected `loss` to be a scalar, got a tensor of shape {tuple(loss.shape)}"
                )
        elif not isinstance(loss, int | float) or isinstance(loss, bool):
            raise TypeError(
                f"Expected `loss` to be a scalar tensor or a number, got {type(loss).__name__}: "
                f"{loss!r:.80}"
            )
        self._loss_next = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)

    def step(self, loss: torch.Tensor | float | None = None) -> StepReport:
        """Measure (and clip) the current gradients: call after `backward()`, before `optimizer.step()`.

        Not needed when the optimizer was passed to the constructor (its step is hooked).

        Args:
            loss: optional loss of this step, logged as `graddiag/global/loss`.

        Returns:
            The step's `StepReport`; when `report.skipped` (non-finite policy "skip"), do not call
            `optimizer.step()` for this step.
        """
        if self.closed:
            raise RuntimeError("GradientMonitor is closed; create a new one to keep monitoring")
        if self.optimizers and not self._in_scaler_step:
            raise RuntimeError(
                "GradientMonitor was given the optimizer and hooks its step(); "
                "do not also call monitor.step()"
            )
        report = self._on_step(loss)
        self._after_update()
        return report

    @property
    def trace_nonfinite(self) -> bool:
        return self.settings.trace_nonfinite

    def flush(self) -> list[Finding]:
        """Read pending statistics now (one host sync), diagnose and log them."""
        return self._drain()

    def _before_results(self) -> None:
        """Land a log step's rows still on their way to the host (delayed reads)."""
        if self._inflight is not None:
            self._land()

    def continue_at(self, step: int) -> list[Finding]:
        """Number the next step `step` (steps were taken without the monitor, or a trainer's own
        count says so); pending steps are logged first. Returns their findings."""
        new = self._drain()
        self.step_count = int(step)
        return new

    def close(self) -> list[Finding]:
        """Process pending steps, write end-of-run findings, close the log, remove hooks."""
        if self.closed:
            return []
        new = self._drain()
        self.closed = True
        atexit.unregister(self._atexit)
        for h in self._order_handles + self._handles:
            h.remove()
        for probe in self._probes.values():
            probe.remove()
        self._registry.remove()
        if self._dist is not None:
            self._dist.close()
        for obj, attr, (had, orig, wrapper) in reversed(self._restore):
            if getattr(obj, attr, None) is wrapper:
                if had:
                    setattr(obj, attr, orig)
                else:
                    delattr(obj, attr)
        new += self._host.close()
        return new

    # ----------------------------------------------------------------------------- per step
    def _start(self) -> None:
        """First step: fix the device, the backward order, the accumulation probe and the core."""
        self.device = self.params[0].device
        self._delay_reads = _reads_delayed(self.device)
        self._ops = TorchOps(self.device)
        self._clip_states = self.chain.init(self._n_layers, self._ops) if self.chain else None
        # float64 rows: an exactly measured sum of squares of any finite float32 gradient fits
        blank = torch.as_tensor(self._layout.blank(), dtype=torch.float64, device=self.device)
        self._buf = blank.repeat(self.every, 1)
        # per row, views of the cells a step writes (made once: an index is a dispatch per step)
        cells = ("skipped", "clip_coef", "loss", "has_loss")
        col = self._layout.col
        self._rows = list(self._buf)
        self._cells = [{c: r[col[c]] for c in cells} for r in self._rows]
        # where delayed reads land: page-locked on CUDA, so the copy runs without blocking
        self._pinned = torch.empty(
            self._buf.shape, dtype=self._buf.dtype, pin_memory=self.device.type == "cuda"
        )
        for h in self._order_handles:
            h.remove()
        self._order_handles = []
        order: list[str] = []
        for i in self._order_seen:
            name = self.layers[self.layer_of[i]]
            if name not in order:
                order.append(name)
        held = self._held()
        unoptimized = []
        if held is not None:
            unoptimized = [
                n for n, p in zip(self.param_names, self.params, strict=True) if id(p) not in held
            ]
        info = ModelInfo(
            layers=tuple(self.layers),
            param_counts=tuple(
                int(np.sum(self._numel[self.layer_of == i])) for i in range(self._n_layers)
            ),
            backward_order=tuple(order) if order else None,
            frozen=tuple(self._frozen),
            unoptimized=tuple(unoptimized),
            shared=tuple(self._shared),
        )
        self._host.start(info, amp=self.scaler is not None)
        if self._dist is not None:
            self._dist.start(self.params, self.every, self.device)

    def _skips_on_device(self, k: int) -> bool:
        """Whether optimizer `k` skips a non-finite step itself (no host sync): policy "skip",
        reads delayed (CUDA), no loss scaler (it passes its own flag), a fused optimizer (it
        takes `found_inf`, like under `GradScaler`), and no clipping state a NaN would enter."""
        if self.nonfinite != "skip" or self.trace_nonfinite or not self._delay_reads:
            return False
        if self.scaler is not None or k >= len(self.optimizers):
            return False
        opt = self.optimizers[k]
        if not getattr(opt, "_step_supports_amp_scaling", False):
            return False
        if not all(g.get("fused") for g in opt.param_groups):
            return False
        return self._clip_states is None or not any(self._clip_states)

    def _held(self) -> set[int] | None:
        """ids of the parameters some optimizer holds (None without optimizers)."""
        if not self.optimizers:
            return None
        return {id(p) for o in self.optimizers for g in o.param_groups for p in g["params"]}

    def _probe(self, k: int) -> _Probe:
        """Optimizer `k`'s accumulation probe: the first parameter in backward order that it holds
        and that still trains; chosen anew when that one freezes."""
        probe = self._probes.get(k)
        if probe is not None and probe.param is not None and probe.param.requires_grad:
            return probe
        if probe is not None:
            probe.remove()
        held = None
        if self.optimizers:
            held = {id(p) for g in self.optimizers[k].param_groups for p in g["params"]}
        # in backward order where the first backward pass showed it; else any that has a gradient
        order = self._order_seen + [i for i, p in enumerate(self.params) if p.grad is not None]
        candidates = [
            self.params[i]
            for i in order
            if self.params[i].requires_grad and (held is None or id(self.params[i]) in held)
        ]
        self._probes[k] = probe = _Probe(
            candidates[0] if candidates else None, fresh=probe is None or probe.param is None
        )
        return probe

    def _on_step(
        self,
        loss,
        reset: bool | None | str = "observe",
        opt: int = 0,
        modified: bool | None | str = "observe",
    ) -> StepReport:
        given, self._loss_next = self._loss_next, None  # from log_loss(), if any
        loss = given if loss is None else loss
        if self._host.core is None:
            self._start()
        if self._inflight is not None:  # the last log step's rows have arrived by now
            self._land()
        step = self.step_count
        self.step_count += 1
        params = self.params
        grads = [p.grad for p in params]
        sharded = self._dist is not None and self._dist.sharded
        if sharded:  # FSDP2: measure (and clip) the local shards
            grads = self._dist.local(grads)
        for i in self._complex:  # measured as real (re, im) pairs
            grads[i] = measured(grads[i])
        has = tuple([g is not None for g in grads])
        key = (has, self._exact)
        plan = self._plans.get(key)
        if plan is None and any(has):
            idx = [i for i, k in enumerate(has) if k]
            plan = self._plans[key] = Plan(idx, grads, self.layer_of, self.device, self._exact)
        present = plan.present if plan is not None else []
        probe = self._probe(opt)
        if reset == "observe":
            reset = probe.reset()
        if modified == "observe":
            modified = probe.modified()
        if self._dist is not None and not sharded:  # DDP writes the averaged gradients in place
            modified = None
        calls = probe.take_calls()
        report = StepReport(step=step)
        row = step % self.every
        log_step = row == self.every - 1
        origin = origin_pass = None
        detail = bool(self.detail_every and (step + 1) % self.detail_every == 0)
        # detail statistics and histograms describe the gradients before clipping, like grad_norm
        rows_of = self._dist.detail if sharded else detail_rows
        extra = rows_of(grads, present, self.params, self._numel) if detail and present else None
        if self._hist_every and step % self._hist_every == 0 and present:  # 0 without a logdir
            if sharded:
                hist = self._dist.histograms(grads, self.layer_of, self._n_layers, self.device)
            else:
                hist = histogram_rows(grads, self.layer_of, self._n_layers, self.device)
            if hist is not None:
                self._host.defer(self._host.core.write_histograms, step, *hist)
        found = None
        if not present:
            sumsq = coef = layer_coef = None
        else:
            sumsq = sum_squares(grads, plan, self.device)
            if sharded:
                sumsq = self._dist.sum_over_shards(sumsq, plan.order)
            if self._skips_on_device(opt):  # no host sync: the fused optimizer reads the flag
                found = (~torch.isfinite(sumsq.sum())).float()
                self._found_inf = found
            elif self.nonfinite != "warn" or self.trace_nonfinite:
                bad = not bool(torch.isfinite(sumsq.sum()))  # the one sync these modes pay for
                if bad:  # decided by the elements: a float32 overflow of finite values is not
                    sumsq = self._exact_where_nonfinite(grads, plan, sumsq)
                    bad = not bool(torch.isfinite(sumsq.sum()))
                if bad and self.trace_nonfinite:
                    origin, origin_pass = self._find_origin()
                if bad and self.nonfinite != "warn":
                    report.skipped = True
            self._trace.clear()
            self._ftrace.clear()
            coef = layer_coef = None
            if self.chain is not None and not report.skipped:
                coef, layer_coef = self._clip(grads, plan, f32(sumsq))
        # the device row (graddiag.host.RowLayout) gets what only the device knows; the rest of
        # the step's facts stay on the host until the row is read back
        buf_row, cells = self._rows[row], self._cells[row]
        known: dict[str, Any] = {
            "has": plan.mask if plan is not None else self._no_grad,
            "grad_reset": reset,
            "backward_calls": calls,
            "skipped": report.skipped,
            "nonfinite_origin": origin,
            "nonfinite_pass": origin_pass,
            "grads_modified": modified,
        }
        if present and found is not None:  # skipped or not: known when the row is read
            del known["skipped"]
            cells["skipped"].copy_(found)
        if sumsq is not None:
            buf_row.index_copy_(0, plan.order_t, sumsq.double())
        if coef is not None:
            cells["clip_coef"].copy_(coef)
        else:
            known["clip_coef"] = known["layer_clip_coef"] = None
        if layer_coef is not None:
            buf_row[self._layout.layer_coef].copy_(layer_coef)
        if isinstance(loss, torch.Tensor):
            cells["loss"].copy_(loss.detach().reshape(()))
            cells["has_loss"].fill_(1.0)
        else:
            known["loss"] = None if loss is None else float(loss)
        if extra is not None:
            known["detail"] = extra
        known["exact"] = plan.exact if plan is not None else ()
        self._pending.append((step, known))
        if self._dist is not None:
            self._dist.record_step(row, self.device)
            if step == self.settings.start_step and not sharded:
                self._unused(step, plan)
        self._current = (step, grads, plan)  # the step whose gradients are still there
        probe.record()
        if detail and self.optimizers and not report.skipped:
            # the update/weight ratio needs the weights after the update: read back then
            self._snapshot = (step, [p.detach().clone() for p in params])
        else:
            if report.skipped:  # decided on the device: diagnosed (and raised) right here
                report.findings = self._drain()
                report.logged = True
                report.stats = self._host.core.history[-1] if self._host.core.history else None
            elif log_step or detail:  # diagnosed in the background: the report waits when read
                report.deferred = self._drain(later=True)
                report.logged = True
            self._current = None  # never keep a step's gradients alive past it
        return report

    def _after_update(self) -> None:
        """After the optimizer step: resolve the update/weight ratio of a detail step."""
        if self._snapshot is None:
            return
        step, old = self._snapshot
        self._snapshot = None
        new = [p.detach() for p in self.params]
        sharded = self._dist is not None and self._dist.sharded
        if sharded:  # FSDP2: local shards
            new, old = self._dist.local(new), self._dist.local(old)
        both = (
            torch.stack(
                torch._foreach_norm(torch._foreach_sub(new, old)) + torch._foreach_norm(old)
            )
            .double()
            .square()
        )
        if sharded:
            idx = np.arange(len(new))
            both = torch.cat(
                [self._dist.sum_over_shards(half, idx) for half in both.view(2, -1).unbind()]
            )
        update = both.numpy(force=True).reshape(2, -1)
        if self._pending and self._pending[-1][0] == step:
            self._pending[-1][1]["update"] = update
            self._drain(later=True)
        else:
            self._host.defer(self._host.record_update, step, update)
        self._current = None  # never keep a step's gradients alive past it

    def _find_origin(self) -> tuple[str | None, str | None]:
        """Where a NaN/Inf was born: the first module (in the order modules finished their forward)
        whose inputs were finite but whose output is not — the forward pass; else the first module
        (in backward order) whose incoming gradient is finite but outgoing is not. Returns
        `(module, "forward" | "backward")`, or `(None, None)`."""
        for trace, kind in ((self._ftrace, "forward"), (self._trace, "backward")):
            if not trace:
                continue
            flags = torch.stack([torch.stack([a, b]) for _, a, b in trace]).numpy(force=True)
            for (name, _, _), (ok_in, ok_out) in zip(trace, flags, strict=True):
                if ok_in and not ok_out:
                    return name, kind
        return None, None

    def _clip(self, grads, plan: Plan, sumsq):
        """Apply the clipping chain in place through `graddiag.clip.clip_gradients`.

        Returns `(coef, layer_coef)`: the global norm after clipping / before (a device scalar),
        and per layer the norm after / before (a device vector) when the chain is per-layer.
        """
        fixed = self._clip_views.get(plan)
        if fixed is None:  # what stays the same for every step with this plan
            order = plan.order.tolist()
            names = [self.param_names[i] for i in order] if plan.has_sparse else None
            params = self.params
            if self._dist is not None and self._dist.sharded:  # FSDP2: local shards
                params = self._dist.local(params)
            ops = TorchOps(self.device, plan, names, self._dist and self._dist.reducer(plan))
            fixed = (order, [params[i] for i in order], ops)
            if self._dist is None or not self._dist.sharded:
                self._clip_views[plan] = fixed
        order, params, ops = fixed
        view = Gradients([grads[i] for i in order], params, plan.layer_t, self._n_layers, sumsq)
        out = clip_gradients(self.chain, view, self._clip_states, ops)
        self._clip_states = out.state
        return out.clip_coef, out.layer_coef

    def _drain(self, later: bool = False):
        """Fetch the pending rows of the ring buffer (one host sync) and hand them to the host
        path, which diagnoses and logs them (and raises under `nonfinite="raise"`).

        Returns their findings; with `later`, a `graddiag.host.Deferred` instead: the host work
        runs on the background worker (results read through the monitor wait for it)."""
        if self._inflight is not None:
            self._land()
        if not self._pending or self._host.core is None:
            return None if later else []
        pending, self._pending = self._pending, []
        first_row = pending[0][0] % self.every
        rows_dev = self._buf[first_row : first_row + len(pending)]
        if later and self._delay_reads:  # copy now, read at the next step: no stall
            landing = _Landing(self)
            self._inflight = (pending, _start_copy(rows_dev, self._pinned), landing)
            return landing
        return self._ingest(pending, rows_dev.numpy(force=True).copy(), later)

    def _land(self):
        """Read the rows a delayed log step copied (they have arrived, or this waits for them)
        and hand them to the host path in the background."""
        pending, (host_rows, event), landing = self._inflight
        self._inflight = None
        if event is not None:
            event.synchronize()
        landing.inner = self._ingest(pending, host_rows.numpy().copy(), later=True)

    def _ingest(self, pending: list, rows: np.ndarray, later: bool):
        """Diagnose and log the read rows of `pending` (see `_drain`)."""
        host = self._host
        self._exactness(pending, rows)
        if self._dist is not None:  # a collective on non-finite steps: every rank, same point
            self._nonfinite_ranks(pending, rows)
        flags = tuple([p.requires_grad for p in self.params])
        if self._trainable[0] != flags:  # (per layer; changes only when a layer is (un)frozen)
            self._trainable = (flags, host.trainable(flags))
        trainable = self._trainable[1]
        steps = []
        for (step, known), row in zip(pending, rows, strict=True):
            known.pop("exact", None)
            steps.append((step, row, {"trainable": trainable, **known}))
        extra = self._check_unmonitored(pending[-1][0])
        if later:
            return host.ingest_later(steps, also=extra)
        host.wait()  # the steps before these first
        new = host.ingest_block(steps)
        for f in extra:
            host.core.add_finding(f)
        return new + extra

    def _exact_where_nonfinite(self, grads, plan: Plan, sumsq: torch.Tensor) -> torch.Tensor:
        """`sumsq` (plan order) with the non-finite entries measured again in float64: finite
        unless an element is NaN/Inf (one more host read, on such steps only)."""
        bad = np.flatnonzero(~torch.isfinite(sumsq).numpy(force=True))
        if not len(bad):
            return sumsq
        out = sumsq.double().clone()
        exact = exact_sum_squares([grads[plan.order[j]] for j in bad])
        if self._dist is not None:
            exact = self._dist.sum_over_shards(exact, plan.order[bad])
        out[torch.as_tensor(bad, device=out.device)] = exact.to(out.device)
        return out

    def _exactness(self, pending: list, rows: np.ndarray) -> None:
        """Float32 sums of squares overflow for elements above ~1e19 and underflow below ~1e-19.
        The current step's gradients are still there: its suspicious entries are measured again
        in float64 now; and from now on such parameters are measured in float64 (`Plan.exact`)
        until an exact measurement shows them truly zero."""
        P = len(self.params)
        plain = not self._exact and not any(known["exact"] for _, known in pending)
        if plain and rows[:, :P].min() >= TINY_SUMSQ and rows[:, :P].max() < np.inf:
            return  # the common case: nothing measured exactly, every sum far from the limits
        zero_ok = np.zeros(P, bool)
        zero_ok[list(self._true_zero)] = True
        if plain:  # all rows at once: nothing suspicious?
            has = np.stack([known["has"] for _, known in pending])
            if not imprecise(rows[:, :P], has, np.zeros_like(has), zero_ok).any():
                return
        exact = set(self._exact)
        for (step, known), row in zip(pending, rows, strict=True):
            has = known["has"]
            v = row[:P].copy()  # as measured on the device
            was_exact = np.zeros(P, bool)
            was_exact[list(known["exact"])] = True
            sus = imprecise(v, has, was_exact, zero_ok)
            cur = self._current
            if sus.any() and cur is not None and cur[0] == step:  # still there: measure again
                idx = np.flatnonzero(sus)
                again = exact_sum_squares([cur[1][i] for i in idx])
                if self._dist is not None:
                    again = self._dist.sum_over_shards(again, idx)
                row[idx] = again.numpy(force=True)
                was_exact[idx] = True
                sus[idx] = np.isposinf(v[idx]) | (row[idx] > 0) & (row[idx] < TINY_SUMSQ)
            truly_zero = np.flatnonzero(has & was_exact & (row[:P] == 0))
            self._true_zero.update(int(i) for i in truly_zero)
            zero_ok[truly_zero] = True
            exact -= {int(i) for i in truly_zero}
            exact |= {int(i) for i in np.flatnonzero(sus)}
        self._exact = frozenset(exact)
        self._overflowed_before(pending, rows)

    def _overflowed_before(self, pending: list, rows: np.ndarray) -> None:
        """Earlier rows of a read whose float32 sum of squares is +inf, for a parameter whose
        gradient at this log step is finite and huge (an exact sum of squares above
        `OVERFLOW_HINT`): an overflow of finite values, not a NaN/Inf — an exploding run's first
        overflow falls between log steps, before the parameter is measured in float64. Recorded
        as the float32 maximum (a lower bound: norm at least 1.8e19), so they read as exploding,
        not as an error. A NaN (or +inf while the log step is ordinary) stays non-finite."""
        cur = self._current
        if cur is None or len(pending) < 2 or pending[-1][0] != cur[0]:
            return
        P = len(self.params)
        now = rows[-1][:P]
        huge = np.isfinite(now) & (now >= OVERFLOW_HINT) & pending[-1][1]["has"]
        if not huge.any():
            return
        for (_, known), row in zip(pending[:-1], rows[:-1], strict=True):
            over = huge & known["has"] & np.isposinf(row[:P])
            row[:P][over] = F32_MAX_SUMSQ

    # ----------------------------------------------------------------------------- distributed
    def _nonfinite_ranks(self, pending: list, rows: np.ndarray) -> None:
        """On steps whose reduced gradients hold NaN/Inf (the same steps on every rank), name the
        ranks whose local gradients did (one all-reduce; none on ordinary steps)."""
        P = len(self.params)
        bad = [
            k
            for k, ((_, known), row) in enumerate(zip(pending, rows, strict=True))
            if not np.isfinite(row[:P][known["has"]]).all()
        ]
        if not bad or not self._dist.origin_known:
            return
        ranks = self._dist.origin_ranks([pending[k][0] % self.every for k in bad])
        for k, r in zip(bad, ranks, strict=True):
            pending[k][1]["nonfinite_ranks"] = r

    def _unused(self, step: int, plan: Plan | None) -> None:
        """DDP, first step: name the parameters some rank got no gradient for (DDP without
        find_unused_parameters fails at the next iteration; say which before it does)."""
        has = plan.mask if plan is not None else self._no_grad
        layers = [self.layers[i] for i in self.layer_of]
        finding = self._dist.unused(step, self.param_names, has, layers)
        if finding is not None:
            warnings.warn(f"graddiag: {finding.message}", UnusedParameterWarning, stacklevel=3)
            self.core.add_finding(finding)

    def _check_unmonitored(self, step: int) -> list[Finding]:
        """Once per monitor, at a log step: parameters that train now but did not (or did not
        exist) when the monitor was built are not monitored — say so (one pass over the names)."""
        if self.unmonitored:
            return []
        unfrozen = any(p.requires_grad for p in self._frozen_params)
        if not (self._registry.dirty or unfrozen):
            return []  # no parameter registered anywhere and none unfrozen: nothing to walk
        self._registry.dirty = False
        names = new_trainable(unwrap(self.model), self._param_ids)
        if not names:
            return []
        self.unmonitored = names
        shown = name_list(names)
        finding = Finding(
            step=step,
            layer=None,
            kind="unmonitored",
            severity="info",
            value=float(len(names)),
            message=(
                f"{len(names)} parameter(s) began to train after the monitor was created and are "
                f"not monitored: {shown} (a module added, a layer unfrozen or weight_norm/"
                "spectral_norm applied later; an earlier `frozen` finding may be stale)"
            ),
            suggestion=(
                "to monitor them, call monitor.close() and create a new GradientMonitor with "
                "start_step=monitor.step_count after changing the model"
            ),
        )
        warnings.warn(
            f"graddiag: {finding.message}; {finding.suggestion}", UnmonitoredWarning, stacklevel=2
        )
        return [finding]  # the caller records it, after the steps' own findings


def _reads_delayed(device: torch.device) -> bool:
    """Whether log-step reads are delayed by one step on `device` (copied to page-locked memory
    without blocking, read at the next step): on CUDA, where a read waits for the queued work;
    on the CPU a read costs nothing more, so it happens at once."""
    return device.type == "cuda"


def _start_copy(rows: torch.Tensor, pinned: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying `rows` into the first rows of `pinned` without blocking; returns the host
    rows and an event to wait on before reading them (None where the copy is already done)."""
    host = pinned[: rows.shape[0]]
    host.copy_(rows, non_blocking=True)
    if rows.device.type != "cuda":
        return host, None
    event = torch.cuda.Event()
    event.record()
    return host, event


class _Landing:
    """The host work of a delayed log step: known once its rows have landed (`result()` lands
    them now if the next step has not yet)."""

    def __init__(self, monitor: GradientMonitor) -> None:
        self._monitor = monitor
        self.inner = None  # the `graddiag.host.Deferred` once landed

    def result(self) -> list[Finding]:
        if self.inner is None:
            self._monitor._before_results()
        return [] if self.inner is None else self.inner.result()

    @property
    def findings(self) -> list[Finding]:
        return self.result()

    @property
    def stats(self):
        self.result()
        return None if self.inner is None else self.inner.stats


class UnmonitoredWarning(UserWarning):
    """Parameters began to train after the monitor was created; they are not monitored."""


class UnusedParameterWarning(UserWarning):
    """Under DDP, parameters got no gradient at the first step on some rank."""


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The user's `optimizer=` as a list, checked."""
    many = isinstance(optimizer, (list, tuple))
    opts = list(optimizer) if many else [optimizer]
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(
                "Expected `optimizer` to be a torch.optim.Optimizer, a list of them or None, "
                f"got {o!r:.80}"
            )
        if isinstance(o, torch.optim.LBFGS):
            raise ValueError(
                "`optimizer` LBFGS re-evaluates its closure; hook it manually with monitor.step()"
            )
    if many and not opts:
        raise ValueError("Expected `optimizer` to hold at least one optimizer, got []")
    return opts


class _Probe:
    """Detects a forgotten `zero_grad` on one parameter: counts the backward passes that reach it
    (a post-accumulate-grad hook) and compares its gradient's identity and version counter with
    those at the previous optimizer step. A new tensor or a version bump beyond the backward
    passes is a reset; one in-place accumulation per backward pass and no reset is carry-over."""

    def __init__(self, param: nn.Parameter | None, fresh: bool) -> None:
        self.param = param
        self.calls = 1 if fresh and param is not None else 0  # the first backward is already done
        self.ref = None
        self.version = 0
        self.after_backward: int | None = None
        self.handle = (
            None if param is None else param.register_post_accumulate_grad_hook(self._hook)
        )

    def _hook(self, p) -> None:
        self.calls += 1
        self.after_backward = p.grad._version  # what backward left (accumulation included)

    def bumps(self) -> int | None:
        """In-place changes of the gradient since the last backward pass (None: unknown)."""
        g = None if self.param is None else self.param.grad
        if g is None or self.after_backward is None:
            return None
        return g._version - self.after_backward

    def modified(self) -> bool | None:
        """Whether the gradient changed in place since the last backward pass (None: unknown)."""
        bumps = self.bumps()
        return None if bumps is None else bumps > 0

    def reset(self) -> bool | None:
        """Whether the gradients were reset since the last step (None: unknown)."""
        if self.param is None or self.ref is None:
            return None
        g = self.param.grad
        if g is None or self.ref() is not g:
            return True
        return (g._version - self.version) > self.calls

    def take_calls(self) -> int | None:
        calls, self.calls = self.calls, 0
        return calls if self.param is not None else None

    def record(self) -> None:
        g = None if self.param is None else self.param.grad
        self.ref = None if g is None else weakref.ref(g)
        self.version = 0 if g is None else g._version
        self.after_backward = None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _float_tensors(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a module's inputs or output (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _float_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _float_tensors(v)]
    return []


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device bool: every element of every tensor is finite (no host sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


@functools.cache
def _unscale_bumps(device: torch.device) -> int:
    """How many version bumps `GradScaler.unscale_` leaves on a gradient on `device` (its kernel
    bumps the version counter on some devices, not on others)."""
    t = torch.ones(1, device=device)
    before = t._version
    torch._amp_foreach_non_finite_check_and_unscale_(
        [t], torch.zeros(1, device=device), torch.ones(1, device=device)
    )
    return t._version - before


class _RegistrationFlag:
    """A flag torch's global registration hooks set whenever any module registers a parameter or
    a submodule (modules appended, parametrizations applied), so the monitor walks the model's
    parameters only after such a change. The hooks hold this flag, not the monitor."""

    def __init__(self) -> None:
        self.dirty = False
        reg = torch.nn.modules.module
        self._handles = [
            reg.register_module_parameter_registration_hook(self._set),
            reg.register_module_module_registration_hook(self._set),
        ]

    def _set(self, *_args) -> None:
        self.dirty = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
