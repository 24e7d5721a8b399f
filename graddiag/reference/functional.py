"""The engine's public ops: thin, validated front ends to the primitives in `ops.RULES`.

Composite layers (linear, layer norm, batch norm, cross-entropy with integer labels) are
written here in terms of primitives, so their gradients come from the chain rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graddiag.reference import backend
from graddiag.reference.engine import Tensor, apply, normalize_axis
from graddiag.reference.ops import _pair

__all__ = [
    "abs",
    "add",
    "avg_pool2d",
    "batch_norm",
    "broadcast_to",
    "concat",
    "conv2d",
    "cross_entropy",
    "div",
    "dropout",
    "exp",
    "gelu",
    "layer_norm",
    "linear",
    "log",
    "log_softmax",
    "logsumexp",
    "matmul",
    "max",
    "max_pool2d",
    "maximum",
    "mean",
    "minimum",
    "mse",
    "mul",
    "neg",
    "normalize",
    "pow",
    "relu",
    "reshape",
    "sigmoid",
    "softmax",
    "softplus",
    "sqrt",
    "stack",
    "sub",
    "sum",
    "take",
    "tanh",
    "transpose",
    "where",
]


def _tensor(x: Any) -> Any:
    return x if isinstance(x, Tensor) else Tensor(x)


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Tensor) else x


def add(x: Any, y: Any) -> Tensor:
    return apply("add", x, y)


def sub(x: Any, y: Any) -> Tensor:
    return apply("sub", x, y)


def mul(x: Any, y: Any) -> Tensor:
    return apply("mul", x, y)


def div(x: Any, y: Any) -> Tensor:
    return apply("div", x, y)


def pow(x: Any, y: Any) -> Tensor:  # noqa: A001 - mirrors the array API name
    return apply("pow", x, y)


def neg(x: Any) -> Tensor:
    return apply("neg", x)


def exp(x: Any) -> Tensor:
    return apply("exp", x)


def log(x: Any) -> Tensor:
    return apply("log", x)


def sqrt(x: Any) -> Tensor:
    return apply("sqrt", x)


def abs(x: Any) -> Tensor:  # noqa: A001 - mirrors the array API name
    return apply("abs", x)


def tanh(x: Any) -> Tensor:
    return apply("tanh", x)


def sigmoid(x: Any) -> Tensor:
    return apply("sigmoid", x)


def relu(x: Any) -> Tensor:
    return apply("relu", x)


def gelu(x: Any, approximate: str = "none") -> Tensor:
    """GELU, exact (erf) by default or with the tanh approximation.

    Raises:
        ValueError: if `approximate` is not "none" or "tanh".
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"Expected `approximate` to be 'none' or 'tanh', got {approximate!r}")
    return apply("gelu", x, approximate=approximate)


def softplus(x: Any) -> Tensor:
    return apply("softplus", x)


def maximum(x: Any, y: Any) -> Tensor:
    return apply("maximum", x, y)


def minimum(x: Any, y: Any) -> Tensor:
    return apply("minimum", x, y)


def where(condition: Any, x: Any, y: Any) -> Tensor:
    """Elementwise `x` where `condition` holds, else `y` (the condition is a constant)."""
    return apply("where", _value(condition), x, y)


def matmul(a: Any, b: Any) -> Tensor:
    """Matrix product with batch broadcasting; 1-D operands are treated as a row / column.

    Raises:
        ValueError: if an operand is 0-D.
    """
    a, b = _tensor(a), _tensor(b)
    for arg, t in (("a", a), ("b", b)):
        if t.ndim == 0:
            raise ValueError(f"Expected `{arg}` to have at least 1 dimension, got shape {t.shape}")
    if a.ndim == 1:
        return reshape(matmul(reshape(a, (1, -1)), b), b.shape[:-2] + b.shape[-1:])
    if b.ndim == 1:
        return reshape(matmul(a, reshape(b, (-1, 1))), a.shape[:-1])
    return apply("matmul", a, b)


