"""Translate a Keras 3 model (Sequential or functional) into the engine's graph, weights included.

Layers are the unit: `KerasGraph` walks a Sequential model's layers in order, or a functional
model's graph through Keras' own graph runner, and replays each supported layer with engine
tensors in float64 (channels-last, as Keras). A layer with weights that has no translation is
an `UnsupportedOpError` naming it. A layer without weights that has no translation — a
`Lambda`, or a custom layer built on `tf.custom_gradient` — runs opaque as an engine "external"
op in float64, differentiated by central differences, so its hand-written gradient can be
checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graddiag.reference import functional as F
from graddiag.reference.engine import Tensor
from graddiag.reference.gradcheck import external
from graddiag.reference.importers.torch_fx import CustomCall, UnsupportedOpError

ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "tanh": F.tanh,
    "sigmoid": F.sigmoid,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "softmax": lambda x: F.softmax(x, axis=-1),
    "log_softmax": lambda x: F.log_softmax(x, axis=-1),
    "silu": lambda x: x * F.sigmoid(x),
    "exponential": F.exp,
}


def _activation(fn: Any, layer: Any) -> Callable[[Any], Any]:
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
    if name not in ACTIVATIONS:
        raise UnsupportedOpError(
            f"activation {name!r} of layer `{layer.name}` is not supported "
            f"(supported: {sorted(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


@dataclass
class KerasGraph:
    """A Keras model replayed by the engine.

    Attributes:
        model: the Keras model.
        parameters: float64 NumPy copies of the trainable variables, by variable path.
        layer_of: the layer name owning each variable path.
        training: replay in training mode (batch statistics) or inference mode.
        custom_calls: the opaque layers met by the last run, with their inputs.
    """

    model: Any
    parameters: dict[str, np.ndarray] = field(default_factory=dict)
    layer_of: dict[str, str] = field(default_factory=dict)
    training: bool = False
    custom_calls: list[CustomCall] = field(default_factory=list)

    def __call__(self, params: dict[str, Tensor], *inputs: Any) -> Any:
        """Run the model in the engine with parameter tensors `params` on `inputs`."""
        self.custom_calls = []
        if len(inputs) == 1 and isinstance(inputs[0], list | tuple):  # Keras' multi-input form
            inputs = tuple(inputs[0])
        xs = [x if isinstance(x, Tensor) else Tensor(_to_numpy(x)) for x in inputs]
        functional = getattr(self.model, "_run_through_graph", None)
        if functional is not None:
            feed = xs[0] if len(xs) == 1 else xs
            return functional(feed, operation_fn=lambda layer: self._layer_fn(layer, params))
        x = xs[0]
        for layer in self.model.layers:
            x = self._layer_fn(layer, params)(x)
        return x

    def _layer_fn(self, layer: Any, params: dict[str, Tensor]) -> Callable[..., Any]:
        """The layer's replay; an error inside it is graddiag's own, naming the layer."""
        rule = self._layer_rule(layer, params)

        def replay(*args: Any, **kwargs: Any) -> Any:
            try:
                return rule(*args, **kwargs)
            except UnsupportedOpError:
                raise
            except Exception as exc:  # noqa: BLE001 - never surface an importer-internal error
                raise UnsupportedOpError(
                    f"layer `{layer.name}` ({type(layer).__name__}): the reference engine could "
                    f"not replay it ({type(exc).__name__}: {exc})"
                ) from exc

        return replay

    def _layer_rule(self, layer: Any, params: dict[str, Tensor]) -> Callable[..., Any]:
        kind = type(layer).__name__
        if not hasattr(layer, "weights"):  # a keras.ops operation in a functional graph
            op = OPS.get(kind)
            if op is None:
                raise UnsupportedOpError(
                    f"keras op `{layer.name}` of type {kind} is not supported by the reference "
                    f"importer (supported: {sorted(OPS)})"
                )
            return lambda *args, **kwargs: op(layer, *args, **kwargs)
        weights = {}
        for v in layer.weights:  # by short name (kernel, bias...) and by full path
            value = params[v.path] if v.path in params else Tensor(_to_numpy(v))
            weights[v.path.rsplit("/", 1)[-1]] = weights[v.path] = value
        handler = LAYERS.get(kind)
        if handler is not None:
            return lambda *args, **kwargs: handler(
                layer,
                weights,
                self.training,
                *args,
                **{k: v for k, v in kwargs.items() if k != "training"},
            )
        if layer.weights:
            raise UnsupportedOpError(
                f"layer `{layer.name}` of type {kind} is not supported by the reference "
                f"importer (supported: {sorted(LAYERS)})"
            )
        return lambda *args, **kwargs: self._opaque(layer, *args)

    def _opaque(self, layer: Any, *args: Any) -> Tensor:
        import tensorflow as tf

        def fn(*arrays: np.ndarray) -> np.ndarray:
            return np.asarray(
                layer.call(*[tf.constant(a, tf.float64) for a in arrays]), dtype=np.float64
            )

        arrays = [a.value if isinstance(a, Tensor) else np.asarray(a) for a in args]
        self.custom_calls.append(
            CustomCall(f"{layer.name} ({type(layer).__name__})", layer.call, arrays)
        )
        return external(fn, *args, name=layer.name)


def import_keras(model: Any, training: bool = False) -> KerasGraph:
    """Gather a Keras model's trainable variables in float64 and prepare its replay.

    Args:
        model: a built Keras 3 model (Sequential or functional).
        training: replay batch normalization with batch statistics (dropout must then be off).
            Nested models are not walked: a model used as a layer is unsupported.

    Returns:
        A `KerasGraph`; call it as ``graph(params, *inputs)``.

    Raises:
        TypeError: if `model` is not a built Keras model.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected `model` to be a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise TypeError(f"Expected `model` to be built (call it once), got unbuilt {model.name}")
    params, layer_of = {}, {}
    for layer in model.layers:
        for v in layer.trainable_weights:
            params[v.path] = _to_numpy(v)
            layer_of[v.path] = layer.name
    return KerasGraph(model, params, layer_of, training)


