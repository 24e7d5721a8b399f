"""The rule table: for every primitive op, its forward, its VJPs and its JVPs, side by side.

Each rule is a function of the array namespace `xp` first, so one rule serves NumPy, CuPy,
torch tensors or any other array-API module. Signatures (HIPS-autograd style):

- forward: ``fwd(xp, *args, **params) -> ans``
- VJP for argument i: ``vjp(xp, g, ans, *args, **params)``, the cotangent `g` pulled back
  through the op to argument i (``g @ J_i``).
- JVP for argument i: ``jvp(xp, t, ans, *args, **params)``, the tangent `t` of argument i
  pushed forward (``J_i @ t``; the engine broadcasts it to the output's shape).
- ``None`` in place of a VJP/JVP marks an argument that is a constant (a mask, labels).

Every rule is checked against central differences in float64 by ``tests/reference``.
Binary elementwise ops broadcast; their VJPs sum the cotangent back to each argument's shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graddiag.reference.backend import erf


class ForEachArg:
    """VJP/JVP lists for variadic ops (concat, stack): ``rule[i]`` binds the argument index."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __getitem__(self, i: int) -> Callable[..., Any]:
        return lambda xp, g, ans, *args, **kw: self.fn(xp, i, g, ans, *args, **kw)


@dataclass(frozen=True)
class Rule:
    """One primitive: forward, one VJP per argument, one JVP per argument."""

    fwd: Callable[..., Any]
    vjps: Sequence[Callable[..., Any]] | ForEachArg
    jvps: Sequence[Callable[..., Any]] | ForEachArg


RULES: dict[str, Rule] = {}


def defop(name: str, fwd: Callable[..., Any], vjps: Any, jvps: Any) -> None:
    """Register primitive `name` in the rule table."""
    RULES[name] = Rule(fwd, vjps, jvps)


# ---------------------------------------------------------------- helpers (shape bookkeeping)


