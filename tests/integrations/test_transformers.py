"""Transformers' Trainer with fusedopt: passed as `optimizers=(opt, sched)` and as
`optimizer_cls_and_kwargs`; trains like torch.optim, saves, and resumes from a checkpoint
with the optimizer state restored. The model is a tiny GPT-2 built from a config: no
downloads."""
from __future__ import annotations

import pytest
import torch

import fusedopt

transformers = pytest.importorskip("transformers")

STEPS = 6


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, length=12):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out, max_steps=STEPS, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
        weight_decay=0.1, save_steps=STEPS // 2, save_strategy="steps", logging_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, **kwargs)


def with_optimizer(optimizer_cls, out, backend=None):
    """A Trainer given a built optimizer and scheduler (`optimizers=(opt, sched)`)."""
    model = tiny_gpt2()
    kwargs = {} if backend is None else {"backend": backend}
    opt = optimizer_cls(model.parameters(), lr=3e-3, weight_decay=0.1, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / (2 * STEPS))
    return transformers.Trainer(model=model, args=arguments(out), train_dataset=Tokens(), optimizers=(opt, sched))


def with_class(optimizer_cls, out):
    """A Trainer that builds the optimizer itself (`optimizer_cls_and_kwargs`), with its
    decay / no-decay parameter groups and its own scheduler."""
    return transformers.Trainer(model=tiny_gpt2(), args=arguments(out), train_dataset=Tokens(),
                                optimizer_cls_and_kwargs=(optimizer_cls, {"lr": 3e-3, "betas": (0.9, 0.99)}))


def unwrap(opt):
    """The optimizer inside accelerate's wrapper."""
    return getattr(opt, "optimizer", opt)


def final(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def state_by_name(trainer):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in entry.items()} for p, entry in trainer.optimizer.state.items()}


# torch's for-loop AdamW and the fused paths round differently in the last bit; attention's
# key bias has a gradient of pure rounding noise, which Adam normalises into whole steps,
# so a few such elements differ by ~1e-6 after six steps of lr 3e-3.
def assert_close(a, b, rtol=1e-5, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_close(a[key], b[key], rtol, atol)
        else:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_trains_saves_and_resumes_like_torch(tmp_path, how):
    build = with_optimizer if how == "optimizers" else with_class

    ref = build(torch.optim.AdamW, tmp_path / "torch")
    ref.train()
    whole = build(fusedopt.AdamW, tmp_path / "whole")
    whole.train()
    assert isinstance(unwrap(whole.optimizer), fusedopt.AdamW)
    assert_close(final(whole), final(ref))
    assert_close(state_by_name(whole), state_by_name(ref))
    if how == "optimizer_cls_and_kwargs":
        assert [g["weight_decay"] for g in whole.optimizer.param_groups] == [0.1, 0.0]

    # The checkpoint half way holds torch's format: torch.optim.AdamW loads it as it is.
    checkpoint = tmp_path / "whole" / f"checkpoint-{STEPS // 2}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["state"] and all(int(entry["step"]) == STEPS // 2 for entry in saved["state"].values())
    unwrap(ref.optimizer).load_state_dict(saved)

    resumed = build(fusedopt.AdamW, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == STEPS
    assert resumed.lr_scheduler.state_dict()["last_epoch"] == whole.lr_scheduler.state_dict()["last_epoch"]
    # Bit for bit: the same data, the same optimizer state, the same kernels.
    for name, value in final(resumed).items():
        assert torch.equal(value, final(whole)[name]), name
    for name, entry in state_by_name(resumed).items():
        for key, value in entry.items():
            assert torch.equal(value, state_by_name(whole)[name][key]), (name, key)


def test_triton_path_matches_torch(tmp_path):
    ref = with_optimizer(torch.optim.AdamW, tmp_path / "torch")
    ref.train()
    new = with_optimizer(fusedopt.AdamW, tmp_path / "triton", backend="triton")
    new.train()
    assert_close(final(new), final(ref))
