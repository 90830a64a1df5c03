"""Validation of hyperparameters: torch's checks and messages for the options every
algorithm shares, fusedopt's own `max_grad_norm=`, and the conversion of an option to a
float that the algorithms' kernel options are made of."""
from __future__ import annotations

import dataclasses
import functools
import sys

import torch
from torch import Tensor


def check_lr(lr) -> None:
    """torch's learning-rate checks: a 1-element tensor, and not negative (NaN fails)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(**values) -> None:
    """torch's `Invalid <name> value: <value>` for the first negative (or NaN) keyword, in
    the order given, which is torch's order for each class."""
    for name, value in values.items():
        if not 0.0 <= value:
            raise ValueError(f"Invalid {'epsilon' if name == 'eps' else name} value: {value}")


def refuse_differentiable(differentiable: bool, fused: bool = False) -> None:
    """torch's `differentiable=True` runs the update under autograd; a fused kernel cannot.
    With `fused=True` torch refuses it too, in these words, which its tests match."""
    if differentiable:
        raise RuntimeError(("`fused` does not support `differentiable`; " if fused else "")
                           + "fusedopt: differentiable=True is not supported: the fused update is not "
                           "differentiable. help: use torch.optim for differentiable optimization")


def check_max_grad_norm(max_grad_norm) -> float | None:
    """fusedopt's `max_grad_norm=`: None (off) or a positive number."""
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a positive number, or None for no clipping)")
    if _built_by_zero():
        raise ValueError("fusedopt: max_grad_norm inside ZeroRedundancyOptimizer would clip each rank's partition "
                         "by that partition's own norm, not by the model's. help: leave it out and call "
                         "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) before step()")
    return float(max_grad_norm)


def _built_by_zero() -> bool:
    """Whether ZeroRedundancyOptimizer is building this optimizer for its rank's partition
    (it passes every keyword it was given on): the optimizer sees only that partition and
    cannot know the whole model's gradients."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.optim import ZeroRedundancyOptimizer

    frame = sys._getframe(2)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def check_numbers(options, gi: int) -> None:
    """Refuse a group's numeric option (a field of its kernel options) that is None or a
    string: torch's arithmetic raises TypeError on it when the step reaches the group,
    after stepping the groups before it; here before any group steps."""
    for name in _numeric_fields(type(options)):
        value = getattr(options, name)
        if value is None or isinstance(value, (str, bytes)):
            raise TypeError(f"param group {gi}: {name} is {value!r}; expected a number or a 1-element tensor")


@functools.cache
def _numeric_fields(options_class) -> tuple[str, ...]:
    # (a scheduler's new lr each step re-validates the group: the fields are looked up once)
    return tuple(f.name for f in dataclasses.fields(options_class) if "float" in str(f.type))


def as_float(x, name: str) -> float:
    """A hyperparameter as a float: a number or a 1-element tensor (a string, which float()
    would parse, is refused as torch's arithmetic refuses it). `name`: the option's, which
    the error names with the value (torch's arithmetic raises TypeError on it, naming
    neither)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise TypeError(f"{name} is a tensor of shape {tuple(x.shape)}; expected a number or a 1-element tensor")
        return float(x.item())
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} is {x!r}; expected a number or a 1-element tensor")
    try:
        return float(x)
    except TypeError:
        raise TypeError(f"{name} is {x!r}; expected a number or a 1-element tensor") from None


def float_option(group: dict, key: str) -> float:
    """A group's numeric option as a float (`as_float`), named by its key."""
    return as_float(group[key], key)


def pair(group: dict, key: str) -> tuple:
    """A group's option of two numbers (betas, etas, step_sizes), unpacked as torch's step
    unpacks it, with its exception type (TypeError for what is not a sequence, ValueError
    for another length), naming the option and the value."""
    value = group[key]
    try:
        first, second = value
    except (TypeError, ValueError) as error:
        raise type(error)(f"{key} is {value!r}; expected a pair of numbers") from None
    return first, second
