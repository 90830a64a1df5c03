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

import operator
import sys
from dataclasses import dataclass, field
from itertools import compress, repeat

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy

# 16 elements is 16 bytes or more for every dtype we run, so segment starts keep the
# 16-byte alignment the compiler needs for vectorised (128-bit) loads and stores.
SEGMENT_ALIGN = 16

_grad = operator.attrgetter("grad")
_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
use_count = torch._C._storage_Use_Count   # (tensors holding a storage: `Bucket.storage_uses`)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64,
            torch.complex32: torch.float16}.get(dtype, dtype)


def state_strides(p: Tensor) -> tuple[int, ...]:
    """Strides torch gives ``zeros_like(p, memory_format=preserve_format)``: p's own
    strides when p is dense (channels_last included), contiguous ones otherwise."""
    return torch.empty_like(p, device="meta").stride()


def _is_contiguous_layout(shape: torch.Size, strides: tuple[int, ...]) -> bool:
    """Whether a tensor of this shape and these strides would be contiguous."""
    return torch.empty_strided(shape, strides, device="meta").is_contiguous()


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


def dtensor_class():
    """torch's DTensor class if it is in use, else None.

    A DTensor can only exist once torch.distributed.tensor is imported, so looking it up in
    sys.modules keeps `import fusedopt` from paying for that import (half a second).
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local(t: Tensor) -> Tensor:
    """The tensor the kernels work on: a DTensor's local shard, any other tensor itself.

    A DTensor's own ``data_ptr()`` is 0, and its shape is the global one, so buckets are laid
    out over, and kernels run on, local shards (which may be empty).
    """
    cls = dtensor_class()
    return t.to_local() if cls is not None and isinstance(t, cls) else t


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """`value`, to be copied into the local state of `like` (a parameter or its state).

    For a DTensor `like`, a DTensor value is redistributed to like's placements and a plain
    tensor of like's global shape is cut to this rank's shard (no communication); a
    DTensor value for a plain `like` is gathered. Anything else is returned as it is.
    """
    cls = dtensor_class()
    if cls is None:
        return value
    if isinstance(like, cls):
        if isinstance(value, cls):
            if value.device_mesh != like.device_mesh or tuple(value.placements) != tuple(like.placements):
                value = value.redistribute(like.device_mesh, like.placements)
            return value.to_local()
        if value.shape == like.shape:
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()
        return value
    return value.full_tensor() if isinstance(value, cls) else value


def memory_order(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's elements in memory order (real view for complex)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.as_strided((t.numel(),), (1,))



def add_sparse_(dense: Tensor, sparse: Tensor, alpha: float = 1.0) -> Tensor:
    """`dense.add_(sparse, alpha=alpha)`, right also for a view at a storage offset (a flat
    buffer's segment; a parameter that is a view into a larger tensor).

    torch 2.13's CPU add of a sparse tensor without dense dimensions (`g.to_sparse()` of a
    whole gradient) into such a view writes each entry at twice the view's offset: past the
    segment, and past the buffer's end for a late one (heap corruption). Its kernel for
    tensors flagged uncoalesced does too when there is one entry. So at an offset the
    entries are added by `index_put_(accumulate=True)`: alpha times each value, added to
    its element, as torch's kernels do (a coalesced gradient adds each element once, so
    the sums are the same bits)."""
    if dense.storage_offset() == 0:
        return dense.add_(sparse, alpha=alpha)
    values = sparse._values() if alpha == 1 else sparse._values() * alpha
    return dense.index_put_(tuple(sparse._indices()), values, accumulate=True)

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
    # Some gradient's dtype is not its parameter's (see `in_dtype`).
    mixed_dtypes: bool = False
    # (grad_scale, multiplier, found_inf) on the bucket's device when the optimizer unscales
    # (GradScaler with fused=True) or clips inside the kernel; see kernels/_launch.load_grad.
    grad_ops: Tensor | None = None
    # The same three values as Python floats, instead of the tensor, where the native path
    # clips on the CPU: they are known on the host, and a tensor made of them only to be
    # read back cost 50-70 us a bucket in a step that starts with a cold cache.
    # `Optimizer._step_body` makes the tensor where the native path declines the bucket.
    host_ops: tuple[float, float, float] | None = None
    # An attached averaged model's buffer and segments (kernels/averaging.FusedAverage) when
    # the update kernel also averages the new parameters (Optimizer.attach_averaged_model).
    average: object | None = None
    # The params' addresses where they are known already: the bucket's own tensors, which
    # `Bucket.check_params` read this step (the optimizer checks a bucket before collecting it).
    addresses: list[int] | None = None
    # The user's own gradients where `grads` holds stand-ins for some (staged or converted
    # copies); None: `grads` are the user's.
    user_grads: list[Tensor] | None = None
    # GradScaler (fused=True) gave a scale: the step leaves the user's gradients unscaled,
    # as torch's fused kernels do. `unscaled` lists the gradients the update itself wrote
    # unscaled; `leave_unscaled` divides the others.
    unscale: bool = False
    unscaled: list[Tensor] | None = None
    _index_tensor: Tensor | None = None

    def index_tensor(self) -> Tensor:
        if self._index_tensor is None:
            self._index_tensor = torch.tensor(self.index, dtype=torch.long)
        return self._index_tensor

    def skipped(self) -> bool:
        """GradScaler found inf/NaN: the step changes nothing (reference path; syncs)."""
        return self.grad_ops is not None and bool(self.grad_ops[2] != 0)

    def prepare_grad(self, g: Tensor) -> Tensor:
        """The reference path's version of the kernels' gradient prologue."""
        if self.grad_ops is None:
            return g
        return g / self.grad_ops[0].to(g.dtype) * self.grad_ops[1].to(g.dtype)

    def match_grad_dtypes(self, dtype: torch.dtype) -> None:
        """The batch's gradients in `dtype` (see `in_dtype`)."""
        if self.mixed_dtypes:
            if self.user_grads is None:
                self.user_grads = self.grads
            self.grads = in_dtype(self.grads, dtype)

    def leave_unscaled(self, grad_scale: Tensor, found_inf: Tensor | None) -> None:
        """Divide the user's gradients that the update did not write unscaled itself by
        GradScaler's scale (by 1 where it found inf/NaN: the step was skipped; no host
        sync), in their own dtype as torch's fused kernels store them."""
        own = self.grads if self.user_grads is None else self.user_grads
        done = self.unscaled
        if done is own:
            return
        if done:
            written = set(map(id, done))
            own = [g for g in own if id(g) not in written]
        if not own:
            return
        divisor = grad_scale.to(device=own[0].device, dtype=torch.float32)
        if found_inf is not None:
            divisor = torch.where(found_inf.to(divisor.device) != 0, torch.ones_like(divisor), divisor)
        torch._foreach_div_(own, divisor)

    def finish(self) -> None:
        """Copy staged parameters back into the user's tensors."""
        for staged, target in self.writeback:
            target.copy_(staged)


