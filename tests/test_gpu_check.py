"""scripts/gpu_check.py on the CPU: its dry run, its table and exit status, its no-CUDA message."""

import importlib.util
import os
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gpu_check(monkeypatch):
    import graddiag.torch.monitor as torch_monitor

    # the dry run swaps in CUDA's read path; monkeypatch restores it after the test
    monkeypatch.setattr(torch_monitor, "_reads_delayed", torch_monitor._reads_delayed)
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py")
    )
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", mod)  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_on_the_cpu_passes_and_prints_one_table(gpu_check, capsys):
    code = gpu_check.main(["--cpu", "--reps", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    checks = [r.split("|")[1].strip() for r in rows[1:]]
    assert sum(c.startswith("overhead ") for c in checks) == 9  # 3 models x 3 settings
    assert sum(c.startswith("no host sync") for c in checks) == 2
    assert "reference engine GPU check" in checks
    assert "FAIL" not in out and "all checks passed" in out


def test_a_sync_on_an_ordinary_step_fails_the_check(gpu_check, monkeypatch):
    """The read counter sees a read the monitor makes on an ordinary step."""
    import graddiag.torch.monitor as torch_monitor

    monkeypatch.setattr(torch_monitor, "_reads_delayed", lambda device: True)
    orig = torch_monitor.GradientMonitor._on_step

    def reads_every_step(self, *a, **k):
        report = orig(self, *a, **k)
        float(self.params[0].grad.sum())  # a host read
        return report

    monkeypatch.setattr(torch_monitor.GradientMonitor, "_on_step", reads_every_step)
    rows = gpu_check.syncs(torch.device("cpu"), steps=12)
    assert [r.ok for r in rows] == [False, False]
    assert all("host reads" in r.detail and not r.detail.endswith(" 0 host reads") for r in rows)
    assert gpu_check.exit_code(rows) == 1


def test_exit_status_and_table(gpu_check):
    Row = gpu_check.Row
    rows = [Row("a", True, "x"), Row("b", None, "y")]
    assert gpu_check.exit_code(rows) == 0
    assert gpu_check.exit_code([*rows, Row("c", False, "z")]) == 1
    assert gpu_check.table(rows).splitlines()[2:] == ["| a | ok | x |", "| b | info | y |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_says_so_and_exits_2(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bad_reps_is_a_clear_error(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu", "--reps", "0"])
    assert "--reps must be at least 1, got 0" in capsys.readouterr().err
