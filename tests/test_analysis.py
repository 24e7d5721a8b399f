"""Post-hoc analysis: same findings as the live run, the JSON contract, reports and plots."""

import json
import math
import struct

import numpy as np
import pytest
from test_reader import make_run

from graddiag.analysis import analyze, plot_run
from graddiag.events import EventFileWriter
from graddiag.findings import SEVERITIES
from graddiag.reader import LogReadError

#: Logged values are float32: a finding's value read back differs by float32 rounding at most.
F32_RTOL = 2.0**-23 * 4


def key(f):
    return (f.step, f.layer, f.kind, f.severity)


def assert_same_findings(live, post):
    assert [key(f) for f in live] == [key(f) for f in post]
    for a, b in zip(live, post, strict=True):
        if a.value is None or (isinstance(a.value, float) and math.isnan(a.value)):
            assert b.value is None or math.isnan(b.value)
        else:
            assert b.value == pytest.approx(a.value, rel=F32_RTOL, abs=0), (a, b)


# ---- the JSON contract (design.md section 3), checked independently of the code ------------
FINDING_KEYS = {"step", "layer", "kind", "severity", "value", "message", "suggestion"}


def check_finding(f):
    assert FINDING_KEYS <= set(f)
    assert isinstance(f["step"], int)
    assert f["layer"] is None or isinstance(f["layer"], str)
    assert isinstance(f["kind"], str) and f["kind"]
    assert f["severity"] in ("info", "warning", "error")
    v = f["value"]
    assert v is None or isinstance(v, (int, float)) or v in ("nan", "inf", "-inf")
    assert isinstance(f["message"], str) and isinstance(f["suggestion"], str)


def check_report_shape(doc):
    """The documented shape of `graddiag analyze --format json`."""
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN/Infinity literals
    assert doc["schema"] == "graddiag.report/1"
    assert isinstance(doc["logdir"], str)
    s = doc["summary"]
    assert set(s["by_severity"]) == set(SEVERITIES)
    assert s["max_severity"] in (None, *SEVERITIES)
    assert s["runs"] == len(doc["runs"])
    assert s["findings"] == sum(len(r["findings"]) for r in doc["runs"])
    for r in doc["runs"]:
        assert isinstance(r["run"], str) and r["source"] in ("graddiag", "foreign")
        assert set(r["steps"]) == {"count", "first", "last"}
        assert isinstance(r["layers"], int)
        for f in r["findings"]:
            check_finding(f)
        for w in r["worst_layers"]:
            assert {
                "layer",
                "findings",
                "max_severity",
                "kinds",
                "median_grad_norm",
                "max_grad_norm",
                "nonfinite_steps",
                "grad_steps",
            } <= set(w)
        nf = r["first_nonfinite"]
        assert nf is None or (
            isinstance(nf["step"], int) and (nf["layer"] is None or isinstance(nf["layer"], str))
        )
        assert r["clip_rate"] is None or 0.0 <= r["clip_rate"] <= 1.0
        assert isinstance(r["notes"], list)
    for k in ("files", "records", "corrupt_records", "truncated_files"):
        assert k in doc["read"]


# ---- live vs post hoc ----------------------------------------------------------------------
def test_posthoc_findings_equal_live_findings(tmp_path):
    d = str(tmp_path / "run")
    live = make_run(d, steps=60, nan_at=30, zero_layer=3)
    assert {f.kind for f in live.findings} >= {"frozen", "nonfinite", "clipped"}
    assert_same_findings(live.findings, analyze(d).findings)


@pytest.mark.parametrize(
    "example", ["frozen_detached", "vanishing", "forgot_zero_grad", "nan_layer"]
)
def test_posthoc_equals_live_on_torch_example_runs(tmp_path, example):
    pytest.importorskip("torch")
    import importlib

    mod = importlib.import_module(example)
    mon = mod.run(logdir=str(tmp_path / "run"))
    assert mon.findings, "the example should produce findings"
    report = analyze(str(tmp_path))
    assert report.runs[0].source == "graddiag" and report.runs[0].framework == "torch"
    assert_same_findings(mon.findings, report.findings)


def test_posthoc_keeps_the_traced_nonfinite_origin(tmp_path):
    pytest.importorskip("torch")
    from nan_layer import NAN_STEP, run

    mon = run(logdir=str(tmp_path / "run"), trace_nonfinite=True)
    (live,) = [f for f in mon.findings if f.kind == "nonfinite"]
    assert (live.step, live.layer) == (NAN_STEP, "norm")
    assert_same_findings(mon.findings, analyze(str(tmp_path)).findings)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["tf_custom_loop", "keras_fit"])
def test_posthoc_equals_live_on_tensorflow_example_runs(tmp_path, example):
    pytest.importorskip("tensorflow")
    import importlib

    mod = importlib.import_module(example)
    mon = mod.run(logdir=str(tmp_path / "run"))
    mon = getattr(mon, "monitor", mon)  # the Keras callback holds its monitor
    assert mon.findings, "the example should produce findings"
    report = analyze(str(tmp_path))
    assert report.runs[0].source == "graddiag" and report.runs[0].framework == "tensorflow"
    assert_same_findings(mon.findings, report.findings)