def in_dtype(grads: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Gradients of another dtype than their parameters' (torch's `param.grad_dtype`, or one
    left from before `.data` changed dtype) replaced by copies in `dtype`, as SparseAdam's
    values are: the kernels read a gradient at offsets counted in its parameter's dtype,
    and torch's fused CPU kernels refuse another (where torch's own default path, its
    for-loop, steps it). `Bucket.collect` looks every step (`Batch.mixed_dtypes`): such a
    gradient can take the address of the last step's, which the pointer table is kept by."""
    return [g if g.dtype is dtype else g.to(dtype) for g in grads]


class Bucket:
    """The parameters of one group that share a device and a dtype, and their flat state."""

    def __init__(self, params: list[Tensor], positions: list[int], *, scalar_device=None,
                 scalar_dtype: torch.dtype = torch.float32):
        # Layout, pointers and kernels use local shards; `params` stay the user's tensors
        # (the keys of opt.state), and `specs` say how to show state as DTensors like them.
        cls = dtensor_class()
        self.specs = [(p.device_mesh, p.placements, p.shape, p.stride()) if cls is not None and isinstance(p, cls)
                      else None for p in params]
        self.sharded = any(s is not None for s in self.specs)
        shards = [local(p) for p in params] if self.sharded else params
        p0 = shards[0]
        self.device = p0.device
        self.dtype = p0.dtype
        self.real_dtype = real_dtype(p0.dtype)
        self.is_complex = p0.is_complex()
        self.params = params
        self.positions = positions          # index of each parameter in group["params"]
        self.shapes = [p.shape for p in shards]
        self.strides = [state_strides(p) for p in shards]
        self.contiguous = [p.is_contiguous() for p in shards]
        # Element counts of the real view: what the kernel iterates over.
        self.numels = [p.numel() * (2 if self.is_complex else 1) for p in shards]
        self._sizes = [p.numel() for p in shards]   # (`check_params` compares them every step)
        self.empty = [i for i, n in enumerate(self._sizes) if n == 0]
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
        self.scalar_dtype = scalar_dtype
        self.scalars: dict[str, Tensor] = {}
        self.initialized = [False] * len(params)
        # Parameters whose state came from outside the step (a load, an assignment), to be
        # checked against the parameter at the next step (`Optimizer._check_loaded`):
        # index -> whether a mismatch is news to the user
        self.unchecked: dict[int, bool] = {}
        self._device_tables: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._ptrs = [p.data_ptr() for p in shards]
        self._anchor: Tensor | None = None
        # Pairs of parameters that share memory (views of one tensor): the optimizer refuses
        # a step that would update both (`Optimizer._refuse_shared_memory`).
        self.shared = shared_memory(shards, self._ptrs, self.contiguous)
        # The first collect of a new bucket (until one passes) takes the slow path, which
        # compares every gradient's shape with its parameter's: torch checks a gradient's
        # shape when it is assigned, but a parameter's shape may change after (`p.data = t`,
        # `p.set_(t)`: the bucket is rebuilt), and a gradient left from before would be read
        # past its end. (The fast path compares element counts: `collect`.)
        self.verify_grads = True
        # How many tensors held each state buffer's memory when last looked at
        # (`storage_uses`; `Optimizer._reattach_state`), or None: to be compared view by
        # view at the next step (a new bucket, a buffer made or replaced since).
        self.state_uses: list[int] | None = None
        self._watched: tuple[list, list[int]] | None = None
        # The step made views of the state (new state, a new plan): counted after it.
        self.views_made = False

    def __len__(self) -> int:
        return len(self.params)

    # ---------------------------------------------------------------- state buffers

    def buffer(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """The flat buffer of one state kind, allocated (zeroed) on first use."""
        buf = self.buffers.get(name)
        if buf is None:
            buf = torch.zeros(self.size, dtype=dtype or self.real_dtype, device=self.device)
            self.buffers[name] = buf
            self.buffers_changed()
        return buf

    def view(self, name: str, i: int) -> Tensor:
        """Parameter i's state of kind `name`: a view with the parameter's shape and strides."""
        buf = self.buffers[name]
        seg = buf[self.offsets[i]:self.offsets[i] + self.numels[i]]
        if self.is_complex:
            seg = torch.view_as_complex(seg.view(-1, 2))
        return seg.as_strided(self.shapes[i], self.strides[i])

    def state_view(self, name: str, i: int) -> Tensor:
        """What opt.state[p] shows: the view, as a DTensor with p's placements when p is one
        (torch's optimizers give `zeros_like(p)`, a DTensor); its local tensor is the view."""
        view = self.view(name, i)
        spec = self.specs[i]
        if spec is None:
            return view
        mesh, placements, shape, stride = spec
        return dtensor_class().from_local(view, mesh, placements, run_check=False, shape=shape, stride=stride)

    def scalar(self, name: str) -> Tensor:
        """The vector of one per-parameter scalar kind (float32, or torch's scalar dtype:
        float64 under a float64 default dtype), allocated on first use."""
        vec = self.scalars.get(name)
        if vec is None:
            vec = torch.zeros(len(self.params), dtype=self.scalar_dtype, device=self.scalar_device)
            self.scalars[name] = vec
            self.buffers_changed()
        return vec

    @property
    def steps(self) -> Tensor:
        return self.scalar("step")

    def storage_uses(self) -> list[int]:
        """For each flat buffer, then each scalar vector: how many tensors hold its memory
        (the buffer, the views in `opt.state` and in cached plans). A view given other
        memory through `.data` (`v.data = v.data.to(device)`, as the widely copied
        `optimizer_to` helper does) lets go of it: the count drops, where looking at every
        view's address each step would cost a C call a view."""
        watched = self._watched
        if watched is None:
            # (the storage objects are kept, one reference each to every count, so that the
            # addresses stay theirs; `buffers_changed` drops them)
            storages = [t.untyped_storage() for t in (*self.buffers.values(), *self.scalars.values())]
            watched = self._watched = (storages, [st._cdata for st in storages])
        return list(map(use_count, watched[1]))

    def buffers_changed(self) -> None:
        """A flat buffer or scalar vector was made or replaced: the counts start over, and
        the next step compares every view with its segment."""
        self._watched = None
        self.state_uses = None

    def segment(self, name: str, i: int) -> Tensor:
        """Parameter i's segment of a flat buffer, 1-D, in memory order."""
        return self.buffers[name][self.offsets[i]:self.offsets[i] + self.numels[i]]

    # ---------------------------------------------------------------- per step

    def check_params(self) -> None:
        """Detect parameters whose ``.data`` was replaced since the bucket was built.

        A replacement with the same shape, dtype and device is harmless (the kernel reads
        the new address every step, a non-contiguous one through a staging copy; a master
        copy takes up its values, as after any write); anything else would silently
        desynchronise the flat state, so it raises.
        The optimizer rebuilds its buckets instead where it can.
        """
        shards = [local(p) for p in self.params] if self.sharded else self.params
        ptrs = list(map(Tensor.data_ptr, shards))
        # The address alone does not show a view of the same memory put in through `.data`
        # (`p.data = p.data.t()`, `[:k]`, `[:, :k]`) or an in-place `p.t_()`: the kernels
        # would pair the elements in the old layout, or read past a smaller one. Contiguity
        # and size show those. Not a reshape that keeps both (`p.data = p.data.view(12)`),
        # which leaves the memory order, all the kernels see, as it was: comparing shapes
        # as well (torch.Size objects made every step) cost 7% of a plain SGD step over
        # 2000 tiny tensors, for a change that steps the same numbers.
        contiguous = list(map(Tensor.is_contiguous, shards))
        same = ptrs == self._ptrs and contiguous == self.contiguous and list(map(Tensor.numel, shards)) == self._sizes
        if same and not self.empty:
            return
        # A tensor without elements has no address (data_ptr 0): storage of another dtype,
        # device or shape put into a zero-size parameter shows in none of the above, and
        # its state would stay in the old dtype (torch's fused kernels then refuse the
        # step). Such parameters are compared directly; they are few.
        for i in self.empty if same else range(len(shards)):
            p = shards[i]
            if p.shape != self.shapes[i] or p.dtype != self.dtype or p.device != self.device:
                raise StaleLayout(i)
        if same:
            return
        # A parameter made contiguous while its state keeps another memory order (a
        # channels_last or transposed one replaced by a contiguous copy, as
        # `model.to(memory_format=torch.contiguous_format)` does, or a square one given
        # `p.data = p.data.t()`): contiguous tensors are paired element for element in memory
        # order, which is no longer the state's. The optimizer rebuilds the bucket, which lays
        # the state out again, index for index, as torch pairs it. (The other way round, a
        # parameter whose memory order is not the state's is staged in the state's: `_conform`.)
        for i, now in enumerate(contiguous):
            if now and not self.contiguous[i] and not _is_contiguous_layout(self.shapes[i], self.strides[i]):
                raise StaleLayout(i)
        self._ptrs = ptrs
        self.contiguous = contiguous
        self.shared = shared_memory(shards, ptrs, contiguous)

    def collect(self, error_on_sparse: str | None = None, grads: list[Tensor | None] | None = None,
                sparse: list[tuple[int, Tensor]] | None = None) -> Batch | None:
        """Gather the parameters that have a gradient this step, in kernel-ready form.

        `grads`, one per parameter, stand in for the parameters' `.grad` (the
        `fusedopt::step` op passes the gradients it was given). A sparse gradient raises
        `error_on_sparse`, unless a `sparse` list is given: then (position, gradient) goes
        there and the parameter stays out of the batch."""
        given = grads
        if not (self.sharded or self.is_complex or self.verify_grads) and all(self.contiguous):
            # The common case in one pass of cheap checks (thousands of tiny tensors make
            # the per-tensor cost count): every parameter has a dense gradient like itself,
            # of its dtype, and of its element count. (map over C callables: no Python frame
            # per tensor. No check of the layout: the only other a parameter's gradient can
            # have, sparse COO, is never contiguous.) torch checks a gradient's shape when
            # it is assigned, but `g.data = t`, `g.set_(...)` or `g.resize_(...)` change it
            # after: a count of its own would have the kernels read past the gradient's end
            # or pair the wrong elements. The count, not the shape: torch.Size objects made
            # every step cost 20% of a plain SGD step over 2000 tiny tensors, the count 7%.
            # A contiguous gradient reshaped to another shape of the same count is stepped in
            # memory order, as torch's fused kernels step it; the slow path below refuses it.
            grads = list(map(_grad, self.params)) if given is None else given
            try:
                if self._like_params(grads, self._sizes):
                    return Batch(list(range(len(grads))), list(self.params), grads, True, addresses=self._ptrs)
            except AttributeError:
                # Parameters without a gradient (None has no dtype): frozen layers, in
                # fine-tuning. The loop below checks the others one Python frame a tensor
                # (a step over 2000 tiny tensors, half of them frozen, took 1.6-1.9x torch's
                # fused SGD); here the same checks run as C-level passes, shapes included,
                # as that loop compares them (a gradient given another shape of the same
                # count is refused when a parameter is frozen: test_semantics).
                has = list(map(operator.is_not, grads, repeat(None)))
                index = list(compress(range(len(has)), has))
                if not index:
                    return None
                grads = list(compress(grads, has))
                try:
                    if self._like_params(grads, list(compress(self._sizes, has))) and \
                            list(map(_shape, grads)) == list(compress(self.shapes, has)):
                        return Batch(index, list(compress(self.params, has)), grads, False,
                                     addresses=list(compress(self._ptrs, has)))
                except AttributeError:
                    pass   # (not a tensor: the loop below says what it is)
        index, params, grads, writeback, owns = [], [], [], [], []
        mixed = False
        for i, p in enumerate(self.params):
            g = p.grad if given is None else given[i]
            if g is None:
                continue
            mixed |= g.dtype is not p.dtype
            if g.layout is not torch.strided:
                if sparse is None or g.layout is not torch.sparse_coo:
                    raise RuntimeError(error_on_sparse or f"a gradient of layout {g.layout} is not supported")
                sparse.append((i, g))
                continue
            if self.sharded:
                spec = self.specs[i]
                if spec is not None and tuple(getattr(g, "placements", ())) != tuple(spec[1]):
                    # Another sharding (or a pending Partial sum) would pair the wrong elements.
                    raise RuntimeError(
                        f"a DTensor parameter with placements {tuple(spec[1])} has a gradient with placements "
                        f"{tuple(getattr(g, 'placements', ()))}; redistribute the gradient to the parameter's placements")
                p, g = local(p), local(g)
            if g.shape != p.shape:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} (position {self.positions[i]} in its param group) has a "
                    f"gradient of shape {tuple(g.shape)}" + (
                        ", left from before the parameter changed shape; torch's update refuses it. help: set the "
                        "gradient to None (opt.zero_grad()) after changing a parameter's shape" if self.verify_grads
                        else "; torch's update refuses it (a gradient takes another shape than its parameter's "
                        "only through its .data, set_ or resize_)"))
            own = g
            if not (self.contiguous[i] and g.is_contiguous()):
                p, g = self._conform(i, p, g, writeback)
            if self.is_complex:
                p, g = torch.view_as_real(p), torch.view_as_real(g)
                own = g if own.data_ptr() == g.data_ptr() else own
            index.append(i)
            params.append(p)
            grads.append(g)
            owns.append(own)
        self.verify_grads = False
        if not index:
            return None
        staged = any(map(operator.is_not, owns, grads))
        return Batch(index, params, grads, len(index) == len(self.params), writeback, mixed,
                     user_grads=owns if staged else None)

    def _like_params(self, grads: list[Tensor], sizes: list[int]) -> bool:
        """Every gradient has the bucket's dtype, is contiguous and has its parameter's
        element count (`sizes`). (AttributeError for a gradient that is not a tensor.)"""
        return (list(map(_dtype, grads)).count(self.dtype) == len(grads)
                and all(map(Tensor.is_contiguous, grads))
                and list(map(Tensor.numel, grads)) == sizes)

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


