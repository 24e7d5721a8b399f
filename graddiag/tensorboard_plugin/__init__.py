"""TensorBoard's *Gradients* tab for graddiag logs (a dynamic plugin, see docs/dashboard.md).

TensorBoard finds `GradientsPlugin` through the ``tensorboard_plugins`` entry point of the
installed wheel; ``tensorboard --logdir runs/`` then shows the tab.
"""

from graddiag.tensorboard_plugin.plugin import GradientsPlugin, run_payload

__all__ = ["GradientsPlugin", "run_payload"]
