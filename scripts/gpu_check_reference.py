"""Run the reference engine on a GPU array library and compare with the NumPy CPU result.

Tries CuPy, then torch CUDA tensors (through the engine's array-API backend: the same engine
code, another array module). Exit status: 0 if every available GPU backend agrees with NumPy
(or no GPU is available: the check is then skipped, with a message), 1 on a mismatch.

    PYTHONPATH=. python scripts/gpu_check_reference.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from graddiag.reference import Tensor
from graddiag.reference import functional as F
from graddiag.reference.backend import to_numpy

GPU_RTOL = 1e-10  # float64 on both sides; GPU reductions sum in another order


def network(x: Any, kernel: Any, w1: Any, w2: Any, labels: Any) -> Tensor:
    h = F.max_pool2d(F.relu(F.conv2d(x, kernel, padding=1)), 2)
    h = F.reshape(h, (h.shape[0], -1))
    h = F.layer_norm(F.gelu(F.matmul(h, w1)), (w1.shape[1],))
    return F.cross_entropy(F.matmul(h, w2), labels)


def run(
    convert: Callable[[np.ndarray], Any], arrays: list[np.ndarray], labels: np.ndarray
) -> tuple[float, list[np.ndarray]]:
    params = [Tensor(convert(a), requires_grad=True) for a in arrays]
    loss = network(*params, convert(labels))
    loss.backward()
    return float(to_numpy(loss.value)), [to_numpy(p.grad) for p in params]


def gpu_backends() -> dict[str, Callable[[np.ndarray], Any]]:
    found = {}
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            found["cupy"] = cupy.asarray
    except Exception:  # noqa: BLE001 - no CuPy, or no driver: not a GPU backend here
        pass
    try:
        import torch

        if torch.cuda.is_available():
            found["torch-cuda"] = lambda a: torch.from_numpy(a).to("cuda")
    except ImportError:
        pass
    return found


def main() -> int:
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((8, 3, 16, 16)),
        rng.standard_normal((4, 3, 3, 3)),
        rng.standard_normal((256, 32)),
        rng.standard_normal((32, 10)),
    ]
    labels = rng.integers(0, 10, 8)
    backends = gpu_backends()
    if not backends:
        print("no GPU available (neither CuPy nor torch CUDA), skipped")
        return 0
    ref_loss, ref_grads = run(lambda a: a, arrays, labels)
    failed = False
    for name, convert in backends.items():
        loss, grads = run(convert, arrays, labels)
        errs = [
            float(np.max(np.abs(g - r)) / np.max(np.abs(r)))
            for g, r in zip(grads, ref_grads, strict=True)
        ]
        loss_err = abs(loss - ref_loss) / abs(ref_loss)
        ok = loss_err <= GPU_RTOL and max(errs) <= GPU_RTOL
        failed |= not ok
        print(
            f"{name}: loss rel err {loss_err:.2e}, max grad rel err {max(errs):.2e} "
            f"-> {'ok' if ok else 'MISMATCH'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
