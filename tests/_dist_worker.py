"""One rank of a real process group for tests/test_distributed_torch.py (not a test module).

``python _dist_worker.py NAME:ARG[,NAME:ARG...] RANK WORLD PORT OUT``: joins a gloo process group
on 127.0.0.1:PORT, runs the scenarios one after the other and writes each one's result to
``OUT/<NAME>-<ARG>/rank<RANK>.json`` (its logs under ``OUT/<NAME>-<ARG>/logs``). The problem (model, data,
optimizer) is defined here once, so the test process can train the same problem unsharded in one
process as the reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)

STEPS = 6
GLOBAL_BATCH = 8
NAN_STEP = 2
MAX_NORM = 0.05  # small enough that every step is clipped


def clip_policy(name: str):
    """The clipping of an FSDP2 scenario: "clip" (global norm), "chain" (value, then global norm:
    the norm is measured again after the element-wise step), "agc" (per output unit), else none."""
    from graddiag.clip import AGC, GlobalNormClip, ValueClip

    if name == "clip":
        return GlobalNormClip(MAX_NORM)
    if name == "chain":
        return [ValueClip(0.01), GlobalNormClip(MAX_NORM)]
    if name == "agc":
        return AGC(0.01)
    return None


def make_model(kind: str = "plain") -> nn.Module:
    """The problem's model (seeded); "frozen_unused" adds a frozen layer and an unused one."""
    torch.manual_seed(0)
    if kind == "plain":
        return nn.Sequential(
            nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 1)
        )
    return FrozenUnused()


class FrozenUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.frozen(torch.tanh(self.inp(x))))


