"""graddiag.tf: norms are right for every finite float32 gradient. float32 sums of squares
overflow for elements above ~1e19 and underflow below ~1e-19; the TF adapter measures such
gradients again in float64 inside the compiled step and decides non-finite from the elements
(the TensorFlow side of tests/test_exact_measurement.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from graddiag.monitor import NonFiniteGradientError  # noqa: E402
from graddiag.tf import GradientMonitor  # noqa: E402

try:  # a checkout first (an editable install maps graddiag.integrations to its own tree)
    from integrations.keras import GradDiagCallback
except ImportError:  # installed: graddiag.integrations
    from graddiag.integrations.keras import GradDiagCallback

#: float64 reference vs graddiag's float64 measurement of the same float32 values
REL = 1e-6
BATCH = 8


class GradScale(keras.layers.Layer):
    """Identity forward; multiplies the gradient flowing back through it by `factor`."""

    def __init__(self, factor: float, **kw) -> None:
        super().__init__(**kw)
        self.factor = factor

    def call(self, x):
        @tf.custom_gradient
        def scale(v):
            return tf.identity(v), lambda g: g * self.factor

        return scale(x)


#: Dense widths whose kernels take each measuring path: 16x16 elements are summed in float64
#: directly, 16x512 in float32 with a re-measure when suspicious (`EXACT_MAX_NUMEL`).
WIDTHS = [16, 512]


def scaled_model(factor: float, seed: int = 0, width: int = 16):
    """Eight parallel Dense layers whose gradients are scaled by `factor`, then a head."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((16,))
    branches = [GradScale(factor)(keras.layers.Dense(width, name=f"first{i}")(x)) for i in range(8)]
    h = keras.layers.Activation("tanh")(keras.layers.Add()(branches))
    return keras.Model(x, keras.layers.Dense(1, name="head")(h), name="scaled")


def data(seed: int = 1, n: int = BATCH):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 16)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def exact_norm(grads) -> float:
    """float64 norm of float32 gradients (NumPy, independent of graddiag)."""
    return math.sqrt(sum(float(np.sum(np.square(g.numpy().astype(np.float64)))) for g in grads))


def run(factor: float, steps: int = 4, compiled: bool = True, width: int = 16, **kw):
    """A custom loop (SGD, learning rate 0 so every step sees the same kind of gradients):
    returns the monitor and, per step, the float64 reference norm of layer `first0`."""
    model = scaled_model(factor, width=width)
    mon = GradientMonitor(model, every=kw.pop("every", 1), **kw)
    opt = keras.optimizers.SGD(0.0)
    variables = model.trainable_variables
    first0 = [i for i, v in enumerate(variables) if "first0" in v.path]

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, variables)
        out = mon.step(grads, variables)
        opt.apply_gradients(zip(out, variables, strict=True))
        return grads

    step = tf.function(step) if compiled else step
    norms = []
    for i in range(steps):
        x, y = data(seed=i)
        grads = step(x, y)
        norms.append(exact_norm([grads[j] for j in first0]))
    mon.close()
    return mon, norms


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("factor", [1e-25, 1e-30])
def test_underflowing_gradients_are_measured_not_zero(factor, compiled, width):
    mon, norms = run(factor, compiled=compiled, width=width)
    assert min(norms) > 0
    got = [s.grad_norm[mon.info.layers.index("first0")] for s in mon.history]
    assert got == pytest.approx(norms, rel=REL, abs=0)
    bad = [f for f in mon.findings if f.kind in ("dead", "frozen", "zero_gradient")]
    assert bad == []


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("compiled", [True, False])
def test_overflowing_finite_gradients_are_not_nonfinite(compiled, width):
    mon, norms = run(1e25, compiled=compiled, width=width)
    got = [s.grad_norm[mon.info.layers.index("first0")] for s in mon.history]
    assert all(math.isfinite(n) for n in norms)
    assert got == pytest.approx(norms, rel=REL, abs=0)
    assert not any(s.nonfinite.any() for s in mon.history)
    assert not [f for f in mon.findings if f.kind == "nonfinite"]