def unbroadcast(xp: Any, g: Any, shape: tuple[int, ...]) -> Any:
    """Sum `g` over the axes that broadcasting added or stretched, back to `shape`."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = len(g.shape) - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return xp.reshape(xp.sum(g, axis=axes), shape) if axes else xp.reshape(g, shape)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def _ub(fn: Callable[..., Any], argnum: int) -> Callable[..., Any]:
    """Wrap a broadcasting VJP so its result has the shape of argument `argnum`."""
    return lambda xp, g, ans, *args, **kw: unbroadcast(
        xp, fn(xp, g, ans, *args, **kw), _shape(args[argnum])
    )


def _keep(xp: Any, g: Any, shape: tuple[int, ...], axis: tuple[int, ...], keepdims: bool) -> Any:
    """Reinsert reduced axes into `g` (size 1) so it broadcasts against the input."""
    if keepdims:
        return g
    return xp.reshape(g, tuple(1 if i in axis else n for i, n in enumerate(shape)))


def _count(shape: tuple[int, ...], axis: tuple[int, ...]) -> int:
    return math.prod(shape[i] for i in axis)


def _mask(xp: Any, cond: Any, like: Any) -> Any:
    return xp.astype(cond, like.dtype)


def _swap(xp: Any, a: Any) -> Any:
    axes = tuple(range(a.ndim - 2)) + (a.ndim - 1, a.ndim - 2)
    return xp.permute_dims(a, axes)


def _inverse(axes: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(axes)
    for i, a in enumerate(axes):
        inv[a] = i
    return tuple(inv)


def _sigmoid(xp: Any, x: Any) -> Any:
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)  # stable for large |x|, no overflow in exp


def _softmax(xp: Any, x: Any, axis: int) -> Any:
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def _log_softmax(xp: Any, x: Any, axis: int) -> Any:
    z = x - xp.max(x, axis=axis, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))


def _gelu_grad(xp: Any, x: Any, approximate: str) -> Any:
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        th = xp.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th**2) * c * (1.0 + 3 * 0.044715 * x**2)
    cdf = 0.5 * (1.0 + erf(xp, x / math.sqrt(2.0)))
    return cdf + x * xp.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)


def _gelu(xp: Any, x: Any, approximate: str) -> Any:
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + xp.tanh(c * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + erf(xp, x / math.sqrt(2.0)))


def _normalize_stats(xp: Any, x: Any, axis: tuple[int, ...], eps: float) -> tuple[Any, Any]:
    """(x - mean) / sqrt(var + eps) over `axis` (biased variance, as layer/batch norm use)."""
    centered = x - xp.mean(x, axis=axis, keepdims=True)
    inv_std = 1.0 / xp.sqrt(xp.mean(centered**2, axis=axis, keepdims=True) + eps)
    return centered * inv_std, inv_std


def _normalize_linear(xp: Any, v: Any, x: Any, axis: tuple[int, ...], eps: float) -> Any:
    # The Jacobian of normalization is symmetric, so this one map is both its VJP and its JVP.
    xhat, inv_std = _normalize_stats(xp, x, axis, eps)
    mean = lambda a: xp.mean(a, axis=axis, keepdims=True)  # noqa: E731
    return inv_std * (v - mean(v) - xhat * mean(v * xhat))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pad(xp: Any, x: Any, padding: tuple[int, int], fill: float = 0.0) -> Any:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * ph, w + 2 * pw), fill, dtype=x.dtype, device=x.device)
    out[:, :, ph : ph + h, pw : pw + w] = x
    return out


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _patches(
    xp: Any,
    x: Any,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    fill: float = 0.0,
) -> Any:
    """im2col: (N, C, H, W) -> (N, C, kh, kw, Ho, Wo), the window under each kernel offset."""
    (kh, kw), (sh, sw) = kernel, stride
    xp_ = _pad(xp, x, padding, fill)
    ho = _out_size(x.shape[2], kh, sh, padding[0])
    wo = _out_size(x.shape[3], kw, sw, padding[1])
    rows = [
        xp.stack(
            [
                xp_[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
                for j in range(kw)
            ],
            axis=2,
        )
        for i in range(kh)
    ]
    return xp.stack(rows, axis=2)


def _patches_adjoint(
    xp: Any,
    cols: Any,
    x_shape: tuple[int, ...],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> Any:
    """col2im, the transpose of `_patches`: add every window back where it came from."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    ho, wo = cols.shape[4], cols.shape[5]
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype, device=cols.device)
    for i in range(kh):
        for j in range(kw):
            win = (
                slice(None),
                slice(None),
                slice(i, i + sh * (ho - 1) + 1, sh),
                slice(j, j + sw * (wo - 1) + 1, sw),
            )
            out[win] = out[win] + cols[:, :, i, j, ...]
    return out[:, :, ph : ph + h, pw : pw + w]


def _conv2d(xp: Any, x: Any, w: Any, stride: Any, padding: Any) -> Any:
    o, c, kh, kw = w.shape
    cols = _patches(xp, x, (kh, kw), stride, padding)
    n, _, _, _, ho, wo = cols.shape
    out = xp.matmul(xp.reshape(w, (o, c * kh * kw)), xp.reshape(cols, (n, c * kh * kw, ho * wo)))
    return xp.reshape(out, (n, o, ho, wo))


def _conv2d_vjp_x(xp: Any, g: Any, ans: Any, x: Any, w: Any, stride: Any, padding: Any) -> Any:
    o, c, kh, kw = w.shape
    n, _, ho, wo = g.shape
    dcols = xp.matmul(_swap(xp, xp.reshape(w, (o, c * kh * kw))), xp.reshape(g, (n, o, ho * wo)))
    dcols = xp.reshape(dcols, (n, c, kh, kw, ho, wo))
    return _patches_adjoint(xp, dcols, x.shape, (kh, kw), stride, padding)


def _conv2d_vjp_w(xp: Any, g: Any, ans: Any, x: Any, w: Any, stride: Any, padding: Any) -> Any:
    o, c, kh, kw = w.shape
    n, _, ho, wo = g.shape
    cols = xp.reshape(_patches(xp, x, (kh, kw), stride, padding), (n, c * kh * kw, ho * wo))
    dw = xp.sum(xp.matmul(xp.reshape(g, (n, o, ho * wo)), _swap(xp, cols)), axis=0)
    return xp.reshape(dw, w.shape)


