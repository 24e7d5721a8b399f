"""The *Gradients* tab: a TensorBoard dynamic plugin serving graddiag's analysis of the logdir.

Backend: `GradientsPlugin` reads the runs under TensorBoard's ``--logdir`` with graddiag's own
reader and diagnoses them with the same detectors as ``graddiag analyze``
(`graddiag.analysis.report.analyze_logs`); a run is read again only when one of its event files
changed (size or modification time), so the browser can poll while training writes. Routes, under
``/data/plugin/graddiag/``:

* ``index.js``, ``static/style.css``: the frontend (plain JavaScript and canvas, no build step,
  nothing fetched from elsewhere); only these fixed names are served.
* ``runs``: ``{"runs": [{"run", "layers", "steps", "first", "last", "findings", "max_severity",
  "version"}]}``.
* ``run?run=NAME[&cols=N]``: one run's heatmap (at most N columns, default 1000, downsampled for
  display only), its global norm, clip coefficient and loss, and every finding (see
  `run_payload`). A missing or malformed argument is a 400, an unknown run a 404.

A run that keeps changing is read again at most once per `RELOAD_COST_FACTOR` times the duration of
its last reading (a 300-layer x 20,000-step run takes seconds to diagnose), so polling costs a
bounded share of a core; payloads are kept per (run, columns) until the run changes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

import numpy as np
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from graddiag import tags
from graddiag.analysis.heatmap import MISSING, NONFINITE, VALUE, ZERO, bin_series, heat_grid
from graddiag.analysis.report import RunReport, analyze_logs
from graddiag.findings import SEVERITIES, severity_rank
from graddiag.reader import LogReadError, discover_runs, read_logs

__all__ = ["GradientsPlugin", "run_payload"]

_log = logging.getLogger("graddiag")
_STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: The only files the plugin serves, with their content types.
_STATIC = {"index.js": "text/javascript", "style.css": "text/css"}
#: A changed run is read again at most once per this many times the cost of its last reading, so
#: polling a long run while it trains costs at most ~1/RELOAD_COST_FACTOR of a core.
RELOAD_COST_FACTOR = 4.0
DEFAULT_COLS = 1000
MIN_COLS, MAX_COLS = 10, 5000
#: Cell codes in the JSON heatmap (a number is a finite log10 norm).
_CELL = {ZERO: "zero", MISSING: None, NONFINITE: "nonfinite"}


def _num(x: float, digits: int = 4) -> float | None:
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def _sig(x: float) -> float | None:
    """`x` to 4 significant digits (values span decades: a fixed number of decimals would not do)."""
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _series_payload(values: np.ndarray, logged: np.ndarray, stride: int) -> dict[str, Any]:
    lo, hi, bad = bin_series(values, logged, stride)
    return {
        "lo": [_sig(v) for v in lo],
        "hi": [_sig(v) for v in hi],
        "nonfinite": np.flatnonzero(bad).tolist(),
        "logged": bool(logged.any()),
    }


def run_payload(r: RunReport, cols: int = DEFAULT_COLS) -> dict[str, Any]:
    """One run as the JSON the Gradients tab draws.

    Returns:
        ``{"run", "layers": [str] (model order), "steps": {"count", "first", "last"},
        "stride": steps per column, "columns": {"first": [int], "last": [int]},
        "heat": [[cell per column] per layer] where a cell is a log10 norm, "zero", "nonfinite"
        or null (missing), "range": [min, max] of the log10 norms | null,
        "series": {"global_norm"|"clip_coef"|"loss": {"lo": [...], "hi": [...],
        "nonfinite": [column], "logged": bool}}, "findings": [<finding> + "row": layer index | null,
        "column": int], "notes": [str]}``.
    """
    s = r.series
    grid = heat_grid(s, cols)
    heat = []
    for j in range(len(s.layers)):
        kinds, zs = grid.kind[:, j].tolist(), grid.z[:, j].tolist()
        heat.append(
            [round(z, 3) if k == VALUE else _CELL[k] for k, z in zip(kinds, zs, strict=True)]
        )
    rng = grid.z_range()
    gnorm = s.global_norm()
    g_logged = s.glob_logged["grad_norm"] | s.has_grad.any(axis=1)
    series = {
        "global_norm": _series_payload(gnorm, g_logged, grid.stride),
        "clip_coef": _series_payload(s.glob["clip_coef"], s.glob_logged["clip_coef"], grid.stride),
        "loss": _series_payload(s.glob["loss"], s.glob_logged["loss"], grid.stride),
    }
    index = {n: j for j, n in enumerate(s.layers)}
    findings = []
    for f in r.findings:
        d = f.to_dict()
        d["row"] = index.get(f.layer)
        d["column"] = grid.column_of(f.step)
        findings.append(d)
    st = s.steps
    return {
        "run": r.run,
        "layers": list(s.layers),
        "steps": {
            "count": int(len(st)),
            "first": int(st[0]) if len(st) else None,
            "last": int(st[-1]) if len(st) else None,
        },
        "stride": grid.stride,
        "columns": {"first": grid.first.tolist(), "last": grid.last.tolist()},
        "heat": heat,
        "range": None if rng is None else [_num(rng[0]), _num(rng[1])],
        "series": series,
        "findings": findings,
        "notes": list(r.notes),
    }


class GradientsPlugin(base_plugin.TBPlugin):
    """TensorBoard plugin adding the *Gradients* tab (registered by the ``tensorboard_plugins``
    entry point; TensorBoard builds it with its `base_plugin.TBContext`)."""

    plugin_name = "graddiag"

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = context.logdir or ""
        self._lock = threading.Lock()
        #: run directory -> (files signature, its run reports, when read, seconds it took)
        self._cache: dict[str, tuple[tuple, list[RunReport], float, float]] = {}
        #: (run, cols) -> (version, the JSON body)
        self._payloads: dict[tuple[str, int], tuple[str, bytes]] = {}

    def get_plugin_apps(self):
        return {
            "/index.js": self._serve_static,
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/run": self._serve_run,
        }

    def is_active(self) -> bool:
        """Whether the logdir holds a run with gradient data (else TensorBoard hides the tab).

        Cheap for graddiag's logs (TensorBoard asks on every page load): an event file graddiag
        wrote is enough; other logs are read to see whether they hold gradient tags.
        """
        if not self._local():
            return False
        with self._lock:
            if any(c[1] for c in self._cache.values()):
                return True
        try:
            found = discover_runs(self._logdir)
        except LogReadError:
            return False
        if any(f.endswith(tags.EVENT_SUFFIX) for _, _, files in found for f in files):
            return True
        return bool(self._reports())

    def _local(self) -> bool:
        return bool(self._logdir) and "://" not in self._logdir  # no remote filesystems

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Gradients")

    def _reports(self) -> list[RunReport]:
        """Every diagnosed run under the logdir, re-read only where an event file changed."""
        if not self._local():
            return []
        try:
            found = discover_runs(self._logdir)
        except LogReadError:
            return []
        out: list[RunReport] = []
        with self._lock:
            seen = set()
            for name, _, files in found:
                seen.add(name)
                sig = []
                for f in files:
                    try:
                        st = os.stat(f)
                        sig.append((f, st.st_size, st.st_mtime_ns))
                    except OSError:
                        pass
                sig_t = tuple(sig)
                cached = self._cache.get(name)
                now = time.monotonic()
                if cached is None or (
                    cached[0] != sig_t and now - cached[2] >= RELOAD_COST_FACTOR * cached[3]
                ):
                    reports = self._diagnose(name)
                    done = time.monotonic()
                    cached = self._cache[name] = (sig_t, reports, done, done - now)
                out.extend(cached[1])
            for gone in set(self._cache) - seen:
                del self._cache[gone]
            known = {r.run for r in out}
            for key in [k for k in self._payloads if k[0] not in known]:
                del self._payloads[key]
        return out

    def _diagnose(self, run_dir: str) -> list[RunReport]:
        try:
            return analyze_logs(read_logs(self._logdir, run=run_dir, progress=False)).runs
        except LogReadError:  # no gradient tags in this directory
            return []
        except Exception as e:  # noqa: BLE001 - one unreadable run must not take the tab down
            _log.warning("graddiag Gradients tab: cannot read run %r: %s", run_dir, e)
            return []

    @staticmethod
    def _version(r: RunReport) -> str:
        st = r.series.steps
        return f"{len(st)}:{int(st[-1]) if len(st) else ''}:{len(r.findings)}"

    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.rsplit("/", 1)[-1]
        if request.path.endswith("/index.js"):
            name = "index.js"
        elif "/static/" not in request.path or request.path.split("/static/", 1)[1] != name:
            name = ""
        if name not in _STATIC:
            return _error(request, f"no such file: {request.path!r}", 404)
        with open(os.path.join(_STATIC_DIR, name), "rb") as fh:
            return http_util.Respond(request, fh.read(), _STATIC[name])

    @wrappers.Request.application
    def _serve_runs(self, request):
        runs = []
        for r in self._reports():
            st = r.series.steps
            ranks = [severity_rank(f.severity) for f in r.findings]
            runs.append(
                {
                    "run": r.run,
                    "layers": len(r.series.layers),
                    "steps": int(len(st)),
                    "first": int(st[0]) if len(st) else None,
                    "last": int(st[-1]) if len(st) else None,
                    "findings": len(r.findings),
                    "max_severity": SEVERITIES[max(ranks)] if ranks else None,
                    "version": self._version(r),
                }
            )
        return http_util.Respond(request, {"runs": runs}, "application/json")

    @wrappers.Request.application
    def _serve_run(self, request):
        run = request.args.get("run")
        if not run:
            return _error(request, "missing argument `run` (a run name from `runs`)", 400)
        raw_cols = request.args.get("cols", str(DEFAULT_COLS))
        try:
            cols = int(raw_cols)
        except ValueError:
            cols = -1
        if not MIN_COLS <= cols <= MAX_COLS:
            return _error(
                request,
                f"Expected `cols` to be an int in [{MIN_COLS}, {MAX_COLS}], got {raw_cols!r}",
                400,
            )
        for r in self._reports():
            if r.run == run:
                version = self._version(r)
                with self._lock:
                    cached = self._payloads.get((run, cols))
                if cached is None or cached[0] != version:
                    payload = dict(run_payload(r, cols), version=version)
                    body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
                    with self._lock:
                        self._payloads[(run, cols)] = (version, body)
                else:
                    body = cached[1]
                return http_util.Respond(request, body, "application/json")
        return _error(request, f"no run named {run!r} with gradient data", 404)


def _error(request, message: str, code: int):
    return http_util.Respond(request, {"error": message}, "application/json", code=code)
