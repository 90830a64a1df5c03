"""Fused gradient clipping (`max_grad_norm=`): the global gradient norm, on the device.

torch's `clip_grad_norm_` reads every gradient to take the norm, then reads and writes
every gradient again to scale it, then the optimizer reads it a third time. Here the norm
is one reduction launch per bucket over the same block table the update kernel runs on
(each program writes the sum of squares of its block: no atomics, so the sum is the same
every run), a tiny finish in torch on the device (no host sync; on the CPU, where reading a
value costs no sync, in Python floats), and the clip coefficient
reaches the update kernel through its gradient prologue (`_launch.load_grad`): the
gradients are read twice and never written.

The coefficient is torch's: ``min(max_norm / (total_norm + 1e-6), 1)``. With GradScaler
handing its scale to the optimizer (fused=True) the gradients are still scaled when the
norm is taken: each element is divided by the scale before it is squared, as torch's recipe
(`unscale_`, then `clip_grad_norm_`) squares unscaled gradients. Dividing the scaled sum
afterwards would overflow fp32 once scale x norm passed 1.8e19 (GradScaler doubles its
scale every 2000 steps without an inf, so under bf16 autocast it gets there), and an
infinite norm is a coefficient of 0: the step would stop moving the parameters, silently.
"""
from __future__ import annotations

import math

import torch

from .. import _flat
from . import _launch
from ._launch import ieee_div, locate
from ._triton import tl, triton


@triton.jit
def sumsq_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr, scale_ptr,
                 out_ptr, BLOCK: tl.constexpr, ALIGN: tl.constexpr, UNSCALE: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    cdt = out_ptr.dtype.element_ty
    if start + BLOCK <= numel:
        g = tl.load(g_ptr + offs).to(cdt)
    else:
        g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(cdt)
    if UNSCALE:   # as the update kernel unscales it (`_launch.load_grad`)
        g = ieee_div(g, tl.load(scale_ptr).to(cdt))
    tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


