"""Schedulers whose value is a fixed function of the epoch.

LambdaLR, MultiplicativeLR, StepLR, MultiStepLR, ConstantLR, LinearLR,
ExponentialLR, PolynomialLR, CosineAnnealingLR and CosineAnnealingWarmRestarts.
The arithmetic is in :mod:`fusedopt.schedulers._curves`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from torch.optim import Optimizer

from . import _curves as curves
from ._base import (
    LRScheduler,
    _flag,
    callable_state,
    group_values,
    refuse_unless,
    restore_callable_state,
    set_group_lrs,
)

__all__ = [
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
]


def _lambdas_per_group(optimizer: Optimizer, lr_lambda, require_callable: bool) -> list:
    n_groups = len(optimizer.param_groups)
    if isinstance(lr_lambda, (list, tuple)):
        if len(lr_lambda) != n_groups:
            raise ValueError(
                f"lr_lambda: need one function per param group ({n_groups}), got {len(lr_lambda)}"
            )
        fns = list(lr_lambda)
    else:
        fns = [lr_lambda] * n_groups
    if require_callable:
        for fn in fns:
            if not callable(fn):
                raise TypeError(f"lr_lambda must be callable, got {type(fn).__name__}")
    return fns


class _LambdaStateMixin:
    """state_dict support for schedulers holding ``lr_lambdas``."""

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state; lambdas are saved only when they are callable objects."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        state["lr_lambdas"] = [callable_state(fn) for fn in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; saved callable objects get their attributes back.

        Args:
            state_dict (dict): the scheduler state.
        """
        state = dict(state_dict)
        saved = state.pop("lr_lambdas")
        extra = [fn_state for fn_state in saved[len(self.lr_lambdas):] if fn_state is not None]
        if extra:
            # torch indexes its lambdas by the saved entries and raises IndexError for these;
            # here before anything is loaded
            raise IndexError(
                f"the state saves {len(saved)} lr_lambdas, the scheduler has "
                f"{len(self.lr_lambdas)}: it was saved with more param groups"
            )
        self.__dict__.update(state)
        for fn, fn_state in zip(self.lr_lambdas, saved):
            restore_callable_state(fn, fn_state)


class LambdaLR(_LambdaStateMixin, LRScheduler):
    """Learning rate = initial learning rate times a user function of the epoch.

    Formula: ``lr_t = base_lr * lr_lambda(t)``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        lr_lambda (callable or list): ``f(epoch) -> factor``, or one per param group.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        self.optimizer = optimizer
        self.lr_lambdas = _lambdas_per_group(optimizer, lr_lambda, require_callable=False)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """``base_lr * lr_lambda(last_epoch)`` for each group."""
        self._warn_if_outside_step()
        t = self.last_epoch
        return [
            curves.lambda_lr(base, fn(t))
            for fn, base in zip(self.lr_lambdas, self.base_lrs, strict=True)
        ]


class MultiplicativeLR(_LambdaStateMixin, LRScheduler):
    """Multiply the current learning rate by a user function of the epoch.

    Formula: ``lr_t = lr_{t-1} * lr_lambda(t)`` (unchanged at creation).

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        lr_lambda (callable or list): ``f(epoch) -> factor``, or one per param group.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
    ) -> None:
        self.optimizer = optimizer
        self.lr_lambdas = _lambdas_per_group(optimizer, lr_lambda, require_callable=True)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """``lr * lr_lambda(last_epoch)`` for each group."""
        self._warn_if_outside_step()
        if self._is_initial:
            return self._current_lrs()
        t = self.last_epoch
        groups = self.optimizer.param_groups
        return [group["lr"] * fn(t) for fn, group in zip(self.lr_lambdas, groups, strict=True)]


