"""The engine itself: the worked example, graph mechanics, and clear errors on bad input."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import graddiag.reference.engine as engine_module
import graddiag.reference.forward as forward_module
from graddiag.reference import Tensor, apply, check_grads
from graddiag.reference import functional as F
from graddiag.reference.gradcheck import GradientCheckError
from graddiag.reference.ops import RULES, Rule


def test_engine_docstring_worked_example_runs_as_doctest():
    assert "dE/dw = 2·(w·x − y)·x = 2·(−4)·2 = −16" in engine_module.__doc__
    result = doctest.testmod(engine_module)
    assert result.attempted >= 7 and result.failed == 0


def test_forward_docstring_example_runs_as_doctest():
    result = doctest.testmod(forward_module)
    assert result.attempted >= 1 and result.failed == 0


def test_worked_example_by_hand():
    # E = (w·x − y)², x = 2, y = 10, w = 3: dE/dw = 2(w·x − y)·x = 2·(−4)·2 = −16.
    w, x, y = Tensor(3.0, requires_grad=True), Tensor(2.0, requires_grad=True), Tensor(10.0)
    energy = (w * x - y) ** 2
    energy.backward()
    assert float(w.grad) == -16.0
    assert float(x.grad) == -24.0
    assert y.grad is None


def test_shared_subexpression_gradients_add_up():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = x * x
    (h + h).sum().backward()
    np.testing.assert_array_equal(x.grad, 4 * np.array([1.0, 2.0]))


def test_numpy_on_the_left_defers_to_the_tensor():
    x = Tensor(np.ones(3), requires_grad=True)
    out = np.arange(3.0) * x
    assert isinstance(out, Tensor)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, np.arange(3.0))


def test_deep_chain_does_not_hit_the_recursion_limit():
    x = Tensor(1.0, requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0
    y.backward()
    assert float(x.grad) == 1.0


def test_backward_rejects_wrong_grad_shape():
    out = Tensor(np.ones(3), requires_grad=True) * 2.0
    with pytest.raises(ValueError, match=r"`grad` of shape \(3,\), got shape \(2,\)"):
        out.backward(np.ones(2))


def test_apply_rejects_unknown_op():
    with pytest.raises(KeyError, match="'frobnicate'"):
        apply("frobnicate", Tensor(1.0))


def test_tensor_rejects_non_array_value():
    with pytest.raises(TypeError, match="`value`.*'abc'"):
        Tensor("abc")


def test_axis_out_of_range_names_the_axis():
    with pytest.raises(ValueError, match=r"`axis` in \[-2, 2\), got 5"):
        Tensor(np.ones((2, 2))).sum(axis=5)


def test_constant_argument_that_requires_grad_is_rejected():
    mask = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="Argument 1 of `dropout` is a constant"):
        apply("dropout", Tensor(np.ones(3), requires_grad=True), mask, p=0.5)


def test_fancy_indexing_points_to_take():
    with pytest.raises(TypeError, match="use `take`"):
        Tensor(np.ones((3, 2)))[np.array([0, 2])]


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: F.conv2d(np.ones((1, 2, 4, 4)), np.ones((3, 1, 3, 3))), r"`weight` of shape"),
        (lambda: F.conv2d(np.ones((2, 4, 4)), np.ones((3, 2, 3, 3))), r"`x` of shape \(N, C"),
        (lambda: F.conv2d(np.ones((1, 2, 4, 4)), np.ones((3, 2, 3, 3)), stride=0), "`stride`"),
        (lambda: F.max_pool2d(np.ones((1, 1, 4, 4)), 0), "`kernel_size`"),
        (lambda: F.mse(np.ones(3), np.ones(4)), r"`target` of shape \(3,\), got shape \(4,\)"),
        (lambda: F.cross_entropy(np.ones((2, 3)), np.array([0, 3])), r"labels in \[0, 3\)"),
        (lambda: F.cross_entropy(np.ones((2, 3)), np.ones(5)), r"`target` of shape \(2,\)"),
        (lambda: F.take(np.ones((3, 2)), np.array([4])), r"`indices` in \[0, 3\), got .* 4"),
        (lambda: F.dropout(np.ones(3), np.ones(3), p=1.0), r"`p` in \[0, 1\), got 1.0"),
        (lambda: F.gelu(np.ones(3), approximate="fast"), "`approximate`.*'fast'"),
        (lambda: F.layer_norm(np.ones((2, 3)), (4,)), "`normalized_shape`"),
        (lambda: F.softmax(np.ones((2, 3)), axis=(0, 1)), "`axis` to be one int"),
        (lambda: F.matmul(np.ones(()), np.ones(2)), "`a` to have at least 1 dimension"),
    ],
)
def test_bad_input_names_the_argument_and_value(call, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        call()


def test_check_grads_catches_a_wrong_rule(monkeypatch):
    right = RULES["tanh"]
    wrong = Rule(right.fwd, [lambda xp, g, ans, x: g * (1.0 - ans)], right.jvps)  # forgot ans²
    monkeypatch.setitem(RULES, "tanh", wrong)
    with pytest.raises(GradientCheckError, match="argument 0"):
        check_grads(F.tanh, [np.array([0.5, -1.0])])


def test_check_grads_rejects_nonpositive_eps():
    with pytest.raises(ValueError, match="`eps` > 0, got 0"):
        check_grads(F.exp, [np.ones(2)], eps=0)


def test_external_op_refuses_inputs_too_large_for_central_differences():
    from graddiag.reference.gradcheck import MAX_EXTERNAL_ELEMENTS, external

    big = np.zeros(MAX_EXTERNAL_ELEMENTS + 1)
    with pytest.raises(ValueError, match="opaque op 'huge'.*got 50001"):
        external(np.sin, Tensor(big, requires_grad=True), name="huge")
