"""`graddiag validate FACTORY`: check a user's model gradients against the reference engine.

`validate_command` is a typer command function; the main CLI registers it with
``app.command("validate")(validate_command)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


def _fail(message: str) -> typer.Exit:
    typer.echo(f"graddiag validate: error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def load_factory(spec: str) -> Any:
    """Resolve ``module:function`` or ``path/to/file.py:function`` to the function.

    Raises:
        ValueError: naming `spec` when it is malformed, missing, or not callable.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(
            f"FACTORY must look like module:function or file.py:function, got {spec!r}"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"FACTORY file {target!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"cannot import FACTORY module {target!r}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"FACTORY {spec!r}: {target} has no callable {name!r}")
    return fn


def _table(report: Any, limit: int = 30) -> Table:
    table = Table(
        title=f"gradient agreement with the reference engine ({report.framework}, {report.dtype})"
    )
    for col in (
        "layer",
        "max abs err",
        "max rel err",
        f"tol ({report.dtype})",
        "rel err vs float64",
        "status",
    ):
        table.add_column(col, justify="left" if col == "layer" else "right")
    ranked = sorted(report.layers, key=lambda a: a.badness, reverse=True)  # worst first
    for a in ranked[:limit]:
        f64 = "n/a" if a.max_rel_err_f64 is None else f"{a.max_rel_err_f64:.2e}"
        status = "[green]ok[/green]" if a.ok else "[red]MISMATCH[/red]"
        table.add_row(
            a.layer,
            f"{a.max_abs_err:.2e}",
            f"{a.max_rel_err:.2e}",
            f"{a.tolerance:.0e}",
            f64,
            status,
        )
    for c in report.custom_ops:
        status = "[green]ok[/green]" if c.ok else "[red]MISMATCH[/red]"
        table.add_row(c.name, "", f"{c.rel_err:.2e}", "1e-05", "(finite differences)", status)
    if len(ranked) > limit:
        table.caption = f"the {limit} worst of {len(ranked)} layers; --top to show more"
    return table


def validate_command(
    factory: str = typer.Argument(
        ...,
        help="module:function or path/to/file.py:function returning "
        "(model, inputs, targets, loss).",
    ),
    output_format: str = typer.Option("table", "--format", help="table or json."),
    rtol: float | None = typer.Option(None, help="Relative tolerance for the model's dtype."),
    training: bool = typer.Option(False, help="Keras: batch norm in training mode."),
    step: int = typer.Option(0, help="Step number written into the findings."),
    top: int = typer.Option(30, help="Show the TOP worst layers (table format)."),
) -> None:
    """Re-run a model's forward and backward in float64 in the reference engine and compare
    every layer's gradients with the framework's. Exit 0 if they agree, 1 on a mismatch,
    2 on a usage or input error."""
    from graddiag.reference.importers.torch_fx import UnsupportedOpError
    from graddiag.reference.validate import validate

    if output_format not in ("table", "json"):
        raise _fail(f"--format must be 'table' or 'json', got {output_format!r}")
    if top < 1:
        raise _fail(f"--top must be >= 1, got {top}")
    try:
        fn = load_factory(factory)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        made = fn()
    except Exception as exc:  # the user's code: any failure is an input error, in one line
        raise _fail(f"FACTORY {factory!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(made, tuple | list) or len(made) != 4:
        raise _fail(
            f"FACTORY {factory!r} must return (model, inputs, targets, loss), got "
            f"{type(made).__name__}"
        )
    model, inputs, targets, loss = made
    try:
        report = validate(model, inputs, loss, targets, step=step, rtol=rtol, training=training)
    except (TypeError, ValueError, UnsupportedOpError) as exc:
        raise _fail(f"{factory}: {exc}") from None
    if output_format == "json":
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        console = Console()
        console.print(_table(report, top))
        for note in report.notes:
            console.print(f"note: {note}")
        for finding in report.findings:
            console.print(f"[{'red' if finding.severity == 'error' else 'yellow'}]{finding}")
            console.print(f"  suggestion: {finding.suggestion}")
        console.print(
            "[green]all gradients agree[/green]"
            if report.ok
            else "[red]gradient mismatch found[/red]"
        )
    raise typer.Exit(EXIT_OK if report.ok else EXIT_MISMATCH)
