"""Device work of an ordinary step: how many torch ops graddiag dispatches on the training thread.

Counted with `TorchDispatchMode` (every aten op, as the device would see it). The budgets are what
the adapter achieves now; a change that adds per-step ops must raise them on purpose.
"""

import collections

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from graddiag.clip import GlobalNormClip  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402

#: aten ops of one ordinary step (no log, detail or histogram step) with a lone GlobalNormClip:
#: the measurement (_foreach_norm, stack, pow), the global norm and clip factor (sum, sqrt, add,
#: reciprocal, mul, clamp), one _foreach_mul_, clip_coef (eq, mul, add, where with its scalar)
#: and the ring-buffer row (float64 copy, index_copy_, clip_coef and loss cells).
CLIP_STEP_OPS = 22
#: The same without clipping.
PLAIN_STEP_OPS = 9
TOL = 1e-6  # float32 rounding of the clipped gradients against torch's own clip_grad_norm_


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _ordinary_step(clip):
    """(op counts of the third step, graddiag's gradients, torch's clipped gradients, clip_coef)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    mon = GradientMonitor(model, every=10, clip=clip, hist_every=0, detail_every=0)
    x = torch.randn(5, 8)
    for step in range(3):
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        if step == 2:
            ref = [p.grad.clone() for p in model.parameters()]
            with _Count() as count:
                mon.step(loss)
        else:
            mon.step(loss)
    mon.close()
    coef = mon.history[-1].clip_coef
    return count.ops, [p.grad for p in model.parameters()], ref, coef


def test_lone_global_norm_clip_reduces_once_and_stays_within_its_op_budget():
    ops, grads, ref, coef = _ordinary_step(GlobalNormClip(1e-3))
    assert ops["sum"] == 1, f"the global sum of squares is reduced more than once: {dict(ops)}"
    # scaled once; the norm ratio is the factor itself (no norm after, no division)
    assert ops["_foreach_mul_"] == 1 and ops["sqrt"] == 1 and "div" not in ops, dict(ops)
    assert sum(ops.values()) <= CLIP_STEP_OPS, dict(ops)
    # the same result as torch.nn.utils.clip_grad_norm_'s formula, by hand
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(r) for r in ref]))
    factor = min(1.0, 1e-3 / (float(total) + 1e-6))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r * factor, rtol=TOL, atol=0.0)
    assert coef == pytest.approx(factor, rel=TOL)


def test_unclipped_step_stays_within_its_op_budget():
    ops, grads, ref, coef = _ordinary_step(None)
    assert sum(ops.values()) <= PLAIN_STEP_OPS, dict(ops)
    assert "sum" not in ops and coef is None
    for g, r in zip(grads, ref, strict=True):
        assert torch.equal(g, r)