def reference_inputs(bucket: Bucket, batch: Batch, table: Tensor, columns) -> tuple[dict, Tensor, Tensor, Tensor]:
    """What every reference update starts from, in the scalar table's compute dtype: the
    per-tensor scalars expanded per element (by column name), the mask of the stepped
    tensors' elements, and the gathered parameters and gradients (unscaled and clipped as
    the kernels' gradient prologue does)."""
    cdt = table.dtype
    scalars = {name: bucket.expand(table[:, j]) for j, name in enumerate(columns)}
    params = bucket.gather(batch.params, batch.index, cdt)
    grads = batch.prepare_grad(bucket.gather(batch.grads, batch.index, cdt))
    return scalars, bucket.stepped_elements(batch), params, grads


def commit(buffer: Tensor, value: Tensor, stepped: Tensor) -> None:
    """Write `value` into the stepped tensors' segments of a flat buffer, nowhere else."""
    buffer.copy_(torch.where(stepped, value.to(buffer.dtype), buffer))


# Views whose extents overlap are compared exactly: as boxes of coordinates where they lie on
# one grid of strides (blocks of one tensor's rows and columns, at any size: `_grid_boxes`),
# otherwise by their elements' addresses, sorted, up to this many elements in all. Past it
# they are taken as sharing memory, which refuses disjoint views rather than let two writes race.
EXACT_ELEMENTS = 1 << 22


