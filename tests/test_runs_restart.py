"""Several sessions in one log directory: a restarted step count supersedes the earlier events
from that step on (TensorBoard's purge rule) with a note; concurrent monitors are kept apart."""

from __future__ import annotations

import numpy as np
import pytest

import graddiag
from graddiag.monitor import MonitorCore
from graddiag.stats import ModelInfo, StepStats


def _stats(step: int, value: float, n: int) -> StepStats:
    return StepStats(
        step=step,
        grad_norm=np.full(n, value),
        has_grad=np.ones(n, bool),
        nonfinite=np.zeros(n, np.int64),
        global_norm=value,
    )


def _core(logdir, layers) -> MonitorCore:
    info = ModelInfo(layers=tuple(layers), param_counts=tuple(1 for _ in layers))
    return MonitorCore(info, logdir, detectors={}, close_at_exit=False, flush_secs=0)


def _session(logdir, steps, value, layers=("a", "b")) -> None:
    core = _core(logdir, layers)
    for s in steps:
        core.process(_stats(s, value, len(layers)))
    core.close()


def _global(df):
    g = df[(df.stat == "grad_norm") & (df.layer == "")]
    return dict(zip(g.step.tolist(), g.value.tolist(), strict=True))


def test_resumed_run_supersedes_the_steps_after_its_checkpoint(tmp_path):
    _session(tmp_path, range(10), 1.0)  # crashed after step 9, last checkpoint at step 6
    _session(tmp_path, range(6, 14), 2.0)
    df = graddiag.read(tmp_path)
    assert df.run.nunique() == 1
    assert _global(df) == {**{s: 1.0 for s in range(6)}, **{s: 2.0 for s in range(6, 14)}}
    (note,) = df.attrs["read_stats"]["notes"]
    assert "restart at 6" in note and "4 earlier step(s) from 6 to 9" in note


def test_a_second_session_from_step_zero_supersedes_the_first(tmp_path):
    _session(tmp_path, range(5), 1.0)
    _session(tmp_path, range(3), 2.0)
    df = graddiag.read(tmp_path)
    assert _global(df) == {0: 2.0, 1: 2.0, 2: 2.0}
    assert "restart at 0" in df.attrs["read_stats"]["notes"][0]


def test_a_continued_count_is_one_run_without_a_note(tmp_path):
    _session(tmp_path, range(5), 1.0)
    _session(tmp_path, range(5, 8), 2.0)
    df = graddiag.read(tmp_path)
    assert sorted(_global(df)) == list(range(8))
    assert df.attrs["read_stats"]["notes"] == []


def test_concurrent_monitors_in_one_directory_are_kept_apart(tmp_path):
    gen = _core(tmp_path, ["g1", "g2"])
    disc = _core(tmp_path, ["d1"])
    for s in range(10):  # a GAN: both step at once, each from 0
        gen.process(_stats(s, 1.0, 2))
        disc.process(_stats(s, 5.0, 1))
    gen.close()
    disc.close()
    df = graddiag.read(tmp_path)
    assert sorted(df.run.unique()) == [".#1", ".#2"]
    by_run = {r: set(g.layer.unique()) - {""} for r, g in df.groupby("run", observed=True)}
    assert by_run == {".#1": {"g1", "g2"}, ".#2": {"d1"}}
    for run, value in ((".#1", 1.0), (".#2", 5.0)):
        assert _global(df[df.run == run]) == {s: value for s in range(10)}
    (note,) = df.attrs["read_stats"]["notes"]
    assert "at the same time" in note and ".#2" in note
    only = graddiag.read(tmp_path, run=".#2")
    assert set(only.run.unique()) == {".#2"}
    assert only.attrs["meta"][".#2"]["info"]["layers"] == ["d1"]


def test_torch_resume_from_checkpoint_through_the_monitor(tmp_path):
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    def session(start, steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with GradientMonitor(model, opt, logdir=tmp_path, every=2, start_step=start):
            for _ in range(steps):
                opt.zero_grad()
                model(torch.randn(4, 3)).square().mean().backward()
                opt.step()

    session(0, 10)
    session(4, 6)
    df = graddiag.read(tmp_path)
    assert sorted(_global(df)) == list(range(10))
    assert "restart at 4" in df.attrs["read_stats"]["notes"][0]
    g = df[(df.stat == "grad_norm") & (df.layer == "")]
    assert len(g) == 10  # each step once


def test_the_report_carries_the_reader_notes(tmp_path):
    _session(tmp_path, range(10), 1.0)
    _session(tmp_path, range(6, 14), 2.0)
    report = graddiag.analyze(tmp_path)
    assert any("restart at 6" in n for n in report.to_dict()["notes"])


def test_a_second_model_from_step_zero_is_a_run_of_its_own(tmp_path):
    # two fit() calls of two different models into one directory (Keras names a new model's
    # layers dense_2, dense_3...): the second must not supersede the first
    _session(tmp_path, range(6), 1.0, layers=("dense", "dense_1"))
    _session(tmp_path, range(4), 2.0, layers=("dense_2", "dense_3"))
    df = graddiag.read(tmp_path)
    assert sorted(df.run.unique()) == [".#1", ".#2"]
    assert _global(df[df.run == ".#1"]) == {s: 1.0 for s in range(6)}
    assert _global(df[df.run == ".#2"]) == {s: 2.0 for s in range(4)}
    (note,) = df.attrs["read_stats"]["notes"]
    assert "other layers" in note and "at the same time" not in note


def test_the_same_model_restarted_still_supersedes_and_disjoint_continuation_is_one_run(tmp_path):
    _session(tmp_path, range(5), 1.0, layers=("a", "b"))
    _session(tmp_path, range(5, 8), 3.0, layers=("c",))  # continues the count: no restart
    df = graddiag.read(tmp_path)
    assert df.run.nunique() == 1 and sorted(_global(df)) == list(range(8))


def test_a_new_run_from_step_zero_in_a_used_logdir_warns_but_a_resume_does_not(tmp_path):
    torch = pytest.importorskip("torch")
    from graddiag.host import ReusedLogdirWarning
    from graddiag.torch import GradientMonitor

    def session(**kw):
        model = torch.nn.Linear(3, 1)
        with GradientMonitor(model, logdir=tmp_path, every=1, **kw) as mon:
            model(torch.randn(4, 3)).sum().backward()
            mon.step()

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ReusedLogdirWarning)
        session()  # a fresh directory: no warning
        session(start_step=1)  # a resumed run continues: no warning
    with pytest.warns(ReusedLogdirWarning, match="already holds a graddiag run"):
        session()
