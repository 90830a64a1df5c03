"""Adadelta: the Triton kernel, its launcher, and the plain-torch reference.

The update, per element (torch's order of operations; no step-dependent scalars)::

    g = -grad if maximize else grad
    g = g + weight_decay * p
    square_avg = square_avg * rho + (1 - rho) * g * g
    delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
    acc_delta = acc_delta * rho + (1 - rho) * delta * delta
    p = p - lr * delta
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import ieee_div, ieee_sqrt, load_grad_l2, locate, store_as
from .averaging import average_into
from ._triton import tl, triton


@dataclass(frozen=True)
class AdadeltaOptions:
    lr: float
    rho: float
    eps: float
    weight_decay: float
    maximize: bool


COLUMNS = ("neg_lr", "rho", "one_minus_rho", "eps", "weight_decay")


def scalars(o: AdadeltaOptions) -> list[torch.Tensor | float]:
    return [-o.lr, o.rho, 1 - o.rho, o.eps, o.weight_decay]


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _adadelta_update(p_ptr, g_ptr, sq_ptr, acc_ptr, offs, mask, s_ptr,
                     MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr):
    neg_lr = tl.load(s_ptr + 0)
    rho = tl.load(s_ptr + 1)
    one_minus_rho = tl.load(s_ptr + 2)
    eps = tl.load(s_ptr + 3)
    weight_decay = tl.load(s_ptr + 4)
    cdt = neg_lr.dtype

    p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = load_grad_l2(g_ptr, offs, mask, s_ptr, p, weight_decay, cdt, MAXIMIZE, WEIGHT_DECAY, False)
    square_avg = tl.load(sq_ptr + offs, mask=mask).to(cdt)
    acc_delta = tl.load(acc_ptr + offs, mask=mask).to(cdt)
    square_avg = square_avg * rho + one_minus_rho * g * g
    store_as(sq_ptr, offs, square_avg, mask)
    std = ieee_sqrt(square_avg + eps)
    delta = ieee_div(ieee_sqrt(acc_delta + eps), std) * g
    acc_delta = acc_delta * rho + one_minus_rho * delta * delta
    store_as(acc_ptr, offs, acc_delta, mask)
    p = p + neg_lr * delta
    stored = store_as(p_ptr, offs, p, mask)
    return stored  # the parameter as stored, for a fused average


@triton.jit
def adadelta_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                    square_avg_ptr, acc_delta_ptr, scalars_ptr, avg_ptr, avg_segments_ptr, avg_scalars_ptr,
                    BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr,
                    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, AVERAGE: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    sq_ptr = square_avg_ptr + seg
    acc_ptr = acc_delta_ptr + seg
    if start + BLOCK <= numel:  # whole blocks unmasked, for 128-bit accesses (see adam.py)
        p = _adadelta_update(p_ptr, g_ptr, sq_ptr, acc_ptr, offs, None, s_ptr, MAXIMIZE, WEIGHT_DECAY)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, None, p, AVERAGE)
    else:
        mask = offs < numel
        p = _adadelta_update(p_ptr, g_ptr, sq_ptr, acc_ptr, offs, mask, s_ptr, MAXIMIZE, WEIGHT_DECAY)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, p, AVERAGE)


def adadelta_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                    table: torch.Tensor, o: AdadeltaOptions) -> None:
    """Launch one Adadelta kernel over every stepped tensor of the bucket."""
    _launch.launch(adadelta_kernel, "adadelta", bucket, batch, [state["square_avg"], state["acc_delta"]], table,
                   MAXIMIZE=o.maximize, WEIGHT_DECAY=o.weight_decay != 0)


# ------------------------------------------------------------------------- reference

def adadelta_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                       table: torch.Tensor, o: AdadeltaOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    cdt = table.dtype
    s, stepped, p, g = _flat.reference_inputs(bucket, batch, table, COLUMNS)
    square_avg = state["square_avg"].to(cdt)
    acc_delta = state["acc_delta"].to(cdt)

    if o.maximize:
        g = -g
    if o.weight_decay != 0:
        g = g.add(p, alpha=o.weight_decay)  # torch's own op: an fma, as the kernel's
    square_avg = square_avg * s["rho"] + s["one_minus_rho"] * g * g
    _flat.commit(state["square_avg"], square_avg, stepped)
    std = (square_avg + s["eps"]).sqrt()
    delta = (acc_delta + s["eps"]).sqrt() / std * g
    acc_delta = acc_delta * s["rho"] + s["one_minus_rho"] * delta * delta
    _flat.commit(state["acc_delta"], acc_delta, stepped)
    p = p + s["neg_lr"] * delta
    bucket.scatter(p, batch.params, batch.index)


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, average_pointers, layout_pointers

    out = []
    flag_sets = {"plain": {}, "wd-maximize": dict(WEIGHT_DECAY=True, MAXIMIZE=True), "ema": dict(AVERAGE=1)}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for label, flags in flag_sets.items():
            constexprs = dict(NUM_SCALARS=len(COLUMNS), MAXIMIZE=False, WEIGHT_DECAY=False, AVERAGE=0)
            constexprs.update(flags)
            pointers = layout_pointers(dtype)
            pointers.update(square_avg_ptr=dtype, acc_delta_ptr=dtype, scalars_ptr=_launch.compute_dtype(dtype),
                            **average_pointers(dtype))
            average = constexprs["AVERAGE"] != 0
            out.append(Variant(f"adadelta-{label}-{str(dtype)[6:]}", adadelta_kernel, pointers, constexprs,
                               loads=4 + average, stores=3 + average, dtype=dtype))
    return out


VARIANTS = _variants()
