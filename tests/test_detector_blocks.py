"""Detectors over blocks of consecutive steps (`Diagnoser.update_block`, what a log step reads back)
give exactly what they give step by step: the same findings, the same amendments, the same state --
on generated streams (healthy and broken in many ways) cut into random blocks."""

import math

import numpy as np
import pytest

from graddiag.detectors import DETECTORS, Diagnoser, Window
from graddiag.findings import Finding
from graddiag.stats import ModelInfo, StepStats

#: The kinds the generated streams must produce between them (so the equivalence is not vacuous).
EXPECTED_KINDS = {
    "nonfinite",
    "vanishing",
    "exploding",
    "spike",
    "divergence",
    "large_update",
    "detached",
    "dead",
    "starved",
    "zero_gradient",
    "accumulation",
    "modified",
    "clipped",
}
EVENTS = ("vanishing", "nonfinite", "spike", "exploding", "dead", "detached", "starved", "zero")


def _span(rng, steps, longest):
    a = int(rng.integers(0, steps))
    return a, min(steps, a + int(rng.integers(1, longest)))


def generate(seed: int) -> tuple[ModelInfo, list[StepStats], dict]:
    """A random model description, a stream of steps with random troubles, detector settings."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 3, 4, 7, 12, 33, 60]))
    layers = tuple(f"layer{i}" for i in range(n))
    order = None
    if rng.random() < 0.6:
        order = list(reversed(layers)) if rng.random() < 0.5 else list(rng.permutation(layers))
        if n > 2 and rng.random() < 0.3:
            order = order[:-1]  # a layer the backward pass was not seen to reach
        order = tuple(str(x) for x in order)
    counts = tuple(int(c) for c in rng.integers(1, 5000, n)) if rng.random() < 0.5 else ()
    info = ModelInfo(layers=layers, param_counts=counts, backward_order=order)

    steps = int(rng.integers(20, 220))
    scales = np.exp(rng.uniform(-3, 0, n))
    if order and rng.random() < 0.3:  # a steady decay toward the input
        index = {name: i for i, name in enumerate(layers)}
        for depth, name in enumerate(order):
            scales[index[name]] = 6.0**-depth
    norms = scales * np.exp(rng.normal(0, 0.2, (steps, n)))
    has = np.ones((steps, n), bool)
    nonfinite = np.zeros((steps, n))
    # the adapter's requires_grad flags, when it reports them (some flipping now and then)
    trainable = rng.random((steps, n)) < 0.95 if rng.random() < 0.3 else None
    for event in rng.choice(EVENTS, int(rng.integers(0, 5))):
        i = int(rng.integers(0, n))
        a, b = _span(rng, steps, 80)
        if event == "vanishing":
            flicker = int(rng.choice([1, 4, 7]))
            norms[a:b, i] *= np.where(np.arange(a, b) % flicker == 0, 1.0, 1e-6)
        elif event == "nonfinite":
            b = min(b, a + 6)
            norms[a:b, i] = rng.choice([np.nan, np.inf])
            nonfinite[a:b, i] = 1
        elif event == "spike":
            norms[a : a + int(rng.integers(1, 3)), i] *= 200.0
        elif event == "exploding":
            norms[a:b] *= 1e3 if rng.random() < 0.8 else 1e19
        elif event == "dead":
            a = 0 if rng.random() < 0.5 else a  # dead from the start, or dying mid-run
            norms[a:b, i] = 0.0
        elif event == "detached":
            has[a:b, i] = False
            if rng.random() < 0.5:
                trainable = np.ones((steps, n), bool) if trainable is None else trainable
                trainable[a:b, i] = rng.random() < 0.5
        elif event == "starved":
            has[a:b, i] = rng.random(b - a) < 0.5
        elif event == "zero":
            a = 0 if rng.random() < 0.3 else a  # judged first when the window fills
            norms[a:b:3] = 0.0

    stride = int(rng.choice([1, 1, 10]))
    detail = int(rng.choice([0, 1, 10]))  # detail statistics every this many steps (0: never)
    loss = None
    if rng.random() < 0.5:
        loss = 2.0 * np.exp(-np.arange(steps) / 100) + rng.normal(0, 0.01, steps)
        if rng.random() < 0.5:
            a, b = _span(rng, steps, 40)
            loss[a:b] *= 30.0 if rng.random() < 0.8 else np.nan
    # the loss only on some steps (a caller that passes it now and then)
    loss_on = rng.random(steps) < 0.7 if rng.random() < 0.3 else np.ones(steps, bool)
    clip = rng.random() < 0.4
    reset = rng.random() < 0.4
    stream = []
    for t in range(steps):
        g = np.where(has[t], norms[t], 0.0)
        gn = float(np.sqrt(np.sum(g**2)))
        kw = {}
        if detail and t % detail == 0:
            zero_frac = np.where(g == 0, rng.choice([1.0, 0.5]), rng.uniform(0, 0.3, n))
            kw.update(
                zero_frac=zero_frac,
                grad_max=g / 3,
                param_norm=np.full(n, 10.0),
                update_ratio=np.where(
                    rng.random(n) < 0.1, np.nan, rng.choice([1e-3, 0.5], p=[0.7, 0.3])
                ),
            )
        if clip and math.isfinite(gn) and gn > 0:
            kw["clip_coef"] = min(1.0, float(np.median(scales)) * rng.choice([0.05, 3.0]) / gn)
            if rng.random() < 0.2:
                kw["layer_clip_coef"] = np.minimum(1.0, rng.uniform(0.5, 2.0, n))
        if reset:
            kw.update(grad_reset=bool(rng.random() < 0.9), backward_calls=int(rng.integers(1, 3)))
        stream.append(
            StepStats(
                step=t * stride,
                grad_norm=g,
                has_grad=has[t].copy(),
                nonfinite=nonfinite[t].copy(),
                global_norm=gn,
                loss=None if loss is None or not loss_on[t] else float(loss[t]),
                skipped=not math.isfinite(gn),
                trainable=None if trainable is None else trainable[t].copy(),
                grads_modified=bool(rng.random() < 0.01),
                nonfinite_origin="layer0" if nonfinite[t].any() and rng.random() < 0.5 else None,
                **kw,
            )
        )
    settings = {
        "vanishing": {"patience": int(rng.choice([3, 10, 25]))},
        "detached": {"patience": int(rng.choice([5, 20, 45]))},
        "zero_gradient": {"patience": int(rng.choice([4, 20]))},
        "spike": {"window": int(rng.choice([5, 100]))},
        "exploding": {"baseline": int(rng.choice([1, 5]))},
    }
    return info, stream, settings


def same(a, b) -> bool:
    """Exact equality of detector state and findings (NaN equal to NaN)."""
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if isinstance(a, Window):
        return isinstance(b, Window) and same(vars(a), vars(b))
    if isinstance(a, Finding):
        return repr(a) == repr(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def assert_same_state(by_step: Diagnoser, by_block: Diagnoser, where: str) -> None:
    assert same(by_step.findings, by_block.findings), where
    for d, e in zip(by_step.detectors, by_block.detectors, strict=True):
        assert same(d.state_dict(), e.state_dict()), f"{d.name} state differs {where}"


def compare(info, stream, settings, blocks_rng) -> list[Finding]:
    """Feed `stream` step by step and in random blocks; assert both agree after every block and
    after finalize; return the findings."""
    by_step, by_block = Diagnoser(info, settings), Diagnoser(info, settings)
    t = 0
    while t < len(stream):
        block = stream[t : t + int(blocks_rng.integers(1, 41))]
        expected = [by_step.update(s) for s in block]
        got = by_block.update_block(block)
        t += len(block)
        assert same(expected, got), f"new findings differ in the block ending at step {t - 1}"
        assert_same_state(by_step, by_block, f"after the block ending at step {t - 1}")
    assert same(by_step.finalize(), by_block.finalize())
    assert_same_state(by_step, by_block, "after finalize")
    return by_step.findings


def count_bulk_steps(monkeypatch) -> dict[str, int]:
    """Wrap every detector's `_bulk` to count, per detector, the steps it took at once."""
    taken = dict.fromkeys(DETECTORS, 0)
    taken["divergence with a loss"] = 0  # its steady state, not only the steps without a loss
    for name, cls in DETECTORS.items():
        bulk = cls._bulk

        def counted(self, block, bulk=bulk, name=name):
            k = bulk(self, block)
            taken[name] += k
            if name == "divergence":
                taken["divergence with a loss"] += sum(s.loss is not None for s in block[:k])
            return k

        monkeypatch.setattr(cls, "_bulk", counted)
    return taken


