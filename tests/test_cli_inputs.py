"""Every CLI command given a bad path (missing, a file where a directory is needed, a FIFO, a
directory where a file is written, an empty step range, a shredded log) exits 2 with one line
naming the path and the problem."""

from __future__ import annotations

import os

import numpy as np
import pytest
from typer.testing import CliRunner

from graddiag.cli import app
from graddiag.monitor import MonitorCore
from graddiag.stats import ModelInfo, StepStats

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    core = MonitorCore(ModelInfo(layers=("a",), param_counts=(1,)), d, close_at_exit=False)
    for s in range(20):
        core.process(
            StepStats(
                step=s,
                grad_norm=np.ones(1),
                has_grad=np.ones(1, bool),
                nonfinite=np.zeros(1, np.int64),
                global_norm=1.0,
            )
        )
    core.close()
    return str(d)


@pytest.fixture
def bad(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a log\n")
    fifo = tmp_path / "a_fifo"
    os.mkfifo(fifo)
    return {"missing": str(tmp_path / "nope"), "file": str(file), "fifo": str(fifo)}


def _one_line(args, needle) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, (args, r.output, r.exception)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("graddiag: error: ") and needle in lines[0], lines[0]
    return lines[0]


COMMANDS = {
    "analyze": lambda p, tmp, good: ["analyze", p],
    "plot": lambda p, tmp, good: ["plot", p, "-o", tmp / "x.png"],
    "export": lambda p, tmp, good: ["export", p, "-o", tmp / "x.csv"],
    "compare-a": lambda p, tmp, good: ["compare", p, good],
    "compare-b": lambda p, tmp, good: ["compare", good, p],
}


@pytest.mark.parametrize("kind", ["missing", "file", "fifo"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_input_path_is_exit_2_with_one_line(command, kind, bad, good, tmp_path):
    path = bad[kind]
    _one_line(COMMANDS[command](path, tmp_path, good), path)


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_demo_into_a_file_is_exit_2_with_one_line(kind, bad):
    pytest.importorskip("torch")
    r = runner.invoke(app, ["demo", "--logdir", bad[kind]])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("graddiag: error")]
    assert len(err) == 1 and bad[kind] in err[0] and "Traceback" not in r.output


@pytest.mark.parametrize(
    "args",
    [
        lambda good, tmp: ["analyze", good, "-o", tmp / "nodir" / "r.txt"],
        lambda good, tmp: ["analyze", good, "-f", "json", "-o", tmp],
        lambda good, tmp: ["export", good, "-o", tmp / "nodir" / "x.csv"],
        lambda good, tmp: ["plot", good, "-o", tmp / "nodir" / "x.png"],
    ],
    ids=["table-output-missing-dir", "json-output-is-a-dir", "export-missing-dir", "plot"],
)
def test_bad_output_path_is_exit_2(args, good, tmp_path):
    _one_line(args(good, tmp_path), str(tmp_path))


def test_step_range_past_the_logs_says_so(good):
    msg = _one_line(["analyze", good, "--steps", "1000:2000"], good)
    assert "no logged steps in --steps 1000:2000" in msg and "steps 0 to 19" in msg


def test_shredded_log_names_the_corrupt_bytes(tmp_path):
    path = tmp_path / "events.out.tfevents.1.x"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    msg = _one_line(["analyze", tmp_path], str(tmp_path))
    assert "no intact events" in msg and "corrupt record" in msg
