"""Per-step overhead of gradient monitoring in PyTorch, side by side in one process (CPU, 2 threads).

    python benchmarks/bench_torch.py [--reps 120] [--out FILE.md]

Each variant trains its own copy of the same model; variants run round-robin (one step each per
round) so drift hits all of them alike. Reported: median step time and the extra time over the
plain step (both include forward/backward noise of about +-0.5 ms on the larger models), and the
mean time of the call each variant adds between `backward()` and `optimizer.step()` (graddiag in
manual mode, so that call holds all its work, log steps included) — the precise overhead.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from graddiag.clip import GlobalNormClip
from graddiag.events import EventFileWriter
from graddiag.torch import GradientMonitor


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.ReLU())])
    deep = nn.Sequential(*[m for _ in range(100) for m in (nn.Linear(64, 64), nn.ReLU())])
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    tr = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return [
        ("MLP 8x1024, batch 64", mlp, lambda: torch.randn(64, 1024), 1.0),
        (
            "MLP 100x64 (200 tensors), batch 64, clipping every step",
            deep,
            lambda: torch.randn(64, 64),
            1e-4,
        ),
        ("TransformerEncoder 2x128, batch 16x32", tr, lambda: torch.randn(16, 32, 128), 1.0),
    ]


#: `--before DIR`: an earlier graddiag, renamed to `graddiag_before` in DIR, timed in the same
#: process (see docs/benchmarks.md for how it is made)
BEFORE = None


def variants(max_norm, tmp):
    """name -> (setup(model, opt) -> state, after_backward(model, opt, state))."""

    def plain(model, opt):
        return None

    def clip(model, opt, st):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def naive(model, opt, st):
        st["log"] = [p.grad.norm().item() for p in model.parameters()]

    def lightning(model, opt, st):
        from lightning.pytorch.utilities import grad_norm

        st["log"] = {k: v.item() for k, v in grad_norm(model, norm_type=2).items()}

    def wandb_hist(model, opt, st):
        st["log"] = [p.grad.histc(bins=64).tolist() for p in model.parameters()]

    def tb_add_scalar(model, opt, st):
        norms = torch.stack(torch._foreach_norm([p.grad for p in model.parameters()])).tolist()
        for i, v in enumerate(norms):
            st["writer"].add_scalar(f"grad_norm/{i}", v, st["step"])
        st["step"] += 1

    def setup_tb(model, opt):
        from torch.utils.tensorboard import SummaryWriter

        return {"writer": SummaryWriter(tempfile.mkdtemp(dir=tmp)), "step": 0}

    def setup_gd(every, background=True, clip=True):
        def s(model, opt):  # manual mode, so the added call can be timed on its own
            mon = GradientMonitor(
                model,
                None,
                logdir=tempfile.mkdtemp(dir=tmp),
                every=every,
                clip=GlobalNormClip(max_norm) if clip else None,
            )
            mon._host.background = background  # False: the host work in the training thread
            return {"mon": mon}

        return s

    def gd_step(model, opt, st):
        st["mon"].step()

    def setup_before(every):
        def s(model, opt):
            return {
                "mon": BEFORE.torch.GradientMonitor(
                    model,
                    None,
                    logdir=tempfile.mkdtemp(dir=tmp),
                    every=every,
                    clip=BEFORE.clip.GlobalNormClip(max_norm),
                )
            }

        return s

    none = lambda model, opt, st: None  # noqa: E731
    before = {}
    if BEFORE is not None:
        before = {
            "before: graddiag every step": (setup_before(1), gd_step),
            "before: graddiag every=10": (setup_before(10), gd_step),
        }
    return {
        "plain step": (plain, none),
        "clip_grad_norm_": (lambda m, o: {}, clip),
        "per-param .norm().item()": (lambda m, o: {}, naive),
        "Lightning grad_norm + .item()": (lambda m, o: {}, lightning),
        "wandb-style per-param histc": (lambda m, o: {}, wandb_hist),
        "detect_anomaly": ("anomaly", none),
        "SummaryWriter.add_scalar per layer": (setup_tb, tb_add_scalar),
        "graddiag every step (stats+NaN+clip+log)": (setup_gd(1), gd_step),
        "graddiag every=10 (default)": (setup_gd(10), gd_step),
        "graddiag every step, host work inline": (setup_gd(1, False), gd_step),
        "graddiag diagnosis only (defaults: no clipping), every=10": (
            setup_gd(10, clip=False),
            gd_step,
        ),
        "graddiag diagnosis only (no clipping), every step": (setup_gd(1, clip=False), gd_step),
        "graddiag every=10, host work inline": (setup_gd(10, False), gd_step),
        **before,
    }


SKIP = None


def bench_model(name, model0, make_x, max_norm, reps, tmp):
    vs = variants(max_norm, tmp)
    vs = {k: v for k, v in vs.items() if not SKIP or not any(s in k for s in SKIP.split(","))}
    runs = {}
    for vname, (setup, after) in vs.items():
        model = copy.deepcopy(model0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-5)
        st = None if setup == "anomaly" else setup(model, opt)
        runs[vname] = (model, opt, st, after, setup == "anomaly")
    times = {v: [] for v in vs}
    added = {v: [] for v in vs}
    cpu = {v: [] for v in vs}  # the added call's CPU time in this thread: immune to preemption
    x = make_x()
    target = torch.randn_like(model0(x))
    for r in range(reps + 5):
        for vname, (model, opt, st, after, anomaly) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            if anomaly:
                with torch.autograd.detect_anomaly(check_nan=True):
                    (model(x) - target).square().mean().backward()
            else:
                (model(x) - target).square().mean().backward()
            t1, c1 = time.perf_counter(), time.thread_time()
            after(model, opt, st)
            t2, c2 = time.perf_counter(), time.thread_time()
            opt.step()
            dt = time.perf_counter() - t0
            if r >= 5:
                times[vname].append(dt)
                added[vname].append(t2 - t1)
                cpu[vname].append(c2 - c1)
    background = {}
    for vname, (_, _, st, _, _) in runs.items():
        if isinstance(st, dict) and "mon" in st:
            background[vname] = _thread_cpu(st["mon"]) / (reps + 5)
            st["mon"].close()
        if isinstance(st, dict) and "writer" in st:
            st["writer"].close()
    med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    # mean, not median, of the added call: log steps (every=10) are 1 in 10 and must count
    # (the slowest 0.5 % dropped: on a shared machine a step is sometimes descheduled for 10+ ms)
    call = {v: _trimmed_mean(t) * 1e3 for v, t in added.items()}
    base = med["plain step"]
    clip_extra = med["clip_grad_norm_"] - base
    clip_call = call["clip_grad_norm_"]
    ccpu = {v: statistics.fmean(t) * 1e3 for v, t in cpu.items()}
    clip_cpu = ccpu["clip_grad_norm_"]
    lines = [
        f"\n### {name}\n",
        "| variant | median step (ms) | extra vs plain (ms) | extra / clip's | added call, mean (ms) "
        "| added call / clip's | added call, thread CPU (ms) | thread CPU / clip's "
        "| + background thread CPU per step (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, m in med.items():
        extra = m - base
        ratio = (
            "" if v == "plain step" else f"{extra / clip_extra:.2f}x" if clip_extra > 0 else "n/a"
        )
        none = v in ("plain step", "detect_anomaly")
        c = "" if none else f"{call[v]:.3f}"
        cr = "" if none else f"{call[v] / clip_call:.2f}x"
        tc = "" if none else f"{ccpu[v]:.3f}"
        tcr = "" if none else f"{ccpu[v] / clip_cpu:.2f}x"
        bg = f"{background[v] * 1e3:.3f}" if v in background else ""
        lines.append(
            f"| {v} | {m:.2f} | {extra:+.2f} | {ratio} | {c} | {cr} | {tc} | {tcr} | {bg} |"
        )
    return "\n".join(lines), med


def _thread_cpu(mon) -> float:
    """CPU seconds used so far by a monitor's background thread (the event writer's flush
    thread, which also runs the host work since #14), 0 if it has none."""
    host = getattr(mon, "_host", None)
    worker = getattr(host, "worker", None) if host is not None else None
    thread = getattr(worker, "_thread", None)
    if thread is None:  # before #14: the writer's own flush thread
        sink = mon.core.sink if mon.core is not None else None
        thread = getattr(sink.writer, "_thread", None) if sink is not None else None
    if thread is None or thread.ident is None or not thread.is_alive():
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _trimmed_mean(ts, drop=0.005):
    ts = sorted(ts)
    return statistics.fmean(ts[: max(1, len(ts) - int(len(ts) * drop))])


