"""What every launcher shares: the block policy, the per-step pointer table, the grid,
and the launch counter.

A kernel program handles BLOCK elements of one tensor. The grid is the bucket's block
table (built once in `_flat.Bucket.layout_tables`), filtered to the tensors that have a
gradient this step. Parameters and gradients are reached through element offsets from an
anchor pointer of the bucket's dtype: the compiler then knows their element type, and when
every address is 16-byte aligned the ALIGN hint lets it emit 128-bit loads and stores.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import operator
import os
import struct

import torch

from .. import _flat
from ._triton import AVAILABLE, tl, triton

# -- block policy: the one place that decides block size and warps ---------------------
# Each thread moves two 128-bit vectors of every stream per program: enough bytes in
# flight to saturate HBM for a streaming kernel, and never less than one 128-bit access
# (a 1024-element bf16 block on a 64-lane AMD wavefront would give each lane 8 bytes).
# With 4 warps that is 1024 fp32 elements per program on NVIDIA; a tiny tensor wastes at
# most one short program.
NUM_WARPS = 4
VECTORS_PER_THREAD = 2


def block_size(dtype: torch.dtype, warp_size: int = 32) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return NUM_WARPS * warp_size * VECTORS_PER_THREAD * 16 // itemsize


def warp_size(device: torch.device) -> int:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "warp_size", 32)
    return 32


def block_config(bucket: _flat.Bucket) -> tuple[int, int]:
    """(BLOCK, num_warps) for a bucket's kernels."""
    return block_size(bucket.real_dtype, warp_size(bucket.device)), NUM_WARPS


BLOCK = block_size(torch.float32)  # fp32 on NVIDIA: the size the tests straddle


# -- launch counter ---------------------------------------------------------------------
LAUNCHES: collections.Counter[str] = collections.Counter()


@contextlib.contextmanager
def count_launches():
    """Count kernel launches inside the block: `with count_launches() as c: ...; c.total()`."""
    before = LAUNCHES.copy()
    delta: collections.Counter[str] = collections.Counter()
    try:
        yield delta
    finally:
        delta.update(LAUNCHES - before)


def record_launch(name: str) -> None:
    LAUNCHES[name] += 1


# -- environment ------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_runnable(device: torch.device) -> None:
    """Raise unless a Triton kernel can run on tensors of `device`."""
    if not AVAILABLE:
        raise RuntimeError(
            "fusedopt: backend='triton' needs the `triton` package; install it or use backend='reference'"
        )
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "fusedopt: backend='triton' on CPU tensors runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported, or use backend='auto' or 'reference'"
        )


