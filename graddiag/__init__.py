"""graddiag: make neural-network training explain its own gradients.

The core (this package minus `graddiag.torch` / `graddiag.tf`) imports neither torch nor
tensorflow. Heavier entry points load lazily: `graddiag.validate` (reference engine),
`graddiag.read` / `graddiag.analyze` (post-hoc log analysis).
"""

from graddiag.clip import AGC, AutoClip, GlobalNormClip, LayerNormClip, ValueClip, ZClip, chain
from graddiag.findings import KINDS, SEVERITIES, Finding

__version__ = "0.1.0"

_LAZY = {
    "validate": ("graddiag.reference", "validate"),
    "read": ("graddiag.reader", "read"),
    "analyze": ("graddiag.analysis", "analyze"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'graddiag' has no attribute {name!r}")


__all__ = [
    "AGC",
    "KINDS",
    "SEVERITIES",
    "AutoClip",
    "Finding",
    "GlobalNormClip",
    "LayerNormClip",
    "ValueClip",
    "ZClip",
    "__version__",
    "analyze",
    "chain",
    "read",
    "validate",
]
