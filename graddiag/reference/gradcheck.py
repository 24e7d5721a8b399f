"""Central differences in float64: the yardstick every rule and every framework is held to."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graddiag.reference.engine import Tensor, apply
from graddiag.reference.ops import ForEachArg, defop

DEFAULT_EPS = 1e-6


def relative_error(actual: Any, expected: Any, floor: float = 0.0) -> float:
    """``max|actual − expected| / max(max|expected|, floor)``: error relative to the scale.

    Scaling by the largest entry rather than entry by entry keeps near-zero entries from
    turning rounding noise into huge relative errors; `floor` does the same for a whole array
    whose exact value is zero (e.g. a conv bias followed by batch norm).
    """
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, floor)
    diff = float(np.max(np.abs(a - e))) if e.size else 0.0
    return diff / scale if scale > 0 else diff


def numerical_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = DEFAULT_EPS
) -> np.ndarray:
    """The gradient of scalar `f` at `x` by central differences, ``(f(x+h) − f(x−h)) / 2h``.

    Args:
        f: a function of a float64 array returning a float.
        x: the point; copied to float64.
        eps: the step h, relative to ``max(1, |x_i|)``.

    Returns:
        A float64 array of `x`'s shape.

    Raises:
        ValueError: if `eps` is not positive.
    """
    if not eps > 0:
        raise ValueError(f"Expected `eps` > 0, got {eps!r}")
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        h = eps * max(1.0, abs(flat[i]))
        old = flat[i]
        flat[i] = old + h
        up = f(x)
        flat[i] = old - h
        down = f(x)
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


class GradientCheckError(AssertionError):
    """An engine gradient disagrees with central differences."""


def check_grads(
    fn: Callable[..., Tensor],
    args: Sequence[Any],
    rtol: float = 1e-6,
    atol: float = 1e-7,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
) -> float:
    """Check the engine's VJP of `fn` against central differences, for every argument.

    A random cotangent u turns any output into the scalar ``<u, fn(*args)>`` whose gradient
    is ``uᵀJ``; both sides are computed in float64 on NumPy.

    Args:
        fn: a function of engine tensors.
        args: the input arrays (copied to float64).
        rtol: the largest acceptable `relative_error`.
        atol: an absolute floor on the error, for gradients so small that the rounding error
            of the differences (about 1e-16·|f|/eps) dominates them.
        eps: the finite-difference step.
        seed: seeds the random cotangent.

    Returns:
        The largest relative error over the arguments.

    Raises:
        GradientCheckError: naming the first argument whose error exceeds both `rtol`
            (relative) and `atol` (absolute).
    """
    arrays = [np.array(a, dtype=np.float64) for a in args]
    out = fn(*[Tensor(a) for a in arrays]).value
    u = np.random.default_rng(seed).standard_normal(np.shape(out))

    def scalar(i: int) -> Callable[[np.ndarray], float]:
        def f(xi: np.ndarray) -> float:
            inputs = [Tensor(xi if j == i else a) for j, a in enumerate(arrays)]
            return float(np.sum(u * fn(*inputs).value))

        return f

    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    fn(*tensors).backward(u)
    worst = 0.0
    for i, t in enumerate(tensors):
        engine = t.grad if t.grad is not None else np.zeros_like(arrays[i])
        numeric = numerical_gradient(scalar(i), arrays[i], eps)
        err = relative_error(engine, numeric)
        if err > rtol and float(np.max(np.abs(np.asarray(engine) - numeric), initial=0)) > atol:
            raise GradientCheckError(
                f"argument {i}: engine gradient differs from central differences "
                f"(relative error {err:.3e} > rtol {rtol:.1e})"
            )
        worst = max(worst, err)
    return worst


# ------------------------------------------------------------------- opaque (external) ops
# A function the engine cannot see inside (a custom torch.autograd.Function, a
# tf.custom_gradient) enters the graph as an "external" op: its forward is the function itself,
# run in float64 on NumPy arrays, and its derivatives come from central differences, so they
# are independent of whatever backward the function's author wrote.


def _fd_vjp(
    xp: Any, i: int, g: Any, ans: Any, *args: Any, fn: Callable[..., Any], name: str
) -> np.ndarray:
    arrays = [_float64_if_floating(a) for a in args]

    def f(xi: np.ndarray) -> float:
        return float(np.sum(g * fn(*[xi if j == i else a for j, a in enumerate(arrays)])))

    return numerical_gradient(f, arrays[i])


def _float64_if_floating(a: Any) -> np.ndarray:
    """Float arrays in float64; integer and boolean arrays (indices, masks) keep their dtype."""
    arr = np.asarray(a)
    keep = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    return arr if keep else arr.astype(np.float64)


def _fd_jvp(
    xp: Any, i: int, t: Any, ans: Any, *args: Any, fn: Callable[..., Any], name: str
) -> np.ndarray:
    arrays = [_float64_if_floating(a) for a in args]
    h = DEFAULT_EPS * max(1.0, float(np.max(np.abs(arrays[i]), initial=0.0)))
    up = fn(*[a + h * t if j == i else a for j, a in enumerate(arrays)])
    down = fn(*[a - h * t if j == i else a for j, a in enumerate(arrays)])
    return (np.asarray(up) - np.asarray(down)) / (2 * h)


defop(
    "external",
    lambda xp, *args, fn, name: np.asarray(fn(*args), dtype=np.float64),
    ForEachArg(_fd_vjp),
    ForEachArg(_fd_jvp),
)


#: Central differences cost two evaluations of the whole function per input element.
MAX_EXTERNAL_ELEMENTS = 50_000


def external(fn: Callable[..., np.ndarray], *args: Any, name: str) -> Tensor:
    """Insert opaque function `fn` (float64 NumPy arrays in, one array out) into the graph.

    Its derivatives are central differences, one evaluation pair per input element, so keep
    such ops small. Inputs must live on NumPy.

    Args:
        fn: the function.
        *args: its inputs (engine tensors or arrays).
        name: a label for reports and errors, e.g. the custom Function's class name.

    Returns:
        The output tensor.

    Raises:
        ValueError: if the inputs have more than `MAX_EXTERNAL_ELEMENTS` elements in all.
    """
    size = sum(int(np.prod(np.shape(a.value if isinstance(a, Tensor) else a))) for a in args)
    if size > MAX_EXTERNAL_ELEMENTS:
        raise ValueError(
            f"Expected the inputs of opaque op {name!r} to have at most "
            f"{MAX_EXTERNAL_ELEMENTS} elements (central differences need two calls per "
            f"element), got {size}; validate with a smaller example batch"
        )
    return apply("external", *args, fn=fn, name=name)
