"""What the PyTorch adapter measures on the device: per-parameter sums of squares in few fused ops
(`Plan`), detail statistics and histogram rows (read back on their steps only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from graddiag.host import HIST_BINS

#: Tensors up to this many elements that share a shape (at least STACK_MIN of them) are stacked and
#: reduced with one row-wise norm; larger ones get one dot each. Measured in benchmarks/bench_torch.py.
STACK_MAX_NUMEL = 1 << 16
STACK_MIN = 8
LOW_PRECISION = (torch.float16, torch.bfloat16)


class Plan:
    """How to reduce one pattern of present gradients with few device ops.

    - `stacks`: groups of at least `STACK_MIN` small same-shape tensors: one `stack` + one row-wise
      `vector_norm` (measured: 7x faster than `_foreach_norm` over the same 100 tensors);
    - `dots`: large dense float32/float64 tensors: one `dot` each (reads at full bandwidth, about
      twice as fast as `vector_norm` on CPU);
    - `bucket`: everything else, one `_foreach_norm` (float32 accumulation for fp16/bf16);
    - `sparse`: sparse gradients, reduced over their coalesced values;
    - `exact`: parameters whose float32 sum of squares overflowed or underflowed at an earlier
      step: a float64 norm each (exact for every finite float32 value; slower, so only these).

    `order` maps output positions to parameter indices.
    """

    def __init__(
        self,
        idx: list[int],
        params: list[torch.Tensor],
        layer_of: np.ndarray,
        device,
        exact: frozenset[int] = frozenset(),
    ) -> None:
        groups: dict[tuple, list[int]] = {}
        self.dots: list[int] = []
        self.sparse: list[int] = []
        self.exact = sorted(i for i in idx if i in exact)
        bucket: list[int] = []
        for i in idx:
            p = params[i]  # the gradient as measured (a complex one viewed as real pairs)
            if i in exact:
                continue
            if p.is_sparse:
                self.sparse.append(i)
            elif p.dtype in LOW_PRECISION or not p.numel():  # (an empty FSDP2 shard)
                bucket.append(i)
            elif p.numel() > STACK_MAX_NUMEL:
                self.dots.append(i)
            else:
                groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
        self.stacks = []
        for members in groups.values():
            if len(members) >= STACK_MIN:
                self.stacks.append(members)
            else:
                bucket.extend(members)
        by_device: dict[Any, list[int]] = {}
        for i in bucket:  # low-precision tensors get their own bucket (float32 accumulation)
            low = params[i].dtype in LOW_PRECISION
            by_device.setdefault((params[i].device, low), []).append(i)
        self.buckets = list(by_device.values())
        self.present = list(idx)
        self.mask = np.zeros(len(params), dtype=bool)
        self.mask[idx] = True
        self.has_sparse = bool(self.sparse)
        order = (
            [i for g in self.stacks for i in g]
            + [i for b in self.buckets for i in b]
            + self.dots
            + self.sparse
            + self.exact
        )
        self.order = np.asarray(order, dtype=np.int64)
        self.order_t = torch.as_tensor(self.order, device=device)
        self.layer_t = torch.as_tensor(layer_of[self.order], device=device)


def exact_sum_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sums of squares accumulated in float64: neither overflow nor underflow for any finite
    float32/bf16/fp16 values (non-finite only where an element is)."""
    dense = [t for t in tensors if not t.is_sparse]
    if len(dense) == len(tensors):  # one fused op (float64 accumulation of every element)
        return torch.stack(torch._foreach_norm(dense, 2, dtype=torch.float64)).square()
    return torch.stack(
        [torch.linalg.vector_norm(flat(t), dtype=torch.float64).square() for t in tensors]
    )


