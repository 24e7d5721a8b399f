"""Full Jacobians, by forward mode (one JVP per input element) or reverse mode (one VJP per
output element), whichever needs fewer passes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from graddiag.reference import backend
from graddiag.reference.engine import Tensor
from graddiag.reference.forward import jvp, vjp


def jacobian(fn: Callable[[Tensor], Tensor], x: Any, mode: str = "auto") -> Any:
    """The Jacobian of `fn` at `x`, of shape ``out.shape + x.shape``.

    Args:
        fn: a function of one engine tensor returning one tensor.
        x: the input array.
        mode: "forward", "reverse", or "auto": forward when the input has fewer elements than
            the output (a tall Jacobian), reverse otherwise (a wide one, e.g. a scalar loss).

    Returns:
        An array in `x`'s array library.

    Raises:
        ValueError: if `mode` is not one of the three.
    """
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"Expected `mode` to be 'auto', 'forward' or 'reverse', got {mode!r}")
    x = Tensor(x).value
    xp = backend.namespace(x)
    out = fn(Tensor(x)).value
    n_in, n_out = math.prod(x.shape), math.prod(out.shape)
    if mode == "auto":
        mode = "forward" if n_in < n_out else "reverse"
    eye = xp.reshape(
        xp.eye(n_in if mode == "forward" else n_out, dtype=x.dtype, device=backend.device_of(x)),
        (-1,),
    )
    rows = []
    if mode == "forward":
        for i in range(n_in):
            t = xp.reshape(eye[i * n_in : (i + 1) * n_in], x.shape)
            rows.append(xp.reshape(jvp(fn, [x], [t])[1], (n_out,)))
        flat = xp.permute_dims(xp.stack(rows, axis=0), (1, 0))
    else:
        for i in range(n_out):
            u = xp.reshape(eye[i * n_out : (i + 1) * n_out], out.shape)
            rows.append(xp.reshape(vjp(fn, [x], u)[1][0], (n_in,)))
        flat = xp.stack(rows, axis=0)
    return xp.reshape(flat, tuple(out.shape) + tuple(x.shape))