@pytest.mark.parametrize("width", WIDTHS)
def test_mixed_huge_and_tiny_gradients_in_one_step(width):
    """One layer's gradients above the float32 square range, another's below it, a third
    ordinary, in the same step: each is right."""
    keras.utils.set_random_seed(0)
    x = keras.Input((16,))
    big = GradScale(1e24)(keras.layers.Dense(width, name="big")(x))
    small = GradScale(1e-24)(keras.layers.Dense(width, name="small")(x))
    plain = keras.layers.Dense(width, name="plain")(x)
    h = keras.layers.Activation("tanh")(keras.layers.Add()([big, small, plain]))
    model = keras.Model(x, keras.layers.Dense(1, name="head")(h))
    mon = GradientMonitor(model, every=1)
    variables = model.trainable_variables
    xb, yb = data()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(xb) - yb))
    grads = tape.gradient(loss, variables)
    tf.function(lambda g: mon.step(g, variables))(grads)
    mon.close()
    s = mon.history[0]
    for layer in ("big", "small", "plain", "head"):
        ref = exact_norm([g for g, v in zip(grads, variables, strict=True) if layer in v.path])
        assert s.grad_norm[mon.info.layers.index(layer)] == pytest.approx(ref, rel=REL, abs=0)
    assert not s.nonfinite.any()


@pytest.mark.parametrize("width", WIDTHS)
def test_skip_policy_does_not_skip_a_finite_overflowing_step(width):
    mon, _ = run(1e25, nonfinite="skip", every=10, width=width)
    assert not any(s.skipped for s in mon.history)
    assert not [f for f in mon.findings if f.kind == "nonfinite"]


def test_raise_policy_does_not_raise_for_a_finite_overflowing_step():
    mon, norms = run(1e25, nonfinite="raise", every=10)
    assert len(mon.history) == 4 and all(math.isfinite(n) for n in norms)


@pytest.mark.parametrize("width", WIDTHS)
def test_a_real_nan_is_still_nonfinite_and_skipped(width):
    """An element that is NaN (not an overflow) keeps the step non-finite."""
    mon, _ = run(math.nan, steps=2, nonfinite="skip", every=10, width=width)
    assert all(s.skipped for s in mon.history)
    assert [f for f in mon.findings if f.kind == "nonfinite"]
    with pytest.raises((NonFiniteGradientError, tf.errors.OpError)):
        run(math.inf, steps=1, nonfinite="raise")


@pytest.mark.parametrize("width", WIDTHS)
def test_a_truly_zero_layer_stays_exactly_zero(width):
    mon, norms = run(0.0, steps=3, width=width)
    assert norms == [0.0] * 3
    assert [s.grad_norm[mon.info.layers.index("first0")] for s in mon.history] == [0.0] * 3


def test_keras_fit_reports_an_overflowing_step_as_finite_and_correct():
    """The Keras callback path: a finite gradient with elements above ~1e19 is measured exactly
    and, under nonfinite="skip", the optimizer step is taken."""
    model = scaled_model(1e25, width=512)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = data()
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, variables)
    ref = exact_norm([g for g, v in zip(grads, variables, strict=True) if "first0" in v.path])
    cb = GradDiagCallback(every=1, nonfinite="skip", print_summary=False)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    mon = cb.monitor
    got = [s.grad_norm[mon.info.layers.index("first0")] for s in mon.history]
    assert got == pytest.approx([ref, ref], rel=REL, abs=0)
    assert not any(s.skipped for s in mon.history)
    assert int(model.optimizer.iterations.numpy()) == 2  # no step was skipped
    assert not [f for f in cb.findings if f.kind == "nonfinite"]


@pytest.mark.parametrize("factor", [1.0, 1e-25])
def test_large_gradients_re_measure_in_a_call_not_in_every_step(factor):
    """The re-measure of large gradients (float32 sums that may be wrong) is a function call
    taken on suspicious steps only: the compiled step holds it as one unlowered `If`, whose
    branch holds the scaled sums (none of their ops in the step itself), and it still runs:
    1e-25 gradients (float32 sums of squares underflow to 0) come out right."""
    model = scaled_model(factor, width=512)
    x, y = data()
    mon = GradientMonitor(model, every=1, detectors={"spike": False, "vanishing": False})

    @tf.function
    def train_step(x, y):
        with mon.tape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    train_step(x, y)
    graph = train_step.get_concrete_function(x, y).graph
    step_ops = {op.type for op in graph.get_operations()}
    assert "Switch" not in step_ops and "Merge" not in step_ops  # nothing lowered
    ifs = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert ifs and not any(op.get_attr("_lower_using_switch_merge") for op in ifs)
    mon.close()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    ref = [
        float(tf.reduce_sum(tf.cast(g, tf.float64) ** 2))
        for g in tape.gradient(loss, model.trainable_variables)
    ]
    got = mon.history[0].global_norm
    assert got == pytest.approx(math.sqrt(sum(ref)), rel=REL) and got > 0
