"""graddiag: make neural-network training explain its own gradients."""

from graddiag.findings import KINDS, SEVERITIES, Finding

__version__ = "0.1.0"

__all__ = ["KINDS", "SEVERITIES", "Finding", "__version__"]
