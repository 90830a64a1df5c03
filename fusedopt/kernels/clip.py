"""Fused gradient clipping (`max_grad_norm=`): the global gradient norm, on the device.

torch's `clip_grad_norm_` reads every gradient to take the norm, then reads and writes
every gradient again to scale it, then the optimizer reads it a third time. Here the norm
is one reduction launch per bucket over the same block table the update kernel runs on
(each program writes the sum of squares of its block: no atomics, so the sum is the same
every run), a tiny finish in torch on the device (no host sync), and the clip coefficient
reaches the update kernel through its gradient prologue (`_launch.load_grad`): the
gradients are read twice and never written.

The coefficient is torch's: ``min(max_norm / (total_norm + 1e-6), 1)``. With GradScaler
handing its scale to the optimizer (fused=True) the gradients are still scaled when the
norm is taken, so the norm is divided by the scale: the norm of the unscaled gradient.
"""
from __future__ import annotations

import torch

from .. import _flat
from . import _launch
from ._launch import locate
from ._triton import tl, triton


@triton.jit
def sumsq_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr, out_ptr,
                 BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    cdt = out_ptr.dtype.element_ty
    if start + BLOCK <= numel:
        g = tl.load(g_ptr + offs).to(cdt)
    else:
        g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(cdt)
    tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


def sum_of_squares(bucket: _flat.Bucket, batch: _flat.Batch) -> torch.Tensor:
    """The sum of squares of the batch's gradients, a 0-dim tensor on the bucket's device in
    the bucket's compute dtype, without a host sync."""
    cdt = _launch.compute_dtype(bucket.real_dtype)
    if bucket.path != "triton":
        # The reference and native paths: plain torch, one norm per tensor (torch's
        # multi-tensor norm: the same values as a vector_norm each, without a Python loop).
        if not batch.grads:
            return torch.zeros((), dtype=cdt, device=bucket.device)
        norms = torch.stack(torch._foreach_norm(batch.grads, 2, dtype=cdt))
        return norms.square().sum()
    block, num_warps = _launch.block_config(bucket)
    offsets, align = _launch.pointer_table(bucket, batch)
    segments, numels, block_tensor, block_start = _launch.grid_tables(bucket, batch, block)
    partial = torch.zeros(block_tensor.numel(), dtype=cdt, device=bucket.device)
    if partial.numel():
        sumsq_kernel[(block_tensor.numel(),)](bucket.anchor(), offsets, segments, numels, block_tensor, block_start,
                                              partial, BLOCK=block, ALIGN=align, num_warps=num_warps)
        _launch.record_launch("sumsq")
    return partial.sum()


def clip_coefficient(sums: list[torch.Tensor], max_norm: float, grad_scale: torch.Tensor | None) -> torch.Tensor:
    """torch's clip coefficient from the buckets' sums of squares, on the first one's device.

    The total is accumulated in float64 when any bucket computes in it, else in float32.
    """
    device = sums[0].device
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    total = torch.stack([s.to(device=device, dtype=dtype, non_blocking=True) for s in sums]).sum().sqrt()
    if grad_scale is not None:
        total = total / grad_scale.to(device=device, dtype=dtype, non_blocking=True).reshape(())
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, layout_pointers

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        pointers = layout_pointers(dtype)
        pointers.update(out_ptr=_launch.compute_dtype(dtype))
        # one stream read, no vector store (one value per program)
        out.append(Variant(f"sumsq-{str(dtype)[6:]}", sumsq_kernel, pointers, {}, loads=1, stores=0, dtype=dtype))
    return out


VARIANTS = _variants()
