"""The Gradients tab on a large run: server-side costs, and (with --browser) the page in Chromium.

Writes a run with graddiag's writer (`MonitorCore`: per-layer norms spanning six decades, a loss,
a 1e5x spike; the detectors find vanishing layers), then through TensorBoard's WSGI app and the
plugin: the first ``runs`` request (read + diagnose), a cached ``runs``, ``run?cols=1000``
uncached and cached, and the payload size (plain and gzip). With ``--browser``, a real
``tensorboard`` serves it to headless Chromium (Playwright, /usr/bin/chromium): the time from
opening ``/#graddiag`` to every row drawn, and the time to select a finding.

Usage::

    python benchmarks/bench_dashboard.py [--layers 300] [--steps 20000] [--browser]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def write(logdir: str, layers: int, steps: int) -> None:
    from graddiag.monitor import MonitorCore
    from graddiag.stats import ModelInfo, StepStats

    names = tuple(f"encoder.layers.{i // 6}.sub{i % 6}" for i in range(layers))
    core = MonitorCore(ModelInfo(layers=names), logdir, close_at_exit=False)
    rng = np.random.default_rng(0)
    base = np.logspace(-6, 0, layers)
    for s in range(steps):
        g = base * rng.lognormal(0, 0.2, layers)
        if s == steps // 2:
            g[5] *= 1e5
        core.process(
            StepStats(
                step=s,
                grad_norm=g,
                has_grad=np.ones(layers, bool),
                nonfinite=np.zeros(layers),
                global_norm=float(np.sqrt((g**2).sum())),
                loss=1.0 / (1 + s),
            )
        )
    core.close()


def timed(fn, repeat: int = 1) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def server(logdir: str) -> None:
    from tensorboard.backend import application
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from graddiag.tensorboard_plugin import GradientsPlugin

    plugin = GradientsPlugin(base_plugin.TBContext(logdir=logdir))
    c = Client(application.TensorBoardWSGI([plugin]))
    base = "/data/plugin/graddiag"
    first = timed(lambda: c.get(f"{base}/runs"))
    cached = timed(lambda: c.get(f"{base}/runs"), 5)
    url = f"{base}/run?run=big&cols=1000"
    uncached_run = timed(lambda: c.get(url))
    cached_run = timed(lambda: c.get(url), 5)
    plain = len(c.get(url).get_data())
    gz = len(c.get(url, headers={"Accept-Encoding": "gzip"}).get_data())
    print("| request | median |")
    print("|---|---|")
    print(f"| first `runs` (read + diagnose) | {first:.2f} s |")
    print(f"| `runs`, cached | {cached * 1e3:.2f} ms |")
    print(f"| `run?cols=1000`, first | {uncached_run:.2f} s |")
    print(f"| `run?cols=1000`, cached | {cached_run * 1e3:.1f} ms |")
    print(f"| `run` payload | {plain / 1e6:.2f} MB ({gz / 1e6:.2f} MB gzip) |")


def browser(logdir: str, layers: int) -> None:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    tb = subprocess.Popen(
        [exe, "--logdir", logdir, "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # tensorboard up and the run read once (cached afterwards)
            try:
                urllib.request.urlopen(f"{url}/data/plugin/graddiag/runs", timeout=120).read()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                tempfile.mkdtemp(),
                executable_path="/usr/bin/chromium",
                headless=True,
                args=ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            page = ctx.new_page()
            page.set_default_timeout(180_000)
            t = time.perf_counter()
            page.goto(f"{url}/#graddiag")
            page.wait_for_selector("iframe")
            while not any("plugin_entry" in f.url for f in page.frames):
                time.sleep(0.05)
            frame = next(f for f in page.frames if "plugin_entry" in f.url)
            frame.wait_for_function(
                f"document.querySelectorAll('.gd-row-label').length === {layers}"
            )
            load = time.perf_counter() - t
            t = time.perf_counter()
            frame.locator("tr.gd-finding").nth(0).click()
            click = time.perf_counter() - t
            ctx.close()
    finally:
        tb.terminate()
        tb.wait(timeout=30)
    print(f"| browser: open `/#graddiag` to every row drawn | {load:.2f} s |")
    print(f"| browser: click a finding | {click:.2f} s |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--browser", action="store_true")
    a = ap.parse_args()
    logging.getLogger("graddiag").setLevel(logging.ERROR)
    root = tempfile.mkdtemp()
    logdir = os.path.join(root, "big")
    t = time.perf_counter()
    write(logdir, a.layers, a.steps)
    print(f"{a.layers} layers x {a.steps} steps written in {time.perf_counter() - t:.1f} s\n")
    server(root)
    if a.browser:
        browser(root, a.layers)


if __name__ == "__main__":
    main()
