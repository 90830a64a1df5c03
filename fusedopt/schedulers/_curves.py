"""Learning-rate curves as small pure functions of the step.

Each function is free of side effects and takes everything it needs as
arguments, so it can be checked against the formulas of the torch.optim
documentation in isolation. Two kinds of function live here:

* closed forms, ``f(base_lr, ..., t)``: the value at step ``t`` computed from
  the initial learning rate;
* chainable forms, ``*_factor``/``*_step``: the value at step ``t`` computed
  from the value the optimizer holds after step ``t - 1``. Chaining several
  schedulers on one optimizer composes these.

``lr`` and ``base_lr`` may be Python numbers or 0-dim tensors; steps, periods
and factors are Python numbers. Expressions are evaluated in a fixed order so
that, on Python floats, the results agree bit for bit with torch.optim's
schedulers.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence

__all__ = [
    "lambda_lr",
    "step_decay",
    "step_decay_factor",
    "multistep_decay",
    "multistep_decay_factor",
    "constant_warmup",
    "constant_warmup_factor",
    "linear_warmup",
    "linear_warmup_factor",
    "exponential_decay",
    "polynomial_decay",
    "polynomial_decay_factor",
    "cosine_annealing",
    "cosine_annealing_step",
    "cosine_annealing_restart_due",
    "cosine_annealing_restart_step",
    "warm_restart_advance",
    "warm_restart_position",
    "cyclic_position",
    "cyclic_lr",
    "cyclic_momentum",
    "triangular_scale",
    "triangular2_scale",
    "exp_range_scale",
    "one_cycle_phase_ends",
    "one_cycle_position",
    "anneal_cos",
    "anneal_linear",
    "plateau_improved",
    "plateau_reduced_lr",
]


# --------------------------------------------------------------------------
# LambdaLR
# --------------------------------------------------------------------------
def lambda_lr(base_lr, factor):
    """lr_t = base_lr * factor, where factor = lr_lambda(t)."""
    return base_lr * factor


# --------------------------------------------------------------------------
# StepLR / MultiStepLR
# --------------------------------------------------------------------------
def step_decay(base_lr, gamma, t, step_size):
    """lr_t = base_lr * gamma ** floor(t / step_size)."""
    return base_lr * gamma ** (t // step_size)


def step_decay_factor(gamma, t, step_size):
    """lr_t / lr_{t-1} = gamma if t > 0 and t is a multiple of step_size, else 1."""
    if t != 0 and t % step_size == 0:
        return gamma
    return 1.0


def multistep_decay(base_lr, gamma, t, milestones: Sequence[int]):
    """lr_t = base_lr * gamma ** (number of sorted milestones <= t)."""
    return base_lr * gamma ** bisect_right(milestones, t)


def multistep_decay_factor(gamma, t, milestone_counts: Mapping[int, int]):
    """lr_t / lr_{t-1} = gamma ** (how many times t appears among the milestones)."""
    hits = milestone_counts.get(t, 0)
    return gamma**hits if hits else 1.0


# --------------------------------------------------------------------------
# ConstantLR / LinearLR
# --------------------------------------------------------------------------
def constant_warmup(base_lr, factor, t, total_iters):
    """lr_t = base_lr * (factor if t < total_iters else 1)."""
    return base_lr * (factor + (t >= total_iters) * (1 - factor))


def constant_warmup_factor(factor, t, total_iters):
    """lr_t / lr_{t-1} = factor at t = 0, 1 / factor at t = total_iters, else 1."""
    if t == 0:
        return factor
    if t == total_iters:
        return 1.0 / factor
    return 1.0


def linear_warmup(base_lr, start_factor, end_factor, t, total_iters):
    """lr_t = base_lr * (s + (e - s) * min(t, total_iters) / total_iters)."""
    span = end_factor - start_factor
    return base_lr * (start_factor + span * min(total_iters, t) / total_iters)


def linear_warmup_factor(start_factor, end_factor, t, total_iters):
    """lr_t / lr_{t-1} = s at t = 0; 1 + (e - s) / (T s + (t - 1)(e - s)) for 0 < t <= T; else 1."""
    if t == 0:
        return start_factor
    if t > total_iters:
        return 1.0
    span = end_factor - start_factor
    return 1.0 + span / (total_iters * start_factor + (t - 1) * span)


# --------------------------------------------------------------------------
# ExponentialLR / PolynomialLR
# --------------------------------------------------------------------------
def exponential_decay(base_lr, gamma, t):
    """lr_t = base_lr * gamma ** t."""
    return base_lr * gamma**t


def polynomial_decay(base_lr, t, total_iters, power):
    """lr_t = base_lr * (1 - min(t, total_iters) / total_iters) ** power."""
    return base_lr * (1.0 - min(total_iters, t) / total_iters) ** power


def polynomial_decay_factor(t, total_iters, power):
    """lr_t / lr_{t-1} = ((1 - t/T) / (1 - (t-1)/T)) ** power for t <= T, else 1."""
    if t > total_iters:
        return 1.0
    now = 1.0 - t / total_iters
    before = 1.0 - (t - 1) / total_iters
    return (now / before) ** power


# --------------------------------------------------------------------------
# CosineAnnealingLR / CosineAnnealingWarmRestarts
# --------------------------------------------------------------------------
def cosine_annealing(base_lr, eta_min, t, T_max):
    """lr_t = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2."""
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / T_max)) / 2


def cosine_annealing_step(lr, eta_min, t, T_max):
    """lr_t = eta_min + (lr_{t-1} - eta_min) * (1 + cos(pi t / T_max)) / (1 + cos(pi (t-1) / T_max))."""
    ratio = (1 + math.cos(math.pi * t / T_max)) / (1 + math.cos(math.pi * (t - 1) / T_max))
    return eta_min + ratio * (lr - eta_min)


def cosine_annealing_restart_due(t, T_max):
    """True when t - 1 is an odd multiple of T_max (the cosine is at its minimum, so the ratio form would divide by zero)."""
    return (t - 1 - T_max) % (2 * T_max) == 0


def cosine_annealing_restart_step(lr, base_lr, eta_min, T_max):
    """lr_t = lr_{t-1} + (base_lr - eta_min) * (1 - cos(pi / T_max)) / 2."""
    return lr + (base_lr - eta_min) * (1 - math.cos(math.pi / T_max)) / 2


def warm_restart_advance(T_cur, T_i, T_mult):
    """(T_cur, T_i) <- (T_cur + 1, T_i), wrapped to ((T_cur + 1) mod T_i, T_i * T_mult) once T_cur + 1 >= T_i."""
    T_cur = T_cur + 1
    if T_cur >= T_i:
        return T_cur % T_i, T_i * T_mult
    return T_cur, T_i


def warm_restart_position(epoch, T_0, T_mult):
    """(T_cur, T_i) at a (possibly fractional) epoch: n = floor(log_{T_mult}(epoch (T_mult - 1) / T_0 + 1)), T_i = T_0 T_mult^n, T_cur = epoch - T_0 (T_mult^n - 1) / (T_mult - 1)."""
    if epoch < T_0:
        return epoch, T_0
    if T_mult == 1:
        return epoch % T_0, T_0
    n = int(math.log(epoch / T_0 * (T_mult - 1) + 1, T_mult))
    return epoch - T_0 * (T_mult**n - 1) / (T_mult - 1), T_0 * T_mult**n


# --------------------------------------------------------------------------
# CyclicLR
# --------------------------------------------------------------------------
def cyclic_position(t, total_size, step_ratio):
    """(cycle, h): cycle = floor(1 + t / total_size), x = 1 + t / total_size - cycle, h = x / r if x <= r else (x - 1) / (r - 1)."""
    cycle = math.floor(1 + t / total_size)
    x = 1.0 + t / total_size - cycle
    if x <= step_ratio:
        return cycle, x / step_ratio
    return cycle, (x - 1) / (step_ratio - 1)


def cyclic_lr(base_lr, max_lr, height, scale):
    """lr = base_lr + (max_lr - base_lr) * h * scale."""
    return base_lr + (max_lr - base_lr) * height * scale


def cyclic_momentum(base_momentum, max_momentum, height, scale):
    """m = max_momentum - (max_momentum - base_momentum) * h * scale."""
    return max_momentum - (max_momentum - base_momentum) * height * scale


def triangular_scale(x):
    """scale(x) = 1."""
    return 1.0


def triangular2_scale(x):
    """scale(x) = 1 / 2 ** (x - 1)."""
    return 1 / (2.0 ** (x - 1))


def exp_range_scale(gamma, x):
    """scale(x) = gamma ** x."""
    return gamma**x


# --------------------------------------------------------------------------
# OneCycleLR
# --------------------------------------------------------------------------
def one_cycle_phase_ends(total_steps, pct_start, three_phase):
    """Last step of each phase: [pct*N - 1, N - 1], or [pct*N - 1, 2*pct*N - 2, N - 1] with three_phase."""
    rise_end = float(pct_start * total_steps) - 1
    if three_phase:
        return [rise_end, float(2 * pct_start * total_steps) - 2, total_steps - 1]
    return [rise_end, total_steps - 1]


def one_cycle_position(step, phase_ends: Sequence[float]):
    """(i, pct): i = first phase with step <= end_i (or the last), pct = (step - end_{i-1}) / (end_i - end_{i-1}), end_{-1} = 0."""
    start = 0.0
    last = len(phase_ends) - 1
    for i, end in enumerate(phase_ends):
        if step <= end or i == last:
            return i, (step - start) / (end - start)
        start = end
    raise ValueError("phase_ends must not be empty")


def anneal_cos(start, end, pct):
    """value = end + (start - end) / 2 * (1 + cos(pi * pct))."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def anneal_linear(start, end, pct):
    """value = start + (end - start) * pct."""
    return (end - start) * pct + start


# --------------------------------------------------------------------------
# ReduceLROnPlateau
# --------------------------------------------------------------------------
def plateau_improved(current, best, mode, threshold_mode, threshold):
    """min/rel: a < best (1 - th); min/abs: a < best - th; max/rel: a > best (1 + th); max/abs: a > best + th."""
    if mode == "min":
        if threshold_mode == "rel":
            return current < best * (1.0 - threshold)
        return current < best - threshold
    if threshold_mode == "rel":
        return current > best * (1.0 + threshold)
    return current > best + threshold


def plateau_reduced_lr(lr, factor, min_lr):
    """new_lr = max(lr * factor, min_lr)."""
    return max(lr * factor, min_lr)