def sum(x: Any, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return _tensor(x).sum(axis, keepdims)


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Tensor:
    return _tensor(x).mean(axis, keepdims)


def max(x: Any, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return _tensor(x).max(axis, keepdims)


def logsumexp(x: Any, axis: Any = -1, keepdims: bool = False) -> Tensor:
    x = _tensor(x)
    return apply("logsumexp", x, axis=normalize_axis(axis, x.ndim), keepdims=keepdims)


def reshape(x: Any, shape: Sequence[int]) -> Tensor:
    return _tensor(x).reshape(tuple(shape))


def transpose(x: Any, axes: Sequence[int] | None = None) -> Tensor:
    return _tensor(x).transpose(*(axes or ()))


def broadcast_to(x: Any, shape: Sequence[int]) -> Tensor:
    return apply("broadcast_to", x, shape=tuple(shape))


def index(x: Any, key: Any) -> Tensor:
    """``x[key]`` with integer or boolean index arrays among the key's entries (advanced
    indexing, NumPy semantics); repeated indices accumulate in the gradient.

    Raises:
        TypeError: if `key` is not a tuple.
    """
    if not isinstance(key, tuple):
        raise TypeError(f"Expected `key` to be a tuple, got {type(key).__name__}")
    return apply("index", x, key=key)


def index_add(values: Any, key: Any, shape: Sequence[int]) -> Tensor:
    """Zeros of `shape` with `values` added at ``[key]`` (repeats accumulate): the adjoint of
    `index`, the building block of scatter-add and index_put.

    Raises:
        TypeError: if `key` is not a tuple.
    """
    if not isinstance(key, tuple):
        raise TypeError(f"Expected `key` to be a tuple, got {type(key).__name__}")
    return apply("index_add", values, key=key, shape=tuple(int(n) for n in shape))


def erf(x: Any) -> Tensor:
    """The error function."""
    return apply("erf", x)


def take(x: Any, indices: Any) -> Tensor:
    """Rows of `x` at integer `indices` (any shape): an embedding lookup.

    Raises:
        ValueError: if an index is outside ``[0, x.shape[0])``.
    """
    x, idx = _tensor(x), _value(indices)
    xp = backend.namespace(idx)
    n = x.shape[0]
    lo, hi = int(xp.min(idx)), int(xp.max(idx))
    if lo < 0 or hi >= n:
        raise ValueError(f"Expected `indices` in [0, {n}), got values from {lo} to {hi}")
    return apply("take", x, idx)


def concat(xs: Sequence[Any], axis: int = 0) -> Tensor:
    return apply("concat", *xs, axis=axis)


def stack(xs: Sequence[Any], axis: int = 0) -> Tensor:
    return apply("stack", *xs, axis=axis)


def _single_axis(axis: Any, ndim: int) -> int:
    if not isinstance(axis, int):
        raise ValueError(f"Expected `axis` to be one int, got {axis!r}")
    return normalize_axis(axis, ndim)[0]


def softmax(x: Any, axis: int = -1) -> Tensor:
    x = _tensor(x)
    return apply("softmax", x, axis=_single_axis(axis, x.ndim))


def log_softmax(x: Any, axis: int = -1) -> Tensor:
    x = _tensor(x)
    return apply("log_softmax", x, axis=_single_axis(axis, x.ndim))


def dropout(x: Any, mask: Any, p: float) -> Tensor:
    """Inverted dropout with a given keep-mask: ``x * mask / (1 - p)``.

    Raises:
        ValueError: if `p` is not in [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Expected `p` in [0, 1), got {p!r}")
    return apply("dropout", x, _value(mask), p=float(p))


def _check_nchw(x: Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"Expected `{what}` of shape (N, C, H, W), got shape {x.shape}")


def conv2d(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0) -> Tensor:
    """2-D cross-correlation, NCHW input and (out, in, kh, kw) weight, as `torch.nn.Conv2d`.

    Raises:
        ValueError: on mismatched shapes or a non-positive stride / negative padding.
    """
    x, weight = _tensor(x), _tensor(weight)
    _check_nchw(x, "x")
    if weight.ndim != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"Expected `weight` of shape (out, {x.shape[1]}, kh, kw), got shape {weight.shape}"
        )
    stride, padding = _pair(stride), _pair(padding)
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"Expected `stride` >= 1 and `padding` >= 0, got {stride}, {padding}")
    out = apply("conv2d", x, weight, stride=stride, padding=padding)
    return out if bias is None else out + reshape(bias, (1, -1, 1, 1))


def _pool(op: str, x: Any, kernel_size: Any, stride: Any, padding: Any) -> Tensor:
    x = _tensor(x)
    _check_nchw(x, "x")
    kernel = _pair(kernel_size)
    stride = kernel if stride is None else _pair(stride)
    padding = _pair(padding)
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"Expected positive `kernel_size`/`stride`, got {kernel}, {stride}")
    return apply(op, x, kernel=kernel, stride=stride, padding=padding)


def max_pool2d(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Tensor:
    """Max pooling over NCHW windows (ties share the gradient)."""
    return _pool("max_pool2d", x, kernel_size, stride, padding)


def avg_pool2d(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Tensor:
    """Average pooling over NCHW windows (padding counts as zeros, as torch's default)."""
    return _pool("avg_pool2d", x, kernel_size, stride, padding)


def normalize(x: Any, axis: Any, eps: float = 1e-5) -> Tensor:
    x = _tensor(x)
    return apply("normalize", x, axis=normalize_axis(axis, x.ndim), eps=float(eps))


def layer_norm(
    x: Any, normalized_shape: Sequence[int], weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> Tensor:
    """Layer normalization over the trailing `normalized_shape` axes, with optional affine.

    Raises:
        ValueError: if `x` does not end with `normalized_shape`.
    """
    x = _tensor(x)
    k = len(tuple(normalized_shape))
    if k == 0 or x.shape[-k:] != tuple(normalized_shape):
        raise ValueError(
            f"Expected `normalized_shape` to match the last axes of x {x.shape}, "
            f"got {tuple(normalized_shape)}"
        )
    y = normalize(x, tuple(range(x.ndim - k, x.ndim)), eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def batch_norm(
    x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5, axis: int = 1
) -> Tensor:
    """Batch normalization in training mode: statistics over every axis but the channel `axis`."""
    x = _tensor(x)
    ch = normalize_axis(axis, x.ndim)[0]
    y = normalize(x, tuple(i for i in range(x.ndim) if i != ch), eps)
    shape = tuple(-1 if i == ch else 1 for i in range(x.ndim))
    y = y if weight is None else y * reshape(weight, shape)
    return y if bias is None else y + reshape(bias, shape)


def linear(x: Any, weight: Any, bias: Any = None) -> Tensor:
    """``x @ weight.T + bias``, as `torch.nn.Linear` (weight of shape (out, in))."""
    y = matmul(x, transpose(weight))
    return y if bias is None else y + bias


def mse(prediction: Any, target: Any) -> Tensor:
    """Mean squared error over all elements.

    Raises:
        ValueError: if the shapes differ.
    """
    p, y = _tensor(prediction), _tensor(target)
    if p.shape != y.shape:
        raise ValueError(f"Expected `target` of shape {p.shape}, got shape {y.shape}")
    return apply("mse", prediction, target)


def cross_entropy(logits: Any, target: Any) -> Tensor:
    """Mean cross-entropy of `logits` (..., classes) against integer labels or probabilities.

    Args:
        logits: unnormalized scores, classes on the last axis.
        target: integer class labels of shape ``logits.shape[:-1]``, or class probabilities
            of the same shape as `logits`.

    Returns:
        A scalar tensor, the mean over every position but the class axis.

    Raises:
        ValueError: if `target` has neither shape, or a label is out of range.
    """
    z = _tensor(logits)
    q = _value(target)
    shape = tuple(getattr(q, "shape", ()))
    if shape == z.shape[:-1]:
        xp = backend.namespace(q)
        n = z.shape[-1]
        lo, hi = int(xp.min(q)), int(xp.max(q))
        if lo < 0 or hi >= n:
            raise ValueError(f"Expected `target` labels in [0, {n}), got values from {lo} to {hi}")
        classes = xp.arange(n, device=backend.device_of(z.value))
        return apply("cross_entropy", z, xp.astype(q[..., None] == classes, z.dtype))
    if shape != z.shape:
        raise ValueError(
            f"Expected `target` of shape {z.shape[:-1]} (labels) or {z.shape} (probabilities), "
            f"got shape {shape}"
        )
    return apply("cross_entropy", z, target)
