"""The ``graddiag`` command line: analyze, plot, compare and export TensorBoard gradient logs.

Exit status: 0 ok; 1 findings at or above ``--fail-on``; 2 usage or input error (one line on stderr
naming the path and the problem).

Start-up is kept short: nothing heavy is imported at module level; ``analyze`` never imports pandas,
matplotlib, torch or tensorflow (``--format html`` imports matplotlib for the plots).

This module only parses arguments and writes output: the analysis is `graddiag.analysis`, the
renderings (which escape every name from the logs) are `graddiag.analysis.render`.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

if TYPE_CHECKING:
    from graddiag.analysis import Report


def _escape(text: str) -> str:
    from graddiag.analysis.render import escape

    return escape(text)


class _Group(TyperGroup):
    """Reports usage errors (unknown option, missing argument, bad value) as one line, exit 2.

    Typer would print them in a multi-line box; scripts and logs read one line better.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `graddiag`: the help, as before
                e.show()
            else:
                ctx = getattr(e, "ctx", None)
                where = ctx.command_path if ctx is not None else "graddiag"
                msg = " ".join(_escape(e.format_message()).split())
                typer.echo(f"graddiag: error: {msg} (see '{where} --help')", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="graddiag",
    help="Diagnose neural-network gradients from TensorBoard logs.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"
    html = "html"


class CompareFormat(str, Enum):
    table = "table"
    json = "json"


class Severity(str, Enum):
    info = "info"
    warning = "warning"
    error = "error"


class InputError(Exception):
    """An input problem reported as one line and exit status 2."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"graddiag: error: {_escape(message)}", err=True)
    return typer.Exit(2)


def _guard(fn):
    """Run `fn`, turning input errors into exit status 2 with a one-line message."""
    from graddiag.reader import LogReadError

    try:
        return fn()
    except (LogReadError, InputError) as e:
        raise _fail(str(e)) from None
    except OSError as e:
        where = e.filename or ""
        raise _fail(f"{where}: {e.strerror or e}" if where else str(e)) from None


RunOpt = Annotated[
    list[str] | None,
    typer.Option("--run", help="Only this run (repeatable); names as listed by analyze."),
]
StepsOpt = Annotated[
    str | None,
    typer.Option("--steps", help="Only steps A:B (A included, B excluded; ends optional)."),
]
PatternOpt = Annotated[
    str | None,
    typer.Option(
        "--tag-pattern",
        help="Regex mapping foreign tags, with a group (?P<layer>...) and optionally (?P<stat>...).",
    ),
]
LogdirArg = Annotated[
    str, typer.Argument(help="TensorBoard log directory (runs are found in subdirectories).")
]


@app.command()
def analyze(
    logdir: LogdirArg,
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    fail_on: Annotated[
        Severity | None,
        typer.Option(
            "--fail-on", help="Exit with status 1 if a finding has this severity or worse."
        ),
    ] = None,
    run: RunOpt = None,
    steps: StepsOpt = None,
    tag_pattern: PatternOpt = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Worst layers to list per run.")] = 5,
) -> None:
    """Run graddiag's detectors over the logged gradients and report the findings."""
    from graddiag.analysis import analyze as _analyze
    from graddiag.findings import severity_rank

    report = _guard(
        lambda: _analyze(logdir, run=run or None, steps=steps, tag_pattern=tag_pattern, top=top)
    )
    if format is Format.table:
        _print_table(report, output)
    else:
        text = {
            Format.json: lambda: json.dumps(report.to_dict(), indent=2) + "\n",
            Format.csv: report.to_csv,
            Format.markdown: lambda: report.to_markdown() + "\n",
            Format.html: report.to_html,
        }[format]()
        _guard(lambda: _write(text, output))
    if fail_on is not None:
        limit = severity_rank(fail_on.value)
        if any(severity_rank(f.severity) >= limit for f in report.findings):
            raise typer.Exit(1)


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)


def _print_table(report: Report, output: str | None) -> None:
    from rich.console import Console

    from graddiag.analysis.render import print_report

    fh = _guard(lambda: open(output, "w", encoding="utf-8")) if output else None  # noqa: SIM115
    try:
        print_report(report, Console(file=fh or sys.stdout, width=160 if fh else None))
    finally:
        if fh is not None:
            fh.close()


