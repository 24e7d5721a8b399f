"""The Gradients tab's backend: TensorBoard's own WSGI app serving the plugin, driven by werkzeug's
test client over logs written by graddiag's writer (values chosen by hand)."""

import json
import math
import time
from importlib.metadata import entry_points

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from graddiag.analysis import analyze
from graddiag.monitor import MonitorCore
from graddiag.stats import ModelInfo, StepStats
from graddiag.tensorboard_plugin import GradientsPlugin

HOSTILE = "<img src=x onerror=alert(1)>"
LAYERS = ("embed", "blocks.0.fc", HOSTILE, "head")
#: Logged values are float32 and the payload rounds log10 norms to 3 decimals.
LOG10_ATOL = 1e-3 + 1e-6
F32_RTOL = 2.0**-23 * 4
BASE = "/data/plugin/graddiag"
#: Seconds a changed run may take to be served again (re-reading waits RELOAD_COST_FACTOR times the
#: cost of the last reading: milliseconds here, more on a loaded machine).
REFRESH_TIMEOUT = 30.0


def norms_at(step):
    """Hand-chosen per-layer norms: layer 1 exactly zero at step 3, the hostile layer without a
    gradient at step 4, layer 3 NaN at step 6, a 1e4x spike of layer 0 at step 9."""
    g = np.array([1.0, 0.5, 0.25, 2.0]) * (1 + 0.01 * step)
    has = np.ones(4, bool)
    nf = np.zeros(4)
    if step == 3:
        g[1] = 0.0
    if step == 4:
        has[2], g[2] = False, 0.0
    if step == 6:
        g[3], nf[3] = np.nan, 1
    if step == 9:
        g[0] *= 1e4
    return g, has, nf


def write_run(logdir, steps, start=0, core=None):
    core = core or MonitorCore(ModelInfo(layers=LAYERS), str(logdir), close_at_exit=False)
    for step in range(start, start + steps):
        g, has, nf = norms_at(step)
        gn = float(np.sqrt(np.nansum(g**2))) if not nf.any() else float("nan")
        core.process(
            StepStats(
                step=step,
                grad_norm=g,
                has_grad=has,
                nonfinite=nf,
                global_norm=gn,
                clip_coef=1e-4 if step == 9 else 1.0,
                loss=10.0 / (step + 1),
            )
        )
    core.flush()
    return core


def client_for(logdir):
    plugin = GradientsPlugin(base_plugin.TBContext(logdir=str(logdir)))
    return Client(application.TensorBoardWSGI([plugin])), plugin


def get_json(client, url, code=200):
    r = client.get(url)
    assert r.status_code == code, r.get_data(as_text=True)
    assert r.headers["Content-Type"].startswith("application/json")
    return json.loads(r.get_data(as_text=True))


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    write_run(root / "a", 20).close()
    write_run(root / "b", 12).close()
    return root


@pytest.fixture(scope="module")
def client(logs):
    return client_for(logs)[0]


def test_entry_point_registers_the_plugin():
    eps = [ep for ep in entry_points(group="tensorboard_plugins") if ep.name == "graddiag"]
    assert len(eps) == 1 and eps[0].load() is GradientsPlugin


def test_tensorboard_lists_the_gradients_tab(client):
    listing = get_json(client, "/data/plugins_listing")["graddiag"]
    assert listing["enabled"] is True
    assert listing["tab_name"] == "Gradients"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": f"{BASE}/index.js"}


def test_frontend_files_are_served_by_the_plugin(client):
    js = client.get(f"{BASE}/index.js")
    assert js.status_code == 200 and "javascript" in js.headers["Content-Type"]
    assert "export async function render" in js.get_data(as_text=True)
    css = client.get(f"{BASE}/static/style.css")
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")


def test_frontend_never_parses_data_as_html_nor_fetches_elsewhere(client):
    js = client.get(f"{BASE}/index.js").get_data(as_text=True)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js
    assert "http://" not in js and "https://" not in js and "//cdn" not in js


