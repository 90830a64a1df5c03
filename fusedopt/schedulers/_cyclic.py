"""Per-batch cyclical schedulers: CyclicLR and OneCycleLR.

Both can cycle momentum (``momentum``, or ``betas[0]`` for Adam-like
optimizers) inversely to the learning rate. Tensor hyper-parameters are
updated in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from . import _curves as curves
from ._base import (
    LRScheduler,
    callable_state,
    momentum_key,
    per_group,
    refuse_unless,
    require_optimizer,
    restore_callable_state,
    set_group_lrs,
    set_group_momentums,
)

__all__ = ["CyclicLR", "OneCycleLR"]

_CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def _momentum_bounds(scheduler, optimizer, base_momentum, max_momentum):
    """Check that momentum can be cycled and return the per-group (base, max) momentum lists.

    Only checks and reads: the groups are written by :func:`_start_momentum`, once every
    argument has been accepted, so that a refused construction leaves the optimizer as it was.
    """
    scheduler.use_beta1 = momentum_key(optimizer)
    base_momentums = per_group("base_momentum", optimizer, base_momentum)
    max_momentums = per_group("max_momentum", optimizer, max_momentum)
    return base_momentums, max_momentums


def _start_momentum(scheduler, optimizer, base_momentums, max_momentums) -> None:
    """At a fresh start, set every group's momentum to its ``max_momentum`` and record the bounds."""
    set_group_momentums(optimizer, max_momentums, scheduler.use_beta1)
    for top, bottom, group in zip(max_momentums, base_momentums, optimizer.param_groups):
        group["max_momentum"] = top
        group["base_momentum"] = bottom