# a step whose compared layers all underflowed to a zero norm divides 0 by 0, step by step as in a block
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_blocks_give_what_steps_give_on_generated_streams(monkeypatch):
    taken = count_bulk_steps(monkeypatch)
    seen = set()
    for seed in range(80):
        info, stream, settings = generate(seed)
        found = compare(info, stream, settings, np.random.default_rng(1000 + seed))
        seen |= {f.kind for f in found}
    assert EXPECTED_KINDS <= seen, f"never fired: {EXPECTED_KINDS - seen}"
    # every detector took steps at once (the equivalence covers its `_bulk`, not only `update`)
    assert all(taken.values()), f"never taken at once: {[n for n, k in taken.items() if not k]}"


def test_a_wrong_bulk_is_caught(monkeypatch):
    """The comparison can fail: a divergence `_bulk` that takes every step at once (so misses the
    diverging ones) is caught on the generated streams."""
    from graddiag.detectors import DivergenceDetector

    monkeypatch.setattr(DivergenceDetector, "_bulk", lambda self, block: len(block))
    with pytest.raises(AssertionError):
        for seed in range(80):
            compare(*generate(seed), np.random.default_rng(1000 + seed))


@pytest.mark.parametrize("n_layers", [1, 4, 12, 60])
def test_blocks_give_what_steps_give_on_long_healthy_streams(n_layers):
    """Healthy noise over many windows (state carried across many blocks), with and without the
    backward order and parameter counts."""
    rng = np.random.default_rng(n_layers)
    layers = tuple(f"l{i}" for i in range(n_layers))
    norms = np.exp(rng.uniform(-2, 0, n_layers)) * np.exp(rng.normal(0, 0.3, (600, n_layers)))
    stream = [
        StepStats(t, g, np.ones(n_layers, bool), np.zeros(n_layers), float(np.sqrt(np.sum(g**2))))
        for t, g in enumerate(norms)
    ]
    for info in (
        ModelInfo(layers=layers),
        ModelInfo(layers, (100,) * n_layers, tuple(reversed(layers))),
    ):
        assert compare(info, stream, None, np.random.default_rng(7)) == []


