"""graddiag under torch.distributed with real process groups: 2 processes, gloo, on the CPU.

Each test launches two ranks of `tests/_dist_worker.py` (a free port per test, a hard timeout so
a hang fails fast) and compares them with the same problem trained unsharded in this process
(the same seed, the same global batch) or with torch's own `clip_grad_norm_`.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import _dist_worker as W  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import graddiag  # noqa: E402
from graddiag import tags  # noqa: E402
from graddiag.clip import GlobalNormClip  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402

#: Distributed vs one process: averaging over ranks and summing shards reorder float32 sums.
REL = 1e-4
#: The update/weight ratio is a difference of float32 weights about 1e-3 apart: weights that
#: agree to ~1e-7 give updates that agree to ~1e-4 of themselves.
REL_UPDATE = 1e-3
#: Seconds two ranks may take for one launch (start-up included) before it counts as a hang.
TIMEOUT_S = 240
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dist_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenarios: list[str], out) -> dict[str, list[dict]]:
    """Run `scenarios` ("name:arg") one after the other in one 2-rank process group; return
    each one's per-rank results. Fails (and kills both ranks) on a hang."""
    port = _free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning",
        "PYTHONPATH": ROOT,  # the ranks run this tree's graddiag, not an installed one
    }
    cmd = [sys.executable, WORKER, ",".join(scenarios)]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), "2", str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0].decode(errors="replace")[-2000:] for p in procs]
        pytest.fail(f"{scenarios} hung for {TIMEOUT_S}s:\n" + "\n---\n".join(logs))
    for r, p in enumerate(procs):
        text = p.communicate()[0].decode(errors="replace")
        assert p.returncode == 0, f"rank {r} of {scenarios} failed:\n{text[-3000:]}"
    results = {}
    for item in scenarios:
        where = os.path.join(out, item.replace(":", "-"))
        results[item] = [json.load(open(os.path.join(where, f"rank{r}.json"))) for r in range(2)]
    return results


#: One process group each (starting two ranks costs more than the scenarios themselves); the
#: DDP run with an unused layer goes last, since DDP fails on that model's next iteration.
DDP = ["ddp:wrapped", "ddp_nan:skip", "ddp_nan:raise", "ddp_clip:-", "ddp_accum:-", "ddp_unused:-"]
FSDP = ["fsdp:stats", "fsdp:clip", "fsdp:chain", "fsdp:agc", "fsdp_nan:skip", "fsdp_nan:raise"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, launch(DDP, out)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, launch(FSDP, out)


def reference(clip=None, logdir=None, micro=1) -> tuple[list[dict], list]:
    """The same problem in one process, unsharded, on the whole global batch (`micro` > 1: in
    that many accumulated pieces, each the ranks' pieces together)."""
    net = W.make_model()
    opt = W.optimizer(net)
    mon = GradientMonitor(
        net, opt, logdir=logdir, every=4, detail_every=2, hist_every=3, clip=clip, flush_secs=0
    )
    W.train(net, opt, rank=None, world=2, micro=micro)
    mon.close()
    return W.history(mon), W.full_params(net)


def assert_same_history(got: list[dict], want: list[dict]) -> None:
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if isinstance(value, list) or isinstance(value, float):
                assert g[key] is not None, (key, g["step"])
                rtol = REL_UPDATE if key == "update_ratio" else REL
                np.testing.assert_allclose(g[key], value, rtol=rtol, err_msg=f"{key} {g['step']}")
            else:
                assert g[key] == value, (key, g["step"])


def assert_same_params(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=REL, atol=1e-7)


def event_files(root) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True))


def test_ddp_equals_one_process_and_rank0_writes_the_only_log(ddp_runs, tmp_path):
    out, runs = ddp_runs
    ranks = runs["ddp:wrapped"]
    want, want_params = reference(logdir=str(tmp_path / "ref"))
    for res in ranks:
        assert res["layers"] == ["0", "2", "4"]  # no `module.` prefix
        assert_same_history(res["history"], want)
        assert_same_params(res["params"], want_params)
        assert not [f for f in res["findings"] if f["severity"] != "info"]  # a healthy run
        assert res["comm_hooks"] == 1
    logs = out / "ddp-wrapped" / "logs"
    files = event_files(logs)
    assert len(files) == 1 and os.path.dirname(files[0]) == str(logs)
    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [e.value for e in acc.Scalars(tags.tag("grad_norm"))]
    np.testing.assert_allclose(logged, [h["global_norm"] for h in want], rtol=REL)


