"""Adam, AdamW, Adamax, NAdam and RAdam: one Triton kernel, its launcher, and the plain-torch
reference.

The five share Adam's skeleton, so they share one kernel: the ``VARIANT`` constexpr
('adam', 'adamax', 'nadam', 'radam'; AdamW is 'adam' with decoupled decay) selects the
parts that differ, and the reference follows the same branches with the same names. Per
element, with every step-dependent scalar computed per tensor on the host in float64 from
that tensor's own step count, as torch computes it with Python floats::

    g = -grad if maximize else grad
    p = p * decay                            # decoupled decay: decay = 1 - lr * weight_decay
    g = g + weight_decay * p                 # L2 decay
    exp_avg = lerp(exp_avg, g, 1 - beta1)

    adam    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
            max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)        # amsgrad: used below
            p = p + (-step_size * exp_avg) / (sqrt(exp_avg_sq) / bc2_sqrt + eps)
    adamax  exp_inf = max(exp_inf * beta2, |g| + eps)               # in exp_avg_sq's place
            p = p + (-step_size * exp_avg) / exp_inf
    nadam   exp_avg_sq as adam; denom = sqrt(exp_avg_sq / bias_correction2) + eps
            p = p + (grad_coef * g) / denom
            p = p + (exp_avg_coef * exp_avg) / denom
    radam   exp_avg_sq as adam; update = exp_avg / bias_correction1 * lr
            update = update * ((1 / (sqrt(exp_avg_sq) + eps)) * bc2_sqrt) * rect  # if rectify
            p = p - update

with ``step_size = lr / (1 - beta1**t)``, ``bc2_sqrt = sqrt(1 - beta2**t)``; NAdam's
``grad_coef = -lr (1 - mu_t) / (1 - mu_1...mu_t)`` and ``exp_avg_coef = -lr mu_{t+1} /
(1 - mu_1...mu_{t+1})`` from the float32 ``mu_product`` kept per tensor; RAdam's
``rectify`` (rho_t > 5) and ``rect`` decided per tensor.

Each line keeps torch's order of operations and its rounding points: each of torch's
in-place ops rounds to the state dtype, and so do the stores here.

fusedopt-only flags: ``MASTER`` reads ``p`` from the fp32 master copy (where the parameter
is still the copy's rounding: elsewhere it was written since, and the written value is
taken) and stores it there and, rounded, into the parameter; ``SR`` stores the bf16 parameter stochastically rounded
(``_launch.store_sr``). State buffers may be of another dtype than the parameter
(``state_dtype``): loads widen to the compute dtype, stores round to nearest even.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import (APPLY_GRAD_OPS, STORE_UNSCALED, ieee_div, ieee_sqrt, load_grad, locate, rounded_as, skipped,
                      store_as, store_sr)
from .averaging import average_into, average_stored
from ._triton import tl, triton


@dataclass(frozen=True)
class AdamOptions:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled: bool
    variant: str = "adam"
    momentum_decay: float = 0.0     # NAdam's psi
    # fp32 master weights (state "master_param"): the update reads and writes the fp32
    # copy and stores the parameter as its rounding. Only bf16/fp16 buckets have one.
    master: bool = False
    # bf16 parameters rounded stochastically (state "sr_seeds" holds per-tensor seeds)
    stochastic_rounding: bool = False


# Columns of the per-tensor scalar table: the ones every variant's table starts with ...
COLUMNS = ("step_size", "bc2_sqrt", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay")
# ... and those only one variant reads, from column len(COLUMNS) on. Adam's table stays
# as small as before: the table is built on the host every step.
EXTRA_COLUMNS = {
    "adam": (),
    "adamax": (),
    "nadam": ("bias_correction2", "grad_coef", "exp_avg_coef"),
    "radam": ("bias_correction1", "lr", "rectify", "rect"),
}


def columns(variant: str) -> tuple[str, ...]:
    return COLUMNS + EXTRA_COLUMNS[variant]


def momentum_cache(step: torch.Tensor, o: AdamOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """NAdam's mu_t and mu_{t+1} for float64 step counts."""
    mu = o.beta1 * (1.0 - 0.5 * 0.96 ** (step * o.momentum_decay))
    mu_next = o.beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * o.momentum_decay))
    return mu, mu_next