def sum_squares(tensors: list[torch.Tensor], plan: Plan, device) -> torch.Tensor:
    """Sums of squares of `tensors` (indexed like the parameters) in `plan.order`: float32, or
    float64 when the plan measures some parameters exactly."""
    parts = []
    for members in plan.stacks:
        m = torch.stack([tensors[i] for i in members]).view(len(members), -1)
        parts.append(f32(torch.linalg.vector_norm(m, dim=1)).square())
    for members in plan.buckets:
        ts = [tensors[i] for i in members]
        low = ts[0].dtype in LOW_PRECISION
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32) if low else torch._foreach_norm(ts)
        parts.append(f32(torch.stack(norms)).square())
    for i in plan.dots:
        f = tensors[i].reshape(-1)
        parts.append(f32(torch.dot(f, f)).view(1))
    for i in plan.sparse:
        v = tensors[i].coalesce().values().reshape(-1).float()
        parts.append(torch.dot(v, v).view(1))
    if plan.exact:
        parts = [p.double() for p in parts] + [exact_sum_squares([tensors[i] for i in plan.exact])]
    parts = [p if p.device == device else p.to(device, non_blocking=True) for p in parts]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 (no dispatch when it is already: a per-step op saved on small models)."""
    return t if t.dtype == torch.float32 else t.float()


def measured(g: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient as graddiag measures it: a complex one as a real view of (re, im) pairs, so
    sums of squares are sums of |z|^2 and in-place clipping still acts on the gradient."""
    if g is not None and g.is_complex() and not g.is_sparse:
        return torch.view_as_real(g)
    return g


