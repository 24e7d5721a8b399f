"""Check a framework's gradients against the reference engine, parameter by parameter.

`validate` runs the user's model three ways on one example batch: in the framework in the
model's own dtype, in the framework in float64, and in the engine in float64. Engine vs
framework-float64 isolates gradient *bugs* (a wrong custom backward, a broken op): both sides
compute the same math at the same precision. Engine vs framework-in-its-dtype adds the
*precision* loss of float32/bfloat16 training. Each layer whose error exceeds the tolerance for
its dtype becomes a `Finding(kind="validation")`; `ValidationReport.format` ranks every
parameter worst first. Torch models reach the engine through `torch.export`'s core ATen graph
(torch.fx where export fails), Keras models layer by layer. Custom ops that the importer cannot
see inside are differentiated by central differences in the engine, and their hand-written
backward is also checked directly, so a wrong one is named.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graddiag.findings import Finding
from graddiag.reference.engine import Tensor
from graddiag.reference.gradcheck import DEFAULT_EPS, relative_error
from graddiag.reference.importers.torch_fx import UnsupportedOpError

#: Largest acceptable relative error (``max|a − b| / max|b|``) of a framework gradient against
#: the engine's float64 gradient, by the dtype the framework computed in. float64 allows for
#: different summation orders; lower precisions for their rounding through a whole network.
TOLERANCES: dict[str, float] = {
    "float64": 1e-7,
    "float32": 1e-3,
    "bfloat16": 1e-1,
    "float16": 5e-2,
}
#: Errors are relative to each parameter's largest gradient entry, but never to less than this
#: fraction of the model's largest one: a gradient that is zero in exact arithmetic (a conv bias
#: followed by batch norm) is rounding noise, to be judged on the model's scale.
SCALE_FLOOR = 1e-2
CUSTOM_OP_RTOL = 1e-5  # directional derivative vs central differences, both float64


def _badness(rel_err: float, rel_err_f64: float | None, tolerance: float) -> float:
    """The worst of the two errors as a multiple of its tolerance (> 1: out of tolerance);
    a NaN error (a NaN gradient) is infinitely bad."""
    f64 = 0.0 if rel_err_f64 is None else rel_err_f64 / TOLERANCES["float64"]
    errs = (f64, rel_err / tolerance)
    return math.inf if any(math.isnan(e) for e in errs) else max(errs)


@dataclass(frozen=True)
class LayerAgreement:
    """How well one layer's gradients agree with the engine.

    Attributes:
        layer: the layer's qualified name.
        parameters: its parameter names.
        dtype: the framework's compute dtype.
        max_abs_err: largest absolute difference, framework (own dtype) vs engine.
        max_rel_err: largest relative error, framework (own dtype) vs engine.
        max_abs_err_f64: the same against the framework run in float64 (None if unavailable).
        max_rel_err_f64: the same, relative.
        tolerance: the relative tolerance applied to `max_rel_err`.

    `badness` is the worst error as a multiple of its tolerance (> 1: out of tolerance).
    """

    layer: str
    parameters: tuple[str, ...]
    dtype: str
    max_abs_err: float
    max_rel_err: float
    max_abs_err_f64: float | None
    max_rel_err_f64: float | None
    tolerance: float

    @property
    def badness(self) -> float:
        return _badness(self.max_rel_err, self.max_rel_err_f64, self.tolerance)

    @property
    def ok(self) -> bool:
        return self.badness <= 1.0


@dataclass(frozen=True)
class ParameterAgreement:
    """How well one parameter's gradient agrees with the engine (fields as `LayerAgreement`).

    `badness` is the worst error as a multiple of its tolerance (> 1: out of tolerance), the
    key that orders a report worst first.
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    max_rel_err_f64: float | None
    tolerance: float

    @property
    def badness(self) -> float:
        return _badness(self.max_rel_err, self.max_rel_err_f64, self.tolerance)

    @property
    def ok(self) -> bool:
        return self.badness <= 1.0


@dataclass(frozen=True)
class CustomOpCheck:
    """A custom op's hand-written gradient against central differences (float64)."""

    name: str
    rel_err: float
    ok: bool


