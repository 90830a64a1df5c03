"""Base class and shared helpers of fusedopt's learning-rate schedulers.

The base class subclasses ``torch.optim.lr_scheduler.LRScheduler`` so that
frameworks which pick a driving strategy with ``isinstance`` (Lightning,
Hugging Face Transformers, SWA utilities) recognise fusedopt's schedulers, but
every method that carries behaviour is implemented here. Attribute names and
the ``state_dict`` layout are kept identical to torch's, so state dicts move
freely between the two implementations.

Unlike torch, a hyper-parameter stored in a param group as a tensor (``lr``,
``momentum``, or either of ``betas``) is always updated in place. Compiled or
CUDA-graph-captured optimizer steps keep reading the same storage, so they see
the new value and never recompile.
"""

from __future__ import annotations

import functools
import types
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _torch_lr_scheduler

__all__ = ["LRScheduler"]

# Each warning opens with torch's first sentence, verbatim: `warnings.filterwarnings`
# matches its `message` pattern against the start of the text, so filters written for
# torch.optim keep matching. What follows is fusedopt's own explanation.
ORDER_WARNING = (
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. "
    "The scheduler moved on before the optimizer ever used the first value of "
    "the schedule, so that value is lost; call `optimizer.step()` first and "
    "`lr_scheduler.step()` after it."
)
REPLACED_STEP_WARNING = (
    "Seems like `optimizer.step()` has been overridden after learning rate scheduler initialization. "
    "The scheduler therefore cannot check that `optimizer.step()` runs before "
    "`lr_scheduler.step()`; make sure it does."
)
EPOCH_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being deprecated where possible. "
    "Passing `epoch` makes the scheduler jump to that epoch with its closed form where "
    "it has one; call `scheduler.step()` without arguments instead."
)
GET_LR_WARNING = (
    "To get the last learning rate computed by the scheduler, please use `get_last_lr()`. "
    "`get_lr()` computes the next learning rates."
)


# --------------------------------------------------------------------------
# Param-group helpers
# --------------------------------------------------------------------------
def copy_value(value):
    """Return ``value``, cloned when it is a tensor so that it cannot alias."""
    return value.clone() if isinstance(value, Tensor) else value


def per_group(name: str, optimizer: Optimizer, value) -> list:
    """Broadcast ``value`` to one entry per param group (tensors are cloned)."""
    n_groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n_groups:
            raise ValueError(
                f"{name} needs one value per param group: got {len(value)} "
                f"values for {n_groups} param groups."
            )
        values = list(value)
    else:
        values = [value] * n_groups
    return [copy_value(v) for v in values]


def group_values(optimizer: Optimizer, key: str) -> list:
    """Copies of ``group[key]`` for every param group."""
    return [copy_value(group[key]) for group in optimizer.param_groups]