def _to_numpy(x: Any) -> np.ndarray:
    arr = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
    return arr.astype(np.float64) if np.issubdtype(arr.dtype, np.floating) else arr


# ------------------------------------------------------------------------------ layers


def _dense(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Tensor:
    y = F.matmul(x, w["kernel"])
    y = y + w["bias"] if "bias" in w else y
    return _activation(layer.activation, layer)(y)


def _to_nchw(x: Any) -> Tensor:
    return F.transpose(x, (0, 3, 1, 2))


def _to_nhwc(x: Any) -> Tensor:
    return F.transpose(x, (0, 2, 3, 1))


def _same_padding(
    layer: Any, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int]
) -> tuple[int, int]:
    pads = []
    for n, k, s in zip(size, kernel, strides, strict=True):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        if total % 2:
            raise UnsupportedOpError(
                f"layer `{layer.name}`: padding='same' here pads unevenly ({total} rows/cols); "
                "only symmetric padding is supported"
            )
        pads.append(total // 2)
    return pads[0], pads[1]


def _check_channels_last(layer: Any) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedOpError(f"layer `{layer.name}`: only data_format='channels_last'")


def _conv2d(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Tensor:
    _check_channels_last(layer)
    if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
        raise UnsupportedOpError(f"layer `{layer.name}`: only dilation 1 and groups 1")
    kernel = tuple(layer.kernel_size)
    strides = tuple(layer.strides)
    padding = (
        (0, 0)
        if layer.padding == "valid"
        else _same_padding(layer, tuple(x.shape[1:3]), kernel, strides)
    )
    weight = F.transpose(w["kernel"], (3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)
    y = _to_nhwc(F.conv2d(_to_nchw(x), weight, stride=strides, padding=padding))
    y = y + w["bias"] if "bias" in w else y
    return _activation(layer.activation, layer)(y)


def _nwc_as_nhwc(x: Any) -> Tensor:
    """A 1-D (N, W, C) input as a 2-D (N, 1, W, C) one, so 1-D layers reuse the 2-D ops."""
    return F.reshape(x, (x.shape[0], 1, *x.shape[1:]))


def _nhwc_as_nwc(y: Any) -> Tensor:
    return F.reshape(y, (y.shape[0], *y.shape[2:]))


def _pool(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """MaxPooling/AveragePooling 1D and 2D; 1-D pools run as 2-D over a height of 1."""

    def pool(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Tensor:
        _check_channels_last(layer)
        if layer.padding != "valid":
            raise UnsupportedOpError(f"layer `{layer.name}`: only padding='valid' for pooling")
        size, strides = tuple(layer.pool_size), tuple(layer.strides)
        if len(size) == 1:
            (k,), (stride,) = size, strides
            y = _to_nhwc(fn(_to_nchw(_nwc_as_nhwc(x)), (1, k), (1, stride)))
            return _nhwc_as_nwc(y)
        return _to_nhwc(fn(_to_nchw(x), size, strides))

    return pool


def _dropout(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Any:
    if training and layer.rate > 0:
        raise UnsupportedOpError(
            f"layer `{layer.name}`: dropout in training mode is random and cannot be replayed; "
            "validate with training=False"
        )
    return x


def _axes(layer: Any, ndim: int) -> tuple[int, ...]:
    axis = layer.axis
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


def _layer_norm(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Tensor:
    if getattr(layer, "rms_scaling", False):
        raise UnsupportedOpError(f"layer `{layer.name}`: rms_scaling is not supported")
    axes = _axes(layer, x.ndim)
    y = F.normalize(x, axes, layer.epsilon)
    y = y * w["gamma"] if "gamma" in w else y
    return y + w["beta"] if "beta" in w else y


def _batch_norm(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Tensor:
    (ch,) = _axes(layer, x.ndim)
    shape = tuple(-1 if i == ch else 1 for i in range(x.ndim))
    if training:
        y = F.normalize(x, tuple(i for i in range(x.ndim) if i != ch), layer.epsilon)
    else:
        mean = np.reshape(_to_numpy(layer.moving_mean), shape)
        var = np.reshape(_to_numpy(layer.moving_variance), shape)
        y = (x - mean) / np.sqrt(var + layer.epsilon)
    y = y * F.reshape(w["gamma"], shape) if "gamma" in w else y
    return y + F.reshape(w["beta"], shape) if "beta" in w else y


def _merge(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def merge(layer: Any, w: dict[str, Any], training: bool, xs: Any) -> Any:
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return merge


def _conv1d(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Tensor:
    _check_channels_last(layer)
    if tuple(layer.dilation_rate) != (1,) or layer.groups != 1:
        raise UnsupportedOpError(f"layer `{layer.name}`: only dilation 1 and groups 1")
    (k,), (stride,) = tuple(layer.kernel_size), tuple(layer.strides)
    if layer.padding == "causal":
        raise UnsupportedOpError(f"layer `{layer.name}`: padding='causal' is not supported")
    pad = (
        0
        if layer.padding == "valid"
        else _same_padding(layer, (1, x.shape[1]), (1, k), (1, stride))[1]
    )
    weight = F.transpose(
        F.reshape(w["kernel"], (1, k, *_tensor(w["kernel"]).shape[1:])), (3, 2, 0, 1)
    )
    y = F.conv2d(_to_nchw(_nwc_as_nhwc(x)), weight, stride=(1, stride), padding=(0, pad))
    y = _nhwc_as_nwc(_to_nhwc(y))
    y = y + w["bias"] if "bias" in w else y
    return _activation(layer.activation, layer)(y)


def _global_pool(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def pool(layer: Any, w: dict[str, Any], training: bool, x: Any) -> Tensor:
        _check_channels_last(layer)
        return fn(x, axis=tuple(range(1, x.ndim - 1)), keepdims=layer.keepdims)

    return pool


def _check_rnn(layer: Any, kwargs: dict[str, Any]) -> None:
    if kwargs.get("mask") is not None or kwargs.get("initial_state") is not None:
        raise UnsupportedOpError(
            f"layer `{layer.name}`: masks and initial states are not supported"
        )
    for flag in ("go_backwards", "return_state", "stateful"):
        if getattr(layer, flag, False):
            raise UnsupportedOpError(f"layer `{layer.name}`: {flag}=True is not supported")


def _run_rnn(layer: Any, x: Any, state: Any, step: Callable[..., Any]) -> Tensor:
    """Unroll `step(x_t, state) -> (h_t, state)` over the time axis (batch-major, as Keras)."""
    outputs = []
    for t in range(x.shape[1]):
        h, state = step(_tensor(x)[:, t], state)
        outputs.append(h)
    return F.stack(outputs, axis=1) if layer.return_sequences else outputs[-1]


def _rnn_weights(layer: Any, w: dict[str, Any]) -> tuple[Any, Any, Any]:
    return w["kernel"], w["recurrent_kernel"], w.get("bias")


def _rnn_dropout(layer: Any, training: bool) -> None:
    if training and (layer.dropout or layer.recurrent_dropout):
        raise UnsupportedOpError(
            f"layer `{layer.name}`: dropout in training mode is random and cannot be replayed; "
            "validate with training=False"
        )


def _simple_rnn(layer: Any, w: dict[str, Any], training: bool, x: Any, **kwargs: Any) -> Tensor:
    _check_rnn(layer, kwargs)
    _rnn_dropout(layer, training)
    kernel, recurrent, bias = _rnn_weights(layer, w)
    act = _activation(layer.cell.activation, layer)
    h0 = np.zeros((x.shape[0], layer.units))

    def step(xt: Any, h: Any) -> tuple[Any, Any]:
        z = F.matmul(xt, kernel) + F.matmul(h, recurrent)
        h = act(z + bias if bias is not None else z)
        return h, h

    return _run_rnn(layer, x, h0, step)


def _lstm(layer: Any, w: dict[str, Any], training: bool, x: Any, **kwargs: Any) -> Tensor:
    _check_rnn(layer, kwargs)
    _rnn_dropout(layer, training)
    kernel, recurrent, bias = _rnn_weights(layer, w)
    act = _activation(layer.cell.activation, layer)
    gate = _activation(layer.cell.recurrent_activation, layer)
    u = layer.units
    zeros = np.zeros((x.shape[0], u))

    def step(xt: Any, state: Any) -> tuple[Any, Any]:
        h, c = state
        z = F.matmul(xt, kernel) + F.matmul(h, recurrent)
        z = z + bias if bias is not None else z
        i, f, g, o = (
            gate(z[:, :u]),
            gate(z[:, u : 2 * u]),
            act(z[:, 2 * u : 3 * u]),
            gate(z[:, 3 * u :]),
        )
        c = f * c + i * g
        h = o * act(c)
        return h, (h, c)

    return _run_rnn(layer, x, (zeros, zeros), step)


def _gru(layer: Any, w: dict[str, Any], training: bool, x: Any, **kwargs: Any) -> Tensor:
    _check_rnn(layer, kwargs)
    _rnn_dropout(layer, training)
    kernel, recurrent, bias = _rnn_weights(layer, w)
    act = _activation(layer.cell.activation, layer)
    gate = _activation(layer.cell.recurrent_activation, layer)
    u = layer.units
    reset_after = layer.cell.reset_after
    if bias is None:
        b_in = b_rec = None
    elif reset_after:
        b_in, b_rec = bias[0], bias[1]
    else:
        b_in, b_rec = bias, None

    def step(xt: Any, h: Any) -> tuple[Any, Any]:
        xz = F.matmul(xt, kernel)
        xz = xz + b_in if b_in is not None else xz
        if reset_after:
            hz = F.matmul(h, recurrent)
            hz = hz + b_rec if b_rec is not None else hz
            z = gate(xz[:, :u] + hz[:, :u])
            r = gate(xz[:, u : 2 * u] + hz[:, u : 2 * u])
            hh = act(xz[:, 2 * u :] + r * hz[:, 2 * u :])
        else:
            rk = _tensor(recurrent)
            z = gate(xz[:, :u] + F.matmul(h, rk[:, :u]))
            r = gate(xz[:, u : 2 * u] + F.matmul(h, rk[:, u : 2 * u]))
            hh = act(xz[:, 2 * u :] + F.matmul(r * h, rk[:, 2 * u :]))
        h = z * h + (1.0 - z) * hh
        return h, h

    return _run_rnn(layer, x, np.zeros((x.shape[0], u)), step)


def _einsum_dense_in(x: Any, kernel: Any, bias: Any) -> Tensor:
    """(B, T, D) x (D, H, K) -> (B, T, H, K), as MultiHeadAttention's projections."""
    d, h, k = _tensor(kernel).shape
    y = F.reshape(F.matmul(x, F.reshape(kernel, (d, h * k))), (*x.shape[:-1], h, k))
    return y + bias if bias is not None else y


def _mha(
    layer: Any,
    w: dict[str, Any],
    training: bool,
    query: Any,
    value: Any = None,
    key: Any = None,
    attention_mask: Any = None,
    use_causal_mask: bool = False,
    return_attention_scores: bool = False,
    **kwargs: Any,
) -> Tensor:
    if return_attention_scores or attention_mask is not None:
        raise UnsupportedOpError(
            f"layer `{layer.name}`: attention_mask / return_attention_scores are not supported "
            "(use_causal_mask is)"
        )
    if tuple(layer._attention_axes) != (1,) or _tensor(query).ndim != 3:
        raise UnsupportedOpError(f"layer `{layer.name}`: only (batch, time, features) inputs")
    if training and layer._dropout:
        raise UnsupportedOpError(
            f"layer `{layer.name}`: attention dropout in training mode cannot be replayed"
        )
    value = query if value is None else value
    key = value if key is None else key

    def dense(sub: Any) -> tuple[Any, Any]:
        bias = w[sub.bias.path] if getattr(sub, "bias", None) is not None else None
        return w[sub.kernel.path], bias

    q = _einsum_dense_in(query, *dense(layer._query_dense)) * (1.0 / math.sqrt(layer._key_dim))
    k = _einsum_dense_in(key, *dense(layer._key_dense))
    v = _einsum_dense_in(value, *dense(layer._value_dense))
    scores = F.matmul(F.transpose(q, (0, 2, 1, 3)), F.transpose(k, (0, 2, 3, 1)))  # B H Tq Tk
    if use_causal_mask:
        tq, tk = scores.shape[-2:]
        keep = np.tril(np.ones((tq, tk), dtype=bool), tk - tq)
        scores = F.where(np.broadcast_to(keep, scores.shape), scores, np.full(scores.shape, -1e9))
    probs = F.softmax(scores, axis=-1)
    out = F.transpose(F.matmul(probs, F.transpose(v, (0, 2, 1, 3))), (0, 2, 1, 3))  # B Tq H V
    kernel, bias = dense(layer._output_dense)
    h, vd, d = _tensor(kernel).shape
    y = F.matmul(F.reshape(out, (*out.shape[:2], h * vd)), F.reshape(kernel, (h * vd, d)))
    return y + bias if bias is not None else y


def _no_kwargs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Layer rules that take no call keywords (training=..., mask=... are ignored)."""
    return lambda layer, w, training, *args, **kwargs: fn(layer, w, training, *args)


_LAYERS: dict[str, Callable[..., Any]] = {
    "InputLayer": lambda layer, w, training, x: x,
    "Dense": _dense,
    "Conv2D": _conv2d,
    "MaxPooling2D": _pool(F.max_pool2d),
    "AveragePooling2D": _pool(F.avg_pool2d),
    "Flatten": lambda layer, w, training, x: F.reshape(x, (x.shape[0], -1)),
    "Reshape": lambda layer, w, training, x: F.reshape(x, (x.shape[0], *layer.target_shape)),
    "Dropout": _dropout,
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "Embedding": lambda layer, w, training, x: (
        F.take(w["embeddings"], x.value) if not layer.mask_zero else _unsupported_mask(layer)
    ),
    "Activation": lambda layer, w, training, x: _activation(layer.activation, layer)(x),
    "ReLU": lambda layer, w, training, x: (
        F.relu(x)
        if layer.max_value is None and not layer.negative_slope and not layer.threshold
        else _unsupported(layer)
    ),
    "Softmax": lambda layer, w, training, x: F.softmax(x, axis=layer.axis),
    "Add": _merge(lambda a, b: a + b),
    "Subtract": _merge(lambda a, b: a - b),
    "Multiply": _merge(lambda a, b: a * b),
    "Concatenate": lambda layer, w, training, xs: F.concat(list(xs), axis=layer.axis),
    "Conv1D": _conv1d,
    "MaxPooling1D": _pool(F.max_pool2d),
    "AveragePooling1D": _pool(F.avg_pool2d),
    "GlobalAveragePooling1D": _global_pool(F.mean),
    "GlobalMaxPooling1D": _global_pool(F.max),
    "GlobalAveragePooling2D": _global_pool(F.mean),
    "GlobalMaxPooling2D": _global_pool(F.max),
}
LAYERS: dict[str, Callable[..., Any]] = {
    **{name: _no_kwargs(fn) for name, fn in _LAYERS.items()},
    "SimpleRNN": _simple_rnn,
    "LSTM": _lstm,
    "GRU": _gru,
    "MultiHeadAttention": _mha,
}


# keras.ops operations that appear as nodes of functional models (x @ y, ops.softmax, ...).
OPS: dict[str, Callable[..., Any]] = {
    "Matmul": lambda op, a, b: F.matmul(a, b),
    "Transpose": lambda op, x: F.transpose(x, op.axes),
    "Softmax": lambda op, x: F.softmax(x, axis=op.axis),
    "Add": lambda op, a, b: a + b,
    "Subtract": lambda op, a, b: a - b,
    "Multiply": lambda op, a, b: a * b,
    "Divide": lambda op, a, b: a / b,
    "TrueDivide": lambda op, a, b: a / b,
    "Tanh": lambda op, x: F.tanh(x),
    "Relu": lambda op, x: F.relu(x),
    "Gelu": lambda op, x: F.gelu(x, approximate="tanh" if op.approximate else "none"),
}


def _unsupported_mask(layer: Any) -> Any:
    raise UnsupportedOpError(
        f"layer `{layer.name}`: mask_zero=True (the masks it sends downstream are not replayed)"
    )


def _unsupported(layer: Any) -> Any:
    raise UnsupportedOpError(f"layer `{layer.name}`: this configuration is not supported")


# ------------------------------------------------------------------------- tf.function graphs


@dataclass
class TFFunctionGraph:
    """A `tf.function`'s concrete graph replayed by the engine, op by op.

    Attributes:
        concrete: the traced `ConcreteFunction`.
        parameters: float64 NumPy copies of the captured trainable variables, by variable name.
        custom_gradients: names of the `tf.custom_gradient` boundaries (IdentityN ops with an
            overridden gradient) in the graph. The engine differentiates through their forward
            ops, so their hand-written gradients are *not* used; a mismatch with TF's gradient
            points at them.
    """

    concrete: Any
    parameters: dict[str, np.ndarray] = field(default_factory=dict)
    custom_gradients: list[str] = field(default_factory=list)
    _captured: dict[str, str] = field(default_factory=dict)
    _constants: dict[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, params: dict[str, Tensor], *inputs: Any) -> Any:
        """Run the graph in the engine with parameter tensors `params` on `inputs`."""
        graph = self.concrete.graph
        env: dict[str, Any] = dict(self._constants)
        n_args = len(graph.inputs) - len(self._captured) - len(self._constants)
        for t, x in zip(graph.inputs[:n_args], inputs, strict=True):
            env[t.name] = x if isinstance(x, Tensor) else Tensor(_to_numpy(x))
        for op in graph.get_operations():
            if op.type in ("Placeholder", "NoOp"):
                continue
            if op.type == "ReadVariableOp":
                var = self._captured[op.inputs[0].name]
                outs = [params[var] if var in params else Tensor(self._constant(var))]
            else:
                args = [env[t.name] for t in op.inputs]
                handler = TF_OPS.get(op.type)
                if handler is None:
                    raise UnsupportedOpError(
                        f"TF op `{op.name}` of type {op.type} is not supported by the reference "
                        f"importer (supported: {sorted(TF_OPS)})"
                    )
                out = handler(op, *args)
                outs = list(out) if op.type == "IdentityN" else [out]
            for t, value in zip(op.outputs, outs, strict=True):
                env[t.name] = value
        import tensorflow as tf

        # structured_outputs, not graph.outputs: a trace under a GradientTape appends the
        # intermediates its backward needs to graph.outputs.
        results = [env[t.name] for t in tf.nest.flatten(self.concrete.structured_outputs)]
        return results[0] if len(results) == 1 else results

    def _constant(self, name: str) -> np.ndarray:
        return next(_to_numpy(v) for v in self.concrete.variables if v.name == name)


def import_tf_function(fn: Any, *example_args: Any) -> TFFunctionGraph:
    """Trace `fn` (a `tf.function` or a plain function of TF ops) on `example_args`.

    Args:
        fn: the function; variables it reads are captured as parameters.
        *example_args: example inputs, fixing shapes and dtypes for the trace.

    Returns:
        A `TFFunctionGraph`; call it as ``graph(params, *inputs)``.
    """
    import tensorflow as tf

    function = fn if hasattr(fn, "get_concrete_function") else tf.function(fn)
    concrete = function.get_concrete_function(*example_args)
    by_handle = {id(v.handle): v for v in concrete.variables}
    captured, params, constants = {}, {}, {}
    for external_t, internal in concrete.graph.captures:
        var = by_handle.get(id(external_t))
        if var is None:  # a captured eager tensor: a constant of the graph
            constants[internal.name] = _to_numpy(external_t)
        else:
            captured[internal.name] = var.name
            if var.trainable:
                params[var.name] = _to_numpy(var)
    custom = [
        op.name
        for op in concrete.graph.get_operations()
        if op.type == "IdentityN" and "_gradient_op_type" in op.node_def.attr
    ]
    return TFFunctionGraph(concrete, params, custom, captured, constants)


def _const_value(x: Any) -> Any:
    return np.asarray(x.value if isinstance(x, Tensor) else x)


def _axes_arg(x: Any) -> tuple[int, ...]:
    return tuple(int(a) for a in np.atleast_1d(_const_value(x)))


def _tf_matmul(op: Any, a: Any, b: Any) -> Tensor:
    names = ("transpose_a", "transpose_b") if op.type == "MatMul" else ("adj_x", "adj_y")
    ta, tb = (op.get_attr(n) for n in names)
    swap = lambda t: F.transpose(t, (*range(t.ndim - 2), t.ndim - 1, t.ndim - 2))  # noqa: E731
    return F.matmul(swap(_tensor(a)) if ta else a, swap(_tensor(b)) if tb else b)


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _tf_reduce(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    return lambda op, x, axes: fn(x, axis=_axes_arg(axes), keepdims=op.get_attr("keep_dims"))


def _tf_const(op: Any) -> Any:
    from tensorflow.python.framework import tensor_util

    value = tensor_util.MakeNdarray(op.get_attr("value"))
    return value.astype(np.float64) if np.issubdtype(value.dtype, np.floating) else value


def _tf_conv2d(op: Any, x: Any, kernel: Any) -> Tensor:
    if op.get_attr("data_format") != b"NHWC" or tuple(op.get_attr("dilations")) != (1, 1, 1, 1):
        raise UnsupportedOpError(f"TF op `{op.name}`: only NHWC Conv2D without dilation")
    strides = tuple(op.get_attr("strides"))[1:3]
    kh, kw = _tensor(kernel).shape[:2]
    padding = op.get_attr("padding")
    pads = (
        (0, 0)
        if padding == b"VALID"
        else _same_padding(op, tuple(_tensor(x).shape[1:3]), (kh, kw), strides)
    )
    weight = F.transpose(kernel, (3, 2, 0, 1))
    return _to_nhwc(F.conv2d(_to_nchw(x), weight, stride=strides, padding=pads))


def _tf_pool(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def pool(op: Any, x: Any) -> Tensor:
        if op.get_attr("padding") != b"VALID" or op.get_attr("data_format") != b"NHWC":
            raise UnsupportedOpError(f"TF op `{op.name}`: only VALID NHWC pooling")
        kernel = tuple(op.get_attr("ksize"))[1:3]
        return _to_nhwc(fn(_to_nchw(x), kernel, tuple(op.get_attr("strides"))[1:3]))

    return pool


TF_OPS: dict[str, Callable[..., Any]] = {
    "Identity": lambda op, x: x,
    "IdentityN": lambda op, *xs: xs,
    "StopGradient": lambda op, x: Tensor(_tensor(x).value),
    "Const": lambda op: _tf_const(op),
    "Cast": lambda op, x: x if isinstance(x, Tensor) else np.asarray(x),
    "MatMul": _tf_matmul,
    "BatchMatMulV2": _tf_matmul,
    "BiasAdd": lambda op, x, b: x + b,
    "AddV2": lambda op, a, b: a + b,
    "Add": lambda op, a, b: a + b,
    "Sub": lambda op, a, b: a - b,
    "Mul": lambda op, a, b: a * b,
    "RealDiv": lambda op, a, b: a / b,
    "Neg": lambda op, x: -x,
    "Square": lambda op, x: x * x,
    "SquaredDifference": lambda op, a, b: (a - b) * (a - b),
    "Sqrt": lambda op, x: F.sqrt(x),
    "Rsqrt": lambda op, x: 1.0 / F.sqrt(x),
    "Exp": lambda op, x: F.exp(x),
    "Log": lambda op, x: F.log(x),
    "Abs": lambda op, x: F.abs(x),
    "Pow": lambda op, a, b: _tensor(a) ** b,
    "Tanh": lambda op, x: F.tanh(x),
    "Sigmoid": lambda op, x: F.sigmoid(x),
    "Relu": lambda op, x: F.relu(x),
    "Softplus": lambda op, x: F.softplus(x),
    "Maximum": lambda op, a, b: F.maximum(a, b),
    "Minimum": lambda op, a, b: F.minimum(a, b),
    "Softmax": lambda op, x: F.softmax(x, axis=-1),
    "LogSoftmax": lambda op, x: F.log_softmax(x, axis=-1),
    "Sum": _tf_reduce(F.sum),
    "Mean": _tf_reduce(F.mean),
    "Max": _tf_reduce(F.max),
    "Reshape": lambda op, x, shape: F.reshape(x, _axes_arg(shape)),
    "Transpose": lambda op, x, perm: F.transpose(x, _axes_arg(perm)),
    "ConcatV2": lambda op, *xs: F.concat(list(xs[:-1]), axis=int(_const_value(xs[-1]))),
    "Pack": lambda op, *xs: F.stack(list(xs), axis=op.get_attr("axis")),
    "Conv2D": _tf_conv2d,
    "MaxPool": _tf_pool(F.max_pool2d),
    "AvgPool": _tf_pool(F.avg_pool2d),
}