class CyclicLR(LRScheduler):
    """Cyclical learning rate (CLR): cycle between ``base_lr`` and ``max_lr`` every batch.

    Formula: with ``cycle = floor(1 + t / (up + down))``, ``x = 1 + t / (up + down) - cycle``
    and ``h = x / r`` on the way up (``x <= r``, ``r = up / (up + down)``) or
    ``(x - 1) / (r - 1)`` on the way down,
    ``lr = base_lr + (max_lr - base_lr) * h * scale(cycle or t)`` and
    ``momentum = max_momentum - (max_momentum - base_momentum) * h * scale(...)``.
    Modes: ``triangular`` (scale 1), ``triangular2`` (scale ``1 / 2 ** (cycle - 1)``),
    ``exp_range`` (scale ``gamma ** t``), or a custom ``scale_fn``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        base_lr (float or list): lower learning-rate bound, per group or for all.
        max_lr (float or list): upper learning-rate bound, per group or for all.
        step_size_up (int): batches in the rising half of a cycle. Default: 2000.
        step_size_down (int, optional): batches in the falling half; defaults to ``step_size_up``.
        mode (str): ``"triangular"``, ``"triangular2"`` or ``"exp_range"``; ignored
            when ``scale_fn`` is given. Default: ``"triangular"``.
        gamma (float): base of ``exp_range``'s scale. Default: 1.0.
        scale_fn (callable, optional): custom ``scale(x)`` with values in ``[0, 1]``.
        scale_mode (str): ``"cycle"`` or ``"iterations"``: what ``scale_fn`` is
            evaluated on (only used with a custom ``scale_fn``). Default: ``"cycle"``.
        cycle_momentum (bool): also cycle momentum, inversely. Default: True.
        base_momentum (float or list): momentum at the learning-rate peak. Default: 0.8.
        max_momentum (float or list): momentum at the learning-rate trough. Default: 0.9.
        last_epoch (int): index of the last batch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_lr: float | list[float],
        max_lr: float | list[float],
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: str = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: str = "cycle",
        cycle_momentum: bool = True,
        base_momentum: float = 0.8,
        max_momentum: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        require_optimizer(optimizer)
        self.optimizer = optimizer

        # Every argument is checked before the first group is written (torch writes base_lr
        # first), so that a refused construction leaves the optimizer as it was.
        base_lrs = per_group("base_lr", optimizer, base_lr)
        self.max_lrs = per_group("max_lr", optimizer, max_lr)
        for low, high in zip(base_lrs, self.max_lrs):
            try:
                high - low  # torch's first use of the bounds, in the initial step
            except TypeError:
                raise TypeError(f"base_lr and max_lr must be numbers, got {low!r} and {high!r}") from None

        up = float(step_size_up)
        down = float(step_size_down) if step_size_down is not None else up
        self.total_size = up + down
        self.step_ratio = up / self.total_size

        if mode not in _CYCLIC_MODES and scale_fn is None:
            raise ValueError(
                f"mode must be one of {_CYCLIC_MODES} unless a scale_fn is given, got {mode!r}"
            )
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode
        self._init_scale_fn()

        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.base_momentums, self.max_momentums = _momentum_bounds(
                self, optimizer, base_momentum, max_momentum
            )

        if last_epoch == -1:
            set_group_lrs(optimizer, base_lrs)
            if cycle_momentum:
                _start_momentum(self, optimizer, self.base_momentums, self.max_momentums)
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def _init_scale_fn(self) -> None:
        """The built-in modes fix what the scale is a function of."""
        if self._scale_fn_custom is None:
            self.scale_mode = "iterations" if self.mode == "exp_range" else "cycle"

    def scale_fn(self, x) -> float:
        """The amplitude scale at ``x`` (cycle number or iteration, per ``scale_mode``)."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return curves.triangular_scale(x)
        if self.mode == "triangular2":
            return curves.triangular2_scale(x)
        return curves.exp_range_scale(self.gamma, x)

    def get_lr(self) -> list:
        """Learning rates at batch ``last_epoch``; also writes the cycled momentum."""
        self._warn_if_outside_step()
        t = self.last_epoch
        cycle, height = curves.cyclic_position(t, self.total_size, self.step_ratio)
        x = cycle if self.scale_mode == "cycle" else t
        lrs = [
            curves.cyclic_lr(low, high, height, self.scale_fn(x))
            for low, high in zip(self.base_lrs, self.max_lrs, strict=True)
        ]
        if self.cycle_momentum:
            momentums = [
                curves.cyclic_momentum(low, high, height, self.scale_fn(x))
                for low, high in zip(self.base_momentums, self.max_momentums, strict=True)
            ]
            set_group_momentums(self.optimizer, momentums, self.use_beta1)
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state; a custom ``scale_fn`` is saved only if it is a callable object."""
        state = super().state_dict()
        state["_scale_fn_custom"] = callable_state(self._scale_fn_custom)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state (fusedopt's or torch's CyclicLR layout).

        Args:
            state_dict (dict): the scheduler state.
        """
        state = dict(state_dict)
        fn_state = state.pop("_scale_fn_custom", None)
        state.pop("_scale_fn_ref", None)
        if fn_state is not None and self._scale_fn_custom is None:
            # torch raises AttributeError here (on None.__dict__), after loading the rest
            raise AttributeError(
                "the state holds the attributes of a custom scale_fn object, and this CyclicLR "
                "has no scale_fn to restore them into: build it with the scale_fn it was saved with"
            )
        super().load_state_dict(state)
        if self._scale_fn_custom is not None:
            restore_callable_state(self._scale_fn_custom, fn_state)
        self._init_scale_fn()


