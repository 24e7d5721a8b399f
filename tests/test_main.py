"""`python -m graddiag` and how the command line reports usage errors."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from graddiag.cli import app


def test_python_m_graddiag_help_exits_0():
    p = subprocess.run(
        [sys.executable, "-m", "graddiag", "--help"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert "analyze" in p.stdout and "compare" in p.stdout


def test_python_m_graddiag_usage_error_is_one_line_on_stderr():
    p = subprocess.run(
        [sys.executable, "-m", "graddiag", "analyze", "--no-such-option"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "--no-such-option" in p.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["analyze", "--bogus"], "No such option: --bogus"),
        (["analyze"], "Missing argument"),
        (["compare", "only_one"], "Missing argument"),
        (["analyze", "x", "--format", "yaml"], "'yaml' is not one of"),
        (["analyze", "x", "--top", "-1"], "--top"),
        (["plot", "x"], "--output"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_error_is_one_line_and_exit_2(args, needle):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("graddiag: error: ") and needle in lines[0]
    assert not any(c in r.output for c in "╭│╰")  # no rich error box


def test_no_arguments_still_shows_the_help():
    r = CliRunner().invoke(app, [])
    assert "analyze" in r.output and "compare" in r.output
