"""SparseAdam: the row kernel, its per-step work table, its launcher, and the reference.

torch's update (``torch.optim._functional.sparse_adam``) touches only the entries a
coalesced sparse gradient lists. Per entry, with ``g`` the gradient value (negated when
maximizing) and ``m0``, ``v0`` the old moments::

    um = (g - m0) * (1 - beta1);            exp_avg    = m0 + um
    uv = (g * g - v0) * (1 - beta2);        exp_avg_sq = v0 + uv
    p  = p + (-step_size) * (exp_avg / (sqrt(exp_avg_sq) + eps))
    step_size = lr * sqrt(1 - beta2**step) / (1 - beta1**step)     (host, Python floats)

Every one of those operations is a separate torch op that rounds to the parameter's dtype,
so the kernel rounds at the same points (for bf16/fp16 it rounds its fp32 intermediates
explicitly), uses IEEE division and square root, and is compiled without FMA contraction,
so moments match torch's to the bit in every dtype. Parameters can differ by one ulp on
CPU only: torch's vectorised CPU sqrt is not always correctly rounded (measured: about 1 in
130 fp32 results an ulp off); the kernel's, like torch's on CUDA, is.

The launch walks a per-step *work table* built on the host from the coalesced indices. A
gradient entry covers one "row" of the parameter (its dense dimensions; for
``nn.Embedding`` a row of the weight), and a row whose elements are contiguous in the
parameter and in the state segment is one work item: (param offset, grad-values offset,
state offset, length, tensor). Rows longer than BLOCK are split into BLOCK-long items;
parameters whose rows are not contiguous in memory fall back to one item per element, so
any strided parameter works. A program takes ROWS items as a [ROWS, WIDTH] tile, WIDTH the
longest item rounded up to a power of two and ROWS * WIDTH = BLOCK: short embedding rows
fill the program instead of leaving most lanes idle.

Offsets of parameters and gradient values are in elements from the bucket's anchor (see
``_launch.pointer_table``); state offsets are into the bucket's flat buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import ieee_div, ieee_sqrt, store_as
from ._triton import tl, triton


@dataclass(frozen=True)
class SparseAdamOptions:
    lr: float | torch.Tensor
    beta1: float
    beta2: float
    eps: float
    maximize: bool


# Columns of the per-tensor scalar table, in order.
COLUMNS = ("neg_step_size", "one_minus_beta1", "one_minus_beta2", "eps")


def step_size(step, o: SparseAdamOptions) -> float:
    """torch's step size for one tensor, with torch's arithmetic.

    With a float lr this is Python float math, as in torch. With a Tensor lr torch's
    expression yields a 0-dim tensor in lr's dtype; evaluating the same expression on a
    CPU copy gives the same value, exactly representable as a Python float.
    """
    step = step.item() if isinstance(step, torch.Tensor) else step
    bias_correction1 = 1 - o.beta1 ** step
    bias_correction2 = 1 - o.beta2 ** step
    if isinstance(o.lr, torch.Tensor):
        return float(o.lr.detach().cpu() * math.sqrt(bias_correction2) / bias_correction1)
    return o.lr * math.sqrt(bias_correction2) / bias_correction1


def scalars(n: int, steps: dict[int, float], o: SparseAdamOptions) -> list[torch.Tensor | float]:
    """The scalar table's columns; `steps` maps bucket positions to their step count."""
    neg = torch.zeros(n, dtype=torch.float64)
    for i, step in steps.items():
        neg[i] = -step_size(step, o)
    return [neg, 1 - o.beta1, 1 - o.beta2, o.eps]


@dataclass
class SparseGrad:
    """One stepped tensor's coalesced gradient, as the kernel and the reference read it."""

    index: int              # bucket position
    param: torch.Tensor
    indices: torch.Tensor   # [sparse_dim, nnz]
    values: torch.Tensor    # [nnz, *dense shape], contiguous, the parameter's dtype

    @classmethod
    def of(cls, index: int, param: torch.Tensor, grad: torch.Tensor) -> SparseGrad:
        # Coalescing sums duplicate indices (the update is not linear in the gradient). It
        # runs on the unnegated gradient: negation is exact, so summing first and negating
        # in the kernel gives the bits torch gets by negating first.
        grad = grad.coalesce()
        values = grad._values()
        if values.dtype != param.dtype:
            values = values.to(param.dtype)
        return cls(index, param, grad._indices(), values.contiguous())

    @property
    def empty(self) -> bool:
        return self.values.numel() == 0