def advance_mu_product(mu_product: torch.Tensor, steps: torch.Tensor, batch: _flat.Batch, o: AdamOptions) -> None:
    """mu_product *= mu_t for the stepped tensors (`steps` already counts this step).

    torch multiplies its float32 0-dim state by the Python float, which rounds the float
    to float32 first; so does this (in float64 where a checkpoint made the state float64).
    """
    if batch.everyone and steps.device.type == "cpu" and not isinstance(o.beta1, torch.Tensor):
        counts = steps.tolist()
        if counts and counts.count(counts[0]) == len(counts):
            # one step for all: torch's own update, the state times the Python float mu_t
            mu_product.mul_(o.beta1 * (1.0 - 0.5 * 0.96 ** (counts[0] * o.momentum_decay)))
            return
    index = slice(None) if batch.everyone else batch.index_tensor()
    mu, _ = momentum_cache(steps[index].to(torch.float64), o)
    mu_product[index] = mu_product[index] * mu.to(mu_product.dtype)


def scalars(steps: torch.Tensor, o: AdamOptions, mu_product: torch.Tensor | None = None) -> list[torch.Tensor | float]:
    """The step-dependent scalars of every tensor, in float64 on the host (torch's math),
    in the order of `columns(o.variant)`. NAdam's need `mu_product` already advanced."""
    step = steps.to(torch.float64)
    bias_correction1 = 1 - o.beta1 ** step
    bias_correction2 = 1 - o.beta2 ** step
    # The columns a variant never reads are NaN, as in `uniform_scalars`.
    step_size = o.lr / bias_correction1 if o.variant in ("adam", "adamax") else math.nan
    bc2_sqrt = bias_correction2.sqrt() if o.variant in ("adam", "radam") else math.nan
    shared = [step_size, bc2_sqrt, 1 - o.beta1, o.beta2, 1 - o.beta2,
              o.eps, o.weight_decay, 1 - o.lr * o.weight_decay]
    if o.variant == "nadam":
        mu, mu_next = momentum_cache(step, o)
        # torch reads the float32 product back as a Python float: exact in float64.
        mu_product = mu_product.to(torch.float64)
        return shared + [bias_correction2, -o.lr * (1.0 - mu) / (1.0 - mu_product),
                         -o.lr * mu_next / (1.0 - mu_product * mu_next)]
    if o.variant == "radam":
        rho_inf = 2 / (1 - o.beta2) - 1
        rho_t = rho_inf - 2 * step * o.beta2 ** step / bias_correction2
        # Decided per tensor: step counts differ inside a bucket. Untaken, rect is 1 so a
        # table never carries the NaN that rho_t < 4 gives.
        rectify = rho_t > 5.0
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).sqrt()
        shared[1] = torch.where(rectify, bc2_sqrt, math.nan)   # read only where rectified
        return shared + [bias_correction1, o.lr, rectify.to(torch.float64), torch.where(rectify, rect, 1.0)]
    return shared


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _lerp(start, end, weight):
    # ATen's lerp: the formula that is exact at the nearer end of the interval, as one fma
    # (its vectorised CPU kernel's `fmadd`, nvcc's contraction on CUDA). Written out, the
    # GPU contracts it too, but Triton's interpreter rounds the product and the sum apart.
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(weight, diff, start), tl.fma(weight - 1, diff, end))