def shared_memory(tensors: list[Tensor], ptrs: list[int] | None = None,
                  contiguous: list[bool] | None = None) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of tensors (of one device and dtype) that share memory,
    and (i, i) for a tensor whose own elements do (an expanded one, stride 0).

    A fused step updates a bucket's tensors at once: two that share an element would race
    on a GPU, and the reference path keeps one of the two updates, where torch.optim's
    for-loop applies both in turn. Extents (first to last byte) are compared first, in
    address order (`ptrs` and `contiguous`, where the caller has them, save reading them
    again: a bucket looks again every step that parameters get new memory through
    `.data`); views whose extents interleave without sharing an element (the columns of
    one matrix) are told apart by marking each one's elements.
    """
    if not tensors or tensors[0].device.type == "meta":
        return []
    starts = list(map(Tensor.data_ptr, tensors)) if ptrs is None else ptrs
    extents = list(map(Tensor.numel, tensors))
    pairs: list[tuple[int, int]] = []
    for i, c in enumerate(map(Tensor.is_contiguous, tensors) if contiguous is None else contiguous):
        if not c and extents[i]:
            t = tensors[i]
            extents[i] = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            # torch's in-place ops refuse to write such a tensor, and the staging copy's
            # write-back would too, after the update has moved the state; a GPU kernel
            # writing it directly would race. (Only a tensor that is not contiguous can be one.)
            if torch._debug_has_internal_overlap(t) == 1:
                pairs.append((i, i))
    if len(tensors) < 2:
        return pairs
    size = tensors[0].element_size()
    spans = sorted((starts[i], starts[i] + n * size, i) for i, n in enumerate(extents) if n)
    cluster, reach = spans[:1], spans[0][1] if spans else 0
    for span in spans[1:] + [None]:
        if span is not None and span[0] < reach:
            cluster.append(span)
            reach = max(reach, span[1])
            continue
        if len(cluster) > 1:
            pairs += _shared_in(cluster, tensors)
        if span is not None:
            cluster, reach = [span], span[1]
    return sorted(pairs)


def _shared_in(cluster: list[tuple[int, int, int]], tensors: list[Tensor]) -> list[tuple[int, int]]:
    """`shared_memory` for tensors whose extents chain into one range of addresses."""
    base, end = cluster[0][0], max(span[1] for span in cluster)
    size = tensors[cluster[0][2]].element_size()
    aligned = all((start - base) % size == 0 for start, _, _ in cluster)
    if all(tensors[i].is_contiguous() for _, _, i in cluster) or not aligned:
        # A contiguous tensor's extent is its elements.
        return _overlapping_extents(cluster)
    boxes = _grid_boxes([((start - base) // size, tensors[i]) for start, _, i in cluster])
    if boxes is not None:
        return [(min(i, j), max(i, j)) for k, (box_i, (_, _, i)) in enumerate(zip(boxes, cluster))
                for box_j, (_, _, j) in zip(boxes[k + 1:], cluster[k + 1:])
                if all(lo_i < hi_j and lo_j < hi_i for (lo_i, hi_i), (lo_j, hi_j) in zip(box_i, box_j))]
    if sum(tensors[i].numel() for _, _, i in cluster) > EXACT_ELEMENTS:
        return _overlapping_extents(cluster)
    # Every element's address, sorted: tensors that share an element have it in one run of
    # equal addresses, and the k-th neighbours within runs give every pair (a run is as long
    # as the number of tensors sharing its element, usually one or two).
    addresses = torch.cat([_addresses((start - base) // size, tensors[i]) for start, _, i in cluster])
    owners = torch.cat([torch.full((tensors[i].numel(),), i, dtype=torch.int64) for _, _, i in cluster])
    addresses, order = addresses.sort(stable=True)
    owners = owners[order]
    pairs: set[tuple[int, int]] = set()
    for lag in range(1, len(cluster)):
        equal = addresses[lag:] == addresses[:-lag]
        if not equal.any():
            break
        first, second = owners[:-lag][equal], owners[lag:][equal]
        found = torch.stack([torch.minimum(first, second), torch.maximum(first, second)], 1).unique(dim=0)
        pairs.update((i, j) for i, j in found.tolist() if i != j)
    return sorted(pairs)


def _addresses(offset: int, t: Tensor) -> Tensor:
    """The element offsets t covers, counted from `offset` (an int64 tensor of t.numel())."""
    out = torch.tensor([offset], dtype=torch.int64)
    for n, stride in zip(t.shape, t.stride()):
        out = (out[:, None] + torch.arange(n, dtype=torch.int64) * stride).flatten()
    return out


def _overlapping_extents(cluster: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The pairs of a cluster whose extents (first to last byte) overlap."""
    return [(min(i, j), max(i, j)) for k, (_, end_i, i) in enumerate(cluster)
            for start_j, _, j in cluster[k + 1:] if start_j < end_i]