@app.command()
def plot(
    logdir: LogdirArg,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="PNG file to write (FILE-<run>.png per run when there are several).",
        ),
    ],
    run: RunOpt = None,
    steps: StepsOpt = None,
    tag_pattern: PatternOpt = None,
    width: Annotated[float, typer.Option("--width", min=4.0, help="Width in inches.")] = 12.0,
    dpi: Annotated[int, typer.Option("--dpi", min=30, help="Resolution.")] = 100,
) -> None:
    """Gradient-flow heatmap (layers x steps, log10 norm, findings marked), global norm and
    clip coefficient over time."""
    from graddiag.analysis import analyze as _analyze
    from graddiag.analysis.plotting import plot_runs

    if not output.lower().endswith(".png"):
        raise _fail(f"{output}: --output must be a .png file")
    report = _guard(lambda: _analyze(logdir, run=run or None, steps=steps, tag_pattern=tag_pattern))
    root, ext = os.path.splitext(output)
    one = len(report.runs) == 1
    paths = [output if one else f"{root}-{_safe(r.run)}{ext}" for r in report.runs]
    _guard(lambda: plot_runs(report.runs, paths, width=width, dpi=dpi))  # one colour scale
    for path in paths:
        typer.echo(path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "root"


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="First run directory (or a logdir of one run).")],
    run_b: Annotated[str, typer.Argument(help="Second run directory.")],
    format: Annotated[CompareFormat, typer.Option("--format", "-f")] = CompareFormat.table,
    rtol: Annotated[
        float,
        typer.Option(
            "--rtol", min=0.0, help="Relative difference of a norm that counts as divergence."
        ),
    ] = 1e-3,
    tag_pattern: PatternOpt = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot", help="Also draw both runs side by side, on one colour scale, to this PNG."
        ),
    ] = None,
) -> None:
    """Compare two runs: per-layer norm ratios, first step of divergence, findings in one only."""
    from graddiag.analysis.compare import compare_runs, plot_compared

    if plot is not None and not plot.lower().endswith(".png"):
        raise _fail(f"{plot}: --plot must be a .png file")
    result = _guard(lambda: compare_runs(run_a, run_b, rtol=rtol, tag_pattern=tag_pattern))
    if plot is not None:
        _guard(lambda: plot_compared(run_a, run_b, plot, tag_pattern=tag_pattern))
    if format is CompareFormat.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from rich.console import Console

    from graddiag.analysis.render import print_comparison

    print_comparison(result, Console(), rtol)


@app.command()
def export(
    logdir: LogdirArg,
    output: Annotated[str, typer.Option("--output", "-o", help="FILE.csv or FILE.parquet.")],
    run: RunOpt = None,
    steps: StepsOpt = None,
    tag_pattern: PatternOpt = None,
) -> None:
    """Write every scalar (long format: run, step, wall_time, layer, stat, value) to CSV/Parquet."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".csv", ".parquet"):
        raise _fail(f"{output}: --output must end in .csv or .parquet")
    from graddiag.reader import read

    df = _guard(lambda: read(logdir, run=run or None, steps=steps, tag_pattern=tag_pattern))
    if not len(df):
        rs = df.attrs["read_stats"]
        why = (
            f" (skipped {rs['corrupt_records']} corrupt record(s))" if rs["corrupt_records"] else ""
        )
        raise _fail(f"{logdir}: no scalars to export{why}")
    if ext == ".csv":
        _guard(lambda: df.to_csv(output, index=False))
    else:
        try:
            _guard(lambda: df.to_parquet(output, index=False))
        except ImportError as e:
            raise _fail(f"{output}: writing Parquet needs pyarrow ({e})") from None
    typer.echo(f"{output}: {len(df)} rows")


@app.command()
def demo(
    logdir: Annotated[
        str, typer.Option("--logdir", help="Where the demo writes its TensorBoard logs.")
    ] = "runs/demo",
) -> None:
    """Train a small model with planted gradient problems, then analyze its logs."""
    import logging
    import time

    run_dir = os.path.join(logdir, time.strftime("run-%Y%m%d-%H%M%S"))
    try:
        from graddiag.demo import run_demo

        logging.getLogger("graddiag").setLevel(logging.ERROR)  # the report below lists them all
        typer.echo(f"Training the demo model with graddiag attached; logs: {run_dir}")
        _guard(lambda: run_demo(run_dir))
    except ImportError as e:
        raise _fail(f"graddiag demo needs PyTorch ({e})") from None
    analyze(
        logdir=run_dir,
        format=Format.table,
        fail_on=None,
        run=None,
        steps=None,
        tag_pattern=None,
        output=None,
        top=5,
    )
    from graddiag.demo import tensorboard_hint

    typer.echo("\n" + tensorboard_hint(logdir))


def _register_validate() -> None:
    from graddiag.reference.cli import validate_command

    app.command("validate")(validate_command)


_register_validate()


def main() -> None:
    """Console-script entry point (``graddiag``, ``python -m graddiag``)."""
    app()


def __getattr__(name: str):
    if name == "compare_runs":  # moved to the analysis layer; still importable from here
        from graddiag.analysis.compare import compare_runs

        return compare_runs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
