"""The base class: parameter groups, flat state, the step driver, and dispatch to a path.

`fusedopt.Optimizer` subclasses `torch.optim.Optimizer` and runs its `__init__`, so the
hook machinery, `zero_grad`, `add_param_group`'s validation and every `isinstance` check
in the ecosystem (LR schedulers, GradScaler, DCP, dynamo, Lightning) work unchanged. What
it replaces is where state lives and how a step runs:

* State lives in `_flat.Bucket`s, one per (group, device, dtype). `opt.state[p]` holds
  views into the bucket's flat buffers, so torch's per-parameter picture is kept, and
  writes into it (ZeRO, DCP and frameworks assign state directly) land in the buffers.
* `step()` runs one update per bucket, on one of three paths chosen at bucket build:
  'triton' (the fused kernel), 'reference' (plain torch ops on the flat buffers, which
  validates the kernel), or 'native' (torch's own CPU implementation, its fused kernel
  where torch has one, on the flat state: the fastest correct path on CPU; `_native.py`).

A subclass declares its flat state kinds and supplies `_update`, which receives the
bucket, the batch of tensors that have gradients, and the path.

Beside this module: the `opt.state` mapping that writes through to the buffers is
`_state.py`'s, the checks of hyperparameters `_options.py`'s; two mixins of the class
hold `state_dict`/`load_state_dict` (`_checkpoint.Checkpoint`) and the step as
`torch.compile` traces it (`_compile.TracedStep`, beside the op it calls).
"""
from __future__ import annotations

import functools
import numbers
import operator
import os
import sys
import warnings
import weakref
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import _backend, _checkpoint, _compile, _flat, _native
from ._options import as_float, check_max_grad_norm, check_numbers, refuse_differentiable
from ._state import ParamState, State, let_go, set_view
# Pickles of `opt.state` name these here: `_rebuild_param_state` (ParamState.__reduce__), and
# `_ParamState` itself before it had one. They must keep loading.
from ._state import ParamState as _ParamState, _rebuild_param_state  # noqa: F401
from .kernels import _launch
from .kernels import clip as _clip


def _carried(entry: dict) -> ParamState:
    """A copy of a parameter's entry to carry into a rebuilt bucket, with its mark of the
    sparse gradient that seeded it (`ParamState.sparse_dim`: torch's SGD keeps that
    momentum buffer sparse, and so does a checkpoint of it)."""
    copied = ParamState(entry)
    copied.sparse_dim = getattr(entry, "sparse_dim", None)
    return copied


def _same_object(value, view: Tensor, carried: bool):
    """What a parameter's entry holds for state adopted into `view`: `value` itself where
    torch's entry would still hold that object, pointed at `view`, else `view`.

    torch's state tensors stay the same objects while a group's parameter list changes and
    through `load_state_dict(opt.state_dict())`, so a tensor taken from `opt.state` and kept
    (a callback that resets the momentum) goes on being the state. Here that is a view of
    the flat state: one `carried` into a rebuilt bucket (another parameter appended to the
    group), or loaded back into new buffers, is pointed at its new segment, as `_reattach` points back one moved through
    `.data`; one that is already `view`'s segment is kept. A tensor of another dtype or
    device (the parameter changed), or not a plain tensor, is left as it is."""
    if not (type(value) is Tensor and type(view) is Tensor and value.dtype == view.dtype
            and value.device == view.device and value.shape == view.shape):
        return view
    if value.numel() and value.data_ptr() == view.data_ptr() and value.stride() == view.stride():
        return value   # (an empty tensor has no address to tell: a foreign one is not kept)
    if carried:
        value.data = view
        return value
    return view


def _refuse_duplicates(params, gi: int) -> None:
    """torch.optim accepts a parameter listed twice in a group, with a deprecation warning
    (pytorch#40967), and steps it once per listing with one state. A fused step updates each
    parameter once, so fusedopt refuses it rather than give other numbers."""
    seen: dict[int, int] = {}
    for j, p in enumerate(params):
        first = seen.setdefault(id(p), j)
        if first != j:
            raise ValueError(f"fusedopt: parameter group {gi} lists a parameter twice (positions {first} and {j}); "
                             "torch.optim steps such a parameter once per listing and deprecates it, a fused step "
                             "updates each parameter once. help: list each parameter once")


def _same_objects(held: tuple | None, params: list) -> bool:
    """Whether a group's parameter list still holds exactly the tensors its buckets were
    built from (compared by identity: a tensor's `==` is elementwise). Checked every step:
    one C-level pass, half the cost of the ids tuple it replaces on 2000 tensors."""
    return held is not None and len(held) == len(params) and all(map(operator.is_, held, params))