@triton.jit
def _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, offs, mask, s_ptr, grad_ops_ptr, seed, seg,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                 DECOUPLED: tl.constexpr, VARIANT: tl.constexpr, GRAD_OPS: tl.constexpr,
                 MASTER: tl.constexpr, SR: tl.constexpr):
    step_size = tl.load(s_ptr + 0)
    bc2_sqrt = tl.load(s_ptr + 1)
    one_minus_beta1 = tl.load(s_ptr + 2)
    beta2 = tl.load(s_ptr + 3)
    one_minus_beta2 = tl.load(s_ptr + 4)
    eps = tl.load(s_ptr + 5)
    weight_decay = tl.load(s_ptr + 6)
    decay = tl.load(s_ptr + 7)
    cdt = step_size.dtype

    if MASTER:
        # The fp32 copy is the truth, except where the parameter is no longer its rounding:
        # written since the last step (a model's load_state_dict, `p.data.copy_`, a clamp, a
        # new tensor put in through `.data`, another optimizer's step). No version counter
        # shows every such write (`p.data.mul_` bumps none, nor does anything between the
        # replays of a CUDA graph), so the parameter is read and compared: the copy takes
        # the written value there and keeps its precision elsewhere (NaN compares unequal:
        # a NaN parameter stays NaN). One more read of the parameter's width.
        w = tl.load(w_ptr + offs, mask=mask).to(cdt)
        seen = tl.load(p_ptr + offs, mask=mask).to(cdt)
        p = tl.where(rounded_as(p_ptr, w) == seen, w, seen)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = load_grad(g_ptr, offs, mask, grad_ops_ptr, cdt, MAXIMIZE, GRAD_OPS)
    exp_avg = tl.load(m_ptr + offs, mask=mask).to(cdt)
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = tl.fma(p, weight_decay, g)  # torch's grad.add(param, alpha=wd) is an fma
    exp_avg = _lerp(exp_avg, g, one_minus_beta1)
    store_as(m_ptr, offs, exp_avg, mask)
    if VARIANT == "adamax":
        # v_ptr holds exp_inf. torch.maximum propagates NaN; so must this.
        exp_inf = tl.load(v_ptr + offs, mask=mask).to(cdt)
        exp_inf = tl.maximum(exp_inf * beta2, tl.abs(g) + eps, propagate_nan=tl.PropagateNan.ALL)
        store_as(v_ptr, offs, exp_inf, mask)
        p = p + ieee_div(-step_size * exp_avg, exp_inf)
    else:
        exp_avg_sq = tl.load(v_ptr + offs, mask=mask).to(cdt)
        exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
        store_as(v_ptr, offs, exp_avg_sq, mask)
        if VARIANT == "nadam":
            bias_correction2 = tl.load(s_ptr + 8)
            grad_coef = tl.load(s_ptr + 9)
            exp_avg_coef = tl.load(s_ptr + 10)
            denom = ieee_sqrt(ieee_div(exp_avg_sq, bias_correction2)) + eps
            # Two updates, as torch's two addcdiv_ (the first rounds p on its own).
            p = p + ieee_div(grad_coef * g, denom)
            p = p + ieee_div(exp_avg_coef * exp_avg, denom)
        elif VARIANT == "radam":
            bias_correction1 = tl.load(s_ptr + 8)
            lr = tl.load(s_ptr + 9)
            rectify = tl.load(s_ptr + 10)
            rect = tl.load(s_ptr + 11)
            bias_corrected_exp_avg = ieee_div(exp_avg, bias_correction1)
            update = bias_corrected_exp_avg * lr
            adaptive_lr = ieee_div(1.0, ieee_sqrt(exp_avg_sq) + eps) * bc2_sqrt
            update = tl.where(rectify != 0, update * adaptive_lr * rect, update)
            p = p - update
        else:
            if AMSGRAD:
                exp_avg_sq = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(cdt), exp_avg_sq,
                                        propagate_nan=tl.PropagateNan.ALL)
                store_as(vmax_ptr, offs, exp_avg_sq, mask)
            denom = ieee_div(ieee_sqrt(exp_avg_sq), bc2_sqrt) + eps
            p = p + ieee_div(-step_size * exp_avg, denom)
    if MASTER:
        store_as(w_ptr, offs, p, mask)
    if SR:
        # the element's position in the bucket's flat layout: unique, and the reference's
        stored = store_sr(p_ptr, offs, p, mask, seed, seg + offs)
    else:
        stored = store_as(p_ptr, offs, p, mask)
    return stored  # the parameter's new value as stored, for a fused average


