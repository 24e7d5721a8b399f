"""Renderers (`graddiag.analysis.render`): names from a log never emit control codes."""

import csv
import io
import re

import pytest
from test_reader import make_run
from typer.testing import CliRunner

from graddiag.analysis import analyze
from graddiag.analysis.render import FORMATS, escape
from graddiag.cli import app

CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home
OSC = "\x1b]0;pwned\x07"  # retitle the terminal window
CSI_C1 = "\x9b31m"  # one-byte CSI (C1 control)
BIDI = "\u202eevil"  # right-to-left override
IMG = "<img src=x onerror=alert(1)>"
# the NaN lands in layer 1 and layer 2 never gets a gradient: both names appear in findings
NAMES = ("ok", f"blocks.{CLEAR}.fc{OSC}", f"{IMG}{CSI_C1}{BIDI}", "tail")
# a control character other than a newline (tables and CSV have newlines)
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A log directory whose run name, layer names (so tags) and frozen parameter are hostile."""
    root = tmp_path_factory.mktemp("hostile")
    for run, seed in ((f"run{CLEAR}{CSI_C1}a", 0), ("b", 1)):
        make_run(
            str(root / run),
            steps=20,
            nan_at=5,
            names=NAMES,
            zero_layer=2,
            seed=seed,
            frozen=(f"{CLEAR}.weight",),
        )
    return root


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, r.stdout + r.stderr


def test_escape_makes_controls_visible_in_every_format():
    for fmt in FORMATS:
        out = escape(f"a{CLEAR}{OSC}{CSI_C1}{BIDI}\n\tz", fmt)
        assert not CONTROL.search(out) and "\n" not in out
        assert "x1b[2J" in out and "x9b" in out and "u202e" in out


def test_escape_quotes_per_format():
    assert escape("a|b<c>", "markdown") == "a\\|b&lt;c&gt;"
    assert escape(IMG, "html") == "&lt;img src=x onerror=alert(1)&gt;"
    assert escape("[bold]x[/bold]", "rich") == "\\[bold]x\\[/bold]"
    assert escape("plain.name_0", "text") == "plain.name_0"


def test_escape_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="fmt"):
        escape("x", "latex")


def test_the_log_really_holds_the_hostile_names(hostile):
    report = analyze(hostile)
    findings = report.findings
    assert {f.layer for f in findings} >= {NAMES[1], NAMES[2]}
    assert any(CLEAR in r.run for r in report.runs)


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv"])
def test_analyze_output_has_no_control_bytes(hostile, fmt):
    r, out = cli("analyze", hostile, "-f", fmt)
    assert r.exit_code == 0, out
    assert not CONTROL.search(out), repr(CONTROL.search(out))
    assert "x1b[2J" in out  # the name stays visible, escaped


def test_csv_keeps_one_row_per_finding_with_the_escaped_layer(hostile):
    report = analyze(hostile)
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert len(rows) == len(report.findings)
    assert "blocks.\\x1b[2J\\x1b[H.fc\\x1b]0;pwned\\x07" in {row["layer"] for row in rows}


def test_html_escapes_the_names(hostile):
    page = analyze(hostile).to_html(plots=False)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert not CONTROL.search(page)


def test_compare_output_has_no_control_bytes(hostile):
    a, b = hostile / f"run{CLEAR}{CSI_C1}a", hostile / "b"
    for fmt in ("table", "json"):
        r, out = cli("compare", a, b, "-f", fmt)
        assert r.exit_code == 0, out
        assert not CONTROL.search(out), (fmt, repr(CONTROL.search(out)))
    r, out = cli("compare", a, b)
    assert "x1b[2J" in out


def test_error_naming_a_hostile_run_has_no_control_bytes(hostile):
    r, out = cli("analyze", hostile, "--run", "missing")
    assert r.exit_code == 2 and "missing" in out
    assert not CONTROL.search(out) and "x9b" in out  # click strips ESC sequences, not C1


def test_plot_draws_names_that_look_like_mathtext(tmp_path):
    from test_analysis import png_size

    from graddiag.analysis import plot_run

    make_run(str(tmp_path / "r$x$"), steps=8, names=("a$\\frac{$b", "x", f"{CLEAR}$", "z"))
    (run,) = analyze(tmp_path).runs
    assert png_size(plot_run(run, width=6, dpi=40))[0] > 0
    assert escape("a$b", "matplotlib") == "a\\$b"


def test_csv_text_cannot_run_as_a_spreadsheet_formula():
    from graddiag.analysis.render import _csv_cell

    assert _csv_cell('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert _csv_cell("@SUM(A1)") == "'@SUM(A1)" and _csv_cell("+1") == "'+1"
    assert _csv_cell(-3.5) == "-3.5" and _csv_cell(12) == "12" and _csv_cell(None) == ""
    assert _csv_cell("blocks.0") == "blocks.0"
