"""AveragedModel: torch.optim.swa_utils.AveragedModel with the average kept in flat buffers.

The averaged copy's tensors (its parameters, and its buffers) are views of flat
per-(device, dtype) buffers laid out by `fusedopt._flat.Bucket`, and one
`update_parameters` call updates each bucket in one fused launch: the average for the
averaged tensors, a copy for the buffers torch keeps in sync with the model. The source
model's tensors are reached through the pointer table, as the optimizers reach
parameters and gradients, so nothing is gathered on the GPU path.

The built-in averages (`get_*_avg_fn`, and the default equal-weight average) are
recognised by their tag and run fused with torch's formula for that function; any other
`avg_fn` / `multi_avg_fn` is called exactly as torch calls it, on the same views.
Integer tensors (BatchNorm's `num_batches_tracked`) go through torch's functions too:
torch averages them in floating point and truncates, which is not a kernel's business.
"""
from __future__ import annotations

import operator
import weakref
from copy import deepcopy
from dataclasses import dataclass, field
from itertools import chain

import torch
from torch import Tensor
from torch.nn import Module

from .. import _flat
from ..kernels import averaging as kernels
from .. import _backend
from ._averages import Average, average_of, get_swa_avg_fn, get_swa_multi_avg_fn

try:
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices as _foreach_devices
except ImportError:  # pragma: no cover - older torch
    def _foreach_devices() -> list[str]:
        return ["cuda"]

FLAT = "average"  # the Bucket buffer that holds the averaged tensors


def _fusable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


@dataclass
class FlatAverage:
    """An averaged model's flat state, for code that updates the average in its own kernel
    (an optimizer fusing ``update_parameters`` into its step).

    buckets: one per (device, dtype). ``bucket.params`` are the averaged module's tensors
        (views of ``bucket.buffers["average"]``), ``bucket.positions`` their indices in
        :meth:`AveragedModel.sources` order, ``bucket.offsets`` / ``bucket.numels`` their
        segments. Tensors ``i >= bucket.first_copy`` are copied from the model, not averaged;
        ``bucket.average`` is the :class:`Average` the bucket runs (None: integer tensors, or
        a user-supplied function, which only torch ops can apply).
    n_averaged: the averaged model's counter. An update with ``n_averaged == 0`` copies;
        otherwise ``avg += Average.weight(n) * (x - avg)`` in the formula's rounding
        (``fusedopt.kernels.averaging.scalars``). The updater increments it afterwards.
    """

    buckets: list[_flat.Bucket]
    n_averaged: Tensor
    _where: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)

    def buffers(self) -> list[Tensor]:
        """Each bucket's flat buffer, in bucket order."""
        return [b.buffers[FLAT] for b in self.buckets]

    def locate(self, position: int) -> tuple[int, int]:
        """(bucket index, index in the bucket) of the tensor at `position` of
        :meth:`AveragedModel.sources`: where a model tensor's average lives."""
        if not self._where:
            self._where.update({pos: (b, i) for b, bucket in enumerate(self.buckets)
                                for i, pos in enumerate(bucket.positions)})
        return self._where[position]


