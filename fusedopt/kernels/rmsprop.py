"""RMSprop: the Triton kernel, its launcher, and the plain-torch reference.

The update, per element (torch's order of operations; no step-dependent scalars)::

    g = -grad if maximize else grad
    g = g + weight_decay * p
    square_avg = square_avg * alpha + (1 - alpha) * g * g
    grad_avg = lerp(grad_avg, g, 1 - alpha)                            # centered
    avg = sqrt(fma(-grad_avg, grad_avg, square_avg)) if centered else sqrt(square_avg)
    avg = avg + eps
    momentum_buffer = momentum_buffer * momentum + g / avg             # momentum > 0
    p = p - lr * momentum_buffer      if momentum > 0
    p = p + (-lr * g) / avg           otherwise
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
class RMSpropOptions:
    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool


COLUMNS = ("neg_lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum")


def scalars(o: RMSpropOptions) -> list[torch.Tensor | float]:
    return [-o.lr, o.alpha, 1 - o.alpha, o.eps, o.weight_decay, o.momentum]


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _lerp(start, end, weight):
    # ATen's lerp, |weight| included: alpha may exceed 1, so 1 - alpha may be negative.
    # One fma, as adam.py's `_lerp` says why.
    diff = end - start
    return tl.where(tl.abs(weight) < 0.5, tl.fma(weight, diff, start), tl.fma(weight - 1, diff, end))


@triton.jit
def _rmsprop_update(p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, offs, mask, s_ptr,
                    CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
                    WEIGHT_DECAY: tl.constexpr):
    neg_lr = tl.load(s_ptr + 0)
    alpha = tl.load(s_ptr + 1)
    one_minus_alpha = tl.load(s_ptr + 2)
    eps = tl.load(s_ptr + 3)
    weight_decay = tl.load(s_ptr + 4)
    momentum = tl.load(s_ptr + 5)
    cdt = neg_lr.dtype

    p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = load_grad_l2(g_ptr, offs, mask, s_ptr, p, weight_decay, cdt, MAXIMIZE, WEIGHT_DECAY, False)
    square_avg = tl.load(sq_ptr + offs, mask=mask).to(cdt)
    square_avg = square_avg * alpha + one_minus_alpha * g * g
    store_as(sq_ptr, offs, square_avg, mask)
    if CENTERED:
        grad_avg = _lerp(tl.load(ga_ptr + offs, mask=mask).to(cdt), g, one_minus_alpha)
        store_as(ga_ptr, offs, grad_avg, mask)
        # torch's square_avg.addcmul(grad_avg, grad_avg, value=-1) is an fma (CPU and CUDA
        # alike): where grad_avg**2 overflows and square_avg is inf, it gives inf (the
        # parameter stays), where a rounded product minus inf would be NaN.
        avg = ieee_sqrt(tl.fma(-grad_avg, grad_avg, square_avg))
    else:
        avg = ieee_sqrt(square_avg)
    avg = avg + eps
    if MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask).to(cdt) * momentum + ieee_div(g, avg)
        store_as(buf_ptr, offs, buf, mask)
        p = p + neg_lr * buf
    else:
        # torch's addcdiv multiplies by the scalar before dividing; keep that order.
        p = p + ieee_div(neg_lr * g, avg)
    stored = store_as(p_ptr, offs, p, mask)
    return stored  # the parameter as stored, for a fused average


@triton.jit
def rmsprop_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                   square_avg_ptr, grad_avg_ptr, momentum_buffer_ptr, scalars_ptr,
                   avg_ptr, avg_segments_ptr, avg_scalars_ptr,
                   BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr,
                   CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
                   WEIGHT_DECAY: tl.constexpr, AVERAGE: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    sq_ptr = square_avg_ptr + seg
    ga_ptr = grad_avg_ptr + seg
    buf_ptr = momentum_buffer_ptr + seg
    if start + BLOCK <= numel:  # whole blocks unmasked, for 128-bit accesses (see adam.py)
        p = _rmsprop_update(p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, offs, None, s_ptr,
                            CENTERED, MOMENTUM, MAXIMIZE, WEIGHT_DECAY)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, None, p, AVERAGE)
    else:
        mask = offs < numel
        p = _rmsprop_update(p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, offs, mask, s_ptr,
                            CENTERED, MOMENTUM, MAXIMIZE, WEIGHT_DECAY)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, p, AVERAGE)


def rmsprop_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                   table: torch.Tensor, o: RMSpropOptions) -> None:
    """Launch one RMSprop kernel over every stepped tensor of the bucket."""
    square_avg = state["square_avg"]
    # Buffers the options leave out are never touched; square_avg stands in for them.
    grad_avg = state["grad_avg"] if o.centered else square_avg
    momentum_buffer = state["momentum_buffer"] if o.momentum > 0 else square_avg
    _launch.launch(rmsprop_kernel, "rmsprop", bucket, batch, [square_avg, grad_avg, momentum_buffer], table,
                   CENTERED=o.centered, MOMENTUM=o.momentum > 0, MAXIMIZE=o.maximize,
                   WEIGHT_DECAY=o.weight_decay != 0)


# ------------------------------------------------------------------------- reference

def rmsprop_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                      table: torch.Tensor, o: RMSpropOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    cdt = table.dtype
    s, stepped, p, g = _flat.reference_inputs(bucket, batch, table, COLUMNS)
    square_avg = state["square_avg"].to(cdt)

    if o.maximize:
        g = -g
    if o.weight_decay != 0:
        g = g.add(p, alpha=o.weight_decay)  # torch's own op: an fma, as the kernel's
    square_avg = square_avg * s["alpha"] + s["one_minus_alpha"] * g * g
    _flat.commit(state["square_avg"], square_avg, stepped)
    if o.centered:
        grad_avg = torch.lerp(state["grad_avg"].to(cdt), g, s["one_minus_alpha"])
        _flat.commit(state["grad_avg"], grad_avg, stepped)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt()  # torch's op: an fma, as the kernel's
    else:
        avg = square_avg.sqrt()
    avg = avg + s["eps"]
    if o.momentum > 0:
        buf = state["momentum_buffer"].to(cdt) * s["momentum"] + g / avg
        _flat.commit(state["momentum_buffer"], buf, stepped)
        p = p + s["neg_lr"] * buf
    else:
        p = p + (s["neg_lr"] * g) / avg
    bucket.scatter(p, batch.params, batch.index)


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, average_pointers, layout_pointers

    out = []
    flag_sets = {"plain": {}, "momentum": dict(MOMENTUM=True),
                 "centered-momentum-wd-maximize": dict(CENTERED=True, MOMENTUM=True, WEIGHT_DECAY=True,
                                                       MAXIMIZE=True),
                 "momentum-ema": dict(MOMENTUM=True, AVERAGE=1)}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for label, flags in flag_sets.items():
            constexprs = dict(NUM_SCALARS=len(COLUMNS), CENTERED=False, MOMENTUM=False, MAXIMIZE=False,
                              WEIGHT_DECAY=False, AVERAGE=0)
            constexprs.update(flags)
            pointers = layout_pointers(dtype)
            pointers.update(square_avg_ptr=dtype, grad_avg_ptr=dtype, momentum_buffer_ptr=dtype,
                            scalars_ptr=_launch.compute_dtype(dtype), **average_pointers(dtype))
            extra = constexprs["CENTERED"] + constexprs["MOMENTUM"] + (constexprs["AVERAGE"] != 0)
            out.append(Variant(f"rmsprop-{label}-{str(dtype)[6:]}", rmsprop_kernel, pointers, constexprs,
                               loads=3 + extra, stores=2 + extra, dtype=dtype))
    return out


VARIANTS = _variants()
