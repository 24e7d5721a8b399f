"""A tiny GPT-2 (built from a config: no download) trained by the Hugging Face `Trainer`, with
one graddiag callback.

A hook plants a NaN in one layer's gradient at step 3, as a bad batch or an overflow would:
graddiag names the layer and the step, skips that update (`nonfinite="skip"`), and puts a short
summary into the Trainer's logs. Gradients are measured before the Trainer's `max_grad_norm`
clipping, which the callback then applies itself (same result).

    PYTHONPATH=. python examples/hf_trainer.py [--logdir runs/hf]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

try:  # installed: graddiag.integrations; from a checkout: the integrations/ folder
    from graddiag.integrations.huggingface import GradDiagCallback
except ImportError:
    from integrations.huggingface import GradDiagCallback

BROKEN = "transformer.h.1.mlp.c_proj"


def run(logdir: str | None = None, steps: int = 8) -> tuple[GradDiagCallback, Trainer]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    )
    calls = []

    def nan_at_step_3(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 4 else grad

    model.get_submodule(BROKEN).weight.register_hook(nan_at_step_3)
    ids = torch.randint(0, 128, (64, 24))
    data = [{"input_ids": t, "labels": t} for t in ids]
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="graddiag-hf-"),
        max_steps=steps,
        per_device_train_batch_size=8,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    cb = GradDiagCallback(logdir, every=4, nonfinite="skip", print_summary=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    cb.close()
    return cb, trainer


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--logdir", default=None, help="TensorBoard run directory")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    cb, trainer = run(a.logdir, a.steps)
    print(cb.monitor.summary())
    print("Trainer logs:", [h for h in trainer.state.log_history if "graddiag/findings" in h])
    print(f"TensorBoard logs: {cb.monitor.logdir}  (tensorboard --logdir {cb.monitor.logdir})")
