"""Adam and AdamW: the Triton kernel, its launcher, and the plain-torch reference.

The update, per element, with the per-tensor scalars computed on the host in float64 as
torch does (``step_size = lr / (1 - beta1**step)``, ``bc2_sqrt = sqrt(1 - beta2**step)``)::

    g = -grad if maximize else grad
    p = p * (1 - lr * weight_decay)          # AdamW (decoupled)
    g = g + weight_decay * p                 # Adam (L2)
    exp_avg    = lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
    max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)            # amsgrad
    p = p - step_size * exp_avg / (sqrt(exp_avg_sq or max) / bc2_sqrt + eps)

Both paths read the same scalar table, use the same names, and keep torch's rounding
points (each of torch's in-place ops rounds to the state dtype; so do the stores here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import locate, store_as
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


# Columns of the per-tensor scalar table, in order.
COLUMNS = ("step_size", "bc2_sqrt", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay")


def scalars(steps: torch.Tensor, o: AdamOptions) -> list[torch.Tensor | float]:
    """The step-dependent scalars of every tensor, in float64 on the host (torch's math)."""
    step = steps.to(torch.float64)
    bias_correction1 = 1 - o.beta1 ** step
    bias_correction2 = 1 - o.beta2 ** step
    return [o.lr / bias_correction1, bias_correction2.sqrt(), 1 - o.beta1, o.beta2, 1 - o.beta2,
            o.eps, o.weight_decay, 1 - o.lr * o.weight_decay]


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _lerp(start, end, weight):
    # ATen's lerp: the formula that is exact at the nearer end of the interval.
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


@triton.jit
def _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, s_ptr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                 DECOUPLED: tl.constexpr):
    step_size = tl.load(s_ptr + 0)
    bc2_sqrt = tl.load(s_ptr + 1)
    one_minus_beta1 = tl.load(s_ptr + 2)
    beta2 = tl.load(s_ptr + 3)
    one_minus_beta2 = tl.load(s_ptr + 4)
    eps = tl.load(s_ptr + 5)
    weight_decay = tl.load(s_ptr + 6)
    decay = tl.load(s_ptr + 7)
    cdt = step_size.dtype

    p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    exp_avg = tl.load(m_ptr + offs, mask=mask).to(cdt)
    exp_avg_sq = tl.load(v_ptr + offs, mask=mask).to(cdt)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    exp_avg = _lerp(exp_avg, g, one_minus_beta1)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
    store_as(m_ptr, offs, exp_avg, mask)
    store_as(v_ptr, offs, exp_avg_sq, mask)
    if AMSGRAD:
        exp_avg_sq = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(cdt), exp_avg_sq)
        store_as(vmax_ptr, offs, exp_avg_sq, mask)
    denom = tl.sqrt(exp_avg_sq) / bc2_sqrt + eps
    p = p + (-step_size * exp_avg) / denom
    store_as(p_ptr, offs, p, mask)


@triton.jit
def adam_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, scalars_ptr,
                BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                DECOUPLED: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    m_ptr = exp_avg_ptr + seg
    v_ptr = exp_avg_sq_ptr + seg
    vmax_ptr = max_exp_avg_sq_ptr + seg
    # Whole blocks go unmasked: a mask the compiler cannot prove uniform over 4 lanes
    # would cost the 128-bit accesses. Only a tensor's last block pays for the mask.
    if start + BLOCK <= numel:
        _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, None, s_ptr,
                     AMSGRAD, MAXIMIZE, WEIGHT_DECAY, DECOUPLED)
    else:
        _adam_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < numel, s_ptr,
                     AMSGRAD, MAXIMIZE, WEIGHT_DECAY, DECOUPLED)


def adam_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                table: torch.Tensor, o: AdamOptions) -> None:
    """Launch one Adam kernel over every stepped tensor of the bucket."""
    block, num_warps = _launch.block_config(bucket)
    offsets, align = _launch.pointer_table(bucket, batch)
    segments, numels, block_tensor, block_start = _launch.grid_tables(bucket, batch, block)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    max_exp_avg_sq = state["max_exp_avg_sq"] if o.amsgrad else exp_avg_sq
    adam_kernel[(block_tensor.numel(),)](
        bucket.anchor(), offsets, segments, numels, block_tensor, block_start,
        exp_avg, exp_avg_sq, max_exp_avg_sq, table,
        BLOCK=block, ALIGN=align, NUM_SCALARS=len(COLUMNS),
        AMSGRAD=o.amsgrad, MAXIMIZE=o.maximize, WEIGHT_DECAY=o.weight_decay != 0,
        DECOUPLED=o.decoupled, num_warps=num_warps)
    _launch.record_launch("adam")


# ------------------------------------------------------------------------- reference

def adam_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                   table: torch.Tensor, o: AdamOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    cdt = table.dtype
    s = {name: bucket.expand(table[:, j]) for j, name in enumerate(COLUMNS)}
    stepped = bucket.stepped_elements(batch)
    p = bucket.gather(batch.params, batch.index, cdt)
    g = bucket.gather(batch.grads, batch.index, cdt)
    exp_avg = state["exp_avg"].to(cdt)
    exp_avg_sq = state["exp_avg_sq"].to(cdt)

    if o.maximize:
        g = -g
    if o.weight_decay != 0:
        if o.decoupled:
            p = p * s["decay"]
        else:
            g = g + s["weight_decay"] * p
    exp_avg = torch.lerp(exp_avg, g, s["one_minus_beta1"])
    exp_avg_sq = exp_avg_sq * s["beta2"] + s["one_minus_beta2"] * g * g
    _flat.commit(state["exp_avg"], exp_avg, stepped)
    _flat.commit(state["exp_avg_sq"], exp_avg_sq, stepped)
    if o.amsgrad:
        exp_avg_sq = torch.maximum(state["max_exp_avg_sq"].to(cdt), exp_avg_sq)
        _flat.commit(state["max_exp_avg_sq"], exp_avg_sq, stepped)
    denom = exp_avg_sq.sqrt() / s["bc2_sqrt"] + s["eps"]
    p = p + (-s["step_size"] * exp_avg) / denom
    bucket.scatter(p, batch.params, batch.index)


# ------------------------------------------------------------------------- native CPU

def adam_native(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, o: AdamOptions) -> None:
    """torch's own fused CPU kernel, run on fusedopt's flat-state views (the 'auto' CPU path)."""
    op = torch._fused_adamw_ if o.decoupled else torch._fused_adam_
    op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=o.lr, beta1=o.beta1,
       beta2=o.beta2, weight_decay=o.weight_decay, eps=o.eps, amsgrad=o.amsgrad, maximize=o.maximize)
