"""Check graddiag on a CUDA machine: overhead, host syncs, the reference engine's GPU check.

    PYTHONPATH=. python scripts/gpu_check.py [--reps 100] [--strict]
    PYTHONPATH=. python scripts/gpu_check.py --cpu      # a dry run of the same checks on the CPU

1. Overhead: per model (MLP 8x1024, 100x64 MLP = 200 tensors, TransformerEncoder 2x128), plain
   step, `clip_grad_norm_` and graddiag (its defaults: every=10, no clipping; every=1; with
   `GlobalNormClip`) run round-robin in one process; the added time of each over the plain step
   (medians of synchronized steps), as a ratio to `clip_grad_norm_`'s. The defaults row above the
   0.7x target is reported; it fails the run only with `--strict`.
2. Host syncs: ordinary (non-log) steps of a hooked monitor run under
   `torch.cuda.set_sync_debug_mode("error")`, which raises at any synchronizing call; once with
   `nonfinite="warn"` and clipping, once with `nonfinite="skip"` and a fused Adam (the skip is
   decided on the device). On the CPU (`--cpu`) every device-to-host read is counted instead.
3. The reference engine on the GPU: `scripts/gpu_check_reference.py`, run as it is.

Prints one table; exit status 0 when every check passed, 1 when one failed, 2 when there is no
CUDA device (and `--cpu` was not given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graddiag.clip import GlobalNormClip  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402

#: graddiag's added time at the default settings, as a fraction of clip_grad_norm_'s (issue #14)
TARGET_RATIO = 0.7
#: device-to-host reads torch offers on a tensor (counted on the CPU, where no sync mode exists)
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


@dataclass
class Row:
    check: str
    ok: bool | None  # None: informational (not a failure)
    detail: str


def models(device):
    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.ReLU())])
    deep = nn.Sequential(*[m for _ in range(100) for m in (nn.Linear(64, 64), nn.ReLU())])
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    tr = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return [
        ("MLP 8x1024", mlp.to(device), torch.randn(64, 1024, device=device)),
        ("MLP 100x64 (200 tensors)", deep.to(device), torch.randn(64, 64, device=device)),
        ("TransformerEncoder 2x128", tr.to(device), torch.randn(16, 32, 128, device=device)),
    ]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: the graddiag variants timed against `clip_grad_norm_`: the whole diagnosis at its defaults
#: (no clipping; the target applies to it), every step, and the diagnosis plus global-norm clipping
GRADDIAG = {
    "defaults (every=10)": dict,
    "defaults, every=1": lambda: {"every": 1},
    "+ GlobalNormClip (every=10)": lambda: {"clip": GlobalNormClip(1.0)},  # a policy per monitor
}


def overhead(device, reps: int, strict: bool) -> list[Row]:
    """Added step time over the plain step, as a ratio to clip_grad_norm_'s, per model."""
    rows = []
    for name, model0, x in models(device):
        variants = {}
        for v in ("plain", "clip", *GRADDIAG):
            m = copy.deepcopy(model0)
            opt = torch.optim.SGD(m.parameters(), lr=1e-5)
            mon = GradientMonitor(m, opt, **GRADDIAG[v]()) if v in GRADDIAG else None
            variants[v] = (m, opt, mon, [])
        target = torch.randn_like(model0(x))
        warm = min(10, reps)
        for r in range(reps + warm):
            for v, (m, opt, _mon, ts) in variants.items():
                _sync(device)
                t0 = time.perf_counter()
                opt.zero_grad()
                (m(x) - target).square().mean().backward()
                if v == "clip":
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()  # graddiag: hooked
                _sync(device)
                if r >= warm:
                    ts.append(time.perf_counter() - t0)
        med = {v: statistics.median(ts) for v, (_, _, _, ts) in variants.items()}
        for _, _, mon, _ in variants.values():
            if mon is not None:
                mon.close()
        clip = med["clip"] - med["plain"]
        for v in GRADDIAG:
            extra = med[v] - med["plain"]
            ratio = extra / clip if clip > 0 else float("inf")
            judged = v == "defaults (every=10)"  # the target: the diagnosis at its defaults
            ok = (ratio <= TARGET_RATIO or (None if not strict else False)) if judged else None
            rows.append(
                Row(
                    f"overhead {name}, graddiag {v}",
                    ok,
                    f"{ratio:.2f}x clip_grad_norm_'s added time ({extra * 1e3:+.3f} ms vs "
                    f"{clip * 1e3:+.3f} ms; plain {med['plain'] * 1e3:.2f} ms)"
                    + (f"; target <= {TARGET_RATIO}x" if judged else ""),
                )
            )
    return rows