def _grid_boxes(views: list[tuple[int, Tensor]]) -> list[list[tuple[int, int]]] | None:
    """Each view's elements as a box of coordinates on one mixed-radix grid, or None where
    the views do not lie on one.

    `views` are (offset in elements from a common base, tensor). The grid's strides are
    every stride the views use (and 1), largest first; each must be a multiple of the next,
    whose radix is their quotient. An offset is then one point of the grid (its digits) and
    a view the box from it to it plus its sizes, along the dimension of each stride, as
    long as no box runs past a radix (a view wrapping into the next row: None). Addresses
    and grid points correspond one to one, so two views share an element exactly where
    their boxes meet: disjoint column blocks of a matrix of any size are told apart without
    marking its elements."""
    strides = {1}
    for _, t in views:
        for n, st in zip(t.shape, t.stride()):
            if n > 1:
                if st <= 0:
                    return None
                strides.add(st)
    grid = sorted(strides, reverse=True)
    if any(big % small for big, small in zip(grid, grid[1:])):
        return None
    radix = [None] + [big // small for big, small in zip(grid, grid[1:])]
    boxes = []
    for offset, t in views:
        sizes = dict.fromkeys(grid, 1)
        for n, st in zip(t.shape, t.stride()):
            if n > 1:
                if sizes[st] != 1:
                    return None   # two dimensions of one stride: its own elements overlap
                sizes[st] = n
        box = []
        for st, r in zip(grid, radix):
            digit = offset // st if r is None else offset // st % r
            if r is not None and digit + sizes[st] > r:
                return None
            box.append((digit, digit + sizes[st]))
        boxes.append(box)
    return boxes


class StaleLayout(Exception):
    """A parameter's shape, dtype or device changed under the optimizer."""

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


def split_group(params: list[Tensor]) -> list[tuple[list[Tensor], list[int]]]:
    """Split a group's parameters into (device, dtype) buckets, in order of appearance.

    A lazy module's parameter not yet materialized (`UninitializedParameter`: no shape, no
    gradient) joins no bucket; torch's optimizers skip it as a parameter without a
    gradient, and the group is split again once it has its shape (`Optimizer._group_buckets`)."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for pos, p in enumerate(params):
        if is_lazy(p):
            continue
        members, positions = buckets.setdefault((local(p).device, p.dtype), ([], []))
        members.append(p)
        positions.append(pos)
    return list(buckets.values())