@pytest.mark.parametrize(
    "path",
    [
        "/static/../plugin.py",
        "/static/%2e%2e/plugin.py",
        "/static/..%2fplugin.py",
        "/static/../../../../etc/passwd",
        "/static/",
        "/static/index.js/../plugin.py",
        "/static/__init__.py",
        "/static/style.css/x",
    ],
)
def test_static_path_traversal_is_refused(client, path):
    r = client.get(BASE + path)
    assert r.status_code == 404
    assert "import" not in r.get_data(as_text=True)  # no Python source came back


def test_runs_lists_each_run_with_its_findings(client, logs):
    runs = get_json(client, f"{BASE}/runs")["runs"]
    report = analyze(logs)
    assert [r["run"] for r in runs] == ["a", "b"]
    for r, rep in zip(runs, report.runs, strict=True):
        assert set(r) == {
            "run",
            "layers",
            "steps",
            "first",
            "last",
            "findings",
            "max_severity",
            "version",
        }
        assert r["layers"] == len(LAYERS) and r["findings"] == len(rep.findings) > 0
        assert (r["first"], r["last"]) == (0, r["steps"] - 1)
    assert runs[0]["steps"] == 20 and runs[1]["steps"] == 12


def test_run_heatmap_cells_are_the_logged_norms(client):
    d = get_json(client, f"{BASE}/run?run=a")
    json.dumps(d, allow_nan=False)
    assert d["layers"] == list(LAYERS)  # model order, names unchanged
    assert d["stride"] == 1 and d["columns"]["first"] == list(range(20))
    assert len(d["heat"]) == len(LAYERS) and all(len(row) == 20 for row in d["heat"])
    for step in range(20):
        g, has, nf = norms_at(step)
        for j in range(len(LAYERS)):
            cell = d["heat"][j][step]
            if nf[j]:
                assert cell == "nonfinite"
            elif not has[j]:
                assert cell is None
            elif g[j] == 0:
                assert cell == "zero"
            else:
                assert cell == pytest.approx(math.log10(g[j]), abs=LOG10_ATOL)
    lo, hi = d["range"]
    assert hi == pytest.approx(math.log10(1e4 * 1.09), abs=LOG10_ATOL)
    assert lo == pytest.approx(math.log10(0.25), abs=LOG10_ATOL)


def test_run_series_are_the_logged_global_values(client):
    s = get_json(client, f"{BASE}/run?run=a")["series"]
    assert s["clip_coef"]["hi"][9] == pytest.approx(1e-4, rel=1e-3)
    assert s["loss"]["hi"] == pytest.approx([10.0 / (i + 1) for i in range(20)], rel=1e-3)
    assert s["global_norm"]["nonfinite"] == [6]
    g, _, _ = norms_at(0)
    assert s["global_norm"]["hi"][0] == pytest.approx(float(np.sqrt(np.sum(g**2))), rel=1e-3)
    assert all(v["logged"] for v in s.values())


def test_run_findings_are_those_of_analyze_with_their_cell(client, logs):
    d = get_json(client, f"{BASE}/run?run=a")
    expected = [f.to_dict() for f in analyze(logs, run="a").runs[0].findings]
    assert len(expected) > 0
    got = [{k: v for k, v in f.items() if k not in ("row", "column")} for f in d["findings"]]
    assert [(f["step"], f["layer"], f["kind"], f["severity"]) for f in got] == [
        (f["step"], f["layer"], f["kind"], f["severity"]) for f in expected
    ]
    assert [f["message"] for f in got] == [f["message"] for f in expected]
    for f in d["findings"]:
        assert f["row"] == (None if f["layer"] is None else LAYERS.index(f["layer"]))
        assert d["columns"]["first"][f["column"]] <= f["step"] <= d["columns"]["last"][f["column"]]
    kinds = {(f["kind"], f["layer"]) for f in d["findings"]}
    assert ("nonfinite", "head") in kinds


