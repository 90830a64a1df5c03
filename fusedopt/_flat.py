"""Flat state buffers: the only module that knows offsets.

A parameter group's tensors are split into buckets, one per (device, dtype). A bucket owns
one contiguous buffer per state kind (``exp_avg``, ``exp_avg_sq``, ...), laid out as
segments, one per parameter, each starting on a multiple of ``SEGMENT_ALIGN`` elements so
that every segment of a 16-byte aligned buffer is itself 16-byte aligned (128-bit loads).
Each parameter's state is a *view* of its segment with the parameter's own shape and
strides, which is what ``opt.state[p]`` shows, so torch's per-parameter picture and the
kernel's flat picture are the same memory.

Everything that depends only on the layout (segment offsets, element counts, the table
that maps kernel blocks to tensors) is computed here once, when the bucket is built. What
changes every step (which parameters have a gradient, where the gradients live) is
gathered by :meth:`Bucket.collect` into a :class:`Batch`.

Parameters and gradients are not copied into flat buffers: the kernel reaches them through
a table of element offsets relative to an anchor pointer of the bucket's dtype (see
``fusedopt/kernels/_launch.py``). Complex parameters are handled as torch does, through
their real view, so a complex64 bucket is a float32 bucket of twice the elements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# 16 elements is 16 bytes or more for every dtype we run, so segment starts keep the
# 16-byte alignment the compiler needs for vectorised (128-bit) loads and stores.
SEGMENT_ALIGN = 16


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64,
            torch.complex32: torch.float16}.get(dtype, dtype)


def state_strides(p: Tensor) -> tuple[int, ...]:
    """Strides torch gives ``zeros_like(p, memory_format=preserve_format)``: p's own
    strides when p is dense (channels_last included), contiguous ones otherwise."""
    return torch.empty_like(p, device="meta").stride()


def is_dense(t: Tensor) -> bool:
    """True when t's elements fill one contiguous range of memory (any permutation)."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's elements in memory order (real view for complex)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.as_strided((t.numel(),), (1,))


@dataclass
class Batch:
    """What one step of one bucket works on: the parameters that have a gradient.

    ``params`` and ``grads`` are real, dense tensors in the layout of the state segments;
    where the user's tensor is not (a non-dense parameter, a gradient whose strides differ
    from the parameter's), a staging copy stands in and ``writeback`` lists the copies to
    return after the update.
    """

    index: list[int]                # bucket-local positions of the parameters stepped
    params: list[Tensor]
    grads: list[Tensor]
    everyone: bool                  # every parameter of the bucket has a gradient
    writeback: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _index_tensor: Tensor | None = None

    def index_tensor(self) -> Tensor:
        if self._index_tensor is None:
            self._index_tensor = torch.tensor(self.index, dtype=torch.long)
        return self._index_tensor

    def finish(self) -> None:
        """Copy staged parameters back into the user's tensors."""
        for staged, target in self.writeback:
            target.copy_(staged)


