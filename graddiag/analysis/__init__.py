"""Post-hoc analysis: run graddiag's detectors over the series read back from event files.

Layers, each depending only on those above it in this list:

* `graddiag.reader`: event files -> NumPy columns (`read_logs`) or a DataFrame (`read`);
* `graddiag.analysis.diagnosis`: columns -> dense `Series` -> `StepStats` -> the same `Diagnoser`
  a live run uses (`diagnose_run`);
* `graddiag.analysis.report`: the report model (`Report`, `RunReport`, ``to_dict()`` is the JSON
  document) and `analyze` / `analyze_logs`, which build it;
* `graddiag.analysis.render` (terminal tables, markdown, CSV, HTML; one escaping function),
  `graddiag.analysis.plotting` (`plot_run`) and `graddiag.analysis.compare` (`compare_runs`);
* `graddiag.cli` on top: argument parsing and output only.

The names below are re-exported so that ``from graddiag.analysis import analyze`` keeps working.
"""

from graddiag.analysis.compare import compare_runs
from graddiag.analysis.diagnosis import RunDiagnosis, Series, diagnose_run, series_of
from graddiag.analysis.plotting import plot_run
from graddiag.analysis.report import SCHEMA, Report, RunReport, analyze, analyze_logs

__all__ = [
    "SCHEMA",
    "Report",
    "RunDiagnosis",
    "RunReport",
    "Series",
    "analyze",
    "analyze_logs",
    "compare_runs",
    "diagnose_run",
    "plot_run",
    "series_of",
]