def test_detectors_disabled_live_stay_disabled(tmp_path):
    d = str(tmp_path / "run")
    live = make_run(d, steps=20, detectors={"clipped": False})
    assert not [f for f in live.findings if f.kind == "clipped"]
    assert_same_findings(live.findings, analyze(d).findings)


def test_detector_override(tmp_path):
    d = str(tmp_path / "run")
    make_run(d, steps=20)
    report = analyze(d, detectors={"exploding": {"abs_threshold": 0.5}})
    assert [f.kind for f in report.findings if f.kind == "exploding"] == ["exploding"]


# ---- report contents ---------------------------------------------------------------------------
def test_first_nonfinite_and_clip_rate(tmp_path):
    d = str(tmp_path / "run")
    make_run(d, steps=40, nan_at=25, clip=2.0, seed=3)
    rng = np.random.default_rng(3)
    clipped = 0
    for s in range(40):  # the same draws as make_run: clipped when the global norm exceeds 2
        g = rng.lognormal(0.0, 0.3, 4)
        clipped += s != 25 and math.sqrt(np.sum(g**2)) > 2.0
    r = analyze(d).runs[0]
    assert r.first_nonfinite() == {"step": 25, "layer": "blocks.1.fc"}
    assert r.clip_rate() == pytest.approx(clipped / 40)


def test_json_shape_follows_the_contract(tmp_path):
    d = str(tmp_path / "run")
    make_run(d, steps=30, nan_at=10)
    doc = analyze(d).to_dict()
    check_report_shape(doc)
    assert doc["summary"]["max_severity"] == "error"
    assert doc["runs"][0]["worst_layers"][0]["layer"] == "blocks.1.fc"


def test_foreign_lightning_log_uses_default_detectors(tmp_path):
    w = EventFileWriter(str(tmp_path))
    for s in range(15):
        w.add_scalar_dict(
            s,
            {
                "grad_2.0_norm/enc.weight": 1.0,
                "grad_2.0_norm/enc.bias": 0.5,
                "grad_2.0_norm/dec.weight": 1e-12,
                "grad_2.0_norm_total": 1.1,
            },
        )
    w.close()
    report = analyze(str(tmp_path))
    r = report.runs[0]
    assert r.source == "foreign" and set(r.layers) == {"enc", "dec"}
    check_report_shape(report.to_dict())
    assert [(f.kind, f.layer) for f in report.findings] == [("vanishing", "dec")]


def test_no_gradient_tags_is_an_input_error(tmp_path):
    w = EventFileWriter(str(tmp_path))
    w.add_scalar_dict(0, {"train/loss": 1.0})
    w.close()
    with pytest.raises(LogReadError, match="no gradient tags"):
        analyze(str(tmp_path))


HOSTILE = "<script>alert(1)</script>"


def test_html_and_markdown_escape_hostile_names(tmp_path):
    d = str(tmp_path / "run")
    make_run(d, steps=12, nan_at=5, names=["ok", HOSTILE, "x&y"])
    report = analyze(d)
    page = report.to_html()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "data:image/png;base64," in page and "http" not in page  # self-contained
    md = report.to_markdown()
    assert "<script>" not in md


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("layers,height_in", [(4, 2.5 + 5.5), (200, 200 * 0.14 + 5.5)])
def test_plot_is_a_png_of_the_expected_size(tmp_path, layers, height_in):
    pytest.importorskip("matplotlib")
    d = str(tmp_path / "run")
    make_run(d, steps=30, nan_at=7, layers=layers, frozen=())
    out = tmp_path / "flow.png"
    data = plot_run(analyze(d).runs[0], str(out), width=10.0, dpi=50)
    assert out.read_bytes() == data
    assert png_size(data) == (10 * 50, int(round(height_in * 50)))


@pytest.mark.slow
def test_real_lightning_run_is_analyzed_per_layer(tmp_path):
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import grad_norm
    from test_reader import reference_scalars

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(8, 16)
            self.dec = torch.nn.Linear(16, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.dec(torch.relu(self.enc(x))), y)

        def on_before_optimizer_step(self, optimizer):
            self.log_dict(grad_norm(self, norm_type=2))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    trainer = pl.Trainer(
        max_steps=12,
        logger=TensorBoardLogger(str(tmp_path), name="lit"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
    report = analyze(str(tmp_path))
    r = report.runs[0]
    assert r.source == "foreign" and set(r.layers) == {"enc", "dec"}
    assert len(r.steps) == 12
    ref = reference_scalars(str(tmp_path))
    s = r.series
    for i, step in enumerate(s.steps):
        j = s.layers.index("enc")
        w, b = ref[(step, "grad_2.0_norm/enc.weight")], ref[(step, "grad_2.0_norm/enc.bias")]
        assert s.grad_norm[i, j] == pytest.approx(math.hypot(w, b), rel=1e-12)
        assert s.glob["grad_norm"][i] == ref[(step, "grad_2.0_norm_total")]
