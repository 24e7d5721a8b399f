"""Per-step overhead of graddiag under 2-process DDP and FSDP2 (gloo, CPU, one thread per rank).

    python benchmarks/bench_distributed.py [--reps 60] [--out FILE.md]

Each variant trains its own copy of the same model in the same process group; variants run
round-robin (one step each per round) so load and drift hit all of them alike. Reported: the
median wall time and the median CPU time (all threads of the process) of a whole step (forward,
backward with its all-reduce / reduce-scatter, optimizer step) on rank 0, and their ratios to
plain training and to training with torch's own `clip_grad_norm_` (graddiag with `clip=`
replaces that call).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from graddiag.clip import GlobalNormClip
from graddiag.torch import GradientMonitor

MAX_NORM = 1.0


def models():
    """(name, build(), batch())"""

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(512, 512), nn.ReLU())])

    def deep():
        torch.manual_seed(0)
        return nn.Sequential(*[m for _ in range(50) for m in (nn.Linear(64, 64), nn.ReLU())])

    return [
        ("MLP 6x512 (1.6M parameters), batch 32 per rank", mlp, lambda: torch.randn(32, 512)),
        ("MLP 50x64 (100 tensors), batch 32 per rank", deep, lambda: torch.randn(32, 64)),
    ]


def _variant(wrap, logdir, monitor: bool, clip: bool, torch_clip: bool):
    """make(build) for one variant: `wrap(net)` is the module that runs forward (and that the
    monitor is given)."""

    def build(factory):
        net = factory()
        fwd = wrap(net)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        if monitor:
            GradientMonitor(
                fwd, opt, logdir=logdir(), clip=GlobalNormClip(MAX_NORM) if clip else None
            )

        def step(loss):
            opt.zero_grad()
            loss.backward()
            if torch_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM)
            opt.step()

        return fwd, step

    return build


def ddp_variants(logdir):
    """name -> make(build) -> (forward module, step(loss))"""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def ddp(net):
        return nn.parallel.DistributedDataParallel(net)

    def ddp_python_hook(net):  # what replacing DDP's C++ all-reduce by a Python hook costs
        wrapped = ddp(net)
        wrapped.register_comm_hook(None, default_hooks.allreduce_hook)
        return wrapped

    return {
        "DDP": _variant(ddp, logdir, False, False, False),
        "DDP + clip_grad_norm_": _variant(ddp, logdir, False, False, True),
        "DDP + torch's Python allreduce_hook": _variant(
            ddp_python_hook, logdir, False, False, False
        ),
        "DDP + graddiag": _variant(ddp, logdir, True, False, False),
        "DDP + graddiag clip=": _variant(ddp, logdir, True, True, False),
    }


def fsdp_variants(logdir):
    from torch.distributed.fsdp import fully_shard

    def shard(net):
        for m in net:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        return fully_shard(net)

    return {
        "FSDP2": _variant(shard, logdir, False, False, False),
        "FSDP2 + clip_grad_norm_": _variant(shard, logdir, False, False, True),
        "FSDP2 + graddiag": _variant(shard, logdir, True, False, False),
        "FSDP2 + graddiag clip=": _variant(shard, logdir, True, True, False),
    }


def measure(variants, factory, batch, reps):
    """Per variant: median wall time and median CPU time (all threads of this process) of a
    step, in ms. CPU time counts this rank's own work, so it is less disturbed by other jobs
    on a loaded machine than wall time is."""
    built = {name: make(factory) for name, make in variants.items()}
    wall = {name: [] for name in built}
    cpu = {name: [] for name in built}
    torch.manual_seed(dist.get_rank())
    for r in range(reps + 5):
        x = batch()
        for name, (fwd, step) in built.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step(fwd(x).square().mean())
            if r >= 5:  # warm-up rounds left out
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {
        name: (statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3)
        for name in built
    }


def table(title, med, plain, clip):
    lines = [
        f"### {title}",
        "",
        f"| variant | wall (ms) | / {plain} | / {clip} | CPU (ms) | / {plain} | / {clip} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (ms, cpu) in med.items():
        lines.append(
            f"| {name} | {ms:.2f} | {ms / med[plain][0]:.3f} | {ms / med[clip][0]:.3f} "
            f"| {cpu:.2f} | {cpu / med[plain][1]:.3f} | {cpu / med[clip][1]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def worker(rank, world, port, reps, out):
    torch.set_num_threads(1)
    logging.getLogger("graddiag").setLevel(logging.ERROR)  # findings of a random model: noise
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    tmp = tempfile.mkdtemp()
    count = iter(range(10**6))

    def logdir():  # every monitor its own run (rank 0 writes)
        return os.path.join(tmp, f"run{next(count)}")

    parts = []
    for title, factory, batch in models():
        med = measure(ddp_variants(logdir), factory, batch, reps)
        parts.append(table(f"DDP, {title}", med, "DDP", "DDP + clip_grad_norm_"))
        med = measure(fsdp_variants(logdir), factory, batch, reps)
        parts.append(table(f"FSDP2, {title}", med, "FSDP2", "FSDP2 + clip_grad_norm_"))
    dist.destroy_process_group()
    if rank == 0:
        text = "\n".join(parts)
        print(text)
        if out:
            with open(out, "w") as f:
                f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args.reps, args.out), nprocs=2)


if __name__ == "__main__":
    sys.exit(main())
