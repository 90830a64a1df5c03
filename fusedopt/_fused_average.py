"""`Optimizer.attach_averaged_model`: an averaged model updated inside the optimizer's step.

After ``opt.attach_averaged_model(averaged)``, each ``opt.step()`` ends with what
``averaged.update_parameters(model)`` would do, with its numbers. Where a parameter is
updated by a Triton kernel that can average (``Optimizer._fuses_average``: every flat-state
update kernel declares ``AVERAGE``), the kernel averages the parameter's new value while it is still in registers into the averaged
model's flat buffer (`kernels/averaging.average_into`): the parameter is not read a second
time and the averaging launch disappears. Everything else ``update_parameters`` covers --
parameters that got no gradient this step, parameters of the model that this optimizer
does not hold, buffers, tensors on another path, device or layout -- the averaged model
updates itself after the step, restricted to those tensors (`AveragedModel._update`).

The averaged model's count ``n_averaged`` stays a device tensor, as torch keeps it; the
step reads it from the device only when something other than the step changed it (its
version counter says so), because the formula's weights are computed on the host.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.nn import Module

from . import _flat
from .kernels import _launch
from .kernels import averaging as _averaging
from .swa._averaged_model import FLAT


class AttachedAverage:
    """An averaged model and the model it averages, as attached to one optimizer."""

    def __init__(self, averaged, model: Module):
        self.averaged = averaged
        self._model = weakref.ref(model)
        self._n: tuple[int, int, int, int] | None = None  # (id, address, version, value) last read
        self._scalars: dict = {}

    def model(self) -> Module:
        model = self._model()
        if model is None:
            raise RuntimeError("fusedopt: the model whose average is attached to this optimizer no longer exists. "
                               "help: attach again, naming the model: opt.attach_averaged_model(averaged, model)")
        return model

    def n_averaged(self) -> int:
        """n_averaged on the host. On the CPU it is read every step (a read costs nothing and
        sees every write, `.data.fill_(0)` included). On a GPU, where a read is a sync, it is
        read again only when the tensor, its storage or its version changed: an in-place op
        on it (`fill_`, `zero_`, `copy_`) or a new tensor is seen; a write through `.data`,
        which torch does not count, is not (`attach_averaged_model` says so)."""
        t = self.averaged.n_averaged
        if t.device.type == "cpu":
            return int(t)
        key = _count_key(t)
        if self._n is None or self._n[:3] != key:
            self._n = (*key, int(t))
        return self._n[3]

    def begin(self) -> _Round:
        """Start a step: the averaged model's current layout and the model's tensors."""
        model = self.model()
        n = self.n_averaged()
        flat = self.averaged.flat_average()
        fusable = n >= 0 and all(b.average is not None for b in flat.buckets
                                 if b.dtype.is_floating_point or b.dtype.is_complex)
        return _Round(self, model, flat, self.averaged.sources(model), n, fusable)

    def _plan(self, opt, bucket: _flat.Bucket, round_: _Round):
        """Which of the bucket's parameters its kernel can average, and where to: cached while
        the averaged layout, the model's tensors and the bucket stay what they were."""
        # Kept on the bucket, so that it goes when the bucket is rebuilt; owner and layout are
        # held and compared by identity (an id could be reused by a rebuilt layout).
        layout = self.averaged._layout
        cached = bucket.__dict__.get("_average_plan")
        if (cached is not None and cached[0] is self and cached[1] is layout
                and cached[2] == round_.sources_key):
            return cached[3:]
        positions: list[int | None] = [None] * len(bucket)
        segments = [-1] * len(bucket)
        target = None
        if bucket.path == "triton" and opt._fuses_average and not (bucket.sharded or bucket.is_complex):
            where = round_.position_of()
            for i, p in enumerate(bucket.params):
                pos = where.get(id(p))
                if pos is None or pos >= layout.n_averaged_tensors:
                    continue
                b, j = round_.flat.locate(pos)
                avg = round_.flat.buckets[b]
                # The kernel walks the parameter's elements in memory order; the averaged
                # tensor's segment must hold them in the same order.
                if (avg.path != "triton" or avg.device != bucket.device or avg.dtype != bucket.dtype
                        or avg.shapes[j] != bucket.shapes[i] or avg.strides[j] != bucket.strides[i]):
                    continue
                target = avg  # one (device, dtype): one averaged bucket
                positions[i], segments[i] = pos, avg.offsets[j]
        device_segments = (_launch.on_device(torch.tensor(segments, dtype=torch.int64), bucket.device)
                           if target is not None else None)
        plan = (positions, device_segments, target)
        bucket._average_plan = (self, layout, round_.sources_key, *plan)
        return plan


def _count_key(t) -> tuple[int, int, int]:
    """What identifies a value of the n_averaged tensor without reading it (a sync on a GPU):
    the tensor, its storage and its version. One function for the cache and its check, so
    that they stay the same key (a field added to one only made every step read the count)."""
    return id(t), t.data_ptr(), t._version


class _Round:
    """One step's averaging: what the kernels averaged, and the rest afterwards."""

    def __init__(self, owner: AttachedAverage, model: Module, flat, sources: list[Tensor], n: int, fusable: bool):
        self.owner, self.model, self.flat, self.sources, self.n, self.fusable = owner, model, flat, sources, n, fusable
        self.sources_key = tuple(map(id, sources))
        self.done: list[int] = []
        self._where: dict[int, int] | None = None

    def position_of(self) -> dict[int, int]:
        if self._where is None:
            self._where = {id(t): pos for pos, t in enumerate(self.sources)}
        return self._where

    def fuse(self, opt, bucket: _flat.Bucket, batch: _flat.Batch) -> _averaging.FusedAverage | None:
        """The kernel arguments that make this bucket's update also average its parameters."""
        if not self.fusable or bucket.path != "triton":
            return None
        positions, segments, target = self.owner._plan(opt, bucket, self)
        if target is None:
            return None
        self.done.extend(p for p in (positions if batch.everyone else (positions[i] for i in batch.index))
                         if p is not None)
        average = target.average
        return _averaging.FusedAverage(
            buffer=target.buffers[FLAT], segments=segments,
            scalars=_averaging.fused_scalars(bucket.device, _launch.compute_dtype(bucket.real_dtype),
                                             average.formula, self.n, average.decay, self.owner._scalars),
            flag=_averaging.FORMULAS[average.formula] + 1)

    def finish(self) -> None:
        """Average what the kernels did not, and count the update, as update_parameters does."""
        owner = self.owner
        owner.averaged._update(self.model, self.n, done=self.done)
        t = owner.averaged.n_averaged
        owner._n = (*_count_key(t), self.n + 1)   # (the count just written: no read back)