@pytest.mark.slow
def test_ddp_monitor_of_the_unwrapped_module_and_per_rank_logs(tmp_path):
    ranks = launch(["ddp:module"], tmp_path)["ddp:module"]
    want, _ = reference()
    for res in ranks:
        assert res["layers"] == ["0", "2", "4"]
        assert_same_history(res["history"], want)
        assert res["comm_hooks"] == 1  # the DDP wrapping the module was found and hooked
    logs = tmp_path / "ddp-module" / "logs"
    files = event_files(logs)
    assert [os.path.relpath(os.path.dirname(f), logs) for f in files] == [
        ".",
        "rank1",
    ]


@pytest.mark.parametrize("runs", ["ddp_runs", "fsdp_runs"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nan_on_rank1_is_named_and_no_rank_hangs(request, runs, policy):
    out, results = request.getfixturevalue(runs)
    ranks = results[f"{runs.split('_')[0]}_nan:{policy}"]
    messages = set()
    for res in ranks:
        assert res["after"] == 2.0  # both ranks reached the collective after the NaN step
        (finding,) = res["findings"]
        assert finding["step"] == W.NAN_STEP
        assert "first appeared on rank 1 (local gradients before" in finding["message"]
        messages.add(finding["message"])
        if policy == "skip":
            assert res["skipped"] == [W.NAN_STEP]
            assert res["params_finite"]
        else:
            assert res["raised_step"] == W.NAN_STEP and "rank 1" in res["raised"]
    assert len(messages) == 1  # every rank reports the same
    logs = out / f"{runs.split('_')[0]}_nan-{policy}" / "logs"
    (later,) = [f for f in graddiag.analyze(str(logs)).findings if f.kind == "nonfinite"]
    assert later.message == finding["message"]  # the logs name the rank too
    assert_same_params(ranks[0]["params"], ranks[1]["params"])


def test_ddp_frozen_and_unused_layers_are_named(ddp_runs):
    ranks = ddp_runs[1]["ddp_unused:-"]
    for res in ranks:
        unused = [f for f in res["findings"] if f["kind"] == "unused"]
        assert len(unused) == 1 and unused[0]["layer"] == "unused"
        assert "unused.weight, unused.bias" in unused[0]["message"]
        assert "rank(s) 0, 1" in unused[0]["message"]
        assert any("unused.weight" in w for w in res["warnings"])
        frozen = [f for f in res["findings"] if f["kind"] == "frozen"]
        assert frozen and "frozen" in frozen[0]["message"]
        assert "unused" in res["layers"] and "frozen" not in res["layers"]


def test_ddp_gradient_accumulation_with_no_sync_equals_one_process(ddp_runs):
    want, want_params = reference(micro=2)
    for res in ddp_runs[1]["ddp_accum:-"]:
        assert_same_history(res["history"], want)
        assert_same_params(res["params"], want_params)
        assert not [f for f in res["findings"] if f["severity"] != "info"]


def test_ddp_clipping_equals_clip_grad_norm(ddp_runs):
    ranks = ddp_runs[1]["ddp_clip:-"]
    for res in ranks:
        assert_same_params(res["params"], res["ref_params"])
        norms = [h["global_norm"] for h in res["history"]]
        np.testing.assert_allclose(norms, res["torch_norms"], rtol=REL)
        coef = [h["clip_coef"] for h in res["history"]]
        np.testing.assert_allclose(
            coef, np.minimum(1, W.MAX_NORM / (np.add(norms, 1e-6))), rtol=REL
        )
        assert max(coef) < 1  # every step was clipped


def _histograms(logdir, layers):
    acc = EventAccumulator(logdir, size_guidance={"histograms": 0})
    acc.Reload()
    return {
        layer: [(e.step, e.histogram_value) for e in acc.Histograms(tags.hist_tag(layer))]
        for layer in layers
    }


def test_fsdp2_equals_unsharded(fsdp_runs, tmp_path):
    out, runs = fsdp_runs
    ranks = runs["fsdp:stats"]
    want, want_params = reference(logdir=str(tmp_path / "ref"))
    for res in ranks:
        assert res["layers"] == ["0", "2", "4"]
        assert_same_history(res["history"], want)
        assert_same_params(res["params"], want_params)
        assert not [f for f in res["findings"] if f["severity"] != "info"]
    assert len(event_files(out / "fsdp-stats" / "logs")) == 1
    got = _histograms(str(out / "fsdp-stats" / "logs"), ranks[0]["layers"])
    ref = _histograms(str(tmp_path / "ref"), ranks[0]["layers"])
    for layer, hists in ref.items():
        assert [s for s, _ in got[layer]] == [s for s, _ in hists] == [0, 3]
        for (_, g), (_, w) in zip(got[layer], hists, strict=True):
            np.testing.assert_allclose(
                [g.min, g.max, g.num, g.sum, g.sum_squares],
                [w.min, w.max, w.num, w.sum, w.sum_squares],
                rtol=REL,
            )
            assert list(g.bucket) == list(w.bucket)  # same edges: the same counts


def test_fsdp2_clipping_equals_fsdp_recipe_and_unsharded(fsdp_runs):
    ranks = fsdp_runs[1]["fsdp:clip"]
    want, want_params = reference(clip=GlobalNormClip(W.MAX_NORM))
    for res in ranks:
        assert_same_params(res["params"], res["ref_params"])  # clip_grad_norm_ on DTensors
        assert_same_params(res["params"], want_params)
        np.testing.assert_allclose(
            [h["global_norm"] for h in res["history"]], res["torch_norms"], rtol=REL
        )
        assert_same_history(res["history"], want)


def test_per_rank_logs_must_be_a_bool():
    with pytest.raises(ValueError, match="`per_rank_logs`.*'yes'"):
        GradientMonitor(torch.nn.Linear(2, 2), per_rank_logs="yes")


@pytest.mark.parametrize("policy", ["chain", "agc"])
def test_fsdp2_elementwise_clipping_equals_unsharded(fsdp_runs, policy):
    """ValueClip then GlobalNormClip (the norm measured again, over the shards) and AGC (units
    are rows, whole in a Shard(0) shard)."""
    want, want_params = reference(clip=W.clip_policy(policy))
    for res in fsdp_runs[1][f"fsdp:{policy}"]:
        assert_same_history(res["history"], want)
        assert_same_params(res["params"], want_params)


def test_fsdp2_sum_over_shards_copies_its_order_to_the_device_once(monkeypatch):
    """The per-step reduction of the sums of squares reuses its device index (a host-to-device
    copy per step would be a host sync on CUDA); the result is each parameter's value, summed
    over the (here: one) shard group, back in the caller's order."""
    from graddiag.torch._distributed import Distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        d = Distributed(False, mesh=object())
        d._shard_groups = [dist.group.WORLD]
        d._replicated = np.zeros(4, dtype=bool)
        d._count_replicated = 1.0
        idx = np.array([2, 0, 3, 1])
        values = torch.tensor([20.0, 0.5, 30.0, 10.0])
        copies = []
        real = torch.as_tensor
        monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: copies.append(1) or real(*a, **k))
        first = d.sum_over_shards(values, idx)
        n_first = len(copies)
        for _ in range(3):
            again = d.sum_over_shards(values * 2, idx)
        assert n_first == 1 and len(copies) == 1  # made once, then reused
        assert first.tolist() == values.tolist()  # one rank: the sum is the value itself
        assert again.tolist() == (values * 2).tolist()
    finally:
        dist.destroy_process_group()


def test_fsdp1_and_two_device_meshes_are_refused_at_construction(tmp_path):
    """Both are known when the monitor is built: the constructor refuses them, naming `model`
    (and the two meshes), before any training step."""
    for res in launch(["refused:models"], tmp_path)["refused:models"]:
        assert res["two_meshes"] is not None, "the monitor was built over two meshes"
        assert "`model`" in res["two_meshes"]
        assert "DeviceMesh((2,)" in res["two_meshes"] and "r=1, s=2" in res["two_meshes"]
        assert res["fsdp1"] is not None and "`model`" in res["fsdp1"]
        assert "FullyShardedDataParallel (FSDP1)" in res["fsdp1"]