def _dots(grads):
    return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads])


def norms_vs_bandwidth(reps=200, compile_=False):
    """graddiag's norm pass vs one read of all gradient bytes at the measured read bandwidth."""
    from graddiag.torch import Plan, sum_squares

    big = torch.randn(64 * 1024 * 1024 // 4)  # 64 MB: read bandwidth with a dot
    t = []
    for _ in range(10):
        t0 = time.perf_counter()
        torch.dot(big, big)
        t.append(time.perf_counter() - t0)  # noqa: E702
    bw = big.numel() * 4 / statistics.median(t)
    out = [
        "\n### Norm pass vs memory bandwidth\n",
        f"Measured read bandwidth (dot over 64 MB): {bw / 1e9:.1f} GB/s\n",
        "| model | gradient bytes | `_foreach_norm` (ms) | per-tensor `dot` (ms) "
        "| graddiag norm pass (ms) | one read at bandwidth (ms) | graddiag / one read |"
        + (" `torch.compile`'d dots (ms) |" if compile_ else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if compile_ else ""),
    ]

    def med(f):
        for _ in range(10):  # warm up allocator and caches
            f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for name, model, make_x, _ in models():
        model(make_x()).square().mean().backward()
        params = list(model.parameters())
        grads = [p.grad for p in params]
        plan = Plan(
            list(range(len(params))),
            params,
            np.zeros(len(params), dtype=np.int64),
            params[0].device,
        )
        fe = med(lambda: torch.stack(torch._foreach_norm(grads)).square())  # noqa: B023
        dots = med(lambda: _dots(grads))  # noqa: B023
        m = med(lambda: sum_squares(grads, plan, params[0].device).sum())  # noqa: B023
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        compiled = ""
        if compile_:  # the per-tensor sums of squares as one torch.compile'd function
            t0 = time.perf_counter()
            fn = torch.compile(_dots, dynamic=False)
            fn(grads)
            took = time.perf_counter() - t0
            c = med(lambda: fn(grads))  # noqa: B023
            compiled = f" {c * 1e3:.3f} (compiling: {took:.0f} s) |"
        out.append(
            f"| {name} | {nbytes / 1e6:.1f} MB | {fe * 1e3:.3f} | {dots * 1e3:.3f} | {m * 1e3:.3f} "
            f"| {nbytes / bw * 1e3:.3f} | {m / (nbytes / bw):.2f}x |{compiled}"
        )
    return "\n".join(out)


def many_tensors(tmp, reps=60):
    """Per-step cost against the number of tensors and the gradient bytes: graddiag's call
    (every=10, defaults, global-norm clipping) and `clip_grad_norm_`'s, on gradients set by hand
    (no forward/backward: a 5,000-layer net's would dominate), fitted as a + b*bytes + c*tensors.
    """
    rows, fit = [], {"graddiag": [], "clip_grad_norm_": []}
    for n in (200, 5000, 10000):
        for width in (8, 32):
            model = nn.Sequential(*[nn.Linear(width, width) for _ in range(n // 2)])
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            nbytes = sum(p.numel() * 4 for p in model.parameters())
            mon = GradientMonitor(
                model, None, logdir=tempfile.mkdtemp(dir=tmp), clip=GlobalNormClip(1e9)
            )
            params = list(model.parameters())
            t_gd, t_clip = [], []
            for r in range(reps + 5):  # interleaved
                t0 = time.thread_time()  # CPU of this thread: immune to preemption
                mon.step()
                t1 = time.thread_time()
                torch.nn.utils.clip_grad_norm_(params, 1e9)
                t2 = time.thread_time()
                if r >= 5:
                    t_gd.append(t1 - t0)
                    t_clip.append(t2 - t1)
            bg = _thread_cpu(mon) / (reps + 5) * 1e3
            mon.close()
            gd, cl = _trimmed_mean(t_gd) * 1e3, _trimmed_mean(t_clip) * 1e3
            fit["graddiag"].append((nbytes, n, gd))
            fit["clip_grad_norm_"].append((nbytes, n, cl))
            rows.append(
                f"| {n} | {width}x{width} | {nbytes / 1e6:.2f} MB | {gd:.2f} | {bg:.2f} | {cl:.2f} "
                f"| {gd / cl:.2f}x |"
            )
    out = [
        "\n### Many tensors\n",
        "| tensors | layer | gradient bytes | graddiag call, thread CPU (ms) "
        "| + background thread CPU (ms) | clip_grad_norm_, thread CPU (ms) | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Least-squares fit of the training thread's CPU per step = a + b x gradient bytes + "
        "c x tensors:",
        "",
    ]
    for name, pts in fit.items():
        a = np.asarray([(1.0, b / 1e6, k) for b, k, _ in pts])
        y = np.asarray([t for _, _, t in pts])
        (c0, per_mb, per_t), *_ = np.linalg.lstsq(a, y, rcond=None)
        out.append(
            f"- {name}: {c0:.3f} ms + {per_mb:.3f} ms per MB + {per_t * 1e3:.2f} µs per tensor"
        )
    return "\n".join(out)


def logging_cost(tmp, n=2000):
    w = EventFileWriter(tempfile.mkdtemp(dir=tmp))
    tags = tuple(f"graddiag/grad_norm/blocks.{i}.fc" for i in range(200))
    vals = np.random.rand(200)
    ts = []
    for s in range(n):
        t0 = time.perf_counter()
        w.add_scalars(s, tags, vals)
        ts.append(time.perf_counter() - t0)
    w.close()
    m = statistics.median(ts) * 1e6
    return f"\n### Logging\n\nOne event with 200 scalars: {m:.1f} µs median ({m / 200:.3f} µs per scalar).\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="run the models whose name contains this")
    ap.add_argument("--no-extras", action="store_true", help="skip the bandwidth/logging parts")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded machine)")
    ap.add_argument(
        "--skip",
        default=None,
        help="leave out the variants whose name has one of these (comma-separated)",
    )
    ap.add_argument("--many", action="store_true", help="the many-tensor cost fit")
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd sums of squares"
    )
    ap.add_argument("--before", default=None, help="folder holding a renamed graddiag_before")
    args = ap.parse_args(argv)
    if args.before:
        global BEFORE
        sys.path.insert(0, args.before)
        import graddiag_before
        import graddiag_before.clip
        import graddiag_before.torch

        BEFORE = graddiag_before
        logging.getLogger("graddiag_before").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    global SKIP
    SKIP = args.skip
    torch.set_flush_denormal(True)  # the deep ReLU net's tiny gradients would time denormal math
    logging.getLogger("graddiag").setLevel(logging.ERROR)  # the models' findings are not the point
    parts = [
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; {args.reps} steps per variant, medians.\n"
        f"Command: `python benchmarks/bench_torch.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, make_x, max_norm in models():
            if args.only not in name:
                continue
            table, _ = bench_model(name, model, make_x, max_norm, args.reps, tmp)
            print(table, flush=True)
            parts.append(table)
        if args.many:
            parts.append(many_tensors(tmp))
            print(parts[-1], flush=True)
        if not args.no_extras:
            parts.append(norms_vs_bandwidth(compile_=args.compile))
            parts.append(logging_cost(tmp))
            print(parts[-2], parts[-1])
    text = "\n".join(parts)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
