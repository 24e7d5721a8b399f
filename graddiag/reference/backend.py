"""Array backends: the engine calls `xp.<function>` where `xp` is the array's own namespace.

NumPy arrays run on NumPy; any array that follows the Python array API standard
(``array_api_strict``, CuPy, NumPy >= 2) brings its namespace through ``__array_namespace__``;
torch tensors, which predate the standard, go through the small `TorchNamespace` shim below
(or ``array_api_compat`` when it is installed). The engine itself is the same code for all.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class TorchNamespace:
    """The subset of the array API the engine uses, spelled for torch tensors."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.float64 = torch.float64
        self.float32 = torch.float32
        self.int64 = torch.int64
        for name in (
            "exp",
            "log",
            "log1p",
            "sqrt",
            "abs",
            "sign",
            "tanh",
            "maximum",
            "minimum",
            "where",
            "matmul",
            "reshape",
            "broadcast_to",
            "zeros_like",
            "ones_like",
            "asarray",
            "isfinite",
        ):
            setattr(self, name, getattr(torch, name))

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return x.sum() if axis is None else self._torch.sum(x, dim=axis, keepdim=keepdims)

    def mean(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return x.mean() if axis is None else self._torch.mean(x, dim=axis, keepdim=keepdims)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return x.max() if axis is None else self._torch.amax(x, dim=axis, keepdim=keepdims)

    def min(self, x: Any) -> Any:
        return x.min()

    def permute_dims(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.permute(*axes)

    def concat(self, arrays: Any, axis: int = 0) -> Any:
        return self._torch.cat(list(arrays), dim=axis)

    def stack(self, arrays: Any, axis: int = 0) -> Any:
        return self._torch.stack(list(arrays), dim=axis)

    def take(self, x: Any, indices: Any, axis: int = 0) -> Any:
        return self._torch.index_select(x, axis, indices)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.to(dtype)

    def zeros(self, shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return self._torch.zeros(shape, dtype=dtype, device=device)

    def ones(self, shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return self._torch.ones(shape, dtype=dtype, device=device)

    def full(self, shape: Any, fill_value: Any, dtype: Any = None, device: Any = None) -> Any:
        return self._torch.full(shape, fill_value, dtype=dtype, device=device)

    def eye(self, n: int, dtype: Any = None, device: Any = None) -> Any:
        return self._torch.eye(n, dtype=dtype, device=device)

    def arange(self, n: int, dtype: Any = None, device: Any = None) -> Any:
        return self._torch.arange(n, dtype=dtype, device=device)

    def erf(self, x: Any) -> Any:
        return self._torch.special.erf(x)


def _is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "requires_grad")


def namespace(*arrays: Any) -> Any:
    """Return the array namespace shared by `arrays` (NumPy when none of them is an array).

    Args:
        *arrays: arrays, Python scalars or None; non-arrays are ignored.

    Returns:
        The module (or shim object) whose functions operate on those arrays.

    Raises:
        TypeError: if the arrays come from different array libraries.
    """
    found = None
    for a in arrays:
        if _is_torch(a):
            try:
                import array_api_compat

                ns = array_api_compat.array_namespace(a)
            except ImportError:
                import torch

                ns = _torch_namespace(torch)
        elif isinstance(a, np.ndarray | np.generic):
            ns = np
        elif hasattr(a, "__array_namespace__"):
            ns = a.__array_namespace__()
        else:
            continue
        if found is not None and ns is not found:
            raise TypeError(
                f"Expected all arrays to come from one array library, got {found!r} and {ns!r}"
            )
        found = ns
    return np if found is None else found


_TORCH_NS: dict[int, TorchNamespace] = {}


def _torch_namespace(torch: Any) -> TorchNamespace:
    return _TORCH_NS.setdefault(id(torch), TorchNamespace(torch))


def erf(xp: Any, x: Any) -> Any:
    """The error function, which the array API standard leaves out.

    Uses the namespace's own `erf` when it has one (torch, CuPy via cupyx), else `math.erf`
    element by element on the host (exact to float64 rounding, slow, fine for a reference).
    """
    if hasattr(xp, "erf"):
        return xp.erf(x)
    if xp.__name__.startswith("cupy"):
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    host = np.asarray(np.from_dlpack(x)) if xp is not np else np.asarray(x)
    out = np.frompyfunc(math.erf, 1, 1)(host).astype(host.dtype)
    if xp is np:
        return out
    return xp.asarray(out, device=x.device)


def device_of(x: Any) -> Any:
    """The device an array lives on (None for NumPy, which only has the CPU)."""
    return getattr(x, "device", None)


def to_numpy(x: Any) -> np.ndarray:
    """Copy any supported array to a NumPy array on the host (for reports and comparisons)."""
    if isinstance(x, np.ndarray | np.generic | float | int):
        return np.asarray(x)
    if _is_torch(x):
        return x.detach().cpu().numpy()
    if hasattr(x, "get"):  # CuPy
        return x.get()
    return np.asarray(np.from_dlpack(x))
