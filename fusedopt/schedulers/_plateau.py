"""ReduceLROnPlateau: cut the learning rate when a monitored metric stops improving."""

from __future__ import annotations

import warnings
from math import inf
from typing import Any, SupportsFloat

from torch.optim import Optimizer
from torch.optim import lr_scheduler as _torch_lr_scheduler

from . import _curves as curves
from ._base import EPOCH_WARNING, KEEP, LRScheduler, group_values, require_optimizer, set_group_lrs

__all__ = ["ReduceLROnPlateau"]


class ReduceLROnPlateau(LRScheduler, _torch_lr_scheduler.ReduceLROnPlateau):
    """Multiply the learning rate by ``factor`` once a metric has not improved for ``patience`` steps.

    Formula: a metric ``a`` improves on the best seen when ``a < best * (1 - threshold)``
    (mode ``min``, ``rel``), ``a < best - threshold`` (``min``, ``abs``),
    ``a > best * (1 + threshold)`` (``max``, ``rel``) or ``a > best + threshold``
    (``max``, ``abs``). After more than ``patience`` steps without improvement
    (bad steps during a cooldown do not count),
    ``lr <- max(lr * factor, min_lr)`` unless that changes it by ``eps`` or less,
    and a cooldown of ``cooldown`` steps begins.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        mode (str): ``"min"`` or ``"max"``: whether the metric should fall or rise. Default: ``"min"``.
        factor (float): multiplicative reduction, ``< 1``. Default: 0.1.
        patience (int): bad steps tolerated before reducing. Default: 10.
        threshold (float): minimum change that counts as improvement. Default: 1e-4.
        threshold_mode (str): ``"rel"`` or ``"abs"``. Default: ``"rel"``.
        cooldown (int): steps to wait after a reduction before counting again. Default: 0.
        min_lr (float or list): lower bound, for all groups or per group. Default: 0.
        eps (float): reductions of at most ``eps`` are skipped. Default: 1e-8.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: list[float] | float = 0,
        eps: float = 1e-8,
    ) -> None:
        if factor >= 1.0:
            raise ValueError(f"factor must be < 1.0, got {factor}")
        self.factor = factor
        require_optimizer(optimizer)
        self.optimizer = optimizer

        n_groups = len(optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != n_groups:
                raise ValueError(f"min_lr: need one value per param group ({n_groups}), got {len(min_lr)}")
            self.default_min_lr = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * n_groups

        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = group_values(optimizer, "lr")
        self._init_is_better(mode=mode, threshold=threshold, threshold_mode=threshold_mode)
        self._reset()

    def _init_is_better(self, mode, threshold, threshold_mode) -> None:
        # (torch raises TypeError for a mode that is not a string, ValueError for another one)
        if mode not in ("min", "max"):
            raise (ValueError if isinstance(mode, str) else TypeError)(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise (ValueError if isinstance(threshold_mode, str) else TypeError)(
                f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.mode_worse = inf if mode == "min" else -inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    def _reset(self) -> None:
        """Forget the best metric and clear the bad-step and cooldown counters."""
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _is_better(self, a, best) -> bool:
        return curves.plateau_improved(a, best, self.mode, self.threshold_mode, self.threshold)

    def step(self, metrics: SupportsFloat, epoch=None) -> None:  # type: ignore[override]
        """Record a value of the monitored metric and reduce the lr if it has plateaued.

        Args:
            metrics (float or 0-dim tensor): the metric's current value.
            epoch (int, optional): deprecated; sets ``last_epoch``.
        """
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch

        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1

        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0

        if self.num_bad_epochs > self.patience:
            self._reduce_lr(epoch)
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

        self._last_lr = group_values(self.optimizer, "lr")

    def _reduce_lr(self, epoch) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"The optimizer has {len(groups)} param groups but ReduceLROnPlateau was "
                    f"created with {len(self.min_lrs)} min_lrs (was a param group added?); "
                    "set `min_lrs` to one value per param group."
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        # All new values are computed before any is written.
        updates = []
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = curves.plateau_reduced_lr(old_lr, self.factor, min_lr)
            updates.append(new_lr if old_lr - new_lr > self.eps else KEEP)
        set_group_lrs(self.optimizer, updates)

    def get_lr(self) -> list:
        """Not used: the learning rate changes only in :meth:`step`, from the metric."""
        raise NotImplementedError("ReduceLROnPlateau sets learning rates in step(metrics)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state (fusedopt's or torch's layout).

        Args:
            state_dict (dict): the scheduler state.
        """
        self.__dict__.update(state_dict)
        self._init_is_better(
            mode=self.mode, threshold=self.threshold, threshold_mode=self.threshold_mode
        )
