"""`graddiag.clip.ClipOps` over torch tensors: the clipping engine's array and gradient-list
operations, on the device, in place, without host syncs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from graddiag.clip import EMPTY
from graddiag.torch._measure import Plan, mul_, sum_squares


class TorchOps:
    """`graddiag.clip.ClipOps` over torch tensors on one device, with no host sync.

    Gradient lists are updated in place (the same list is returned). `plan` (the step's `Plan`,
    the gradient list being `plan.order`) makes `sumsq` as fast as the step's own measurement;
    `names` (aligned with the gradient list) name a sparse gradient that ValueClip or AGC cannot
    handle. `reduce` (FSDP2: gradients are local shards) sums a plan-ordered vector of sums of
    squares over the shards.
    """

    def __init__(
        self,
        device: torch.device,
        plan: Plan | None = None,
        names: list[str] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.device = device
        self.plan = plan
        self.names = names
        self.reduce = reduce

    sqrt = staticmethod(torch.sqrt)
    sum = staticmethod(torch.sum)

    @staticmethod
    def minimum1(x):
        return torch.clamp(x, max=1.0)

    @staticmethod
    def maximum(x, floor: float):
        return torch.clamp(x, min=floor)

    @staticmethod
    def where(cond, a, b):
        return torch.where(cond, a, b)

    def full(self, n: int, value: float):
        return torch.full((n,), value, dtype=torch.float32, device=self.device)

    def scalar(self, value: float):
        return torch.tensor(value, dtype=torch.float32, device=self.device)

    @staticmethod
    def quantile_first(x, n, q: float):
        last = torch.clamp(n - 1, min=0)
        pos = q * last
        lo = torch.floor(pos)
        hi = torch.minimum(lo + 1, last)
        ranked = torch.sort(x).values
        a, b = ranked[lo.long()], ranked[hi.long()]
        return torch.where(n > 0, a + (b - a) * (pos - lo), torch.full_like(a, EMPTY))

    @staticmethod
    def roll_in(buf, index, value):
        out = buf.clone()
        i = (index.long() % buf.shape[0]).view(1)
        return out.index_put_((i,), value.to(buf.dtype).view(1))

    def segment_sum(self, x, segments, n: int):
        return torch.zeros(n, dtype=x.dtype, device=self.device).index_add_(0, segments, x)

    @staticmethod
    def gather(x, index):
        return x[index]

    def sumsq(self, grads):
        by_param = dict(zip(self.plan.order.tolist(), grads, strict=True))
        out = sum_squares(by_param, self.plan, self.device)
        return out if self.reduce is None else self.reduce(out)

    def scale(self, grads, factors):
        mul_(grads, factors if factors.dim() == 0 else list(factors.unbind()), self._sparse)
        return grads

    def clamp(self, grads, limit: float):
        self._dense_only(grads, "ValueClip")
        torch._foreach_clamp_min_(grads, -limit)
        torch._foreach_clamp_max_(grads, limit)
        return grads

    def unit_norms(self, grads, params) -> tuple[list, list]:
        """Norms over all dims but the first (a torch weight's output units), float32."""
        self._dense_only(grads, "AGC")
        g_norms, p_norms = [], []
        for g, p in zip(grads, params, strict=True):
            dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
            g_norms.append(torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=torch.float32))
            p_norms.append(
                torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True, dtype=torch.float32)
            )
        if self.reduce is not None:  # FSDP2: a vector (one unit) is split over the shards
            g_norms, p_norms = (
                self._whole_vectors(grads, g_norms),
                self._whole_vectors(grads, p_norms),
            )
        return g_norms, p_norms

    def _whole_vectors(self, grads, norms: list) -> list:
        """`norms` with those of 1-D tensors (one unit each) summed over the shards (`reduce`);
        rows of a weight lie whole in FSDP2's `Shard(0)` shards."""
        vec = [i for i, g in enumerate(grads) if g.dim() <= 1]
        if not vec:
            return norms
        sq = torch.zeros(len(grads), dtype=torch.float32, device=self.device)
        sq[vec] = torch.stack([norms[i].reshape(()) for i in vec]).square()
        whole = self.reduce(sq).sqrt()
        one_unit = set(vec)
        return [whole[i].reshape(n.shape) if i in one_unit else n for i, n in enumerate(norms)]

    @staticmethod
    def scale_units(grads, factors: list):
        for g, f in zip(grads, factors, strict=True):
            g.mul_(f.to(g.dtype))
        return grads

    @property
    def _sparse(self) -> bool:
        return self.plan is not None and self.plan.has_sparse

    def _dense_only(self, grads, policy: str) -> None:
        if not self._sparse:
            return
        for name, g in zip(self.names, grads, strict=True):
            if g.is_sparse:
                raise ValueError(
                    f"{policy} does not support the sparse gradient of parameter {name!r}; "
                    "use a norm-based policy"
                )
