"""The Lightning callback for the `pytorch_lightning` package (see `graddiag.integrations.lightning`).

Example:
    >>> trainer = pytorch_lightning.Trainer(callbacks=[GradDiagCallback()])
"""

from __future__ import annotations

from pytorch_lightning import Callback

from .lightning import GradDiagMixin


class GradDiagCallback(GradDiagMixin, Callback):
    __doc__ = GradDiagMixin.__doc__