# ------------------------------------------------------------------------- work table

def _rows_contiguous(shape, strides, sparse_dim: int) -> bool:
    """Whether the dense dimensions (from sparse_dim on) are laid out row-major, unpadded."""
    expected = 1
    for size, stride in zip(reversed(shape[sparse_dim:]), reversed(strides[sparse_dim:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _dense_offsets(shape, strides, device) -> torch.Tensor:
    """Memory offsets of every element of a strided block, in row-major order."""
    offsets = torch.zeros(1, dtype=torch.int64, device=device)
    for size, stride in zip(shape, strides):
        offsets = (offsets[:, None] + torch.arange(size, device=device) * stride).reshape(-1)
    return offsets


def _row_offsets(indices: torch.Tensor, strides) -> torch.Tensor:
    """Memory offset of each gradient entry's row: its indices dotted with the strides."""
    offsets = torch.zeros(indices.shape[1], dtype=torch.int64, device=indices.device)
    for d, stride in enumerate(strides[:indices.shape[0]]):
        offsets = offsets + indices[d] * stride
    return offsets


@dataclass
class WorkTable:
    items: torch.Tensor     # [5, n] int64: param offset, values offset, state offset, length, tensor
    width: int              # columns of a program's tile: the longest item, rounded up to a power of two
    rows: int               # items per program
    full: bool              # every item is exactly `width` long: no column mask needed
    align: int              # elements every offset is a multiple of

    @property
    def count(self) -> int:
        return self.items.shape[1]


def work_table(bucket: _flat.Bucket, grads: list[SparseGrad], block: int) -> WorkTable | None:
    """The per-step work items of a bucket, or None when no gradient has an entry.

    Only the offset arithmetic runs on the device; lengths and alignment are known on the
    host from shapes and strides, so building the table never waits on the device.
    """
    anchor = bucket.anchor()
    base, size = anchor.data_ptr(), anchor.element_size()
    vector = 16 // size
    columns: list[list[torch.Tensor]] = [[], [], [], [], []]
    lengths: set[int] = set()
    aligned = True
    for sg in grads:
        if sg.empty:
            continue
        i, p = sg.index, sg.param
        device = sg.values.device
        shape, p_strides, s_strides = tuple(p.shape), p.stride(), bucket.strides[i]
        sparse_dim = sg.indices.shape[0]
        nnz = sg.values.shape[0]
        inner = math.prod(sg.values.shape[1:])
        p_base = (p.data_ptr() - base) // size
        g_base = (sg.values.data_ptr() - base) // size
        p_rows = _row_offsets(sg.indices, p_strides) + p_base
        s_rows = _row_offsets(sg.indices, s_strides) + bucket.offsets[i]
        if _rows_contiguous(shape, p_strides, sparse_dim) and _rows_contiguous(shape, s_strides, sparse_dim):
            starts = torch.arange(0, inner, block, device=device)
            length = (inner - starts).clamp_(max=block)
            g_rows = torch.arange(nnz, device=device) * inner + g_base
            lengths.update({min(inner, block), inner - (len(starts) - 1) * block})
            aligned = aligned and inner % vector == 0 and p_base % vector == 0 and g_base % vector == 0 and all(
                s % vector == 0 for s in tuple(p_strides[:sparse_dim]) + tuple(s_strides[:sparse_dim]))
        else:
            # Rows scattered in memory: one item per element.
            starts = torch.zeros(1, dtype=torch.int64, device=device)
            p_rows = (p_rows[:, None] + _dense_offsets(shape[sparse_dim:], p_strides[sparse_dim:], device)).reshape(-1)
            s_rows = (s_rows[:, None] + _dense_offsets(shape[sparse_dim:], s_strides[sparse_dim:], device)).reshape(-1)
            g_rows = torch.arange(nnz * inner, device=device) + g_base
            length = torch.ones(1, dtype=torch.int64, device=device)
            lengths.add(1)
            aligned = False
        n = p_rows.numel() * starts.numel()
        columns[0].append((p_rows[:, None] + starts).reshape(-1))
        columns[1].append((g_rows[:, None] + starts).reshape(-1))
        columns[2].append((s_rows[:, None] + starts).reshape(-1))
        columns[3].append(length.expand(p_rows.numel(), -1).reshape(-1))
        columns[4].append(torch.full((n,), i, dtype=torch.int64, device=device))
    if not lengths:
        return None
    items = torch.stack([torch.cat(c) for c in columns]).to(bucket.device)
    width = min(triton.next_power_of_2(max(lengths)), block)
    return WorkTable(items, width, max(1, block // width), lengths == {width}, vector if aligned else 1)


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _rounded(x, like_ptr):
    """x rounded to like_ptr's element type and widened back, as a torch op's result is.

    bf16 rounding is done on the bits (nearest even) because Triton's interpreter
    truncates when it casts fp32 to bf16; numpy and the GPU both round fp16 correctly.
    """
    if like_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        return rounded.to(tl.float32, bitcast=True)
    elif like_ptr.dtype.element_ty == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def sparse_adam_kernel(anchor_ptr, p_items_ptr, g_items_ptr, s_items_ptr, length_items_ptr, t_items_ptr, n_items,
                       exp_avg_ptr, exp_avg_sq_ptr, scalars_ptr,
                       ROWS: tl.constexpr, WIDTH: tl.constexpr, FULL: tl.constexpr, ALIGN: tl.constexpr,
                       NUM_SCALARS: tl.constexpr, MAXIMIZE: tl.constexpr):
    # Each column of the work table comes as its own pointer: `k * n_items` in the kernel
    # is 32-bit arithmetic, which wraps from 2^29 items.
    item = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = item < n_items
    p_off = tl.multiple_of(tl.load(p_items_ptr + item, mask=live, other=0), ALIGN)
    g_off = tl.multiple_of(tl.load(g_items_ptr + item, mask=live, other=0), ALIGN)
    s_off = tl.multiple_of(tl.load(s_items_ptr + item, mask=live, other=0), ALIGN)
    t = tl.load(t_items_ptr + item, mask=live, other=0)
    col = tl.arange(0, WIDTH)[None, :]
    if FULL:
        # Uniform along a row, so the compiler keeps vectorised accesses.
        mask = live[:, None]
    else:
        length = tl.load(length_items_ptr + item, mask=live, other=0)
        mask = live[:, None] & (col < length[:, None])
    p_offs = p_off[:, None] + col
    g_offs = g_off[:, None] + col
    s_offs = s_off[:, None] + col

    s_row = scalars_ptr + t * NUM_SCALARS
    neg_step_size = tl.load(s_row + 0, mask=live, other=0)[:, None]
    one_minus_beta1 = tl.load(s_row + 1, mask=live, other=0)[:, None]
    one_minus_beta2 = tl.load(s_row + 2, mask=live, other=0)[:, None]
    eps = tl.load(s_row + 3, mask=live, other=1)[:, None]
    cdt = neg_step_size.dtype

    g = tl.load(anchor_ptr + g_offs, mask=mask, other=0).to(cdt)
    p = tl.load(anchor_ptr + p_offs, mask=mask, other=0).to(cdt)
    m0 = tl.load(exp_avg_ptr + s_offs, mask=mask, other=0).to(cdt)
    # (1 in masked lanes, never stored: rounded per op to fp16, eps is 0 and a 0 there would
    # divide 0 by 0, which Triton's interpreter reports as a numpy warning every step)
    v0 = tl.load(exp_avg_sq_ptr + s_offs, mask=mask, other=1).to(cdt)
    if MAXIMIZE:
        g = -g
    um = _rounded(_rounded(g - m0, anchor_ptr) * one_minus_beta1, anchor_ptr)
    exp_avg = _rounded(m0 + um, anchor_ptr)
    uv = _rounded(_rounded(_rounded(g * g, anchor_ptr) - v0, anchor_ptr) * one_minus_beta2, anchor_ptr)
    exp_avg_sq = _rounded(v0 + uv, anchor_ptr)
    store_as(exp_avg_ptr, s_offs, exp_avg, mask)
    store_as(exp_avg_sq_ptr, s_offs, exp_avg_sq, mask)
    denom = _rounded(_rounded(ieee_sqrt(exp_avg_sq), anchor_ptr) + eps, anchor_ptr)
    ratio = _rounded(ieee_div(exp_avg, denom), anchor_ptr)
    p = p + _rounded(neg_step_size * ratio, anchor_ptr)
    store_as(anchor_ptr, p_offs, p, mask)


def sparse_adam_triton(bucket: _flat.Bucket, grads: list[SparseGrad], state: dict[str, torch.Tensor],
                       table: torch.Tensor, o: SparseAdamOptions) -> None:
    """Launch one kernel over every gradient entry of the bucket (none if there are none)."""
    block, num_warps = _launch.block_config(bucket)
    work = work_table(bucket, grads, block)
    if work is None:
        return
    with _launch.device_guard(bucket.device):
        sparse_adam_kernel[(triton.cdiv(work.count, work.rows),)](
            bucket.anchor(), *work.items.unbind(), work.count, state["exp_avg"], state["exp_avg_sq"], table,
            ROWS=work.rows, WIDTH=work.width, FULL=work.full, ALIGN=work.align, NUM_SCALARS=len(COLUMNS),
            MAXIMIZE=o.maximize, num_warps=num_warps,
            # torch rounds between the multiply and the add of every pair; a fused
            # multiply-add would skip that rounding.
            enable_fp_fusion=False)
    _launch.record_launch("sparse_adam")


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant

    out = []
    rows, width = 8, 128   # an embedding's rows of 128, eight to a program
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for label, full in (("rows", True), ("ragged", False)):
            pointers = {"anchor_ptr": dtype, **{f"{c}_items_ptr": torch.int64 for c in ("p", "g", "s", "length", "t")},
                        "exp_avg_ptr": dtype, "exp_avg_sq_ptr": dtype,
                        "scalars_ptr": _launch.compute_dtype(dtype)}
            # Whole rows read the gradient, the parameter and both moments, and write all
            # but the gradient with 128-bit accesses; a ragged tile masks its columns per
            # row, so it promises nothing (loads=stores=0: compiled, not counted).
            out.append(Variant(f"sparse_adam-{label}-{str(dtype)[6:]}", sparse_adam_kernel, pointers,
                               dict(ROWS=rows, WIDTH=width, FULL=full, NUM_SCALARS=len(COLUMNS), MAXIMIZE=False),
                               loads=4 if full else 0, stores=3 if full else 0, dtype=dtype,
                               scalars={"n_items": "i32"}, elements=rows * width))
    return out


VARIANTS = _variants()


# ------------------------------------------------------------------------- reference

def sparse_adam_reference(bucket: _flat.Bucket, grads: list[SparseGrad], state: dict[str, torch.Tensor],
                          table: torch.Tensor, o: SparseAdamOptions) -> None:
    """The same update in plain torch ops, row-indexed, on views of the same flat buffers.

    Arithmetic happens in the parameter's dtype, op by op, as in torch; only the step size
    multiply reads the scalar table, in the compute dtype, as torch's scalar multiply does.
    """
    one_minus_beta1, one_minus_beta2 = 1 - o.beta1, 1 - o.beta2
    for sg in grads:
        if sg.empty:
            continue
        i, p = sg.index, sg.param
        g = -sg.values if o.maximize else sg.values
        if sg.indices.shape[0] == 0:  # no sparse dimension: one entry, the whole tensor
            where, g = (), g[0]
        else:
            where = tuple(sg.indices)
        exp_avg, exp_avg_sq = bucket.view("exp_avg", i), bucket.view("exp_avg_sq", i)
        m0, v0 = exp_avg[where], exp_avg_sq[where]
        um = (g - m0).mul_(one_minus_beta1)
        uv = (g.pow(2) - v0).mul_(one_minus_beta2)
        m, v = m0 + um, v0 + uv
        exp_avg[where] = m
        exp_avg_sq[where] = v
        ratio = m / v.sqrt().add_(o.eps)
        update = (ratio.to(table.dtype) * table[i, 0].to(ratio.device)).to(p.dtype)
        p[where] = p[where] + update