class OneCycleLR(LRScheduler):
    """The 1cycle policy: warm up to ``max_lr``, then anneal far below the start, once.

    Formula: phases ``initial_lr -> max_lr -> min_lr`` (or, with ``three_phase``,
    ``initial_lr -> max_lr -> initial_lr -> min_lr``), each interpolated by
    ``anneal_cos(a, b, p) = b + (a - b) / 2 * (1 + cos(pi p))`` or
    ``anneal_linear(a, b, p) = a + (b - a) p``, where ``p`` is the fraction of the
    phase done; ``initial_lr = max_lr / div_factor``, ``min_lr = initial_lr / final_div_factor``.
    Momentum runs the other way between ``max_momentum`` and ``base_momentum``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        max_lr (float or list): peak learning rate, per group or for all.
        total_steps (int, optional): batches in the cycle; else ``epochs * steps_per_epoch``.
        epochs (int, optional): epochs, used with ``steps_per_epoch``.
        steps_per_epoch (int, optional): batches per epoch, used with ``epochs``.
        pct_start (float): fraction of the cycle spent rising. Default: 0.3.
        anneal_strategy (str): ``"cos"`` or ``"linear"``. Default: ``"cos"``.
        cycle_momentum (bool): also cycle momentum, inversely. Default: True.
        base_momentum (float or list): momentum at the peak. Default: 0.85.
        max_momentum (float or list): momentum at the ends. Default: 0.95.
        div_factor (float): ``initial_lr = max_lr / div_factor``. Default: 25.
        final_div_factor (float): ``min_lr = initial_lr / final_div_factor``. Default: 1e4.
        three_phase (bool): use three phases instead of two. Default: False.
        last_epoch (int): index of the last batch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float | list[float],
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        require_optimizer(optimizer)
        self.optimizer = optimizer

        if total_steps is not None:
            refuse_unless("total_steps", total_steps,
                          lambda v: not (v <= 0 or not isinstance(v, int)), "a positive int")
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            if not isinstance(epochs, int) or epochs <= 0:
                raise ValueError(f"epochs must be a positive int, got {epochs!r}")
            if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
                raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("OneCycleLR needs total_steps, or both epochs and steps_per_epoch")

        ends = curves.one_cycle_phase_ends(self.total_steps, pct_start, three_phase)
        if three_phase:
            route = [
                ("initial_lr", "max_lr", "max_momentum", "base_momentum"),
                ("max_lr", "initial_lr", "base_momentum", "max_momentum"),
                ("initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        else:
            route = [
                ("initial_lr", "max_lr", "max_momentum", "base_momentum"),
                ("max_lr", "min_lr", "base_momentum", "max_momentum"),
            ]
        # The layout of torch's ``_schedule_phases``, so state dicts interoperate.
        self._schedule_phases = [
            {
                "end_step": end,
                "start_lr": lr_from,
                "end_lr": lr_to,
                "start_momentum": m_from,
                "end_momentum": m_to,
            }
            for end, (lr_from, lr_to, m_from, m_to) in zip(ends, route)
        ]

        refuse_unless("pct_start", pct_start,
                      lambda v: not (v < 0 or v > 1 or not isinstance(v, float)), "a float in [0, 1]")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self._anneal_func_type = anneal_strategy

        max_lrs = per_group("max_lr", optimizer, max_lr)
        if last_epoch == -1:
            initial_lrs = [peak / div_factor for peak in max_lrs]
            min_lrs = [initial / final_div_factor for initial in initial_lrs]
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            momentum_bounds = _momentum_bounds(self, optimizer, base_momentum, max_momentum)

        # Written only now that every argument is accepted (torch writes the lr bounds before
        # it checks the momentum), so that a refused construction leaves the optimizer as it was.
        if last_epoch == -1:
            for group, peak, initial, lowest in zip(optimizer.param_groups, max_lrs, initial_lrs, min_lrs):
                group["initial_lr"] = initial
                group["max_lr"] = peak
                group["min_lr"] = lowest
            if cycle_momentum:
                _start_momentum(self, optimizer, *momentum_bounds)

        super().__init__(optimizer, last_epoch)

    def _anneal(self, start, end, pct):
        if self._anneal_func_type == "cos":
            return curves.anneal_cos(start, end, pct)
        if self._anneal_func_type == "linear":
            return curves.anneal_linear(start, end, pct)
        raise ValueError(f"unsupported anneal strategy {self._anneal_func_type!r}")

    def get_lr(self) -> list:
        """Learning rates at batch ``last_epoch``; also writes the cycled momentum."""
        self._warn_if_outside_step()
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(
                f"OneCycleLR was stepped to step {step}, past its total_steps={self.total_steps}"
            )
        phases = self._schedule_phases
        index, pct = curves.one_cycle_position(step, [p["end_step"] for p in phases])
        phase = phases[index]
        groups = self.optimizer.param_groups
        lrs = [self._anneal(g[phase["start_lr"]], g[phase["end_lr"]], pct) for g in groups]
        if self.cycle_momentum:
            momentums = [
                self._anneal(g[phase["start_momentum"]], g[phase["end_momentum"]], pct)
                for g in groups
            ]
            set_group_momentums(self.optimizer, momentums, self.use_beta1)
        return lrs
