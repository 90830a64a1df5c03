"""Weight averaging (SWA, EMA): the Triton kernel, its launcher, and the plain-torch paths.

One launch updates every tensor of a bucket of an averaged model: ``avg`` is the bucket's
flat buffer (the averaged module's tensors are views of it), ``x`` the source model's
tensor, reached through the pointer table like an optimizer's parameters. Each formula is
the one torch's corresponding averaging function evaluates, with torch's rounding points::

    LERP    avg = lerp(avg, x, w)            get_ema_multi_avg_fn (w = 1 - decay),
                                             get_swa_multi_avg_fn (w = float32(1 / (n + 1))),
                                             the default average on foreach devices (CUDA)
    DIVIDE  avg = avg + (x - avg) / (n + 1)  get_swa_avg_fn, the default average on the CPU
    AXPBY   avg = decay * avg + (1 - decay) * x        get_ema_avg_fn
    copy    avg = x                          the first update, and buffers kept in sync

ATen's lerp is an fma (``fma(w, x - avg, avg)`` for |w| < 0.5, else
``fma(w - 1, x - avg, x)``) on the CPU and on CUDA alike, so the kernel calls ``tl.fma``;
DIVIDE and AXPBY are several torch ops, each rounding to the tensor's dtype, so the kernel
rounds its intermediates to the storage dtype too and is launched without fp contraction.

Tensors of a bucket from index ``first_copy`` on are copied instead of averaged: the
averaged model orders each bucket as averaged tensors first, synced buffers last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import bf16_bits, locate, store_as
from ._triton import tl, triton

LERP, DIVIDE, AXPBY = 0, 1, 2
FORMULAS = {"lerp": LERP, "divide": DIVIDE, "axpby": AXPBY}


def scalars(formula: str, n_averaged: int, decay: float | None) -> tuple[float, float]:
    """The two per-launch scalars of a formula, as float64 values of what torch computes.

    Cast to the kernel's compute dtype they round exactly as torch rounds its Python
    scalars (to the op's math type). The SWA lerp weight is the exception: torch computes
    it as a tensor, ``1 / (n_averaged + 1)``, so it is a float32 value whatever the dtype
    of the parameters.
    """
    if formula == "lerp":
        if decay is None:
            weight = torch.reciprocal(torch.tensor(n_averaged + 1)).item()
        else:
            weight = 1 - decay
        return weight, 0.0
    if formula == "divide":
        return float(n_averaged + 1), 0.0
    return decay, 1 - decay


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _round(x, ptr):
    """x rounded to ptr's element type and back: where torch stores an intermediate
    tensor in bf16/fp16, the kernel loses the same bits (nearest even, as in store_as)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return bf16_bits(x).to(tl.float32, bitcast=True)
    elif ptr.dtype.element_ty == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _average_value(a_ptr, offs, mask, x, s_ptr, copy, FORMULA: tl.constexpr):
    """Average `x` (the source's values, already in registers) into the tensor at a_ptr:
    `avg = x` when `copy`, else the formula with the scalars at s_ptr."""
    if copy:
        # x holds values of a_ptr's dtype (loaded from one, or rounded to one): exact.
        tl.store(a_ptr + offs, x.to(a_ptr.dtype.element_ty), mask=mask)
    else:
        s0 = tl.load(s_ptr + 0)
        s1 = tl.load(s_ptr + 1)
        cdt = s0.dtype
        a = tl.load(a_ptr + offs, mask=mask).to(cdt)
        xc = x.to(cdt)
        if FORMULA == 0:  # LERP
            diff = xc - a
            if tl.abs(s0) < 0.5:
                value = tl.fma(diff, s0, a)
            else:
                value = tl.fma(diff, s0 - 1, xc)
        elif FORMULA == 1:  # DIVIDE
            diff = _round(xc - a, a_ptr)
            if cdt == tl.float32:
                # Triton's fp32 `/` is approximate on GPUs; torch divides correctly rounded
                quotient = tl.math.div_rn(diff, s0 + tl.zeros_like(diff))
            else:
                quotient = diff / s0
            value = a + _round(quotient, a_ptr)
        else:  # AXPBY
            # Each product rounded on its own, as torch's two multiplies: an fma adding +0 is
            # one rounded product whatever the compiler's fp fusion, where a plain product
            # feeding the sum would become one fma with it. (The update kernels an average is
            # fused into keep fusion on, as without one. +0 rather than -0, which LLVM folds
            # back into a plain multiply; it differs only in giving +0 for a product of -0,
            # and then only where both products are -0 does the sum's sign change.)
            zero = tl.zeros_like(a)
            value = _round(tl.fma(s0, a, zero), a_ptr) + _round(tl.fma(s1, xc, zero), a_ptr)
        store_as(a_ptr, offs, value, mask)


@triton.jit
def _average_update(a_ptr, x_ptr, offs, mask, s_ptr, copy, FORMULA: tl.constexpr):
    _average_value(a_ptr, offs, mask, tl.load(x_ptr + offs, mask=mask), s_ptr, copy, FORMULA)


# -- fused into an optimizer's update kernel (Optimizer.attach_averaged_model) -------------
# An update kernel that declares AVERAGE takes three more arguments: the averaged model's
# flat buffer, the segment of each of the bucket's tensors in it (-1: not averaged here),
# and (s0, s1, copy) in the compute dtype. AVERAGE is 0 (off) or a FORMULA + 1.

@triton.jit
def average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, x, AVERAGE: tl.constexpr):
    """Average the parameter's new value `x`, still in registers, into its averaged copy:
    the read of the parameter that a separate update_parameters would make is saved."""
    if AVERAGE != 0:
        seg = tl.load(avg_segments_ptr + t)
        if seg >= 0:
            copy = tl.load(avg_scalars_ptr + 2) != 0
            _average_value(avg_ptr + tl.multiple_of(seg, 16), offs, mask, x, avg_scalars_ptr, copy, AVERAGE - 1)


