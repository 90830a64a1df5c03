"""ASGD (averaged SGD): the Triton kernel, its launcher, and the plain-torch reference.

The update, per element, with each tensor's eta and mu being its scalar state from the
previous step (float32 values, as torch keeps them)::

    g = -grad if maximize else grad
    g = g + weight_decay * p
    p = p * (1 - lambd * eta)
    p = p - eta * g
    ax = ax + (p - ax) * mu      if mu != 1
    ax = p                       otherwise

After the update each stepped tensor's eta and mu move to the new step count t, in
float64 on the host as torch's Python arithmetic does, then stored as float32::

    eta = lr / (1 + lambd * lr * t) ** alpha
    mu = 1 / max(1, t - t0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import load_grad_l2, locate, store_as
from .averaging import average_into
from ._triton import tl, triton


@dataclass(frozen=True)
class ASGDOptions:
    lr: float
    lambd: float
    alpha: float
    t0: float
    weight_decay: float
    maximize: bool
    # The group's lr where it is a tensor: torch then computes each new eta from it in
    # tensor ops, in its dtype, 1 ulp off the float formula at times (`next_eta_mu`).
    lr_tensor: torch.Tensor | None = None


COLUMNS = ("decay", "neg_eta", "weight_decay", "mu")


def scalars(eta: torch.Tensor | float, mu: torch.Tensor | float, o: ASGDOptions) -> list[torch.Tensor | float]:
    """`eta`, `mu`: the bucket's float32 state vectors (before this step), on the CPU, or
    the one value every tensor has (the same float64 arithmetic either way)."""
    if isinstance(eta, torch.Tensor):
        eta, mu = eta.to(torch.float64), mu.to(torch.float64)
    return [1 - o.lambd * eta, -eta, o.weight_decay, mu]


def next_eta_mu(steps: list[float], o: ASGDOptions) -> tuple[list[float], list[float]]:
    """Each tensor's eta and mu for its new step count, with torch's formulas: in Python
    floats, or in tensor ops on a tensor lr (its dtype's values, as Python floats)."""
    if o.lr_tensor is not None:
        lr = o.lr_tensor.detach().reshape(()).cpu()
        etas = [(lr / ((1 + o.lambd * lr * t) ** o.alpha)).item() for t in steps]
    else:
        etas = [o.lr / ((1 + o.lambd * o.lr * t) ** o.alpha) for t in steps]
    mus = [1 / max(1, t - o.t0) for t in steps]
    return etas, mus


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _asgd_update(p_ptr, g_ptr, ax_ptr, offs, mask, s_ptr,
                 MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr):
    decay = tl.load(s_ptr + 0)
    neg_eta = tl.load(s_ptr + 1)
    weight_decay = tl.load(s_ptr + 2)
    mu = tl.load(s_ptr + 3)
    cdt = decay.dtype

    p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = load_grad_l2(g_ptr, offs, mask, s_ptr, p, weight_decay, cdt, MAXIMIZE, WEIGHT_DECAY, False)
    p = p * decay
    p = p + neg_eta * g
    stored = store_as(p_ptr, offs, p, mask)
    # Until averaging starts (mu == 1) torch copies the parameter, which ax + (p - ax)
    # would not reproduce exactly; the branch is uniform per tensor, so nothing diverges,
    # and ax is not read at all on that side.
    if mu != 1:
        ax = tl.load(ax_ptr + offs, mask=mask).to(cdt)
        ax = ax + (p - ax) * mu
    else:
        ax = p
    store_as(ax_ptr, offs, ax, mask)
    return stored  # the parameter as stored, for a fused average


@triton.jit
def asgd_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                ax_ptr, scalars_ptr, avg_ptr, avg_segments_ptr, avg_scalars_ptr,
                BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr,
                MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, AVERAGE: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    ax_seg_ptr = ax_ptr + seg
    if start + BLOCK <= numel:  # whole blocks unmasked, for 128-bit accesses (see adam.py)
        p = _asgd_update(p_ptr, g_ptr, ax_seg_ptr, offs, None, s_ptr, MAXIMIZE, WEIGHT_DECAY)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, None, p, AVERAGE)
    else:
        mask = offs < numel
        p = _asgd_update(p_ptr, g_ptr, ax_seg_ptr, offs, mask, s_ptr, MAXIMIZE, WEIGHT_DECAY)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, p, AVERAGE)


def asgd_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                table: torch.Tensor, o: ASGDOptions) -> None:
    """Launch one ASGD kernel over every stepped tensor of the bucket."""
    _launch.launch(asgd_kernel, "asgd", bucket, batch, [state["ax"]], table,
                   MAXIMIZE=o.maximize, WEIGHT_DECAY=o.weight_decay != 0)


# ------------------------------------------------------------------------- reference

def asgd_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                   table: torch.Tensor, o: ASGDOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    cdt = table.dtype
    s, stepped, p, g = _flat.reference_inputs(bucket, batch, table, COLUMNS)
    ax = state["ax"].to(cdt)

    if o.maximize:
        g = -g
    if o.weight_decay != 0:
        g = g.add(p, alpha=o.weight_decay)  # torch's own op: an fma, as the kernel's
    p = p * s["decay"]
    p = p + s["neg_eta"] * g
    bucket.scatter(p, batch.params, batch.index)
    ax = torch.where(s["mu"] != 1, ax + (p - ax) * s["mu"], p)
    _flat.commit(state["ax"], ax, stepped)


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
            pointers.update(ax_ptr=dtype, scalars_ptr=_launch.compute_dtype(dtype), **average_pointers(dtype))
            average = constexprs["AVERAGE"] != 0
            # Counted on the averaging branch, the one that reads ax.
            out.append(Variant(f"asgd-{label}-{str(dtype)[6:]}", asgd_kernel, pointers, constexprs,
                               loads=3 + average, stores=2 + average, dtype=dtype))
    return out


VARIANTS = _variants()
