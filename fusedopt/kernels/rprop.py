"""Rprop: the Triton kernel, its launcher, and the plain-torch reference.

The update, per element (torch's order of operations)::

    g = -grad if maximize else grad
    s = sign(g * prev)                        # product rounded to the state dtype first
    factor = etaplus if s > 0 else etaminus if s < 0 else 1
    step_size = clamp(step_size * factor, step_size_min, step_size_max)
    g = 0 where factor == etaminus            # the gradient changed sign: skip this step
    p = p - sign(g) * step_size
    prev = g

``step_size`` starts at lr (the optimizer fills it), ``prev`` at 0. As torch's ``sign``,
the sign of NaN is 0 here. torch writes etaplus and etaminus into a tensor of the state
dtype before using them, so the scalar table holds them rounded to that dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import locate, store_as
from .averaging import average_into
from ._triton import tl, triton


@dataclass(frozen=True)
class RpropOptions:
    etaminus: float
    etaplus: float
    step_size_min: float
    step_size_max: float
    maximize: bool


COLUMNS = ("etaminus", "etaplus", "step_size_min", "step_size_max")


def scalars(o: RpropOptions, dtype: torch.dtype) -> list[torch.Tensor | float]:
    """`dtype` is the state's: the etas as torch sees them after storing them in it."""
    etaminus, etaplus = torch.tensor([o.etaminus, o.etaplus], dtype=torch.float64).to(dtype).tolist()
    return [etaminus, etaplus, o.step_size_min, o.step_size_max]


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _sign(x):
    # torch.sign: (0 < x) - (x < 0), so NaN maps to 0.
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)


@triton.jit
def _rprop_update(p_ptr, g_ptr, prev_ptr, ss_ptr, offs, mask, s_ptr, MAXIMIZE: tl.constexpr):
    etaminus = tl.load(s_ptr + 0)
    etaplus = tl.load(s_ptr + 1)
    step_size_min = tl.load(s_ptr + 2)
    step_size_max = tl.load(s_ptr + 3)
    cdt = etaminus.dtype

    p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    prev = tl.load(prev_ptr + offs, mask=mask)
    step_size = tl.load(ss_ptr + offs, mask=mask).to(cdt)
    if MAXIMIZE:
        g = -g
    # torch multiplies in the state dtype: a product that underflows there has sign 0.
    s = _sign((g * prev.to(cdt)).to(prev.dtype).to(cdt))
    # The same three in-place rewrites torch makes, in its order, so that etas that
    # round to 0 or 1 in a narrow dtype behave as they do there.
    s = tl.where(s > 0, etaplus, s)
    s = tl.where(s < 0, etaminus, s)
    s = tl.where(s == 0, 1.0, s)
    # Rounding to the state dtype commutes with the clamp, so one rounding at the store
    # gives torch's two. Written as two selects: NaN passes through, and a min above the
    # max yields the max, as torch.clamp does.
    step_size = step_size * s
    step_size = tl.where(step_size < step_size_min, step_size_min, step_size)
    step_size = tl.where(step_size > step_size_max, step_size_max, step_size)
    store_as(ss_ptr, offs, step_size, mask)
    g = tl.where(s == etaminus, 0.0, g)
    store_as(prev_ptr, offs, g, mask)
    # A multiply, not a select: 0 * inf must stay NaN as in torch.
    p = p + (-_sign(g)) * step_size
    stored = store_as(p_ptr, offs, p, mask)
    return stored  # the parameter as stored, for a fused average


@triton.jit
def rprop_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                 prev_ptr, step_size_ptr, scalars_ptr, avg_ptr, avg_segments_ptr, avg_scalars_ptr,
                 BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr, MAXIMIZE: tl.constexpr,
                 AVERAGE: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    pv_ptr = prev_ptr + seg
    ss_ptr = step_size_ptr + seg
    if start + BLOCK <= numel:  # whole blocks unmasked, for 128-bit accesses (see adam.py)
        p = _rprop_update(p_ptr, g_ptr, pv_ptr, ss_ptr, offs, None, s_ptr, MAXIMIZE)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, None, p, AVERAGE)
    else:
        mask = offs < numel
        p = _rprop_update(p_ptr, g_ptr, pv_ptr, ss_ptr, offs, mask, s_ptr, MAXIMIZE)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, p, AVERAGE)


def rprop_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                 table: torch.Tensor, o: RpropOptions) -> None:
    """Launch one Rprop kernel over every stepped tensor of the bucket."""
    _launch.launch(rprop_kernel, "rprop", bucket, batch, [state["prev"], state["step_size"]], table,
                   MAXIMIZE=o.maximize)


# ------------------------------------------------------------------------- reference

def _sign_ref(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0, torch.where(x < 0, -1.0, 0.0)).to(x.dtype)


def rprop_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                    table: torch.Tensor, o: RpropOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    cdt = table.dtype
    sc, stepped, p, g = _flat.reference_inputs(bucket, batch, table, COLUMNS)
    prev = state["prev"]
    step_size = state["step_size"].to(cdt)

    if o.maximize:
        g = -g
    s = _sign_ref((g * prev.to(cdt)).to(prev.dtype).to(cdt))
    s = torch.where(s > 0, sc["etaplus"], s)
    s = torch.where(s < 0, sc["etaminus"], s)
    s = torch.where(s == 0, 1.0, s)
    step_size = step_size * s
    step_size = torch.where(step_size < sc["step_size_min"], sc["step_size_min"], step_size)
    step_size = torch.where(step_size > sc["step_size_max"], sc["step_size_max"], step_size)
    _flat.commit(state["step_size"], step_size, stepped)
    g = torch.where(s == sc["etaminus"], 0.0, g)
    _flat.commit(state["prev"], g, stepped)
    p = p + (-_sign_ref(g)) * step_size
    bucket.scatter(p, batch.params, batch.index)


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, average_pointers, layout_pointers

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for label, maximize, average in (("plain", False, 0), ("maximize", True, 0), ("ema", False, 1)):
            pointers = layout_pointers(dtype)
            pointers.update(prev_ptr=dtype, step_size_ptr=dtype, scalars_ptr=_launch.compute_dtype(dtype),
                            **average_pointers(dtype))
            constexprs = dict(NUM_SCALARS=len(COLUMNS), MAXIMIZE=maximize, AVERAGE=average)
            out.append(Variant(f"rprop-{label}-{str(dtype)[6:]}", rprop_kernel, pointers, constexprs,
                               loads=4 + average, stores=3 + average, dtype=dtype))
    return out


VARIANTS = _variants()