@dataclass
class ValidationReport:
    """The result of `validate`.

    Attributes:
        framework: "torch" or "keras".
        dtype: the framework's compute dtype.
        loss: the engine's float64 loss.
        framework_loss: the framework's loss in its own dtype.
        layers: one `LayerAgreement` per layer with trainable parameters.
        custom_ops: one `CustomOpCheck` per call of an opaque custom op.
        findings: the `validation` findings (empty when everything agrees).
        notes: what was skipped or assumed (e.g. dropout switched off).
    """

    framework: str
    dtype: str
    loss: float
    framework_loss: float
    layers: list[LayerAgreement] = field(default_factory=list)
    custom_ops: list[CustomOpCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parameters: list[ParameterAgreement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity in ("warning", "error") for f in self.findings)

    def worst(self, n: int | None = None) -> list[ParameterAgreement]:
        """The parameters, worst agreement first (error as a multiple of its tolerance); the
        `n` worst when `n` is given.

        Raises:
            ValueError: if `n` is not positive.
        """
        if n is not None and n < 1:
            raise ValueError(f"Expected `n` >= 1, got {n!r}")
        ranked = sorted(self.parameters, key=lambda p: p.badness, reverse=True)
        return ranked if n is None else ranked[:n]

    def format(self, limit: int = 20) -> str:
        """A plain-text report: tolerances, the `limit` worst parameters, custom ops, verdict.

        Raises:
            ValueError: if `limit` is not positive.
        """
        if limit < 1:
            raise ValueError(f"Expected `limit` >= 1, got {limit!r}")
        tol = self.parameters[0].tolerance if self.parameters else TOLERANCES["float32"]
        lines = [
            f"{self.framework} {self.dtype}: {len(self.parameters)} parameters, "
            f"{sum(not p.ok for p in self.parameters)} out of tolerance "
            f"(float64 vs engine <= {TOLERANCES['float64']:.0e}, {self.dtype} vs engine <= "
            f"{tol:.0e}; errors relative to the gradient's largest entry)",
            f"{'parameter':<44} {'shape':>14} {'rel err f64':>11} {'rel err':>9}  status",
        ]
        for p in self.worst(limit):
            f64 = "n/a" if p.max_rel_err_f64 is None else f"{p.max_rel_err_f64:.1e}"
            name = p.name if len(p.name) <= 44 else "…" + p.name[-43:]
            lines.append(
                f"{name:<44} {str(p.shape):>14} {f64:>11} {p.max_rel_err:>9.1e}  "
                f"{'ok' if p.ok else 'MISMATCH'}"
            )
        rest = self.parameters and len(self.parameters) - limit
        if rest and rest > 0:
            lines.append(f"... {rest} more, all no worse than the last row")
        for c in self.custom_ops:
            lines.append(
                f"custom op {c.name}: rel err {c.rel_err:.1e} vs finite differences "
                f"(<= {CUSTOM_OP_RTOL:.0e}) {'ok' if c.ok else 'MISMATCH'}"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append("all gradients agree" if self.ok else "gradient mismatch found")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "framework": self.framework,
            "dtype": self.dtype,
            "loss": self.loss,
            "framework_loss": self.framework_loss,
            "ok": self.ok,
            "layers": [asdict(a) for a in self.layers],
            "parameters": [{**asdict(p), "ok": p.ok} for p in self.worst()],
            "custom_ops": [asdict(c) for c in self.custom_ops],
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
        }


def validate(
    model: Any,
    example_inputs: Any,
    loss_fn: Any,
    targets: Any,
    *,
    step: int = 0,
    rtol: float | None = None,
    training: bool = False,
    check_custom_ops: bool = True,
    seed: int = 0,
) -> ValidationReport:
    """Compare a torch or Keras model's parameter gradients with the reference engine's.

    Args:
        model: a `torch.nn.Module` or a built `keras.Model`. It is not modified (torch models
            are deep-copied; Keras weights are only read).
        example_inputs: one input batch, or a tuple of inputs for multi-input models.
        loss_fn: torch: a loss module or function ``loss_fn(output, targets)``, exported
            with the model by torch.export (e.g. `nn.CrossEntropyLoss()`, `F.mse_loss`, a
            function of a Hugging Face output's `.logits`); torch.fx is the fallback for
            models that do not export. Keras: a `keras.losses` object or name among
            `KERAS_LOSSES` / `KERAS_LOSS_NAMES` (BinaryCrossentropy from logits only).
        targets: the batch's targets.
        step: the step number written into the findings.
        rtol: override the relative tolerance for the model's dtype (see `TOLERANCES`).
        training: Keras only: replay batch normalization in training mode. Torch models run
            in their current mode, except dropout, which is switched off for the check.
        check_custom_ops: also check each opaque custom op's own backward directly.
        seed: seeds the random directions of the custom-op checks.

    Returns:
        A `ValidationReport`.

    Raises:
        TypeError: if `model` is neither a torch module nor a Keras model.
        ValueError: if `rtol` is not positive.
        UnsupportedOpError: if the model uses an op the importers cannot translate.
    """
    if rtol is not None and not rtol > 0:
        raise ValueError(f"Expected `rtol` > 0, got {rtol!r}")
    kind = _framework(model)
    if kind is None:
        raise TypeError(
            f"Expected `model` to be a torch.nn.Module or a keras.Model, got {type(model).__name__}"
        )
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    runner = _validate_torch if kind == "torch" else _validate_keras
    run = runner(model, inputs, loss_fn, targets, training, check_custom_ops, seed)
    return _compare(kind, run, step, rtol)


@dataclass
class _Run:
    """Everything `_compare` needs, framework-neutral: gradients as float64 NumPy arrays."""

    dtype: str
    loss: float
    framework_loss: float
    framework_loss_f64: float | None
    engine: dict[str, np.ndarray]
    native: dict[str, np.ndarray]
    f64: dict[str, np.ndarray] | None
    layer_of: dict[str, str]
    custom_ops: list[CustomOpCheck]
    notes: list[str]


def _framework(model: Any) -> str | None:
    for cls in type(model).__mro__:
        mod = cls.__module__
        if mod.startswith("torch.nn"):
            return "torch"
        if mod.startswith("keras"):
            return "keras"
    return None


def _engine_grads(
    graph: Any, inputs: tuple[Any, ...], loss: Callable[[Any], Tensor]
) -> tuple[float, dict[str, Any]]:
    params = {k: Tensor(v, requires_grad=True, name=k) for k, v in graph.parameters.items()}
    out = loss(graph(params, *inputs))
    out.backward()
    return float(out.value), {k: _zeros_if_none(p.grad, p.value) for k, p in params.items()}


def _zeros_if_none(grad: Any, like: Any) -> np.ndarray:
    return np.zeros_like(like) if grad is None else np.asarray(grad, dtype=np.float64)


def _directional_check(
    name: str,
    f: Callable[..., np.ndarray],
    backward: Callable[..., list],
    inputs: list[np.ndarray],
    seed: int,
) -> CustomOpCheck:
    """<u, J v> by the op's own backward vs by central differences of its forward."""
    rng = np.random.default_rng(seed)
    floats = [i for i, a in enumerate(inputs) if np.issubdtype(a.dtype, np.floating)]
    v = {i: rng.standard_normal(inputs[i].shape) for i in floats}
    u = rng.standard_normal(np.shape(f(*inputs)))
    grads = backward(inputs, u)
    own = sum(float(np.sum(grads[i] * v[i])) for i in floats if grads[i] is not None)
    h = DEFAULT_EPS * max(1.0, max(float(np.max(np.abs(inputs[i]), initial=0)) for i in floats))

    def shifted(sign: float) -> list[np.ndarray]:
        return [a + sign * h * v[i] if i in v else a for i, a in enumerate(inputs)]

    numeric = float(np.sum(u * (f(*shifted(1.0)) - f(*shifted(-1.0))))) / (2 * h)
    err = abs(own - numeric) / max(abs(numeric), abs(own), 1e-300)
    return CustomOpCheck(name, err, err <= CUSTOM_OP_RTOL)


# ------------------------------------------------------------------------------------ torch


def _validate_torch(
    model: Any,
    inputs: tuple[Any, ...],
    loss_fn: Any,
    targets: Any,
    training: bool,
    check_custom_ops: bool,
    seed: int,
) -> _Run:
    import torch

    notes = []
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    dropout = torch.nn.modules.dropout._DropoutNd  # base of Dropout, Dropout1d/2d/3d, ...

    def prepared(cast: Any) -> Any:
        m = copy.deepcopy(model)
        if cast is not None:
            m = m.to(cast)
        for sub in m.modules():
            if isinstance(sub, dropout):  # eval, and p = 0 for functional uses of sub.p
                sub.eval()
                sub.p = 0.0
            elif isinstance(sub, torch.nn.MultiheadAttention):
                sub.dropout = 0.0
        config = getattr(m, "config", None)  # Hugging Face: a KV cache is no gradient's concern
        if getattr(config, "use_cache", False):
            config.use_cache = False
        return m

    if any(
        (isinstance(s, dropout) and s.training and s.p > 0)
        or (isinstance(s, torch.nn.MultiheadAttention) and s.training and s.dropout > 0)
        for s in model.modules()
    ):
        notes.append(
            "dropout (modules, and attention dropout) was switched off for the check (its "
            "masks are random and cannot be replayed)"
        )

    def cast_inputs(cast: Any) -> list[Any]:
        return [
            x.to(cast) if torch.is_tensor(x) and x.is_floating_point() and cast else x
            for x in (*inputs, targets)
        ]

    def framework(cast: Any) -> tuple[float, dict[str, np.ndarray]]:
        m = prepared(cast)
        *xs, y = cast_inputs(cast)
        loss = loss_fn(m(*xs), y)
        grads = torch.autograd.grad(
            loss, [p for p in m.parameters() if p.requires_grad], allow_unused=True
        )
        named = [n for n, p in m.named_parameters() if p.requires_grad]
        params = dict(m.named_parameters())
        return float(loss.detach()), {
            n: _zeros_if_none(
                None if g is None else g.detach().double().cpu().numpy(),
                params[n].detach().double().cpu().numpy(),
            )
            for n, g in zip(named, grads, strict=True)
        }

    native_loss, native = framework(None)
    f64_loss, f64 = framework(torch.float64)

    *xs, y = cast_inputs(torch.float64)
    graph, engine_loss, engine, route = _torch_engine(prepared(torch.float64), loss_fn, xs, y)
    if route:
        notes.append(route)
    custom = (
        [_check_torch_custom(call, seed, torch) for call in graph.custom_calls]
        if check_custom_ops
        else []
    )
    return _Run(
        str(dtype).removeprefix("torch."),
        engine_loss,
        native_loss,
        f64_loss,
        engine,
        native,
        f64,
        {n: n.rpartition(".")[0] or n for n in native},
        custom,
        notes,
    )


def _torch_engine(
    model: Any, loss_fn: Any, xs: list[Any], y: Any
) -> tuple[Any, float, dict[str, np.ndarray], str]:
    """Replay model + loss in the engine: through torch.export's core ATen graph, or, where
    the model does not export, through torch.fx. Returns the graph, the engine's loss and
    gradients, and a note saying which importer ran when it was the fallback.

    Raises:
        UnsupportedOpError: naming the model part and the op that blocks both importers; any
            other error raised while replaying is reported as one too, never raw.
    """
    import torch

    from graddiag.reference.importers.torch_export import ExportFailedError, import_torch_export
    from graddiag.reference.importers.torch_fx import import_torch

    class WithLoss(torch.nn.Module):
        def __init__(self, model: Any, fn: Any) -> None:
            super().__init__()
            self.model, self.loss_fn = model, fn

        def forward(self, *args: Any) -> Any:
            *inputs, target = args
            return self.loss_fn(self.model(*inputs), target)

    class Loss(torch.nn.Module):  # for fx, which traces fixed signatures
        def __init__(self, fn: Any) -> None:
            super().__init__()
            self.loss_fn = fn

        def forward(self, output: Any, target: Any) -> Any:
            return self.loss_fn(output, target)

    route, failure = "", None
    try:
        graph = import_torch_export(WithLoss(model, loss_fn), (*xs, y), prefix="model.")
    except ExportFailedError as export_error:
        graph, failure = None, export_error
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            # Hugging Face fused attention kernels may not export; the engine replays the
            # same math written out ("eager"), against the framework's own kernel.
            try:
                model.set_attn_implementation("eager")
                graph = import_torch_export(WithLoss(model, loss_fn), (*xs, y), prefix="model.")
                route = f"attention replayed as 'eager' math ({impl!r} kernel did not export)"
            except Exception:  # noqa: BLE001 - the original export error is the one to report
                graph = None
    if graph is None:
        try:
            graph = import_torch(model)
            loss_graph = import_torch(Loss(loss_fn))
        except UnsupportedOpError as fx_error:
            raise UnsupportedOpError(f"{failure}; and {fx_error}") from fx_error
        loss, grads = _guarded(
            model, lambda: _engine_grads(graph, tuple(xs), lambda out: loss_graph({}, out, y))
        )
        return graph, loss, grads, f"torch.export failed, replayed through torch.fx ({failure})"
    loss, grads = _guarded(model, lambda: _engine_grads(graph, (*xs, y), lambda out: out))
    return graph, loss, grads, route


def _guarded(model: Any, run: Callable[[], Any]) -> Any:
    """Run the engine replay; an error that is not graddiag's own becomes one, with context."""
    try:
        return run()
    except UnsupportedOpError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user must get graddiag's error, with the cause
        raise UnsupportedOpError(
            f"the reference engine could not replay {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _check_torch_custom(call: Any, seed: int, torch: Any) -> CustomOpCheck:
    def f(*arrays: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return call.function(*[torch.from_numpy(np.array(a)) for a in arrays]).numpy()

    def backward(arrays: list[np.ndarray], u: np.ndarray) -> list[Any]:
        xs = [torch.from_numpy(np.array(a)) for a in arrays]
        for x in xs:
            x.requires_grad_(x.is_floating_point())
        out = call.function(*xs)
        diff = [x for x in xs if x.requires_grad]
        gs = iter(torch.autograd.grad(out, diff, torch.from_numpy(u), allow_unused=True))
        return [_none_or_numpy(next(gs)) if x.requires_grad else None for x in xs]

    return _directional_check(f"autograd.Function {call.name}", f, backward, call.inputs, seed)


def _none_or_numpy(g: Any) -> Any:
    return None if g is None else g.detach().numpy()


# ------------------------------------------------------------------------------------ keras

KERAS_LOSSES = (
    "MeanSquaredError",
    "MeanAbsoluteError",
    "SparseCategoricalCrossentropy",
    "CategoricalCrossentropy",
    "BinaryCrossentropy",
)


KERAS_LOSS_NAMES = {
    "mse": "MeanSquaredError",
    "mean_squared_error": "MeanSquaredError",
    "mae": "MeanAbsoluteError",
    "mean_absolute_error": "MeanAbsoluteError",
    "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
    "categorical_crossentropy": "CategoricalCrossentropy",
    "binary_crossentropy": "BinaryCrossentropy",
}


def _keras_loss(loss_fn: Any, dtype: str | None = None) -> Any:
    """A `keras.losses.Loss` object for `loss_fn` (an object or a name), computing in `dtype`.

    Raises:
        UnsupportedOpError: for other losses, naming them.
    """
    import keras

    from graddiag.reference.importers.torch_fx import UnsupportedOpError

    if isinstance(loss_fn, str):
        if loss_fn not in KERAS_LOSS_NAMES:
            raise UnsupportedOpError(
                f"Keras loss {loss_fn!r} is not supported; use one of {sorted(KERAS_LOSS_NAMES)} "
                f"or a loss object among {KERAS_LOSSES}"
            )
        loss_fn = getattr(keras.losses, KERAS_LOSS_NAMES[loss_fn])()
    name = type(loss_fn).__name__
    if name not in KERAS_LOSSES:
        raise UnsupportedOpError(
            f"Keras loss {name!r} is not supported by the reference engine; use one of "
            f"{KERAS_LOSSES} (from_logits=True recommended)"
        )
    if getattr(loss_fn, "label_smoothing", 0):
        raise UnsupportedOpError(f"Keras loss {name} with label_smoothing is not supported")
    if name == "BinaryCrossentropy" and not loss_fn.from_logits:
        raise UnsupportedOpError(
            "Keras BinaryCrossentropy on probabilities clips them to [1e-7, 1 - 1e-7], which the "
            "reference engine does not replay; use BinaryCrossentropy(from_logits=True)"
        )
    if dtype is None:
        return loss_fn
    return type(loss_fn).from_config({**loss_fn.get_config(), "dtype": dtype})


def _keras_engine_loss(loss_fn: Any, targets: np.ndarray) -> Callable[[Tensor], Tensor]:
    from graddiag.reference import functional as F

    name = type(loss_fn).__name__
    from_logits = getattr(loss_fn, "from_logits", False)
    if name == "MeanSquaredError":
        return lambda out: F.mse(out, targets)
    if name == "MeanAbsoluteError":
        return lambda out: F.mean(F.abs(out - targets))
    if name == "BinaryCrossentropy":  # from logits z: softplus(z) - y·z, averaged
        return lambda out: F.mean(F.softplus(out) - out * targets)
    if name in ("SparseCategoricalCrossentropy", "CategoricalCrossentropy"):
        if from_logits:
            return lambda out: F.cross_entropy(out, targets)
        return lambda out: F.cross_entropy(F.log(out), targets)  # log_softmax(log p) = log p
    raise AssertionError(name)  # _keras_loss admits only the losses above


def _keras_float64_clone(model: Any) -> Any:
    import keras

    def clone(layer: Any) -> Any:
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float64"})

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(
        [
            np.asarray(w, dtype=np.float64)
            if np.issubdtype(np.asarray(w).dtype, np.floating)
            else w
            for w in model.get_weights()
        ]
    )
    return twin


def _validate_keras(
    model: Any,
    inputs: tuple[Any, ...],
    loss_fn: Any,
    targets: Any,
    training: bool,
    check_custom_ops: bool,
    seed: int,
) -> _Run:
    import tensorflow as tf

    from graddiag.reference.importers.keras import import_keras

    loss_obj = _keras_loss(loss_fn)
    notes: list[str] = []
    y = np.asarray(targets)

    def framework(m: Any, cast: Any, loss_obj: Any) -> tuple[float, dict[str, np.ndarray]]:
        xs = [
            tf.cast(x, cast) if cast and np.issubdtype(np.asarray(x).dtype, np.floating) else x
            for x in inputs
        ]
        with tf.GradientTape() as tape:
            out = m(xs[0] if len(xs) == 1 else xs, training=training)
            loss = loss_obj(
                tf.cast(y, out.dtype) if np.issubdtype(y.dtype, np.floating) else y, out
            )
        variables = m.trainable_variables
        grads = tape.gradient(loss, variables)
        return float(loss), {
            v.path: _zeros_if_none(
                None if g is None else tf.convert_to_tensor(g).numpy(), v.numpy()
            )  # IndexedSlices
            for v, g in zip(variables, grads, strict=True)
        }

    native_loss, native = framework(model, None, loss_obj)
    try:
        twin = _keras_float64_clone(model)
        f64_loss, f64 = framework(twin, tf.float64, _keras_loss(loss_obj, "float64"))
    except Exception as exc:  # custom layers may not round-trip through get_config
        f64_loss, f64 = None, None
        notes.append(
            f"no float64 Keras twin ({type(exc).__name__}: {exc}); compared with the "
            "model's own dtype only"
        )
    graph = import_keras(model, training=training)
    engine_loss, engine = _guarded(
        model, lambda: _engine_grads(graph, inputs, _keras_engine_loss(loss_obj, y))
    )
    custom = []
    if check_custom_ops:
        custom = [_check_keras_custom(call, seed, tf) for call in graph.custom_calls]
    dtype = next(
        (layer.compute_dtype for layer in model.layers if layer.trainable_weights), "float32"
    )
    return _Run(
        str(dtype),
        engine_loss,
        native_loss,
        f64_loss,
        engine,
        native,
        f64,
        graph.layer_of,
        custom,
        notes,
    )


def _check_keras_custom(call: Any, seed: int, tf: Any) -> CustomOpCheck:
    def f(*arrays: np.ndarray) -> np.ndarray:
        return np.asarray(call.function(*[tf.constant(a, tf.float64) for a in arrays]))

    def backward(arrays: list[np.ndarray], u: np.ndarray) -> list[Any]:
        xs = [tf.constant(a, tf.float64) for a in arrays]
        with tf.GradientTape() as tape:
            for x in xs:
                tape.watch(x)
            out = call.function(*xs)
        return [
            None if g is None else g.numpy()
            for g in tape.gradient(out, xs, output_gradients=tf.constant(u, out.dtype))
        ]

    return _directional_check(f"custom layer {call.name}", f, backward, call.inputs, seed)


# ---------------------------------------------------------------------------------- compare


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b), initial=0.0))


