"""A real run's TensorBoard logs, read back through TensorBoard's own loader."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from graddiag import tags  # noqa: E402

SIZE = {"scalars": 0, "tensors": 0, "histograms": 0}


def _acc(logdir):
    acc = EventAccumulator(logdir, size_guidance=SIZE)
    acc.Reload()
    return acc


def test_every_step_is_logged_with_history_values(logdir):
    from healthy import run

    mon = run(logdir=logdir, steps=25, every=10, hist_every=10, detail_every=10)
    acc = _acc(logdir)
    for layer_i, layer in enumerate(mon.layers):
        events = acc.Scalars(tags.tag("grad_norm", layer))
        assert [e.step for e in events] == list(range(25))  # ring buffer: no step lost
        np.testing.assert_allclose(
            [e.value for e in events], [s.grad_norm[layer_i] for s in mon.history], rtol=1e-6
        )
    assert len(acc.Scalars(tags.tag("grad_norm"))) == 25
    # detail statistics on log steps (9, 19)
    assert [e.step for e in acc.Scalars(tags.tag("grad_max", mon.layers[0]))] == [9, 19]
    assert [e.step for e in acc.Scalars(tags.tag("update_ratio", mon.layers[0]))] == [9, 19]
    # histograms every 10 steps, with NaN/Inf counts beside them
    assert [e.step for e in acc.Histograms(tags.hist_tag(mon.layers[0]))] == [0, 10, 20]
    assert [e.value for e in acc.Scalars(tags.tag("nan_count", mon.layers[0]))] == [0, 0, 0]
    meta = json.loads(acc.Tensors(tags.MODEL)[0].tensor_proto.string_val[0])
    assert meta["info"]["layers"] == list(mon.layers)
    assert meta["detectors"]["vanishing"]["patience"] == 10


def test_findings_text_and_custom_scalars_layout(logdir):
    from nan_layer import NAN_STEP, run

    run(logdir=logdir, steps=35)
    acc = _acc(logdir)
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tags.FINDINGS)}
    assert "nonfinite" in texts[NAN_STEP] and "'mid'" in texts[NAN_STEP]
    nonfinite = acc.Scalars(tags.tag("nonfinite"))
    assert [e.value for e in nonfinite if e.step == NAN_STEP] == [2.0]
    assert tags.tag("nonfinite", "mid") in acc.Tags()["scalars"]
    layout = acc.Tensors("custom_scalars__config__")
    assert len(layout) >= 1
    from tensorboard.plugins.custom_scalar import layout_pb2

    parsed = layout_pb2.Layout.FromString(layout[-1].tensor_proto.string_val[0])  # TB's choice
    assert [c.title for c in parsed.category] == [  # no clipping in this run: no clipping charts
        "graddiag: global",
        "graddiag: per-layer gradient norms",
        "graddiag: findings",
    ]


def test_nan_histogram_counts_not_dropped(logdir):
    model = torch.nn.Linear(4, 2)
    from graddiag.torch import GradientMonitor

    mon = GradientMonitor(model, logdir=logdir, every=1, hist_every=1)
    model(torch.tensor([[1.0, float("nan"), 0.0, 1.0]])).sum().backward()
    mon.step()
    mon.close()
    acc = _acc(logdir)
    assert (
        acc.Scalars(tags.tag("nan_count", "Linear"))[0].value == 2.0
    )  # weight column 1, both rows
    hist = acc.Histograms(tags.hist_tag("Linear"))[0].histogram_value
    assert hist.num == 8  # 6 finite weight entries + 2 bias entries


def test_histogram_matches_numpy(logdir):
    from graddiag.torch import GradientMonitor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    mon = GradientMonitor(model, logdir=logdir, every=1, hist_every=1)
    model(torch.randn(32, 16)).square().mean().backward()
    mon.step()
    values = torch.cat([p.grad.reshape(-1) for p in model[2].parameters()]).double().numpy()
    mon.close()
    hist = _acc(logdir).Histograms(tags.hist_tag("2"))[0].histogram_value
    ref, edges = np.histogram(values, bins=30, range=(values.min(), values.max()))
    assert hist.num == values.size and hist.min == pytest.approx(values.min(), rel=1e-6)
    np.testing.assert_allclose(hist.bucket_limit, edges[1:], rtol=1e-6)
    # float32 binning may move a value sitting on an edge into the neighbouring bucket
    assert np.abs(np.asarray(hist.bucket) - ref).max() <= 1
    assert hist.sum == pytest.approx(values.sum(), rel=1e-5, abs=1e-9)
    assert hist.sum_squares == pytest.approx((values**2).sum(), rel=1e-5)


CRASH_SCRIPT = """
import os, sys, torch
from graddiag.torch import GradientMonitor
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
mon = GradientMonitor(model, opt, logdir=sys.argv[1], every=5, flush_secs=0)
for _ in range(23):
    opt.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
if sys.argv[2] == "crash":
    os._exit(1)  # no close(), no atexit: what was flushed must be readable
"""


@pytest.mark.parametrize("how, steps", [("crash", 20), ("exit", 23)])
def test_logs_survive_crash_and_unclosed_exit(tmp_path, how, steps):
    import subprocess
    import sys

    logdir = str(tmp_path / "run")
    out = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, logdir, how],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == (1 if how == "crash" else 0), out.stderr[-1000:]
    logged = [e.step for e in _acc(logdir).Scalars(tags.tag("grad_norm"))]
    # a crash loses at most the last interval (the unread ring buffer); a normal exit loses nothing
    assert logged == list(range(steps))
