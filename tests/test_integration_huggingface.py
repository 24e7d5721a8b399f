"""integrations.huggingface.GradDiagCallback: a tiny GPT-2 (built from a config, no download)
trained by the `Trainer`; gradients measured before its clipping, numbered by `global_step`."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,  # noqa: E402
)

import graddiag  # noqa: E402

try:  # a checkout first (an editable install maps graddiag.integrations to its own tree)
    from integrations.huggingface import GradDiagCallback
except ImportError:  # installed: graddiag.integrations
    from graddiag.integrations.huggingface import GradDiagCallback

#: float32 norms of the same gradients computed by two code paths.
REL = 1e-5
QUIET = {"spike": False, "vanishing": False}
PLANTED = "transformer.h.1.mlp.c_fc"


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def layer_norms(model) -> dict[str, float]:
    """Per-module gradient norms straight from `.grad` (each shared tensor counted once)."""
    seen: set[int] = set()
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        sq = 0.0
        for p in module.parameters(recurse=False):
            if id(p) not in seen and p.grad is not None:
                seen.add(id(p))
                sq += float(p.grad.double().square().sum())
        if sq:
            out[name] = math.sqrt(sq)
    return out


class GradCopy(TrainerCallback):
    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(layer_norms(model))


def train(tmp_path, callbacks=(), model=None, resume=None, **kwargs) -> Trainer:
    kwargs.setdefault("max_steps", 4)
    kwargs.setdefault("save_strategy", "no")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **kwargs,
    )
    trainer = Trainer(
        model=model or tiny_gpt2(),
        args=args,
        train_dataset=Tokens(),
        callbacks=list(callbacks),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_logged_norms_are_the_trainers_gradients_under_accumulation(bf16, tmp_path):
    ref = GradCopy()
    cb = GradDiagCallback(tmp_path / "tb", every=2, detectors=QUIET, print_summary=False)
    trainer = train(tmp_path, [ref, cb], bf16=bf16, gradient_accumulation_steps=2)
    cb.close()
    hist = cb.monitor.history
    assert [s.step for s in hist] == list(range(trainer.state.global_step)) == [0, 1, 2, 3]
    assert [s.backward_calls for s in hist[1:]] == [2, 2, 2]
    layers = cb.monitor.layers
    want = [[norms[n] for n in layers] for norms in ref.norms]
    np.testing.assert_allclose([s.grad_norm for s in hist], want, rtol=REL)
    df = graddiag.read(tmp_path / "tb")
    df = df[df.stat == "grad_norm"].pivot_table(index="step", columns="layer", values="value")
    np.testing.assert_allclose(df[layers].to_numpy(), want, rtol=REL)
    assert trainer.args.max_grad_norm == 1.0  # handed back after the run


def test_clipping_taken_over_gives_the_trainers_own_result(tmp_path):
    plain = train(tmp_path / "a", max_grad_norm=0.05)
    cb = GradDiagCallback(False, every=2, detectors=QUIET, print_summary=False)
    ours = train(tmp_path / "b", [cb], max_grad_norm=0.05)
    cb.close()
    for a, b in zip(plain.model.parameters(), ours.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(s.clip_coef < 1 for s in cb.monitor.history)  # measured before the clipping
    logged = [h["grad_norm"] for h in ours.state.log_history if "grad_norm" in h]
    pre = [s.global_norm for s in cb.monitor.history][1::2]  # the Trainer logs every 2nd step
    np.testing.assert_allclose(logged, pre, rtol=REL)


def test_nan_in_one_layer_is_reported_at_its_step_and_in_the_logs(tmp_path):
    model = tiny_gpt2()
    calls = []

    def plant(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad  # the third step (2)

    model.get_submodule(PLANTED).weight.register_hook(plant)
    cb = GradDiagCallback(False, every=4, nonfinite="skip", detectors=QUIET, print_summary=False)
    trainer = train(tmp_path, [cb], model=model)
    cb.close()
    [f] = [f for f in cb.findings if f.kind == "nonfinite"]
    assert (f.step, f.layer) == (2, PLANTED)
    assert cb.monitor.history[2].skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    [entry] = [h for h in trainer.state.log_history if h.get("graddiag/errors")]
    assert entry["step"] == 4 and f"nonfinite@2 {PLANTED}" in entry["graddiag/summary"]


def test_resuming_from_a_checkpoint_continues_the_step_count(tmp_path):
    logdir = tmp_path / "tb"
    first = GradDiagCallback(logdir, every=2, detectors=QUIET, print_summary=False)
    train(tmp_path, [first], save_strategy="steps", save_steps=4)
    first.close()
    again = GradDiagCallback(logdir, every=2, detectors=QUIET, print_summary=False)
    ckpt = tmp_path / "out" / "checkpoint-4"
    trainer = train(tmp_path, [again], max_steps=6, resume=str(ckpt))
    again.close()
    assert [s.step for s in again.monitor.history] == [4, 5] and trainer.state.global_step == 6
    [run] = graddiag.analyze(logdir).runs
    assert run.steps.tolist() == list(range(6))


def test_default_logdir_and_bad_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cb = GradDiagCallback(every=4, detectors=QUIET, print_summary=False)
    trainer = train(tmp_path, [cb], max_steps=1)
    cb.close()
    own = getattr(trainer.args, "logging_dir", None)  # gone in transformers 5
    assert cb.monitor.logdir == (own or str(tmp_path / "out" / "runs" / "graddiag"))
    with pytest.raises(ValueError, match="`every`.*0"):
        GradDiagCallback(every=0)
    with pytest.raises(ValueError, match="`clip`.*'big'"):
        GradDiagCallback(clip="big")
    with pytest.raises(ValueError, match="`logdir`.*3"):
        GradDiagCallback(logdir=3)


def test_importable_as_integrations_transformers():
    try:
        from integrations.transformers import GradDiagCallback as Alias
    except ImportError:
        from graddiag.integrations.transformers import GradDiagCallback as Alias
    assert Alias is GradDiagCallback


def test_hf_example_names_the_nan_layer_and_step():
    import hf_trainer

    cb, trainer = hf_trainer.run(steps=4)
    [f] = [f for f in cb.findings if f.kind == "nonfinite"]
    assert (f.step, f.layer) == (3, hf_trainer.BROKEN)
    assert trainer.state.log_history[0]["graddiag/errors"] == 1