def _pool_windows(xp: Any, x: Any, kernel: Any, stride: Any, padding: Any, fill: float) -> Any:
    cols = _patches(xp, x, kernel, stride, padding, fill)
    n, c, kh, kw, ho, wo = cols.shape
    return xp.reshape(cols, (n, c, kh * kw, ho, wo))


def _max_pool_mask(xp: Any, ans: Any, x: Any, kernel: Any, stride: Any, padding: Any) -> Any:
    win = _pool_windows(xp, x, kernel, stride, padding, -math.inf)
    hit = _mask(xp, win == ans[:, :, None, ...], x)
    return hit / xp.sum(hit, axis=2, keepdims=True)  # ties share the gradient


def _unwindow(xp: Any, dwin: Any, x: Any, kernel: Any, stride: Any, padding: Any) -> Any:
    n, c, _, ho, wo = dwin.shape
    cols = xp.reshape(dwin, (n, c, kernel[0], kernel[1], ho, wo))
    return _patches_adjoint(xp, cols, x.shape, kernel, stride, padding)


def _take_vjp(xp: Any, g: Any, ans: Any, x: Any, idx: Any) -> Any:
    # Scatter-add as a one-hot matmul: the array API has no index_add.
    rows = x.shape[0]
    flat = xp.reshape(idx, (-1,))
    onehot = _mask(xp, flat[:, None] == xp.arange(rows, device=x.device)[None, :], g)
    gflat = xp.reshape(g, (flat.shape[0], -1))
    return xp.reshape(xp.matmul(_swap(xp, onehot), gflat), x.shape)


def _take(xp: Any, x: Any, idx: Any) -> Any:
    out = xp.take(x, xp.reshape(idx, (-1,)), axis=0)
    return xp.reshape(out, tuple(idx.shape) + tuple(x.shape[1:]))


def _getitem_vjp(xp: Any, g: Any, ans: Any, x: Any, key: Any) -> Any:
    out = xp.zeros(x.shape, dtype=g.dtype, device=g.device)
    out[key] = g
    return out


def _scatter_add(xp: Any, v: Any, key: Any, shape: tuple[int, ...]) -> Any:
    """Zeros of `shape` with `v` added at ``[key]``; repeated indices accumulate."""
    if hasattr(getattr(xp, "add", None), "at"):  # NumPy, CuPy
        out = xp.zeros(shape, dtype=v.dtype)
        xp.add.at(out, key, v)
        return out
    # torch: the flat position of every indexed element, then one index_add_
    n = math.prod(shape)
    positions = xp.reshape(xp.arange(n, device=v.device), shape)[key]
    out = xp.zeros((n,), dtype=v.dtype, device=v.device)
    out = out.index_add_(0, xp.reshape(positions, (-1,)), xp.reshape(v, (-1,)))
    return xp.reshape(out, shape)


def _index_vjp(xp: Any, g: Any, ans: Any, x: Any, key: Any) -> Any:
    return _scatter_add(xp, g, key, tuple(x.shape))


def _erf_grad(xp: Any, x: Any) -> Any:
    return 2.0 / math.sqrt(math.pi) * xp.exp(-(x**2))


def _concat_vjp(xp: Any, i: int, g: Any, ans: Any, *xs: Any, axis: int) -> Any:
    start = sum(x.shape[axis] for x in xs[:i])
    key = (slice(None),) * (axis % g.ndim) + (slice(start, start + xs[i].shape[axis]), ...)
    return g[key]


def _stack_vjp(xp: Any, i: int, g: Any, ans: Any, *xs: Any, axis: int) -> Any:
    return g[(slice(None),) * (axis % g.ndim) + (i, ...)]


def _concat_jvp(xp: Any, i: int, t: Any, ans: Any, *xs: Any, axis: int) -> Any:
    return xp.concat([t if j == i else xp.zeros_like(x) for j, x in enumerate(xs)], axis=axis)


def _stack_jvp(xp: Any, i: int, t: Any, ans: Any, *xs: Any, axis: int) -> Any:
    return xp.stack([t if j == i else xp.zeros_like(x) for j, x in enumerate(xs)], axis=axis)


