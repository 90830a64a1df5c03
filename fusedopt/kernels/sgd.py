"""SGD: the Triton kernel, its launcher, and the plain-torch reference.

The update, per element (torch's order of operations)::

    g = -grad if maximize else grad
    g = g + weight_decay * p
    momentum_buffer = g                                    # the tensor's first momentum step
    momentum_buffer = momentum * momentum_buffer + (1 - dampening) * g   # later steps
    g = g + momentum * momentum_buffer if nesterov else momentum_buffer
    p = p - lr * g

Without momentum there is no state and the update is the first and last lines.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _flat
from . import _launch
from ._launch import APPLY_GRAD_OPS, STORE_UNSCALED, load_grad_l2, locate, skipped, store_as
from .averaging import average_into, average_stored
from ._triton import tl, triton


@dataclass(frozen=True)
class SGDOptions:
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool


COLUMNS = ("first", "lr", "momentum", "one_minus_dampening", "weight_decay")


def scalars(first: torch.Tensor | float, o: SGDOptions) -> list[torch.Tensor | float]:
    """`first` is 1.0 for tensors whose momentum buffer starts this step (a copy of g): a
    per-tensor vector, or one float for all."""
    first = first.to(torch.float64) if isinstance(first, torch.Tensor) else float(first)
    return [first, o.lr, o.momentum, 1 - o.dampening, o.weight_decay]


# ------------------------------------------------------------------------- Triton kernel

@triton.jit
def _sgd_update(p_ptr, g_ptr, buf_ptr, offs, mask, s_ptr, grad_ops_ptr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                WEIGHT_DECAY: tl.constexpr, GRAD_OPS: tl.constexpr):
    first = tl.load(s_ptr + 0)
    lr = tl.load(s_ptr + 1)
    momentum = tl.load(s_ptr + 2)
    one_minus_dampening = tl.load(s_ptr + 3)
    weight_decay = tl.load(s_ptr + 4)
    cdt = lr.dtype

    p = tl.load(p_ptr + offs, mask=mask).to(cdt)
    g = load_grad_l2(g_ptr, offs, mask, grad_ops_ptr, p, weight_decay, cdt, MAXIMIZE, WEIGHT_DECAY, GRAD_OPS)
    if MOMENTUM:
        if first != 0:
            buf = g
        else:
            buf = tl.load(buf_ptr + offs, mask=mask).to(cdt) * momentum + one_minus_dampening * g
        store_as(buf_ptr, offs, buf, mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p + (-lr) * g
    return store_as(p_ptr, offs, p, mask)  # the value stored, for a fused average


@triton.jit
def sgd_kernel(anchor_ptr, table_ptr, segments_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
               momentum_buffer_ptr, scalars_ptr, grad_ops_ptr, avg_ptr, avg_segments_ptr, avg_scalars_ptr,
               BLOCK: tl.constexpr, ALIGN: tl.constexpr, NUM_SCALARS: tl.constexpr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               WEIGHT_DECAY: tl.constexpr, GRAD_OPS: tl.constexpr, AVERAGE: tl.constexpr):
    t, start, numel, seg, p_ptr, g_ptr = locate(anchor_ptr, table_ptr, segments_ptr, numels_ptr,
                                                block_tensor_ptr, block_start_ptr, BLOCK, ALIGN)
    offs = start + tl.arange(0, BLOCK)
    s_ptr = scalars_ptr + t * NUM_SCALARS
    buf_ptr = momentum_buffer_ptr + seg
    if skipped(grad_ops_ptr, GRAD_OPS):
        average_stored(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, p_ptr, offs, offs < numel, AVERAGE)
        return
    if start + BLOCK <= numel:  # whole blocks unmasked, for 128-bit accesses (see adam.py)
        p = _sgd_update(p_ptr, g_ptr, buf_ptr, offs, None, s_ptr, grad_ops_ptr, MOMENTUM, NESTEROV, MAXIMIZE,
                        WEIGHT_DECAY, GRAD_OPS)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, None, p, AVERAGE)
    else:
        mask = offs < numel
        p = _sgd_update(p_ptr, g_ptr, buf_ptr, offs, mask, s_ptr, grad_ops_ptr, MOMENTUM, NESTEROV,
                        MAXIMIZE, WEIGHT_DECAY, GRAD_OPS)
        average_into(avg_ptr, avg_segments_ptr, avg_scalars_ptr, t, offs, mask, p, AVERAGE)


def sgd_triton(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
               table: torch.Tensor, o: SGDOptions) -> None:
    """Launch one SGD kernel over every stepped tensor of the bucket."""
    # Without momentum the kernel never touches the buffer argument; the anchor stands in.
    momentum_buffer = state["momentum_buffer"] if o.momentum != 0 else bucket.anchor()
    _launch.launch(sgd_kernel, "sgd", bucket, batch, [momentum_buffer], table,
                   MOMENTUM=o.momentum != 0, NESTEROV=o.nesterov, MAXIMIZE=o.maximize,
                   WEIGHT_DECAY=o.weight_decay != 0, grad_ops=batch.grad_ops)


# ------------------------------------------------------------------------- reference

def sgd_reference(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, torch.Tensor],
                  table: torch.Tensor, o: SGDOptions) -> None:
    """The same update in plain torch ops over the same flat buffers."""
    if batch.skipped():
        return
    cdt = table.dtype
    s, stepped, p, g = _flat.reference_inputs(bucket, batch, table, COLUMNS)

    if o.maximize:
        g = -g
    if o.weight_decay != 0:
        g = g.add(p, alpha=o.weight_decay)  # torch's own op: an fma, as the kernel's
    if o.momentum != 0:
        buf = state["momentum_buffer"].to(cdt)
        buf = torch.where(s["first"] != 0, g, buf * s["momentum"] + s["one_minus_dampening"] * g)
        _flat.commit(state["momentum_buffer"], buf, stepped)
        g = g + s["momentum"] * buf if o.nesterov else buf
    p = p + (-s["lr"]) * g
    bucket.scatter(p, batch.params, batch.index)


# ------------------------------------------------------------------------- native CPU

def sgd_native(params, grads, momentum_buffers, first: list[bool], o: SGDOptions,
               grad_ops: torch.Tensor | None = None) -> None:
    """torch's own fused CPU kernel on fusedopt's flat-state views (the 'auto' CPU path).

    torch's op takes one `is_first_step` for all tensors; tensors whose momentum buffer
    starts now and those continuing one go in two calls.
    """
    bufs = momentum_buffers if o.momentum != 0 else []
    amp = _launch.native_amp_args(grad_ops) if grad_ops is not None else {}
    for is_first in (True, False):
        count = first.count(is_first)
        if not count:
            continue
        ps, gs, bs = params, grads, bufs  # one call when all agree: every step but the first
        if count != len(first):
            pick = [i for i, f in enumerate(first) if f == is_first]
            ps, gs, bs = [params[i] for i in pick], [grads[i] for i in pick], [bufs[i] for i in pick] if bufs else []
        torch._fused_sgd_(ps, gs, bs,
                          weight_decay=o.weight_decay, momentum=o.momentum, lr=o.lr,
                          dampening=o.dampening, nesterov=o.nesterov, maximize=o.maximize,
                          is_first_step=is_first, **amp)


def sgd_multi_tensor(params, grads, momentum_buffers, first: list[bool] | None, o: SGDOptions) -> None:
    """torch's multi-tensor SGD (its foreach ops, in its order, so its numbers) on one
    bucket's tensors: the CPU path for bf16/fp16, where torch's fused CPU SGD is wrong.
    `first` flags the tensors whose momentum buffer starts now (None: none does).

    torch's own entry point first regroups its lists by device and dtype, 0.3 us a tensor
    (a fifth of 2000 tiny tensors' step); a bucket is one device and dtype already. Unlike
    torch's, it never writes the gradients (torch's Nesterov adds into them in place).
    """
    lr = o.lr.item() if isinstance(o.lr, torch.Tensor) else o.lr
    owned = False  # whether `grads` are temporaries of this step, free to overwrite
    if o.maximize:
        grads, owned = torch._foreach_neg(grads), True
    if o.weight_decay != 0:
        if owned:
            torch._foreach_add_(grads, params, alpha=o.weight_decay)
        else:
            grads, owned = torch._foreach_add(grads, params, alpha=o.weight_decay), True
    if o.momentum != 0:
        if first is not None and any(first):
            # A buffer starts as a copy of the (decayed) gradient; torch then moves the
            # others one tensor at a time, which rounds differently in bf16 than its foreach ops.
            for buf, g, starts in zip(momentum_buffers, grads, first):
                if starts:
                    buf.copy_(g)
                else:
                    buf.mul_(o.momentum).add_(g, alpha=1 - o.dampening)
        else:
            torch._foreach_mul_(momentum_buffers, o.momentum)
            torch._foreach_add_(momentum_buffers, grads, alpha=1 - o.dampening)
        if not o.nesterov:
            grads = momentum_buffers
        elif owned:
            torch._foreach_add_(grads, momentum_buffers, alpha=o.momentum)
        else:
            grads = torch._foreach_add(grads, momentum_buffers, alpha=o.momentum)
    torch._foreach_add_(params, grads, alpha=-lr)


# ------------------------------------------------------------------------- AOT variants

def _variants():
    from ._aot import Variant, average_pointers, layout_pointers
    from .averaging import DIVIDE, LERP

    out = []
    flag_sets = {"plain": {}, "momentum": dict(MOMENTUM=True), "amp-momentum": dict(MOMENTUM=True, GRAD_OPS=STORE_UNSCALED),
                 "clip-momentum": dict(MOMENTUM=True, GRAD_OPS=APPLY_GRAD_OPS),
                 "nesterov-wd-maximize": dict(MOMENTUM=True, NESTEROV=True, WEIGHT_DECAY=True, MAXIMIZE=True),
                 # an attached averaged model: one more stream read and written
                 "momentum-ema": dict(MOMENTUM=True, AVERAGE=1 + LERP), "swa": dict(AVERAGE=1 + DIVIDE)}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for label, flags in flag_sets.items():
            constexprs = dict(NUM_SCALARS=len(COLUMNS), GRAD_OPS=0, MOMENTUM=False, NESTEROV=False, MAXIMIZE=False,
                              WEIGHT_DECAY=False, AVERAGE=0)
            constexprs.update(flags)
            pointers = layout_pointers(dtype)
            pointers.update(momentum_buffer_ptr=dtype, scalars_ptr=_launch.compute_dtype(dtype), grad_ops_ptr=torch.float32,
                            **average_pointers(dtype))
            momentum, average = constexprs["MOMENTUM"], constexprs["AVERAGE"] != 0
            grad = constexprs["GRAD_OPS"] == STORE_UNSCALED   # GradScaler: the gradient is stored back
            # The momentum buffer is not read on a tensor's first step, so only the
            # continuing branch streams it: count the loads of that branch.
            out.append(Variant(f"sgd-{label}-{str(dtype)[6:]}", sgd_kernel, pointers, constexprs,
                               loads=2 + momentum + average, stores=1 + momentum + average + grad, dtype=dtype))
    return out


VARIANTS = _variants()