@triton.jit
def adam_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, seeds_ptr, scalars_ptr, grad_ops_ptr,
                avg_ptr, avg_segments_ptr, avg_scalars_ptr,
                BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                DECOUPLED: tl.constexpr, VARIANT: tl.constexpr, GRAD_OPS: tl.constexpr,
                MASTER: tl.constexpr, SR: tl.constexpr, AVERAGE: tl.constexpr):
    # exp_avg_sq_ptr is the second state stream: Adamax's exp_inf.
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    m_ptr = exp_avg_ptr + seg
    v_ptr = exp_avg_sq_ptr + seg
    vmax_ptr = max_exp_avg_sq_ptr + seg
    w_ptr = master_ptr + seg
    if SR:
        seed = tl.load(seeds_ptr + t)
    else:
        seed = 0
    # Whole blocks go unmasked: a mask the compiler cannot prove uniform over 4 lanes
    # would cost the 128-bit accesses. Only a tensor's last block pays for the mask.
    if skipped(grad_ops_ptr, GRAD_OPS):
        average_stored(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, p_ptr, offs, offs < numel, AVERAGE)
        return
    if start + BLOCK <= numel:
        p = _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, offs, None, s_ptr, grad_ops_ptr, seed, seg,
                         AMSGRAD, MAXIMIZE, WEIGHT_DECAY, DECOUPLED, VARIANT, GRAD_OPS, MASTER, SR)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, None, p, AVERAGE)
    else:
        mask = offs < numel
        p = _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, offs, mask, s_ptr, grad_ops_ptr, seed, seg,
                         AMSGRAD, MAXIMIZE, WEIGHT_DECAY, DECOUPLED, VARIANT, GRAD_OPS, MASTER, SR)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, p, AVERAGE)


def adam_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                table: torch.Tensor, o: AdamOptions) -> None:
    """Launch one kernel over every stepped tensor of the bucket."""
    exp_avg = state["exp_avg"]
    exp_avg_sq = state["exp_inf"] if o.variant == "adamax" else state["exp_avg_sq"]
    max_exp_avg_sq = state["max_exp_avg_sq"] if o.amsgrad else exp_avg_sq
    master = state["master_param"] if o.master else exp_avg  # never read without MASTER
    seeds = state["sr_seeds"] if o.stochastic_rounding else table  # never read without SR
    _launch.launch(adam_kernel, o.variant, bucket, batch, [exp_avg, exp_avg_sq, max_exp_avg_sq, master, seeds],
                   table, AMSGRAD=o.amsgrad, MAXIMIZE=o.maximize, WEIGHT_DECAY=o.weight_decay != 0,
                   DECOUPLED=o.decoupled, VARIANT=o.variant, MASTER=o.master, SR=o.stochastic_rounding,
                   grad_ops=batch.grad_ops)


# ------------------------------------------------------------------------- reference