def _ce_batch(logits: Any) -> int:
    return math.prod(logits.shape[:-1])


# ---------------------------------------------------------------------------- the rule table
# Elementwise arithmetic (broadcasting).
defop(
    "add",
    lambda xp, x, y: x + y,
    [_ub(lambda xp, g, ans, x, y: g, 0), _ub(lambda xp, g, ans, x, y: g, 1)],
    [lambda xp, t, ans, x, y: t, lambda xp, t, ans, x, y: t],
)
defop(
    "sub",
    lambda xp, x, y: x - y,
    [_ub(lambda xp, g, ans, x, y: g, 0), _ub(lambda xp, g, ans, x, y: -g, 1)],
    [lambda xp, t, ans, x, y: t, lambda xp, t, ans, x, y: -t],
)
defop(
    "mul",
    lambda xp, x, y: x * y,
    [_ub(lambda xp, g, ans, x, y: g * y, 0), _ub(lambda xp, g, ans, x, y: g * x, 1)],
    [lambda xp, t, ans, x, y: t * y, lambda xp, t, ans, x, y: x * t],
)
defop(
    "div",
    lambda xp, x, y: x / y,
    [_ub(lambda xp, g, ans, x, y: g / y, 0), _ub(lambda xp, g, ans, x, y: -g * ans / y, 1)],
    [lambda xp, t, ans, x, y: t / y, lambda xp, t, ans, x, y: -t * ans / y],
)
defop(
    "pow",
    lambda xp, x, y: x**y,
    [
        _ub(lambda xp, g, ans, x, y: g * y * x ** (y - 1), 0),
        _ub(lambda xp, g, ans, x, y: g * ans * xp.log(x), 1),
    ],
    [lambda xp, t, ans, x, y: t * y * x ** (y - 1), lambda xp, t, ans, x, y: t * ans * xp.log(x)],
)
defop(
    "maximum",
    lambda xp, x, y: xp.maximum(x, y),
    [
        _ub(lambda xp, g, ans, x, y: g * _mask(xp, x > y, g) + 0.5 * g * _mask(xp, x == y, g), 0),
        _ub(lambda xp, g, ans, x, y: g * _mask(xp, y > x, g) + 0.5 * g * _mask(xp, x == y, g), 1),
    ],
    [
        lambda xp, t, ans, x, y: t * (_mask(xp, x > y, ans) + 0.5 * _mask(xp, x == y, ans)),
        lambda xp, t, ans, x, y: t * (_mask(xp, y > x, ans) + 0.5 * _mask(xp, x == y, ans)),
    ],
)
defop(
    "minimum",
    lambda xp, x, y: xp.minimum(x, y),
    [
        _ub(lambda xp, g, ans, x, y: g * _mask(xp, x < y, g) + 0.5 * g * _mask(xp, x == y, g), 0),
        _ub(lambda xp, g, ans, x, y: g * _mask(xp, y < x, g) + 0.5 * g * _mask(xp, x == y, g), 1),
    ],
    [
        lambda xp, t, ans, x, y: t * (_mask(xp, x < y, ans) + 0.5 * _mask(xp, x == y, ans)),
        lambda xp, t, ans, x, y: t * (_mask(xp, y < x, ans) + 0.5 * _mask(xp, x == y, ans)),
    ],
)
defop(
    "where",
    lambda xp, c, x, y: xp.where(c, x, y),
    [
        None,
        _ub(lambda xp, g, ans, c, x, y: xp.where(c, g, xp.zeros_like(g)), 1),
        _ub(lambda xp, g, ans, c, x, y: xp.where(c, xp.zeros_like(g), g), 2),
    ],
    [
        None,
        lambda xp, t, ans, c, x, y: xp.where(c, t, xp.zeros_like(ans)),
        lambda xp, t, ans, c, x, y: xp.where(c, xp.zeros_like(ans), t),
    ],
)

