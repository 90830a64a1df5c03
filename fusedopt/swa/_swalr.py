"""SWALR: anneal each group's learning rate to a constant ``swa_lr``, as torch's SWALR.

The curve is two pure functions below. The scheduler subclasses torch's ``LRScheduler``
(so ``isinstance`` checks, ``optimizer.step`` tracking and tensor learning rates work as
for torch's schedulers) and keeps torch's attribute names, so the state dicts of the two
load into each other.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler


def linear_anneal(t: float) -> float:
    """Fraction of the way from the current lr to swa_lr at progress t in [0, 1]."""
    return t


def cos_anneal(t: float) -> float:
    return (1 - math.cos(math.pi * t)) / 2


ANNEAL = {"cos": cos_anneal, "linear": linear_anneal}


def _progress(step: int, anneal_epochs: int) -> float:
    return max(0, min(1, step / max(1, anneal_epochs)))


def swa_lr_step(lr, swa_lr, step: int, anneal_epochs: int, anneal) -> Any:
    """The learning rate after scheduler step `step` (1 for the first call after
    construction), given the group's current lr.

    The schedule is closed-form in the lr the group had when annealing began; that lr is
    recovered from the current one, which keeps the scheduler chainable like torch's: each
    step moves the lr the way the curve moves between step-1 and step.
    """
    if anneal_epochs == 0:
        step = max(1, step)
    prev_alpha = anneal(_progress(step - 1, anneal_epochs))
    start = swa_lr if prev_alpha == 1 else (lr - prev_alpha * swa_lr) / (1 - prev_alpha)
    alpha = anneal(_progress(step, anneal_epochs))
    return swa_lr * alpha + start * (1 - alpha)


def _per_group(name: str, optimizer, value) -> list:
    groups = optimizer.param_groups
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"{name} must have the same length as optimizer.param_groups. "
                             f"{name} has {len(value)} values, param_groups has {len(groups)}.")
        return [v.clone() if isinstance(v, Tensor) else v for v in value]
    return [value.clone() if isinstance(value, Tensor) else value for _ in groups]


class SWALR(LRScheduler):
    """Anneals each parameter group's learning rate to ``swa_lr`` over ``anneal_epochs``
    steps, then holds it, as :class:`torch.optim.swa_utils.SWALR`.

    Args:
        optimizer: a torch.optim or fusedopt optimizer.
        swa_lr: the final learning rate: one for all groups, or a list with one per group
            (stored as ``group["swa_lr"]``).
        anneal_epochs: steps of annealing (>= 0; default 10).
        anneal_strategy: "cos" (default) or "linear".
        last_epoch: the index of the last epoch (default -1: start fresh).
    """

    def __init__(self, optimizer, swa_lr, anneal_epochs: int = 10, anneal_strategy: str = "cos",
                 last_epoch: int = -1):
        swa_lrs = _per_group("swa_lr", optimizer, swa_lr)
        # a list, as torch's: an unhashable value is a ValueError, not a TypeError
        if anneal_strategy not in list(ANNEAL):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")
        # Written once every argument is accepted (torch writes swa_lr before it checks the
        # others), so that a refused construction leaves the optimizer as it was.
        for value, group in zip(swa_lrs, optimizer.param_groups):
            group["swa_lr"] = value
        self._set_anneal_func(anneal_strategy)
        self.anneal_epochs = anneal_epochs
        super().__init__(optimizer, last_epoch)

    def _set_anneal_func(self, anneal_strategy: str) -> None:
        self._anneal_strategy = anneal_strategy
        self.anneal_func = ANNEAL[anneal_strategy]

    def get_lr(self) -> list:
        """The next learning rate of every group (call :meth:`get_last_lr` to read the current)."""
        if not self._get_lr_called_within_step:
            warnings.warn("To get the last learning rate computed by the scheduler, please use `get_last_lr()`.",
                          UserWarning, stacklevel=2)
        step = self._step_count - 1
        return [swa_lr_step(group["lr"], group["swa_lr"], step, self.anneal_epochs, self.anneal_func)
                for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer and the anneal function (which is rebuilt from
        ``_anneal_strategy`` on load)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "anneal_func")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        self._set_anneal_func(self._anneal_strategy)
