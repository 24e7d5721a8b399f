"""The examples run, and each finds what it says it finds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name, capsys):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    return capsys.readouterr().out


def test_torch_example(capsys):
    pytest.importorskip("torch")
    out = run_example("validate_torch_model", capsys)
    assert "--- correct model: ok" in out
    assert "--- model with a buggy custom op: MISMATCH" in out and "LeakySquare" in out


def test_keras_example(capsys):
    pytest.importorskip("tensorflow")
    out = run_example("validate_keras_model", capsys)
    assert "--- correct model: ok" in out
    assert "--- model with a wrong custom_gradient: MISMATCH" in out and "ClippedIdentity" in out


@pytest.mark.slow
def test_transformer_example(capsys):
    pytest.importorskip("torch")
    out = run_example("validate_transformer", capsys)
    assert "--- causal LM: ok" in out and "--- 2-layer LSTM: ok" in out
    assert "--- causal LM with a buggy custom op: MISMATCH" in out
    assert "custom op autograd.Function LeakySquare" in out
