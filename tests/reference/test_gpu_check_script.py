"""The GPU check script: skips cleanly without a GPU; its checks, run on CPU stand-ins (torch
CPU tensors as the "GPU" array backend, "cpu" as the torch device), agree with NumPy and
catch the planted bug."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check_reference.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_exits_0_and_says_skipped_or_ok():
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=SCRIPT.parents[1],
        env={"PYTHONPATH": str(SCRIPT.parents[1]), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout or "-> ok" in result.stdout
    assert "MISMATCH" not in result.stdout


def test_without_cuda_nothing_runs_and_it_says_so(monkeypatch, capsys):
    script = load_script()
    monkeypatch.setattr(script, "gpu_backends", dict)
    monkeypatch.setattr(script, "torch_device", lambda: None)
    monkeypatch.setattr(script, "check_engine", lambda b: pytest.fail("engine check ran"))
    assert script.main() == 0
    assert "skipped" in capsys.readouterr().out


def test_engine_checks_on_a_cpu_stand_in(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    script = load_script()
    monkeypatch.setattr(script, "gpu_backends", lambda: {"torch-cpu": torch.from_numpy})
    monkeypatch.setattr(script, "torch_device", lambda: None)
    assert script.main() == 0
    out = capsys.readouterr().out
    for case in ("conv net", "causal attention block", "LSTM"):
        assert f"torch-cpu: {case}: loss rel err" in out


@pytest.mark.slow
def test_validate_checks_on_a_cpu_stand_in(capsys):
    pytest.importorskip("torch")
    script = load_script()
    assert script.validate_models("cpu")
    out = capsys.readouterr().out
    assert out.count("-> ok") == 5
    assert "wrong custom backward: ok=False" in out
