"""Cross-framework parity: the same network, weights and batches in PyTorch and TensorFlow give the
same per-layer gradient norms and the same findings."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

from graddiag import tf as gd_tf  # noqa: E402
from graddiag import torch as gd_torch  # noqa: E402
from graddiag.clip import (  # noqa: E402
    AGC,
    AutoClip,
    Chain,
    GlobalNormClip,
    LayerNormClip,
    ValueClip,
    ZClip,
    chain,
)

#: float32 forward/backward in two frameworks: a few ulps per op, a few layers deep.
REL = 1e-5
SIZES = (4, 8, 8, 8, 1)
TORCH_TO_TF = {"0": "fc0", "2": "fc1", "4": "fc2", "6": "head"}
STEPS = 12
EXPLODE_AT = 6  # targets scaled by 1e5: gradients explode linearly (no tanh saturation)
NAN_AT = 9
DETAIL = 5  # detail statistics every 5 steps (off the log steps, to cover that path too)


def networks():
    rng = np.random.default_rng(0)
    weights = [
        (rng.normal(size=(o, i)) / math.sqrt(i), rng.normal(size=o) * 0.1)
        for i, o in zip(SIZES[:-1], SIZES[1:], strict=True)
    ]
    mods = []
    for i, (w, b) in enumerate(weights):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(w, dtype=torch.float32))
            lin.bias.copy_(torch.tensor(b, dtype=torch.float32))
        mods += [lin] if i == len(weights) - 1 else [lin, torch.nn.Tanh()]
    tnet = torch.nn.Sequential(*mods)
    tnet[4].requires_grad_(False)  # fc2 frozen on both sides

    names = ["fc0", "fc1", "fc2", "head"]
    knet = keras.Sequential(
        [keras.Input((SIZES[0],))]
        + [
            keras.layers.Dense(o, activation=None if n == "head" else "tanh", name=n)
            for o, n in zip(SIZES[1:], names, strict=True)
        ],
        name="net",
    )
    for layer, (w, b) in zip(knet.layers, weights, strict=True):
        layer.set_weights([w.T.astype("float32"), b.astype("float32")])
    knet.get_layer("fc2").trainable = False
    return tnet, knet


def batches():
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        x = rng.normal(size=(32, SIZES[0])).astype("float32")
        y = rng.normal(size=(32, 1)).astype("float32")
        if step == EXPLODE_AT:
            y *= 1e5
        if step == NAN_AT:
            x[0, 0] = np.nan
        yield x, y


def run_torch(tnet):
    mon = gd_torch.GradientMonitor(tnet, every=4, clip=GlobalNormClip(1.0), detail_every=DETAIL)
    hand = []
    for x, y in batches():
        tnet.zero_grad()
        ((tnet(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
        hand.append(
            [
                math.sqrt(
                    sum(float(torch.linalg.vector_norm(p.grad)) ** 2 for p in tnet[i].parameters())
                )
                for i in (0, 2, 6)
            ]
        )
        mon.step()
    mon.close()
    return mon, np.array(hand)


def run_tf(knet):
    mon = gd_tf.GradientMonitor(knet, every=4, clip=GlobalNormClip(1.0), detail_every=DETAIL)

    @tf.function
    def step(x, y):
        with mon.tape() as tape:
            loss = tf.reduce_mean((knet(x) - y) ** 2)
        return tape.gradient(loss, knet.trainable_variables)

    for x, y in batches():
        step(tf.constant(x), tf.constant(y))
    mon.close()
    return mon


@pytest.fixture(scope="module")
def both():
    tnet, knet = networks()
    tmon, hand = run_torch(tnet)
    return tmon, hand, run_tf(knet)


def test_same_layers_and_frozen_parameters(both):
    tmon, _, kmon = both
    assert [TORCH_TO_TF[n] for n in tmon.core.info.layers] == list(kmon.info.layers)
    assert kmon.info.frozen == ("fc2.kernel", "fc2.bias")


def test_same_per_layer_norms_every_step(both):
    tmon, hand, kmon = both
    assert [s.step for s in tmon.history] == [s.step for s in kmon.history] == list(range(STEPS))
    for t, k, h in zip(tmon.history, kmon.history, hand, strict=True):
        np.testing.assert_allclose(k.grad_norm, t.grad_norm, rtol=REL, equal_nan=True)
        np.testing.assert_allclose(k.grad_norm, h, rtol=REL, equal_nan=True)
        if t.step != NAN_AT:
            assert k.clip_coef == pytest.approx(t.clip_coef, rel=REL)


def test_same_detail_statistics(both):
    tmon, _, kmon = both
    detail = [
        (t, k) for t, k in zip(tmon.history, kmon.history, strict=True) if t.grad_max is not None
    ]
    assert [t.step for t, _ in detail] == [k.step for k in kmon.history if k.grad_max is not None]
    assert detail
    assert NAN_AT in [k.step for _, k in detail]
    for t, k in detail:
        for stat in ("zero_frac", "param_norm", "nonfinite"):
            np.testing.assert_allclose(getattr(k, stat), getattr(t, stat), rtol=REL, err_msg=stat)
        # both adapters measure max|g| before clipping, like grad_norm
        np.testing.assert_allclose(k.grad_max, t.grad_max, rtol=REL, err_msg="grad_max")


def test_same_findings(both):
    tmon, _, kmon = both

    def key(f, rename=lambda n: n):
        return (f.step, f.kind, f.severity, None if f.layer is None else rename(f.layer))

    torch_findings = sorted(key(f, lambda n: TORCH_TO_TF.get(n, n)) for f in tmon.findings)
    tf_findings = sorted(key(f) for f in kmon.findings)
    assert tf_findings == torch_findings
    kinds = {f[1] for f in tf_findings}
    assert {"nonfinite", "spike", "frozen", "clipped"} <= kinds  # one 1e5x step: a spike
    assert (NAN_AT, "nonfinite", "error", "head") in tf_findings


def test_same_update_ratio_and_unoptimized_layer_with_sgd():
    """fc1 is left out of the optimizer on both sides: the same `frozen` warning, and the same
    update/weight ratio per layer on every detail step."""
    tnet, knet = networks()
    kept = [p for i in (0, 6) for p in tnet[i].parameters()]
    topt = torch.optim.SGD(kept, lr=0.1)
    tmon = gd_torch.GradientMonitor(tnet, topt, every=2, detail_every=2)
    kopt = keras.optimizers.SGD(0.1)
    kmon = gd_tf.GradientMonitor(knet, every=2, detail_every=2)
    kvars = [v for v in knet.trainable_variables if not v.path.startswith("net/fc1/")]

    @tf.function
    def kstep(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((knet(x) - y) ** 2)
        grads = kmon.step(tape.gradient(loss, knet.trainable_variables), knet.trainable_variables)
        kmon.apply(kopt, grads[:2] + grads[4:], kvars)

    for _, (x, y) in zip(range(4), batches(), strict=False):
        topt.zero_grad()
        ((tnet(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
        topt.step()
        kstep(tf.constant(x), tf.constant(y))
    tmon.close()
    kmon.close()
    t_ratio = [(s.step, s.update_ratio) for s in tmon.history if s.update_ratio is not None]
    k_ratio = [(s.step, s.update_ratio) for s in kmon.history if s.update_ratio is not None]
    assert [s for s, _ in k_ratio] == [s for s, _ in t_ratio] == [1, 3]
    for (_, t), (_, k) in zip(t_ratio, k_ratio, strict=True):
        np.testing.assert_allclose(k, t, rtol=REL)
    assert k_ratio[0][1][1] == 0.0  # fc1 never moves

    def frozen(mon, rename=lambda n: n):
        return sorted(
            (f.step, f.severity, rename(f.layer)) for f in mon.findings if f.kind == "frozen"
        )

    assert frozen(kmon) == frozen(tmon, lambda n: TORCH_TO_TF.get(n, n))
    assert (0, "warning", "fc1") in frozen(kmon)


# ------------------------------------------------------------------------ clipping parity
#: float32 in both frameworks against each other and against a float64 reference by hand.
CLIP_REL = 1e-4
CLIP_STEPS = 8
CLIP_SPIKE = 5  # targets scaled by 30: the adaptive policies (after warmup) clip this step
CLIP_POLICIES = {
    "global": GlobalNormClip(0.05),
    "value": ValueClip(1e-2),
    "layer": LayerNormClip(0.05),
    "autoclip": AutoClip(percentile=30, history=4),
    "zclip": ZClip(warmup=3, z_threshold=1.0),
    "agc": AGC(clipping=0.01),
    "value+global": chain(ValueClip(1e-2), GlobalNormClip(0.05)),
    "agc+zclip+global": chain(
        AGC(clipping=0.01), ZClip(warmup=3, z_threshold=1.0), GlobalNormClip(0.02)
    ),
    "layer+(agc+autoclip)+value": chain(
        LayerNormClip(0.5),
        chain(AGC(clipping=0.05), AutoClip(percentile=50, history=4)),
        ValueClip(0.05),
    ),
}


def clip_batches():
    rng = np.random.default_rng(2)
    for step in range(CLIP_STEPS):
        x = rng.normal(size=(32, SIZES[0])).astype("float32")
        y = rng.normal(size=(32, 1)).astype("float32") * (30.0 if step == CLIP_SPIKE else 1.0)
        yield x, y


def run_clip_torch(tnet, policy):
    """Per step: the gradients before clipping, after, and the monitor's stats (torch layout)."""
    mon = gd_torch.GradientMonitor(tnet, every=1, clip=policy, detail_every=0, hist_every=0)
    params = [p for p in tnet.parameters() if p.requires_grad]
    before, after = [], []
    for x, y in clip_batches():
        tnet.zero_grad()
        ((tnet(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
        before.append([p.grad.double().numpy().copy() for p in params])
        mon.step()
        after.append([p.grad.double().numpy().copy() for p in params])
    mon.close()
    return before, after, mon.history, [p.detach().double().numpy() for p in params]


def run_clip_tf(knet, policy):
    mon = gd_tf.GradientMonitor(knet, every=1, clip=policy, detail_every=0)

    @tf.function
    def step(x, y):
        with mon.tape() as tape:
            loss = tf.reduce_mean((knet(x) - y) ** 2)
        return tape.gradient(loss, knet.trainable_variables)

    after = []
    for x, y in clip_batches():
        grads = step(tf.constant(x), tf.constant(y))
        # Keras kernels are (in, out): transpose to torch's (out, in)
        after.append([np.asarray(g, np.float64).T for g in grads])
    mon.close()
    return after, mon.history


def hand_clip(policy, grads, params, layer_of, state):
    """An independent float64 reference of each policy (torch layout: AGC units are rows)."""
    if isinstance(policy, Chain):
        state = state if state is not None else [None] * len(policy.policies)
        out = []
        for p, st in zip(policy.policies, state, strict=True):
            grads, st = hand_clip(p, grads, params, layer_of, st)
            out.append(st)
        return grads, out
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    if isinstance(policy, GlobalNormClip):
        c = min(1.0, policy.max_norm / (norm + 1e-6))
        return [g * c for g in grads], state
    if isinstance(policy, ValueClip):
        return [np.clip(g, -policy.clip_value, policy.clip_value) for g in grads], state
    if isinstance(policy, LayerNormClip):
        out = []
        for layer in sorted(set(layer_of)):
            members = [g for g, k in zip(grads, layer_of, strict=True) if k == layer]
            n = math.sqrt(sum(float(np.sum(g * g)) for g in members))
            out += [g * min(1.0, policy.max_norm / (n + 1e-6)) for g in members]
        return out, state
    if isinstance(policy, AutoClip):
        seen = (state or []) + [norm]
        threshold = np.percentile(seen[-policy.history :], policy.percentile)
        return [g * min(1.0, threshold / (norm + 1e-6)) for g in grads], seen
    if isinstance(policy, ZClip):
        seen, mean, var = state or ([], 0.0, 0.0)
        if len(seen) < policy.warmup:
            seen = seen + [norm]
            if len(seen) == policy.warmup:
                mean, var = float(np.mean(seen)), float(np.var(seen))
            return grads, (seen, mean, var)
        std = max(math.sqrt(max(var, 0.0)), policy.eps)
        used = norm
        if (norm - mean) / std > policy.z_threshold:
            used = mean + policy.z_threshold * std
            grads = [g * min(1.0, used / (norm + 1e-6)) for g in grads]
        d = used - mean
        a = policy.alpha
        return grads, (seen, mean + (1 - a) * d, a * (var + (1 - a) * d * d))
    if isinstance(policy, AGC):
        out = []
        for g, w in zip(grads, params, strict=True):
            axes = tuple(range(1, g.ndim)) or None
            gn = np.sqrt(np.sum(g * g, axis=axes, keepdims=g.ndim > 1))
            wn = np.maximum(np.sqrt(np.sum(w * w, axis=axes, keepdims=g.ndim > 1)), policy.eps)
            limit = policy.clipping * wn
            out.append(np.where(gn > limit, g * limit / np.maximum(gn, 1e-6), g))
        return out, state
    raise AssertionError(policy)


def _norm(gs):
    return math.sqrt(sum(float(np.sum(g * g)) for g in gs))


@pytest.fixture(scope="module", params=list(CLIP_POLICIES), ids=list(CLIP_POLICIES))
def clip_runs(request):
    policy = CLIP_POLICIES[request.param]
    tnet, knet = networks()
    return policy, run_clip_torch(tnet, policy), run_clip_tf(knet, policy)


def test_clipping_is_the_same_in_both_frameworks_step_by_step(clip_runs):
    policy, (_, t_after, t_hist, _), (k_after, k_hist) = clip_runs
    assert len(t_hist) == len(k_hist) == CLIP_STEPS
    for step, (t, k) in enumerate(zip(t_hist, k_hist, strict=True)):
        np.testing.assert_allclose(k.grad_norm, t.grad_norm, rtol=CLIP_REL, err_msg=f"{step}")
        assert k.global_norm == pytest.approx(t.global_norm, rel=CLIP_REL), step
        assert t.clip_coef is not None and k.clip_coef is not None, step
        assert k.clip_coef == pytest.approx(t.clip_coef, rel=CLIP_REL), step
        if Chain(policy).per_layer:
            np.testing.assert_allclose(k.layer_clip_coef, t.layer_clip_coef, rtol=CLIP_REL)
        else:
            assert t.layer_clip_coef is None and k.layer_clip_coef is None
        for a, b in zip(k_after[step], t_after[step], strict=True):
            np.testing.assert_allclose(a, b, rtol=CLIP_REL, atol=1e-9, err_msg=f"{step}")
    assert any(s.clip_coef < 0.999 for s in t_hist)  # every policy clips at least once here


def test_clipping_matches_a_reference_by_hand(clip_runs):
    policy, (t_before, t_after, t_hist, params), _ = clip_runs
    layer_of = [0, 0, 1, 1, 2, 2]  # fc0, fc1, head (weight, bias each); fc2 is frozen
    state = None
    for step, (before, after, stats) in enumerate(zip(t_before, t_after, t_hist, strict=True)):
        expected, state = hand_clip(policy, before, params, layer_of, state)
        for a, b in zip(after, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=CLIP_REL, atol=1e-9, err_msg=f"{step}")
        assert stats.clip_coef == pytest.approx(_norm(expected) / _norm(before), rel=CLIP_REL)
        if stats.layer_clip_coef is not None:
            by_layer = [
                _norm([g for g, k in zip(gs, layer_of, strict=True) if k == i])
                for gs in (expected, before)
                for i in range(3)
            ]
            np.testing.assert_allclose(
                stats.layer_clip_coef, np.divide(by_layer[:3], by_layer[3:]), rtol=CLIP_REL
            )
