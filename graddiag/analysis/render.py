"""Renderings of a `Report` and of a run comparison: terminal tables (rich), markdown, CSV, HTML.

Layer names, tags, run names and paths come from the logs and the file system, so they can hold
anything, including terminal control sequences (``\\x1b[2J\\x1b[H`` clears a terminal, OSC sequences
retitle it or forge links). Every string a renderer emits goes through `escape`, the one escaping
function: control characters (C0, DEL, C1, bidirectional overrides) become visible escapes
(``\\x1b``), then the format's own quoting applies (rich markup, markdown table cells, HTML).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from graddiag.analysis.report import Report

__all__ = [
    "FORMATS",
    "escape",
    "print_comparison",
    "print_report",
    "summary_line",
    "to_csv",
    "to_html",
    "to_markdown",
]

#: what `escape` can quote for
FORMATS = ("text", "csv", "markdown", "rich", "html", "matplotlib")

# C0 controls (newline and tab included: a name is one line), DEL, C1 controls (U+009B is a one-byte
# CSI) and the bidirectional embeddings/overrides/isolates that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_MARKDOWN = str.maketrans({"\\": "\\\\", "|": "\\|", "<": "&lt;", ">": "&gt;"})


def _visible(m: re.Match) -> str:
    return ascii(m.group())[1:-1]  # '\x1b' -> \x1b, '\n' -> \n, '\u202e' -> \u202e


def escape(text: str, fmt: str = "text") -> str:
    """`text` made safe to emit in format `fmt`.

    Control characters become visible escapes in every format (``"a\\x1bb"`` prints as ``a\\x1bb``),
    so no log can move the cursor, clear the screen or reorder text; then ``rich`` escapes markup,
    ``markdown`` escapes table cells (``|``, ``\\``, ``<``, ``>``), ``html`` escapes HTML
    (quotes included) and ``matplotlib`` escapes ``$`` (a name like ``a$\\frac{$b`` would
    otherwise be parsed as mathtext and fail to draw). ``text`` and ``csv`` need nothing more
    (the csv module quotes fields).

    Args:
        text: any string from a log.
        fmt: one of `FORMATS`.

    Raises:
        ValueError: if `fmt` is not one of `FORMATS`.

    Example:
        >>> escape("blocks.0\\x1b[2J", "markdown")
        'blocks.0\\\\x1b[2J'
    """
    safe = _UNSAFE.sub(_visible, str(text))
    if fmt in ("text", "csv"):
        return safe
    if fmt == "rich":
        from rich.markup import escape as rich_escape

        return rich_escape(safe)
    if fmt == "markdown":
        return safe.translate(_MARKDOWN)
    if fmt == "html":
        return html.escape(safe)
    if fmt == "matplotlib":
        return safe.replace("$", "\\$")
    raise ValueError(f"Expected `fmt` to be one of {FORMATS}, got {fmt!r}")


def number(x: float | None) -> str:
    """A report number for people (3 significant digits; empty when missing)."""
    return "" if x is None else f"{x:.3g}"


def summary_line(d: Mapping[str, Any]) -> str:
    """One sentence on a run (from `RunReport.to_dict()`); not escaped."""
    st = d["steps"]
    nf = d["first_nonfinite"]
    partial = bool(d.get("coverage") and d["coverage"]["partial"])
    nf_text = (
        f"first NaN/Inf at step {nf['step']} in {nf['layer'] or '(model)'}"
        if nf
        else "no NaN/Inf gradients" + (" in the steps with per-layer data" if partial else "")
    )
    clip = "no clipping logged" if d["clip_rate"] is None else f"clip rate {d['clip_rate']:.1%}"
    span = f"steps {st['first']}..{st['last']}" if st["count"] else "no steps"
    cov = ""
    if partial:
        c = d["coverage"]
        cov = (
            f" Partial coverage: per-layer gradients on {c['layer_steps']} of "
            f"{c['logged_steps']} logged steps"
            + (f", {len(c['partial_layers'])} layer(s) on fewer" if c["partial_layers"] else "")
            + " (see notes)."
        )
    return (
        f"{st['count']} logged steps ({span}), {d['layers']} layers, "
        f"{len(d['findings'])} findings; {nf_text}; {clip}.{cov}"
    )


def no_findings_text(d: Mapping[str, Any]) -> str:
    """ "no findings", qualified when the per-layer data covers only part of the run."""
    if d.get("coverage") and d["coverage"]["partial"]:
        return "no findings in the steps with per-layer gradients (partial coverage, see notes)"
    return "no findings"


# ---- report ------------------------------------------------------------------------------------
CSV_COLUMNS = ("run", "step", "layer", "kind", "severity", "value", "message", "suggestion")


def to_csv(report: Report) -> str:
    """One row per finding: ``run, step, layer, kind, severity, value, message, suggestion``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in report.findings_rows():
        w.writerow([_csv_cell(row[k]) for k in CSV_COLUMNS])
    return buf.getvalue()


def _csv_cell(value) -> str:
    """A CSV field: text that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``
    first, as a layer name from a log could be) is prefixed with ``'``; numbers stay numbers."""
    if value is None:
        return ""
    text = escape(value, "csv")
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@"):
        return "'" + text
    return text


def to_markdown(report: Report) -> str:
    """The report as GitHub markdown: per run, a summary, the findings and the worst layers."""

    def e(text: str) -> str:
        return escape(text, "markdown")

    out = [f"# graddiag report: `{e(report.logdir)}`", ""]
    for r in report.runs:
        d = r.to_dict()
        out += [f"## run `{e(r.run)}`", "", e(summary_line(d)), ""]
        out += [
            "| step | severity | kind | layer | message | suggestion |",
            "|---:|---|---|---|---|---|",
        ]
        for f in r.findings:
            out.append(
                f"| {f.step} | {e(f.severity)} | {e(f.kind)} | {e(f.layer or '(model)')} | "
                f"{e(f.message)} | {e(f.suggestion)} |"
            )
        if not r.findings:
            out.append(f"| | | | | {e(no_findings_text(d))} | |")
        out += [
            "",
            "**Worst layers**",
            "",
            "| layer | findings | worst | median norm | max norm |",
            "|---|---:|---|---:|---:|",
        ]
        for w in d["worst_layers"]:
            out.append(
                f"| {e(w['layer'])} | {w['findings']} | {e(w['max_severity'] or '')} | "
                f"{number(w['median_grad_norm'])} | {number(w['max_grad_norm'])} |"
            )
        out.append("")
    return "\n".join(out)


def to_html(report: Report, plots: bool = True) -> str:
    """One self-contained HTML page (plots embedded as base64 PNG); every name is escaped."""

    def e(text: str) -> str:
        return escape(text, "html")

    parts = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>graddiag report: {e(report.logdir)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        ".error{color:#b00}.warning{color:#a60}.info{color:#06a}</style></head><body>",
        f"<h1>graddiag report: <code>{e(report.logdir)}</code></h1>",
    ]
    for r in report.runs:
        d = r.to_dict()
        parts.append(f"<h2>run <code>{e(r.run)}</code></h2><p>{e(summary_line(d))}</p>")
        if plots and len(r.steps):
            from graddiag.analysis.plotting import plot_run

            png = plot_run(r)
            parts.append(
                f"<img alt='gradient flow of run {e(r.run)}' "
                f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            )
        parts.append(
            "<table><tr><th>step</th><th>severity</th><th>kind</th><th>layer</th>"
            "<th>message</th><th>suggestion</th></tr>"
        )
        for f in r.findings:
            parts.append(
                f"<tr class='{e(f.severity)}'><td>{f.step}</td><td>{e(f.severity)}</td>"
                f"<td>{e(f.kind)}</td><td>{e(f.layer or '(model)')}</td>"
                f"<td>{e(f.message)}</td><td>{e(f.suggestion)}</td></tr>"
            )
        parts.append(
            "</table><h3>worst layers</h3><table><tr><th>layer</th><th>findings</th>"
            "<th>worst</th><th>median norm</th><th>max norm</th></tr>"
        )
        for w in d["worst_layers"]:
            parts.append(
                f"<tr><td>{e(w['layer'])}</td><td>{w['findings']}</td>"
                f"<td>{e(w['max_severity'] or '')}</td>"
                f"<td>{number(w['median_grad_norm'])}</td>"
                f"<td>{number(w['max_grad_norm'])}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def print_report(report: Report, console: Console) -> None:
    """The report as rich tables: per run, findings, one suggestion per kind, worst layers."""
    from rich.table import Table

    def e(text: str) -> str:
        return escape(text, "rich")

    rs = report.read_stats
    for r in report.runs:
        d = r.to_dict()
        console.rule(f"run {e(r.run)}  [dim]({e(r.path)}, {e(d['source'])})[/dim]")
        console.print(e(summary_line(d)))
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
                f"[{_SEVERITY_STYLE[f.severity]}]{e(f.severity)}[/]",
                e(f.kind),
                e(f.layer or "(model)"),
                e(f.message),
            )
        if r.findings:
            console.print(t)
            console.print("[bold]suggestions[/bold]")
            for kind, text in dict.fromkeys((f.kind, f.suggestion) for f in r.findings):
                console.print(f"  [bold]{e(kind)}[/bold]: {e(text)}")
        else:
            text = no_findings_text(d)
            console.print(f"[{'green' if text == 'no findings' else 'yellow'}]{text}[/]")
        w = Table(title="worst layers")
        w.add_column("layer", overflow="fold", ratio=1)
        for col in ("findings", "worst", "kinds", "median norm", "max norm", "NaN/Inf steps"):
            w.add_column(col)
        for row in d["worst_layers"]:
            w.add_row(
                e(row["layer"]),
                str(row["findings"]),
                e(row["max_severity"] or ""),
                e(", ".join(row["kinds"])),
                number(row["median_grad_norm"]),
                number(row["max_grad_norm"]),
                str(row["nonfinite_steps"]),
            )
        console.print(w)
        for note in r.notes:
            console.print(f"[dim]note: {e(note)}[/dim]")
    for note in report.notes:
        console.print(f"[dim]note: {e(note)}[/dim]")
    if rs.corrupt_records or rs.truncated_files or rs.unreadable_files:
        console.print(
            f"[yellow]read: skipped {rs.corrupt_records} corrupt record(s), "
            f"{len(rs.truncated_files)} truncated file tail(s), "
            f"{len(rs.unreadable_files)} unreadable file(s)[/yellow]"
        )


# ---- comparison --------------------------------------------------------------------------------
def print_comparison(result: Mapping[str, Any], console: Console, rtol: float) -> None:
    """`graddiag.analysis.compare.compare_runs` output as rich text and a table."""
    from rich.table import Table

    def e(text: str) -> str:
        return escape(text, "rich")

    a, b, div = result["a"], result["b"], result["divergence"]
    console.print(
        f"A: {e(a['path'])}  ({a['steps']} steps)\n"
        f"B: {e(b['path'])}  ({b['steps']} steps)\n"
        f"common steps: {result['common_steps']}, common layers: {result['common_layers']}"
    )
    if div is None:
        console.print(f"[green]no divergence beyond rtol={rtol:g} on common steps[/green]")
    else:
        console.print(
            f"[yellow]first divergence at step {div['step']} in "
            f"{e(div['layer'] or '(global norm)')}: {number(div['a'])} vs "
            f"{number(div['b'])}[/yellow]"
        )
    t = Table(title="per-layer median gradient norm (B / A)")
    for col in ("layer", "A", "B", "B/A"):
        t.add_column(col)
    for row in result["layers"][:20]:
        t.add_row(e(row["layer"]), number(row["a"]), number(row["b"]), number(row["ratio"]))
    console.print(t)
    for side in ("a", "b"):
        only = result[f"only_{side}"]
        if only:
            console.print(
                f"findings only in {side.upper()}: "
                + ", ".join(e(f"{f['kind']}@{f['layer'] or '(model)'}") for f in only)
            )
