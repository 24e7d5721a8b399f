"""integrations.lightning.GradDiagCallback: real gradients of `Trainer.fit`, measured before
Lightning's clipping, numbered by `trainer.global_step`, logged beside the TensorBoardLogger's."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import graddiag  # noqa: E402
from graddiag.clip import AutoClip, GlobalNormClip  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402

try:  # a checkout first (an editable install maps graddiag.integrations to its own tree)
    from integrations.lightning import GradDiagCallback
except ImportError:  # installed: graddiag.integrations
    from graddiag.integrations.lightning import GradDiagCallback

#: float32 norms of the same gradients computed by two code paths.
REL = 1e-5
LAYERS = ["enc", "mid", "head"]
BATCH = 8
QUIET = {"spike": False}


class Net(torch.nn.Module):
    def __init__(self, side: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(4, 8)
        self.mid = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)
        self.side = torch.nn.Linear(4, 1) if side else None

    def forward(self, x):
        out = self.head(torch.tanh(self.mid(torch.tanh(self.enc(x)))))
        if self.side is not None:  # trainable, but cut from the loss: detached
            out = out + 0.0 * self.side(x).detach()
        return out


class Module(L.LightningModule):
    def __init__(self, net: torch.nn.Module, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if batch_idx == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class GradCopy(L.Callback):
    """Each step's per-layer gradient norms as Lightning hands them to the optimizer hooks."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        net = pl_module.net
        self.norms.append(
            [
                math.sqrt(
                    sum(float(p.grad.double().square().sum()) for p in getattr(net, n).parameters())
                )
                for n in LAYERS
            ]
        )