class _Layout:
    """The flat buffers of the averaged module's tensors, and how to tell they still are.

    Tensors are ordered averaged first (parameters, and buffers with use_buffers), then
    synced buffers; a tensor's index in that order is its bucket position.
    """

    @torch.no_grad()
    def __init__(self, module: Module, use_buffers: bool):
        params, buffers = list(module.parameters()), list(module.buffers())
        averaged = params + buffers if use_buffers else params
        tensors = averaged + ([] if use_buffers else buffers)
        self.use_buffers = use_buffers
        self.tensors = tensors
        self.n_averaged_tensors = len(averaged)
        self.buckets: list[_flat.Bucket] = []
        for members, positions in _flat.split_group(tensors):
            bucket = _flat.Bucket(members, positions)
            bucket.buffer(FLAT)
            for i, t in enumerate(members):
                view = bucket.view(FLAT, i)
                view.copy_(t)
                # The averaged module is our own deep copy: re-pointing its tensors at the
                # flat buffer is invisible to everyone else.
                t.data = view
            # split_group keeps order of appearance and averaged tensors come first, so each
            # bucket is its averaged tensors followed by its synced ones.
            bucket.first_copy = sum(pos < len(averaged) for pos in positions)
            self.buckets.append(bucket)
        # What the module tree holds, table by table (each module's submodules, parameters
        # and buffers, None entries too), so that a tensor or submodule replaced, added or
        # removed (`load_state_dict(assign=True)`, `averaged.module.head = nn.Linear(...)`,
        # `add_module`) is noticed without walking the tree on every update.
        self.root = module
        self.tables = [table for mod in module.modules() for table in (mod._modules, mod._parameters, mod._buffers)]
        self.sizes = list(map(len, self.tables))
        entries = [(table, name, value) for table in self.tables for name, value in table.items()]
        self.entries = tuple(zip(*entries)) or ((), (), ())   # (tables, names, values)
        self.ptrs = [t.data_ptr() for t in tensors]
        self.source_key = None  # the model tensors the buckets' cached batches were built from
        self._watched: weakref.ref | None = None   # the model they belong to (see `watch`)

    def forget_sources(self) -> None:
        """Drop the buckets' batches of model tensors (and staged copies of them)."""
        for bucket in self.buckets:
            bucket.source_batch, bucket.source_mixed = None, []
        self.source_key = None

    def watch(self, model: Module) -> None:
        """Keep the cached batches only while `model` lives: they hold its tensors, and
        torch's AveragedModel keeps nothing of a model it averaged (an average kept after
        the model is dropped, for evaluation, would otherwise keep the model's memory)."""
        watched = self._watched
        if watched is not None and watched() is model:
            return
        layout = weakref.ref(self)

        def gone(_, layout=layout):
            alive = layout()
            if alive is not None:
                alive.forget_sources()
        self._watched = weakref.ref(model, gone)

    def current(self, module: Module, use_buffers: bool) -> bool:
        """False once a tensor or a submodule was replaced, added or removed, or a tensor
        re-pointed (``.to()``, ``.half()``): then the layout is rebuilt from the module as
        it is."""
        return (use_buffers == self.use_buffers and module is self.root
                and list(map(len, self.tables)) == self.sizes
                and all(map(operator.is_, map(dict.get, *self.entries[:2]), self.entries[2]))
                and list(map(Tensor.data_ptr, self.tensors)) == self.ptrs)


