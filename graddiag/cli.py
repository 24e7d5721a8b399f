"""The ``graddiag`` command line: analyze, plot, compare and export TensorBoard gradient logs.

Exit status: 0 ok; 1 findings at or above ``--fail-on``; 2 usage or input error (one line on stderr
naming the path and the problem).

Start-up is kept short: nothing heavy is imported at module level; ``analyze`` never imports pandas,
matplotlib, torch or tensorflow (``--format html`` imports matplotlib for the plots).
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from graddiag.analysis import Report

app = typer.Typer(
    name="graddiag",
    help="Diagnose neural-network gradients from TensorBoard logs.",
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
    typer.echo(f"graddiag: error: {message}", err=True)
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
    from rich.markup import escape
    from rich.table import Table

    fh = open(output, "w", encoding="utf-8") if output else None  # noqa: SIM115 - closed below
    try:
        console = Console(file=fh or sys.stdout, width=160 if fh else None)
        style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        rs = report.read_stats
        for r in report.runs:
            d = r.to_dict()
            from graddiag.analysis import _summary_line

            console.rule(f"run {escape(r.run)}  [dim]({escape(r.path)}, {d['source']})[/dim]")
            console.print(escape(_summary_line(d)))
            t = Table(title="findings", show_lines=False, expand=False)
            for col, kw in (
                ("step", {"justify": "right"}),
                ("severity", {}),
                ("kind", {}),
                ("layer", {"overflow": "fold"}),
                ("message", {"ratio": 1}),
            ):
                t.add_column(col, **kw)
            for f in r.findings:
                t.add_row(
                    str(f.step),
                    f"[{style[f.severity]}]{f.severity}[/]",
                    f.kind,
                    escape(f.layer or "(model)"),
                    escape(f.message),
                )
            if r.findings:
                console.print(t)
                console.print("[bold]suggestions[/bold]")
                for kind, text in dict.fromkeys((f.kind, f.suggestion) for f in r.findings):
                    console.print(f"  [bold]{escape(kind)}[/bold]: {escape(text)}")
            else:
                console.print("[green]no findings[/green]")
            w = Table(title="worst layers")
            w.add_column("layer", overflow="fold", ratio=1)
            for col in ("findings", "worst", "kinds", "median norm", "max norm", "NaN/Inf steps"):
                w.add_column(col)
            for row in d["worst_layers"]:
                w.add_row(
                    escape(row["layer"]),
                    str(row["findings"]),
                    row["max_severity"] or "",
                    ", ".join(row["kinds"]),
                    _fmt(row["median_grad_norm"]),
                    _fmt(row["max_grad_norm"]),
                    str(row["nonfinite_steps"]),
                )
            console.print(w)
            for note in r.notes:
                console.print(f"[dim]note: {escape(note)}[/dim]")
        for note in report.notes:
            console.print(f"[dim]note: {escape(note)}[/dim]")
        if rs.corrupt_records or rs.truncated_files or rs.unreadable_files:
            console.print(
                f"[yellow]read: skipped {rs.corrupt_records} corrupt record(s), "
                f"{len(rs.truncated_files)} truncated file tail(s), "
                f"{len(rs.unreadable_files)} unreadable file(s)[/yellow]"
            )
    finally:
        if fh is not None:
            fh.close()


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


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
    from graddiag.analysis import plot_run

    if not output.lower().endswith(".png"):
        raise _fail(f"{output}: --output must be a .png file")
    report = _guard(lambda: _analyze(logdir, run=run or None, steps=steps, tag_pattern=tag_pattern))
    root, ext = os.path.splitext(output)
    for r in report.runs:
        path = output if len(report.runs) == 1 else f"{root}-{_safe(r.run)}{ext}"
        _guard(lambda r=r, path=path: plot_run(r, path, width=width, dpi=dpi))
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
) -> None:
    """Compare two runs: per-layer norm ratios, first step of divergence, findings in one only."""
    result = _guard(lambda: compare_runs(run_a, run_b, rtol=rtol, tag_pattern=tag_pattern))
    if format is CompareFormat.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console()
    div = result["divergence"]
    c.print(
        f"A: {escape(run_a)}  ({result['a']['steps']} steps)\n"
        f"B: {escape(run_b)}  ({result['b']['steps']} steps)\n"
        f"common steps: {result['common_steps']}, common layers: {result['common_layers']}"
    )
    if div is None:
        c.print(f"[green]no divergence beyond rtol={rtol:g} on common steps[/green]")
    else:
        c.print(
            f"[yellow]first divergence at step {div['step']} in "
            f"{escape(div['layer'] or '(global norm)')}: {_fmt(div['a'])} vs "
            f"{_fmt(div['b'])}[/yellow]"
        )
    t = Table(title="per-layer median gradient norm (B / A)")
    for col in ("layer", "A", "B", "B/A"):
        t.add_column(col)
    for row in result["layers"][:20]:
        t.add_row(escape(row["layer"]), _fmt(row["a"]), _fmt(row["b"]), _fmt(row["ratio"]))
    c.print(t)
    for side in ("a", "b"):
        only = result[f"only_{side}"]
        if only:
            c.print(
                f"findings only in {side.upper()}: "
                + ", ".join(escape(f"{f['kind']}@{f['layer'] or '(model)'}") for f in only)
            )


def compare_runs(a: str, b: str, *, rtol: float = 1e-3, tag_pattern: str | None = None) -> dict:
    """The data behind ``graddiag compare`` (JSON-ready).

    Returns:
        ``{"a": {...}, "b": {...}, "common_steps", "common_layers", "divergence": {"step", "layer",
        "a", "b"} | None, "layers": [{"layer", "a", "b", "ratio"}] (sorted by |log ratio|,
        descending), "only_a": [finding key], "only_b": [finding key]}`` where a finding key is
        ``{"kind", "layer", "severity"}``.

    Raises:
        LogReadError: if either path holds no gradient logs or more than one run.
    """
    import numpy as np

    from graddiag.analysis import analyze as _analyze
    from graddiag.reader import LogReadError

    reports = []
    for path in (a, b):
        rep = _analyze(path, tag_pattern=tag_pattern)
        if len(rep.runs) != 1:
            names = ", ".join(r.run for r in rep.runs)
            raise LogReadError(
                f"{path}: holds {len(rep.runs)} runs ({names}); point at one run directory"
            )
        reports.append(rep.runs[0])
    ra, rb = reports
    sa, sb = ra.series, rb.series
    steps, ia, ib = np.intersect1d(sa.steps, sb.steps, return_indices=True)
    layers = [n for n in sa.layers if n in set(sb.layers)]
    ja = [sa.layers.index(n) for n in layers]
    jb = [sb.layers.index(n) for n in layers]
    divergence = None
    ga, gb = sa.global_norm()[ia], sb.global_norm()[ib]
    xa, xb = sa.grad_norm[np.ix_(ia, ja)], sb.grad_norm[np.ix_(ib, jb)]
    with np.errstate(all="ignore"):

        def differs(x, y):
            scale = np.maximum(np.abs(x), np.abs(y))
            nan_mismatch = np.isnan(x) != np.isnan(y)
            return nan_mismatch | (np.abs(x - y) > rtol * np.where(scale > 0, scale, 1.0))

        dl = differs(xa, xb) if len(layers) else np.zeros((len(steps), 0), bool)
        dg = differs(ga, gb)
    rows = np.flatnonzero(dl.any(axis=1) | dg)
    if len(rows):
        i = int(rows[0])
        if dl[i].any():
            j = int(np.argmax(dl[i]))
            divergence = {
                "step": int(steps[i]),
                "layer": layers[j],
                "a": _num(xa[i, j]),
                "b": _num(xb[i, j]),
            }
        else:
            divergence = {"step": int(steps[i]), "layer": None, "a": _num(ga[i]), "b": _num(gb[i])}

    def medians(s, js):
        x = np.where(s.has_grad & np.isfinite(s.grad_norm), s.grad_norm, np.nan)[:, js]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(x, axis=0) if len(x) else np.full(len(js), np.nan)

    ma, mb = medians(sa, ja), medians(sb, jb)
    table = []
    for n, x, y in zip(layers, ma, mb, strict=True):
        ratio = y / x if x > 0 and np.isfinite(x) and np.isfinite(y) else float("nan")
        table.append({"layer": n, "a": _num(x), "b": _num(y), "ratio": _num(ratio)})
    table.sort(key=lambda r: -abs(np.log(r["ratio"])) if r["ratio"] else 0.0)

    def keys(r):
        return {(f.kind, f.layer, f.severity) for f in r.findings}

    ka, kb = keys(ra), keys(rb)

    def as_list(ks):
        return [
            {"kind": k, "layer": n, "severity": s}
            for k, n, s in sorted(ks, key=lambda t: (t[0], t[1] or "", t[2]))
        ]

    return {
        "a": {
            "path": a,
            "steps": int(len(sa.steps)),
            "layers": len(sa.layers),
            "findings": len(ra.findings),
        },
        "b": {
            "path": b,
            "steps": int(len(sb.steps)),
            "layers": len(sb.layers),
            "findings": len(rb.findings),
        },
        "common_steps": int(len(steps)),
        "common_layers": len(layers),
        "divergence": divergence,
        "layers": table,
        "only_a": as_list(ka - kb),
        "only_b": as_list(kb - ka),
    }


def _num(x) -> float | None:
    import math

    x = float(x)
    return x if math.isfinite(x) else None


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
        run_demo(run_dir)
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
    typer.echo(f"\nTensorBoard: tensorboard --logdir {run_dir}")


def _register_validate() -> None:
    from graddiag.reference.cli import validate_command

    app.command("validate")(validate_command)


_register_validate()


def main() -> None:
    """Console-script entry point (``graddiag``)."""
    app()


if __name__ == "__main__":
    main()
