"""Each example runs as a script and prints its findings and its log directory."""

import os
import subprocess
import sys

import pytest
from conftest import EXAMPLES

pytest.importorskip("torch")

EXPECTED = {
    "healthy.py": "no findings",
    "vanishing.py": "vanishing",
    "nan_layer.py": "nonfinite",
    "frozen_detached.py": "detached",
    "forgot_zero_grad.py": "accumulation",
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_script_runs(script, tmp_path):
    logdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=EXAMPLES,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert EXPECTED[script] in out.stdout
    assert f"TensorBoard logs: {logdir}" in out.stdout
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(logdir))
