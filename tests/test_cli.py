"""The `graddiag` command line through typer's runner: outputs, exit codes, files."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_analysis import HOSTILE, check_report_shape, png_size
from test_reader import make_run
from typer.testing import CliRunner

from graddiag.cli import app
from graddiag.events import EventFileWriter

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A log directory with a healthy run and a run with a NaN gradient."""
    root = tmp_path_factory.mktemp("logs")
    make_run(str(root / "clean"), steps=30, clip=None, frozen=())
    make_run(str(root / "nan"), steps=30, nan_at=12)
    return root


def test_analyze_table_lists_runs_findings_and_suggestions(logs):
    r = invoke("analyze", logs)
    assert r.exit_code == 0, r.output
    assert "run clean" in r.output and "run nan" in r.output
    text = " ".join(r.output.split())  # rich wraps lines at the terminal width
    assert "nonfinite" in text and "first NaN/Inf at step 12 in blocks.1.fc" in text
    assert "suggestions" in r.output and "worst layers" in r.output


def test_analyze_json_follows_the_contract(logs):
    r = invoke("analyze", logs, "--format", "json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    check_report_shape(doc)
    assert [run["run"] for run in doc["runs"]] == ["clean", "nan"]
    assert doc["runs"][0]["findings"] == []


@pytest.mark.parametrize(
    "run,fail_on,code",
    [
        ("nan", "error", 1),
        ("nan", "warning", 1),
        ("clean", "error", 0),
        ("clean", "info", 0),
    ],
)
def test_fail_on_sets_the_exit_status(logs, run, fail_on, code):
    r = invoke("analyze", logs, "--run", run, "--fail-on", fail_on, "-f", "json")
    assert r.exit_code == code, r.output


def test_steps_range_limits_the_analysis(logs):
    r = invoke("analyze", logs / "nan", "--steps", "0:10", "-f", "json")
    doc = json.loads(r.stdout)
    assert doc["runs"][0]["steps"] == {"count": 10, "first": 0, "last": 9}
    assert doc["runs"][0]["first_nonfinite"] is None


def test_csv_and_markdown_formats(logs, tmp_path):
    r = invoke("analyze", logs, "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {row["kind"] for row in rows} >= {"nonfinite", "clipped"}
    assert set(rows[0]) == {
        "run",
        "step",
        "layer",
        "kind",
        "severity",
        "value",
        "message",
        "suggestion",
    }
    out = tmp_path / "report.md"
    assert invoke("analyze", logs, "-f", "markdown", "-o", out).exit_code == 0
    assert out.read_text().startswith("# graddiag report")


def test_html_report_is_self_contained_and_escaped(tmp_path):
    make_run(str(tmp_path / "run"), steps=15, nan_at=4, names=["a", HOSTILE])
    out = tmp_path / "report.html"
    r = invoke("analyze", tmp_path / "run", "-f", "html", "-o", out)
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert "data:image/png;base64," in page and "src='http" not in page


def one_line_error(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


def test_missing_path_is_exit_2_naming_the_path(tmp_path):
    msg = one_line_error(invoke("analyze", tmp_path / "nope"))
    assert str(tmp_path / "nope") in msg and "no such file" in msg


def test_dir_without_event_files_is_exit_2(tmp_path):
    msg = one_line_error(invoke("analyze", tmp_path))
    assert str(tmp_path) in msg and "no TensorBoard event files" in msg


def test_log_without_gradient_tags_is_exit_2(tmp_path):
    w = EventFileWriter(str(tmp_path))
    w.add_scalar_dict(0, {"train/loss": 1.0})
    w.close()
    msg = one_line_error(invoke("analyze", tmp_path))
    assert "no gradient tags" in msg and "--tag-pattern" in msg


def test_unreadable_file_is_exit_2_naming_it(tmp_path):
    bad = tmp_path / "events.out.tfevents.123.host"
    os.symlink(tmp_path / "gone", bad)  # listed in the directory, but cannot be opened
    msg = one_line_error(invoke("analyze", tmp_path))
    assert str(bad) in msg and "cannot read" in msg


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--steps", "9:3"], "steps"),
        (["--tag-pattern", "("], "tag_pattern"),
        (["--run", "missing"], "missing"),
        (["--format", "yaml"], "yaml"),
    ],
)
def test_bad_arguments_are_exit_2(logs, args, needle):
    r = invoke("analyze", logs, *args)
    assert r.exit_code == 2 and needle in r.output


def test_plot_writes_a_png_of_the_expected_size(logs, tmp_path):
    out = tmp_path / "flow.png"
    r = invoke("plot", logs / "nan", "-o", out, "--width", 8, "--dpi", 40)
    assert r.exit_code == 0, r.output
    assert png_size(out.read_bytes()) == (8 * 40, int((2.5 + 5.5) * 40))


def test_plot_writes_one_file_per_run(logs, tmp_path):
    r = invoke("plot", logs, "-o", tmp_path / "flow.png", "--dpi", 30)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path)) == ["flow-clean.png", "flow-nan.png"]


