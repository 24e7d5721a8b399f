"""`Trainer.fit` with a layer cut off from the loss, diagnosed by one Lightning callback.

The model's `aux` head is trainable but its output is `.detach()`ed before it joins the loss, so
it never receives a gradient (detached: named with its layer and step, the same finding the plain
loop's monitor makes). The logs land beside Lightning's own, in the TensorBoardLogger's log_dir.

    PYTHONPATH=. python examples/lightning_fit.py [--logdir runs/lightning]
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

try:  # installed: graddiag.integrations; from a checkout: the integrations/ folder
    from graddiag.integrations.lightning import GradDiagCallback
except ImportError:
    from integrations.lightning import GradDiagCallback


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 1)
        self.aux = torch.nn.Linear(32, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.body(x)
        pred = self.head(h) + 0.1 * self.aux(h).detach()  # the bug: .detach() cuts `aux` off
        return torch.nn.functional.mse_loss(pred, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def run(logdir: str = "runs/lightning", epochs: int = 2) -> GradDiagCallback:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32
    )
    cb = GradDiagCallback(every=4, print_summary=False)  # the only graddiag line
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(logdir, name="", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regressor(), loader)
    cb.close()
    return cb


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--logdir", default="runs/lightning", help="TensorBoardLogger save_dir")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    cb = run(args.logdir, args.epochs)
    print(cb.monitor.summary())
    print(f"TensorBoard logs: {cb.monitor.logdir}  (tensorboard --logdir {cb.monitor.logdir})")