def _compare(framework: str, run: _Run, step: int, rtol: float | None) -> ValidationReport:
    tol = rtol if rtol is not None else TOLERANCES.get(run.dtype, TOLERANCES["float32"])
    report = ValidationReport(
        framework,
        run.dtype,
        run.loss,
        run.framework_loss,
        custom_ops=run.custom_ops,
        notes=run.notes,
    )
    if run.framework_loss_f64 is not None and not math.isclose(
        run.loss, run.framework_loss_f64, rel_tol=TOLERANCES["float64"], abs_tol=1e-12
    ):
        report.findings.append(
            Finding(
                step,
                None,
                "validation",
                "error",
                abs(run.loss - run.framework_loss_f64),
                f"the engine's float64 loss {run.loss:.12g} differs from {framework}'s float64 loss "
                f"{run.framework_loss_f64:.12g}: the forward pass was not replayed faithfully",
                "Report the model to graddiag; gradients below are not comparable.",
            )
        )
    by_layer: dict[str, list[str]] = {}
    for name in run.engine:
        by_layer.setdefault(run.layer_of.get(name, name), []).append(name)
    floor = SCALE_FLOOR * max(
        (float(np.max(np.abs(g), initial=0.0)) for g in run.engine.values()), default=0.0
    )
    errs = {}  # each parameter's (abs, rel) errors, native then float64: computed once
    for name, g in run.engine.items():
        native = (_max_abs(run.native[name], g), relative_error(run.native[name], g, floor))
        f64 = (
            None
            if run.f64 is None
            else (_max_abs(run.f64[name], g), relative_error(run.f64[name], g, floor))
        )
        errs[name] = (native, f64)
        report.parameters.append(
            ParameterAgreement(
                name,
                run.layer_of.get(name, name),
                tuple(np.shape(g)),
                *native,
                None if f64 is None else f64[1],
                tol,
            )
        )
    for layer, names in by_layer.items():
        native_abs = max(errs[n][0][0] for n in names)
        native_rel = max(errs[n][0][1] for n in names)
        f64_abs = f64_rel = None
        if run.f64 is not None:
            f64_abs = max(errs[n][1][0] for n in names)
            f64_rel = max(errs[n][1][1] for n in names)
        agreement = LayerAgreement(
            layer, tuple(names), run.dtype, native_abs, native_rel, f64_abs, f64_rel, tol
        )
        report.layers.append(agreement)
        report.findings.extend(_layer_findings(framework, agreement, step))
    for check in run.custom_ops:
        if not check.ok:
            report.findings.append(
                Finding(
                    step,
                    check.name,
                    "validation",
                    "error",
                    check.rel_err,
                    f"{check.name}: its backward disagrees with central differences of its forward "
                    f"(relative error {check.rel_err:.2e} > {CUSTOM_OP_RTOL:.0e})",
                    "Fix the hand-written gradient; compare it with torch.autograd.gradcheck or "
                    "tf.test.compute_gradient on float64 inputs.",
                )
            )
    return report


