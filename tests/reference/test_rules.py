"""Every VJP rule against central differences in float64, and every primitive covered."""

from __future__ import annotations

import numpy as np
import pytest

from graddiag.reference import RULES, check_grads
from graddiag.reference import functional as F
from graddiag.reference.engine import Tensor
from reference.reference_op_cases import OP_CASES

RULE_RTOL = 1e-6  # central differences in float64 with h = 1e-6 are good to ~1e-9


@pytest.mark.parametrize(("fn", "args"), [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_vjp_rule_matches_central_differences(fn, args):
    assert check_grads(fn, args, rtol=RULE_RTOL) <= RULE_RTOL


def test_every_primitive_has_a_numerical_check():
    used: set[str] = set()
    for _, fn, args in OP_CASES:
        out = fn(*[Tensor(a, requires_grad=True) for a in args])
        stack = [out]
        while stack:
            node = stack.pop()
            if node._op:
                used.add(node._op)
            stack.extend(p for _, p in node._parents)
    assert set(RULES) - used == set()


def test_the_issue_lists_every_required_op():
    required = {
        "add",
        "sub",
        "mul",
        "div",
        "neg",
        "pow",
        "exp",
        "log",
        "sqrt",
        "abs",
        "tanh",
        "sigmoid",
        "relu",
        "gelu",
        "softplus",
        "maximum",
        "minimum",
        "where",
        "matmul",
        "sum",
        "mean",
        "max",
        "reshape",
        "transpose",
        "broadcast_to",
        "take",
        "concat",
        "stack",
        "softmax",
        "log_softmax",
        "logsumexp",
        "conv2d",
        "max_pool2d",
        "avg_pool2d",
        "normalize",
        "dropout",
        "mse",
        "cross_entropy",
    }
    assert required <= set(RULES)


@pytest.mark.parametrize(
    "call",
    [
        lambda: F.index(np.ones((3, 2)), [0, 1]),
        lambda: F.index_add(np.ones(2), np.array([0, 1]), (3,)),
    ],
)
def test_index_and_index_add_name_a_key_that_is_not_a_tuple(call):
    with pytest.raises(TypeError, match=r"Expected `key` to be a tuple, got (list|ndarray)"):
        call()
