"""Logging never stops training: a write failure (disk full, logdir deleted or replaced) warns
once, keeps the events in memory (bounded), retries at the next flush, and never raises from a
step, a hook or `close()`; what was written stays readable."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import graddiag
from graddiag.events import EventFileWriter, WriteFailureWarning
from graddiag.monitor import MonitorCore
from graddiag.stats import ModelInfo, StepStats


class DiskFull:
    """Makes `os.write` fail with ENOSPC on the event files under `root` (other fds untouched);
    with `partial`, the first failing call writes half its bytes first, as a filling disk does."""

    def __init__(self, monkeypatch, root, partial: bool = False) -> None:
        self.real = os.write
        self.root = os.path.realpath(root)
        self.full = True
        self.partial = partial
        self.failures = 0
        monkeypatch.setattr(os, "write", self)

    def _ours(self, fd: int) -> bool:
        try:
            return os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")).startswith(self.root)
        except OSError:
            return False

    def __call__(self, fd, data):
        if self.full and self._ours(fd):
            self.failures += 1
            if self.partial:
                self.partial = False
                return self.real(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


def _stats(step: int, n: int = 3) -> StepStats:
    rng = np.random.default_rng(step)
    return StepStats(
        step=step,
        grad_norm=rng.uniform(0.5, 1.5, n),
        has_grad=np.ones(n, bool),
        nonfinite=np.zeros(n, np.int64),
        global_norm=1.0,
    )


def _core(logdir, **kw) -> MonitorCore:
    info = ModelInfo(layers=("a", "b", "c"), param_counts=(1, 2, 3))
    return MonitorCore(info, logdir, detectors={}, close_at_exit=False, **kw)


def _logged_steps(logdir) -> list[int]:
    df = graddiag.read(logdir)
    return sorted(set(df[df.stat == "grad_norm"].step.tolist()))


def test_disk_full_warns_once_keeps_events_and_writes_them_when_space_returns(
    tmp_path, monkeypatch
):
    logdir = tmp_path / "run"
    core = _core(logdir, flush_secs=0)
    disk = DiskFull(monkeypatch, logdir)
    with pytest.warns(WriteFailureWarning, match=r"cannot write.*run.*No space left") as rec:
        for step in range(20):
            core.process(_stats(step))
        core.flush()
    assert len(rec) == 1  # one warning for the whole episode
    assert disk.failures >= 20  # every flush retried
    assert core.sink.writer.pending_bytes > 0
    disk.full = False
    core.process(_stats(20))
    core.close()
    assert _logged_steps(logdir) == list(range(21))


def test_a_record_cut_by_a_full_disk_is_finished_by_the_retry(tmp_path, monkeypatch):
    logdir = tmp_path / "run"
    core = _core(logdir, flush_secs=0)
    disk = DiskFull(monkeypatch, logdir, partial=True)
    with pytest.warns(WriteFailureWarning):
        for step in range(5):
            core.process(_stats(step))
    size = os.path.getsize(core.sink.writer.path)
    disk.full = False
    core.close()
    assert os.path.getsize(core.sink.writer.path) > size  # appended, never rewritten
    df = graddiag.read(logdir)
    assert df.attrs["read_stats"]["corrupt_records"] == 0
    assert _logged_steps(logdir) == list(range(5))


def test_unwritten_events_are_bounded_and_the_drop_is_noted(tmp_path, monkeypatch):
    w = EventFileWriter(tmp_path, flush_secs=0, max_pending_bytes=4096)
    disk = DiskFull(monkeypatch, tmp_path)
    tags = tuple(f"graddiag/grad_norm/layer{i}" for i in range(20))
    with pytest.warns(WriteFailureWarning):
        for step in range(100):
            w.add_scalars(step, tags, np.full(20, float(step)))
    assert w.pending_bytes <= 4096
    assert w.dropped_records > 0
    disk.full = False
    w.close()
    df = graddiag.read(tmp_path)
    kept = sorted(set(df.step.tolist()))
    assert kept[-1] == 99 and len(kept) < 100  # the newest are kept, the oldest dropped
    notes = df.attrs["read_stats"]["notes"]
    assert any(f"dropped {w.dropped_records} event(s)" in n for n in notes)


def test_deleted_logdir_is_recreated_with_the_run_description(tmp_path):
    logdir = tmp_path / "run"
    core = _core(logdir, flush_secs=0)
    for step in range(5):
        core.process(_stats(step))
    shutil.rmtree(logdir)
    for step in range(5, 10):
        core.process(_stats(step))
    core.close()
    assert _logged_steps(logdir) == list(range(5, 10))
    df = graddiag.read(logdir)
    assert df.attrs["meta"]["."]["info"]["layers"] == ["a", "b", "c"]  # header repeated


def test_logdir_replaced_by_a_file_never_raises(tmp_path):
    logdir = tmp_path / "run"
    core = _core(logdir, flush_secs=0)
    core.process(_stats(0))
    shutil.rmtree(logdir)
    logdir.write_text("not a directory")
    with pytest.warns(WriteFailureWarning, match="run"):
        for step in range(1, 5):
            core.process(_stats(step))
        core.close()
    assert logdir.read_text() == "not a directory"


def test_flush_thread_retries_without_new_steps(tmp_path, monkeypatch):
    logdir = tmp_path / "run"
    core = _core(logdir, flush_secs=0.05)
    disk = DiskFull(monkeypatch, logdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WriteFailureWarning)
        for step in range(3):
            core.process(_stats(step))
        _wait(lambda: disk.failures >= 2)
        disk.full = False
        _wait(lambda: core.sink.writer.pending_bytes == 0)
    assert _logged_steps(logdir) == [0, 1, 2]  # written by the thread, before close
    core.close()


def _wait(cond, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


# ---- through the real torch monitor ------------------------------------------------------------
def _train(mon_or_none, model, opt, steps, torch):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()


def test_torch_monitor_trains_through_a_full_disk_and_close(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    logdir = tmp_path / "run"
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = GradientMonitor(model, opt, logdir=logdir, every=5, flush_secs=0)
    disk = DiskFull(monkeypatch, logdir)
    with pytest.warns(WriteFailureWarning, match="No space left"):
        _train(mon, model, opt, 60, torch)
        mon.close()  # flushes into the full disk: warns, does not raise
    assert disk.failures > 0
    assert [s.step for s in mon.history][-1] == 59  # diagnosis went on in memory


def test_torch_monitor_user_exception_is_not_replaced_by_a_failing_close(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    logdir = tmp_path / "run"
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WriteFailureWarning)
        with pytest.raises(KeyError, match="the user's own"):
            with GradientMonitor(model, opt, logdir=logdir, every=5, flush_secs=0):
                DiskFull(monkeypatch, logdir)
                _train(None, model, opt, 12, torch)
                raise KeyError("the user's own")


def test_torch_monitor_writes_after_logdir_deleted_mid_training(tmp_path):
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    logdir = tmp_path / "run"
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, opt, logdir=logdir, every=5, flush_secs=0) as mon:
        _train(mon, model, opt, 10, torch)
        shutil.rmtree(logdir)
        _train(mon, model, opt, 10, torch)
    assert _logged_steps(logdir) == list(range(10, 20))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 200 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        r = None
    if r is None or r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def test_torch_training_on_a_real_full_tmpfs(tiny_tmpfs):
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    logdir = tiny_tmpfs / "run"
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.warns(WriteFailureWarning, match="No space left"):
        with GradientMonitor(
            model, opt, logdir=logdir, every=1, flush_secs=0, detail_every=1, hist_every=1
        ) as mon:
            for _ in range(150):
                opt.zero_grad()
                model(torch.randn(4, 16)).square().mean().backward()
                opt.step()
    assert mon.history[-1].step == 149
    df = graddiag.read(logdir)  # what fit on the disk reads back, in order, from step 0
    steps = sorted(set(df[df.stat == "grad_norm"].step.tolist()))
    assert steps == list(range(len(steps))) and len(steps) > 5


def test_keras_fit_trains_through_a_full_disk(tmp_path, monkeypatch):
    """`model.fit` with `GradDiagCallback` on a full disk: training finishes, one warning, the
    diagnosis goes on in memory, and the steps are written once space returns."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    from graddiag.integrations.keras import GradDiagCallback

    logdir = tmp_path / "run"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    cb = GradDiagCallback(logdir=logdir, every=2, flush_secs=0, print_summary=False)
    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    disk = DiskFull(monkeypatch, logdir)
    with pytest.warns(WriteFailureWarning, match="No space left"):
        model.fit(x, x[:, :1], batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    assert disk.failures > 0 and int(model.optimizer.iterations) == 16
    assert [s.step for s in cb.monitor.history][-1] == 15
    disk.full = False
    cb.close()
    assert _logged_steps(logdir) == list(range(16))
