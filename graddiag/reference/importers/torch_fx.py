"""Translate a torch model into the engine's graph with `torch.fx`, weights included.

`torch.fx` records the model's forward as a list of nodes (placeholders, parameters, module
calls, function calls, method calls). `TorchGraph` replays that list with engine tensors in
float64, one handler per supported module, function or method. Anything else is an
`UnsupportedOpError` naming it. A custom `torch.autograd.Function` is kept opaque (fx would
otherwise trace through its forward and never see its backward): it runs as an engine
"external" op differentiated by central differences, so its hand-written backward can be
checked.
"""

from __future__ import annotations

import builtins
import contextlib
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graddiag.reference import functional as F
from graddiag.reference.engine import Tensor
from graddiag.reference.gradcheck import external


class UnsupportedOpError(NotImplementedError):
    """The importer met an op it has no engine translation for."""


class CustomFunction:
    """The fx call target standing for `cls.apply`, so the Function stays one node."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.__name__ = cls.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.cls.apply(*args, **kwargs)


@contextlib.contextmanager
def _opaque_custom_functions() -> Iterator[None]:
    """While tracing, record `SomeFunction.apply(proxy, ...)` as one call node."""
    import torch
    import torch.fx

    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        proxies = [a for a in args if isinstance(a, torch.fx.Proxy)]
        if proxies:
            return proxies[0].tracer.create_proxy(
                "call_function", CustomFunction(cls), args, kwargs
            )
        return original.__func__(cls, *args, **kwargs)

    function.apply = classmethod(apply)
    try:
        yield
    finally:
        function.apply = original


def trace(model: Any) -> Any:
    """The `torch.fx.Graph` of `model.forward`, custom autograd Functions kept as single nodes.

    Raises:
        UnsupportedOpError: if fx cannot trace the model (data-dependent control flow...).
    """
    import torch.fx

    with _opaque_custom_functions():
        try:
            return torch.fx.Tracer().trace(model)
        except Exception as exc:  # fx raises many types; the user needs the reason and a fix
            raise UnsupportedOpError(
                f"torch.fx could not trace {type(model).__name__}: {exc}. Models with "
                "data-dependent Python control flow cannot be imported; move it out of forward()."
            ) from exc


@dataclass
class CustomCall:
    """One call of an opaque custom Function during an engine run, for later checking."""

    name: str
    function: Any
    inputs: list[np.ndarray]


@dataclass
class TorchGraph:
    """A torch model replayed by the engine.

    Attributes:
        model: the torch module (its parameters are read in float64).
        graph: its fx graph.
        parameters: float64 NumPy copies of the trainable parameters, by qualified name.
        custom_calls: the custom Functions met by the last run, with their inputs.
    """

    model: Any
    graph: Any
    parameters: dict[str, np.ndarray] = field(default_factory=dict)
    custom_calls: list[CustomCall] = field(default_factory=list)

    def __call__(self, params: dict[str, Tensor], *inputs: Any) -> Any:
        """Run the model in the engine with parameter tensors `params` on `inputs`."""
        import torch

        env: dict[Any, Any] = {}
        feed = iter(inputs)
        self.custom_calls = []
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = _from_torch(next(feed))
            elif node.op == "get_attr":
                env[node] = (
                    params[node.target]
                    if node.target in params
                    else _from_torch(_attr(self.model, node.target))
                )
            elif node.op == "output":
                return _map(node.args[0], env)
            else:
                args, kwargs = _map(node.args, env), _map(node.kwargs, env)
                env[node] = self._call(node, args, kwargs, params, torch)
        raise UnsupportedOpError("the fx graph has no output node")

    def _call(
        self, node: Any, args: Any, kwargs: Any, params: dict[str, Tensor], torch: Any
    ) -> Any:
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            handler = MODULES.get(type(module))
            if handler is None:
                raise UnsupportedOpError(
                    f"module `{node.target}` of type {type(module).__name__} is not supported by "
                    f"the reference importer (supported: {sorted(t.__name__ for t in MODULES)})"
                )
            weights = {
                k: params[f"{node.target}.{k}"]
                if f"{node.target}.{k}" in params
                else _from_torch(getattr(module, k, None))
                for k in ("weight", "bias")
            }
            return handler(module, weights, *args, **kwargs)
        if node.op == "call_method":
            handler = METHODS.get(node.target)
            if handler is None:
                raise UnsupportedOpError(f"tensor method `.{node.target}()` is not supported")
            return handler(*args, **kwargs)
        target = node.target
        if isinstance(target, CustomFunction):
            return self._custom(target, args, torch)
        handler = FUNCTIONS.get(target)
        if handler is None:
            name = getattr(target, "__qualname__", None) or repr(target)
            module = getattr(target, "__module__", "") or ""
            raise UnsupportedOpError(f"function `{module}.{name}` is not supported")
        return handler(*args, **kwargs)

    def _custom(self, target: CustomFunction, args: Any, torch: Any) -> Tensor:
        def fn(*arrays: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = target(*[torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays])
            return out.double().numpy()

        arrays = [a.value if isinstance(a, Tensor) else np.asarray(a) for a in args]
        self.custom_calls.append(CustomCall(target.__name__, target, arrays))
        return external(fn, *args, name=target.__name__)


def import_torch(model: Any) -> TorchGraph:
    """Trace `model` and gather its trainable parameters in float64.

    Args:
        model: a `torch.nn.Module`.

    Returns:
        A `TorchGraph`; call it as ``graph(params, *inputs)`` with engine tensors for the
        parameters (see `TorchGraph.parameters`).

    Raises:
        TypeError: if `model` is not a torch module.
        UnsupportedOpError: if it cannot be traced.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}")
    graph = trace(model)
    params = {
        name: p.detach().cpu().double().numpy()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return TorchGraph(model, graph, params)


# ------------------------------------------------------------------------------- helpers


def _attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _from_torch(x: Any) -> Any:
    """Torch tensors become float64 NumPy arrays (integers stay integers); others pass."""
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        arr = x.detach().cpu().numpy()
        return arr.astype(np.float64) if np.issubdtype(arr.dtype, np.floating) else arr
    return x


def _map(value: Any, env: dict[Any, Any]) -> Any:
    if isinstance(value, tuple | list):
        return type(value)(_map(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, env) for k, v in value.items()}
    return env[value] if hasattr(value, "op") and value in env else value


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _ndim(x: Any) -> int:
    return len(_shape(x))


def _t(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _resolve_shape(x: Any, shape: Any) -> tuple[int, ...]:
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
    return tuple(int(n) for n in shape)


def _flatten(x: Any, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    shape = _shape(x)
    s, e = start_dim % len(shape), end_dim % len(shape)
    return F.reshape(x, shape[:s] + (math.prod(shape[s : e + 1]),) + shape[e + 1 :])


def _permute(x: Any, *dims: Any) -> Tensor:
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], tuple | list) else dims
    return F.transpose(x, dims)


def _transpose(x: Any, dim0: int, dim1: int) -> Tensor:
    axes = list(range(_ndim(x)))
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return F.transpose(x, axes)


def _unsqueeze(x: Any, dim: int) -> Tensor:
    shape = list(_shape(x))
    shape.insert(dim % (len(shape) + 1), 1)
    return F.reshape(x, shape)


def _squeeze(x: Any, dim: int | None = None) -> Tensor:
    shape = _shape(x)
    if dim is None:
        return F.reshape(x, [n for n in shape if n != 1])
    d = dim % len(shape)
    return F.reshape(x, [n for i, n in enumerate(shape) if i != d or n != 1])


def _reduce(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def reduce(x: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Tensor:
        return fn(x, axis=dim, keepdims=keepdim)

    return reduce


def _softmax(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def softmax(x: Any, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
        if dim is None:
            raise UnsupportedOpError("softmax without an explicit `dim` is not supported")
        return fn(x, axis=dim)

    return softmax


def _size(x: Any, dim: int | None = None) -> Any:
    return _shape(x) if dim is None else _shape(x)[dim]


def _identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def _linear(x: Any, weight: Any, bias: Any = None) -> Tensor:
    return F.linear(x, weight, bias)


def _conv2d(
    x: Any,
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    if dilation not in (1, (1, 1)) or groups != 1:
        raise UnsupportedOpError(
            f"conv2d with dilation={dilation!r}, groups={groups!r} is not supported "
            "(only dilation 1 and groups 1)"
        )
    if padding == "same":
        kh, kw = _shape(weight)[2:]
        padding = (kh // 2, kw // 2)
    elif padding == "valid":
        padding = 0
    return F.conv2d(x, weight, bias, stride=stride, padding=padding)


def _pool_args(kernel_size: Any, stride: Any, padding: Any, ceil_mode: bool, what: str) -> Any:
    if ceil_mode:
        raise UnsupportedOpError(f"{what} with ceil_mode=True is not supported")
    return kernel_size, (stride or None), padding


def _max_pool2d(
    x: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor:
    if dilation not in (1, (1, 1)) or return_indices:
        raise UnsupportedOpError("max_pool2d with dilation or return_indices is not supported")
    return F.max_pool2d(x, *_pool_args(kernel_size, stride, padding, ceil_mode, "max_pool2d"))


def _avg_pool2d(
    x: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Any = None,
) -> Tensor:
    if not count_include_pad or divisor_override is not None:
        raise UnsupportedOpError(
            "avg_pool2d with count_include_pad=False or divisor_override is not supported"
        )
    return F.avg_pool2d(x, *_pool_args(kernel_size, stride, padding, ceil_mode, "avg_pool2d"))


def _layer_norm(
    x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> Tensor:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    return F.layer_norm(x, tuple(shape), weight, bias, eps)


def _dropout(x: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
    if training and p > 0:
        raise UnsupportedOpError(
            f"dropout in training mode (p={p}) is random and cannot be replayed; call "
            "model.eval() on the dropout modules, or pass the mask to the engine's `dropout`"
        )
    return x


def _reduction(loss: Tensor, reduction: str, what: str) -> Tensor:
    if reduction != "mean":
        raise UnsupportedOpError(f"{what} with reduction={reduction!r} is not supported (mean)")
    return loss


def _mse_loss(
    input: Any,
    target: Any,
    size_average: Any = None,
    reduce: Any = None,  # noqa: A002
    reduction: str = "mean",
    weight: Any = None,
) -> Tensor:
    return _reduction(F.mse(input, target), reduction, "mse_loss")


def _cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: Any = None,  # noqa: A002
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    if weight is not None or label_smoothing:
        raise UnsupportedOpError("cross_entropy with class weights or label smoothing")
    if _ndim(input) > 2:  # torch puts classes on axis 1; the engine on the last axis
        input = F.transpose(input, [0, *range(2, _ndim(input)), 1])  # noqa: A001
    return _reduction(F.cross_entropy(input, target), reduction, "cross_entropy")


def _embedding(input: Any, weight: Any, *args: Any, **kwargs: Any) -> Tensor:  # noqa: A002
    return F.take(weight, input)


def _sdpa(
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    **kwargs: Any,
) -> Tensor:
    if attn_mask is not None or is_causal or dropout_p:
        raise UnsupportedOpError("scaled_dot_product_attention with a mask or dropout")
    scale = 1.0 / math.sqrt(_shape(q)[-1]) if scale is None else scale
    scores = F.matmul(q, _transpose(k, -2, -1)) * scale
    return F.matmul(F.softmax(scores, axis=-1), v)


def _getitem(x: Any, key: Any) -> Any:
    if isinstance(x, Tensor):
        return x[key]
    return operator.getitem(x, key)


def _cat(tensors: Any, dim: int = 0) -> Tensor:
    return F.concat(list(tensors), axis=dim)


def _stack(tensors: Any, dim: int = 0) -> Tensor:
    return F.stack(list(tensors), axis=dim)


def _where(cond: Any, x: Any, y: Any) -> Tensor:
    return F.where(np.asarray(cond.value if isinstance(cond, Tensor) else cond), x, y)


def _gelu(x: Any, approximate: str = "none") -> Tensor:
    return F.gelu(x, approximate=approximate)


def _softplus(x: Any, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    if beta != 1.0:
        return F.softplus(_t(x) * beta) / beta
    return F.softplus(x)


def _logsumexp(x: Any, dim: Any, keepdim: bool = False) -> Tensor:
    return F.logsumexp(x, axis=dim, keepdims=keepdim)


def _max(x: Any, dim: Any = None, keepdim: bool = False) -> Tensor:
    if dim is not None:
        raise UnsupportedOpError("torch.max with `dim` (it returns indices); use torch.amax")
    return F.max(x)


def _reshape(x: Any, *shape: Any) -> Tensor:
    return F.reshape(x, _resolve_shape(x, shape))


def _pow(x: Any, y: Any) -> Any:
    return _t(x) ** y if isinstance(x, Tensor) or isinstance(y, Tensor) else x**y


def _arith(op: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def arith(x: Any, y: Any, *, alpha: float = 1.0) -> Any:
        return op(x, y if alpha == 1.0 else y * alpha)

    return arith


def _build_functions() -> dict[Any, Callable[..., Any]]:
    import torch
    import torch.nn.functional as tf

    table: dict[Any, Callable[..., Any]] = {
        operator.add: operator.add,
        operator.sub: operator.sub,
        operator.mul: operator.mul,
        operator.truediv: operator.truediv,
        operator.neg: operator.neg,
        operator.pow: _pow,
        operator.matmul: F.matmul,
        operator.getitem: _getitem,
        builtins.getattr: getattr,
        operator.floordiv: operator.floordiv,
        operator.mod: operator.mod,
        torch.add: _arith(operator.add),
        torch.sub: _arith(operator.sub),
        torch.mul: operator.mul,
        torch.div: operator.truediv,
        torch.neg: operator.neg,
        torch.pow: _pow,
        torch.square: lambda x: _pow(x, 2),
        torch.matmul: F.matmul,
        torch.bmm: F.matmul,
        torch.mm: F.matmul,
        torch.exp: F.exp,
        torch.log: F.log,
        torch.sqrt: F.sqrt,
        torch.abs: F.abs,
        torch.tanh: F.tanh,
        torch.sigmoid: F.sigmoid,
        torch.relu: F.relu,
        torch.maximum: F.maximum,
        torch.minimum: F.minimum,
        torch.where: _where,
        torch.cat: _cat,
        torch.concat: _cat,
        torch.stack: _stack,
        torch.flatten: _flatten,
        torch.reshape: _reshape,
        torch.transpose: _transpose,
        torch.permute: _permute,
        torch.unsqueeze: _unsqueeze,
        torch.squeeze: _squeeze,
        torch.softmax: _softmax(F.softmax),
        torch.log_softmax: _softmax(F.log_softmax),
        torch.logsumexp: _logsumexp,
        torch.sum: _reduce(F.sum),
        torch.mean: _reduce(F.mean),
        torch.amax: _reduce(F.max),
        torch.max: _max,
        tf.relu: lambda x, inplace=False: F.relu(x),
        tf.gelu: _gelu,
        tf.softplus: _softplus,
        tf.softmax: _softmax(F.softmax),
        tf.log_softmax: _softmax(F.log_softmax),
        tf.linear: _linear,
        tf.conv2d: _conv2d,
        tf.max_pool2d: _max_pool2d,
        tf.avg_pool2d: _avg_pool2d,
        tf.layer_norm: _layer_norm,
        tf.dropout: _dropout,
        tf.embedding: _embedding,
        tf.mse_loss: _mse_loss,
        tf.cross_entropy: _cross_entropy,
        tf.scaled_dot_product_attention: _sdpa,
        tf.sigmoid: F.sigmoid,
        tf.tanh: F.tanh,
    }
    return table


METHODS: dict[str, Callable[..., Any]] = {
    "view": _reshape,
    "reshape": _reshape,
    "flatten": _flatten,
    "permute": _permute,
    "transpose": _transpose,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "size": _size,
    "contiguous": _identity,
    "float": _identity,
    "double": _identity,
    "t": lambda x: F.transpose(x),
    "sum": _reduce(F.sum),
    "mean": _reduce(F.mean),
    "amax": _reduce(F.max),
    "softmax": _softmax(F.softmax),
    "log_softmax": _softmax(F.log_softmax),
    "exp": F.exp,
    "log": F.log,
    "sqrt": F.sqrt,
    "abs": F.abs,
    "tanh": F.tanh,
    "sigmoid": F.sigmoid,
    "relu": F.relu,
    "pow": _pow,
    "square": lambda x: _pow(x, 2),
    "matmul": F.matmul,
    "add": _arith(operator.add),
    "sub": _arith(operator.sub),
    "mul": operator.mul,
    "div": operator.truediv,
    "neg": operator.neg,
    "dim": lambda x: _ndim(x),
}


def _batch_norm(m: Any, w: dict[str, Any], x: Any) -> Tensor:
    if m.training or not m.track_running_stats:
        return F.batch_norm(x, w["weight"], w["bias"], eps=m.eps)
    shape = (1, -1) + (1,) * (_ndim(x) - 2)
    mean = np.reshape(_from_torch(m.running_mean), shape)
    std = np.sqrt(np.reshape(_from_torch(m.running_var), shape) + m.eps)
    y = (_t(x) - mean) / std
    y = y if w["weight"] is None else y * F.reshape(w["weight"], shape)
    return y if w["bias"] is None else y + F.reshape(w["bias"], shape)


def _loss_module(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def loss(m: Any, w: dict[str, Any], input: Any, target: Any) -> Tensor:  # noqa: A002
        kwargs = {"reduction": m.reduction}
        if hasattr(m, "label_smoothing"):
            kwargs.update(label_smoothing=m.label_smoothing, weight=m.weight)
        return fn(input, target, **kwargs)

    return loss


def _build_modules() -> dict[type, Callable[..., Any]]:
    from torch import nn

    return {
        nn.Linear: lambda m, w, x: F.linear(x, w["weight"], w["bias"]),
        nn.Conv2d: lambda m, w, x: (
            _conv2d(x, w["weight"], w["bias"], m.stride, m.padding, m.dilation, m.groups)
            if m.padding_mode == "zeros"
            else _unsupported_padding(m)
        ),
        nn.ReLU: lambda m, w, x: F.relu(x),
        nn.GELU: lambda m, w, x: F.gelu(x, approximate=m.approximate),
        nn.Tanh: lambda m, w, x: F.tanh(x),
        nn.Sigmoid: lambda m, w, x: F.sigmoid(x),
        nn.Softplus: lambda m, w, x: _softplus(x, m.beta, m.threshold),
        nn.Identity: lambda m, w, x: x,
        nn.Flatten: lambda m, w, x: _flatten(x, m.start_dim, m.end_dim),
        nn.Dropout: lambda m, w, x: _dropout(x, m.p, m.training),
        nn.LayerNorm: lambda m, w, x: F.layer_norm(
            x, tuple(m.normalized_shape), w["weight"], w["bias"], m.eps
        ),
        nn.BatchNorm1d: _batch_norm,
        nn.BatchNorm2d: _batch_norm,
        nn.MaxPool2d: lambda m, w, x: _max_pool2d(
            x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
        ),
        nn.AvgPool2d: lambda m, w, x: _avg_pool2d(
            x,
            m.kernel_size,
            m.stride,
            m.padding,
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        ),
        nn.Embedding: lambda m, w, x: F.take(w["weight"], x),
        nn.Softmax: lambda m, w, x: _softmax(F.softmax)(x, m.dim),
        nn.LogSoftmax: lambda m, w, x: _softmax(F.log_softmax)(x, m.dim),
        nn.MSELoss: _loss_module(_mse_loss),
        nn.CrossEntropyLoss: _loss_module(_cross_entropy),
    }


def _unsupported_padding(m: Any) -> Any:
    raise UnsupportedOpError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported")


class _LazyTable(dict):
    """A dict filled on first use, so importing this module does not import torch."""

    def __init__(self, build: Callable[[], dict[Any, Any]]) -> None:
        super().__init__()
        self._build = build

    def _fill(self) -> None:
        if not super().__len__():
            self.update(self._build())

    def get(self, key: Any, default: Any = None) -> Any:
        self._fill()
        return super().get(key, default)

    def __iter__(self) -> Iterator[Any]:
        self._fill()
        return super().__iter__()

    def __len__(self) -> int:
        self._fill()
        return super().__len__()


FUNCTIONS: dict[Any, Callable[..., Any]] = _LazyTable(_build_functions)
MODULES: dict[type, Callable[..., Any]] = _LazyTable(_build_modules)