@triton.jit
def average_stored(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, x_ptr, offs, mask, AVERAGE: tl.constexpr):
    """`average_into` for a parameter the kernel did not change (GradScaler skipped the
    step): its stored value is averaged, as update_parameters after the step would."""
    if AVERAGE != 0:
        seg = tl.load(avg_segments_ptr + t)
        if seg >= 0:
            copy = tl.load(avg_scalars_ptr + 2) != 0
            _average_update(avg_ptr + tl.multiple_of(seg, 16), x_ptr, offs, mask, avg_scalars_ptr, copy,
                            AVERAGE - 1)


@triton.jit
def average_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                   avg_ptr, scalars_ptr, first_copy,
                   BLOCK: tl.constexpr, ALIGN: tl.constexpr, FORMULA: tl.constexpr):
    t, start, numel, seg, x_ptr, _ = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                            block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    a_ptr = avg_ptr + seg
    copy = t >= first_copy
    if start + BLOCK <= numel:  # whole blocks unmasked, for 128-bit accesses (see adam.py)
        _average_update(a_ptr, x_ptr, offs, None, scalars_ptr, copy, FORMULA)
    else:
        _average_update(a_ptr, x_ptr, offs, offs < numel, scalars_ptr, copy, FORMULA)


@dataclass
class FusedAverage:
    """What an optimizer's update kernel needs to average its bucket's new parameters into
    an averaged model in the same pass (its AVERAGE arguments; see `average_into`)."""

    buffer: torch.Tensor     # the averaged model's flat buffer of this device and dtype
    segments: torch.Tensor   # int64 on the device: each bucket tensor's segment in it, -1 for none
    scalars: torch.Tensor    # (s0, s1, copy) in the compute dtype, on the device
    flag: int                # the kernel's AVERAGE: FORMULA + 1


def fused_scalars(device: torch.device, dtype: torch.dtype, formula: str, n_averaged: int,
                  decay: float | None, cache: dict) -> torch.Tensor:
    """(s0, s1, copy) for `average_into`: the first update copies, later ones average with
    `scalars(...)`. Kept in `cache` while they repeat (an EMA's always do after the first)."""
    values = (0.0, 0.0, 1.0) if n_averaged == 0 else (*scalars(formula, n_averaged, decay), 0.0)
    key = (device, dtype, values)
    table = cache.get(key)
    if table is None:
        if len(cache) > 8:  # an SWA's weight changes every update: keep only recent ones
            cache.clear()
        table = _launch.on_device(torch.tensor(values, dtype=torch.float64).to(dtype), device)
        cache[key] = table
    return table