def _layer_findings(framework: str, a: LayerAgreement, step: int) -> list[Finding]:
    if a.max_rel_err_f64 is not None and a.max_rel_err_f64 > TOLERANCES["float64"]:
        return [
            Finding(
                step,
                a.layer,
                "validation",
                "error",
                a.max_rel_err_f64,
                f"{framework}'s float64 gradient of {a.layer} differs from the reference engine's: "
                f"max relative error {a.max_rel_err_f64:.2e} (max abs {a.max_abs_err_f64:.2e}) > "
                f"{TOLERANCES['float64']:.0e}",
                "A gradient is wrong, not imprecise: look for a custom autograd.Function or "
                "custom_gradient upstream of this layer, an in-place op, or a detached tensor.",
            )
        ]
    if a.max_rel_err > a.tolerance:
        return [
            Finding(
                step,
                a.layer,
                "validation",
                "warning",
                a.max_rel_err,
                f"{framework}'s {a.dtype} gradient of {a.layer} differs from the float64 reference "
                f"by max relative error {a.max_rel_err:.2e} (max abs {a.max_abs_err:.2e}) > "
                f"{a.tolerance:.0e} for {a.dtype}",
                "A precision problem: try float32 for this layer, loss scaling, or a numerically "
                "stable formulation (log_softmax instead of log(softmax)).",
            )
        ]
    return []