def sum_of_squares(bucket: _flat.Bucket, batch: _flat.Batch, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of squares of the batch's gradients, each divided by GradScaler's
    `grad_scale` where one is given, a 0-dim tensor on the bucket's device in the bucket's
    compute dtype, without a host sync."""
    cdt = _launch.compute_dtype(bucket.real_dtype)
    if bucket.sharded:
        return _sharded_sum_of_squares(bucket, batch, cdt, grad_scale)
    if bucket.path != "triton":
        return _sum_of_squares_torch(bucket, batch.grads, cdt, grad_scale)
    block, num_warps = _launch.block_config(bucket)
    offsets, align = _launch.pointer_table(bucket, batch)
    segments, numels, block_tensor, block_start = _launch.grid_tables(bucket, batch, block)
    partial = torch.zeros(block_tensor.numel(), dtype=cdt, device=bucket.device)
    scale = partial if grad_scale is None else _launch.on_device(grad_scale, bucket.device)
    if partial.numel():
        with _launch.device_guard(bucket.device):
            sumsq_kernel[(block_tensor.numel(),)](bucket.anchor(), offsets, segments, numels, block_tensor,
                                                  block_start, scale, partial, BLOCK=block, ALIGN=align,
                                                  UNSCALE=grad_scale is not None, num_warps=num_warps)
        _launch.record_launch("sumsq")
    return partial.sum()


def _sharded_sum_of_squares(bucket: _flat.Bucket, batch: _flat.Batch, cdt: torch.dtype,
                            grad_scale: torch.Tensor | None) -> torch.Tensor:
    """The sum of squares of DTensor gradients (FSDP2, tensor parallelism) over the whole
    tensors, as torch's clip_grad_norm_ takes their norm: each rank's sum over the local
    shards it holds, summed over the mesh dimensions the parameter is sharded on (a Partial
    sum made Replicate: one all-reduce per mesh and placement) and not over those it is
    replicated on. Every rank holds the same buckets and tensors, so the collectives match."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    groups: dict[tuple, tuple] = {}
    for i, g in zip(batch.index, batch.grads):
        p = bucket.params[i]
        if not isinstance(p, DTensor):
            # A plain tensor's norm on each rank is not a share of the model's: torch's
            # clip_grad_norm_ refuses the mix too (its _foreach_norm "got mixed torch.Tensor
            # and DTensor"). Raised before anything changes: the norm precedes every update.
            raise RuntimeError(
                f"fusedopt: max_grad_norm needs the whole model's gradient norm, and parameter "
                f"{bucket.positions[i]} of its param group (shape {tuple(p.shape)}) is a plain tensor beside "
                "DTensor parameters; torch's clip_grad_norm_ refuses that mix as well. help: distribute every "
                "parameter (torch.distributed.tensor.distribute_tensor with Replicate() for those not sharded)")
        key = (id(p.device_mesh), tuple(p.placements))
        groups.setdefault(key, (p.device_mesh, p.placements, []))[2].append(g)
    total = None
    for mesh, placements, grads in groups.values():
        local = _sum_of_squares_torch(bucket, grads, cdt, grad_scale)
        summed = DTensor.from_local(local, mesh, [Replicate() if pl.is_replicate() else Partial() for pl in placements],
                                    run_check=False).full_tensor()
        total = summed if total is None else total + summed
    return total


# How the reference and native paths take the sum of squares (`_sum_of_squares_torch`),
# measured on this project's CPUs. A gradient of the compute dtype with DIRECT elements or
# more is read where it lies: up to NORM_PIECE elements as a whole, in one
# `torch._foreach_norm` over all such; a larger one as rows of ROW elements, one
# `linalg.vector_norm(dim=1)` a tensor; the norms are then dotted with themselves. The rest
# (the small gradients, bf16/fp16 ones, what is left of a larger one after its last whole
# row) is packed into a scratch of CHUNK elements (1 MB of fp32, in a core's L2 cache),
# widened there, and dotted.
# Why rows: a norm over a whole large tensor is the less accurate sum (2-4e-6 relative to
# float64 on the runner's fp32 models, torch's own clip_grad_norm_ precision); cut into
# 64K-element pieces for one `_foreach_norm` it is 2-4e-7, but costs a reduction a piece;
# rows of 4096 are 2-5e-8 off, and on the EPYC took 70-75% of the pieces' time (four
# 512x512 gradients: 0.20 against 0.28 ms, a cold cache), which made the runner's clipped
# AdamW step 3-5% faster on its few-large and GPT-2 lists (ResNet-50's: no change).
# bf16 rows widened inside the reduction (`dtype=torch.float32`) were no faster than
# widening into the scratch. In a step that starts with a cold cache (the runner's),
# per-tensor `torch.dot` calls made a clipped AdamW step 6-13% slower on the Xeon than one
# `_foreach_norm`. bf16 chunks of 256K elements took 60% of the time of 64K ones.
CHUNK = 1 << 18
DIRECT = 1 << 12
NORM_PIECE = 1 << 16
ROW = 1 << 12


def _sum_of_squares_torch(bucket: _flat.Bucket, grads: list[torch.Tensor], cdt: torch.dtype,
                          grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The reference and native paths' sum of squares of the gradients, a 0-dim tensor in
    the compute dtype: norms of the large gradients (whole, or by rows), and dot products
    of packed chunks of the rest (see DIRECT, NORM_PIECE, ROW, CHUNK).

    With a `grad_scale` every gradient is packed and divided by it in the scratch before
    it is squared: torch's norm of a row or a tensor accumulates its squares in fp32 too,
    and would overflow where the unscaled gradients do not.

    A norm per tensor costs a dispatch each: 2000 tiny ones took 3.4 ms on the Xeon (bf16:
    5.7), the packed chunks 1.3. torch's bf16 norm is faster than widening, but it rounds
    each norm to bf16 (2**-9 relative), where this is exact to fp32's rounding."""
    parts, pending, size, whole, rows = [], [], 0, [], []
    scratch = bucket.__dict__.get("_sumsq_scratch")
    if scratch is None or scratch.dtype != cdt or scratch.numel() < min(CHUNK, bucket.size):
        scratch = bucket._sumsq_scratch = torch.empty(min(CHUNK, bucket.size), dtype=cdt, device=bucket.device)

    def flush():
        nonlocal pending, size
        if pending:
            flat = scratch[:size]
            if len(pending) == 1:
                flat.copy_(pending[0])
            elif pending[0].dtype == cdt:
                torch.cat(pending, out=flat)
            else:   # cat widening as it goes takes a slow path: gather, then widen
                flat.copy_(torch.cat(pending))
            if grad_scale is not None:
                flat.div_(scale)
            parts.append(torch.dot(flat, flat))
            pending, size = [], 0

    if grad_scale is not None:
        scale = _launch.on_device(grad_scale, bucket.device, cdt).reshape(())

    for g in grads:
        n = g.numel()
        if n >= DIRECT and g.dtype == cdt and grad_scale is None:
            if n <= NORM_PIECE:
                whole.append(g)
                continue
            # a batch's gradients are dense: its elements in memory order, as rows
            k = n // ROW
            rows.append(torch.linalg.vector_norm(g.as_strided((k, ROW), (ROW, 1)), dim=1))
            n -= k * ROW
            if not n:
                continue
            g = g.as_strided((n,), (1,), g.storage_offset() + k * ROW)
        elif g.dim() != 1:
            g = _flat.memory_order(g)
        for piece in (g.split(CHUNK) if n > CHUNK else (g,)):
            if size + piece.numel() > CHUNK:
                flush()
            pending.append(piece)
            size += piece.numel()
    flush()
    if whole:
        rows.append(torch.stack(torch._foreach_norm(whole)))
    if rows:
        norms = rows[0] if len(rows) == 1 else torch.cat(rows)
        parts.append(torch.dot(norms, norms))
    if len(parts) < 2:  # a sum of one is itself: two ops fewer for a small model
        return parts[0] if parts else torch.zeros((), dtype=cdt, device=bucket.device)
    return torch.stack(parts).sum()


def clip_coefficient(sums: list[torch.Tensor], max_norm: float) -> torch.Tensor | float:
    """torch's clip coefficient from the buckets' sums of squares (of the unscaled
    gradients), on the first one's device.

    The total is accumulated in float64 when any bucket computes in it, else in float32.
    Where everything is on the CPU the coefficient is a Python float (`_coefficient_on_host`).
    """
    device = sums[0].device
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    if device.type == "cpu" and all(s.device.type == "cpu" for s in sums):
        return _coefficient_on_host(sums, max_norm, dtype)
    if len(sums) == 1 and sums[0].dtype == dtype:
        total = sums[0].sqrt()  # one bucket: its sum is the total
    else:
        total = torch.stack([_launch.on_device(s, device, dtype) for s in sums]).sum().sqrt()
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def _coefficient_on_host(sums: list[torch.Tensor], max_norm: float, dtype: torch.dtype) -> float:
    """`clip_coefficient` for tensors on the CPU, where reading them costs no sync: the same
    operations in Python floats, each rounded to `dtype` as torch's op would round it (a
    float64 result of an fp32 add, multiply, divide or square root, rounded to fp32, is the
    correctly rounded fp32 result). Five tensor ops cost 40-70 us in a step that starts with
    a cold cache (the runner's; a training step's after backward), these a few. Every path
    on the CPU takes its coefficient from here, so they agree with each other; the square
    root is correctly rounded, where torch's CPU `sqrt` can be an ulp off."""
    r = _launch.round_fp32 if dtype == torch.float32 else float
    total = 0.0
    for s in sums:
        total = r(total + s.item())
    total = r(math.sqrt(total))
    # torch's `max_norm / t` is `t.reciprocal() * max_norm`
    coefficient = r(r(1.0 / r(total + r(1e-6))) * r(max_norm))
    return coefficient if coefficient != coefficient else min(coefficient, 1.0)   # clamp keeps a NaN


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, layout_pointers

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        pointers = layout_pointers(dtype)
        pointers.update(scale_ptr=torch.float32, out_ptr=_launch.compute_dtype(dtype))
        # one stream read, no vector store (one value per program)
        for unscale in (False, True):
            name = f"sumsq-{str(dtype)[6:]}" + ("-unscale" if unscale else "")
            out.append(Variant(name, sumsq_kernel, pointers, dict(UNSCALE=unscale), loads=1, stores=0, dtype=dtype))
    return out


VARIANTS = _variants()