class StepLR(LRScheduler):
    """Decay the learning rate by ``gamma`` every ``step_size`` epochs.

    Formula: ``lr_t = base_lr * gamma ** floor(t / step_size)``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        step_size (int): period of the decay, in epochs.
        gamma (float): multiplicative decay factor. Default: 0.1.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """Current lrs, times ``gamma`` when ``last_epoch`` is a positive multiple of ``step_size``."""
        self._warn_if_outside_step()
        return self._scaled_lrs(curves.step_decay_factor(self.gamma, self.last_epoch, self.step_size))

    def _get_closed_form_lr(self) -> list:
        return [
            curves.step_decay(base, self.gamma, self.last_epoch, self.step_size)
            for base in self.base_lrs
        ]


class MultiStepLR(LRScheduler):
    """Decay the learning rate by ``gamma`` at each milestone epoch.

    Formula: ``lr_t = base_lr * gamma ** (number of milestones <= t)``; a
    milestone listed ``n`` times decays by ``gamma ** n``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        milestones (iterable of int): epochs at which to decay.
        gamma (float): multiplicative decay factor. Default: 0.1.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Iterable[int],
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = Counter(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """Current lrs, times ``gamma ** count`` when ``last_epoch`` is a milestone."""
        self._warn_if_outside_step()
        return self._scaled_lrs(
            curves.multistep_decay_factor(self.gamma, self.last_epoch, self.milestones)
        )

    def _get_closed_form_lr(self) -> list:
        ordered = sorted(self.milestones.elements())
        return [
            curves.multistep_decay(base, self.gamma, self.last_epoch, ordered)
            for base in self.base_lrs
        ]


class ConstantLR(LRScheduler):
    """Scale the learning rate by a constant ``factor`` for the first ``total_iters`` epochs.

    Formula: ``lr_t = base_lr * factor`` for ``t < total_iters``, ``base_lr`` after.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        factor (float): the scale, in ``[0, 1]``. Default: 1/3.
        total_iters (int): number of epochs scaled. Default: 5.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        factor: float = 1.0 / 3,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        if factor > 1.0 or factor < 0:
            raise ValueError(f"ConstantLR factor must lie in [0, 1], got {factor}")
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """Current lrs times ``factor`` at epoch 0 and ``1 / factor`` at ``total_iters``."""
        self._warn_if_outside_step()
        return self._scaled_lrs(
            curves.constant_warmup_factor(self.factor, self.last_epoch, self.total_iters)
        )

    def _get_closed_form_lr(self) -> list:
        return [
            curves.constant_warmup(base, self.factor, self.last_epoch, self.total_iters)
            for base in self.base_lrs
        ]


class LinearLR(LRScheduler):
    """Scale the learning rate by a factor moving linearly from ``start_factor`` to ``end_factor``.

    Formula: ``lr_t = base_lr * (s + (e - s) * min(t, total_iters) / total_iters)``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        start_factor (float): factor at epoch 0, in ``(0, 1]``. Default: 1/3.
        end_factor (float): factor from ``total_iters`` on, in ``[0, 1]``. Default: 1.0.
        total_iters (int): epochs taken to reach ``end_factor``. Default: 5.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError(f"LinearLR start_factor must lie in (0, 1], got {start_factor}")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError(f"LinearLR end_factor must lie in [0, 1], got {end_factor}")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """Current lrs times the ratio of consecutive linear factors."""
        self._warn_if_outside_step()
        t = self.last_epoch
        if t != 0 and self._is_initial:
            return self._current_lrs()
        return self._scaled_lrs(
            curves.linear_warmup_factor(self.start_factor, self.end_factor, t, self.total_iters)
        )

    def _get_closed_form_lr(self) -> list:
        return [
            curves.linear_warmup(
                base, self.start_factor, self.end_factor, self.last_epoch, self.total_iters
            )
            for base in self.base_lrs
        ]


class ExponentialLR(LRScheduler):
    """Decay the learning rate by ``gamma`` every epoch.

    Formula: ``lr_t = base_lr * gamma ** t``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        gamma (float): multiplicative decay factor.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """Current lrs times ``gamma`` (unchanged at creation)."""
        self._warn_if_outside_step()
        if self._is_initial:
            return self._current_lrs()
        return self._scaled_lrs(self.gamma)

    def _get_closed_form_lr(self) -> list:
        return [curves.exponential_decay(base, self.gamma, self.last_epoch) for base in self.base_lrs]


class PolynomialLR(LRScheduler):
    """Decay the learning rate polynomially to zero over ``total_iters`` epochs.

    Formula: ``lr_t = base_lr * (1 - min(t, total_iters) / total_iters) ** power``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        total_iters (int): epochs until the learning rate reaches 0. Default: 5.
        power (float): the polynomial's power. Default: 1.0.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int = 5,
        power: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        self.total_iters = total_iters
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """Current lrs times the ratio of consecutive polynomial factors."""
        self._warn_if_outside_step()
        if self._is_initial:
            return self._current_lrs()
        return self._scaled_lrs(
            curves.polynomial_decay_factor(self.last_epoch, self.total_iters, self.power)
        )

    def _get_closed_form_lr(self) -> list:
        return [
            curves.polynomial_decay(base, self.last_epoch, self.total_iters, self.power)
            for base in self.base_lrs
        ]


class CosineAnnealingLR(LRScheduler):
    """Anneal the learning rate along a cosine from ``base_lr`` to ``eta_min`` over ``T_max`` epochs.

    Formula: ``lr_t = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``,
    applied in its chainable form
    ``lr_t = eta_min + (lr_{t-1} - eta_min) * (1 + cos(pi t / T_max)) / (1 + cos(pi (t-1) / T_max))``.
    Past ``T_max`` the curve continues (rises again); it does not restart.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        T_max (int): half period, in epochs.
        eta_min (float): minimum learning rate. Default: 0.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """Next learning rates on the cosine, from the current ones."""
        self._warn_if_outside_step()
        t, T_max, eta_min = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current_lrs()
        if self._step_count == 1 and t > 0:
            return self._get_closed_form_lr()
        groups = self.optimizer.param_groups
        if curves.cosine_annealing_restart_due(t, T_max):
            return [
                curves.cosine_annealing_restart_step(group["lr"], base, eta_min, T_max)
                for base, group in zip(self.base_lrs, groups, strict=True)
            ]
        return [curves.cosine_annealing_step(group["lr"], eta_min, t, T_max) for group in groups]

    def _get_closed_form_lr(self) -> list:
        return [
            curves.cosine_annealing(base, self.eta_min, self.last_epoch, self.T_max)
            for base in self.base_lrs
        ]


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing with warm restarts (SGDR), period growing by ``T_mult`` after each restart.

    Formula: ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``,
    where ``T_cur`` counts epochs since the last restart and ``T_i`` is the
    current period (``T_0`` first, then ``T_0 * T_mult ** n``). ``step(epoch)``
    accepts fractional epochs (e.g. ``epoch + batch / n_batches``).

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        T_0 (int): epochs until the first restart.
        T_mult (int): growth factor of the period after each restart. Default: 1.
        eta_min (float): minimum learning rate. Default: 0.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_0: int,
        T_mult: int = 1,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        refuse_unless("T_0", T_0, lambda v: not (v <= 0 or not isinstance(v, int)), "a positive int")
        refuse_unless("T_mult", T_mult, lambda v: not (v < 1 or not isinstance(v, int)), "an int >= 1")
        if not isinstance(eta_min, (float, int)):
            raise ValueError(f"eta_min must be a float or int, got {type(eta_min).__name__}")
        self.T_0 = T_0
        self.T_i = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        """``cosine_annealing(base_lr, eta_min, T_cur, T_i)`` for each group."""
        self._warn_if_outside_step()
        return [
            curves.cosine_annealing(base, self.eta_min, self.T_cur, self.T_i)
            for base in self.base_lrs
        ]

    def step(self, epoch: float | None = None) -> None:
        """Advance by one epoch, or jump to ``epoch`` (may be fractional; may be called per batch).

        Args:
            epoch (float, optional): the epoch to move to.
        """
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur, self.T_i = curves.warm_restart_advance(self.T_cur, self.T_i, self.T_mult)
        else:
            if epoch < 0:
                raise ValueError(f"epoch must be >= 0, got {epoch}")
            if epoch >= self.T_0 and self.T_mult == 1:
                # torch leaves T_i alone in this case; it equals T_0 unless edited.
                self.T_cur = curves.warm_restart_position(epoch, self.T_0, 1)[0]
            else:
                self.T_cur, self.T_i = curves.warm_restart_position(epoch, self.T_0, self.T_mult)
        self.last_epoch = math.floor(epoch)
        with _flag(self, "_get_lr_called_within_step"):
            values = self.get_lr()
        set_group_lrs(self.optimizer, values)
        self._last_lr = group_values(self.optimizer, "lr")
