"""The built-in averaging functions, as torch.optim.swa_utils defines them, tagged.

Each function computes torch's numbers when called directly (a user may call it on their
own tensors, and the averaged model calls it on integer tensors, which have no kernel).
The tag, an :class:`Average` in the attribute ``_fusedopt_average``, is what lets
:class:`~fusedopt.swa.AveragedModel` run the same formula as one fused launch per bucket
instead of calling the function; an untagged function is called, as torch calls it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TAG = "_fusedopt_average"


@dataclass(frozen=True)
class Average:
    """What an averaging function computes.

    kind: "swa" (equal weights) or "ema" (exponential, with ``decay``).
    formula: the expression torch evaluates, which sets the rounding
        (see fusedopt/kernels/averaging.py): "lerp" for the multi-tensor functions,
        "divide" (SWA) and "axpby" (EMA) for the per-tensor ones.
    """

    kind: str
    formula: str
    decay: float | None = None

    def weight(self, n_averaged: int) -> float:
        """The weight of the new model in the average: avg += weight * (x - avg)."""
        return 1 - self.decay if self.kind == "ema" else 1 / (n_averaged + 1)


def average_of(fn) -> Average | None:
    return getattr(fn, TAG, None)


def _tag(fn, average: Average):
    setattr(fn, TAG, average)
    return fn


def _check_decay(decay: float) -> None:
    if decay < 0.0 or decay > 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")


def _lerps(tensors: list[Tensor]) -> bool:
    # torch's foreach lerp takes floating and complex tensors only
    return torch.is_floating_point(tensors[0]) or torch.is_complex(tensors[0])


def get_ema_multi_avg_fn(decay: float = 0.999):
    """An in-place EMA over lists of tensors: ``ema = decay * ema + (1 - decay) * model``.

    Called as ``fn(ema_tensors, model_tensors, n_averaged)``; the first update of an
    :class:`AveragedModel` copies instead. ``decay`` must lie in [0, 1].
    """
    _check_decay(decay)

    @torch.no_grad()
    def ema_update(ema_param_list, current_param_list, _n_averaged=None) -> None:
        if _lerps(ema_param_list):
            torch._foreach_lerp_(ema_param_list, current_param_list, 1 - decay)
        else:
            for ema, current in zip(ema_param_list, current_param_list, strict=True):
                ema.copy_(ema * decay + current * (1 - decay))

    return _tag(ema_update, Average("ema", "lerp", decay))


def get_swa_multi_avg_fn():
    """An in-place equal-weight average over lists of tensors:
    ``avg += (model - avg) / (n_averaged + 1)``, called as ``fn(avgs, models, n_averaged)``."""

    @torch.no_grad()
    def swa_update(averaged_param_list, current_param_list, num_averaged) -> None:
        if _lerps(averaged_param_list):
            # torch passes the weight as computed, a tensor when num_averaged is one
            torch._foreach_lerp_(averaged_param_list, current_param_list, 1 / (num_averaged + 1))
            return
        diffs = torch._foreach_sub(current_param_list, averaged_param_list)
        if isinstance(num_averaged, Tensor):
            torch._foreach_addcdiv_(averaged_param_list, diffs, [num_averaged + 1] * len(averaged_param_list))
        else:
            torch._foreach_add_(averaged_param_list, diffs, alpha=1.0 / (num_averaged + 1))

    return _tag(swa_update, Average("swa", "lerp"))


def get_ema_avg_fn(decay: float = 0.999):
    """A per-tensor EMA returning ``decay * ema + (1 - decay) * model``; ``decay`` in [0, 1]."""
    _check_decay(decay)

    @torch.no_grad()
    def ema_update(ema_param, current_param, num_averaged=None):
        return decay * ema_param + (1 - decay) * current_param

    return _tag(ema_update, Average("ema", "axpby", decay))


def get_swa_avg_fn():
    """A per-tensor equal-weight average returning ``avg + (model - avg) / (n_averaged + 1)``."""

    @torch.no_grad()
    def swa_update(averaged_param, current_param, num_averaged):
        return averaged_param + (current_param - averaged_param) / (num_averaged + 1)

    return _tag(swa_update, Average("swa", "divide"))
