"""graddiag.reference: an independent reverse-mode autodiff engine, and gradient validation.

Import cost is NumPy only; torch and TensorFlow are imported by the importers and by
`validate` when they are used.
"""

from graddiag.reference.engine import Tensor, apply
from graddiag.reference.forward import jvp, vjp
from graddiag.reference.gradcheck import check_grads, numerical_gradient, relative_error
from graddiag.reference.jacobian import jacobian
from graddiag.reference.ops import RULES


def validate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - forwards to validate.validate
    """Compare a torch or Keras model's gradients with the engine's; see `validate.validate`."""
    from graddiag.reference.validate import validate as _validate

    return _validate(*args, **kwargs)


__all__ = [
    "RULES", "Tensor", "apply", "check_grads", "jacobian", "jvp", "numerical_gradient",
    "relative_error", "validate", "vjp",
]
