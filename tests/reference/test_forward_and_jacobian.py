"""Forward mode against reverse mode (<u, J v> computed both ways), and Jacobians."""

from __future__ import annotations

import numpy as np
import pytest
from reference_op_cases import OP_CASES

from graddiag.reference import functional as F
from graddiag.reference import jacobian, jvp, vjp
from graddiag.reference.gradcheck import numerical_gradient

DUALITY_RTOL = 1e-12  # both sides are exact up to float64 rounding
FD_DUALITY_RTOL = 1e-7  # external ops differentiate by central differences on both sides


@pytest.mark.parametrize(("name", "fn", "args"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_jvp_and_vjp_agree_on_u_dot_jv(name, fn, args):
    rng = np.random.default_rng(7)
    tangents = [rng.standard_normal(np.shape(a)) for a in args]
    value, jv = jvp(fn, args, tangents)
    u = rng.standard_normal(np.shape(value))
    _, grads = vjp(fn, args, u)
    forward = float(np.sum(u * jv))
    reverse = sum(float(np.sum(g * t)) for g, t in zip(grads, tangents, strict=True))
    rtol = FD_DUALITY_RTOL if name.startswith("external") else DUALITY_RTOL
    assert forward == pytest.approx(reverse, rel=rtol, abs=1e-12)


def test_jvp_of_square_is_two_x():
    value, slope = jvp(lambda x: x * x, [np.array(3.0)], [np.array(1.0)])
    assert (float(value), float(slope)) == (9.0, 6.0)


@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
def test_jacobian_modes_match_finite_differences(mode):
    x = np.random.default_rng(3).standard_normal(4)
    weight = np.random.default_rng(4).standard_normal((3, 4))

    def fn(t):
        return F.tanh(F.matmul(weight, t))

    jac = jacobian(fn, x, mode=mode)
    rows = [numerical_gradient(lambda z, i=i: float(np.tanh(weight @ z)[i]), x) for i in range(3)]
    np.testing.assert_allclose(jac, np.stack(rows), rtol=1e-7, atol=1e-9)


def test_jacobian_shape_is_output_then_input():
    assert jacobian(lambda t: F.softmax(t, axis=-1), np.zeros((2, 3))).shape == (2, 3, 2, 3)


def test_jacobian_rejects_unknown_mode():
    with pytest.raises(ValueError, match="`mode`.*'sideways'"):
        jacobian(F.exp, np.zeros(2), mode="sideways")


def test_jvp_rejects_mismatched_tangent_shape():
    with pytest.raises(ValueError, match=r"`tangents\[0\]` of shape \(2,\), got shape \(3,\)"):
        jvp(F.exp, [np.zeros(2)], [np.zeros(3)])
