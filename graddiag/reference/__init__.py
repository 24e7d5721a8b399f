"""graddiag.reference: an independent reverse-mode autodiff engine, and gradient validation.

Import cost is NumPy only; torch and TensorFlow are imported by the importers and by
`validate` when they are used.
"""

from graddiag.reference.engine import Tensor, apply
from graddiag.reference.forward import jvp, vjp
from graddiag.reference.gradcheck import check_grads, numerical_gradient, relative_error
from graddiag.reference.jacobian import jacobian
from graddiag.reference.ops import RULES

# Imported last and by name: the function `validate` shadows its module on this package, and
# importing it here first means a later `import graddiag.reference.validate` cannot undo that.
from graddiag.reference.validate import ValidationReport, validate  # noqa: E402

__all__ = [
    "RULES",
    "Tensor",
    "apply",
    "check_grads",
    "jacobian",
    "jvp",
    "numerical_gradient",
    "relative_error",
    "validate",
    "ValidationReport",
    "vjp",
]