@contextlib.contextmanager
def no_sync_allowed(device):
    """Raise inside the block at any host sync (CUDA), or count device-to-host reads (CPU):
    yields a dict whose "reads" is the count (always 0 on CUDA: a sync raises instead)."""
    counts = {"reads": 0}
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(orig):
        def read(self, *a, **k):
            counts["reads"] += 1
            return orig(self, *a, **k)

        return read

    for name, orig in originals.items():
        setattr(torch.Tensor, name, counting(orig))
    try:
        yield counts
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def syncs(device, steps: int = 30) -> list[Row]:
    """Ordinary steps of a hooked monitor make no host sync."""
    rows = []
    cases = {
        "warn + GlobalNormClip, SGD": dict(nonfinite="warn", clip=GlobalNormClip(1.0)),
        "skip, fused Adam": dict(nonfinite="skip"),
    }
    for label, kw in cases.items():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)]).to(device)
        if "Adam" in label:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        every = 10
        mon = GradientMonitor(model, opt, every=every, hist_every=0, detail_every=0, **kw)
        x = torch.randn(16, 32, device=device)
        error, reads, checked = None, 0, 0
        try:
            for step in range(steps):
                opt.zero_grad()
                model(x).square().mean().backward()
                ordinary = step % every not in (0, every - 1)  # not a log step nor the landing
                ctx = no_sync_allowed(device) if ordinary else contextlib.nullcontext({"reads": 0})
                with ctx as counts:
                    opt.step()
                reads += counts["reads"]
                checked += ordinary
        except RuntimeError as e:  # set_sync_debug_mode("error") raised
            error = str(e).splitlines()[0]
        finally:
            mon.close()
        ok = error is None and reads == 0
        detail = f"{checked} ordinary steps, " + (
            f"a sync: {error}" if error else f"{reads} host reads"
        )
        rows.append(Row(f"no host sync on ordinary steps ({label})", ok, detail))
    return rows


def reference_check(python: str = sys.executable) -> list[Row]:
    """The reference engine's own GPU check, run as a script."""
    script = os.path.join(ROOT, "scripts", "gpu_check_reference.py")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        out = subprocess.run(
            [python, script], capture_output=True, text=True, timeout=600, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [Row("reference engine GPU check", False, f"could not run: {e}")]
    text = (out.stdout + out.stderr).strip().splitlines()
    last = text[-1] if text else "(no output)"
    return [
        Row("reference engine GPU check", out.returncode == 0, f"exit {out.returncode}: {last}")
    ]


def table(rows: list[Row]) -> str:
    status = {True: "ok", False: "FAIL", None: "info"}
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {r.check} | {status[r.ok]} | {r.detail} |" for r in rows]
    return "\n".join(lines)


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.ok is False for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (no CUDA needed)")
    ap.add_argument("--reps", type=int, default=100, help="timed steps per variant")
    ap.add_argument("--strict", action="store_true", help="an overhead above target fails")
    ap.add_argument("--skip-reference", action="store_true", help="leave out check 3")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing checked. "
            "Run it on a CUDA machine, or pass --cpu for a dry run on the CPU.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:  # take CUDA's read path (delayed reads, device-side skip) on the CPU
        import graddiag.torch.monitor as torch_monitor

        torch_monitor._reads_delayed = lambda device: True
    logging.getLogger("graddiag").setLevel(logging.ERROR)  # the models' findings are not the point
    rows = [Row("device", None, torch.cuda.get_device_name() if device.type == "cuda" else "cpu")]
    rows += overhead(device, args.reps, args.strict)
    rows += syncs(device)
    if not args.skip_reference:
        rows += reference_check()
    print(table(rows))
    code = exit_code(rows)
    print("gpu_check: " + ("all checks passed" if code == 0 else "FAILED"))
    return code


if __name__ == "__main__":
    sys.exit(main())