def test_a_healthy_block_is_taken_at_once(monkeypatch):
    """The common case -- every layer has a finite gradient, nothing to report -- never falls back
    to step-by-step `update` in the detectors that vectorise it (once their windows and baselines
    have filled)."""
    layers = tuple(f"l{i}" for i in range(12))
    rng = np.random.default_rng(3)
    norms = np.exp(rng.normal(0, 0.2, (100, 12)))
    stream = [
        StepStats(
            t,
            g,
            np.ones(12, bool),
            np.zeros(12),
            float(np.sqrt(np.sum(g**2))),
            loss=2.0 - t * 1e-3,
            grad_reset=True,
            backward_calls=1,
            update_ratio=np.full(12, 1e-3) if t % 10 == 0 else None,
        )
        for t, g in enumerate(norms)
    ]
    diag = Diagnoser(ModelInfo(layers, (64,) * 12, tuple(reversed(layers))))
    for s in stream[:50]:
        diag.update(s)
    for d in diag.detectors:
        monkeypatch.setattr(d, "update", lambda s, name=d.name: pytest.fail(name))
    assert diag.update_block(stream[50:]) == [[]] * 50
    assert {d.name for d in diag.detectors} == set(DETECTORS)


def test_a_quiet_block_still_judges_the_steps_before_it():
    """Whole-gradient-zero steps only before the zero_gradient window (20 steps) fills: the block in
    which it fills holds none, yet the window's rate (6 of 20) opens the episode there."""
    layers = ("a", "b")
    stream = [
        StepStats(t, np.full(2, 0.0 if t < 6 else 1.0), np.ones(2, bool), np.zeros(2), 0.0)
        for t in range(40)
    ]
    for s in stream[6:]:
        s.global_norm = float(np.sqrt(2.0))
    found = compare(ModelInfo(layers), stream, None, FixedBlocks([10, 30]))
    assert [(f.kind, f.step) for f in found] == [("zero_gradient", 19)]


class FixedBlocks:
    """Block sizes in a fixed order, in place of a random generator's `integers`."""

    def __init__(self, sizes):
        self.sizes = iter(sizes)

    def integers(self, lo, hi):
        return next(self.sizes)


@pytest.mark.parametrize("size", [1, 2, 5, 7])
def test_window_takes_a_block_as_pushes_do(size):
    """`Window.sums_after` + `extend` against `push` row by row, with real values (float sums must
    match exactly) and blocks shorter and longer than the window, from many ring positions."""
    rng = np.random.default_rng(size)
    by_push, by_block = Window(size, 3), Window(size, 3)
    step = 0
    for k in [0, 1, 3, size, size + 1, 2 * size + 3, 1, 2] * 3:
        rows = rng.normal(0, 1e3, (k, 3)) * rng.choice([1e-8, 1.0, 1e8], (k, 1))
        steps = np.arange(step, step + k, dtype=np.int64)
        step += k
        expected = []
        for row, t in zip(rows, steps, strict=True):
            by_push.push(row, int(t))
            expected.append(by_push.sum.copy())
        sums = by_block.sums_after(rows)
        assert np.array_equal(sums, np.reshape(expected, (k, 3)))
        assert np.array_equal(
            by_block.counts_after(k),
            [min(n, size) for n in range(by_block.n + 1, by_block.n + k + 1)],
        )
        by_block.extend(rows, steps, sums)
        assert same(vars(by_push), vars(by_block))
        assert by_push.span() == by_block.span() and np.array_equal(
            by_push.values(), by_block.values()
        )
