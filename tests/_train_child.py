"""A training process for tests/test_kill.py (not a test module).

``python _train_child.py kill ROOT TRIALS SEED FLUSH_SECS EVERY``: imports torch once, then per
trial forks a child that trains (steady steps and pauses) into ``ROOT/tN`` and SIGKILLs it at a
random moment; prints one JSON line per trial (``dir``, ``kill`` time). The child appends
``step wall_time`` to ``ROOT/tN/progress`` each time a step was handed to the log writer.

``python _train_child.py train LOGDIR FLUSH_SECS EVERY``: trains until a signal arrives, appending
every finished step to ``LOGDIR/progress``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import torch

from graddiag.torch import GradientMonitor

torch.set_num_threads(1)


def train(logdir: str, flush_secs: float, every: int, seed: int, pauses: bool) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = GradientMonitor(model, opt, logdir=logdir, every=every, flush_secs=flush_secs)
    fd = os.open(os.path.join(logdir, "progress"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    logged = -1
    x = torch.randn(16, 4)
    while True:
        burst = rng.randint(20, 120) if pauses else 10**9
        for _ in range(burst):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if pauses:
                h = mon.core.history if mon.core is not None else ()
                if h and h[-1].step != logged:  # this optimizer step handed rows to the writer
                    logged = h[-1].step
                    os.write(fd, f"{logged} {time.time()!r}\n".encode())
            else:
                os.write(fd, f"{mon.step_count - 1} {time.time()!r}\n".encode())
            time.sleep(0.002)
        time.sleep(rng.uniform(0.2, 1.5))


def _warm_up() -> None:
    """Run every lazy initialisation (torch's and graddiag's) once, before forking."""
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, opt, every=2) as mon:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    assert mon.history


def kill_trials(root: str, trials: int, seed: int, flush_secs: float, every: int) -> None:
    rng = random.Random(seed)
    _warm_up()
    for k in range(trials):
        d = os.path.join(root, f"t{k}")
        os.makedirs(d)
        child_seed = rng.randrange(1 << 30)
        pid = os.fork()
        if pid == 0:
            try:
                train(d, flush_secs, every, child_seed, pauses=True)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.3, 2.5))
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(json.dumps({"dir": d, "kill": t_kill}), flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "kill":
        kill_trials(args[0], int(args[1]), int(args[2]), float(args[3]), int(args[4]))
    else:
        train(args[0], float(args[1]), int(args[2]), 0, pauses=False)
