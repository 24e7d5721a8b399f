"""The PyTorch adapter under `torch.distributed`: DDP and FSDP2 (`fully_shard`).

- **DDP.** After `backward()` every rank holds the same averaged gradients, so every rank measures
  them and takes the same decisions (clipping, `nonfinite="skip"`/`"raise"`), and rank 0 alone
  writes the logs. A DDP communication hook — the default all-reduce, averaging with a fused
  kernel that also flags NaN/Inf — keeps, on the device, one flag per step: whether this rank's
  *local* gradients (the bucket before the all-reduce) held a NaN/Inf. Only on a step whose
  averaged gradients are non-finite — every rank sees the same — one all-reduce of those flags
  names the rank(s) where it first appeared: no extra collective on ordinary steps. Parameters without a gradient at the first step (unused in the forward pass,
  which DDP without `find_unused_parameters=True` turns into an error at the next iteration) are
  named, with the ranks, in an `unused` finding (one all-reduce, once).
- **FSDP2.** Each rank holds a `DTensor` shard of each gradient. Per-parameter sums of squares of
  the local shards are all-reduced over the shard dimension(s) of the mesh — one collective per
  step, the same that `clip_grad_norm_` pays — and clipping scales the local shards by factors
  computed from those sums (the FSDP recipe). Detail statistics and histograms are computed on the
  local shards and combined with one or two all-reduces on their steps; no gradient is gathered.
  Each `fully_shard` module's reduce-scatter flags its input (this rank's unsharded gradients)
  first, so a non-finite step names its rank as under DDP.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from graddiag.findings import Finding, name_list
from graddiag.torch._measure import Plan, detail_rows, histogram_rows

#: How many parameter orders `Distributed.sum_over_shards` keeps on the device.
_MAX_ORDERS = 64


def attach(model: nn.Module, per_rank_logs: bool) -> Distributed | None:
    """The distributed context of `model`, or None outside an initialized process group of two or
    more ranks (then the monitor behaves as in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(model, FullyShardedDataParallel) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        raise ValueError(
            "`model` is wrapped in FullyShardedDataParallel (FSDP1), which graddiag does not "
            "measure (its flat parameters hide the layers); shard it with "
            "torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )
    sharded = [p for p in model.parameters() if isinstance(p, DTensor) and p.requires_grad]
    if sharded:
        mesh = sharded[0].device_mesh
        other = next((p.device_mesh for p in sharded if p.device_mesh != mesh), None)
        if other is not None:
            raise ValueError(
                "graddiag measures FSDP2 models whose trainable parameters share one device "
                f"mesh; `model` has parameters on {mesh} and on {other}"
            )
        return Distributed(per_rank_logs, mesh=mesh)
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else _find_ddp(model)
    return Distributed(per_rank_logs, ddp=ddp)


def _find_ddp(module: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapping `module`, if any, found once at construction: a DDP
    holds its module in its `_modules` dict, which its attribute dict (`__dict__`) holds."""
    ddp_type = nn.parallel.DistributedDataParallel
    for modules in gc.get_referrers(module):
        if not isinstance(modules, dict):
            continue
        for attrs in gc.get_referrers(modules):
            owners = [attrs]
            if isinstance(attrs, dict) and attrs.get("_modules") is modules:
                owners = gc.get_referrers(attrs)
            for owner in owners:
                if isinstance(owner, ddp_type) and owner.module is module:
                    return owner
    return None


def _flagging_allreduce(state, bucket):  # no annotations: DDP checks them against its own types
    """The DDP communication hook; `state` is the monitor's `_FlagHook`."""
    return state(bucket)


class _FlagHook:
    """A device flag saying whether this rank's local gradients held a NaN/Inf before they were
    reduced, since the last `take()`. Called as the DDP communication hook, it is torch's
    default all-reduce (average, then `all_reduce`) with the averaging done by the fused
    kernel `GradScaler` uses (`_amp_foreach_non_finite_check_and_unscale_`: multiply by
    1/world and flag NaN/Inf in the same pass), so the flag costs no extra pass over the bucket.
    FSDP2 flags through `_flag_reduce_scatter`."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.found: torch.Tensor | None = None
        self.active = True
        self._inv: dict[Any, torch.Tensor] = {}

    def _found(self, device: torch.device) -> torch.Tensor:
        if self.found is None:
            self.found = torch.zeros(1, dtype=torch.float32, device=device)
        return self.found

    def flag(self, local: torch.Tensor) -> None:
        """Note whether `local` (gradients about to be reduced) is all finite, on the device:
        min and max are finite iff every element is (aminmax propagates NaN); one read pass."""
        if self.active and local.numel():
            bad = ~torch.isfinite(torch.stack(torch.aminmax(local))).all()
            self._found(local.device).add_(bad)

    def __call__(self, bucket):
        buf = bucket.buffer()
        group = self.group if self.group is not None else dist.group.WORLD
        world = group.size()
        if self.active:
            inv = self._inv.get(buf.device)
            if inv is None:
                inv = self._inv[buf.device] = torch.full((1,), 1.0 / world, device=buf.device)
            torch._amp_foreach_non_finite_check_and_unscale_([buf], self._found(buf.device), inv)
        else:
            buf.div_(world)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    def take(self, device: torch.device) -> torch.Tensor:
        """1.0 if some local gradients held a NaN/Inf since the last call, else 0.0."""
        found, self.found = self.found, None
        if found is None:
            return torch.zeros((), dtype=torch.float64, device=device)
        return (found > 0).to(device=device, dtype=torch.float64).reshape(())


def _flag_reduce_scatter(model: nn.Module) -> _FlagHook | None:
    """FSDP2: replace the default reduce-scatter of every `fully_shard` module by one that flags
    its input (this rank's unsharded gradients) first; None (nothing replaced) if a module uses
    a custom reduce-scatter or several parameter groups."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    try:  # FSDP2's internals (to see whether a module's reduce-scatter is still the default)
        groups = [m._get_fsdp_state()._fsdp_param_groups for m in modules]
    except AttributeError:  # a torch whose FSDP2 moved them: the rank is not named
        return None
    if any(
        len(g) > 1 or any(type(pg._reduce_scatter_comm) is not DefaultReduceScatter for pg in g)
        for g in groups
    ):
        return None
    store = _FlagHook(None)

    class FlaggingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            store.flag(input_tensor)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    comm = FlaggingReduceScatter()
    for m, g in zip(modules, groups, strict=True):
        if g:
            m.set_custom_reduce_scatter(comm)
    return store


class Distributed:
    """What the monitor does differently under DDP (`ddp` given or None: gradients replicated) or
    FSDP2 (`mesh`: the device mesh of the sharded parameters)."""

    def __init__(
        self,
        per_rank_logs: bool,
        *,
        ddp: nn.parallel.DistributedDataParallel | None = None,
        mesh: Any = None,
    ) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.per_rank_logs = per_rank_logs
        self.mesh = mesh
        self.sharded = mesh is not None
        self.kind = "fsdp2" if self.sharded else "ddp"
        self.ddp = ddp
        self.group = ddp.process_group if ddp is not None else dist.group.WORLD
        self.hook: _FlagHook | None = None
        self._flags: torch.Tensor | None = None
        self._shard_groups: list[Any] = []
        self._replicated: np.ndarray | None = None
        self._orders: dict[tuple[bytes, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def install(self, model: nn.Module) -> None:
        """Flag each rank's local gradients before they are reduced. DDP: the flagging
        all-reduce as the communication hook; FSDP2: a flagging reduce-scatter on every
        `fully_shard` module. A user's own hook or custom reduce-scatter is left alone (then the
        rank of a NaN/Inf stays unknown)."""
        if self.ddp is not None and not self.ddp._comm_hooks:
            self.hook = _FlagHook(self.ddp.process_group)
            self.ddp.register_comm_hook(self.hook, _flagging_allreduce)
        elif self.sharded:
            self.hook = _flag_reduce_scatter(model)

    @property
    def origin_known(self) -> bool:
        """Whether the ranks where a NaN/Inf appeared can be named (our hook is in place)."""
        return self.hook is not None

    # ------------------------------------------------------------------ logs
    def logdir(self, logdir: str | os.PathLike | None) -> str | os.PathLike | None:
        """This rank's log directory: `logdir` on rank 0, `logdir/rank<k>` on rank k with
        `per_rank_logs`, else None."""
        if logdir is None or self.rank == 0:
            return logdir
        return os.path.join(logdir, f"rank{self.rank}") if self.per_rank_logs else None

    def meta(self) -> dict[str, Any]:
        return {"distributed": self.kind, "world_size": self.world, "rank": self.rank}

    # ------------------------------------------------------------------ start
    def start(self, params: Sequence[torch.Tensor], every: int, device: torch.device) -> None:
        """First step: the ring of local non-finite flags, and (FSDP2) how to reduce."""
        from torch.distributed.tensor import DTensor, Shard

        self._flags = torch.zeros(every, dtype=torch.float64, device=device)
        if not self.sharded:
            return
        dims = set()
        for p in params:
            if isinstance(p, DTensor):  # on `self.mesh`, checked by `attach`
                dims |= {d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)}
        self._shard_groups = [self.mesh.get_group(d) for d in sorted(dims)]
        # a parameter that is not sharded is the same on every rank: counted once per group
        first = all(dist.get_rank(g) == 0 for g in self._shard_groups)
        self._replicated = np.asarray([not isinstance(p, DTensor) for p in params])
        self._count_replicated = 1.0 if first else 0.0

    # ------------------------------------------------------------------ FSDP2: local shards
    @staticmethod
    def local(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The local shard of each DTensor (the tensor itself otherwise), sharing its storage."""
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]

    def _weights(self, idx: np.ndarray, device) -> torch.Tensor | None:
        """Per entry, 0 for a replicated parameter on a rank that does not count it."""
        if self._count_replicated or not self._replicated[idx].any():
            return None
        return torch.as_tensor(~self._replicated[idx], dtype=torch.float64, device=device)

    def sum_over_shards(self, values: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """`values` (one entry per parameter in `idx`, in any order) summed over the shards, in
        the same order; `idx` must be the same on every rank (the reduction goes in parameter
        order, since ranks may order their plans differently)."""
        if not self.sharded or not len(idx):
            return values
        pos, w = self._positions(np.asarray(idx), values.device)
        vec = values.index_select(0, pos).double()
        if w is not None:
            vec = vec * w
        for g in self._shard_groups:
            dist.all_reduce(vec, group=g)
        out = torch.empty_like(vec)
        out[pos] = vec
        return out.to(values.dtype)

    def _positions(self, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device tensors `sum_over_shards` needs for `idx` (the order into parameter order,
        the weights), made once per `idx`: a host-to-device copy waits for the device (a host
        sync on CUDA), so ordinary steps, which reduce in the same plan order, reuse them."""
        key = (idx.tobytes(), str(device))
        hit = self._orders.get(key)
        if hit is None:
            order = np.argsort(idx, kind="stable")
            pos = torch.as_tensor(order, device=device)
            if len(self._orders) >= _MAX_ORDERS:  # rare orders (non-finite steps) do not pile up
                self._orders.clear()
            hit = self._orders[key] = (pos, self._weights(idx[order], device))
        return hit

    def reducer(self, plan: Plan) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function summing a plan-ordered vector of sums of squares over the shards."""
        if not self.sharded:
            return None
        return lambda v: self.sum_over_shards(v, plan.order)

    def detail(
        self, grads: list, present: list[int], params: Sequence[torch.Tensor], numel: np.ndarray
    ) -> np.ndarray:
        """Detail rows (`graddiag.host.DETAIL_FIELDS` x parameters) of the whole gradients from
        the local shards: max |g| by a MAX all-reduce, counts and sums of squares by a SUM."""
        local_params = self.local(params)
        local_numel = np.asarray([p.numel() for p in local_params], dtype=np.float64)
        rows = detail_rows(self.local(grads), present, local_params, local_numel)
        if self._replicated.any() and not self._count_replicated:
            rows[1:, self._replicated] = 0.0
        bad = np.isnan(rows[0])
        rows[0, bad] = np.inf  # MAX over NaN is undefined; a non-finite max is marked below
        t = torch.as_tensor(rows, dtype=torch.float64, device=self._flags.device)
        for g in self._shard_groups:
            dist.all_reduce(t[0], op=dist.ReduceOp.MAX, group=g)
            dist.all_reduce(t[1:], group=g)
        out = t.numpy(force=True).copy()
        out[0, (out[2] + out[3]) > 0] = np.nan
        return out

    def histograms(self, grads: list, layer_of: np.ndarray, n_layers: int, device):
        """Per-layer histogram rows of the whole gradients from the local shards: one MIN/MAX
        all-reduce agrees on each layer's range, one SUM all-reduce adds the counts."""

        def agree(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            t = torch.as_tensor(np.concatenate([lo, -hi]), device=self._flags.device)
            for g in self._shard_groups:
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g)
            t = t.numpy(force=True)
            return t[:n_layers], -t[n_layers:]

        def total(rows: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(rows, dtype=torch.float64, device=self._flags.device)
            for g in self._shard_groups:
                dist.all_reduce(t, group=g)
            return t.numpy(force=True)

        return histogram_rows(self.local(grads), layer_of, n_layers, device, agree, total)

    # ------------------------------------------------------------------ DDP: where NaN/Inf began
    def record_step(self, row: int, device: torch.device) -> None:
        """Keep this step's local non-finite flag (from the communication hook) in the ring."""
        if self.hook is not None:
            self._flags[row] = self.hook.take(device)

    def origin_ranks(self, rows: Sequence[int]) -> list[tuple[int, ...]]:
        """For each ring row, the ranks whose local gradients held NaN/Inf before the all-reduce.
        One all-reduce; call on every rank at the same time (a step whose averaged gradients
        are non-finite is non-finite on every rank)."""
        if not self.origin_known:
            return [()] * len(rows)
        table = torch.zeros(self.world, len(rows), dtype=torch.float64)
        table[self.rank] = self._flags[list(rows)].cpu()
        device = self._flags.device
        t = table.to(device)
        dist.all_reduce(t, group=self.group)
        t = t.numpy(force=True)
        return [tuple(int(r) for r in np.flatnonzero(t[:, k] > 0)) for k in range(len(rows))]

    def unused(self, step: int, names: Sequence[str], has: np.ndarray, layers) -> Finding | None:
        """At the first step: parameters that got no gradient on some rank, named with the ranks
        (one all-reduce, once). Returns an `unused` finding, or None."""
        t = torch.zeros(self.world, len(names), dtype=torch.float64)
        t[self.rank] = torch.as_tensor(~np.asarray(has), dtype=torch.float64)
        dev = self._flags.device if self._flags is not None else "cpu"
        t = t.to(dev)
        dist.all_reduce(t, group=self.group)
        missing = t.numpy(force=True) > 0
        which = np.flatnonzero(missing.any(axis=0))
        if not len(which):
            return None
        ranks = sorted({int(r) for r in np.flatnonzero(missing.any(axis=1))})
        shown = name_list([names[i] for i in which])
        return Finding(
            step=step,
            layer=layers[int(which[0])],
            kind="unused",
            severity="warning",
            value=float(len(which)),
            message=(
                f"{len(which)} parameter(s) got no gradient at the first step on rank(s) "
                f"{', '.join(map(str, ranks))} (not used to compute the loss): "
                f"{shown}. DDP without find_unused_parameters=True fails at "
                "the next iteration ('Expected to have finished reduction in the prior "
                "iteration')"
            ),
            suggestion=(
                "remove the unused parameters or freeze them (requires_grad=False) before "
                "wrapping in DDP; if they are used on some steps only, pass "
                "find_unused_parameters=True (or static_graph=True when the set never changes)"
            ),
        )

    def close(self) -> None:
        """The communication hook stays registered (DDP cannot remove one); it stops flagging."""
        if self.hook is not None:
            self.hook.active = False
            self.hook.found = None
