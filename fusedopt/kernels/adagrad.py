"""Adagrad: the Triton kernel, its launcher, the plain-torch reference, and torch's fused CPU op.

The update, per element, with the per-tensor learning rate computed on the host in
float64 as torch does (``clr = lr / (1 + (step - 1) * lr_decay)``, step counted after
this step's increment)::

    g = -grad if maximize else grad
    g = g + weight_decay * p
    sum = sum + g * g
    p = p + (-clr * g) / (sqrt(sum) + eps)

``sum`` starts at ``initial_accumulator_value``, not 0 (the optimizer fills it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import APPLY_GRAD_OPS, STORE_UNSCALED, ieee_div, ieee_sqrt, load_grad_l2, locate, skipped, store_as
from .averaging import average_into, average_stored
from ._triton import tl, triton


@dataclass(frozen=True)
class AdagradOptions:
    lr: float
    lr_decay: float
    weight_decay: float
    eps: float
    maximize: bool


COLUMNS = ("neg_clr", "eps", "weight_decay")


def scalars(steps: torch.Tensor, o: AdagradOptions) -> list[torch.Tensor | float]:
    """`steps` already counts this step. Float64 arithmetic, as torch's Python floats: in
    Python floats where every tensor is at one step (then, without lr_decay, the table is
    the bucket's cached one), per tensor otherwise."""
    if steps.device.type == "cpu":
        counts = steps.tolist()
        if counts and counts.count(counts[0]) == len(counts):
            return [-(o.lr / (1 + (counts[0] - 1) * o.lr_decay)), o.eps, o.weight_decay]
    step = steps.to(torch.float64)
    clr = o.lr / (1 + (step - 1) * o.lr_decay)
    return [-clr, o.eps, o.weight_decay]


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _adagrad_update(p_ptr, g_ptr, sum_ptr, offs, mask, s_ptr, grad_ops_ptr,
                    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, GRAD_OPS: tl.constexpr):
    neg_clr = tl.load(s_ptr + 0)
    eps = tl.load(s_ptr + 1)
    weight_decay = tl.load(s_ptr + 2)
    cdt = neg_clr.dtype

    p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = load_grad_l2(g_ptr, offs, mask, grad_ops_ptr, p, weight_decay, cdt, MAXIMIZE, WEIGHT_DECAY, GRAD_OPS)
    state_sum = tl.load(sum_ptr + offs, mask=mask).to(cdt)
    state_sum = state_sum + g * g
    store_as(sum_ptr, offs, state_sum, mask)
    std = ieee_sqrt(state_sum) + eps
    # torch's addcdiv multiplies by the scalar before dividing; keep that order.
    p = p + ieee_div(neg_clr * g, std)
    stored = store_as(p_ptr, offs, p, mask)
    return stored  # the parameter as stored, for a fused average


@triton.jit
def adagrad_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                   sum_ptr, scalars_ptr, grad_ops_ptr, avg_ptr, avg_segments_ptr, avg_scalars_ptr,
                   BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr,
                   MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, GRAD_OPS: tl.constexpr,
                   AVERAGE: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    acc_ptr = sum_ptr + seg
    if skipped(grad_ops_ptr, GRAD_OPS):
        average_stored(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, p_ptr, offs, offs < numel, AVERAGE)
        return
    if start + BLOCK <= numel:  # whole blocks unmasked, for 128-bit accesses (see adam.py)
        p = _adagrad_update(p_ptr, g_ptr, acc_ptr, offs, None, s_ptr, grad_ops_ptr, MAXIMIZE, WEIGHT_DECAY, GRAD_OPS)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, None, p, AVERAGE)
    else:
        mask = offs < numel
        p = _adagrad_update(p_ptr, g_ptr, acc_ptr, offs, mask, s_ptr, grad_ops_ptr, MAXIMIZE, WEIGHT_DECAY,
                            GRAD_OPS)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, p, AVERAGE)


def adagrad_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                   table: torch.Tensor, o: AdagradOptions) -> None:
    """Launch one Adagrad kernel over every stepped tensor of the bucket."""
    _launch.launch(adagrad_kernel, "adagrad", bucket, batch, [state["sum"]], table,
                   MAXIMIZE=o.maximize, WEIGHT_DECAY=o.weight_decay != 0, grad_ops=batch.grad_ops)


# ------------------------------------------------------------------------- reference

def adagrad_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                      table: torch.Tensor, o: AdagradOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    if batch.skipped():
        return
    cdt = table.dtype
    s, stepped, p, g = _flat.reference_inputs(bucket, batch, table, COLUMNS)
    state_sum = state["sum"].to(cdt)

    if o.maximize:
        g = -g
    if o.weight_decay != 0:
        g = g.add(p, alpha=o.weight_decay)  # torch's own op: an fma, as the kernel's
    state_sum = state_sum + g * g
    _flat.commit(state["sum"], state_sum, stepped)
    std = state_sum.sqrt() + s["eps"]
    p = p + (s["neg_clr"] * g) / std
    bucket.scatter(p, batch.params, batch.index)


# ------------------------------------------------------------------------- native CPU

def adagrad_native(params, grads, sums, steps, o: AdagradOptions, grad_ops: torch.Tensor | None = None) -> None:
    """torch's own fused CPU kernel on fusedopt's flat-state views (the 'auto' CPU path).

    `steps` must already count this step, as torch's caller increments them first.
    """
    torch._fused_adagrad_(params, grads, sums, steps, lr=o.lr, lr_decay=o.lr_decay,
                          weight_decay=o.weight_decay, eps=o.eps, maximize=o.maximize,
                          **_launch.native_amp_args(grad_ops))


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, average_pointers, layout_pointers

    out = []
    flag_sets = {"plain": {}, "wd-maximize": dict(WEIGHT_DECAY=True, MAXIMIZE=True), "amp": dict(GRAD_OPS=STORE_UNSCALED),
                 "clip": dict(GRAD_OPS=APPLY_GRAD_OPS),
                 "ema": dict(AVERAGE=1)}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for label, flags in flag_sets.items():
            constexprs = dict(NUM_SCALARS=len(COLUMNS), GRAD_OPS=0, MAXIMIZE=False, WEIGHT_DECAY=False, AVERAGE=0)
            constexprs.update(flags)
            pointers = layout_pointers(dtype)
            pointers.update(sum_ptr=dtype, scalars_ptr=_launch.compute_dtype(dtype), grad_ops_ptr=torch.float32,
                            **average_pointers(dtype))
            average = constexprs["AVERAGE"] != 0
            grad = constexprs["GRAD_OPS"] == STORE_UNSCALED   # GradScaler: the gradient is stored back
            out.append(Variant(f"adagrad-{label}-{str(dtype)[6:]}", adagrad_kernel, pointers, constexprs,
                               loads=3 + average, stores=2 + average + grad, dtype=dtype))
    return out


VARIANTS = _variants()
