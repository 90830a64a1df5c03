"""Schedulers made of other schedulers: ChainedScheduler and SequentialLR.

The children may be fusedopt's or torch's schedulers: only the protocol both
share is used (``step``, ``_initial_step``, ``_update_lr``, ``last_epoch``,
``get_last_lr``, ``state_dict``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim import lr_scheduler as _torch_lr_scheduler

from ._base import LRScheduler, composite_state, group_values, set_group_lrs

__all__ = ["ChainedScheduler", "SequentialLR"]


def _check_children(owner: str, optimizer: Optimizer, schedulers) -> None:
    for i, scheduler in enumerate(schedulers):
        if not hasattr(scheduler, "optimizer"):
            raise TypeError(f"{owner}: scheduler {i} has no `optimizer` attribute")
        if isinstance(scheduler, _torch_lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                f"{owner} cannot drive ReduceLROnPlateau (scheduler {i}): its step() needs a metric"
            )
        if optimizer != scheduler.optimizer:
            raise ValueError(
                f"{owner}: scheduler {i} ({type(scheduler).__name__}) drives a different "
                "optimizer; all schedulers must share one"
            )


def _load_children(scheduler, children_key: str, children, state_dict: dict[str, Any]) -> None:
    state = dict(state_dict)
    saved = state.pop(children_key)
    scheduler.__dict__.update(state)
    for child, child_state in zip(children, saved):
        child.load_state_dict(child_state)


def _cannot_restart(self, epoch: int | None = None) -> None:
    """`_update_lr` of the composites: what SequentialLR calls at a milestone to restart its
    next scheduler at epoch 0. A chain or a sequence has no learning rate of its own at an
    epoch (torch's raise the same type, from their base class's get_lr); raising before
    anything is touched leaves it as it was."""
    raise NotImplementedError(
        f"{type(self).__name__} cannot be restarted at epoch {epoch}: it has no learning "
        "rate of its own at an epoch, only its schedulers'"
    )


class ChainedScheduler(LRScheduler):
    """Step several schedulers on one optimizer together, each applied after the previous one.

    Formula: ``lr_t = f_n(... f_2(f_1(lr_{t-1})))``: each scheduler's chainable
    update acts on the value the previous one wrote.

    Args:
        schedulers (sequence): the schedulers to chain, all on the same optimizer.
        optimizer (Optimizer, optional): their optimizer; defaults to the first one's.
    """

    def __init__(self, schedulers: Sequence, optimizer: Optimizer | None = None) -> None:
        if len(schedulers) < 1:
            raise ValueError(f"{type(self).__name__} needs at least one scheduler")
        optimizer = optimizer or schedulers[0].optimizer
        _check_children(type(self).__name__, optimizer, schedulers)
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = group_values(self._schedulers[-1].optimizer, "lr")

    def step(self) -> None:  # type: ignore[override]
        """Step every chained scheduler, in order."""
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = group_values(self._schedulers[-1].optimizer, "lr")

    _update_lr = _cannot_restart

    def state_dict(self) -> dict[str, Any]:
        """Own state plus each chained scheduler's state under ``_schedulers``."""
        return composite_state(self, "_schedulers", self._schedulers)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state, including each chained scheduler's.

        Args:
            state_dict (dict): the scheduler state.
        """
        _load_children(self, "_schedulers", self._schedulers, state_dict)


class SequentialLR(LRScheduler):
    """Hand the optimizer from one scheduler to the next at given milestones.

    Formula: at epoch ``t`` the scheduler ``i = #{m in milestones : m <= t}``
    is active; on reaching milestone ``m`` it restarts from its epoch 0
    (closed form where it has one), so ``lr_t = f_i(t - milestones[i - 1])``.

    Args:
        optimizer (Optimizer): the wrapped optimizer.
        schedulers (list): the schedulers, in the order they run.
        milestones (list of int): epochs at which to switch; one fewer than schedulers.
        last_epoch (int): index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: list,
        milestones: list[int],
        last_epoch: int = -1,
    ) -> None:
        if len(schedulers) < 1:
            raise ValueError(f"{type(self).__name__} needs at least one scheduler")
        _check_children(type(self).__name__, optimizer, schedulers)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"{type(self).__name__} needs one milestone fewer than schedulers: got "
                f"{len(schedulers)} schedulers and {len(milestones)} milestones"
            )
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer

        # Creating the children already stepped the optimizer's lr: start over
        # from the initial lr, rewind the children, and redo only the first step
        # of the scheduler active at epoch 0.
        set_group_lrs(optimizer, [group["initial_lr"] for group in optimizer.param_groups])
        self.recursive_undo()
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    _update_lr = _cannot_restart

    def recursive_undo(self, sched=None) -> None:
        """Rewind ``last_epoch`` by one in every (nested) child scheduler."""
        node = self if sched is None else sched
        children = getattr(node, "_schedulers", None)
        if children is not None:
            for child in children:
                self.recursive_undo(child)
        elif hasattr(node, "last_epoch"):
            node.last_epoch -= 1

    def step(self) -> None:  # type: ignore[override]
        """Step the active scheduler; at a milestone, start the next one at its epoch 0."""
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        active = self._schedulers[index]
        try:
            if index > 0 and self._milestones[index - 1] == self.last_epoch:
                active._update_lr(0)
            else:
                active.step()
        except BaseException:
            self.last_epoch -= 1  # the active scheduler refused the step and did not take it
            raise
        self._last_lr = active.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        """Own state plus each child scheduler's state under ``_schedulers``."""
        return composite_state(self, "_schedulers", self._schedulers)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state, including each child's.

        Args:
            state_dict (dict): the scheduler state.
        """
        _load_children(self, "_schedulers", self._schedulers, state_dict)