def adam_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                   table: torch.Tensor, o: AdamOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    if batch.skipped():
        return
    cdt = table.dtype
    s, stepped, p, g = _flat.reference_inputs(bucket, batch, table, columns(o.variant))
    if o.master:
        # the kernel's: the copy, except where the parameter is no longer its rounding
        w = state["master_param"].to(cdt)
        p = torch.where(w.to(bucket.dtype).to(cdt) == p, w, p)
    exp_avg = state["exp_avg"].to(cdt)

    if o.maximize:
        g = -g
    if o.weight_decay != 0:
        if o.decoupled:
            p = p * s["decay"]
        else:
            g = g.add(p, alpha=o.weight_decay)  # torch's own op: an fma, as the kernel's
    exp_avg = torch.lerp(exp_avg, g, s["one_minus_beta1"])
    _flat.commit(state["exp_avg"], exp_avg, stepped)
    if o.variant == "adamax":
        exp_inf = state["exp_inf"].to(cdt)
        exp_inf = torch.maximum(exp_inf * s["beta2"], g.abs() + s["eps"])
        _flat.commit(state["exp_inf"], exp_inf, stepped)
        p = p + (-s["step_size"] * exp_avg) / exp_inf
    else:
        exp_avg_sq = state["exp_avg_sq"].to(cdt)
        exp_avg_sq = exp_avg_sq * s["beta2"] + s["one_minus_beta2"] * g * g
        _flat.commit(state["exp_avg_sq"], exp_avg_sq, stepped)
        if o.variant == "nadam":
            denom = (exp_avg_sq / s["bias_correction2"]).sqrt() + s["eps"]
            p = p + (s["grad_coef"] * g) / denom
            p = p + (s["exp_avg_coef"] * exp_avg) / denom
        elif o.variant == "radam":
            bias_corrected_exp_avg = exp_avg / s["bias_correction1"]
            update = bias_corrected_exp_avg * s["lr"]
            adaptive_lr = (1.0 / (exp_avg_sq.sqrt() + s["eps"])) * s["bc2_sqrt"]
            update = torch.where(s["rectify"] != 0, update * adaptive_lr * s["rect"], update)
            p = p - update
        else:
            if o.amsgrad:
                exp_avg_sq = torch.maximum(state["max_exp_avg_sq"].to(cdt), exp_avg_sq)
                _flat.commit(state["max_exp_avg_sq"], exp_avg_sq, stepped)
            denom = exp_avg_sq.sqrt() / s["bc2_sqrt"] + s["eps"]
            p = p + (-s["step_size"] * exp_avg) / denom
    if o.master:
        _flat.commit(state["master_param"], p, stepped)
    if o.stochastic_rounding:
        seeds = bucket.expand(state["sr_seeds"].to(torch.int64))
        p = _launch.round_sr_torch(p, seeds, torch.arange(bucket.size, device=p.device))
    bucket.scatter(p, batch.params, batch.index)


def _ieee_div(a: float, b: float) -> float:
    """a / b as a float64 division on tensors gives it (inf or NaN for b = 0): torch's
    fused kernel and capturable step divide so, and reach here with a beta1 of 1 that
    `_check_group` lets through because torch's step takes it."""
    if b != 0:
        return a / b
    if a == 0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def uniform_scalars(step: float, o: AdamOptions, mu_product: float | None = None) -> list[float]:
    """`scalars` for tensors that all have taken `step` steps (NAdam's: and share
    `mu_product`, already advanced), in Python floats, as torch's for-loop computes its
    step sizes, bias corrections, NAdam's momentum schedule and RAdam's rectification."""
    bias_correction1 = 1 - o.beta1 ** step
    bias_correction2 = 1 - o.beta2 ** step
    # Only the Python arithmetic the variant's torch step does: a column it never reads is
    # NaN, so that what torch takes without an error (NAdam and RAdam with beta1 = 1,
    # Adamax or an unrectified RAdam with beta2 > 1, set after construction) does not
    # raise here either (and what raises in torch, `_check_group` refuses first).
    step_size = _ieee_div(o.lr, bias_correction1) if o.variant in ("adam", "adamax") else math.nan
    bc2_sqrt = math.sqrt(bias_correction2) if o.variant == "adam" else math.nan
    shared = [step_size, bc2_sqrt, 1 - o.beta1, o.beta2, 1 - o.beta2,
              o.eps, o.weight_decay, 1 - o.lr * o.weight_decay]
    if o.variant == "nadam":
        mu = o.beta1 * (1.0 - 0.5 * 0.96 ** (step * o.momentum_decay))
        mu_next = o.beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * o.momentum_decay))
        return shared + [bias_correction2, -o.lr * (1.0 - mu) / (1.0 - mu_product),
                         -o.lr * mu_next / (1.0 - mu_product * mu_next)]
    if o.variant == "radam":
        rho_inf = 2 / (1 - o.beta2) - 1
        rho_t = rho_inf - 2 * step * o.beta2 ** step / bias_correction2
        if rho_t > 5.0:
            shared[1] = math.sqrt(bias_correction2)
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            return shared + [bias_correction1, o.lr, 1.0, rect]
        return shared + [bias_correction1, o.lr, 0.0, 1.0]
    return shared


