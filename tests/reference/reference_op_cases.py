"""The table of op cases that the rule tests and the forward-mode tests walk."""

from __future__ import annotations

import numpy as np

from graddiag.reference import functional as F

RNG = np.random.default_rng(1234)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def away_from_zero(*shape: int) -> np.ndarray:
    """Values with |x| in [0.5, 1.5]: keeps kinks (relu, abs, max) away from the FD stencil."""
    return RNG.uniform(0.5, 1.5, shape) * RNG.choice([-1.0, 1.0], shape)


def distinct(*shape: int) -> np.ndarray:
    """A random permutation of well-separated values, so max/pool have no near-ties."""
    return RNG.permutation(np.arange(int(np.prod(shape)), dtype=np.float64)).reshape(shape) * 0.1


LABELS = np.array([[0, 2, 1], [3, 3, 0]])
MASK = (RNG.uniform(size=(3, 4)) > 0.3).astype(np.float64)
COND = RNG.uniform(size=(3, 4)) > 0.5
WEIGHTS_4x3 = randn(4, 3)

# (id, function of engine tensors, argument arrays): one case per rule, several for rules
# with options. Every case is checked against central differences and for JVP/VJP agreement.
OP_CASES = [
    ("add", lambda x, y: x + y, [randn(3, 4), randn(3, 4)]),
    ("add_broadcast", lambda x, y: x + y, [randn(3, 4), randn(1, 4)]),
    ("sub_broadcast", lambda x, y: x - y, [randn(2, 3, 4), randn(4)]),
    ("mul_broadcast", lambda x, y: x * y, [randn(3, 1), randn(1, 4)]),
    ("div", lambda x, y: x / y, [randn(3, 4), away_from_zero(3, 4)]),
    ("neg", lambda x: -x, [randn(3, 4)]),
    ("pow_const", lambda x: x**3, [randn(3, 4)]),
    ("pow_both", lambda x, y: x**y, [RNG.uniform(0.5, 2.0, (3, 4)), randn(3, 4)]),
    ("exp", F.exp, [randn(3, 4)]),
    ("log", F.log, [RNG.uniform(0.5, 2.0, (3, 4))]),
    ("sqrt", F.sqrt, [RNG.uniform(0.5, 2.0, (3, 4))]),
    ("abs", F.abs, [away_from_zero(3, 4)]),
    ("tanh", F.tanh, [randn(3, 4)]),
    ("sigmoid", F.sigmoid, [randn(3, 4) * 3]),
    ("relu", F.relu, [away_from_zero(3, 4)]),
    ("gelu", F.gelu, [randn(3, 4)]),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), [randn(3, 4)]),
    ("softplus", F.softplus, [randn(3, 4) * 3]),
    ("maximum", F.maximum, [randn(3, 4), randn(3, 4) + 3 * np.sign(randn(3, 4))]),
    ("minimum", F.minimum, [randn(3, 4), randn(3, 4) + 3 * np.sign(randn(3, 4))]),
    ("where", lambda x, y: F.where(COND, x, y), [randn(3, 4), randn(1, 4)]),
    ("matmul", F.matmul, [randn(3, 4), randn(4, 5)]),
    ("matmul_batched", F.matmul, [randn(2, 3, 4), randn(4, 5)]),
    ("matmul_vector", F.matmul, [randn(4), randn(4, 2)]),
    ("sum_all", lambda x: F.sum(x), [randn(3, 4)]),
    ("sum_axis", lambda x: F.sum(x, axis=(0, 2)), [randn(2, 3, 4)]),
    ("mean_keepdims", lambda x: F.mean(x, axis=-1, keepdims=True), [randn(3, 4)]),
    ("max_axis", lambda x: F.max(x, axis=1), [distinct(3, 4)]),
    ("max_all", lambda x: F.max(x), [distinct(3, 4)]),
    ("reshape", lambda x: WEIGHTS_4x3 * F.reshape(x, (4, 3)), [randn(3, 4)]),
    ("transpose", lambda x: F.transpose(x, (2, 0, 1)), [randn(2, 3, 4)]),
    ("broadcast_to", lambda x: F.broadcast_to(x, (2, 3, 4)), [randn(3, 1)]),
    ("getitem", lambda x: x[1:, ::2], [randn(3, 4)]),
    ("take", lambda x: F.take(x, LABELS), [randn(5, 3)]),
    (
        "index_repeated",
        lambda x: F.index(x, (np.array([0, 2, 2, 1]), slice(None), np.array([1, 0, 1, 1]))),
        [randn(3, 2, 2)],
    ),
    (
        "index_add_repeated",
        lambda v: F.index_add(v, (np.array([0, 2, 2, 1]), np.array([1, 0, 0, 1])), (3, 2)),
        [randn(4)],
    ),
    ("erf", F.erf, [randn(3, 4)]),
    ("concat", lambda x, y: F.concat([x, y], axis=1), [randn(2, 3), randn(2, 2)]),
    ("stack", lambda x, y: F.stack([x, y], axis=-1), [randn(2, 3), randn(2, 3)]),
    ("softmax", lambda x: F.softmax(x, axis=0), [randn(3, 4)]),
    ("log_softmax", F.log_softmax, [randn(3, 4)]),
    ("logsumexp", lambda x: F.logsumexp(x, axis=(0, 1)), [randn(2, 3, 4)]),
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b), [randn(2, 3, 5, 5), randn(4, 3, 3, 3), randn(4)]),
    (
        "conv2d_stride_pad",
        lambda x, w: F.conv2d(x, w, stride=2, padding=1),
        [randn(2, 2, 6, 5), randn(3, 2, 3, 2)],
    ),
    ("max_pool2d", lambda x: F.max_pool2d(x, 2), [distinct(2, 2, 4, 6)]),
    ("max_pool2d_pad", lambda x: F.max_pool2d(x, 3, stride=2, padding=1), [distinct(1, 2, 5, 5)]),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, (2, 3), stride=1, padding=1), [randn(2, 2, 4, 5)]),
    (
        "layer_norm",
        lambda x, w, b: F.layer_norm(x, (4,), w, b),
        [randn(2, 3, 4), randn(4), randn(4)],
    ),
    ("batch_norm", lambda x, w, b: F.batch_norm(x, w, b), [randn(4, 3, 2, 2), randn(3), randn(3)]),
    ("dropout", lambda x: F.dropout(x, MASK, p=0.3), [randn(3, 4)]),
    ("mse", F.mse, [randn(3, 4), randn(3, 4)]),
    ("cross_entropy_labels", lambda z: F.cross_entropy(z, LABELS), [randn(2, 3, 4)]),
    ("cross_entropy_probs", F.cross_entropy, [randn(3, 4), RNG.dirichlet(np.ones(4), 3)]),
    ("linear", F.linear, [randn(5, 3), randn(2, 3), randn(2)]),
]


def _external_case(x, y):
    from graddiag.reference.gradcheck import external

    return external(lambda a, b: np.sin(a) * b, x, y, name="sin_times")


OP_CASES.append(("external_fd", _external_case, [randn(3, 4), randn(3, 4)]))