# Elementwise unary.
defop("neg", lambda xp, x: -x, [lambda xp, g, ans, x: -g], [lambda xp, t, ans, x: -t])
defop(
    "exp", lambda xp, x: xp.exp(x), [lambda xp, g, ans, x: g * ans], [lambda xp, t, ans, x: t * ans]
)
defop("log", lambda xp, x: xp.log(x), [lambda xp, g, ans, x: g / x], [lambda xp, t, ans, x: t / x])
defop(
    "sqrt",
    lambda xp, x: xp.sqrt(x),
    [lambda xp, g, ans, x: g * 0.5 / ans],
    [lambda xp, t, ans, x: t * 0.5 / ans],
)
defop(
    "abs",
    lambda xp, x: xp.abs(x),
    [lambda xp, g, ans, x: g * xp.sign(x)],
    [lambda xp, t, ans, x: t * xp.sign(x)],
)
defop(
    "tanh",
    lambda xp, x: xp.tanh(x),
    [lambda xp, g, ans, x: g * (1.0 - ans**2)],
    [lambda xp, t, ans, x: t * (1.0 - ans**2)],
)
defop(
    "sigmoid",
    _sigmoid,
    [lambda xp, g, ans, x: g * ans * (1.0 - ans)],
    [lambda xp, t, ans, x: t * ans * (1.0 - ans)],
)
defop(
    "relu",
    lambda xp, x: xp.maximum(x, xp.zeros_like(x)),
    [lambda xp, g, ans, x: g * _mask(xp, x > 0, g)],
    [lambda xp, t, ans, x: t * _mask(xp, x > 0, t)],
)
defop(
    "gelu",
    _gelu,
    [lambda xp, g, ans, x, approximate: g * _gelu_grad(xp, x, approximate)],
    [lambda xp, t, ans, x, approximate: t * _gelu_grad(xp, x, approximate)],
)
defop(
    "erf",
    lambda xp, x: erf(xp, x),
    [lambda xp, g, ans, x: g * _erf_grad(xp, x)],
    [lambda xp, t, ans, x: t * _erf_grad(xp, x)],
)
defop(
    "softplus",
    lambda xp, x: xp.log1p(xp.exp(-xp.abs(x))) + xp.maximum(x, xp.zeros_like(x)),
    [lambda xp, g, ans, x: g * _sigmoid(xp, x)],
    [lambda xp, t, ans, x: t * _sigmoid(xp, x)],
)
defop(
    "dropout",
    lambda xp, x, mask, p: x * mask / (1.0 - p),
    [lambda xp, g, ans, x, mask, p: g * mask / (1.0 - p), None],
    [lambda xp, t, ans, x, mask, p: t * mask / (1.0 - p), None],
)

# Linear algebra.
defop(
    "matmul",
    lambda xp, a, b: xp.matmul(a, b),
    [
        _ub(lambda xp, g, ans, a, b: xp.matmul(g, _swap(xp, b)), 0),
        _ub(lambda xp, g, ans, a, b: xp.matmul(_swap(xp, a), g), 1),
    ],
    [lambda xp, t, ans, a, b: xp.matmul(t, b), lambda xp, t, ans, a, b: xp.matmul(a, t)],
)

# Reductions (axis is a tuple of non-negative ints; the engine normalizes it).
defop(
    "sum",
    lambda xp, x, axis, keepdims: xp.sum(x, axis=axis, keepdims=keepdims),
    [
        lambda xp, g, ans, x, axis, keepdims: xp.broadcast_to(
            _keep(xp, g, x.shape, axis, keepdims), x.shape
        )
    ],
    [lambda xp, t, ans, x, axis, keepdims: xp.sum(t, axis=axis, keepdims=keepdims)],
)
defop(
    "mean",
    lambda xp, x, axis, keepdims: xp.mean(x, axis=axis, keepdims=keepdims),
    [
        lambda xp, g, ans, x, axis, keepdims: (
            xp.broadcast_to(_keep(xp, g, x.shape, axis, keepdims), x.shape) / _count(x.shape, axis)
        )
    ],
    [lambda xp, t, ans, x, axis, keepdims: xp.mean(t, axis=axis, keepdims=keepdims)],
)


def _max_share(xp: Any, ans: Any, x: Any, axis: tuple[int, ...], keepdims: bool) -> Any:
    hit = _mask(xp, x == _keep(xp, ans, x.shape, axis, keepdims), x)
    return hit / xp.sum(hit, axis=axis, keepdims=True)  # ties share the gradient