def _scalar(value):
    """A value ``Tensor.fill_`` accepts: 1-element tensors are squeezed to 0-dim."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


@torch.no_grad()
def _fill(target: Tensor, value) -> None:
    target.fill_(_scalar(value))


def _get_beta1(group: dict):
    return group["betas"][0]


def _put_beta1(group: dict, value) -> None:
    group["betas"] = (value, *group["betas"][1:])


# A value that leaves its group's slot as it is (ReduceLROnPlateau's groups that are not cut).
# Not None: torch writes a None that a scheduler's get_lr returns, so None is written too.
KEEP = object()


def _write_slots(groups, values, get, put) -> None:
    """Write ``values[i]`` into the slot ``get(groups[i])``: in place for tensors, else ``put``.

    A ``KEEP`` value leaves that group alone. A tensor shared by several groups
    (e.g. a tensor default that ``Optimizer.add_param_group`` handed to every
    group) is first split: later groups get their own clone, so that each group
    can hold its own value.
    """
    values = list(values)
    if len(values) != len(groups):
        raise ValueError(f"expected {len(groups)} values (one per param group), got {len(values)}")
    seen: set[int] = set()
    for group in groups:
        current = get(group)
        if isinstance(current, Tensor):
            if id(current) in seen:
                put(group, current.clone())
            else:
                seen.add(id(current))
    for group, value in zip(groups, values):
        if value is KEEP:
            continue
        current = get(group)
        if isinstance(current, Tensor):
            _fill(current, value)
        else:
            put(group, value)


def set_group_lrs(optimizer: Optimizer, values) -> None:
    """Write one learning rate per param group (``KEEP`` skips a group)."""
    _write_slots(
        optimizer.param_groups,
        values,
        lambda group: group["lr"],
        lambda group, value: group.__setitem__("lr", value),
    )


def set_group_momentums(optimizer: Optimizer, values, use_beta1: bool) -> None:
    """Write one momentum per param group: ``betas[0]`` (other betas kept) or ``momentum``."""
    if use_beta1:
        _write_slots(optimizer.param_groups, values, _get_beta1, _put_beta1)
    else:
        _write_slots(
            optimizer.param_groups,
            values,
            lambda group: group["momentum"],
            lambda group, value: group.__setitem__("momentum", value),
        )


def refuse_unless(name: str, value, accepted, wanted: str) -> None:
    """Raise torch's exception for an argument that ``accepted(value)`` rejects, naming it.

    torch tests such an argument with a comparison and an ``isinstance`` in one expression,
    comparison first (``T_0 <= 0 or not isinstance(T_0, int)``): what cannot be compared
    (a str, None) raises TypeError there, and everything else it rejects, numpy integers and
    0-dim tensors included, ValueError. ``accepted`` is the negation of torch's expression,
    written in the same order.
    """
    try:
        ok = accepted(value)
    except TypeError:
        raise TypeError(f"{name} must be {wanted}, got {value!r}") from None
    if not ok:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def require_optimizer(optimizer) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")


def momentum_key(optimizer: Optimizer) -> bool:
    """Whether momentum is cycled through ``betas[0]`` (True) or ``momentum`` (False)."""
    defaults = optimizer.defaults
    if "momentum" not in defaults and "betas" not in defaults:
        raise ValueError(
            "cycle_momentum=True needs an optimizer with a `momentum` or `betas` hyper-parameter"
        )
    return "betas" in defaults


# --------------------------------------------------------------------------
# Detecting scheduler.step() before optimizer.step()
# --------------------------------------------------------------------------
# The attribute names are shared with torch's schedulers, so torch's and
# fusedopt's schedulers on one optimizer wrap its ``step`` only once and read
# the same flag.
_WRAPPED_FLAG = "_wrapped_by_lr_sched"
_CALLED_FLAG = "_opt_called"


def track_optimizer_steps(optimizer: Optimizer) -> None:
    """Wrap ``optimizer.step`` so it records that it ran (``optimizer._opt_called``)."""
    step = optimizer.step
    if hasattr(step, _WRAPPED_FLAG):
        return
    # Hold the optimizer weakly: a strong reference from its own attribute
    # would make a reference cycle.
    opt_ref = weakref.ref(optimizer)
    unbound = getattr(step, "__func__", None)

    if unbound is not None:

        @functools.wraps(unbound)
        def recording_step(*args, **kwargs):
            opt = opt_ref()
            setattr(opt, _CALLED_FLAG, True)
            return unbound.__get__(opt, type(opt))(*args, **kwargs)

    else:  # already an instance attribute that is a plain callable

        @functools.wraps(step)
        def recording_step(*args, **kwargs):
            setattr(opt_ref(), _CALLED_FLAG, True)
            return step(*args, **kwargs)

    setattr(recording_step, _WRAPPED_FLAG, True)
    optimizer.step = recording_step  # type: ignore[method-assign]


class _flag:
    """Set ``obj.<name> = True`` for the duration of a ``with`` block."""

    def __init__(self, obj, name: str) -> None:
        self.obj = obj
        self.name = name

    def __enter__(self):
        setattr(self.obj, self.name, True)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.obj, self.name, False)


# --------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------
class LRScheduler(_torch_lr_scheduler.LRScheduler):
    """Base class of fusedopt's learning-rate schedulers.

    Subclasses implement :meth:`get_lr` (the chainable form: next values from
    the optimizer's current ones) and, where one exists,
    ``_get_closed_form_lr`` (values at ``last_epoch`` from ``base_lrs``).
    Creating a scheduler records each group's ``initial_lr`` and takes the
    step to epoch 0.

    Args:
        optimizer (Optimizer): the optimizer whose learning rates are scheduled.
        last_epoch (int): index of the last epoch seen. ``-1`` (default) starts
            a new schedule; a value ``>= 0`` resumes one and needs
            ``initial_lr`` in every param group.
    """

    _get_lr_called_within_step: bool = False
    _is_initial: bool = False

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        require_optimizer(optimizer)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", copy_value(group["lr"]))
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param_groups[{i}] has no 'initial_lr', which resuming a "
                        f"scheduler with last_epoch={last_epoch} needs: load the "
                        "optimizer's state_dict first, or start with last_epoch=-1."
                    )
        self.base_lrs: list = group_values(optimizer, "initial_lr")
        self.last_epoch = last_epoch
        track_optimizer_steps(optimizer)
        self._initial_step()

    # -- stepping ----------------------------------------------------------
    def _initial_step(self) -> None:
        """Reset the step count and take the first step (to ``last_epoch + 1``)."""
        self._step_count = 0
        with _flag(self, "_is_initial"):
            self.step()

    def step(self, epoch: int | None = None) -> None:
        """Advance the schedule by one epoch (call after ``optimizer.step()``).

        Args:
            epoch (int, optional): deprecated; jump to this epoch, using the
                closed form where the scheduler has one.
        """
        if self._step_count == 1:
            self._check_optimizer_stepped()
        self._step_count += 1
        if epoch is not None:
            warnings.warn(EPOCH_WARNING, UserWarning, stacklevel=2)
        try:
            self._update_lr(epoch)
        except BaseException:
            self._step_count -= 1  # the step was refused: it is not counted (see _update_lr)
            raise

    def _check_optimizer_stepped(self) -> None:
        if not hasattr(self.optimizer.step, _WRAPPED_FLAG):
            warnings.warn(REPLACED_STEP_WARNING, UserWarning, stacklevel=3)
        elif not getattr(self.optimizer, _CALLED_FLAG, False):
            warnings.warn(ORDER_WARNING, UserWarning, stacklevel=3)

    def _update_lr(self, epoch: int | None = None) -> None:
        """Move to ``epoch`` (or the next epoch) and write the new learning rates."""
        last_epoch = self.last_epoch
        try:
            with _flag(self, "_get_lr_called_within_step"):
                if epoch is None:
                    self.last_epoch += 1
                    values = self.get_lr()
                else:
                    self.last_epoch = epoch
                    closed_form = getattr(self, "_get_closed_form_lr", None)
                    values = closed_form() if closed_form is not None else self.get_lr()
            set_group_lrs(self.optimizer, values)  # checks the count before it writes
        except BaseException:
            # A refused step (OneCycleLR past total_steps, an lr_lambda that raises, a loaded
            # state with another number of groups) writes no lr; torch still moves last_epoch
            # on, past the values the groups hold.
            self.last_epoch = last_epoch
            raise
        self._last_lr: list = group_values(self.optimizer, "lr")

    def get_lr(self) -> list:
        """Learning rates for the epoch ``last_epoch`` (implemented by subclasses)."""
        raise NotImplementedError

    def get_last_lr(self) -> list:
        """The learning rates most recently written, one per param group (copies)."""
        return self._last_lr

    # -- helpers for subclasses -------------------------------------------
    def _warn_if_outside_step(self) -> None:
        if not self._get_lr_called_within_step:
            warnings.warn(GET_LR_WARNING, UserWarning, stacklevel=3)

    def _current_lrs(self) -> list:
        return group_values(self.optimizer, "lr")

    def _scaled_lrs(self, factor) -> list:
        """Current learning rates times ``factor`` (unchanged copies when it is 1)."""
        if isinstance(factor, (int, float)) and factor == 1:
            return self._current_lrs()
        return [group["lr"] * factor for group in self.optimizer.param_groups]

    # -- checkpointing -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: every attribute except the optimizer (torch's layout)."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (fusedopt's or torch's).

        Args:
            state_dict (dict): the scheduler state.
        """
        self.__dict__.update(state_dict)


class _LRScheduler(LRScheduler):
    """torch's deprecated name for the base class, still exported by torch, which older
    custom schedulers subclass."""


# --------------------------------------------------------------------------
# Shared by LambdaLR, MultiplicativeLR and CyclicLR: callables are saved only
# when they are objects (their ``__dict__``), never functions or lambdas.
# --------------------------------------------------------------------------


def callable_state(fn):
    """``fn.__dict__`` copied for callable objects; None for functions and lambdas."""
    if fn is None or isinstance(fn, types.FunctionType):
        return None
    return dict(fn.__dict__)


def restore_callable_state(fn, state) -> None:
    if state is not None:
        fn.__dict__.update(state)


def composite_state(scheduler, children_key: str, children) -> dict[str, Any]:
    """State of a scheduler that wraps others: own attributes plus each child's state."""
    state = {
        k: v
        for k, v in scheduler.__dict__.items()
        if k not in ("optimizer", children_key)
    }
    state[children_key] = [child.state_dict() for child in children]
    return state