class Bucket:
    """The parameters of one group that share a device and a dtype, and their flat state."""

    def __init__(self, params: list[Tensor], positions: list[int], *, scalar_device=None):
        p0 = params[0]
        self.device = p0.device
        self.dtype = p0.dtype
        self.real_dtype = real_dtype(p0.dtype)
        self.is_complex = p0.is_complex()
        self.params = params
        self.positions = positions          # index of each parameter in group["params"]
        self.shapes = [p.shape for p in params]
        self.strides = [state_strides(p) for p in params]
        self.contiguous = [p.is_contiguous() for p in params]
        # Element counts of the real view: what the kernel iterates over.
        self.numels = [p.numel() * (2 if self.is_complex else 1) for p in params]
        offsets, total = [], 0
        for n in self.numels:
            offsets.append(total)
            total += -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN
        self.offsets = offsets
        self.size = total
        self.buffers: dict[str, Tensor] = {}
        # Per-parameter scalar state (`step`, NAdam's `mu_product`, ASGD's `eta`, `mu`):
        # torch keeps each as a float32 0-dim tensor per parameter, `step` on the CPU unless
        # capturable or fused. Here each kind is one float32 vector per bucket, and
        # state[p][key] a 0-dim view of it.
        self.scalar_device = torch.device("cpu") if scalar_device is None else scalar_device
        self.scalars: dict[str, Tensor] = {}
        self.initialized = [False] * len(params)
        self._device_tables: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._ptrs = [p.data_ptr() for p in params]
        self._anchor: Tensor | None = None

    def __len__(self) -> int:
        return len(self.params)

    # ---------------------------------------------------------------- state buffers

    def buffer(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """The flat buffer of one state kind, allocated (zeroed) on first use."""
        buf = self.buffers.get(name)
        if buf is None:
            buf = torch.zeros(self.size, dtype=dtype or self.real_dtype, device=self.device)
            self.buffers[name] = buf
        return buf

    def view(self, name: str, i: int) -> Tensor:
        """Parameter i's state of kind `name`: a view with the parameter's shape and strides."""
        buf = self.buffers[name]
        seg = buf[self.offsets[i]:self.offsets[i] + self.numels[i]]
        if self.is_complex:
            seg = torch.view_as_complex(seg.view(-1, 2))
        return seg.as_strided(self.shapes[i], self.strides[i])

    def scalar(self, name: str) -> Tensor:
        """The float32 vector of one per-parameter scalar kind, allocated on first use."""
        vec = self.scalars.get(name)
        if vec is None:
            vec = torch.zeros(len(self.params), dtype=torch.float32, device=self.scalar_device)
            self.scalars[name] = vec
        return vec

    @property
    def steps(self) -> Tensor:
        return self.scalar("step")

    def segment(self, name: str, i: int) -> Tensor:
        """Parameter i's segment of a flat buffer, 1-D, in memory order."""
        return self.buffers[name][self.offsets[i]:self.offsets[i] + self.numels[i]]

    # ---------------------------------------------------------------- per step

    def check_params(self) -> None:
        """Detect parameters whose ``.data`` was replaced since the bucket was built.

        A replacement with the same shape, dtype and device is harmless (the kernel reads
        the new address every step); anything else would silently desynchronise the flat
        state, so it raises. The optimizer rebuilds its buckets instead where it can.
        """
        ptrs = [p.data_ptr() for p in self.params]
        if ptrs == self._ptrs:
            return
        for i, (p, old, new) in enumerate(zip(self.params, self._ptrs, ptrs)):
            if old != new and (p.shape != self.shapes[i] or p.dtype != self.dtype or p.device != self.device):
                raise StaleLayout(i)
        self._ptrs = ptrs
        self.contiguous = [p.is_contiguous() for p in self.params]

    def collect(self, error_on_sparse: str | None = None) -> Batch | None:
        """Gather the parameters that have a gradient this step, in kernel-ready form."""
        index, params, grads, writeback = [], [], [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if g.layout is not torch.strided:
                raise RuntimeError(error_on_sparse or f"{type(self).__name__} does not support sparse gradients")
            if not (self.contiguous[i] and g.is_contiguous()):
                p, g = self._conform(i, p, g, writeback)
            if self.is_complex:
                p, g = torch.view_as_real(p), torch.view_as_real(g)
            index.append(i)
            params.append(p)
            grads.append(g)
        if not index:
            return None
        return Batch(index, params, grads, len(index) == len(self.params), writeback)

    def _conform(self, i: int, p: Tensor, g: Tensor, writeback: list) -> tuple[Tensor, Tensor]:
        """Make p and g dense with the state's strides, staging copies where needed."""
        stride = self.strides[i]
        if not (is_dense(p) and p.stride() == stride):
            staged = torch.empty_strided(p.shape, stride, dtype=p.dtype, device=p.device)
            staged.copy_(p)
            writeback.append((staged, p))
            p = staged
        if not (is_dense(g) and g.stride() == stride):
            g = torch.empty_strided(g.shape, stride, dtype=g.dtype, device=g.device).copy_(g)
        return p, g

    # ---------------------------------------------------------------- kernel tables

    def anchor(self) -> Tensor:
        """A small tensor of the bucket's real dtype: the base pointer of the offset table."""
        if self._anchor is None:
            self._anchor = torch.empty(SEGMENT_ALIGN, dtype=self.real_dtype, device=self.device)
        return self._anchor

    def layout_tables(self, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(segment offsets, element counts, block->tensor, block->start) on the device.

        Built once per block size: a kernel program handles ``block`` elements of one
        tensor, so tensor i owns ceil(numel_i / block) programs.
        """
        tables = self._device_tables.get(block)
        if tables is None:
            numels = torch.tensor(self.numels, dtype=torch.int64)
            counts = (numels + block - 1) // block
            block_tensor = torch.repeat_interleave(torch.arange(len(self.numels)), counts)
            first = torch.cumsum(counts, 0) - counts
            block_start = (torch.arange(int(counts.sum())) - first[block_tensor]) * block
            tables = tuple(t.to(self.device) for t in (
                torch.tensor(self.offsets, dtype=torch.int64), numels,
                block_tensor.to(torch.int32), block_start.to(torch.int64)))
            self._device_tables[block] = tables
        return tables

    # ---------------------------------------------------------------- reference helpers

    def gather(self, tensors: list[Tensor], index: list[int], dtype: torch.dtype) -> Tensor:
        """Copy dense tensors into a new flat buffer laid out like the state buffers."""
        flat = torch.zeros(self.size, dtype=dtype, device=self.device)
        for i, t in zip(index, tensors):
            flat[self.offsets[i]:self.offsets[i] + self.numels[i]].copy_(memory_order(t))
        return flat

    def scatter(self, flat: Tensor, tensors: list[Tensor], index: list[int]) -> None:
        """Write the segments of a flat buffer back into dense tensors."""
        for i, t in zip(index, tensors):
            memory_order(t).copy_(flat[self.offsets[i]:self.offsets[i] + self.numels[i]])

    def expand(self, values: Tensor) -> Tensor:
        """Per-tensor values -> per-element values over the flat layout (padding included)."""
        padded = torch.tensor([b - a for a, b in zip(self.offsets, self.offsets[1:] + [self.size])])
        return torch.repeat_interleave(values, padded).to(self.device)

    def stepped_elements(self, batch: Batch) -> Tensor:
        """A bool mask over the flat layout: True on the segments of the stepped tensors."""
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[batch.index_tensor()] = True
        return self.expand(mask)


def commit(buffer: Tensor, value: Tensor, stepped: Tensor) -> None:
    """Write `value` into the stepped tensors' segments of a flat buffer, nowhere else."""
    buffer.copy_(torch.where(stepped, value.to(buffer.dtype), buffer))


class StaleLayout(Exception):
    """A parameter's shape, dtype or device changed under the optimizer."""

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


def split_group(params: list[Tensor]) -> list[tuple[list[Tensor], list[int]]]:
    """Split a group's parameters into (device, dtype) buckets, in order of appearance."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for pos, p in enumerate(params):
        members, positions = buckets.setdefault((p.device, p.dtype), ([], []))
        members.append(p)
        positions.append(pos)
    return list(buckets.values())
