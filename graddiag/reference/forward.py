"""Forward mode: each tensor carries a tangent next to its value (a dual number, v + ε·t).

Every op pushes tangents forward with the JVP half of its rule in `ops.RULES`, so one forward
pass gives the directional derivative J·v. No graph is needed for this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from graddiag.reference import backend
from graddiag.reference.engine import Tensor


def jvp(fn: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[Any, Any]:
    """Evaluate `fn` at `primals` and its directional derivative along `tangents`.

    Args:
        fn: a function of engine tensors returning one tensor.
        primals: the input arrays.
        tangents: one tangent array per input, each of the input's shape.

    Returns:
        ``(value, tangent)``: ``fn(*primals)`` and ``J·tangents`` as arrays.

    Raises:
        ValueError: if the counts or shapes of `primals` and `tangents` differ.

    Example:
        >>> import numpy as np
        >>> from graddiag.reference.forward import jvp
        >>> value, slope = jvp(lambda x: x * x, [np.array(3.0)], [np.array(1.0)])
        >>> float(value), float(slope)
        (9.0, 6.0)
    """
    if len(primals) != len(tangents):
        raise ValueError(
            f"Expected one tangent per primal ({len(primals)}), got {len(tangents)} tangents"
        )
    inputs = []
    for i, (p, t) in enumerate(zip(primals, tangents, strict=True)):
        x = Tensor(p)
        t = (
            x.xp.asarray(t, dtype=x.dtype, device=backend.device_of(x.value))
            if not hasattr(t, "shape")
            else t
        )
        if tuple(t.shape) != x.shape:
            raise ValueError(
                f"Expected `tangents[{i}]` of shape {x.shape}, got shape {tuple(t.shape)}"
            )
        x.tangent = t
        inputs.append(x)
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected `fn` to return a Tensor, got {type(out).__name__}")
    tangent = out.tangent if out.tangent is not None else out.xp.zeros_like(out.value)
    return out.value, tangent


def vjp(fn: Callable[..., Any], primals: Sequence[Any], cotangent: Any) -> tuple[Any, list[Any]]:
    """Evaluate `fn` at `primals` and pull `cotangent` back to every input (uᵀ·J).

    Returns:
        ``(value, [grad per input])`` as arrays.
    """
    inputs = [Tensor(p, requires_grad=True) for p in primals]
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected `fn` to return a Tensor, got {type(out).__name__}")
    out.backward(cotangent)
    zeros = out.xp.zeros_like
    return out.value, [x.grad if x.grad is not None else zeros(x.value) for x in inputs]