defop(
    "max",
    lambda xp, x, axis, keepdims: xp.max(x, axis=axis, keepdims=keepdims),
    [
        lambda xp, g, ans, x, axis, keepdims: (
            _keep(xp, g, x.shape, axis, keepdims) * _max_share(xp, ans, x, axis, keepdims)
        )
    ],
    [
        lambda xp, t, ans, x, axis, keepdims: xp.sum(
            t * _max_share(xp, ans, x, axis, keepdims), axis=axis, keepdims=keepdims
        )
    ],
)


def _logsumexp(xp: Any, x: Any, axis: tuple[int, ...], keepdims: bool) -> Any:
    m = xp.max(x, axis=axis, keepdims=True)
    out = m + xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True))
    return (
        out
        if keepdims
        else xp.reshape(out, tuple(n for i, n in enumerate(x.shape) if i not in axis))
    )


defop(
    "logsumexp",
    _logsumexp,
    [
        lambda xp, g, ans, x, axis, keepdims: (
            _keep(xp, g, x.shape, axis, keepdims)
            * xp.exp(x - _keep(xp, ans, x.shape, axis, keepdims))
        )
    ],
    [
        lambda xp, t, ans, x, axis, keepdims: xp.sum(
            t * xp.exp(x - _keep(xp, ans, x.shape, axis, keepdims)), axis=axis, keepdims=keepdims
        )
    ],
)

# Shape ops.
defop(
    "reshape",
    lambda xp, x, shape: xp.reshape(x, shape),
    [lambda xp, g, ans, x, shape: xp.reshape(g, x.shape)],
    [lambda xp, t, ans, x, shape: xp.reshape(t, shape)],
)
defop(
    "transpose",
    lambda xp, x, axes: xp.permute_dims(x, axes),
    [lambda xp, g, ans, x, axes: xp.permute_dims(g, _inverse(axes))],
    [lambda xp, t, ans, x, axes: xp.permute_dims(t, axes)],
)
defop(
    "broadcast_to",
    lambda xp, x, shape: xp.broadcast_to(x, shape),
    [lambda xp, g, ans, x, shape: unbroadcast(xp, g, x.shape)],
    [lambda xp, t, ans, x, shape: xp.broadcast_to(t, shape)],
)
defop("getitem", lambda xp, x, key: x[key], [_getitem_vjp], [lambda xp, t, ans, x, key: t[key]])
defop("take", _take, [_take_vjp, None], [lambda xp, t, ans, x, idx: _take(xp, t, idx), None])
defop(
    "index",  # advanced (integer-array) indexing: gathers, embeddings
    lambda xp, x, key: x[key],
    [_index_vjp],
    [lambda xp, t, ans, x, key: xp.broadcast_to(t, x.shape)[key]],
)
defop(
    "index_add",  # the adjoint of index: zeros of `shape` with v added at [key]
    lambda xp, v, key, shape: _scatter_add(xp, v, key, shape),
    [lambda xp, g, ans, v, key, shape: g[key]],
    [lambda xp, t, ans, v, key, shape: _scatter_add(xp, xp.broadcast_to(t, v.shape), key, shape)],
)
defop(
    "concat",
    lambda xp, *xs, axis: xp.concat(list(xs), axis=axis),
    ForEachArg(_concat_vjp),
    ForEachArg(_concat_jvp),
)
defop(
    "stack",
    lambda xp, *xs, axis: xp.stack(list(xs), axis=axis),
    ForEachArg(_stack_vjp),
    ForEachArg(_stack_jvp),
)

# Normalized exponentials (axis is one int).
defop(
    "softmax",
    lambda xp, x, axis: _softmax(xp, x, axis),
    [lambda xp, g, ans, x, axis: ans * (g - xp.sum(g * ans, axis=axis, keepdims=True))],
    [lambda xp, t, ans, x, axis: ans * (t - xp.sum(t * ans, axis=axis, keepdims=True))],
)
defop(
    "log_softmax",
    lambda xp, x, axis: _log_softmax(xp, x, axis),
    [lambda xp, g, ans, x, axis: g - xp.exp(ans) * xp.sum(g, axis=axis, keepdims=True)],
    [lambda xp, t, ans, x, axis: t - xp.sum(xp.exp(ans) * t, axis=axis, keepdims=True)],
)