def scalar_tensor(bucket: _flat.Bucket, values: tuple[float, float]) -> torch.Tensor:
    """The launch's scalars on the device in the compute dtype, kept while they repeat
    (an EMA's never change), so most updates copy nothing to the device."""
    cached = getattr(bucket, "_average_scalars", None)
    if cached is not None and cached[0] == values:
        return cached[1]
    table = torch.tensor(values, dtype=torch.float64).to(_launch.compute_dtype(bucket.real_dtype))
    table = _launch.on_device(table, bucket.device)
    bucket._average_scalars = (values, table)
    return table


def average_triton(bucket: _flat.Bucket, batch: _flat.Batch, avg: torch.Tensor, formula: str,
                   values: tuple[float, float], first_copy: int) -> None:
    """Launch one averaging kernel over every tensor of the batch.

    ``batch.params`` are the source tensors (real, dense, in the segments' layout);
    ``batch.grads`` must be the same list: the pointer table has two columns and the
    kernel reads the first.
    """
    block, num_warps = _launch.block_config(bucket)
    # The averaged model reuses a batch while the model's tensors stay put, so its tables
    # are built (and copied to the device) once, not every update.
    tables = getattr(batch, "_average_tables", None)
    if tables is None or tables[0] != block:
        tables = (block, *_launch.pointer_table(bucket, batch), *_launch.grid_tables(bucket, batch, block))
        batch._average_tables = tables
    _, offsets, align, segments, numels, block_tensor, block_start = tables
    with _launch.device_guard(bucket.device):
        average_kernel[(block_tensor.numel(),)](
            bucket.anchor(), offsets, segments, numels, block_tensor, block_start,
            avg, scalar_tensor(bucket, values), first_copy,
            BLOCK=block, ALIGN=align, FORMULA=FORMULAS[formula], num_warps=num_warps,
            enable_fp_fusion=False)
    _launch.record_launch("average")


# ------------------------------------------------------------------------- reference

def _formula(formula: str, avg: torch.Tensor, x: torch.Tensor, values: tuple[float, float]) -> torch.Tensor:
    """torch's expression for each formula (the same ops as torch.optim.swa_utils)."""
    if formula == "lerp":
        return torch.lerp(avg, x, values[0])
    if formula == "divide":
        return avg + (x - avg) / values[0]
    return values[0] * avg + values[1] * x


def average_reference(bucket: _flat.Bucket, batch: _flat.Batch, avg: torch.Tensor, formula: str,
                      values: tuple[float, float], first_copy: int) -> None:
    """The same update in plain torch ops over the same flat buffer: gather the sources
    into the flat layout, evaluate the formula over it, commit the batch's segments."""
    x = bucket.gather(batch.params, batch.index, avg.dtype)
    if first_copy > 0:
        value = _formula(formula, avg, x, values)
        copied = torch.zeros(len(bucket), dtype=torch.bool)
        copied[first_copy:] = True
        value = torch.where(bucket.expand(copied), x, value)
    else:
        value = x
    _flat.commit(avg, value, bucket.stepped_elements(batch))


# ------------------------------------------------------------------------- CPU

# Mean elements per tensor below which a bucket is averaged as one flat buffer on the CPU:
# there torch's per-tensor dispatch (a few microseconds an op) costs more than the extra
# pass that gathers the sources; above it, per-tensor foreach ops over the segments win.
# Measured single-threaded on stacks of Linear+LayerNorm 32 to 1024 wide: the crossover
# is near 2K elements for lerp (one op a tensor) and 16K for the three-op formulas.
FLAT_MAX_MEAN_NUMEL = {"lerp": 2048, "divide": 16384, "axpby": 16384}


