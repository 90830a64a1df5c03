"""Lightning: configure_optimizers returns a fusedopt optimizer and a OneCycleLR stepped per
batch; fit on CPU gives torch.optim's numbers, and a fit resumed from a checkpoint restores
the optimizer and scheduler state."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fusedopt
import fusedopt.schedulers

L = pytest.importorskip("lightning")

STEPS = 8


class Regressor(L.LightningModule):
    def __init__(self, optimizer_cls, scheduler_cls, backend=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.optimizer_cls, self.scheduler_cls, self.backend = optimizer_cls, scheduler_cls, backend
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        kwargs = {} if self.backend is None else {"backend": self.backend}
        opt = self.optimizer_cls(self.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
        sched = self.scheduler_cls(opt, max_lr=5e-2, total_steps=STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data():
    # Four batches an epoch: the resume test stops at an epoch's end, where a plain
    # DataLoader resumes exactly.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS // 2 * 8, 6, generator=gen)
    y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(len(x), 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def fit(module, max_steps=STEPS, ckpt_path=None, root=None, callbacks=()):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return trainer


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("scheduler_cls", [torch.optim.lr_scheduler.OneCycleLR, fusedopt.schedulers.OneCycleLR],
                         ids=["torch-OneCycleLR", "fusedopt-OneCycleLR"])
@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
def test_fit_matches_torch_optim(scheduler_cls, backend):
    ref = Regressor(torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR)
    fit(ref)
    new = Regressor(fusedopt.AdamW, scheduler_cls, backend)
    trainer = fit(new)
    assert isinstance(trainer.optimizers[0], fusedopt.AdamW)
    assert trainer.global_step == STEPS
    assert new.lrs == ref.lrs and len(set(new.lrs)) == STEPS, "the lr follows OneCycleLR, once per batch"
    for a, b in zip(params(new), params(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def interrupted_and_resumed(optimizer_cls, scheduler_cls, root):
    """Fit half the steps with Lightning's checkpoint callback, then resume a fresh module
    from that checkpoint to the end."""
    first = Regressor(optimizer_cls, scheduler_cls)
    fit(first, max_steps=STEPS // 2, root=root,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, filename="half", save_top_k=-1)])
    resumed = Regressor(optimizer_cls, scheduler_cls)
    trainer = fit(resumed, ckpt_path=root / "half.ckpt", root=root)
    return resumed, trainer.optimizers[0], torch.load(root / "half.ckpt", weights_only=False)


def test_resume_from_checkpoint_restores_optimizer_and_scheduler(tmp_path):
    # Lightning replays a batch when it resumes from this checkpoint, for torch.optim as
    # much as for fusedopt, so the resumed run is compared with torch.optim's resumed run.
    ref, ref_opt, ref_ckpt = interrupted_and_resumed(torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR,
                                                     tmp_path / "torch")
    new, opt, ckpt = interrupted_and_resumed(fusedopt.AdamW, fusedopt.schedulers.OneCycleLR, tmp_path / "fusedopt")
    assert isinstance(opt, fusedopt.AdamW)
    saved, ref_saved = ckpt["optimizer_states"][0], ref_ckpt["optimizer_states"][0]
    assert saved["param_groups"] == ref_saved["param_groups"]
    for index, entry in ref_saved["state"].items():
        assert list(saved["state"][index]) == list(entry)
        for key, value in entry.items():
            torch.testing.assert_close(saved["state"][index][key], value, rtol=1e-6, atol=1e-6)
    assert ckpt["lr_schedulers"] == ref_ckpt["lr_schedulers"]

    # The state was restored, not rebuilt: the step count goes on from the checkpoint's.
    steps = int(ref_opt.state[ref.net[0].weight]["step"])
    assert steps > STEPS // 2 and int(opt.state[new.net[0].weight]["step"]) == steps
    assert new.lrs == ref.lrs
    for a, b in zip(params(new), params(ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for p, q in zip(new.parameters(), ref.parameters()):
        for key, value in ref_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-6, atol=1e-6)
