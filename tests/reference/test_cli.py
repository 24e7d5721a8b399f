"""`graddiag validate` as a typer command: exit codes 0 / 1 / 2 and its output."""

from __future__ import annotations

import json
import textwrap

import pytest

typer = pytest.importorskip("typer")
pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from graddiag.cli import app  # noqa: E402  - `graddiag validate` on the real console app
from graddiag.reference.cli import load_factory  # noqa: E402

FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn


    class WrongSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * g * x


    class Model(nn.Module):
        def __init__(self, fn=None):
            super().__init__()
            self.fn, self.a, self.b = fn, nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(self.fn.apply(h) if self.fn else torch.tanh(h))


    def batch():
        torch.manual_seed(0)
        return torch.randn(5, 4), torch.randint(0, 3, (5,))


    def good():
        x, y = batch()
        return Model(), x, y, nn.CrossEntropyLoss()


    def bad():
        x, y = batch()
        return Model(WrongSquare), x, y, nn.CrossEntropyLoss()


    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)


    def unsupported():
        x, y = batch()
        return nn.Sequential(nn.Linear(4, 3), Cumulative()), x, y, nn.CrossEntropyLoss()


    def wrong_arity():
        return Model(), None


    def raises():
        raise RuntimeError("no data")
""")


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


def invoke(*args):
    return CliRunner().invoke(app, ["validate", *map(str, args)])


def test_agreeing_model_exits_0_with_a_table(factory_file):
    result = invoke(f"{factory_file}:good")
    assert result.exit_code == 0, result.output
    assert "all gradients agree" in result.output
    assert "a" in result.output and "ok" in result.output


def test_wrong_custom_backward_exits_1_and_names_it(factory_file):
    result = invoke(f"{factory_file}:bad")
    assert result.exit_code == 1, result.output
    assert "WrongSquare" in result.output and "MISMATCH" in result.output


def test_json_output_is_machine_readable(factory_file):
    result = invoke(f"{factory_file}:bad", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["ok"] is False
    assert {f["kind"] for f in data["findings"]} == {"validation"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "module:function or file.py:function, got 'no_colon_here'"),
        ("missing/file.py:good", "file 'missing/file.py' does not exist"),
        ("graddiag_no_such_module:good", "cannot import FACTORY module 'graddiag_no_such_module'"),
        ("{factory}:nothing", "has no callable 'nothing'"),
        ("{factory}:wrong_arity", "must return (model, inputs, targets, loss), got tuple"),
        ("{factory}:unsupported", "ATen op `cumsum` is not supported"),
        ("{factory}:raises", "raised RuntimeError: no data"),
    ],
)
def test_usage_and_input_errors_exit_2_with_one_line(factory_file, spec, message):
    result = invoke(spec.format(factory=factory_file))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_format_exits_2(factory_file):
    result = invoke(f"{factory_file}:good", "--format", "xml")
    assert (
        result.exit_code == 2 and "--format must be 'table' or 'json', got 'xml'" in result.output
    )


@pytest.mark.parametrize("top", [0, -3])
def test_top_below_1_exits_2_naming_it(factory_file, top):
    result = invoke(f"{factory_file}:good", "--top", top)
    assert result.exit_code == 2 and f"--top must be >= 1, got {top}" in result.output


def test_top_keeps_the_worst_layers_and_says_how_many_were_left_out(factory_file):
    # "bad": a wrong backward between layers a and b; only a (upstream) is out of tolerance
    result = invoke(f"{factory_file}:bad", "--top", 1)
    assert result.exit_code == 1, result.output
    assert "the 1 worst of 2 layers; --top to show more" in result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ ")]
    assert rows[0].split("│")[1].strip() == "a" and "MISMATCH" in rows[0]
    assert not any(row.split("│")[1].strip() == "b" for row in rows)
    full = invoke(f"{factory_file}:bad")
    assert any(line.startswith("│ b ") for line in full.output.splitlines())


def test_load_factory_accepts_module_paths():
    assert load_factory("graddiag.reference.functional:relu").__name__ == "relu"