def user_stacklevel() -> int:
    """The `stacklevel` that points a warning raised inside the step at the user's line: the
    number of frames up to the first one outside this package (the step is reached through
    hooks, a closure, or the compiled op, each a different depth)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


# A profiler range from C++ (inductor's generated code opens its ranges with it); torch's
# Python record_function where a build lacks it.
_record_range = getattr(torch._C._profiler, "_RecordFunctionFast", torch.autograd.profiler.record_function)


class Optimizer(_checkpoint.Checkpoint, _compile.TracedStep, torch.optim.Optimizer):
    """Base class of fusedopt's optimizers. See the module docstring.

    Every subclass takes torch's keywords for its algorithm, with torch's defaults, and keeps
    them in the param groups as torch does (checkpoints stay interchangeable). torch's
    implementation flags mean here:

    * ``foreach``: changes nothing; torch's validation of it is kept.
    * ``fused``: on Adam, AdamW, SGD and Adagrad (torch's fused algorithms) ``True`` declares
      ``_step_supports_amp_scaling``: GradScaler's unscaling and inf-skip happen in the kernel.
      ``step`` then lives on the parameter's device, as in torch, and stepping a parameter
      that is not floating point (complex, integer) raises RuntimeError, as torch's does.
    * ``capturable``: ``step`` lives on the parameter's device, as in torch. The Adam family
      also keeps a tensor lr/betas on the device and reads nothing back to the host, so its
      step can be captured in a CUDA graph (README, "Using fusedopt with CUDA graphs").
    * ``differentiable``: ``True`` raises: a fused update is not differentiable.
    * ``backend`` (fusedopt's own): 'auto', 'triton' or 'reference', overridden for a process by
      ``FUSEDOPT_BACKEND``; see ``fusedopt/_backend.py``.

    Under ``torch.compile``, ``step()`` is traced as one opaque custom op, ``fusedopt::step``
    (``fusedopt/_compile.py``), so a compiled function that calls it keeps one graph
    (``fullgraph=True`` works); as for torch.optim, a tensor lr may change every step
    without recompiling. A Python-number one recompiles every time it changes, up to
    dynamo's recompile limit (torch.optim's becomes a graph input after one recompile).
    """

    #: state keys that live in flat buffers, in torch's order ("step" is the step vector)
    _flat_state: tuple[str, ...] = ()
    #: per-parameter scalar state kinds ("step", NAdam's "mu_product", ...), kept as one
    #: float32 vector per bucket
    _scalar_state: tuple[str, ...] = ()
    #: torch keeps scalar state on the CPU for most algorithms, on the parameter's device
    #: for a few (ASGD)
    _scalars_on_param_device = False
    #: whether torch has a fused CPU kernel for this algorithm, which the 'native' path
    #: then runs (otherwise it runs torch's foreach implementation)
    _native = False
    #: dtypes for which torch's fused CPU kernels are trusted: fp32 and fp64 match the
    #: for-loop for every fused CPU op; bf16 is right for Adam, AdamW and Adagrad (their
    #: fused math runs in fp32) but not SGD's, which overrides this.
    _native_dtypes = (torch.float32, torch.float64, torch.complex64, torch.complex128, torch.bfloat16)
    #: dtypes torch's fused CPU kernel runs only for a group with ``fused=True``, as torch
    #: does: in fp16 its for-loop (what torch runs otherwise) rounds every op to fp16, and
    #: its fused kernel computes in fp32 (a squared gradient that underflows to 0 in fp16
    #: divides by eps alone in the one, not in the other)
    _native_fused_on_request = (torch.float16,)
    _sparse_error: str | None = None
    #: a check of the coming step's counts, for what torch raises at a given step (before
    #: anything changes): called with (group, bucket, batch, sparse) for every bucket stepped
    _check_steps = None
    #: whether lr only seeds a parameter's first state (Rprop's step sizes): torch's step
    #: then reads it for parameters stepped for the first time only, and `_check_steps`
    #: checks it for those instead of every step checking it
    _lr_seeds_state = False
    #: whether sparse gradients are stepped (torch's SGD and Adagrad take them):
    #: `_sparse_update` then steps those parameters, `_check_sparse` refuses options first
    _steps_sparse = False
    #: flat state that torch keeps sparse for a parameter whose gradients are sparse (SGD's
    #: momentum buffer: a copy of the first sparse gradient, updated with sparse ops); the
    #: flat segment holds it dense and `state_dict` exports it sparse (see `ParamState`)
    _sparse_state: tuple[str, ...] = ()
    #: state torch reads with `.get` and starts afresh when it is None (SGD's momentum
    #: buffer); any other missing state is an error when its parameter is stepped
    _optional_state: tuple[str, ...] = ()
    #: whether the kernels can clip gradients (their GRAD_OPS prologue): `max_grad_norm`
    _clips = False

    @property
    def max_grad_norm(self) -> float | None:
        """fusedopt-only: clip the global gradient norm to this inside the step (None: off)."""
        return self.__dict__.get("max_grad_norm")

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        # Checked as the constructor checks it: a value assigned between steps ("x", 0, a
        # tensor) would otherwise fail inside the step, or clip by what was refused.
        self.__dict__["max_grad_norm"] = check_max_grad_norm(value)

    #: whether the Triton kernel can average the new parameters into an attached averaged
    #: model in the same pass (its AVERAGE arguments; see attach_averaged_model)
    _fuses_average = False
    #: the averaged model attach_averaged_model attached (a _fused_average.AttachedAverage)
    _attached = None
    #: group keys torch's __setstate__ fills in for checkpoints that predate them
    _group_defaults: dict = {}

    @staticmethod
    def profile_hook_step(func):
        """torch's wrapper around every `step()` (installed by torch's `__init__`): the step
        pre- and post-hooks, global and per optimizer, in torch's order and with its
        protocol, and `_optimizer_step_code`, inside the profiler range
        ``Optimizer.step#<class>.step``.

        The range is opened with the profiler's C++ context manager, which records the same
        range (and costs nothing while no profiler is on): `torch.autograd.profiler
        .record_function` is 6 us of Python per step on this project's CPU, a quarter of a
        small model's whole step. A traced step keeps torch's own wrapper, which dynamo knows.
        """
        traced = torch.optim.Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling():
                return traced(*args, **kwargs)
            self = args[0]
            with _record_range(f"Optimizer.step#{type(self).__name__}.step"):
                for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                    result = pre_hook(self, args, kwargs)
                    if result is not None:
                        if not (isinstance(result, tuple) and len(result) == 2):
                            raise RuntimeError(
                                f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
                        args, kwargs = result
                out = func(*args, **kwargs)
                self._optimizer_step_code()
                for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                    post_hook(self, args, kwargs)
                return out

        return wrapper

    def __init__(self, params, defaults: dict[str, Any], *, backend: str = "auto"):
        self.backend = _backend.resolve(backend)
        # group index -> (the group's parameters when its buckets were built, the buckets)
        self._buckets: dict[int, tuple[tuple[Tensor, ...] | None, list[_flat.Bucket]]] = {}
        self._valid_groups: dict[int, tuple] = {}   # group index -> the values last validated
        self._slots: dict[int, tuple[int, int, int]] = {}  # id(p) -> (group, bucket, index)
        self._lazy: dict[int, list[Tensor]] = {}   # group index -> its parameters not yet materialized
        super().__init__(params, defaults)
        self.state = State(self)
        self._handle = _compile.register(self)  # names this optimizer to the fusedopt::step op

    # ------------------------------------------------------------------ layout

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            params = param_group.get("params")
            params = [params] if isinstance(params, Tensor) else params
            if not isinstance(params, set) and params is not None:
                params = param_group["params"] = list(params)   # (a generator is read once)
                _refuse_duplicates(params, len(self.param_groups))
        super().add_param_group(param_group)
        # Buckets are built lazily, at the next step or state access.

    def _group_buckets(self, gi: int) -> list[_flat.Bucket]:
        """The buckets of group gi, rebuilt if the group's parameters changed."""
        params = self.param_groups[gi]["params"]
        cached = self._buckets.get(gi)
        if cached is not None and gi in self.__dict__.get("_checked", ()):   # (inside `_sync_state`)
            return cached[1]
        if self._lazy and gi in self._lazy and not all(map(is_lazy, self._lazy[gi])):
            # A lazy module's parameter got its shape, in place (the same object): it joins
            # a bucket now, and state loaded for it before must fit that shape.
            self._check_materialized(gi)
        elif cached is not None and _same_objects(cached[0], params):
            buckets = cached[1]
            try:
                for b in buckets:
                    b.check_params()
                return buckets
            except _flat.StaleLayout:
                pass   # (state that no longer fits a new shape is kept aside: `_adopt`)
        return self._build_group(gi)

    def _check_materialized(self, gi: int) -> None:
        """Refuse state loaded for lazy parameters that does not fit the shape they were
        materialized with, before anything changes."""
        for p in self.param_groups[gi]["params"]:
            if is_lazy(p):
                continue
            entries = dict.get(self.state, p) or {}
            key = self._unfit_key(p, entries)
            if key is not None:
                raise RuntimeError(
                    f"parameter {self._global_index(p)} was materialized (a lazy module's first forward) with shape "
                    f"{tuple(p.shape)}; its optimizer state '{key}', loaded before, has shape "
                    f"{tuple(entries[key].shape)} and does not fit. help: load a state dict saved for this model")

    def _unfit_key(self, p: Tensor, entries: dict) -> str | None:
        """The first flat state kind in `entries` whose tensor does not have p's shape: state
        that no longer fits (p's `.data` given another shape after its state was made, or
        state set so), or None."""
        return next((key for key, value in entries.items()
                     if key in self._flat_state and isinstance(value, Tensor) and value.shape != p.shape), None)

    def _unfit_error(self, p: Tensor, state: dict) -> RuntimeError:
        key = self._unfit_key(p, state)
        return RuntimeError(
            f"parameter {self._global_index(p)} has shape {tuple(p.shape)} and its optimizer state '{key}' shape "
            f"{tuple(state[key].shape)}: the state no longer fits (the parameter changed shape after its state was "
            "created?), and torch's update refuses it. help: build a new optimizer after changing parameter shapes, "
            "or start this parameter's state afresh with `del opt.state[p]`")

    def _global_index(self, p: Tensor) -> int:
        return next(i for i, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)) if q is p)

    def _build_group(self, gi: int) -> list[_flat.Bucket]:
        """(Re)build group gi's buckets, carrying over any state its parameters have."""
        group = self.param_groups[gi]
        _refuse_duplicates(group["params"], gi)   # (a list edited after construction)
        self._refuse_shared(gi)
        carried = {p: _carried(dict.get(self.state, p)) for p in group["params"] if dict.get(self.state, p)}
        # State loaded and not yet checked against its parameter stays to be checked.
        old = self._buckets.get(gi)
        pending = {id(b.params[i]): loaded for b in old[1] for i, loaded in b.unchecked.items()} if old else {}
        buckets = []
        for bi, (params, positions) in enumerate(_flat.split_group(group["params"])):
            # torch keeps `step` on the parameter's device for fused and capturable groups
            # (so a GradScaler-skipped step can be taken back without a host sync).
            on_device = self._scalars_on_param_device or group.get("fused") or group.get("capturable")
            scalar_device = _flat.local(params[0]).device if on_device else None
            # torch's scalar state dtype: float64 under a float64 default dtype, except
            # for fused groups (torch.optim.optimizer._get_scalar_dtype)
            scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not group.get("fused") \
                else torch.float32
            bucket = _flat.Bucket(params, positions, scalar_device=scalar_device, scalar_dtype=scalar_dtype)
            bucket.path = self._choose_path(bucket.device, bucket.dtype)
            for i, p in enumerate(params):
                self._slots[id(p)] = (gi, bi, i)
            buckets.append(bucket)
        self._buckets[gi] = (tuple(group["params"]), buckets)
        # A parameter's state lives in one bucket: the buckets cached for another group index
        # that held one of these parameters when they were built (groups reordered, a
        # parameter moved between groups) would step it there, on state it no longer has.
        # They are rebuilt when next used (from the state that is now here), and kept until
        # then for the loaded state they have yet to check.
        mine = set(map(id, group["params"]))
        for gj, (held, old_buckets) in list(self._buckets.items()):
            if gj != gi and held is not None and not mine.isdisjoint(map(id, held)):
                self._buckets[gj] = (None, old_buckets)
        lazy = [p for p in group["params"] if is_lazy(p)]
        if lazy:
            self._lazy[gi] = lazy
        else:
            self._lazy.pop(gi, None)
        cast = {}
        for p, entries in carried.items():
            # (into the entry itself: torch's stays the same dict while the list changes)
            into = dict.get(self.state, p)
            into = into if isinstance(into, ParamState) and into._owner is not None else None
            kinds = self._adopt(p, entries, into=into, carried=pending.get(id(p), False))
            if kinds:
                cast[p] = kinds
        if cast:
            self._warn_state_cast(cast)
        for b in buckets:
            b.state_uses = b.storage_uses()
        return buckets

    def _refuse_shared(self, gi: int) -> None:
        """torch refuses a parameter in two groups when the groups are made (and fusedopt with
        it); one appended to a group's list afterwards torch steps once per group, with one
        state. A parameter's state lives in one bucket, so that is refused here, before
        anything changes, as a parameter listed twice in one group is. The slots say which
        group built each parameter last: one look-up a parameter, the other group's list
        read only where they differ (a parameter moved between groups, a reused id)."""
        groups = self.param_groups
        for p in groups[gi]["params"]:
            slot = self._slots.get(id(p))
            if slot is not None and slot[0] != gi and slot[0] < len(groups) and \
                    any(q is p for q in groups[slot[0]]["params"]):
                first, second = sorted((gi, slot[0]))
                raise ValueError(
                    f"fusedopt: parameter groups {first} and {second} share a parameter; torch.optim refuses that when "
                    "the groups are made, and steps such a parameter once per group when a group's list is edited "
                    "afterwards. help: list each parameter in one group")

    def _choose_path(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        # On the CPU, 'auto' runs torch's own implementation on the flat state (_native.py).
        native = "native" if _native.implementation(type(self)) is not None else None
        return _backend.choose_path(self.backend, device, cpu_fast_path=native)

    def _slot(self, p: Tensor) -> tuple[int, _flat.Bucket, int] | None:
        """p's (group index, bucket, index in it), its group's buckets rebuilt first if its
        parameters changed; None for a parameter in no bucket."""
        slot = self._slots.get(id(p))
        if slot is None:
            return None
        gi = slot[0]
        if gi < len(self.param_groups):
            buckets = self._group_buckets(gi)
            slot = self._slots[id(p)]
            # The slot of a parameter taken out of its group's list, or moved to a group not
            # rebuilt since (or of a freed tensor whose id a new one has), is stale: the
            # buckets no longer hold it there. (Its state is then kept as given, and carried
            # into the buckets of a group it joins when they are built.)
            if slot[0] == gi and slot[1] < len(buckets) and slot[2] < len(buckets[slot[1]].params) and \
                    buckets[slot[1]].params[slot[2]] is p:
                return gi, buckets[slot[1]], slot[2]
        del self._slots[id(p)]
        return None

    # ------------------------------------------------------------------ state

    def _adopt(self, p: Tensor, entries: dict, into: ParamState | None = None,
               carried: bool | None = None) -> dict[str, torch.dtype] | None:
        """Make `entries` p's state: flat kinds are copied into p's segments, numbers for
        scalar kinds into their vectors; anything else is kept as given. `into`: the
        `ParamState` to refill (`entries` itself, after outside code changed it).
        `carried`: None for state from outside; else the state is this optimizer's own,
        carried into a rebuilt bucket (a parameter's dtype or device changed), and says
        whether it was loaded and not yet checked (`_check_loaded`). Returns the old dtypes
        of carried state kinds that were cast to the parameter's new dtype."""
        slot = self._slot(p) if isinstance(p, Tensor) else None
        if slot is None or not isinstance(entries, dict):
            dict.__setitem__(self.state, p, entries)
            return
        gi, bucket, i = slot
        # New views outside a step (an entry edited, loaded, carried): compared one by one at
        # the next step, in case a view moved in the same interval (`_reattach_state`).
        bucket.state_uses = None
        if not bucket.sharded and self._unfit_key(p, entries) is not None:
            self._keep_unfit(p, bucket, i, entries, into, carried is not None)
            return
        items = list(entries.items())
        if into is None:
            state = ParamState()
            state.sparse_dim = getattr(entries, "sparse_dim", None)
        else:
            state = into
            dict.clear(state)
        state.bind(self, p)
        state.unfit = False
        flat = False
        cast: dict[str, torch.dtype] = {}
        for key, value in items:
            if key in self._scalar_state and isinstance(value, (Tensor, numbers.Real)):
                vec = bucket.scalar(key)
                if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != vec.dtype and \
                        (value.dtype == torch.float64 or key != "step"):
                    vec = self._retype_scalar(bucket, key, value.dtype)
                vec[i] = as_float(value, key)
                dict.__setitem__(state, key, _same_object(value, vec[i], carried is not None or self._own(value)))
                flat = True
            elif key in self._flat_state and isinstance(value, Tensor):
                bucket.buffer(key, self._buffer_dtype(bucket, key))
                view = bucket.view(key, i)
                value = _flat.shard_like(value, p) if bucket.sharded else value
                if bucket.sharded and value.shape != view.shape:
                    raise ValueError(f"state '{key}' has a local shard of shape {tuple(value.shape)}; "
                                     f"this rank's shard of the parameter has shape {tuple(view.shape)}")
                # torch's SGD keeps a sparse gradient's momentum buffer sparse: its values,
                # zeros elsewhere, are the flat segment's (and it is exported sparse again)
                if value.layout is torch.sparse_coo:
                    state.sparse_dim = value.sparse_dim()
                    value = value.to_dense()
                if not (value.data_ptr() == view.data_ptr() and value.stride() == view.stride()):
                    view.copy_(value.detach())   # (state set to `p * 0` must not join p's graph)
                if carried is not None and value.dtype != view.dtype:
                    cast[key] = value.dtype
                dict.__setitem__(state, key, _same_object(value, bucket.state_view(key, i),
                                                          carried is not None or self._own(value)))
                flat = True
            elif value is None and key in self._optional_state:
                continue   # torch starts such state afresh (SGD's momentum_buffer = None)
            else:
                dict.__setitem__(state, key, value)
        bucket.initialized[i] = flat
        bucket.state_keys = None   # the next step checks every parameter's keys (`_buffers`)
        dict.__setitem__(self.state, p, state)
        return cast

    def _own(self, value) -> bool:
        """Whether `value` was one of this optimizer's state tensors before `__setstate__`
        replaced its buffers (`_same_object`)."""
        return id(value) in self.__dict__.get("_own_views", ())

    def _warn_state_cast(self, cast: dict[Tensor, dict[str, torch.dtype]]) -> None:
        """Parameters changed dtype (`model.half()`, `.double()`) after their state was made:
        the state is cast with them, into their new buckets. torch keeps existing state in
        its old dtype and, where its step accepts the mix (SGD's momentum, Adagrad, RMSprop,
        Adadelta, Rprop, ASGD), computes in that dtype: the numbers differ, and fp16 state
        can fail where fp32 state does not (Adagrad's eps of 1e-10 is 0 in fp16: 0/0 where a
        gradient is 0). A bucket holds one state dtype, so this is said rather than matched."""
        named = [f"parameter {self._global_index(p)} ({', '.join(f'{k}: {d} to {p.dtype}' for k, d in kinds.items())})"
                 for p, kinds in cast.items()]
        listed = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        warnings.warn(
            f"fusedopt: parameters changed dtype after their optimizer state was created, and their state is cast "
            f"with them: {listed}. torch.optim keeps existing state in its old dtype, so the numbers differ "
            "from its. help: change the model's dtype before creating the optimizer (Adagrad makes its state then)",
            UserWarning, stacklevel=user_stacklevel())

    def _keep_unfit(self, p: Tensor, bucket: _flat.Bucket, i: int, entries: dict, into: ParamState | None,
                    carried: bool) -> None:
        """Keep state that does not fit p's shape as it is, out of the flat buffers, as
        torch keeps it: p is skipped while it has no gradient (a frozen layer given new
        storage of another shape), the other parameters step on, `state_dict` saves the
        state as it is, and a step that would update p raises before anything changes
        (`_check_state`), where torch's update raises on the shapes. `del opt.state[p]`
        starts p afresh; state that fits again (assigned, or p given back its shape) is
        adopted into the flat buffers. Carried state (views of the buffers of the bucket
        being rebuilt) is copied, so that those buffers can be freed."""
        if into is None:
            state = ParamState({k: v.clone() if carried and isinstance(v, Tensor) else v for k, v in entries.items()})
            state.sparse_dim = getattr(entries, "sparse_dim", None)
        else:
            state = into
            if carried:   # (the entry's own tensors, given memory of their own: the same objects)
                dict.clear(state)
                dict.update(state, entries)
                for v in dict.values(state):
                    let_go(v)
        state.bind(self, p)
        state.unfit = True
        bucket.initialized[i] = False
        bucket.state_keys = None   # (`_check_state` looks at the entry every step while it is so)
        dict.__setitem__(self.state, p, state)

    def _check_loaded(self, bucket: _flat.Bucket, batch: _flat.Batch) -> None:
        """Check state that came from outside against the parameters about to be stepped
        (`bucket.unchecked`), once: at the first step after it came, when the model has
        been loaded too, whichever was loaded first. No state of the base class needs it."""
        bucket.unchecked.clear()

    def _retype_scalar(self, bucket: _flat.Bucket, key: str, dtype: torch.dtype) -> Tensor:
        """Give a scalar kind's vector the dtype of loaded state. torch creates NAdam's
        mu_product and ASGD's eta and mu in its scalar dtype but casts loaded state to the
        parameter's dtype, so after a checkpoint a bf16 parameter's are bf16 and an fp64
        one's fp64, and so is their later arithmetic (a loaded fp64 step stays fp64 too);
        the bucket's one vector follows. The views already handed out are re-pointed."""
        vec = bucket.scalars[key].to(dtype)
        bucket.scalars[key] = vec
        bucket.buffers_changed()
        for j, q in enumerate(bucket.params):
            state = dict.get(self.state, q)
            if state is not None and isinstance(state.get(key), Tensor):
                dict.__setitem__(state, key, vec[j])
        return vec

    def _forget(self, p: Tensor) -> None:
        slot = self._slot(p)
        if slot is not None:
            slot[1].initialized[slot[2]] = False

    def _sync_state(self) -> None:
        """Adopt a state dict that outside code put in place of ours (`opt.state = ...`)."""
        if isinstance(self.state, State) and self.state.owner is self:
            return
        foreign, self.state = self.state, State(self)
        # Each parameter's adoption looks its bucket up (`_slot`); the groups' buckets are
        # checked once here, not again for every parameter (that made a load quadratic in
        # the parameter count: 1.5 s for 1600 tensors, against torch's 48 ms).
        self._checked = set()
        try:
            for gi in range(len(self.param_groups)):
                for b in self._group_buckets(gi):
                    b.initialized = [False] * len(b)
                self._checked.add(gi)
            for p, entries in foreign.items():
                if entries:
                    copied = dict(entries)
                    if getattr(entries, "sparse_dim", None) is not None:   # carry the mark (ParamState)
                        copied = ParamState(copied)
                        copied.sparse_dim = entries.sparse_dim
                    self._adopt(p, copied)
        finally:
            del self._checked
        for gi in range(len(self.param_groups)):
            for b in self._group_buckets(gi):
                b.state_uses = b.storage_uses()
        # torch steps the tensors of a state dict put in place of its own in place, and code
        # relies on that (`torch.optim.swap_in_optimizer_params_and_state`: "in-place tensor
        # edits propagate back"). Their values now live in flat buffers: each step writes
        # them back (`_write_back`) while this adoption is `opt.state`, and while someone
        # still holds them: held weakly, the tensors of a dict nobody keeps (what
        # `load_state_dict` loaded from a checkpoint the caller dropped, a copy's or an
        # unpickled optimizer's state) are freed at once instead of doubling the state's
        # memory for as long as the optimizer lives, and are not copied into every step.
        back = [(p, key, weakref.ref(t)) for p, entries in foreign.items() if entries
                for key, t in entries.items() if isinstance(t, Tensor) and t.layout is torch.strided]
        self._written_back = (self.state, back) if back else None

    def _write_back(self) -> None:
        """Copy the state a step updated into the dense tensors of the dict it was adopted
        from (`_sync_state`), while that adoption is still `opt.state`. (Not into a sparse
        one, SGD's momentum buffer as torch keeps it for sparse gradients: fusedopt keeps it
        dense, and a dense value cannot be copied into a sparse tensor.)"""
        adopted, back = self._written_back
        if adopted is not self.state:
            self._written_back = None
            return
        held = False
        for p, key, ref in back:
            t = ref()
            if t is None:
                continue
            held = True
            own = dict.get(dict.get(adopted, p) or {}, key)
            if isinstance(own, Tensor) and own is not t and own.shape == t.shape:
                t.copy_(own)
        if not held:
            self._written_back = None

    def _init_state(self, group: dict, bucket: _flat.Bucket, fresh: list[int]) -> None:
        """Create torch's initial state for parameters stepped for the first time."""
        keys = self._state_keys(group)
        if not keys:  # stateless (SGD without momentum): torch keeps no entry at all
            return
        bucket.views_made = True
        for i in fresh:
            state = self.state[bucket.params[i]]
            for key in keys:
                if key in self._scalar_state:
                    vec = bucket.scalar(key)
                    vec[i] = self._initial_scalar(group, key)
                    set_view(state, key, vec[i])
                else:
                    bucket.buffer(key, self._buffer_dtype(bucket, key))
                    bucket.segment(key, i).fill_(self._initial_fill(group, key))
                    set_view(state, key, bucket.state_view(key, i))
            bucket.initialized[i] = bool(keys)

    def _allocate_state(self, group: dict, bucket: _flat.Bucket) -> None:
        """Allocate the state the group's options need in a bucket, before any step fills
        it (when dynamo traces a step: `_compile.TracedStep._prepare_state`)."""
        for key in self._state_keys(group):
            if key in self._scalar_state:
                bucket.scalar(key)
            else:
                bucket.buffer(key, self._buffer_dtype(bucket, key))

    def _check_sparse(self, group: dict, bucket: _flat.Bucket) -> None:
        """Raise, as torch would, when the group's options cannot step a sparse gradient;
        called before anything changes."""
        if bucket.sharded:
            raise RuntimeError(f"fusedopt.{type(self).__name__}: sparse gradients of DTensor parameters are not supported")
        if group.get("fused"):
            raise RuntimeError(f"fusedopt.{type(self).__name__}(fused=True) does not support sparse gradients, as torch's "
                               "fused kernels do not. help: fused=False")

    def _refuse_fused(self, bucket: _flat.Bucket, i: int) -> None:
        """torch's fused kernels take floating-point parameters only, and torch checks that
        when it steps such a parameter (`_device_dtype_check_for_fused`); fusedopt's kernels
        could step complex ones, but `fused=True` must refuse what torch's refuses, with its
        exception type, at its moment. Called before anything changes."""
        p = bucket.params[i]
        raise RuntimeError(
            f"fusedopt.{type(self).__name__}(fused=True) requires floating-point parameters, as torch's fused "
            f"kernels do; parameter {self._global_index(p)} is {p.dtype} on {p.device.type}. help: fused=False "
            "(complex parameters step without it)")

    def _refuse_integer(self, bucket: _flat.Bucket, i: int) -> None:
        """torch's step refuses an integer parameter (a gradient set by hand): its ops cannot
        write a float update into it (RuntimeError; NotImplementedError, a kind of it, from
        some). The native path runs torch's own code, which raises that; the reference and
        the kernels would truncate the update into it and keep integer state, so they raise
        here, before anything changes."""
        p = bucket.params[i]
        raise RuntimeError(
            f"fusedopt.{type(self).__name__} cannot step parameter {self._global_index(p)} of dtype {p.dtype}: "
            "torch.optim's step refuses integer parameters too. help: make it a floating-point parameter")

    def _refuse_overlapping_grads(self, bucket: _flat.Bucket, batch: _flat.Batch) -> None:
        """A GradScaler step (fused=True) writes the unscaled gradients back, as torch's fused
        kernels do; a gradient whose elements share memory (an expanded tensor put in `.grad`)
        cannot take that write: torch's in-place ops refuse it with RuntimeError (GradScaler's
        own unscale_, for an optimizer without fused=True), and torch's fused CPU kernels read
        and write past it. Refused here, before anything changes; only a staged gradient (not
        dense with its parameter's strides) can be one."""
        for i, g in zip(batch.index, batch.user_grads):
            if not g.is_contiguous() and torch._debug_has_internal_overlap(g) == 1:
                raise RuntimeError(
                    f"parameter {self._global_index(bucket.params[i])}'s gradient has elements that share memory "
                    f"(shape {tuple(g.shape)}, stride {g.stride()}): GradScaler's step with fused=True writes the "
                    "unscaled gradient back into it, an in-place write torch refuses for such a tensor. "
                    "help: assign a clone() of it to .grad")

    def _refuse_shared_memory(self, bucket: _flat.Bucket, batch: _flat.Batch | None,
                              sparse: list[tuple[int, Tensor]] | None) -> None:
        """Two parameters that share memory (views of one tensor, `nn.Parameter(w[:6])` beside
        `nn.Parameter(w[4:])`) and both have a gradient: torch.optim's for-loop updates one,
        then the other from the first's result; its foreach and fused paths order the writes
        differently again (torch's fused CUDA kernels race). A fused step updates a bucket's
        parameters at once: on a GPU the two writes would race, and the reference path would
        keep one update of the two. Refused here, before anything changes, rather than give
        numbers that depend on the path; a parameter that shares memory but has no gradient
        this step is stepped by no one, and not refused. A parameter whose own elements share
        memory (an expanded tensor) is refused too, with the RuntimeError torch.optim raises
        only after updating the parameters before it (`_flat.shared_memory` lists it as (i, i))."""
        stepped = set(batch.index if batch is not None else ()).union(i for i, _ in sparse or ())
        for i, j in bucket.shared:
            if i in stepped and j in stepped:
                first, second = self._global_index(bucket.params[i]), self._global_index(bucket.params[j])
                if i == j:
                    # torch.optim raises this (its in-place update's RuntimeError) only when it
                    # reaches the parameter, having updated the ones before it.
                    p = _flat.local(bucket.params[i])
                    raise RuntimeError(
                        f"fusedopt: parameter {first} has elements that share memory (shape {tuple(p.shape)}, "
                        f"stride {p.stride()}, an expanded tensor): an in-place update cannot write it, and "
                        "torch.optim raises for it too. help: make the parameter from a clone() of the tensor")
                raise ValueError(
                    f"fusedopt: parameters {first} and {second} share memory (views of one tensor) and both have "
                    "a gradient; a fused step updates them at once, where torch.optim updates one after the other "
                    "(so the shared elements take both updates in an order that depends on torch's path). "
                    "help: give each parameter its own memory (clone() it), or tie weights by using one Parameter")

    def _sparse_update(self, group: dict, bucket: _flat.Bucket, sparse: list[tuple[int, Tensor]],
                       fresh: list[int]) -> None:
        """Step the bucket's parameters whose gradients are sparse ((position, gradient)
        pairs; `fresh` those on their first step, their state just created)."""
        raise NotImplementedError

    def _state_keys(self, group: dict) -> list[str]:
        """The state a parameter gets on its first step, in torch's key order."""
        raise NotImplementedError

    def _initial_scalar(self, group: dict, key: str) -> float:
        """The first value of a per-parameter scalar state kind (0 for `step`)."""
        return 0.0

    def _initial_fill(self, group: dict, key: str) -> float:
        """The value a flat state kind starts at (0; Adagrad's `sum`, Rprop's `step_size` differ)."""
        return 0.0

    def _buffer_dtype(self, bucket: _flat.Bucket, key: str) -> torch.dtype | None:
        """The dtype of a flat state kind's buffer; None: the parameters' real dtype (torch's)."""
        return None

    def _buffers(self, group: dict, bucket: _flat.Bucket, batch: _flat.Batch) -> dict[str, Tensor]:
        """The flat buffers the update reads, checking the stepped tensors have them."""
        all_keys = self._state_keys(group)
        if all_keys and tuple(all_keys) != getattr(bucket, "state_keys", None):
            self._check_state(bucket, batch, all_keys)
        return {k: bucket.buffer(k, self._buffer_dtype(bucket, k)) for k in all_keys if k not in self._scalar_state}

    def _check_state(self, bucket: _flat.Bucket, batch: _flat.Batch | None, all_keys: list[str],
                     sparse: list[tuple[int, Tensor]] | None = None) -> None:
        """Raise, as torch's step would, when a stepped parameter's state lacks a kind its
        group's options need (an option such as amsgrad turned on after its first step, a
        key removed or replaced by outside code); nothing has changed yet. When every
        parameter with state has them all, the bucket remembers the keys and later steps
        skip this (`_adopt` forgets them)."""
        stepped = set(batch.index) if batch is not None else set()
        stepped.update(i for i, _ in sparse or ())
        complete = True
        for i, p in enumerate(bucket.params):
            if not bucket.initialized[i]:
                # torch creates a parameter's state only while its entry is empty (`if
                # len(state) == 0`): an entry given other keys before the first step
                # (`opt.state[p]["note"] = ...`) makes that step look its state up, and fail.
                state = dict.get(self.state, p)
                if state:
                    missing = next((k for k in all_keys if k not in self._optional_state and k not in state), None)
                    if missing is not None:
                        complete = False
                        if i in stepped:
                            raise KeyError(
                                f"parameter {self._global_index(p)} has no optimizer state {missing!r}: its entry in "
                                f"opt.state holds {sorted(map(str, state))} only, and torch creates a parameter's "
                                "state only while its entry is empty. help: leave opt.state[p] empty until its first "
                                "step, or pop the other keys")
                    elif getattr(state, "unfit", False):   # (`_keep_unfit`)
                        complete = False
                        if i in stepped:
                            raise self._unfit_error(p, state)
                continue
            state = dict.get(self.state, p, {})
            wrong = next((k for k in all_keys if not isinstance(state.get(k), Tensor)), None)
            if wrong is None:
                continue
            complete = False
            if i not in stepped:
                continue
            index = self._global_index(p)
            if wrong not in state:
                raise KeyError(
                    f"parameter {index} has no optimizer state {wrong!r}, which this group's options need (was an "
                    f"option such as amsgrad turned on after its first step, or the key removed from opt.state?)")
            raise TypeError(f"parameter {index}'s optimizer state {wrong!r} is {state[wrong]!r}; expected a tensor")
        if complete:
            bucket.state_keys = all_keys if isinstance(all_keys, tuple) else tuple(all_keys)

    # ------------------------------------------------------------------ step

    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return self._traced_step(closure)
        # torch.no_grad() as the C switch it wraps: the context manager object is 1.5 us a
        # step of Python (torch's own optimizers switch grad mode this way too).
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            # (each call a step skips is one Python frame less to run with a cold cache)
            loss = None if closure is None else self._evaluate(closure)
            self._step_body(self.param_groups, None,
                            self._amp_inputs() if getattr(self, "_step_supports_amp_scaling", False) else None)
        finally:
            torch._C._set_grad_enabled(enabled)
        return loss

    def _step_body(self, groups: list[dict], grads: dict[int, Tensor | None] | None, amp) -> None:
        """Everything a step does after the closure: eagerly, or inside the `fusedopt::step` op.

        `groups` are the param groups, or copies of them holding the op's hyperparameters;
        `grads` maps id(param) to the gradient to use instead of `param.grad` (None: read
        `.grad`); `amp` is GradScaler's (grad_scale, found_inf) or None.
        """
        state = self.state
        if state.__class__ is not State or state.owner is not self:
            self._sync_state()
        if len(self._buckets) > len(groups) or len(self._valid_groups) > len(groups):
            # Groups deleted (`del opt.param_groups[i]`): what is cached past the last index
            # would keep their flat buffers, the state torch frees with its entries, and
            # (the values last validated) their parameters.
            for cache in (self._buckets, self._valid_groups, self._lazy):
                for gi in [gi for gi in cache if gi >= len(groups)]:
                    del cache[gi]
        clipped = self._clip_inputs(amp, grads) if self.max_grad_norm is not None else None
        # Every bucket's batch first: a gradient that cannot be stepped (a sparse one an
        # option refuses) raises before any parameter or state has changed.
        work = []
        for gi, group in enumerate(groups):
            collected = []
            for bucket in self._group_buckets(gi):
                self._reattach_state(bucket)
                sparse = [] if self._steps_sparse else None
                if clipped is not None:
                    batch = clipped[0].get(id(bucket))
                else:
                    batch = bucket.collect(self._sparse_error, None if grads is None else [grads[id(p)] for p in bucket.params],
                                           sparse)
                if batch is not None or sparse:
                    collected.append((bucket, batch, sparse))
            if not collected:
                # torch checks a group's options as it steps the group's parameters: one
                # with no gradient this step raises nothing (a tensor lr under foreach=True
                # is refused only with a parameter to step)
                continue
            keys = self._validate_group(gi, group)
            for bucket, batch, sparse in collected:
                if group.get("fused") and not bucket.dtype.is_floating_point:
                    self._refuse_fused(bucket, batch.index[0] if batch is not None else sparse[0][0])
                elif not (bucket.dtype.is_floating_point or bucket.dtype.is_complex) and bucket.path != "native":
                    self._refuse_integer(bucket, batch.index[0] if batch is not None else sparse[0][0])
                if amp is not None and amp[0] is not None and batch is not None and batch.user_grads is not None:
                    self._refuse_overlapping_grads(bucket, batch)
                if bucket.shared:
                    self._refuse_shared_memory(bucket, batch, sparse)
                if sparse:
                    self._check_sparse(group, bucket)
                if keys and getattr(bucket, "state_keys", None) is not keys:
                    self._check_state(bucket, batch, keys, sparse)
                if self._check_steps is not None:
                    self._check_steps(group, bucket, batch, sparse)
                work.append((group, bucket, batch, sparse))
        if len(work) > 1:
            self._create_state_in_order(groups, work)
        averaging = self._attached.begin() if self._attached is not None else None
        for group, bucket, batch, sparse in work:
            if sparse:
                fresh = [i for i, _ in sparse if not bucket.initialized[i]]
                if fresh:
                    self._init_state(group, bucket, fresh)
                self._sparse_update(group, bucket, sparse, fresh)
            if batch is not None:
                if bucket.unchecked:
                    self._check_loaded(bucket, batch)
                # Without state (SGD without momentum) nothing is fresh: no per-tensor lists
                # every step for a bucket that never becomes initialized.
                fresh = [] if all(bucket.initialized) or not self._state_keys(group) else \
                    [i for i in batch.index if not bucket.initialized[i]]
                if fresh:
                    self._init_state(group, bucket, fresh)
                if clipped is not None:
                    # In the compute dtype, so that an fp64 bucket's coefficient is not rounded to fp32.
                    cdt = _launch.compute_dtype(bucket.real_dtype)
                    if bucket.path == "native":
                        batch.host_ops = _launch.host_grad_ops(*(amp or (None, None)), clipped[1], cdt)
                    if batch.host_ops is None:
                        batch.grad_ops = _launch.grad_ops_tensor(bucket.device, *(amp or (None, None)),
                                                                 multiplier=clipped[1], dtype=cdt)
                elif amp is not None:
                    batch.grad_ops = _launch.grad_ops_tensor(bucket.device, *amp)
                unscale = amp is not None and amp[0] is not None
                batch.unscale = unscale
                if averaging is not None:
                    batch.average = averaging.fuse(self, bucket, batch)
                # The native path declines what it cannot run (then the reference steps).
                if not (bucket.path == "native" and _native.step(self, group, bucket, batch, fresh)):
                    if batch.host_ops is not None:
                        batch.grad_ops = torch.tensor(batch.host_ops, dtype=_launch.compute_dtype(bucket.real_dtype))
                    self._update(group, bucket, batch, fresh)
                if unscale:
                    batch.leave_unscaled(*amp)
                if amp is not None and amp[1] is not None:
                    self._undo_steps(bucket, batch, amp[1])
                    if fresh:
                        self._skipped_first_step(group, bucket, fresh, amp[1])
                if batch.writeback:
                    batch.finish()
                # torch.optim's default paths update parameters with in-place ops, which bump
                # autograd's version counters: a graph that saved a parameter before the step
                # then refuses a backward after it ("modified by an inplace operation"). The
                # kernels write through pointers and torch's fused CPU ops bump nothing, so
                # that backward silently used the new values. (A no-op for inference tensors.)
                torch._C._increment_version(bucket.params if batch.everyone else
                                            [bucket.params[i] for i in batch.index])
            if bucket.views_made:   # (new state, a new plan: counted before the user can move any)
                bucket.views_made = False
                bucket.state_uses = bucket.storage_uses()
        if averaging is not None:
            averaging.finish()
        if self.__dict__.get("_written_back") is not None:
            self._write_back()

    def _reattach_state(self, bucket: _flat.Bucket) -> None:
        """Take back state tensors given other memory through `.data` since the last step.

        torch steps the tensors in `opt.state` themselves, so `v.data = v.data.to(device)`
        on them (the widely copied `optimizer_to` helper; a round trip to the CPU and back to
        save a checkpoint) leaves torch stepping the same objects. Here they are views of
        the flat buffers: given other memory, the step went on updating the buffers while
        `opt.state` and `state_dict()` showed the copies, stale, and an edit to them (a reset
        of the moments) never reached the step. A view letting go shows as a buffer held by
        fewer tensors (`Bucket.storage_uses`); then every view is compared with its segment,
        and one that moved is copied in and made a view of it again: the same object, as
        torch's is. (A user's own view of the state made in the same interval can hide the
        drop: the count is a filter, one C call a buffer, not a proof.)"""
        watched = bucket._watched   # (inline of `storage_uses`: every bucket pays this each step)
        uses = list(map(_flat.use_count, watched[1])) if watched is not None else bucket.storage_uses()
        seen = bucket.state_uses
        if uses != seen:
            if seen is None or any(map(operator.lt, uses, seen)):
                self._reattach(bucket)
                uses = bucket.storage_uses()
            bucket.state_uses = uses   # (up too: a view the user made since counts)

    def _reattach(self, bucket: _flat.Bucket) -> None:
        if bucket.sharded:
            return   # (DTensor state: `.data` of the DTensor, not of its local view)
        moved = []
        for i, p in enumerate(bucket.params):
            entry = dict.get(self.state, p)
            if not isinstance(entry, ParamState) or entry.unfit or not bucket.initialized[i]:
                continue
            for key, t in entry.items():
                if not isinstance(t, Tensor):
                    continue
                if key in bucket.buffers and key in self._flat_state:
                    home = bucket.view(key, i)
                elif key in bucket.scalars and key in self._scalar_state:
                    home = bucket.scalars[key][i]
                else:
                    continue
                if t.device == home.device and t.data_ptr() == home.data_ptr():
                    continue
                if t.shape != home.shape or t.device != home.device:
                    # torch's step raises on such state (its ops pair shapes and devices)
                    raise RuntimeError(
                        f"parameter {self._global_index(p)}'s optimizer state '{key}' was given other memory through "
                        f".data, of shape {tuple(t.shape)} on {t.device}; the parameter's is {tuple(home.shape)} on "
                        f"{home.device}. help: move the state with the parameters (torch's step refuses the mix too)")
                moved.append((t, home))
        for t, home in moved:
            home.copy_(t.detach())
            t.data = home

    def _create_state_in_order(self, groups: list[dict], work: list) -> None:
        """Create the (empty) entries of the parameters this step steps for the first time
        in their groups' order. torch creates a parameter's state as its `_init_group` walks
        group["params"], and that order is `opt.state`'s and `state_dict()["state"]`'s; the
        buckets (one per dtype and device) would fill them bucket by bucket."""
        fresh = set()
        for group, bucket, batch, sparse in work:
            if all(bucket.initialized) or not self._state_keys(group):
                continue
            stepped = chain(batch.index if batch is not None else (), (i for i, _ in sparse or ()))
            fresh.update(id(bucket.params[i]) for i in stepped if not bucket.initialized[i])
        if len(fresh) < 2:
            return
        state = self.state
        for group in groups:
            for p in group["params"]:
                if id(p) in fresh and p not in state:
                    state[p]   # (`State.__missing__` makes the entry; `_init_state` fills it)

    def _validate_group(self, gi: int, group: dict) -> tuple[str, ...]:
        """Raise what the group's options raise (an lr or another numeric option of None or
        a string, a tensor of several elements), before any group is stepped: torch fails on such a value when
        it reaches that group, after stepping the groups before it. Returns the group's
        state keys, one tuple object while the group's values stay the values last
        validated, compared by identity (a scheduler's new lr each step costs one more
        check, a steady step one tuple)."""
        values = tuple(group.values())
        seen = self._valid_groups.get(gi)
        if seen is not None and len(seen[0]) == len(values) and all(map(operator.is_, seen[0], values)):
            return seen[1]
        self._check_group(group)
        # torch steps a differentiable group added later; the kernels here would step it
        # without a graph, which is refused at construction for the same reason
        refuse_differentiable(group.get("differentiable"))
        if not group.get("capturable"):   # (a capturable group's tensors are read on the device)
            check_numbers(self._options(group), gi)
            if not self._lr_seeds_state:
                as_float(group.get("lr", 0.0), "lr")
        keys = tuple(self._state_keys(group)) if self._flat_state else ()
        if seen is not None and seen[1] == keys:
            keys = seen[1]   # the same object: buckets that checked it need not again
        self._valid_groups[gi] = values, keys
        return keys

    def _check_group(self, group: dict) -> None:
        """Raise what torch's step raises for a combination of a group's options that its
        constructor would have refused (a group added or edited later); nothing has
        changed yet. The algorithms torch checks at the step override this."""

    def attach_averaged_model(self, averaged_model, model: torch.nn.Module | None = None) -> None:
        """fusedopt only: update `averaged_model` inside every `step()` from now on.

        Each step then ends as if ``averaged_model.update_parameters(model)`` were called
        after it, with the same numbers; where a parameter's update runs in a Triton kernel
        (every algorithm but SparseAdam and LBFGS), the kernel averages the new value in the
        same pass: one launch and one read of the parameter fewer. Parameters without a
        gradient this step, parameters this optimizer does not hold, and buffers are
        averaged (or copied) after the step, as update_parameters would.

        Args:
            averaged_model: a :class:`fusedopt.swa.AveragedModel` built with the default
                (SWA) average or one of the ``get_ema_*``/``get_swa_*`` functions; ``None``
                detaches the one attached.
            model: the model it averages (default: the one it was built from).

        A step GradScaler skips with ``fused=True`` still averages (the unchanged
        parameters), as ``scaler.step(opt)`` then ``update_parameters`` would; without
        ``fused=True`` GradScaler does not call ``step()`` on such an iteration, so nothing
        is averaged. The attachment is not part of ``state_dict()``, copies or pickles.
        ``averaged_model.n_averaged`` is read every step on the CPU; on a GPU (where a read
        is a sync) again only after it changed by an in-place op on the tensor itself
        (``fill_``, ``zero_``, ``copy_``) or was replaced: a write through ``.data`` is
        not seen there.
        """
        from .swa import AveragedModel
        from .swa._averages import average_of
        from ._fused_average import AttachedAverage

        if averaged_model is None:
            self._attached = None
            return
        if not isinstance(averaged_model, AveragedModel):
            raise TypeError(f"attach_averaged_model expects a fusedopt.swa.AveragedModel, got "
                            f"{type(averaged_model).__name__}")
        model = averaged_model.source_model() if model is None else model
        if model is None:
            raise ValueError("the model this AveragedModel was built from no longer exists (or it was copied or "
                             "unpickled); pass it: attach_averaged_model(averaged_model, model)")
        function = averaged_model.multi_avg_fn if averaged_model.multi_avg_fn is not None else averaged_model.avg_fn
        if function is not None and average_of(function) is None:
            raise ValueError(f"attach_averaged_model needs a built-in average (the default, get_ema_multi_avg_fn, "
                             f"get_ema_avg_fn, get_swa_multi_avg_fn, get_swa_avg_fn); this AveragedModel averages "
                             f"with {getattr(function, '__qualname__', function)!r}. "
                             "help: call averaged_model.update_parameters(model) after step() instead")
        held = {id(p) for group in self.param_groups for p in group["params"]}
        if not any(id(p) in held for p in model.parameters()):
            raise ValueError("none of the optimizer's parameters is a parameter of the averaged model's model "
                             "(was the AveragedModel built from another model, or from the averaged copy?)")
        self._attached = AttachedAverage(averaged_model, model)

    def _clip_inputs(self, amp, grads: dict[int, Tensor | None] | None = None) -> tuple[dict[int, _flat.Batch], Tensor] | None:
        """Every bucket's batch and the clip coefficient of `max_grad_norm`, on the device.

        The norm is over every gradient this step updates, across groups and devices, as
        `clip_grad_norm_(all the optimizer's parameters)` takes it.
        """
        if not self._clips:
            raise RuntimeError(f"fusedopt: {type(self).__name__} cannot clip gradients inside its kernel "
                               "(max_grad_norm). help: call torch.nn.utils.clip_grad_norm_ before step()")
        batches, sums = {}, []
        for gi in range(len(self.param_groups)):
            for bucket in self._group_buckets(gi):
                refused = self._sparse_error or (f"fusedopt.{type(self).__name__}: max_grad_norm does not clip sparse "
                                                 "gradients. help: call torch.nn.utils.clip_grad_norm_ before step()")
                batch = bucket.collect(refused, None if grads is None else [grads[id(p)] for p in bucket.params])
                if batch is not None:
                    batches[id(bucket)] = batch
                    sums.append(_clip.sum_of_squares(bucket, batch, amp[0] if amp is not None else None))
        if not sums:
            return None
        return batches, _clip.clip_coefficient(sums, self.max_grad_norm)

    @staticmethod
    def _evaluate(closure):
        """torch's closure protocol: re-evaluate the loss with gradients enabled."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _amp_inputs(self) -> tuple[Tensor | None, Tensor | None] | None:
        """GradScaler's (grad_scale, found_inf), which it sets on optimizers that declare
        `_step_supports_amp_scaling` (fused=True) before calling `step()`."""
        if not getattr(self, "_step_supports_amp_scaling", False):
            return None
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        return None if grad_scale is None and found_inf is None else (grad_scale, found_inf)

    @staticmethod
    def _undo_steps(bucket: _flat.Bucket, batch: _flat.Batch, found_inf: Tensor) -> None:
        """A skipped step must not count: take back the increment, on the device, no sync
        (torch's fused optimizers do the same)."""
        if "step" not in bucket.scalars:
            return
        steps = bucket.steps
        back = _launch.on_device(found_inf, steps.device, steps.dtype).reshape(())
        if batch.everyone:
            steps.sub_(back)
        else:
            steps[batch.index_tensor().to(steps.device)] -= back

    def _skipped_first_step(self, group: dict, bucket: _flat.Bucket, fresh: list[int], found_inf: Tensor) -> None:
        """Called after a GradScaler step (fused=True) that was the first for the `fresh`
        parameters, which the kernel skipped where `found_inf` is set. The initial state it
        created then stays, as torch's fused optimizers keep it; an algorithm whose first
        step is unlike the others overrides this."""

    def _update(self, group: dict, bucket: _flat.Bucket, batch: _flat.Batch, fresh: list[int]) -> None:
        raise NotImplementedError

    @staticmethod
    def _run_path(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, Tensor], columns, o,
                  triton, reference) -> None:
        """Turn the host-computed scalar columns into the bucket's table and run its path:
        the kernel launcher or the reference, which take the same arguments."""
        dtype = _launch.compute_dtype(bucket.real_dtype)
        if any(isinstance(c, Tensor) for c in columns):
            table = _launch.scalar_table(columns, len(bucket), dtype, bucket.device)
        else:
            # Group-wide floats only (RMSprop, Adadelta, ...): the table is kept while they
            # repeat, so a step copies nothing to the device (and a CUDA graph can replay it).
            key = (tuple(columns), dtype)
            cached = bucket.__dict__.get("_scalar_table")
            if cached is None or cached[0] != key:
                cached = bucket._scalar_table = (key, _launch.scalar_table(columns, len(bucket), dtype, bucket.device))
            table = cached[1]
        (triton if bucket.path == "triton" else reference)(bucket, batch, state, table, o)

    @staticmethod
    def _advance_steps(bucket: _flat.Bucket, batch: _flat.Batch) -> None:
        steps = bucket.steps
        if batch.everyone:
            steps.add_(1)
        else:
            steps[batch.index_tensor()] += 1

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        # as state_dict holds it: state torch keeps sparse goes sparse, and is adopted so
        return {"defaults": self.defaults, "state": {p: self._exported(v) for p, v in self.state.items()},
                "param_groups": self.param_groups, "backend": self.backend, "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        foreign = state.pop("state", {})
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        for group in self.param_groups:
            for key, value in self._group_defaults.items():
                group.setdefault(key, value)
        self._buckets, self._slots, self._valid_groups, self._lazy = {}, {}, {}, {}
        if "_handle" not in self.__dict__:  # unpickled or copied; load_state_dict keeps its handle
            self._handle = _compile.register(self)
        # This optimizer's own state tensors loaded back (`load_state_dict(opt.state_dict())`)
        # stay the same objects, pointed at the new buffers, as torch's stay the state.
        old = self.__dict__.get("state")
        self._own_views = {id(t) for entry in old.values() if isinstance(entry, ParamState) and not entry.unfit
                           for t in dict.values(entry) if isinstance(t, Tensor)} \
            if isinstance(old, State) and old.owner is self else ()
        self.state = foreign if not isinstance(foreign, State) else dict(foreign)
        try:
            self._sync_state()
        finally:
            del self._own_views

