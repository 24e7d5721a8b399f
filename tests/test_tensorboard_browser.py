"""End to end: a real TensorBoard serving the Gradients tab of a real (small) PyTorch run, opened in
headless Chromium. Needs Debian's ``chromium`` (scripts/setup.sh test installs it as root) and the
``playwright`` package; skips with the reason where no browser can be installed."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

torch = pytest.importorskip("torch")

CHROMIUM = os.environ.get("GRADDIAG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_RUN = "<svg onload=alert(2)>"  # a run directory name is data from the logs too
#: The payload rounds log10 norms to 3 decimals; logged values are float32.
LOG10_ATOL = 1e-3 + 1e-6
#: Pixels a highlighted cell may be off its row/column (borders, sub-pixel column widths).
PIXEL_TOL = 2.0
#: Seconds to wait for TensorBoard to start / the page to draw, on a loaded machine.
START_TIMEOUT = 120
PAGE_TIMEOUT_MS = 90_000

pytestmark = pytest.mark.slow


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'graddiag[test]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"no browser: {CHROMIUM} is missing (scripts/setup.sh test installs Debian's "
            f"chromium when run as root with apt-get)"
        )
    return sync_playwright


def train(logdir, steps=40):
    """A small real training run with graddiag attached: a sigmoid stack whose first layers
    vanish, and a layer with a hostile name that the forward pass never calls (detached)."""
    from torch import nn

    from graddiag.torch import GradientMonitor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(8))
            self.add_module(HOSTILE, nn.Linear(8, 8))  # never used in forward
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            for b in self.blocks:
                x = torch.sigmoid(b(x))
            return self.head(x)

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    with GradientMonitor(model, opt, logdir=logdir, every=5) as mon:
        for i in range(steps):
            idx = torch.arange(32) + (i % 8) * 32
            opt.zero_grad()
            nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return mon


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_second_run(logdir=None, core=None, start=0, steps=10):
    """A second run, written by graddiag's writer with norms far below the first run's; it stays
    open (training goes on) and is flushed after each call."""
    from graddiag.monitor import MonitorCore
    from graddiag.stats import ModelInfo, StepStats

    core = core or MonitorCore(ModelInfo(layers=("a", "b")), str(logdir), close_at_exit=False)
    for step in range(start, start + steps):
        core.process(
            StepStats(
                step=step,
                grad_norm=np.array([1e-9, 1e-8]),
                has_grad=np.ones(2, bool),
                nonfinite=np.zeros(2),
                global_norm=1e-8,
            )
        )
    core.flush()
    return core


@pytest.fixture
def tensorboard(tmp_path):
    _browser_or_skip()  # before training and starting TensorBoard for nothing
    logdir = tmp_path / "logs"
    mon = train(str(logdir / "hostile-run"))
    second = write_second_run(logdir / HOSTILE_RUN)
    port = free_port()
    exe = shutil.which("tensorboard", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(
        cmd
        + ["--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"]
        + ["--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "tensorboard.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5) as r:
                    listing = json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (tmp_path / "tensorboard.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"tensorboard did not start on {url}:\n{log}")
                time.sleep(0.5)
        assert listing["graddiag"]["enabled"] is True
        yield url, mon, tmp_path, second
    finally:
        second.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_gradients_tab_in_headless_chromium(tensorboard):
    sync_playwright = _browser_or_skip()
    url, mon, tmp_path, second = tensorboard
    from graddiag.analysis import analyze

    run = analyze(mon.logdir).runs[0]
    layers = list(run.layers)
    assert HOSTILE in layers
    dialogs = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = ctx.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            outside = []
            page.on(
                "request",
                lambda r: (
                    None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url)
                ),
            )
            page.goto(f"{url}/#graddiag")
            page.wait_for_selector("iframe")
            frame = next(
                f for f in _wait_frames(page) if "plugin_entry.html?name=graddiag" in f.url
            )
            labels = frame.locator(".gd-row-label")
            frame.wait_for_selector(".gd-row-label")  # the first run (by name) is drawn
            frame.locator("select.gd-run").select_option("hostile-run")
            frame.wait_for_function(
                f"document.querySelectorAll('.gd-row-label').length === {len(layers)}"
            )
            # a labelled row per layer, in model order, names as plain text
            assert labels.all_text_contents() == layers
            assert frame.locator("img").count() == 0
            hostile = frame.locator(".gd-row-label", has_text="onerror")
            assert hostile.text_content() == HOSTILE
            assert frame.locator("text=" + HOSTILE).count() >= 1  # also in the findings table

            # click the first finding on a layer: its cell and step are highlighted
            rows = frame.locator("tr.gd-finding")
            findings = [f for f in run.findings]
            assert rows.count() == len(findings) > 0
            i = next(k for k, f in enumerate(findings) if f.layer is not None)
            f = findings[i]
            rows.nth(i).click()
            hl = frame.locator(".gd-highlight")
            assert hl.is_visible()
            box = hl.bounding_box()
            row_box = labels.nth(layers.index(f.layer)).bounding_box()
            assert (
                abs((box["y"] + box["height"] / 2) - (row_box["y"] + row_box["height"] / 2))
                <= PIXEL_TOL
            )
            heat = frame.locator("canvas.gd-heatmap").bounding_box()
            steps = [int(s) for s in run.steps]
            col = max(k for k, s in enumerate(steps) if s <= f.step)
            col_w = heat["width"] / len(steps)
            expected_x = heat["x"] + (col + 0.5) * col_w
            assert abs((box["x"] + box["width"] / 2) - expected_x) <= PIXEL_TOL
            assert hl.get_attribute("data-step") == str(f.step)
            assert "gd-selected" in rows.nth(i).get_attribute("class")
            line = frame.locator(".gd-stepline").first.bounding_box()
            assert abs((line["x"] + line["width"] / 2) - expected_x) <= PIXEL_TOL

            # hover shows layer, step and value
            frame.locator("canvas.gd-heatmap").hover(
                position={"x": (col + 0.5) * col_w, "y": layers.index(f.layer) * 14 + 7}
            )
            tip = frame.locator(".gd-tooltip").text_content()
            assert f.layer in tip and f"step {steps[col]}" in tip

            # a second run side by side, on one colour scale over both
            run1 = frame.locator("select.gd-run")
            assert run1.input_value() == "hostile-run"
            assert HOSTILE_RUN in frame.locator("select.gd-run2 option").all_text_contents()
            frame.locator("select.gd-run2").select_option(HOSTILE_RUN)
            frame.wait_for_function("document.querySelectorAll('section.gd-panel').length === 2")
            titles = frame.locator("section.gd-panel h2").all_text_contents()
            assert titles == ["hostile-run", HOSTILE_RUN]
            legend = frame.locator(".gd-legend")
            lo, hi = float(legend.get_attribute("data-lo")), float(legend.get_attribute("data-hi"))
            own = analyze(mon.logdir).runs[0].series.grad_norm
            assert lo == pytest.approx(-9.0, abs=LOG10_ATOL)  # the second run's smallest norm
            assert hi == pytest.approx(math.log10(np.nanmax(own)), abs=LOG10_ATOL)
            assert frame.locator("svg").count() == 0

            # training goes on: the tab polls and shows the new steps
            write_second_run(core=second, start=10, steps=15)
            frame.wait_for_function(
                "[...document.querySelectorAll('section.gd-panel .gd-sub')]"
                ".some((e) => e.textContent.includes('25 steps (0–24)'))"
            )

            page.screenshot(path=str(tmp_path / "gradients_tab.png"), full_page=True)
            assert (tmp_path / "gradients_tab.png").stat().st_size > 10_000

            # the custom-scalars page: every chart of the layouts, none empty ("Matches (0)")
            charts = layout_charts(tmp_path / "logs")
            page.goto(f"{url}/#custom_scalars")
            matches = page.get_by_text(re.compile(r"^\s*Matches \(\d+\)\s*$"))
            deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000

            # (a chart whose tags arrived with the steps just written reads "Matches (0)" until
            # TensorBoard has reloaded the logdir and the page asked again: wait, up to the
            # deadline)
            def settled() -> bool:
                if matches.count() < len(charts):
                    return False
                return "Matches (0)" not in [t.strip() for t in matches.all_text_contents()]

            reloaded = time.monotonic()
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.2)
                if time.monotonic() - reloaded > 5:  # the page read the tags before the reload
                    page.reload()
                    reloaded = time.monotonic()
            counts = [t.strip() for t in matches.all_text_contents()]
            assert len(counts) == len(charts) and "Matches (0)" not in counts, counts
            assert dialogs == []  # the hostile name never ran
            assert outside == []  # nothing fetched from outside TensorBoard
        finally:
            ctx.close()


def layout_charts(logdir):
    """(category, chart) titles of the custom-scalars layouts the runs under `logdir` wrote last
    (TensorBoard shows each run's latest and merges the runs')."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts = set()
    for run in sorted(p for p in logdir.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
        acc.Reload()
        last = acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
        layout = layout_pb2.Layout.FromString(last)
        charts |= {(cat.title, c.title) for cat in layout.category for c in cat.chart}
    return charts


def _wait_frames(page, timeout=PAGE_TIMEOUT_MS / 1000):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frames = [f for f in page.frames if "plugin_entry.html" in f.url]
        if frames:
            return frames
        time.sleep(0.2)
    pytest.fail(f"the Gradients tab's iframe did not load; frames: {[f.url for f in page.frames]}")
