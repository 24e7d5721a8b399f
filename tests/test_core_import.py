"""The core must import, and work, with neither torch nor tensorflow installed."""

import subprocess
import sys
import textwrap


def test_core_imports_and_runs_without_frameworks(tmp_path):
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"torch", "tensorflow", "keras", "jax"}}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        import graddiag
        from graddiag import clip, detectors, events, monitor, stats, tags
        info = stats.ModelInfo(layers=("a", "b"))
        core = monitor.MonitorCore(info, {str(tmp_path)!r})
        s = stats.StepStats(step=0, grad_norm=np.array([1.0, 2.0]), has_grad=np.array([True, True]),
                            nonfinite=np.zeros(2), global_norm=5 ** 0.5)
        core.process(s)
        core.close()
        assert not any(m.split(".")[0] in ("torch", "tensorflow", "keras") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
