"""Translate a torch model into the engine's graph through `torch.export`'s core ATen graph.

``torch.export.export(model, args).run_decompositions()`` lowers any exportable model —
attention, LSTM/GRU, Hugging Face models — to a few dozen core ATen ops (`addmm`, `bmm`,
`_softmax`, `native_layer_norm`, `select`, `slice`, `cat`, views...). `ExportGraph` replays
that graph with engine tensors in float64, one rule per ATen op (the `ATEN` table below).

- Nodes that depend on no parameter (masks, position ids, `full`, `arange`, comparisons) are
  constants: torch itself computes them, in float64, so they need no rule.
- A custom `torch.autograd.Function` would be traced through (its backward lost); while
  exporting it is routed through an opaque custom op (``graddiag_ref::<Class>_<id>``), which
  the engine runs as an "external" op differentiated by central differences, so the
  Function's own backward can be checked against it (`validate`).
- An op on the differentiable path without a rule is an `UnsupportedOpError` naming the
  model part (the module path torch records for the node) and the op; any error raised while
  replaying a node is re-raised as `UnsupportedOpError` with the same context.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graddiag.reference import functional as F
from graddiag.reference.engine import Tensor, apply
from graddiag.reference.gradcheck import external
from graddiag.reference.importers.torch_fx import (
    CustomCall,
    CustomFunction,
    UnsupportedOpError,
    _map,
)


class ExportFailedError(UnsupportedOpError):
    """torch.export itself could not export the model (the reason in the message); `validate`
    falls back to torch.fx on this one, not on an op without a rule in an exported graph."""


# ----------------------------------------------------------------- opaque autograd.Functions

_OPAQUE: dict[tuple[type, str], Any] = {}  # (Function class, schema) -> torch op overload
_OPAQUE_CLASS: dict[str, type] = {}  # op name -> Function class
_LIBRARY: list[Any] = []


def _schema_type(torch: Any, a: Any) -> str:
    if torch.is_tensor(a):
        return "Tensor"
    if a is None:
        return "Tensor?"
    if isinstance(a, bool):
        return "bool"
    if isinstance(a, int):
        return "int"
    if isinstance(a, float):
        return "float"
    raise UnsupportedOpError(
        f"a custom autograd.Function argument of type {type(a).__name__} ({a!r}); only "
        "tensors, None, ints, floats and bools can be kept opaque for the reference check"
    )


def _opaque_op(torch: Any, cls: type, args: tuple[Any, ...], original: Any) -> Any:
    """The custom op standing for ``cls.apply`` with arguments like `args` (defined once)."""
    schema = ", ".join(f"{_schema_type(torch, a)} a{i}" for i, a in enumerate(args))
    key = (cls, schema)
    if key not in _OPAQUE:
        if not _LIBRARY:
            _LIBRARY.append(torch.library.Library("graddiag_ref", "FRAGMENT"))
        lib = _LIBRARY[0]
        name = f"{cls.__name__}_{len(_OPAQUE)}_{id(cls):x}"

        def impl(*a: Any) -> Any:
            with torch.no_grad():
                out = original.__func__(cls, *a)
            if not torch.is_tensor(out):
                raise UnsupportedOpError(
                    f"custom autograd.Function {cls.__name__} returns {type(out).__name__}; "
                    "only Functions returning one tensor can be checked"
                )
            return out.clone()

        lib.define(f"{name}({schema}) -> Tensor")
        lib.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"graddiag_ref::{name}", impl, lib=lib)
        _OPAQUE[key] = getattr(torch.ops.graddiag_ref, name).default
        _OPAQUE_CLASS[name] = cls
    return _OPAQUE[key]


@contextlib.contextmanager
def _opaque_functions(torch: Any) -> Iterator[None]:
    """While exporting, run every `Function.apply` as one opaque custom op."""
    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def apply_(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not any(torch.is_tensor(a) for a in (*args, *kwargs.values())):
            return original.__func__(cls, *args, **kwargs)
        if kwargs:  # traced through, its backward would go unchecked: say so instead
            raise UnsupportedOpError(
                f"custom autograd.Function {cls.__name__} is called with keyword arguments "
                f"({', '.join(kwargs)}); pass them positionally so it can be checked"
            )
        return _opaque_op(torch, cls, args, original)(*args)

    function.apply = classmethod(apply_)
    try:
        yield
    finally:
        function.apply = original


# ----------------------------------------------------------------------------- the graph


@dataclass
class ExportGraph:
    """A torch model replayed by the engine from its exported core ATen graph.

    Attributes:
        program: the `torch.export.ExportedProgram` (after decompositions).
        parameters: float64 NumPy copies of the trainable parameters, by qualified name.
        custom_calls: the custom Functions met by the last run, with their inputs.
        prefix: a module-path prefix stripped from names (a wrapper's attribute name).
    """

    program: Any
    parameters: dict[str, np.ndarray] = field(default_factory=dict)
    custom_calls: list[CustomCall] = field(default_factory=list)
    prefix: str = ""
    _inputs: list[tuple[str, str | None]] = field(default_factory=list)
    _consts: dict[str, np.ndarray] = field(default_factory=dict)
    _outputs: list[str] = field(default_factory=list)

    def __call__(self, params: dict[str, Tensor], *inputs: Any) -> Any:
        """Run the model in the engine with parameter tensors `params` on `inputs`."""
        import torch

        graph = self.program.graph_module.graph
        env: dict[Any, Any] = {}
        feed = iter(inputs)
        self.custom_calls = []
        placeholders = iter(self._inputs)
        for node in graph.nodes:
            if node.op == "placeholder":
                kind, target = next(placeholders)
                if kind == "user":
                    env[node] = _from_torch(next(feed))
                elif kind == "param" and target in params:
                    env[node] = params[target]
                else:
                    env[node] = self._consts[target]
            elif node.op == "output":
                outs = _map(node.args[0], env)
                user = [o for o, keep in zip(outs, self._outputs, strict=True) if keep == "user"]
                return user[0] if len(user) == 1 else tuple(user)
            elif node.op == "call_function":
                env[node] = self._call(node, torch, env)
            else:
                raise UnsupportedOpError(f"exported graph node kind {node.op!r} ({node.name})")
        raise UnsupportedOpError("the exported graph has no output node")

    def _call(self, node: Any, torch: Any, env: dict[Any, Any]) -> Any:
        args, kwargs = _map(node.args, env), _map(node.kwargs, env)
        target = node.target
        if target is operator.getitem:
            return args[0][args[1]]
        name = _op_name(target)
        try:
            if getattr(target, "namespace", None) == "graddiag_ref":
                return self._custom(_OPAQUE_CLASS[name.split(".")[0]], args, torch)
            if name.startswith(CHECKS):  # export's own shape/dtype/device assertions
                return None
            if not _differentiable(args, kwargs):
                return _constant(torch, target, args, kwargs)
            rule = ATEN.get(name)
            if rule is None:
                if name in NONDIFF:
                    return _constant(torch, target, _values(args), _values(kwargs))
                raise UnsupportedOpError(
                    f"{_where(node, self.prefix)}: ATen op `{name}` is not supported by the "
                    "reference engine"
                )
            return rule(*args, **kwargs)
        except UnsupportedOpError as exc:
            if str(exc).startswith("in "):
                raise
            raise UnsupportedOpError(
                f"{_where(node, self.prefix)}, ATen op `{name}`: {exc}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - never surface an importer-internal error raw
            raise UnsupportedOpError(
                f"{_where(node, self.prefix)}: the reference engine could not replay ATen op "
                f"`{name}` ({type(exc).__name__}: {exc})"
            ) from exc

    def _custom(self, cls: type, args: Any, torch: Any) -> Tensor:
        """The Function as an external op of its array arguments; other arguments are bound."""
        slots = [i for i, a in enumerate(args) if isinstance(a, Tensor | np.ndarray)]

        def function(*tensors: Any) -> Any:  # torch tensors in, as the Function takes them
            full = list(args)
            for i, t in zip(slots, tensors, strict=True):
                full[i] = t
            return CustomFunction(cls)(*full)

        def fn(*arrays: Any) -> np.ndarray:
            with torch.no_grad():
                out = function(*[_to_torch(torch, a) for a in arrays])
            return out.double().numpy()

        inputs = [
            np.asarray(args[i].value if isinstance(args[i], Tensor) else args[i]) for i in slots
        ]
        self.custom_calls.append(CustomCall(cls.__name__, function, inputs))
        return external(fn, *[args[i] for i in slots], name=cls.__name__)


def _to_torch(torch: Any, a: Any) -> Any:
    if isinstance(a, np.ndarray | np.generic):
        return torch.from_numpy(np.array(a))
    return a


def _op_name(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return getattr(target, "__name__", repr(target))
    base = schema.name.split("::", 1)[-1]
    return f"{base}.{schema.overload_name}" if schema.overload_name else base


def _where(node: Any, prefix: str) -> str:
    """'in `encoder.layers.0.self_attn` (MultiheadAttention)' from the node's module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"in node {node.name}"
    path, kind = list(stack.values())[-1]
    kind = str(kind).rpartition(".")[2].rstrip("'>")
    path = _clean_path(path)
    if prefix and (path == prefix.rstrip(".") or path.startswith(prefix)):
        path = path[len(prefix) :]
    return f"in `{path or '(model)'}` ({kind})"


def _clean_path(path: str) -> str:
    """torch writes module paths as ``L['self'].layers[0].attn`` or ``layers.0.attn``."""
    for old, new in (("L['self'].", ""), ("L['self']", ""), ("['", "."), ("']", "")):
        path = path.replace(old, new)
    path = path.replace("[", ".").replace("]", "")
    return path.strip(".")


def _differentiable(args: Any, kwargs: Any) -> bool:
    def any_tensor(v: Any) -> bool:
        if isinstance(v, Tensor):
            return True
        if isinstance(v, list | tuple):
            return any(any_tensor(x) for x in v)
        return False

    return any_tensor(args) or any_tensor(list(kwargs.values()))


def _values(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.value
    if isinstance(v, list | tuple):
        return type(v)(_values(x) for x in v)
    if isinstance(v, dict):
        return {k: _values(x) for k, x in v.items()}
    return v


def _constant(torch: Any, target: Any, args: Any, kwargs: Any) -> Any:
    """Run a node that depends on no parameter with torch itself (float64 in, NumPy out)."""

    def to_t(v: Any) -> Any:
        if isinstance(v, np.ndarray | np.generic):
            return torch.from_numpy(np.array(v))
        if isinstance(v, list | tuple):
            return type(v)(to_t(x) for x in v)
        return v

    kwargs = dict(kwargs)
    if kwargs.get("device") is not None:
        kwargs["device"] = "cpu"
    if kwargs.get("dtype") in (torch.float32, torch.float16, torch.bfloat16):
        kwargs["dtype"] = torch.float64
    out = target(*to_t(tuple(args)), **to_t(kwargs))
    return _from_torch(out)


def _from_torch(x: Any) -> Any:
    """Torch tensors become NumPy arrays, floating ones float64; others pass through."""
    if isinstance(x, list | tuple):
        return type(x)(_from_torch(v) for v in x)
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        t = x.detach().cpu()
        if t.is_floating_point():
            return t.double().numpy()
        return t.numpy()
    return x


# ------------------------------------------------------------------------------- import


def export_program(model: Any, args: tuple[Any, ...]) -> Any:
    """`torch.export` the model on `args` and decompose to core ATen, Functions kept opaque.

    Raises:
        ExportFailedError: if torch.export cannot export the model (the reason included).
    """
    import torch

    # torch's own deprecation and export notices are noise to the user of `validate`
    with _opaque_functions(torch), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(model, tuple(args))
            return program.run_decompositions()
        except UnsupportedOpError:
            raise
        except Exception as exc:  # noqa: BLE001 - export raises many types; keep the reason
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportFailedError(
                f"torch.export could not export {type(model).__name__}: "
                f"{type(exc).__name__}: {first}"
            ) from exc


def import_torch_export(model: Any, args: tuple[Any, ...], prefix: str = "") -> ExportGraph:
    """Export `model` on example `args` and gather its trainable parameters in float64.

    Args:
        model: a `torch.nn.Module` (put dropout in eval mode first: random masks cannot be
            replayed).
        args: example inputs; they fix the shapes of the exported graph.
        prefix: a module-path prefix to strip from parameter names and error messages.

    Returns:
        An `ExportGraph`; call it as ``graph(params, *inputs)`` with engine tensors for the
        parameters (see `ExportGraph.parameters`) and inputs shaped like `args`.

    Raises:
        TypeError: if `model` is not a `torch.nn.Module` or `args` is not a tuple or list.
        UnsupportedOpError: if the model cannot be exported.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple | list):  # a bare tensor would be split along its first axis
        raise TypeError(
            f"Expected `args` to be a tuple or list of example inputs, got {type(args).__name__}"
        )
    program = export_program(model, args)
    from torch.export.graph_signature import InputKind, OutputKind

    named = dict(model.named_parameters())
    canonical = {id(p): n for n, p in named.items()}  # tied weights: one name per tensor
    alias = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    state = program.state_dict
    consts = getattr(program, "constants", {})
    inputs: list[tuple[str, str | None]] = []
    const_values: dict[str, np.ndarray] = {}
    params: dict[str, np.ndarray] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(("user", None))
            continue
        target = spec.target
        value = state[target] if target in state else consts.get(target)
        if spec.kind == InputKind.PARAMETER and target in alias:
            target = alias[target]
            if named[target].requires_grad:
                name = target.removeprefix(prefix)
                params[name] = _from_torch(value)
                inputs.append(("param", name))
                continue
        if value is None:
            raise UnsupportedOpError(f"exported input {spec.arg} ({spec.kind}) has no value")
        const_values[target] = _from_torch(value)
        inputs.append(("const", target))
    outputs = [
        "user" if spec.kind == OutputKind.USER_OUTPUT else "other"
        for spec in program.graph_signature.output_specs
    ]
    return ExportGraph(program, params, [], prefix, inputs, const_values, outputs)


# --------------------------------------------------------------------------- ATen rules


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _ndim(x: Any) -> int:
    return len(_shape(x))


def _t(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x, dtype=np.float64))


def _view(x: Any, shape: Any) -> Any:
    shape = [int(n) for n in shape]
    if -1 in shape:
        known = math.prod(n for n in shape if n != -1)
        shape[shape.index(-1)] = math.prod(_shape(x)) // max(known, 1)
    return F.reshape(x, shape)


def _permute(x: Any, dims: Any) -> Tensor:
    n = _ndim(x)
    return F.transpose(x, [d % n for d in dims])


def _transpose(x: Any, d0: int, d1: int) -> Tensor:
    axes = list(range(_ndim(x)))
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return F.transpose(x, axes)


def _expand(x: Any, size: Any, implicit: bool = False) -> Tensor:
    shape = _shape(x)
    lead = len(size) - len(shape)
    full = tuple(shape[i - lead] if n == -1 else int(n) for i, n in enumerate(size))
    return F.broadcast_to(x, full)


def _unsqueeze(x: Any, dim: int) -> Tensor:
    shape = list(_shape(x))
    shape.insert(dim % (len(shape) + 1), 1)
    return F.reshape(x, shape)


def _squeeze(x: Any, dims: Any = None) -> Tensor:
    shape = _shape(x)
    if dims is None:
        return F.reshape(x, [n for n in shape if n != 1])
    dims = {d % max(len(shape), 1) for d in ((dims,) if isinstance(dims, int) else dims)}
    return F.reshape(x, [n for i, n in enumerate(shape) if i not in dims or n != 1])


def _select(x: Any, dim: int, index: int) -> Tensor:
    d = dim % _ndim(x)
    return _t(x)[(slice(None),) * d + (int(index),)]


def _slice(x: Any, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Tensor:
    d = dim % _ndim(x)
    n = _shape(x)[d]
    start = None if start is None else max(min(int(start), n), -n)
    end = None if end is None else max(min(int(end), n), -n - 1)
    if step != 1 and step < 1:
        raise UnsupportedOpError(f"slice with step {step}")
    return _t(x)[(slice(None),) * d + (slice(start, end, int(step)),)]


def _split_with_sizes(x: Any, sizes: Any, dim: int = 0) -> list[Tensor]:
    out, start = [], 0
    for s in sizes:
        out.append(_slice(x, dim, start, start + int(s)))
        start += int(s)
    return out


def _split(x: Any, size: int, dim: int = 0) -> list[Tensor]:
    n = _shape(x)[dim % _ndim(x)]
    return _split_with_sizes(x, [min(size, n - i) for i in range(0, n, size)], dim)


def _unbind(x: Any, dim: int = 0) -> list[Tensor]:
    return [_select(x, dim, i) for i in range(_shape(x)[dim % _ndim(x)])]


def _cat(tensors: Any, dim: int = 0) -> Tensor:
    tensors = [t for t in tensors if not (_ndim(t) == 1 and _shape(t)[0] == 0)]
    return F.concat(tensors, axis=dim % _ndim(tensors[0]))


def _stack(tensors: Any, dim: int = 0) -> Tensor:
    return F.stack(list(tensors), axis=dim % (_ndim(tensors[0]) + 1))


def _index(x: Any, indices: Any) -> Tensor:
    """``x[i0, i1, ...]`` with integer/boolean index arrays (None skips an axis)."""
    key = []
    for ix in indices:
        if ix is None:
            key.append(slice(None))
            continue
        if isinstance(ix, Tensor):
            raise UnsupportedOpError("an index that depends on a parameter")
        arr = np.asarray(ix)
        key.append(arr if arr.dtype == bool else arr.astype(np.int64))
    return F.index(x, tuple(key))


def _dim_key(index: Any, dim: int, ndim: int) -> tuple[np.ndarray, ...]:
    """The advanced-indexing key of gather/scatter along `dim`: `index` there, grids elsewhere."""
    idx = np.asarray(_values(index)).astype(np.int64)
    d = dim % ndim
    grids = np.meshgrid(*[np.arange(n) for n in idx.shape], indexing="ij")
    return tuple(idx if i == d else grids[i] for i in range(idx.ndim))


def _gather(x: Any, dim: int, index: Any, sparse_grad: bool = False) -> Tensor:
    return F.index(x, _dim_key(index, dim, _ndim(x)))


def _put(x: Any, key: tuple[Any, ...], values: Any, accumulate: bool) -> Tensor:
    """`x` with `values` written (or, accumulating, added) at ``x[key]``."""
    shape = _shape(x)
    target = np.zeros(shape)[key].shape
    if isinstance(values, Tensor):
        values = F.broadcast_to(values, target)
    else:
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), target)
    added = F.index_add(values, key, shape)
    if accumulate:
        return _arith(operator.add)(x, added)
    hit = np.zeros(shape, dtype=bool)
    hit[key] = True  # written positions lose x's value (and its gradient)
    kept = F.where(hit, np.zeros(shape), x) if isinstance(x, Tensor) else np.where(hit, 0.0, x)
    return _arith(operator.add)(kept, added)


def _src_part(src: Any, index: Any) -> Any:
    part = tuple(slice(0, k) for k in np.shape(_values(index)))
    return src[part] if isinstance(src, Tensor) else np.asarray(src)[part]


def _scatter(x: Any, dim: int, index: Any, src: Any, reduce: Any = None) -> Tensor:
    if reduce is not None:
        raise UnsupportedOpError(f"scatter with reduce={reduce!r}")
    src = src if isinstance(src, int | float) else _src_part(src, index)
    return _put(x, _dim_key(index, dim, _ndim(x)), src, accumulate=False)


def _scatter_add(x: Any, dim: int, index: Any, src: Any) -> Tensor:
    return _put(x, _dim_key(index, dim, _ndim(x)), _src_part(src, index), accumulate=True)


def _index_put(x: Any, indices: Any, values: Any, accumulate: bool = False) -> Tensor:
    key = []
    for ix in indices:
        arr = None if ix is None else np.asarray(_values(ix))
        if arr is None:
            key.append(slice(None))
        else:
            key.append(arr if arr.dtype == bool else arr.astype(np.int64))
    return _put(x, tuple(key), values, accumulate)


def _index_select(x: Any, dim: int, index: Any) -> Tensor:
    d = dim % _ndim(x)
    return F.index(x, (slice(None),) * d + (np.asarray(index).astype(np.int64),))


def _embedding(weight: Any, indices: Any, padding_idx: int = -1, *args: Any) -> Tensor:
    idx = np.asarray(indices).astype(np.int64)
    rows = F.index(weight, (idx,))
    if padding_idx is None or padding_idx < 0:
        return rows
    # torch's padding_idx: the padding row is looked up but gets no gradient
    pad = np.broadcast_to((idx == padding_idx)[..., None], rows.shape)
    return F.where(pad, np.asarray(_values(weight))[idx], rows)


def _addmm(bias: Any, a: Any, b: Any, beta: float = 1, alpha: float = 1) -> Tensor:
    prod = F.matmul(a, b)
    prod = prod if alpha == 1 else prod * alpha
    return prod + (bias if beta == 1 else _t(bias) * beta)


def _baddbmm(x: Any, a: Any, b: Any, beta: float = 1, alpha: float = 1) -> Tensor:
    return _addmm(x, a, b, beta, alpha)


def _convolution(
    x: Any,
    w: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
) -> Tensor:
    if transposed or any(d != 1 for d in dilation) or groups != 1:
        raise UnsupportedOpError(
            f"convolution with transposed={transposed}, dilation={list(dilation)}, "
            f"groups={groups} (supported: plain 1-D/2-D convolution, groups 1, dilation 1)"
        )
    if _ndim(x) == 3:  # conv1d as a conv2d of height 1
        y = F.conv2d(_unsqueeze(x, 2), _unsqueeze(w, 2), None, (1, stride[0]), (0, padding[0]))
        y = _squeeze(y, 2)
        return y if bias is None else y + F.reshape(bias, (1, -1, 1))
    if _ndim(x) != 4:
        raise UnsupportedOpError(f"convolution of a {_ndim(x)}-D input (1-D and 2-D only)")
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding))


def _layer_norm(x: Any, shape: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, ...]:
    y = F.layer_norm(x, tuple(shape), weight, bias, eps)
    return (y, None, None)


def _batch_norm_eval(
    x: Any, weight: Any, bias: Any, mean: Any, var: Any, momentum: float, eps: float
) -> tuple[Any, ...]:
    shape = (1, -1) + (1,) * (_ndim(x) - 2)
    y = (_t(x) - np.reshape(_values(mean), shape)) / np.sqrt(np.reshape(_values(var), shape) + eps)
    y = y if weight is None else y * F.reshape(weight, shape)
    y = y if bias is None else y + F.reshape(bias, shape)
    return (y, None, None)


def _batch_norm_train(
    x: Any, weight: Any, bias: Any, mean: Any, var: Any, training: bool, momentum: float, eps: float
) -> tuple[Any, ...]:
    if not training:
        return _batch_norm_eval(x, weight, bias, mean, var, momentum, eps)
    y = F.batch_norm(x, weight, bias, eps=eps)
    xv = _values(x)
    axes = tuple(i for i in range(xv.ndim) if i != 1)
    n = math.prod(xv.shape[i] for i in axes)
    bmean, bvar = xv.mean(axis=axes), xv.var(axis=axes)
    new_mean = (1 - momentum) * _values(mean) + momentum * bmean
    new_var = (1 - momentum) * _values(var) + momentum * bvar * n / max(n - 1, 1)
    return (y, bmean, 1 / np.sqrt(bvar + eps), new_mean, new_var)


def _batch_norm_legit(
    x: Any, weight: Any, bias: Any, mean: Any, var: Any, training: bool, momentum: float, eps: float
) -> tuple[Any, ...]:
    return _batch_norm_train(x, weight, bias, mean, var, training, momentum, eps)[:3]


def _group_norm(
    x: Any, weight: Any, bias: Any, n: int, c: int, hw: int, groups: int, eps: float
) -> tuple[Any, ...]:
    shape = _shape(x)
    y = F.reshape(F.normalize(F.reshape(x, (n, groups, -1)), (2,), eps), shape)
    affine = (1, c) + (1,) * (len(shape) - 2)
    y = y if weight is None else y * F.reshape(weight, affine)
    return (y if bias is None else y + F.reshape(bias, affine), None, None)


def _pair(v: Any) -> tuple[int, int]:
    v = tuple(v) if isinstance(v, list | tuple) else (v,)
    return (int(v[0]), int(v[-1])) if v else ()


def _pool_check(what: str, ceil_mode: bool, dilation: Any = (1, 1)) -> None:
    if ceil_mode or any(d != 1 for d in dilation):
        raise UnsupportedOpError(f"{what} with ceil_mode=True or dilation (not supported)")


def _max_pool2d(
    x: Any,
    kernel: Any,
    stride: Any = (),
    padding: Any = 0,
    dilation: Any = (1, 1),
    ceil_mode: bool = False,
) -> tuple[Any, Any]:
    _pool_check("max_pool2d", ceil_mode, _pair(dilation))
    if _ndim(x) != 4:
        raise UnsupportedOpError(f"max_pool2d of a {_ndim(x)}-D input (NCHW only)")
    return F.max_pool2d(x, _pair(kernel), _pair(stride) or None, _pair(padding)), None


def _avg_pool2d(
    x: Any,
    kernel: Any,
    stride: Any = (),
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: Any = None,
) -> Tensor:
    _pool_check("avg_pool2d", ceil_mode)
    if (not count_include_pad and any(_pair(padding))) or divisor_override is not None:
        raise UnsupportedOpError("avg_pool2d with count_include_pad=False or divisor_override")
    return F.avg_pool2d(x, _pair(kernel), _pair(stride) or None, _pair(padding))


def _softmax(x: Any, dim: int, half_to_float: bool = False) -> Tensor:
    return F.softmax(x, axis=dim)


def _log_softmax(x: Any, dim: int, half_to_float: bool = False) -> Tensor:
    return F.log_softmax(x, axis=dim)


def _dims(x: Any, dim: Any) -> Any:
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return None
    return dim


def _sum(x: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Tensor:
    return F.sum(x, _dims(x, dim), keepdim)


def _mean(x: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Tensor:
    return F.mean(x, _dims(x, dim), keepdim)


def _amax(x: Any, dim: Any = (), keepdim: bool = False) -> Tensor:
    return F.max(x, _dims(x, dim), keepdim)


def _max_dim(x: Any, dim: int, keepdim: bool = False) -> tuple[Any, Any]:
    return F.max(x, dim, keepdim), np.argmax(_values(x), axis=dim)


def _var(
    x: Any, dim: Any = None, *, correction: float | None = None, keepdim: bool = False
) -> Tensor:
    dims = _dims(x, dim)
    centered = _t(x) - F.mean(x, dims, True)
    n = math.prod(_shape(x)) if dims is None else math.prod(_shape(x)[d] for d in dims)
    correction = 1 if correction is None else correction  # aten: None means Bessel's
    return F.sum(centered * centered, dims, keepdim) / max(n - correction, 1)


def _where_op(cond: Any, x: Any, y: Any) -> Tensor:
    if isinstance(cond, Tensor):
        cond = cond.value
    if not isinstance(x, Tensor) and not isinstance(y, Tensor):
        return np.where(cond, x, y)
    xv = x if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    yv = y if isinstance(y, Tensor) else np.asarray(y, dtype=np.float64)
    return F.where(np.asarray(cond, dtype=bool), xv, yv)


def _clamp(x: Any, lo: Any = None, hi: Any = None) -> Tensor:
    y = _t(x)
    if lo is not None:
        y = apply("maximum", y, np.asarray(_values(lo), dtype=np.float64))
    if hi is not None:
        y = apply("minimum", y, np.asarray(_values(hi), dtype=np.float64))
    return y


def _clamp_grad(x: Any, lo: Any = None, hi: Any = None) -> Tensor:
    # torch's clamp passes the gradient on the boundary itself (maximum would halve it).
    xv = _values(x)
    inside = np.ones(np.shape(xv), dtype=bool)
    if lo is not None:
        inside &= xv >= _values(lo)
    if hi is not None:
        inside &= xv <= _values(hi)
    clipped = np.clip(
        xv, _values(lo) if lo is not None else None, _values(hi) if hi is not None else None
    )
    return F.where(inside, x, np.asarray(clipped, dtype=np.float64))


def _relu(x: Any) -> Tensor:
    return F.relu(x)


def _pow(x: Any, y: Any) -> Any:
    if not isinstance(x, Tensor):
        return _t(np.asarray(x, dtype=np.float64)) ** y
    return x**y


def _arith(op: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def arith(x: Any, y: Any, alpha: Any = 1) -> Any:
        if alpha != 1:
            y = y * alpha
        if not isinstance(x, Tensor):
            x = np.asarray(x, dtype=np.float64)
        if not isinstance(y, Tensor):
            y = np.asarray(y, dtype=np.float64)
        return op(x, y)

    return arith


def _div(x: Any, y: Any, rounding_mode: Any = None) -> Any:
    if rounding_mode is not None:
        raise UnsupportedOpError(
            f"division with rounding_mode={rounding_mode!r} on a gradient path"
        )
    return _arith(operator.truediv)(x, y)


def _leaky_relu(x: Any, slope: float = 0.01) -> Tensor:
    return F.where(_values(x) > 0, x, _t(x) * slope)


def _elu(x: Any, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> Tensor:
    pos = _values(x) > 0
    xs = _t(x) * input_scale
    neg = (F.exp(F.minimum(xs, np.zeros(_shape(x)))) - 1.0) * alpha
    return F.where(pos, xs, neg) * scale


def _hardtanh(x: Any, lo: float = -1.0, hi: float = 1.0) -> Tensor:
    return _clamp_grad(x, lo, hi)


def _nll_loss(
    logp: Any, target: Any, weight: Any = None, reduction: int = 1, ignore_index: int = -100
) -> tuple[Tensor, Any]:
    if weight is not None:
        raise UnsupportedOpError("nll_loss with class weights")
    tgt = np.asarray(_values(target)).astype(np.int64)
    keep = tgt != ignore_index
    classes = _shape(logp)[1] if _ndim(logp) > 1 else _shape(logp)[0]
    onehot = (np.where(keep, tgt, 0)[..., None] == np.arange(classes)) & keep[..., None]
    if _ndim(logp) > 1:  # classes on axis 1: move the one-hot's class axis there
        onehot = np.moveaxis(onehot, -1, 1)
    picked = F.sum(_t(logp) * onehot.astype(np.float64), axis=1 if _ndim(logp) > 1 else 0)
    losses = -picked
    count = float(keep.sum())
    if reduction == 0:
        return losses, np.asarray(count)
    total = F.sum(losses)
    return (total / count if reduction == 1 else total), np.asarray(count)


def _mse_loss(x: Any, y: Any, reduction: int = 1) -> Tensor:
    d = _arith(operator.sub)(x, y)
    sq = d * d
    return sq if reduction == 0 else (F.mean(sq) if reduction == 1 else F.sum(sq))


def _identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def _to_copy(x: Any, *args: Any, dtype: Any = None, **kwargs: Any) -> Any:
    if dtype is not None and not getattr(dtype, "is_floating_point", True):
        return np.asarray(_values(x)).astype(np.int64 if dtype.itemsize > 1 else np.bool_)
    return x


def _copy(x: Any, src: Any, non_blocking: bool = False) -> Any:
    """``x.copy_(src)`` made functional: `src`, broadcast to `x`'s shape."""
    if isinstance(src, Tensor):
        return F.broadcast_to(src, _shape(x))
    return np.broadcast_to(np.asarray(src, dtype=np.float64), _shape(x)).copy()


def _detach(x: Any) -> Any:
    return _values(x)


def _dropout(x: Any, p: float, train: Any = None) -> Any:
    if train and p > 0:
        raise UnsupportedOpError(
            f"dropout in training mode (p={p}) is random and cannot be replayed"
        )
    return (x, np.ones(_shape(x), dtype=bool))


def _silu(x: Any) -> Tensor:
    return _t(x) * F.sigmoid(x)


def _scalar_first(fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda x, *a, **k: fn(_t(x) if not isinstance(x, Tensor) else x, *a, **k)


ATEN: dict[str, Callable[..., Any]] = {
    # layout and views
    "view": _view,
    "_unsafe_view": _view,
    "reshape": _view,
    "permute": _permute,
    "t": lambda x: F.transpose(x),
    "transpose.int": _transpose,
    "expand": _expand,
    "clone": _identity,
    "alias": _identity,
    "contiguous": _identity,
    "lift_fresh_copy": _identity,
    "_to_copy": _to_copy,
    "detach": _detach,
    "copy": _copy,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "squeeze.dim": _squeeze,
    "squeeze.dims": _squeeze,
    "select.int": _select,
    "slice.Tensor": _slice,
    "split_with_sizes": _split_with_sizes,
    "split.Tensor": _split,
    "unbind.int": _unbind,
    "cat": _cat,
    "stack": _stack,
    "index.Tensor": _index,
    "gather": _gather,
    "scatter.src": _scatter,
    "scatter.value": _scatter,
    "scatter_add": _scatter_add,
    "index_put": _index_put,
    "index_select": _index_select,
    "embedding": _embedding,
    # linear algebra
    "mm": F.matmul,
    "bmm": F.matmul,
    "matmul": F.matmul,
    "addmm": _addmm,
    "baddbmm": _baddbmm,
    "convolution": _convolution,
    "max_pool2d_with_indices": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    # normalization
    "native_layer_norm": _layer_norm,
    "native_group_norm": _group_norm,
    "_native_batch_norm_legit_no_training": _batch_norm_eval,
    "_native_batch_norm_legit_functional": _batch_norm_train,
    "_native_batch_norm_legit": _batch_norm_legit,
    "native_batch_norm": _batch_norm_legit,
    # normalized exponentials, reductions
    "_softmax": _softmax,
    "_log_softmax": _log_softmax,
    "sum.dim_IntList": _sum,
    "sum": _sum,
    "mean.dim": _mean,
    "mean": _mean,
    "amax": _amax,
    "max.dim": _max_dim,
    "var.correction": _var,
    "logsumexp": lambda x, dim, keepdim=False: F.logsumexp(x, dim, keepdim),
    # pointwise
    "add.Tensor": _arith(operator.add),
    "add.Scalar": _arith(operator.add),
    "sub.Tensor": _arith(operator.sub),
    "sub.Scalar": _arith(operator.sub),
    "rsub.Scalar": lambda x, y, alpha=1: _arith(operator.sub)(y, x, alpha),
    "rsub.Tensor": lambda x, y, alpha=1: _arith(operator.sub)(y, x, alpha),
    "mul.Tensor": _arith(operator.mul),
    "mul.Scalar": _arith(operator.mul),
    "div.Tensor": _div,
    "div.Scalar": _div,
    "div.Tensor_mode": _div,
    "neg": operator.neg,
    "pow.Tensor_Scalar": _pow,
    "pow.Tensor_Tensor": _pow,
    "pow.Scalar": _pow,
    "sqrt": F.sqrt,
    "rsqrt": lambda x: 1.0 / F.sqrt(x),
    "reciprocal": lambda x: 1.0 / _t(x),
    "exp": F.exp,
    "log": F.log,
    "log1p": lambda x: F.log(_t(x) + 1.0),
    "expm1": lambda x: F.exp(x) - 1.0,
    "abs": F.abs,
    "tanh": F.tanh,
    "sigmoid": F.sigmoid,
    "relu": _relu,
    "gelu": lambda x, approximate="none": F.gelu(x, approximate=approximate),
    "silu": _silu,
    "erf": F.erf,
    "softplus": lambda x, beta=1, threshold=20: F.softplus(_t(x) * beta) / beta,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "hardtanh": _hardtanh,
    "clamp": _clamp_grad,
    "clamp.Tensor": _clamp_grad,
    "clamp_min": lambda x, lo: _clamp_grad(x, lo, None),
    "clamp_max": lambda x, hi: _clamp_grad(x, None, hi),
    "maximum": lambda x, y: F.maximum(x, y),
    "minimum": lambda x, y: F.minimum(x, y),
    "where.self": _where_op,
    "where.ScalarOther": _where_op,
    "where.ScalarSelf": _where_op,
    "native_dropout": _dropout,
    # losses as decomposed
    "nll_loss_forward": _nll_loss,
    "mse_loss": _mse_loss,
}

#: Assertions export inserts about the traced dtypes and devices: the replay runs in float64
#: on the host, so they do not apply.
CHECKS = ("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range")

#: ATen ops whose outputs carry no gradient (comparisons, masks, indices): run on values.
NONDIFF = frozenset(
    {
        "eq.Scalar",
        "eq.Tensor",
        "ne.Scalar",
        "ne.Tensor",
        "lt.Scalar",
        "lt.Tensor",
        "le.Scalar",
        "le.Tensor",
        "gt.Scalar",
        "gt.Tensor",
        "ge.Scalar",
        "ge.Tensor",
        "logical_not",
        "logical_and",
        "logical_or",
        "bitwise_not",
        "isnan",
        "isinf",
        "argmax",
        "argmin",
        "any",
        "any.dim",
        "any.dims",
        "all",
        "all.dim",
        "sign",
        "full_like",
        "zeros_like",
        "ones_like",
        "empty_like",
        "sym_size.int",
    }
)