# -- per-step tables ----------------------------------------------------------------------
def device_guard(device: torch.device):
    """Make `device` current for a launch: Triton launches on the current CUDA device and
    its stream, and a bucket on cuda:1 must not be launched on cuda:0."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def pointer_table(bucket: _flat.Bucket, batch: _flat.Batch) -> tuple[torch.Tensor, int]:
    """Element offsets of each stepped tensor's param and grad from the bucket's anchor.

    Returns the [len(bucket), 2] int64 table on the device and the alignment (in elements)
    that every address shares: 16 bytes' worth when all are 16-byte aligned, else 1.

    The table is kept on the bucket while the addresses stay the same (CUDA's caching
    allocator usually hands a new step's gradients the old addresses): then a step copies
    nothing to the device, which is also what lets a captured CUDA graph replay it.
    """
    anchor = bucket.anchor()
    base, size = anchor.data_ptr(), anchor.element_size()
    # The kernels read a gradient as its parameter's element type, at offsets counted in
    # it. Checked every step, not only when addresses change: a gradient of another dtype
    # can take the address of the last step's.
    batch.match_grad_dtypes(anchor.dtype)
    # Read through C-level maps, and the params' not at all where the batch knows them: on
    # 2000 tiny tensors this is most of a step's host time (a GPU step is its host time).
    params = batch.addresses if batch.addresses is not None else list(map(torch.Tensor.data_ptr, batch.params))
    grads = list(map(torch.Tensor.data_ptr, batch.grads))
    key = (base, params, grads, None if batch.everyone else batch.index)
    cached = bucket.__dict__.get("_pointer_table")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    bits = functools.reduce(operator.or_, params, 0) | functools.reduce(operator.or_, grads, 0)
    if bits % size:
        _refuse_misaligned(batch, params, grads, size)
    aligned = bits & 15 == 0
    offsets = (torch.tensor([params, grads], dtype=torch.int64).t() - base).div_(size, rounding_mode="floor")
    offsets = offsets.contiguous()
    if not batch.everyone:
        full = torch.zeros(len(bucket), 2, dtype=torch.int64)
        full[batch.index_tensor()] = offsets
        offsets = full
    align = 16 // size if aligned else 1
    offsets = on_device(offsets, bucket.device)
    bucket._pointer_table = (key, offsets, align)
    return offsets, align


def _refuse_misaligned(batch: _flat.Batch, params: list[int], grads: list[int], size: int) -> None:
    """The kernels address a tensor in elements from the anchor: one whose address is not
    a multiple of its element size (made with `torch.frombuffer(..., offset=1)`, say;
    torch's allocators never make one) would be read and written a fraction of an element
    off, outside its own memory. Triton's interpreter runs such an access without a fault,
    and a GPU might too: refused instead."""
    for what, addresses, tensors in (("parameter", params, batch.params), ("gradient", grads, batch.grads)):
        for address, t in zip(addresses, tensors):
            refuse_misaligned(what, t, address, size)


def refuse_misaligned(what: str, t: torch.Tensor, address: int, size: int) -> None:
    """Raise for a tensor at an address that is not a multiple of the element size."""
    if address % size:
        raise RuntimeError(
            f"fusedopt: a {what} of shape {tuple(t.shape)} and dtype {t.dtype} lies at address {address:#x}, "
            f"not a multiple of its element size ({size} bytes), which the Triton kernels cannot "
            "address. help: clone() it, or use backend='reference'")


def grid_tables(bucket: _flat.Bucket, batch: _flat.Batch, block: int):
    """(segments, numels, block->tensor, block->start) restricted to the stepped tensors."""
    segments, numels, block_tensor, block_start = bucket.layout_tables(block)
    if not batch.everyone:
        # kept while the same tensors step, like the pointer table
        cached = bucket.__dict__.get("_partial_grid")
        if cached is not None and cached[0] == (block, batch.index):
            return segments, numels, *cached[1]
        stepped = torch.zeros(len(bucket), dtype=torch.bool)
        stepped[batch.index_tensor()] = True
        keep = stepped.to(block_tensor.device)[block_tensor.long()]
        block_tensor, block_start = block_tensor[keep], block_start[keep]
        bucket._partial_grid = ((block, list(batch.index)), (block_tensor, block_start))
    return segments, numels, block_tensor, block_start


def launch(kernel, name: str, bucket: _flat.Bucket, batch: _flat.Batch, buffers: list[torch.Tensor],
           table: torch.Tensor, grad_ops: torch.Tensor | None = None, **flags) -> None:
    """Launch a flat-state kernel once over every stepped tensor of the bucket.

    Every such kernel takes the layout arguments first (see `locate`), then its state
    buffers, then the per-tensor scalar table, then BLOCK, ALIGN, NUM_SCALARS and its own
    constexpr flags. Kernels with a gradient prologue (see `load_grad`) also take the
    `grad_ops` tensor after the table and the GRAD_OPS flag; kernels that can average their
    new parameters into an attached averaged model (`averaging.average_into`) then take
    `batch.average`'s buffer, segments and scalars, and the AVERAGE flag.
    """
    block, num_warps = block_config(bucket)
    offsets, align = pointer_table(bucket, batch)
    segments, numels, block_tensor, block_start = grid_tables(bucket, batch, block)
    extra = ()
    if "GRAD_OPS" in kernel.arg_names:
        extra = (table if grad_ops is None else grad_ops,)  # never read without GRAD_OPS
        flags["GRAD_OPS"] = 0 if grad_ops is None else STORE_UNSCALED if batch.unscale else APPLY_GRAD_OPS
        if batch.unscale:
            batch.unscaled = batch.grads   # (the kernel's: `pointer_table` matched their dtypes)
    elif grad_ops is not None:
        raise RuntimeError(f"fusedopt: the {name} kernel cannot unscale or clip gradients itself")
    average = batch.average
    if "AVERAGE" in kernel.arg_names:
        if average is None:
            extra += (table, offsets, table)  # never read without AVERAGE
            flags["AVERAGE"] = 0
        else:
            extra += (average.buffer, average.segments, average.scalars)
            flags["AVERAGE"] = average.flag   # (fp fusion as without it: `_average_value` rounds as torch)
    elif average is not None:
        raise RuntimeError(f"fusedopt: the {name} kernel cannot update an averaged model")
    with device_guard(bucket.device):
        kernel[(block_tensor.numel(),)](
            bucket.anchor(), offsets, segments, numels, block_tensor, block_start, *buffers, table, *extra,
            BLOCK=block, ALIGN=align, NUM_SCALARS=table.shape[1], **flags, num_warps=num_warps)
    record_launch(name)


def on_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t.to(device, dtype)`, asynchronous where that is safe: a copy to an accelerator is
    ordered on its stream, but one to the CPU is not. torch lands it in pinned memory
    after returning, and a CPU op that reads it first reads garbage (torch's guide to
    non_blocking says so), so a copy to the CPU waits."""
    device = torch.device(device)
    return t.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


_FP32 = struct.Struct("f")


def round_fp32(x: float) -> float:
    """A Python float rounded as an fp32 tensor would hold it: to nearest even, overflowing
    to inf (`struct` rounds as a C float cast does)."""
    return _FP32.unpack(_FP32.pack(x))[0]


def host_grad_ops(grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                  multiplier: torch.Tensor | float | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[float, float, float] | None:
    """`grad_ops_tensor`'s three values as Python floats, each rounded to `dtype` as the
    tensor holds it, where every one of them is on the CPU (reading them costs no sync);
    None where one is on another device."""
    given = (grad_scale, multiplier, found_inf)
    if not all(t is None or isinstance(t, float) or t.device.type == "cpu" for t in given):
        return None
    values = [d if t is None else t if isinstance(t, float) else t.item()
              for t, d in zip(given, (1.0, 1.0, 0.0))]
    return tuple(map(round_fp32, values)) if dtype == torch.float32 else tuple(values)


def grad_ops_tensor(device: torch.device, grad_scale: torch.Tensor | None = None,
                    found_inf: torch.Tensor | None = None, multiplier: torch.Tensor | float | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(grad_scale, multiplier, found_inf) as one tensor on `device` (fp32 unless `dtype`
    says otherwise), with no host sync: GradScaler's scale and found_inf stay where they
    are computed until the kernel reads them. A float multiplier was computed on the host."""
    if device.type == "cpu":
        # Read on the host, where that costs no sync: one op instead of five.
        host = host_grad_ops(grad_scale, found_inf, multiplier, dtype)
        if host is not None:
            return torch.tensor(host, dtype=dtype)
    if isinstance(multiplier, float):
        multiplier = torch.tensor(multiplier, dtype=dtype)
    one = torch.ones((), dtype=dtype, device=device)
    parts = [on_device(t, device, dtype).reshape(()) if t is not None else z
             for t, z in ((grad_scale, one), (multiplier, one), (found_inf, torch.zeros_like(one)))]
    return torch.stack(parts)


def native_amp_args(grad_ops: torch.Tensor | None) -> dict:
    """grad_scale/found_inf keyword arguments for torch's fused CPU ops (which cannot clip)."""
    if grad_ops is None:
        return {}
    if bool(grad_ops[1] != 1):
        raise RuntimeError("fusedopt: torch's fused CPU kernels cannot clip; this bucket needs another path")
    return {"grad_scale": grad_ops[0:1], "found_inf": grad_ops[2:3]}


def scalar_table(columns: list[torch.Tensor | float], n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A [n, K] table of per-tensor scalars in the kernel's compute dtype.

    Columns are per-tensor float64 vectors computed on the host (bias corrections, step
    sizes), group-wide floats, or 0-dim tensors (a tensor lr kept on the device under
    capturable=True), broadcast. One copy to the device per step and bucket, none when the
    per-tensor columns already live there.
    """
    if not any(isinstance(c, torch.Tensor) for c in columns):
        # one row, copied to every tensor's: four ops where a column each took one
        row = torch.tensor([[float(c) for c in columns]], dtype=torch.float64).to(dtype)
        return on_device(row.expand(n, -1).contiguous(), device)
    # Built where the per-tensor columns live: on the CPU, or on the device when the
    # scalar state is kept there (fused/capturable), so no value crosses to the host.
    home = next((c.device for c in columns if isinstance(c, torch.Tensor) and c.dim()), torch.device("cpu"))
    cols = [(on_device(c, home, torch.float64).expand(n) if isinstance(c, torch.Tensor)
             else torch.full((n,), float(c), dtype=torch.float64, device=home)) for c in columns]
    return on_device(torch.stack(cols, dim=1).to(dtype), device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in fp32 for fp32 and narrower, in fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- device helpers used inside kernels ---------------------------------------------------
@triton.jit
def locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
           BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """This program's tensor, its first element, the tensor's size, and its pointers."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid).to(tl.int64)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    numel = tl.load(numels_ptr + t)
    seg = tl.multiple_of(tl.load(segments_ptr + t), 16)
    p_off = tl.multiple_of(tl.load(table_ptr + 2 * t), ALIGN)
    g_off = tl.multiple_of(tl.load(table_ptr + 2 * t + 1), ALIGN)
    return t, start, numel, seg, anchor_ptr + p_off, anchor_ptr + g_off


@triton.jit
def skipped(grad_ops_ptr, GRAD_OPS: tl.constexpr):
    """True when GradScaler found inf/NaN gradients: the step must change nothing."""
    if GRAD_OPS:
        return tl.load(grad_ops_ptr + 2) != 0
    return False


# The values of a kernel's GRAD_OPS constexpr (its gradient prologue, `load_grad`): 0, none;
# APPLY_GRAD_OPS, divide by the scale and multiply by the clip coefficient; STORE_UNSCALED,
# also write the unscaled gradient back over the gradient, as torch's fused kernels do
# under GradScaler (a step it skips writes nothing: the kernel returns first).
APPLY_GRAD_OPS = 1
STORE_UNSCALED = 2


@triton.jit
def load_grad(g_ptr, offs, mask, grad_ops_ptr, cdt, MAXIMIZE: tl.constexpr, GRAD_OPS: tl.constexpr):
    """The gradient in the compute dtype: unscaled (divided by GradScaler's scale, as
    torch's fused kernels do), multiplied by a clip coefficient, and negated to maximize."""
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    if GRAD_OPS:
        g = ieee_div(g, tl.load(grad_ops_ptr).to(cdt))
        if GRAD_OPS == 2:   # STORE_UNSCALED: unclipped and not negated, as torch stores it
            store_as(g_ptr, offs, g, mask)
        g = g * tl.load(grad_ops_ptr + 1).to(cdt)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def load_grad_l2(g_ptr, offs, mask, grad_ops_ptr, p, weight_decay, cdt, MAXIMIZE: tl.constexpr,
                 WEIGHT_DECAY: tl.constexpr, GRAD_OPS: tl.constexpr):
    """`load_grad`, then torch's L2 weight decay (`grad + weight_decay * param`), which
    every algorithm without decoupled decay applies in this order. torch computes it as
    `grad.add(param, alpha=weight_decay)`, an fma on the CPU (vectorised) and on CUDA
    (nvcc contracts `a + alpha * b`), so this is one too: where the gradient nearly
    cancels the decay, two roundings would differ from torch's in the leading digits, and
    Adam, Adagrad and RMSprop normalise that difference into a visible step."""
    g = load_grad(g_ptr, offs, mask, grad_ops_ptr, cdt, MAXIMIZE, GRAD_OPS)
    if WEIGHT_DECAY:
        g = tl.fma(p, weight_decay, g)
    return g


@triton.jit
def ieee_sqrt(x):
    """sqrt rounded correctly, as torch's CUDA (nvcc's default -prec-sqrt) and CPU kernels
    compute it: Triton's fp32 tl.sqrt is sqrt.approx.ftz on NVIDIA GPUs."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def ieee_div(x, y):
    """x / y rounded correctly, as torch's: Triton's fp32 `/` is div.full (up to 2 ulp off)."""
    if y.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def bf16_bits(value):
    """The fp32 bit pattern of `value` rounded to bf16, nearest even, NaN kept a NaN."""
    bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return tl.where(value != value, bits | 0x400000, rounded) & 0xFFFF0000


@triton.jit
def rounded_as(ptr, value):
    """`value` rounded to the pointer's dtype as `store_as` would store it, in value's dtype
    (what a load of ptr would read after that store), without storing it."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return bf16_bits(value).to(tl.float32, bitcast=True).to(value.dtype)
    else:
        return value.to(ptr.dtype.element_ty).to(value.dtype)


@triton.jit
def store_as(ptr, offs, value, mask):
    """Store an fp32/fp64 value in the pointer's dtype, bf16 rounded to nearest even.

    Rounding is done in integer arithmetic because Triton's interpreter truncates when it
    casts fp32 to bf16; written out here, the interpreter and the GPU give the same bits.
    Returns the value stored, in value's dtype: what a later load of ptr would read.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = bf16_bits(value)
        tl.store(ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        stored = bits.to(tl.float32, bitcast=True).to(value.dtype)
    else:
        narrow = value.to(ptr.dtype.element_ty)
        tl.store(ptr + offs, narrow, mask=mask)
        stored = narrow.to(value.dtype)
    return stored


# -- stochastic rounding ------------------------------------------------------------------
# A counter-based generator: the random bits of an element are a hash of (seed, index), so
# the kernel and the reference draw the same bits without a generator state, and a step is
# reproducible from its seed. The hash is MurmurHash3's 32-bit finaliser, applied to the
# index and again to the seed mixed in: consecutive indices give independent-looking bits.
_M1, _M2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B1


@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def random_bits(seed, index):
    """32 random bits per element: `seed` a per-tensor int32, `index` the element's position."""
    return _fmix32(_fmix32(index.to(tl.uint32)) ^ (seed.to(tl.uint32, bitcast=True) * 0x9E3779B1))


@triton.jit
def store_sr(ptr, offs, value, mask, seed, index):
    """Store an fp32 value as bf16 rounded stochastically: up with probability equal to the
    fraction of an ulp it lies above the lower neighbour, so the stored value is unbiased.
    Adding 16 random bits below the bf16 mantissa and truncating does exactly that; NaN
    stays NaN, and infinities stay infinite (their low bits are zero)."""
    bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
    noise = random_bits(seed, index) & 0xFFFF
    rounded = tl.where(value != value, bits | 0x400000, bits + noise) & 0xFFFF0000
    tl.store(ptr + offs, (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    return rounded.to(tl.float32, bitcast=True)  # the value stored, as store_as returns it


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _fmix32_torch(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 13)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def random_bits_torch(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`random_bits` in torch ops (int64 tensors holding uint32 values): the reference's."""
    return _fmix32_torch(_fmix32_torch(index & 0xFFFFFFFF) ^ _mul32(seed & 0xFFFFFFFF, _GOLDEN))


def round_sr_torch(value: torch.Tensor, seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`store_sr` in torch ops: fp32 `value` to bf16, stochastically, with the same bits."""
    bits = value.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    noise = random_bits_torch(seed, index) & 0xFFFF
    rounded = torch.where(value != value, bits | 0x400000, bits + noise) & 0xFFFF0000
    return (rounded >> 16).to(torch.int32).to(torch.int16).view(torch.bfloat16)


# The same bits in int32 ops, for the native CPU path (`fusedopt/_composed.py`), which
# rounds scratch chunks in place: torch's int32 multiplication wraps as uint32's does, and
# a logical shift is an arithmetic one masked, so an int32 tensor holds the uint32 value's
# bits throughout. Half the bytes of the int64 version, no temporaries, and the
# seed-independent half of the hash from a table: over ten times faster on this CPU (1M
# elements: 4.5 ms against 62), which matters where the rounding is most of a CPU step.

def _s32(c: int) -> int:
    """The int32 with the bits of uint32 `c`."""
    return c - (1 << 32) if c >= 1 << 31 else c


# The constants as int32 0-dim tensors: a Python int operand is wrapped as int64 and
# costs an int32 op 20-30% more (64K elements in cache: 7 us against 9).
_I32 = {c: torch.tensor(_s32(c), dtype=torch.int32) for c in (16, 13, 0xFFFF, 0x7FFFF, _M1, _M2, _GOLDEN)}


def _fmix32_int32_(x: torch.Tensor, tmp: torch.Tensor, last: bool = True) -> None:
    """`_fmix32` in place on an int32 tensor; `tmp` is scratch of its size. Without
    `last`, the final `x ^= x >> 16` is left to the caller."""
    for shift, mask, mul in ((16, 0xFFFF, _M1), (13, 0x7FFFF, _M2)):
        torch.bitwise_right_shift(x, _I32[shift], out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_(_I32[mask]))
        x.mul_(_I32[mul])
    if last:
        torch.bitwise_right_shift(x, _I32[16], out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_(_I32[0xFFFF]))


_MIXED: list[torch.Tensor] = []


def mixed_positions(n: int) -> torch.Tensor:
    """`_fmix32(position)` for positions 0..n-1, as int32 on the CPU: the half of
    `random_bits` that no seed changes. Every bucket counts positions from 0, so one
    table, as long as the largest bucket that asks, serves all (4 bytes an element of it).
    """
    if not _MIXED or _MIXED[0].numel() < n:
        x = torch.arange(n, dtype=torch.int32)
        _fmix32_int32_(x, torch.empty_like(x))
        _MIXED[:] = [x]
    return _MIXED[0][:n]


def seed_mix(seeds: torch.Tensor) -> torch.Tensor:
    """What `random_bits` xors into the mixed position: seed * golden ratio (mod 2**32),
    int32, per tensor."""
    return seeds.to(torch.int32).mul(_s32(_GOLDEN))


def seed_key(base: int, salt: int, n: int) -> torch.Tensor:
    """The step-independent half of `step_seeds` for n tensors, int32 on the CPU: a caller
    that keeps it pays only `step_seed_mix` per step."""
    return (_fmix32_torch(_fmix32_torch(torch.full((n,), (base * 0x27D4EB2F + salt) & 0xFFFFFFFF, dtype=torch.int64))
                          ^ torch.arange(n)) & 0xFFFFFFFF).to(torch.int32)


def step_seed_mix(key: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """`seed_mix(step_seeds(...))` from `seed_key`'s key: the same bits, in int32 ops."""
    x = steps.to(torch.int32).bitwise_xor_(key)
    _fmix32_int32_(x, torch.empty_like(x))
    return x.mul_(_s32(_GOLDEN))


def round_sr_int32(value: torch.Tensor, mixed: torch.Tensor, mix, out: torch.Tensor, x: torch.Tensor,
                   tmp: torch.Tensor) -> None:
    """`round_sr_torch` of the fp32 `value` into the bf16 `out` (all 1-D, one size), from
    `mixed` (`mixed_positions` of the elements' positions) and `mix` (`seed_mix` of their
    seeds: an int32 tensor, 0-dim or per element); `x` and `tmp` are int32 scratch."""
    torch.bitwise_xor(mixed, mix, out=x)
    _fmix32_int32_(x, tmp, last=False)
    # noise: the low 16 bits of the hash's last x ^ (x >>> 16), for which an arithmetic
    # shift does as well
    torch.bitwise_right_shift(x, _I32[16], out=tmp)
    x.bitwise_xor_(tmp).bitwise_and_(_I32[0xFFFF])
    # Adding the noise to the value's bits wraps as the reference's mask does; the upper
    # half is the rounded bf16 (int32 -> int16 keeps the low 16 bits of the shifted sum).
    x.add_(value.view(torch.int32))
    out.view(torch.int16).copy_(x.bitwise_right_shift_(_I32[16]))
    # NaN: the reference keeps it a NaN (quiet bit set). A sum is the cheapest test for
    # any; a false alarm (an overflow to inf) only costs the exact check.
    if not math.isfinite(value.sum().item()):
        nan = value.isnan()
        if bool(nan.any()):
            bits = value.view(torch.int32)[nan]
            out.view(torch.int16)[nan] = (bits.bitwise_or(0x400000).bitwise_right_shift(16)).to(torch.int16)


def step_seeds(base: int, salt: int, steps: torch.Tensor) -> torch.Tensor:
    """Per-tensor int32 seeds for a step: a hash of the optimizer's seed, the bucket (`salt`),
    the tensor's position and its step count, on the steps' device (no host sync)."""
    steps = steps.to(torch.int64)
    position = torch.arange(steps.numel(), dtype=torch.int64, device=steps.device)
    key = _fmix32_torch(_fmix32_torch(torch.full_like(steps, (base * 0x27D4EB2F + salt) & 0xFFFFFFFF)) ^ position)
    seed = _fmix32_torch(key ^ (steps & 0xFFFFFFFF))
    return torch.where(seed >= 2 ** 31, seed - 2 ** 32, seed).to(torch.int32)
