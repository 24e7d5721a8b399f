"""`graddiag.integrations.transformers`: the same callback as `graddiag.integrations.huggingface`."""

from .huggingface import GradDiagCallback

__all__ = ["GradDiagCallback"]