def _uniform_row(bucket: _flat.Bucket, o: AdamOptions) -> list[float] | None:
    """`uniform_scalars` of the bucket when every tensor is at one step (NAdam: with one
    `mu_product`) and the counts are on the host; None otherwise."""
    steps = bucket.steps
    if steps.device.type != "cpu" or isinstance(o.lr, torch.Tensor):
        return None
    counts = steps.tolist()
    if not counts or counts.count(counts[0]) != len(counts):
        return None
    mu_product = None
    if o.variant == "nadam":
        products = bucket.scalar("mu_product").tolist()  # the float32 state, exact as floats
        if products.count(products[0]) != len(products):
            return None
        mu_product = products[0]
    return uniform_scalars(counts[0], o, mu_product)


def step_bucket(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor], o: AdamOptions) -> None:
    """Build the bucket's scalar table from its step counts (already advanced) and run its
    path: the kernel or the reference.

    While every tensor is at the same step (the usual case) the table is one row of
    Python floats copied to every tensor's, where the per-tensor math is twenty to forty
    small torch ops: half the host time of a small model's step, which on a GPU is its
    whole time."""
    cdt = _launch.compute_dtype(bucket.real_dtype)
    row = _uniform_row(bucket, o)
    if row is not None:
        table = torch.tensor([row], dtype=torch.float64).to(cdt).expand(len(bucket), -1).contiguous()
        table = _launch.on_device(table, bucket.device)
    else:
        mu_product = bucket.scalar("mu_product") if o.variant == "nadam" else None
        table = _launch.scalar_table(scalars(bucket.steps, o, mu_product), len(bucket), cdt, bucket.device)
    run = adam_triton if bucket.path == "triton" else adam_reference
    run(bucket, batch, state, table, o)


# ------------------------------------------------------------------------- native CPU

