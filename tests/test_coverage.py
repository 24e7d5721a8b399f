"""A report whose per-layer data covers only part of the run says so (no unqualified all-clear)."""

import json

import pytest
from typer.testing import CliRunner

from graddiag.analysis import analyze
from graddiag.cli import app

torch = pytest.importorskip("torch")
pytest.importorskip("tensorboard")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def write(logdir, steps, layer_steps, head_steps=None):
    """`loss` on every step, `grad_norm/<param>` only on `layer_steps` (head: `head_steps`)."""
    w = SummaryWriter(logdir)
    for s in range(steps):
        w.add_scalar("loss", 1.0 / (s + 1), s)
        if s in layer_steps:
            w.add_scalar("grad_norm/body.weight", 0.5, s)
            if head_steps is None or s in head_steps:
                w.add_scalar("grad_norm/head.weight", 0.4, s)
    w.close()


def test_layer_data_on_the_first_steps_only_is_noted(tmp_path):
    d = str(tmp_path)
    write(d, 1000, range(100))
    (run,) = analyze(d).runs
    doc = run.to_dict()
    assert doc["coverage"]["layer_steps"] == 100 and doc["coverage"]["logged_steps"] == 1000
    assert doc["coverage"]["partial"] is True
    assert any("per-layer gradients cover 100 of 1000 logged steps (0-99)" in n for n in run.notes)
    out = CliRunner().invoke(app, ["analyze", d]).output
    assert "per-layer gradients cover 100 of 1000" in out
    assert "\nno findings\n" not in out and "partial coverage" in out
    md = CliRunner().invoke(app, ["analyze", d, "--format", "markdown"]).output
    assert "partial coverage" in md and "per-layer gradients on 100 of 1000" in md
    js = json.loads(CliRunner().invoke(app, ["analyze", d, "--format", "json"]).output)
    assert js["runs"][0]["coverage"]["partial"] is True


def test_layer_data_every_100th_step_is_noted_with_its_stride(tmp_path):
    d = str(tmp_path)
    write(d, 1000, range(0, 1000, 100))
    (run,) = analyze(d).runs
    assert any("cover 10 of 1000 logged steps (0-900, every 100 steps)" in n for n in run.notes), (
        run.notes
    )


def test_layers_with_data_on_some_steps_only_are_named(tmp_path):
    d = str(tmp_path)
    write(d, 50, range(50), head_steps=range(10))
    (run,) = analyze(d).runs
    assert run.coverage.partial_layers == {"head": 10}
    assert any("head (10 of 50 steps)" in n for n in run.notes)


def test_full_coverage_has_no_note(tmp_path):
    d = str(tmp_path)
    write(d, 50, range(50))
    (run,) = analyze(d).runs
    assert not run.coverage.partial and run.notes == []
    assert "\nno findings\n" in CliRunner().invoke(app, ["analyze", d]).output
