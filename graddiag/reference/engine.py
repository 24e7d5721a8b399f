"""A reverse-mode autodiff engine on arrays, in the spirit of micrograd.

Every op records its inputs on the output `Tensor`; `Tensor.backward()` sorts the graph
topologically and walks it once in reverse, asking the rule table (`ops.RULES`) for each
input's share of the gradient. A tensor may also carry a `tangent`: forward mode rides along
the same ops (dual numbers), see `graddiag.reference.forward`.

The worked example: E = (w·x − y)² with x = 2, y = 10, w = 3. Forward: w·x − y = −4, E = 16.
Backward: dE/dw = 2·(w·x − y)·x = 2·(−4)·2 = −16.

>>> w = Tensor(3.0, requires_grad=True)
>>> E = (w * 2.0 - 10.0) ** 2
>>> E.backward()
>>> float(E.value), float(w.grad)
(16.0, -16.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graddiag.reference import backend
from graddiag.reference.ops import RULES


class Tensor:
    """An array-valued node of the computation graph.

    Args:
        value: an array (NumPy, array-API, torch tensor) or a Python number / nested list, which
            becomes a float64 NumPy array.
        requires_grad: whether `backward()` should compute this tensor's gradient.
        name: an optional label used in error messages and reports (e.g. a parameter name).
        tangent: an optional forward-mode tangent (same shape as `value`).

    Example:
        >>> x = Tensor([1.0, 2.0], requires_grad=True)
        >>> (x * x).sum().backward()
        >>> x.grad.tolist()
        [2.0, 4.0]
    """

    __array_priority__ = 1000  # so that `ndarray + Tensor` defers to Tensor.__radd__

    def __init__(
        self, value: Any, requires_grad: bool = False, name: str | None = None, tangent: Any = None
    ) -> None:
        self.value = _as_array(value, "value")
        self.requires_grad = bool(requires_grad)
        self.name = name
        self.grad: Any = None
        self.tangent = tangent
        self._op: str | None = None
        self._args: tuple[Any, ...] = ()
        self._params: dict[str, Any] = {}
        self._parents: tuple[tuple[int, Tensor], ...] = ()

    # ------------------------------------------------------------------ array-like properties
    @property
    def xp(self) -> Any:
        return backend.namespace(self.value)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def ndim(self) -> int:
        return len(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    def __repr__(self) -> str:
        label = f", name={self.name!r}" if self.name else ""
        op = f", op={self._op!r}" if self._op else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{op}{label})"

    # -------------------------------------------------------------------------- reverse mode
    def backward(self, grad: Any = None) -> None:
        """Compute d(self)/d(t) for every tensor `t` in the graph that requires a gradient.

        The gradients are stored in `t.grad` (overwritten, not accumulated).

        Args:
            grad: the cotangent to start from; defaults to ones (so a scalar loss gets dL/dL = 1).

        Raises:
            ValueError: if `grad` does not have the shape of this tensor.
        """
        xp = self.xp
        if grad is None:
            grad = xp.ones(self.value.shape, dtype=self.dtype, device=backend.device_of(self.value))
        elif tuple(grad.shape) != self.shape:
            raise ValueError(
                f"Expected `grad` of shape {self.shape}, got shape {tuple(grad.shape)}"
            )
        grads: dict[int, Any] = {id(self): grad}
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            node.grad = g
            rule = RULES.get(node._op) if node._op else None
            for i, parent in node._parents:
                share = rule.vjps[i](xp, g, node.value, *node._args, **node._params)
                grads[id(parent)] = share if id(parent) not in grads else grads[id(parent)] + share

    # ------------------------------------------------------------------------------ operators
    def __add__(self, other: Any) -> Tensor:
        return apply("add", self, other)

    def __radd__(self, other: Any) -> Tensor:
        return apply("add", other, self)

    def __sub__(self, other: Any) -> Tensor:
        return apply("sub", self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return apply("sub", other, self)

    def __mul__(self, other: Any) -> Tensor:
        return apply("mul", self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return apply("mul", other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return apply("div", self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return apply("div", other, self)

    def __pow__(self, other: Any) -> Tensor:
        return apply("pow", self, other)

    def __rpow__(self, other: Any) -> Tensor:
        return apply("pow", other, self)

    def __neg__(self) -> Tensor:
        return apply("neg", self)

    def __matmul__(self, other: Any) -> Tensor:
        return apply("matmul", self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return apply("matmul", other, self)

    def __getitem__(self, key: Any) -> Tensor:
        return apply("getitem", self, key=_check_key(key))

    # ------------------------------------------------------------------- common method forms
    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return apply("sum", self, axis=normalize_axis(axis, self.ndim), keepdims=keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return apply("mean", self, axis=normalize_axis(axis, self.ndim), keepdims=keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return apply("max", self, axis=normalize_axis(axis, self.ndim), keepdims=keepdims)

    def reshape(self, *shape: Any) -> Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], Sequence) else shape
        return apply("reshape", self, shape=tuple(int(n) for n in shape))

    def transpose(self, *axes: int) -> Tensor:
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], Sequence) else axes
        axes = axes or tuple(reversed(range(self.ndim)))
        return apply("transpose", self, axes=tuple(a % self.ndim for a in axes))

    @property
    def T(self) -> Tensor:  # noqa: N802 - the NumPy spelling
        return self.transpose()


def _as_array(value: Any, what: str) -> Any:
    if isinstance(value, Tensor):
        return value.value
    if isinstance(value, bool | int | float | list | tuple):
        return np.asarray(value, dtype=np.float64)
    if backend.namespace(value) is np and not isinstance(value, np.ndarray | np.generic):
        raise TypeError(f"Expected `{what}` to be an array or a number, got {value!r}")
    return value


def _check_key(key: Any) -> Any:
    parts = key if isinstance(key, tuple) else (key,)
    for k in parts:
        if not (k is None or k is Ellipsis or isinstance(k, int | slice)):
            raise TypeError(
                f"Expected basic indexing (ints, slices, None, ...), got {k!r}; use `take` for "
                "integer-array gathers"
            )
    return key


def normalize_axis(axis: Any, ndim: int) -> tuple[int, ...]:
    """`axis` as a sorted tuple of non-negative ints (None means all axes).

    Raises:
        ValueError: if an axis is out of range for an array with `ndim` dimensions.
    """
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"Expected `axis` in [{-ndim}, {ndim}), got {axis!r}")
    return tuple(sorted(a % max(ndim, 1) for a in axes))


def _topological_order(root: Tensor) -> list[Tensor]:
    """Inputs before outputs (iterative depth-first search, so deep graphs do not recurse)."""
    order: list[Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for _, p in node._parents if id(p) not in seen)
    return order


def apply(op: str, *args: Any, **params: Any) -> Tensor:
    """Run primitive `op` on `args` and record it in the graph.

    Tensors among `args` are differentiable inputs; anything else (arrays, numbers, masks,
    labels) is a constant. Arrays and numbers are combined with tensors as they are, so a
    float64 NumPy constant next to a torch tensor is an error from the array library.

    Args:
        op: a name in `ops.RULES`.
        *args: the op's positional inputs.
        **params: the op's static parameters (axis, stride, ...).

    Returns:
        The output tensor; it requires a gradient when any input does, and carries a tangent
        when any input does.

    Raises:
        KeyError: if `op` is not in the rule table.
    """
    if op not in RULES:
        raise KeyError(f"Expected `op` to be one of {sorted(RULES)}, got {op!r}")
    rule = RULES[op]
    raw = tuple(a.value if isinstance(a, Tensor) else a for a in args)
    xp = backend.namespace(*raw)
    out = Tensor(rule.fwd(xp, *raw, **params))
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    parents = tuple((i, a) for i, a in tensors if a.requires_grad)
    for i, a in parents:
        if rule.vjps[i] is None:
            raise ValueError(
                f"Argument {i} of `{op}` is a constant (a mask, labels or a condition), got a "
                f"tensor that requires a gradient: {a!r}"
            )
    if parents:
        out.requires_grad = True
        out._op, out._args, out._params, out._parents = op, raw, params, parents
    tangents = [(i, a.tangent) for i, a in tensors if a.tangent is not None]
    if tangents:
        total = None
        for i, t in tangents:
            push = rule.jvps[i](xp, t, out.value, *raw, **params)
            total = push if total is None else total + push
        out.tangent = xp.broadcast_to(total, out.value.shape)
    return out
