"""The reference package imports without torch or TensorFlow (they are imported lazily)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_reference_package_imports_without_torch_or_tensorflow():
    code = textwrap.dedent("""
        import sys
        for name in ("torch", "tensorflow", "keras"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import graddiag.reference as ref
        import graddiag.reference.cli
        import graddiag.reference.importers.torch_fx
        import graddiag.reference.importers.keras
        from graddiag.reference import functional as F
        x = ref.Tensor(3.0, requires_grad=True)
        (F.tanh(x) * 2.0).backward()
        print("ok", callable(ref.validate))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok True"