# Convolution and pooling (NCHW; kernel/stride/padding are (h, w) pairs).
defop(
    "conv2d",
    _conv2d,
    [_conv2d_vjp_x, _conv2d_vjp_w],
    [
        lambda xp, t, ans, x, w, stride, padding: _conv2d(xp, t, w, stride, padding),
        lambda xp, t, ans, x, w, stride, padding: _conv2d(xp, x, t, stride, padding),
    ],
)
defop(
    "max_pool2d",
    lambda xp, x, kernel, stride, padding: xp.max(
        _pool_windows(xp, x, kernel, stride, padding, -math.inf), axis=2
    ),
    [
        lambda xp, g, ans, x, kernel, stride, padding: _unwindow(
            xp,
            g[:, :, None, ...] * _max_pool_mask(xp, ans, x, kernel, stride, padding),
            x,
            kernel,
            stride,
            padding,
        )
    ],
    [
        lambda xp, t, ans, x, kernel, stride, padding: xp.sum(
            _pool_windows(xp, t, kernel, stride, padding, 0.0)
            * _max_pool_mask(xp, ans, x, kernel, stride, padding),
            axis=2,
        )
    ],
)
defop(
    "avg_pool2d",
    lambda xp, x, kernel, stride, padding: xp.mean(
        _pool_windows(xp, x, kernel, stride, padding, 0.0), axis=2
    ),
    [
        lambda xp, g, ans, x, kernel, stride, padding: _unwindow(
            xp,
            xp.broadcast_to(
                g[:, :, None, ...],
                (g.shape[0], g.shape[1], kernel[0] * kernel[1]) + tuple(g.shape[2:]),
            )
            / (kernel[0] * kernel[1]),
            x,
            kernel,
            stride,
            padding,
        )
    ],
    [
        lambda xp, t, ans, x, kernel, stride, padding: xp.mean(
            _pool_windows(xp, t, kernel, stride, padding, 0.0), axis=2
        )
    ],
)

# Normalization: (x - mean) / sqrt(var + eps) over `axis`; layer and batch norm add the affine.
defop(
    "normalize",
    lambda xp, x, axis, eps: _normalize_stats(xp, x, axis, eps)[0],
    [lambda xp, g, ans, x, axis, eps: _normalize_linear(xp, g, x, axis, eps)],
    [lambda xp, t, ans, x, axis, eps: _normalize_linear(xp, t, x, axis, eps)],
)

# Losses (mean over the batch; cross-entropy takes class probabilities over the last axis).
defop(
    "mse",
    lambda xp, p, y: xp.mean((p - y) ** 2),
    [
        lambda xp, g, ans, p, y: g * 2.0 * (p - y) / math.prod(p.shape),
        lambda xp, g, ans, p, y: -g * 2.0 * (p - y) / math.prod(p.shape),
    ],
    [
        lambda xp, t, ans, p, y: xp.mean(2.0 * (p - y) * t),
        lambda xp, t, ans, p, y: -xp.mean(2.0 * (p - y) * t),
    ],
)
defop(
    "cross_entropy",
    lambda xp, z, q: -xp.sum(q * _log_softmax(xp, z, -1)) / _ce_batch(z),
    [
        lambda xp, g, ans, z, q: (
            g * (_softmax(xp, z, -1) * xp.sum(q, axis=-1, keepdims=True) - q) / _ce_batch(z)
        ),
        lambda xp, g, ans, z, q: -g * _log_softmax(xp, z, -1) / _ce_batch(z),
    ],
    [
        lambda xp, t, ans, z, q: (
            xp.sum((_softmax(xp, z, -1) * xp.sum(q, axis=-1, keepdims=True) - q) * t) / _ce_batch(z)
        ),
        lambda xp, t, ans, z, q: -xp.sum(_log_softmax(xp, z, -1) * t) / _ce_batch(z),
    ],
)