def batch(step: int, rank: int | None = None, world: int = 2, nan: bool = False):
    """The global batch of `step`, or rank `rank`'s contiguous slice of it (NaN planted in one
    input element when `nan`)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 4, generator=g)
    y = torch.randn(GLOBAL_BATCH, 1, generator=g)
    if rank is not None:
        x, y = x.chunk(world)[rank].clone(), y.chunk(world)[rank].clone()
    if nan:
        x[0, 0] = float("nan")
    return x, y


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def fsdp2(net: nn.Module) -> nn.Module:
    """`fully_shard` on each Linear layer, then on the root (FSDP2's recipe)."""
    from torch.distributed.fsdp import fully_shard

    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    return fully_shard(net)


def history(mon) -> list[dict]:
    def arr(a):
        return None if a is None else [float(v) for v in a]

    return [
        {
            "step": s.step,
            "global_norm": float(s.global_norm),
            "grad_norm": arr(s.grad_norm),
            "clip_coef": s.clip_coef,
            "grad_max": arr(s.grad_max),
            "zero_frac": arr(s.zero_frac),
            "param_norm": arr(s.param_norm),
            "update_ratio": arr(s.update_ratio),
            "skipped": s.skipped,
        }
        for s in mon.history
    ]


def full_params(model) -> list[list[float]]:
    from torch.distributed.tensor import DTensor

    out = []
    for p in model.parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out.append(t.detach().reshape(-1).tolist())
    return out


def micro_batches(step: int, rank: int | None, world: int, micro: int):
    """Gradient accumulation: rank `rank`'s slice of the global batch in `micro` pieces; for the
    one-process reference (`rank` None), piece k of every rank's slice, concatenated."""
    x, y = batch(step)
    xs = [c.chunk(micro) for c in x.chunk(world)]
    ys = [c.chunk(micro) for c in y.chunk(world)]
    if rank is not None:
        return [(xs[rank][k], ys[rank][k]) for k in range(micro)]
    return [
        (torch.cat([xs[r][k] for r in range(world)]), torch.cat([ys[r][k] for r in range(world)]))
        for k in range(micro)
    ]


def train(
    model, opt, rank, world, steps=STEPS, nan_rank=None, clip=None, train_model=None, micro=1
):
    """Train `steps` steps on rank `rank`'s slices (`train_model`: what to call, e.g. the DDP
    wrapper; `clip`: torch's own clip_grad_norm_ to this norm, returning the norms; `micro` > 1:
    accumulate that many backward passes per step, DDP synchronizing only the last)."""
    fwd = train_model or model
    norms = []
    for step in range(steps):
        opt.zero_grad()
        if micro > 1:
            pieces = micro_batches(step, rank, world, micro)
            for k, (x, y) in enumerate(pieces):
                last = k == len(pieces) - 1
                sync = last or not hasattr(fwd, "no_sync")
                with contextlib.nullcontext() if sync else fwd.no_sync():
                    loss_of(fwd, x, y).backward()
        else:
            nan = nan_rank is not None and rank == nan_rank and step == NAN_STEP
            x, y = batch(step, rank, world, nan=nan)
            loss_of(fwd, x, y).backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
    return norms


def scenario(name: str, arg: str, rank: int, world: int, out: str) -> dict:
    import torch.distributed as dist

    from graddiag.clip import GlobalNormClip
    from graddiag.torch import GradientMonitor, NonFiniteGradientError

    logdir = os.path.join(out, "logs")
    res: dict = {}
    if (
        name == "ddp"
    ):  # arg: the monitor is given the "wrapped" DDP, or the "module" (per rank logs)
        net = make_model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = optimizer(net)
        target = ddp if arg == "wrapped" else net
        mon = GradientMonitor(
            target,
            opt,
            logdir=logdir,
            every=4,
            detail_every=2,
            hist_every=3,
            flush_secs=0,
            per_rank_logs=arg == "module",  # every rank writes (rank k into logs/rank<k>)
        )
        train(net, opt, rank, world, train_model=ddp)
        mon.close()
        res.update(layers=mon.layers, history=history(mon), params=full_params(net))
        res["findings"] = [f.to_dict() for f in mon.findings]
        res["comm_hooks"] = len(ddp._comm_hooks)  # graddiag's flagging all-reduce
    elif name in ("ddp_nan", "fsdp_nan"):  # arg: the non-finite policy
        net = make_model()
        if name == "ddp_nan":
            fwd = target = nn.parallel.DistributedDataParallel(net)
        else:
            fwd = target = fsdp2(net)
        opt = optimizer(net)
        mon = GradientMonitor(target, opt, logdir=logdir, every=4, nonfinite=arg, flush_secs=0)
        try:
            train(net, opt, rank, world, train_model=fwd, nan_rank=1)
        except NonFiniteGradientError as e:
            res["raised"] = str(e)
            res["raised_step"] = e.finding.step
        t = torch.ones(1)
        dist.all_reduce(t)  # a collective after the NaN: a rank left behind would hang here
        res["after"] = float(t)
        mon.close()
        res["findings"] = [f.to_dict() for f in mon.findings if f.kind == "nonfinite"]
        res["skipped"] = [s.step for s in mon.history if s.skipped]
        res["params"] = full_params(net)
        res["params_finite"] = bool(np.isfinite(np.concatenate(res["params"])).all())
    elif name == "ddp_accum":  # two backward passes per step, the first under no_sync()
        net = make_model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = optimizer(net)
        mon = GradientMonitor(ddp, opt, every=4, detail_every=2)
        train(net, opt, rank, world, train_model=ddp, micro=2)
        mon.close()
        res.update(history=history(mon), params=full_params(net))
        res["findings"] = [f.to_dict() for f in mon.findings]
    elif name == "ddp_unused":
        net = make_model("frozen_unused")
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = optimizer(net)
        mon = GradientMonitor(ddp, opt, logdir=logdir, every=4, flush_secs=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(net, opt, rank, world, steps=1, train_model=ddp)
        mon.close()
        res["warnings"] = [str(w.message) for w in caught if "graddiag" in str(w.message)]
        res["findings"] = [f.to_dict() for f in mon.findings]
        res["layers"] = mon.layers
    elif name == "ddp_clip":
        net = make_model()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = optimizer(net)
        mon = GradientMonitor(ddp, opt, clip=GlobalNormClip(MAX_NORM), every=2)
        train(net, opt, rank, world, train_model=ddp)
        mon.close()
        ref = make_model()
        ref_ddp = nn.parallel.DistributedDataParallel(ref)
        ref_opt = optimizer(ref)
        norms = train(ref, ref_opt, rank, world, train_model=ref_ddp, clip=MAX_NORM)
        res.update(history=history(mon), params=full_params(net), ref_params=full_params(ref))
        res["torch_norms"] = norms
    elif name == "fsdp":  # arg: "stats" or "clip"

        def sharded():
            return fsdp2(make_model())

        net = sharded()
        opt = optimizer(net)
        clip = clip_policy(arg)
        mon = GradientMonitor(
            net, opt, logdir=logdir, every=4, detail_every=2, hist_every=3, clip=clip, flush_secs=0
        )
        train(net, opt, rank, world)
        mon.close()
        res.update(layers=mon.layers, history=history(mon), params=full_params(net))
        res["findings"] = [f.to_dict() for f in mon.findings]
        if arg == "clip":  # FSDP's own recipe: clip_grad_norm_ on the DTensor gradients
            ref = sharded()
            ref_opt = optimizer(ref)
            res["torch_norms"] = train(ref, ref_opt, rank, world, clip=MAX_NORM)
            res["ref_params"] = full_params(ref)
    elif name == "refused":  # models graddiag refuses at construction, with its reason
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        fully_shard(net[0], mesh=init_device_mesh("cpu", (world,)))
        fully_shard(net[1], mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("r", "s")))
        fsdp1 = FullyShardedDataParallel(nn.Linear(4, 4), device_id=torch.device("cpu"))
        for key, model in (("two_meshes", net), ("fsdp1", fsdp1)):
            try:
                GradientMonitor(model, logdir=None)
                res[key] = None
            except ValueError as e:
                res[key] = str(e)
        dist.barrier()  # rank 0 hosts the store the other rank's mesh groups still use
    else:
        raise ValueError(f"unknown scenario {name!r}")
    return res


def main() -> None:
    scenarios, rank, world, port, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for item in scenarios.split(","):  # one process group for several scenarios, in order
            name, arg = item.split(":")
            where = os.path.join(out, f"{name}-{arg}")
            os.makedirs(where, exist_ok=True)
            res = scenario(name, arg, rank, world, where)
            with open(os.path.join(where, f"rank{rank}.json"), "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Results are on disk and the group is destroyed: leave without interpreter teardown, where
    # a C++ thread left by gloo was once seen to abort the process ("terminate called without an
    # active exception", 1 run in ~6, after every result was written) — not what these tests check.
    sys.stdout.flush()
    os._exit(0)