def test_plot_needs_a_png_name(logs, tmp_path):
    msg = one_line_error(invoke("plot", logs, "-o", tmp_path / "flow.jpg"))
    assert "flow.jpg" in msg


def test_compare_identical_runs_has_no_divergence(logs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(logs / "nan", copy)
    r = invoke("compare", logs / "nan", copy, "-f", "json")
    doc = json.loads(r.stdout)
    assert doc["divergence"] is None and doc["only_a"] == doc["only_b"] == []
    assert all(row["ratio"] == 1.0 for row in doc["layers"])


def test_compare_reports_divergence_and_one_sided_findings(logs):
    r = invoke("compare", logs / "clean", logs / "nan", "-f", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    # both runs draw the same norms (same seed) until the NaN planted at step 12
    assert doc["divergence"]["step"] == 12 and doc["divergence"]["layer"] == "blocks.1.fc"
    assert {f["kind"] for f in doc["only_b"]} >= {"nonfinite", "clipped", "frozen"}
    assert doc["only_a"] == []
    table = invoke("compare", logs / "clean", logs / "nan")
    assert table.exit_code == 0 and "first divergence at step 12" in table.output


def test_compare_needs_single_runs(logs):
    msg = one_line_error(invoke("compare", logs, logs / "nan"))
    assert "holds 2 runs" in msg


def test_export_csv_and_parquet_round_trip(logs, tmp_path):
    pd = pytest.importorskip("pandas")
    from graddiag.reader import read

    ref = read(str(logs))
    out = tmp_path / "all.csv"
    assert invoke("export", logs, "-o", out).exit_code == 0
    back = pd.read_csv(out, keep_default_na=False, na_values={"value": ["NaN", "nan"]})
    assert len(back) == len(ref) and list(back.columns) == list(ref.columns)
    pytest.importorskip("pyarrow")
    pq = tmp_path / "all.parquet"
    assert invoke("export", logs, "-o", pq, "--run", "nan").exit_code == 0
    assert len(pd.read_parquet(pq)) == (ref.run == "nan").sum()


def test_export_rejects_unknown_extension(logs, tmp_path):
    msg = one_line_error(invoke("export", logs, "-o", tmp_path / "x.xlsx"))
    assert "x.xlsx" in msg


def test_demo_without_hook_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "graddiag.demo", None)
    msg = one_line_error(invoke("demo", "--logdir", tmp_path))
    assert "graddiag.demo" in msg


def test_cli_on_a_torch_example_run(tmp_path):
    pytest.importorskip("torch")
    from frozen_detached import run

    run(logdir=str(tmp_path / "run"))
    r = invoke("analyze", tmp_path, "-f", "json", "--fail-on", "warning")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    check_report_shape(doc)
    assert {f["kind"] for f in doc["runs"][0]["findings"]} >= {"frozen", "detached"}


def test_analyze_starts_fast_without_frameworks(logs):
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from graddiag.cli import main\n"
        "sys.argv = ['graddiag', 'analyze', sys.argv[1], '-f', 'json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'tensorflow', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", code, str(logs)], capture_output=True, text=True, env=env
    )
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stderr
    json.loads(p.stdout)
    assert elapsed < 3.0  # generous for loaded CI machines; measured ~0.3 s (docs/cli.md)


@pytest.mark.slow
def test_demo_trains_and_reports(tmp_path):
    pytest.importorskip("torch")
    r = invoke("demo", "--logdir", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "vanishing" in r.output and "detached" in r.output
    # it ends with the exact command that shows the Gradients tab for the runs it wrote
    cmd, url = r.output.strip().splitlines()[-2:]
    exe, rest = cmd.strip().split(" ", 1)
    assert (
        rest == f"--logdir {tmp_path / 'demo'}"
        and url == "then open http://localhost:6006/#graddiag"
    )
    here = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    assert os.path.samefile(shutil.which(exe) or exe, here)  # this install's tensorboard
    from tensorboard.plugins import base_plugin

    from graddiag.tensorboard_plugin.plugin import GradientsPlugin

    runs = GradientsPlugin(base_plugin.TBContext(logdir=str(tmp_path / "demo")))._reports()
    assert len(runs) == 1 and {f.kind for f in runs[0].findings} >= {"vanishing", "detached"}
