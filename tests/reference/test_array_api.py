"""Same engine code, another array module: array_api_strict and torch CPU tensors."""

from __future__ import annotations

import numpy as np
import pytest

from graddiag.reference import Tensor, jvp
from graddiag.reference import functional as F
from graddiag.reference.backend import namespace, to_numpy

BACKEND_RTOL = 1e-12  # same float64 arithmetic in another library; only op order differs


def small_net(x, w1, w2, kernel):
    h = F.conv2d(x, kernel, padding=1)
    h = F.max_pool2d(F.gelu(h), 2)
    h = F.reshape(h, (h.shape[0], -1))
    h = F.layer_norm(F.matmul(h, w1), (w1.shape[1],))
    logits = F.matmul(F.tanh(h), w2)
    return F.cross_entropy(logits, LABELS_NP) + F.logsumexp(logits, axis=-1).mean()


rng = np.random.default_rng(11)
ARGS_NP = [
    rng.standard_normal((2, 2, 4, 4)),
    rng.standard_normal((12, 6)),
    rng.standard_normal((6, 3)),
    rng.standard_normal((3, 2, 3, 3)),
]
LABELS_NP = np.array([0, 2])


def grads_with(convert, labels):
    global LABELS_NP
    saved, LABELS_NP = LABELS_NP, labels
    try:
        tensors = [Tensor(convert(a), requires_grad=True) for a in ARGS_NP]
        loss = small_net(*tensors)
        loss.backward()
        return to_numpy(loss.value), [to_numpy(t.grad) for t in tensors]
    finally:
        LABELS_NP = saved


def test_array_api_strict_matches_numpy():
    xp = pytest.importorskip("array_api_strict")
    ref_loss, ref_grads = grads_with(lambda a: a, LABELS_NP)
    loss, grads = grads_with(lambda a: xp.asarray(a), xp.asarray(LABELS_NP))
    np.testing.assert_allclose(loss, ref_loss, rtol=BACKEND_RTOL)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=BACKEND_RTOL, atol=1e-14)


def test_torch_cpu_tensors_match_numpy():
    torch = pytest.importorskip("torch")
    ref_loss, ref_grads = grads_with(lambda a: a, LABELS_NP)
    loss, grads = grads_with(torch.from_numpy, torch.from_numpy(LABELS_NP))
    np.testing.assert_allclose(loss, ref_loss, rtol=BACKEND_RTOL)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=BACKEND_RTOL, atol=1e-14)


def test_engine_values_stay_in_their_array_library():
    torch = pytest.importorskip("torch")
    t = Tensor(torch.ones(2, dtype=torch.float64), requires_grad=True)
    out = F.softplus(t).sum()
    out.backward()
    assert isinstance(out.value, torch.Tensor) and isinstance(t.grad, torch.Tensor)


def test_forward_mode_runs_on_array_api_strict():
    xp = pytest.importorskip("array_api_strict")
    x = xp.asarray([0.5, -1.0], dtype=xp.float64)
    _, slope = jvp(F.tanh, [x], [xp.ones_like(x)])
    np.testing.assert_allclose(to_numpy(slope), 1 - np.tanh([0.5, -1.0]) ** 2, rtol=1e-15)


def test_mixing_array_libraries_is_a_clear_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="one array library"):
        namespace(np.ones(2), torch.ones(2))