class AveragedModel(Module):
    r"""Stochastic Weight Averaging (SWA) and exponential moving averages (EMA) of a model,
    as :class:`torch.optim.swa_utils.AveragedModel`, with the average in flat buffers.

    Args:
        model: the module to average; a deep copy of it holds the average (``.module``).
        device: where the copy lives (default: where the model lives).
        avg_fn: ``avg_fn(averaged, current, n_averaged) -> Tensor``, applied per tensor.
        multi_avg_fn: ``multi_avg_fn(averaged_list, current_list, n_averaged)``, in place.
            With neither, an equal-weight average (SWA). Only one of the two may be given.
        use_buffers: average the buffers too; otherwise they are copied from the model.
        backend: 'auto', 'triton' or 'reference' (or ``FUSEDOPT_BACKEND``), as for
            :class:`fusedopt.Optimizer`. 'auto' runs the kernel on GPUs; on the CPU it runs
            torch's own ops per bucket: a gather and a few whole-buffer ops where tensors
            are small, foreach ops where they are large (``kernels.averaging.average_cpu``).

    The first :meth:`update_parameters` copies the model; each later one averages it in.
    State (``n_averaged`` and ``module.*``) saves and loads with :meth:`state_dict` in
    torch's keys, interchangeably with torch's AveragedModel.
    """

    n_averaged: Tensor

    def __init__(self, model: Module, device: int | torch.device | None = None, avg_fn=None,
                 multi_avg_fn=None, use_buffers: bool = False, *, backend: str = "auto"):
        super().__init__()
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        self.module = deepcopy(model)
        # The model averaged, for an optimizer that fuses update_parameters into its step
        # (Optimizer.attach_averaged_model); weak, so that the average does not keep it alive.
        self._source = weakref.ref(model)
        if device is not None:
            self.module = self.module.to(device)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.backend = _backend.resolve(backend)
        self._layout: _Layout | None = None
        self._flat_layout()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # ------------------------------------------------------------------ layout

    def _averaged_tensors(self, module: Module) -> list[Tensor]:
        tensors = list(module.parameters())
        return tensors + list(module.buffers()) if self.use_buffers else tensors

    def sources(self, model: Module) -> list[Tensor]:
        """The model's tensors in the order of the flat layout's positions: the averaged
        ones (parameters, and buffers with use_buffers), then the synced buffers."""
        return list(chain(model.parameters(), model.buffers()))

    def _flat_layout(self) -> _Layout:
        """The layout of the averaged module's current tensors, rebuilt if they changed."""
        layout = self._layout
        if layout is None or not layout.current(self.module, self.use_buffers):
            layout = _Layout(self.module, self.use_buffers)
            for bucket in layout.buckets:
                # On the CPU, 'auto' takes average_cpu (torch ops chosen by tensor size).
                bucket.path = _backend.choose_path(self.backend, bucket.device, cpu_fast_path="native")
            self._layout = layout
        return layout

    def _average(self, device: torch.device) -> Average | None:
        """The fused formula for a bucket on `device`; None when only torch can apply it."""
        if self.multi_avg_fn is None and self.avg_fn is None:
            # torch's default: the multi-tensor SWA where foreach kernels exist, else per tensor
            if device.type in _foreach_devices():
                return Average("swa", "lerp")
            return Average("swa", "divide")
        return average_of(self.multi_avg_fn if self.multi_avg_fn is not None else self.avg_fn)

    def flat_average(self) -> FlatAverage:
        """The flat buffers and averaging parameters, for a fused updater (see :class:`FlatAverage`)."""
        layout = self._flat_layout()
        for bucket in layout.buckets:
            bucket.average = self._average(bucket.device) if _fusable(bucket.dtype) else None
        return FlatAverage(layout.buckets, self.n_averaged)

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update_parameters(self, model: Module) -> None:
        """Average `model` in (copy it, on the first call); copy its buffers unless use_buffers."""
        self._update(model, int(self.n_averaged))

    def source_model(self) -> Module | None:
        """The model this average was built from, while it exists."""
        source = self.__dict__.get("_source")
        return source() if source is not None else None

    @torch.no_grad()
    def _update(self, model: Module, n: int, done=()) -> None:
        """update_parameters with n_averaged already read (`n`), except for the tensors at the
        positions of :meth:`sources` listed in `done`, which an optimizer's kernel averaged."""
        layout = self._flat_layout()
        averages = [self._average(b.device) for b in layout.buckets]
        if any(a is None for a, b in zip(averages, layout.buckets) if _fusable(b.dtype)):
            assert not done, "only the built-in averages are fused into a step"
            self._update_with_functions(model)
            self.n_averaged += 1
            return

        n_avg = layout.n_averaged_tensors
        sources = self._averaged_tensors(model)
        synced = [] if self.use_buffers else list(model.buffers())
        if len(synced) != len(layout.tensors) - n_avg:
            raise ValueError(f"the model has {len(synced)} buffers; the averaged model has "
                             f"{len(layout.tensors) - n_avg}")
        # As torch: average as many tensors as both models have (none while n_averaged < 0),
        # copy every buffer.
        matched = min(len(sources), n_avg) if n >= 0 else 0
        pool = sources[:matched] + [None] * (n_avg - matched) + synced
        # torch's update writes each of them in place, bumping its autograd version counter:
        # a graph that saved one before the update then refuses a backward after it. The
        # kernels write through pointers, which bumps nothing: bumped here, also for those
        # an optimizer's kernel averaged (`done`).
        written = [t for t, x in zip(layout.tensors, pool) if x is not None]
        for pos in done:
            pool[pos] = None
        self._collect(layout, pool)
        integer = []
        for bucket, average in zip(layout.buckets, averages):
            batch = bucket.source_batch
            if batch is None:
                continue
            first_copy = 0 if n == 0 else bucket.first_copy
            if not _fusable(bucket.dtype):
                integer.append((bucket, batch, first_copy))
                continue
            values = kernels.scalars(average.formula, n, average.decay)
            path = bucket.path
            if path == "native" and not batch.everyone:
                path = "reference"
            run = {"triton": kernels.average_triton, "reference": kernels.average_reference,
                   "native": kernels.average_cpu}[path]
            run(bucket, batch, bucket.buffers[FLAT], average.formula, values, first_copy)
        for bucket in layout.buckets:
            if bucket.source_mixed:
                # another dtype than their average, or complex: see `_collect`
                self._with_functions(bucket, bucket.source_mixed, 0 if n == 0 else bucket.first_copy)
        for bucket, batch, first_copy in integer:
            # torch averages integer tensors in floating point and truncates; its functions do it
            self._with_functions(bucket, list(zip(batch.index, batch.params)), first_copy)
        torch._C._increment_version(written)
        if layout.source_key is None:
            layout.forget_sources()   # staged copies: scratch, not kept between updates
        else:
            layout.watch(model)
        self.n_averaged += 1

    def _with_functions(self, bucket: _flat.Bucket, sources: list[tuple[int, Tensor]], first_copy: int) -> None:
        """Average the model tensors `sources` ((position in the bucket, tensor) pairs) with
        torch's own functions, or copy those at `first_copy` and after, as update_parameters
        does."""
        pairs = [(i, bucket.params[i], x) for i, x in sources]
        for i, a, x in pairs:
            if i >= first_copy:
                a.copy_(x)
        averaged = [(a, x) for i, a, x in pairs if i < first_copy]
        if averaged:
            self._apply_functions([a for a, _ in averaged], [x for _, x in averaged])

    @staticmethod
    def _collect(layout: _Layout, pool: list[Tensor | None]) -> None:
        """Set each bucket's ``source_batch``: the batch of model tensors it reads, kernel-ready.

        Rebuilt only when the model's tensors change (object, address or strides), so an
        update normally costs no per-tensor work beyond that check; batches holding staged
        copies (another device or dtype, other strides) are rebuilt every time.
        """
        live = [x for x in pool if x is not None]
        key = (tuple(map(id, pool)), tuple(map(Tensor.data_ptr, live)), tuple(map(Tensor.stride, live)))
        if key == layout.source_key:
            return
        cacheable = True
        for bucket in layout.buckets:
            index, xs, mixed = [], [], []
            for i, pos in enumerate(bucket.positions):
                x = pool[pos]
                if x is None:
                    continue
                if _fusable(bucket.dtype) and (bucket.is_complex or x.dtype != bucket.dtype):
                    # torch's arithmetic: complex, or in the wider of the two dtypes with
                    # one rounding; the kernel's would round the model's value first, or
                    # take a complex number as two reals (`_update` averages these)
                    moved = x.to(bucket.device)
                    cacheable = cacheable and moved is x
                    mixed.append((i, moved))
                    continue
                conformed = _conform(bucket, i, x)
                cacheable = cacheable and conformed is x
                index.append(i)
                xs.append(conformed)
            bucket.source_batch = _flat.Batch(index, xs, xs, len(index) == len(bucket)) if index else None
            bucket.source_mixed = mixed
        layout.source_key = key if cacheable else None

    def _apply_functions(self, averaged: list[Tensor], current: list[Tensor]) -> None:
        """torch's update for n_averaged > 0: the given function, or the default SWA,
        grouped by (device, dtype) for the multi-tensor kind."""
        if self.multi_avg_fn is None and self.avg_fn is not None:
            for a, x in zip(averaged, current, strict=True):
                a.copy_(self.avg_fn(a, x, self.n_averaged.to(a.device)))
            return
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for a, x in zip(averaged, current, strict=True):
            mine, theirs = groups.setdefault((a.device, a.dtype), ([], []))
            mine.append(a)
            theirs.append(x)
        for (device, dtype), (mine, theirs) in groups.items():
            n_averaged = self.n_averaged.to(device)
            if self.multi_avg_fn is not None:
                self.multi_avg_fn(mine, theirs, n_averaged)
            elif device.type in _foreach_devices() and _fusable(dtype):
                get_swa_multi_avg_fn()(mine, theirs, n_averaged)
            else:
                # torch's default runs the multi-tensor SWA on foreach devices even for integer
                # tensors, where it raises; the per-tensor SWA it runs on the CPU works anywhere.
                swa = get_swa_avg_fn()
                for a, x in zip(mine, theirs):
                    a.copy_(swa(a, x, n_averaged))

    def _update_with_functions(self, model: Module) -> None:
        """torch's algorithm step by step, for user-supplied averaging functions."""
        pairs = [(a.detach(), x.detach().to(a.device))
                 for a, x in zip(self._averaged_tensors(self.module), self._averaged_tensors(model))]
        if self.n_averaged == 0:
            for a, x in pairs:
                a.copy_(x)
        elif self.n_averaged > 0 and pairs:
            self._apply_functions([a for a, _ in pairs], [x for _, x in pairs])
        if not self.use_buffers:
            for b, x in zip(self.module.buffers(), model.buffers(), strict=True):
                b.detach().copy_(x.detach().to(b.device))

    # ------------------------------------------------------------------ pickling

    def __getstate__(self):
        state = super().__getstate__()
        # Copies and pickles get their own flat buffers on first use; the weak reference to
        # the source model does not pickle (attach the copy naming its model).
        return {**state, "_layout": None, "_source": None}


def _conform(bucket: _flat.Bucket, i: int, x: Tensor) -> Tensor:
    """The model's tensor as the kernel reads it: on the bucket's device, in its dtype,
    dense with the averaged tensor's strides (a staged copy where it is not)."""
    if x.device != bucket.device or x.dtype != bucket.dtype:
        x = x.to(device=bucket.device, dtype=bucket.dtype)
    if x.shape != bucket.shapes[i]:
        # torch's copy_ / lerp_ raise RuntimeError for shapes that do not match (it broadcasts
        # the ones that do; a flat segment has one shape, so those are refused here too)
        raise RuntimeError(f"the model's tensor {bucket.positions[i]} has shape {tuple(x.shape)}; "
                           f"the averaged model's has {tuple(bucket.shapes[i])}")
    if not (bucket.contiguous[i] and x.is_contiguous()):
        stride = bucket.strides[i]
        if not (_flat.is_dense(x) and x.stride() == stride):
            x = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)
    return x
