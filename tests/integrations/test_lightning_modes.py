"""Lightning beyond configure_optimizers + OneCycleLR: manual optimization with two
optimizers toggled as in a GAN, gradient clipping (and Lightning's refusal of it for a
fused=True optimizer under mixed precision), gradient accumulation, bf16-mixed on CPU, a
ReduceLROnPlateau on a monitored metric read by LearningRateMonitor. Each run is compared
with torch.optim's same class in the same setup."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fusedopt
import fusedopt.schedulers

L = pytest.importorskip("lightning")


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)


class Model(L.LightningModule):
    def __init__(self, optim, mode="auto", **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.critic = nn.Linear(1, 1)
        self.optim, self.mode, self.kwargs = optim, mode, kwargs
        self.automatic_optimization = mode != "gan"
        self.lrs: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mode != "gan":
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss
        # Two optimizers stepped by hand, each with the other's parameters frozen.
        first, second = self.optimizers()
        self.toggle_optimizer(first)
        self.manual_backward(self.critic(self.net(x)).pow(2).mean())
        first.step()
        first.zero_grad()
        self.untoggle_optimizer(first)
        self.toggle_optimizer(second)
        self.manual_backward((self.critic(self.net(x)) - y).pow(2).mean())
        second.step()
        second.zero_grad()
        self.untoggle_optimizer(second)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def on_train_epoch_end(self):
        self.lrs.append([g["lr"] for g in self.trainer.optimizers[0].param_groups])

    def configure_optimizers(self):
        if self.mode == "gan":
            return [self.optim.Adam(self.net.parameters(), lr=1e-2, **self.kwargs),
                    self.optim.Adam(self.critic.parameters(), lr=1e-2, **self.kwargs)]
        opt = self.optim.AdamW([{"params": self.net[0].parameters(), "name": "first"},
                                {"params": self.net[2].parameters(), "lr": 3e-3}], lr=1e-2, **self.kwargs)
        if self.mode != "plateau":
            return opt
        schedulers = torch.optim.lr_scheduler if self.optim is torch.optim else fusedopt.schedulers
        # A threshold no epoch meets: the lr halves after every validation (the epochs' lrs
        # are read at each epoch's end, before that epoch's scheduler step).
        sched = schedulers.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


def fit(module, root, validate=False, **trainer_kwargs):
    monitor = L.pytorch.callbacks.LearningRateMonitor(log_momentum=True, log_weight_decay=True)
    logger = L.pytorch.loggers.CSVLogger(root) if validate else False
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=logger, enable_checkpointing=False,
                        callbacks=[monitor] if validate else [], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(module, data(), data() if validate else None)
    return trainer


def both(tmp_path, mode="auto", validate=False, optimizer_kwargs=None, **trainer_kwargs):
    """The same fit with torch.optim and with fusedopt; fusedopt's parameters must match."""
    runs = []
    for optim in (torch.optim, fusedopt):
        module = Model(optim, mode, **(optimizer_kwargs or {}))
        trainer = fit(module, tmp_path / optim.__name__, validate, **trainer_kwargs)
        runs.append((module, trainer))
    (ref, ref_trainer), (new, trainer) = runs
    assert all(isinstance(opt, fusedopt.Optimizer) for opt in trainer.optimizers)
    assert trainer.global_step == ref_trainer.global_step > 0
    moved = False
    for a, b, start in zip(new.parameters(), ref.parameters(), Model(torch.optim).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        moved |= not torch.equal(a, start)
    assert moved, "training changed the parameters"
    return ref, ref_trainer, new, trainer


def test_manual_optimization_with_two_toggled_optimizers(tmp_path):
    ref, _, new, _ = both(tmp_path, "gan")
    assert not torch.equal(new.critic.weight, Model(torch.optim).critic.weight)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_and_accumulation(tmp_path, algorithm):
    both(tmp_path, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm, accumulate_grad_batches=2)


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
def test_bf16_mixed_on_cpu(tmp_path, fused):
    both(tmp_path, optimizer_kwargs={"fused": fused}, precision="bf16-mixed")


@pytest.mark.parametrize("optim", [torch.optim, fusedopt], ids=["torch", "fusedopt"])
def test_clipping_a_fused_optimizer_is_refused_by_lightning(tmp_path, optim):
    # A fused=True optimizer unscales inside its step (_step_supports_amp_scaling), which
    # Lightning's mixed precision refuses to clip, with its own message, for both.
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(Model(optim, fused=True), tmp_path, precision="bf16-mixed", gradient_clip_val=0.5)


def test_reduce_lr_on_plateau_with_monitor_and_lr_monitor(tmp_path):
    ref, ref_trainer, new, trainer = both(tmp_path, "plateau", validate=True)
    assert new.lrs == ref.lrs == [[1e-2 / 2 ** k, 3e-3 / 2 ** k] for k in (0, 1, 2)]
    logged, ref_logged = (lr_columns(t) for t in (trainer, ref_trainer))
    assert logged == ref_logged and logged["lr-AdamW/first"] and logged["lr-AdamW/first-momentum"]


def lr_columns(trainer):
    """What LearningRateMonitor wrote to the CSV log, per column."""
    import csv
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: [row[k] for row in rows if row[k]] for k in rows[0] if k.startswith("lr-")}