def average_cpu(bucket: _flat.Bucket, batch: _flat.Batch, avg: torch.Tensor, formula: str,
                values: tuple[float, float], first_copy: int, flat: bool | None = None) -> None:
    """The 'auto' CPU path: torch's own ops, hence torch's numbers bit for bit, arranged
    for few dispatches. Needs every tensor of the bucket in the batch (``batch.everyone``).

    flat: one ``torch.cat`` gathers the sources into a staging buffer laid out like the
        flat buffer; the formula then runs once over the averaged range, in place (no
        temporaries), and one copy covers the copied range.
    foreach: torch's foreach ops over the segments, as torch's multi-tensor functions run
        (fp32, fp64 and complex only).
    """
    if flat is None:
        flat = bucket.size < FLAT_MAX_MEAN_NUMEL[formula] * len(bucket)
    # CPU foreach ops with a scalar may round the scalar to a bf16/fp16 tensor's dtype
    # (`_foreach_mul_` does in torch 2.13) where the per-tensor op keeps it in float. Not
    # `_foreach_lerp_`, which is exactly what torch's multi-tensor EMA and SWA call.
    flat = flat or (formula != "lerp" and bucket.dtype in (torch.bfloat16, torch.float16))
    split = bucket.offsets[first_copy] if first_copy < len(bucket) else bucket.size
    if flat:
        staging = _staging(bucket, avg)
        pieces = getattr(batch, "_average_pieces", None)
        if pieces is None:
            pieces = batch._average_pieces = []
            for x, pad in zip(batch.params, bucket._average_pads):
                pieces.append(_flat.memory_order(x))
                if pad is not None:
                    pieces.append(pad)
        torch.cat(pieces, out=staging)
        if split < bucket.size:
            avg[split:].copy_(staging[split:])
        if split > 0:
            _in_place(formula, avg[:split], staging[:split], values)
        return
    segments = getattr(bucket, "_average_segments", None)
    if segments is None:
        segments = bucket._average_segments = [bucket.segment("average", i) for i in range(len(bucket))]
    xs = getattr(batch, "_average_flat_params", None)
    if xs is None:
        xs = batch._average_flat_params = [_flat.memory_order(x) for x in batch.params]
    if first_copy < len(bucket):
        torch._foreach_copy_(segments[first_copy:], xs[first_copy:])
    a, x = segments[:first_copy], xs[:first_copy]
    if not a:
        return
    if formula == "lerp":
        torch._foreach_lerp_(a, x, values[0])
    elif formula == "divide":
        diff = torch._foreach_sub(x, a)
        torch._foreach_div_(diff, values[0])
        torch._foreach_add_(a, diff)
    else:
        scaled = torch._foreach_mul(x, values[1])
        torch._foreach_mul_(a, values[0])
        torch._foreach_add_(a, scaled)


def _staging(bucket: _flat.Bucket, avg: torch.Tensor) -> torch.Tensor:
    staging = getattr(bucket, "_average_staging", None)
    if staging is None:
        staging = bucket._average_staging = torch.zeros_like(avg)
        ends = bucket.offsets[1:] + [bucket.size]
        # zero padding between segments keeps the staging buffer's layout the flat buffer's
        bucket._average_pads = [staging.new_zeros(end - start - n) if end - start > n else None
                                for start, end, n in zip(bucket.offsets, ends, bucket.numels)]
    return staging


def _in_place(formula: str, a: torch.Tensor, x: torch.Tensor, values: tuple[float, float]) -> None:
    """torch's formula with the same ops and rounding, overwriting x (the staging copy)."""
    if formula == "lerp":
        a.lerp_(x, values[0])
    elif formula == "divide":
        a.add_(x.sub_(a).div_(values[0]))
    else:
        a.mul_(values[0]).add_(x.mul_(values[1]))


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, layout_pointers

    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for name, formula in FORMULAS.items():
            pointers = layout_pointers(dtype)
            pointers.update(avg_ptr=dtype, scalars_ptr=_launch.compute_dtype(dtype))
            out.append(Variant(f"average-{name}-{str(dtype)[6:]}", average_kernel, pointers, dict(FORMULA=formula),
                               loads=2, stores=1, dtype=dtype, scalars={"first_copy": "i32"}))
    return out


VARIANTS = _variants()