def adam_native(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, o: AdamOptions,
                grad_ops: torch.Tensor | None = None) -> None:
    """torch's own fused CPU kernel, run on fusedopt's flat-state views (the 'auto' CPU path)."""
    op = torch._fused_adamw_ if o.decoupled else torch._fused_adam_
    op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=o.lr, beta1=o.beta1,
       beta2=o.beta2, weight_decay=o.weight_decay, eps=o.eps, amsgrad=o.amsgrad, maximize=o.maximize,
       **_launch.native_amp_args(grad_ops))


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, average_pointers, layout_pointers
    from .averaging import AXPBY, DIVIDE, LERP

    out = []
    flag_sets = {
        "adam": {"plain": {}, "amsgrad": dict(AMSGRAD=True), "l2": dict(WEIGHT_DECAY=True),
                 # GradScaler (fused=True): the unscaled gradient is stored back, one stream more
                 "amp-amsgrad": dict(AMSGRAD=True, GRAD_OPS=STORE_UNSCALED),
                 "clip-l2": dict(WEIGHT_DECAY=True, GRAD_OPS=APPLY_GRAD_OPS),
                 "decoupled-maximize": dict(WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=True),
                 # an attached averaged model: one more stream read and written
                 "decoupled-ema": dict(WEIGHT_DECAY=True, DECOUPLED=True, AVERAGE=1 + LERP),
                 "amp-swa": dict(GRAD_OPS=STORE_UNSCALED, AVERAGE=1 + DIVIDE),
                 "ema-axpby": dict(AVERAGE=1 + AXPBY)},
        "adamax": {"plain": {}, "l2-maximize": dict(WEIGHT_DECAY=True, MAXIMIZE=True)},
        "nadam": {"plain": {}, "l2": dict(WEIGHT_DECAY=True),
                  "decoupled-maximize": dict(WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=True)},
        "radam": {"plain": {}, "l2": dict(WEIGHT_DECAY=True),
                  "decoupled-maximize": dict(WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=True)},
    }
    for variant, sets in flag_sets.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for label, flags in sets.items():
                constexprs = dict(NUM_SCALARS=len(columns(variant)), GRAD_OPS=0, AMSGRAD=False, MAXIMIZE=False,
                                  WEIGHT_DECAY=False, DECOUPLED=False, VARIANT=variant, MASTER=False, SR=False,
                                  AVERAGE=0)
                constexprs.update(flags)
                pointers = layout_pointers(dtype)
                pointers.update(exp_avg_ptr=dtype, exp_avg_sq_ptr=dtype, max_exp_avg_sq_ptr=dtype, master_ptr=dtype,
                                seeds_ptr=torch.int32, scalars_ptr=_launch.compute_dtype(dtype), grad_ops_ptr=torch.float32,
                                **average_pointers(dtype))
                amsgrad, average = constexprs["AMSGRAD"], constexprs["AVERAGE"] != 0
                grad = constexprs["GRAD_OPS"] == STORE_UNSCALED
                out.append(Variant(f"{variant}-{label}-{str(dtype)[6:]}", adam_kernel, pointers, constexprs,
                                   loads=4 + amsgrad + average, stores=3 + amsgrad + average + grad, dtype=dtype))
    # master_weights and state_dtype: streams of another width than the parameter's.
    # Variant.loads/stores count streams of the parameter's width, so an fp32 stream
    # beside bf16 parameters counts 2 and a bf16 one beside fp32 parameters 1/2.
    mixed = {
        # bf16 parameters, fp32 master and state: reads p, g, master, m, v; writes master, p, m, v
        "master-bf16": (torch.bfloat16, torch.float32, dict(MASTER=True), 2 + 2 * 3, 2 * 3 + 1),
        "master-amsgrad-amp-bf16": (torch.bfloat16, torch.float32,
                                    dict(MASTER=True, AMSGRAD=True, GRAD_OPS=STORE_UNSCALED), 2 + 2 * 4, 2 * 4 + 1 + 1),
        # bf16 parameters, fp32 master, bf16 state
        "master-bf16state-bf16": (torch.bfloat16, torch.bfloat16, dict(MASTER=True), 2 + 2 + 2, 2 + 1 + 2),
        # fp32 parameters, bf16 state: p, g whole; m, v half
        "bf16state-float32": (torch.float32, torch.bfloat16, {}, 3, 2),
        # bf16 parameters and state, stochastic rounding of the parameter
        "sr-bf16": (torch.bfloat16, torch.bfloat16, dict(SR=True), 4, 3),
        "sr-amsgrad-amp-bf16": (torch.bfloat16, torch.bfloat16, dict(SR=True, AMSGRAD=True, GRAD_OPS=STORE_UNSCALED),
                                5, 5),
        # master weights with an attached EMA of the bf16 parameters
        "master-ema-bf16": (torch.bfloat16, torch.float32, dict(MASTER=True, AVERAGE=1 + LERP), 2 + 2 * 3 + 1,
                            2 * 3 + 1 + 1),
    }
    for label, (dtype, state_dtype, flags, loads, stores) in mixed.items():
        constexprs = dict(NUM_SCALARS=len(columns("adam")), GRAD_OPS=0, AMSGRAD=False, MAXIMIZE=False,
                          WEIGHT_DECAY=True, DECOUPLED=True, VARIANT="adam", MASTER=False, SR=False, AVERAGE=0)
        constexprs.update(flags)
        pointers = layout_pointers(dtype)
        pointers.update(exp_avg_ptr=state_dtype, exp_avg_sq_ptr=state_dtype, max_exp_avg_sq_ptr=state_dtype,
                        master_ptr=torch.float32 if flags.get("MASTER") else state_dtype, seeds_ptr=torch.int32,
                        scalars_ptr=torch.float32, grad_ops_ptr=torch.float32, **average_pointers(dtype))
        out.append(Variant(f"adamw-{label}", adam_kernel, pointers, constexprs, loads=loads, stores=stores, dtype=dtype))
    return out


VARIANTS = _variants()