def data(n_batches: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(
        torch.randn(n_batches * BATCH, 4, generator=g),
        torch.randn(n_batches * BATCH, 1, generator=g),
    )
    return torch.utils.data.DataLoader(ds, batch_size=BATCH)


def trainer(tmp_path, callbacks, logger=True, **kwargs):
    if logger is True:
        logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    kwargs.setdefault("max_epochs", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=callbacks,
            **kwargs,
        )


def fit(tr, module, loader, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(module, loader, **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_logged_norms_are_lightnings_gradients_under_accumulation(precision, tmp_path):
    ref = GradCopy()
    cb = GradDiagCallback(every=2, detectors=QUIET, print_summary=False)
    tr = trainer(tmp_path, [ref, cb], precision=precision, accumulate_grad_batches=2)
    fit(tr, Module(Net()), data(8))
    cb.close()
    hist = cb.monitor.history
    assert [s.step for s in hist] == list(range(tr.global_step)) == [0, 1, 2, 3]
    np.testing.assert_allclose([s.grad_norm for s in hist], ref.norms, rtol=REL)
    assert [s.backward_calls for s in hist[1:]] == [2, 2, 2]
    log_dir = tr.logger.log_dir
    assert cb.monitor.logdir == log_dir
    df = graddiag.read(log_dir)
    df = df[df.stat == "grad_norm"].pivot_table(index="step", columns="layer", values="value")
    np.testing.assert_allclose(df[["net." + n for n in LAYERS]].to_numpy(), ref.norms, rtol=REL)


def _plain_loop_findings(net, loader, steps):
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with GradientMonitor(net, opt, every=2, detectors=QUIET) as mon:
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    return mon.findings


def test_detached_layer_is_reported_as_the_plain_loop_reports_it(tmp_path):
    loader = data(6)
    plain = _plain_loop_findings(Net(side=True), loader, 6)
    cb = GradDiagCallback(every=2, detectors=QUIET, print_summary=False)
    fit(trainer(tmp_path, [cb]), Module(Net(side=True)), loader)
    cb.close()
    got = {(f.kind, f.layer, f.step, f.severity) for f in cb.findings}
    assert ("detached", "net.side", 5, "warning") in got
    want = {(f.kind, "net." + f.layer if f.layer else None, f.step, f.severity) for f in plain}
    assert got == want


def test_nan_step_is_reported_at_its_step_and_layer_and_skipped(tmp_path):
    module = Module(Net(), nan_at=2)
    cb = GradDiagCallback(every=10, nonfinite="skip", detectors=QUIET, print_summary=False)
    fit(trainer(tmp_path, [cb], logger=False), module, data(4))
    [f] = [f for f in cb.findings if f.kind == "nonfinite"]
    assert (f.step, f.layer) == (2, "net.head")
    assert cb.monitor.history[2].skipped
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert cb.monitor.logdir == str(tmp_path / "graddiag")  # no TensorBoardLogger: its own


def test_graddiag_clip_replaces_gradient_clip_val(tmp_path):
    ref = GradCopy()
    fit(
        trainer(tmp_path, [ref], logger=False, gradient_clip_val=0.05), Module(lt := Net()), data(4)
    )
    cb = GradDiagCallback(
        False, every=1, clip=GlobalNormClip(0.05), detectors=QUIET, print_summary=False
    )
    fit(trainer(tmp_path, [cb], logger=False), Module(ours := Net()), data(4))
    cb.close()
    for a, b in zip(lt.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    pre = [math.hypot(*n) for n in ref.norms]  # measured before clipping, as Lightning saw them
    np.testing.assert_allclose([s.global_norm for s in cb.monitor.history], pre, rtol=REL)
    assert all(s.clip_coef < 1 for s in cb.monitor.history)


def test_adaptive_clip_and_gradient_clip_val_together_fail_at_setup(tmp_path):
    cb = GradDiagCallback(False, clip=AutoClip(10.0), print_summary=False)
    with pytest.raises(ValueError, match="gradient_clip_val=1.0"):
        fit(trainer(tmp_path, [cb], logger=False, gradient_clip_val=1.0), Module(Net()), data(2))


def test_resumed_fit_continues_the_step_count_in_one_run(tmp_path):
    module = Module(Net())
    cb = GradDiagCallback(every=3, detectors=QUIET, print_summary=False)
    tr = trainer(tmp_path, [cb], max_epochs=1)
    fit(tr, module, data(4))
    tr.save_checkpoint(tmp_path / "last.ckpt")
    cb.close()
    again = GradDiagCallback(every=3, detectors=QUIET, print_summary=False)
    tr2 = trainer(tmp_path, [again], max_epochs=2)
    fit(tr2, Module(Net()), data(4), ckpt_path=tmp_path / "last.ckpt")
    again.close()
    assert [s.step for s in again.monitor.history] == [4, 5, 6, 7] and tr2.global_step == 8
    report = graddiag.analyze(tr.logger.log_dir)
    [run] = [r for r in report.runs if r.source == "graddiag"]
    assert run.steps.tolist() == list(range(8))


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="`every`.*0"):
        GradDiagCallback(every=0)
    with pytest.raises(ValueError, match="`nonfinite`.*'never'"):
        GradDiagCallback(nonfinite="never")
    with pytest.raises(ValueError, match="`logdir`.*3"):
        GradDiagCallback(logdir=3)
    with pytest.raises(ValueError, match="Unknown detector"):
        GradDiagCallback(detectors={"explode": True})


def test_the_pytorch_lightning_package_gets_its_own_callback_class(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    try:
        from integrations.pytorch_lightning import GradDiagCallback as PLCallback
    except ImportError:
        from graddiag.integrations.pytorch_lightning import GradDiagCallback as PLCallback
    cb = PLCallback(False, every=1, print_summary=False)
    assert isinstance(cb, pl.Callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = pl.Trainer(
            accelerator="cpu",
            logger=False,
            max_epochs=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cb],
        )

        class PLModule(pl.LightningModule):
            training_step = Module.training_step
            configure_optimizers = Module.configure_optimizers

            def __init__(self):
                super().__init__()
                self.net, self.nan_at = Net(), None

        tr.fit(PLModule(), data(2))
    assert [s.step for s in cb.monitor.history] == [0, 1]


def test_lightning_example_finds_the_detached_head(tmp_path):
    import lightning_fit

    cb = lightning_fit.run(str(tmp_path), epochs=1)
    got = {(f.kind, f.layer, f.step) for f in cb.findings}
    assert got == {("detached", "aux", 7)}
    assert cb.monitor.logdir == str(tmp_path / "version_0")
