"""graddiag under `tf.distribute.MirroredStrategy` with 2 logical CPU devices: the statistics are
those of the aggregated gradients and equal the single-device run of the same problem (same global
batch, same seed); one event file; a NaN in one replica's shard is found and every replica takes
the same skip/raise decision; clipping acts on the aggregated gradients; unsupported strategies
get graddiag's own message.

The devices must be configured before TensorFlow initialises them, so each case runs in a fresh
interpreter (tests/_tf_distribute_child.py) with a hard timeout: a hang fails fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_tf_distribute_child.py"
#: A hung collective or merge_call fails the test after this many seconds.
TIMEOUT_S = 240
#: Mirrored vs single device: the all-reduce sums the replicas' float32 partial gradients in
#: another order than one device's batch reduction.
REL = 1e-4
#: Plus an absolute floor for values near zero (weights, tiny layer norms).
ABS = 1e-6


def run_case(case: str, tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, str(CHILD), case, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def assert_same_run(dist: dict, single: dict, *, clip: bool = False) -> None:
    """Same steps, per-layer norms, global norms (clip coefficients) and final weights."""
    assert [h["step"] for h in dist["history"]] == [h["step"] for h in single["history"]]
    assert dist["history"], "nothing was measured"
    for d, s in zip(dist["history"], single["history"], strict=True):
        np.testing.assert_allclose(d["grad_norm"], s["grad_norm"], rtol=REL, atol=ABS)
        np.testing.assert_allclose(d["global_norm"], s["global_norm"], rtol=REL)
        assert d["skipped"] == s["skipped"]
        assert (d["loss"] is None) == (s["loss"] is None)
        if s["loss"] is not None:  # the global batch's loss, summed over the replicas' shares
            np.testing.assert_allclose(d["loss"], s["loss"], rtol=REL)
        if clip:
            assert d["clip_coef"] is not None
            np.testing.assert_allclose(d["clip_coef"], s["clip_coef"], rtol=REL)
    for wd, ws in zip(dist["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(wd, ws, rtol=REL, atol=ABS)
    assert dist["agree"], "the replicas' copies of the variables diverged"


def kinds(run: dict) -> set[tuple]:
    return {(f["kind"], f["layer"]) for f in run["findings"]}


@pytest.mark.slow
def test_fit_under_mirrored_strategy_equals_the_single_device_run(tmp_path):
    out = run_case("fit", tmp_path)
    assert out["replicas"] == 2
    single, mirrored = out["single"], out["mirrored"]
    assert [h["step"] for h in mirrored["history"]] == list(range(8))  # 2 epochs x 4 batches
    assert all(h["loss"] is not None for h in single["history"])  # Keras' loss is logged
    assert_same_run(mirrored, single)
    assert_same_run(out["one_device"], single)
    # IndexedSlices (embedding) gradients under Adam: the optimizer gets the same rows
    assert_same_run(out["embedding_mirrored"], out["embedding_single"])
    assert kinds(mirrored) == kinds(single)
    # one run, one event file, and what it holds is the single-device run's numbers
    assert len(mirrored["files"]) == 1 and len(single["files"]) == 1
    assert mirrored["logged"].keys() == single["logged"].keys()
    assert len(mirrored["logged"]) == 8 * 3  # global + 2 layers per step
    for key, value in single["logged"].items():
        assert mirrored["logged"][key] == pytest.approx(value, rel=REL, abs=ABS), key


@pytest.mark.slow
def test_clipping_under_mirrored_strategy_acts_on_the_aggregated_gradients(tmp_path):
    out = run_case("clip", tmp_path)
    # the framework's own clipping on one device (Keras `global_clipnorm`) is the reference
    for wd, wk in zip(out["mirrored"]["weights"], out["keras_clipnorm"]["weights"], strict=True):
        np.testing.assert_allclose(wd, wk, rtol=REL, atol=ABS)
    assert_same_run(out["mirrored"], out["single"], clip=True)
    assert any(h["clip_coef"] < 1 for h in out["mirrored"]["history"])
    # an element-wise clip of each replica's local gradients would differ: this equality
    # needs the value clip applied to the summed gradients
    assert_same_run(out["mirrored_chain"], out["single_chain"], clip=True)


@pytest.mark.slow
def test_custom_strategy_run_loop_equals_single_device_and_names_frozen_and_unused(tmp_path):
    out = run_case("loop", tmp_path)
    single, mirrored = out["single"], out["mirrored"]
    assert single["error"] is None and mirrored["error"] is None
    assert len(mirrored["history"]) == 24
    assert_same_run(mirrored, single)
    for run in (single, mirrored):
        assert run["info_frozen"] == ["frozen.kernel", "frozen.bias"]
        assert ("frozen", "frozen") in kinds(run)
        assert ("detached", "unused") in kinds(run)
    assert kinds(mirrored) == kinds(single)
    assert_same_run(out["mirrored_clip"], out["single_clip"], clip=True)
    assert_same_run(out["mirrored_clip_eager"], out["single_clip"], clip=True)


@pytest.mark.slow
def test_nan_in_one_replicas_shard_is_found_and_every_replica_decides_alike(tmp_path):
    out = run_case("nan", tmp_path)
    for path in ("fit", "loop"):
        nan_step = 1 if path == "fit" else 2
        skip_single, skip_mirrored = out[f"{path}_skip_single"], out[f"{path}_skip_mirrored"]
        # the step was skipped on every replica alike (no replica applied the NaN), the run went
        # on, and it equals the single-device run with the same skip
        assert skip_mirrored["history"][nan_step]["skipped"]
        assert ("nonfinite", "head") in kinds(skip_mirrored)
        # the replica whose own gradients were NaN (before the sum) is named; one device: none
        msgs = [f["message"] for f in skip_mirrored["findings"] if f["kind"] == "nonfinite"]
        assert msgs and all("first appeared on replica 1 (local gradients" in m for m in msgs)
        msgs = [f["message"] for f in skip_single["findings"] if f["kind"] == "nonfinite"]
        assert msgs and not any("replica" in m for m in msgs)
        assert_same_run(skip_mirrored, skip_single)
        assert all(np.isfinite(w).all() for w in skip_mirrored["weights"])
        raise_single, raise_mirrored = out[f"{path}_raise_single"], out[f"{path}_raise_mirrored"]
        assert raise_mirrored["error"] and "NaN/Inf gradient" in raise_mirrored["error"]
        assert f"step {nan_step}" in raise_mirrored["error"]
        assert "replica 1" in raise_mirrored["error"]
        assert [h["step"] for h in raise_mirrored["history"]] == list(range(nan_step + 1))
        assert kinds(raise_mirrored) == kinds(raise_single)
        assert raise_mirrored["agree"]
    # Keras stops after the batch that raised: both runs took the same optimizer steps
    assert out["fit_raise_mirrored"]["iterations"] == out["fit_raise_single"]["iterations"] == 2


def test_unsupported_strategies_get_graddiags_message_naming_the_strategy(tmp_path):
    out = run_case("unsupported", tmp_path)
    for case in ("fit", "model", "replica"):
        message = out[case]
        assert message is not None and not message.startswith("OTHER"), (case, message)
        assert "CentralStorageStrategy is not supported by graddiag" in message
        assert "MirroredStrategy" in message
    assert out["fit"].startswith("GradDiagCallback")
    assert out["replica"].startswith("graddiag.tf.GradientMonitor")
    assert "MultiWorkerMirroredStrategy is not supported" in out["multi_worker"]
    assert "`accumulators` are not supported under tf.distribute" in out["accumulators"]