def test_long_runs_are_downsampled_for_display_only(tmp_path):
    n, cols = 2000, 50
    core = MonitorCore(ModelInfo(layers=LAYERS), str(tmp_path / "long"), close_at_exit=False)
    write_run(None, 10, core=core)  # the hand-made episode (spike at 9, NaN at 6) ...
    for step in range(10, n):  # ... then quiet steps
        core.process(
            StepStats(
                step=step,
                grad_norm=np.array([1.0, 0.5, 0.25, 2.0]),
                has_grad=np.ones(4, bool),
                nonfinite=np.zeros(4),
                global_norm=2.3,
            )
        )
    core.close()
    client, _ = client_for(tmp_path)
    d = get_json(client, f"{BASE}/run?run=long&cols={cols}")
    k = math.ceil(n / cols)
    assert d["stride"] == k and len(d["columns"]["first"]) == cols
    assert d["columns"]["first"][:2] == [0, k] and d["columns"]["last"][-1] == n - 1
    assert d["heat"][0][0] == pytest.approx(math.log10(1e4 * 1.09), abs=LOG10_ATOL)  # spike kept
    assert d["heat"][3][0] == "nonfinite"  # a NaN in a column shows
    assert d["heat"][1][0] == pytest.approx(math.log10(0.5 * 1.09), abs=LOG10_ATOL)
    full = analyze(tmp_path / "long").runs[0].findings
    assert len(d["findings"]) == len(full)  # findings are never downsampled


@pytest.mark.parametrize(
    "query,code,needle",
    [
        ("", 400, "run"),
        ("?run=", 400, "run"),
        ("?run=nope", 404, "nope"),
        ("?run=..%2F..%2Fetc", 404, "../../etc"),
        ("?run=%2Fetc%2Fpasswd", 404, "/etc/passwd"),
        ("?run=a&cols=abc", 400, "cols"),
        ("?run=a&cols=0", 400, "cols"),
        ("?run=a&cols=100000", 400, "cols"),
    ],
)
def test_bad_run_requests_are_refused_with_a_reason(client, query, code, needle):
    d = get_json(client, f"{BASE}/run{query}", code)
    assert needle in d["error"]


def test_hostile_names_travel_as_json_strings(client):
    r = client.get(f"{BASE}/run?run=a")
    assert json.loads(r.get_data(as_text=True))["layers"][2] == HOSTILE
    assert r.headers["Content-Type"].startswith("application/json")


def test_runs_are_read_again_as_training_writes(tmp_path):
    core = write_run(tmp_path / "live", 5)
    client, _ = client_for(tmp_path)
    first = get_json(client, f"{BASE}/runs")["runs"][0]
    assert first["steps"] == 5
    assert get_json(client, f"{BASE}/runs")["runs"][0]["version"] == first["version"]
    write_run(None, 7, start=5, core=core)  # the same run goes on
    deadline = time.monotonic() + REFRESH_TIMEOUT  # re-reading is throttled by its cost
    while (later := get_json(client, f"{BASE}/runs")["runs"][0])["steps"] != 12:
        assert time.monotonic() < deadline, later
        time.sleep(0.05)
    assert later["version"] != first["version"]
    assert len(get_json(client, f"{BASE}/run?run=live")["columns"]["first"]) == 12
    core.close()


def test_inactive_without_gradient_logs(tmp_path):
    assert GradientsPlugin(base_plugin.TBContext(logdir=str(tmp_path))).is_active() is False
    assert GradientsPlugin(base_plugin.TBContext(logdir="")).is_active() is False
    client, _ = client_for(tmp_path)
    assert get_json(client, f"{BASE}/runs") == {"runs": []}


def test_is_active_is_cheap_for_graddiag_logs(logs, tmp_path):
    plugin = GradientsPlugin(base_plugin.TBContext(logdir=str(logs)))
    assert plugin.is_active() is True
    assert plugin._cache == {}  # decided from the file names, nothing read
    foreign = tmp_path / "foreign"
    from graddiag.events import EventFileWriter

    w = EventFileWriter(str(foreign))  # another tool's gradient scalars: read to decide
    for step in range(12):
        w.add_scalars(step, ["grad_norm/enc.weight", "grad_norm/head.weight"], [1.0, 2.0])
    w.close()
    other = GradientsPlugin(base_plugin.TBContext(logdir=str(tmp_path)))
    assert other.is_active() is True and other._cache != {}
