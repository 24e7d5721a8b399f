"""Make docs/images/gradients_tab.png: `graddiag demo`'s run in TensorBoard's Gradients tab.

    .venv/bin/python scripts/screenshot_dashboard.py [OUT.png]

Needs Debian's chromium and the playwright package (`scripts/setup.sh test`).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

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


def main(out: str) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from graddiag.demo import run_demo

    tmp = tempfile.mkdtemp()
    logdir = os.path.join(tmp, "runs", "demo")
    run_demo(os.path.join(logdir, "run-1"))
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
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                os.path.join(tmp, "profile"),
                executable_path="/usr/bin/chromium",
                headless=True,
                args=ARGS,
                viewport={"width": 1280, "height": 900},
            )
            page = ctx.new_page()
            page.goto(f"{url}/#graddiag")
            page.wait_for_selector("iframe")
            while not any("plugin_entry" in f.url for f in page.frames):
                time.sleep(0.2)
            frame = next(f for f in page.frames if "plugin_entry" in f.url)
            frame.wait_for_selector(".gd-row-label")
            frame.locator("tr.gd-finding").first.click()
            png = page.screenshot()
            ctx.close()
    finally:
        tb.terminate()
        tb.wait(timeout=20)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/images/gradients_tab.png")