def flat(g: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient as a flat tensor (a sparse gradient's coalesced values)."""
    return g.coalesce().values().reshape(-1) if g.is_sparse else g.reshape(-1)


def mul_(tensors: list[torch.Tensor], factors, has_sparse: bool) -> None:
    """In-place multiply by one factor or one per tensor (a plain loop where sparse grads forbid
    the fused op)."""
    if not has_sparse:
        torch._foreach_mul_(tensors, factors)
        return
    for i, t in enumerate(tensors):
        t.mul_(factors[i] if isinstance(factors, list) else factors)


def detail_rows(grads: list, present: list[int], params: list, numel: np.ndarray) -> np.ndarray:
    """Detail rows of the current step (`graddiag.host.DETAIL_FIELDS` x parameters), in one
    host read; NaN/Inf are counted (a second read) only when some max |g| is not finite.

    max |g| comes from one `aminmax` pass per tensor (20x faster on CPU than an inf-norm).
    """
    P = len(params)
    idx = [i for i in present if grads[i].numel() and flat(grads[i]).numel()]
    cols = []
    for i in idx:
        v = flat(grads[i])
        mn, mx = torch.aminmax(v)
        cols.append(torch.stack([mn.float(), mx.float(), torch.count_nonzero(v).float()]))
    pnorm = torch.stack(torch._foreach_norm([p.detach() for p in params])).float()
    host = torch.cat([torch.stack(cols, 1).reshape(-1) if cols else pnorm[:0], pnorm])
    host = host.double().numpy(force=True)
    k = len(idx)
    mm = host[: 3 * k].reshape(3, k) if k else np.zeros((3, 0))
    # rows: grad_max, nonzero, nan, inf, param_sumsq
    out = np.zeros((5, P))
    out[1] = numel
    out[4] = host[3 * k :] ** 2
    if k:
        out[0, idx] = np.maximum(-mm[0], mm[1])
        out[0, np.asarray(idx)[~np.isfinite(mm[0]) | ~np.isfinite(mm[1])]] = np.nan
        out[1, idx] = mm[2]
    for i in present:
        if grads[i].is_sparse and i not in idx:  # an empty sparse gradient is all zeros
            out[1, i] = 0.0
    if np.isnan(out[0, present]).any():
        flats = [flat(grads[i]) for i in present]
        counts = torch.stack(
            [torch.stack([torch.isnan(v).sum(), torch.isinf(v).sum()]) for v in flats]
        )
        out[2:4, present] = counts.double().numpy(force=True).T
    return out


def histogram_rows(
    grads: list,
    layer_of: np.ndarray,
    n_layers: int,
    device,
    agree: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    total: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-layer histogram rows (`graddiag.host.HIST_WIDTH` each) of finite gradient values, with
    NaN/Inf counts, and which layers have any; None when no gradient has elements.

    Two host reads for all layers: per-tensor ranges, then per-layer counts and moments.
    Sharded gradients (`graddiag.torch._distributed`, each rank holds a shard) pass `agree`
    (per-layer lo, hi -> the range over all ranks) and `total` (rows -> their sum over all ranks);
    both are collectives, called on every rank.
    """
    bins = HIST_BINS
    layer_vals: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    for i, g in enumerate(grads):
        if g is not None:
            v = flat(g)
            if v.numel():
                layer_vals[layer_of[i]].append(v if v.dtype not in LOW_PRECISION else v.float())
    values = [v for vs in layer_vals for v in vs]
    if not values and agree is None:
        return None
    if values:  # one aminmax per tensor, one stack, one read
        mm = [torch.aminmax(v) for v in values]
        ranges = torch.stack([t for pair in mm for t in pair]).double().numpy(force=True)
        ranges = ranges.reshape(-1, 2)
    else:
        ranges = np.zeros((0, 2))
    lo, hi = np.full(n_layers, np.inf), np.full(n_layers, -np.inf)  # of the finite values
    finite = np.ones(n_layers, dtype=bool)
    k = 0
    for li, vs in enumerate(layer_vals):
        if not vs:
            continue
        r = ranges[k : k + len(vs)]
        k += len(vs)
        lo[li], hi[li] = r[:, 0].min(), r[:, 1].max()
        if not (np.isfinite(lo[li]) and np.isfinite(hi[li])):  # rare: range of the finite ones
            finite[li] = False
            v = torch.cat(vs)
            vals = v[torch.isfinite(v)]
            lo[li], hi[li] = (
                (float(vals.min()), float(vals.max())) if vals.numel() else (np.inf, -np.inf)
            )
    if agree is not None:
        lo, hi = agree(lo, hi)
    empty = lo > hi  # no finite value anywhere
    lo, hi = np.where(empty, 0.0, lo), np.where(empty, 0.0, hi)
    hi = np.where(hi > lo, hi, lo + 1e-12)
    # finite layers (the common case): a layer's tensors as one (a copy when it has several),
    # then one histc, one sum and one dot; rows stacked and read once. A layer with NaN/Inf masks
    # them out (rare).
    cells: list[torch.Tensor] = []  # per layer with values: counts, sum, sum of squares
    counted: list[torch.Tensor] = []  # per layer with NaN/Inf: num, nan, inf
    where, where_bad = [], []
    for li, vs in enumerate(layer_vals):
        if not vs:
            continue
        v = vs[0] if len(vs) == 1 else torch.cat(vs)
        if not finite[li]:
            fin = torch.isfinite(v)
            nan = torch.isnan(v).sum()
            counted.append(torch.stack([fin.sum(), nan, (~fin).sum() - nan]))
            where_bad.append(li)
            v = v[fin]
        cells += [torch.histc(v, bins=bins, min=float(lo[li]), max=float(hi[li])), v.sum()]
        cells.append(torch.dot(v, v))
        where.append(li)
    local = np.zeros((n_layers, bins + 6))  # counts, sum, sum_squares, num, nan, inf, has
    if where:
        flat_cells = [c.float().reshape(-1) for c in cells] + [
            c.float() for c in counted
        ]  # one read for all layers
        host = torch.cat(flat_cells).double().numpy(force=True)
        k = len(where)
        local[where, : bins + 2] = host[: k * (bins + 2)].reshape(k, bins + 2)
        local[where, bins + 2] = [
            sum(v.numel() for v in layer_vals[li]) for li in where
        ]  # finite layers: every value counted
        if where_bad:
            local[where_bad, bins + 2 : bins + 5] = host[k * (bins + 2) :].reshape(-1, 3)
        local[where, bins + 5] = 1.0
    if total is not None:
        local = total(local)
    out = np.zeros((n_layers, bins + 7))
    out[:, :bins] = local[:, :bins]
    out[:, bins] = lo
    out[:, bins + 1] = hi
    out[:, bins + 2 :] = local[:, bins : bins + 5]
    return out, local[:, bins + 5] > 0
