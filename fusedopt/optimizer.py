"""The base class: parameter groups, flat state, state_dict, and dispatch to a path.

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
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import os
import sys
import weakref
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import _backend, _compile, _flat, _native
from .kernels import _launch
from .kernels import clip as _clip

def check_lr(lr) -> None:
    """torch's learning-rate checks: a 1-element tensor, and not negative (NaN fails)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(**values) -> None:
    """torch's `Invalid <name> value: <value>` for the first negative (or NaN) keyword, in
    the order given, which is torch's order for each class."""
    for name, value in values.items():
        if not 0.0 <= value:
            raise ValueError(f"Invalid {'epsilon' if name == 'eps' else name} value: {value}")


def refuse_differentiable(differentiable: bool) -> None:
    """torch's `differentiable=True` runs the update under autograd; a fused kernel cannot."""
    if differentiable:
        raise RuntimeError("fusedopt: differentiable=True is not supported: the fused update is not "
                           "differentiable. help: use torch.optim for differentiable optimization")


def check_max_grad_norm(max_grad_norm) -> float | None:
    """fusedopt's `max_grad_norm=`: None (off) or a positive number."""
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected a positive number, or None for no clipping)")
    if _built_by_zero():
        raise ValueError("fusedopt: max_grad_norm inside ZeroRedundancyOptimizer would clip each rank's partition "
                         "by that partition's own norm, not by the model's. help: leave it out and call "
                         "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) before step()")
    return float(max_grad_norm)


def _built_by_zero() -> bool:
    """Whether ZeroRedundancyOptimizer is building this optimizer for its rank's partition
    (it passes every keyword it was given on): the optimizer sees only that partition and
    cannot know the whole model's gradients."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.optim import ZeroRedundancyOptimizer

    frame = sys._getframe(2)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


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


def check_numbers(options, gi: int) -> None:
    """Refuse a group's numeric option (a field of its kernel options) that is None or a
    string: torch's arithmetic raises TypeError on it when the step reaches the group,
    after stepping the groups before it; here before any group steps."""
    for name in _numeric_fields(type(options)):
        value = getattr(options, name)
        if value is None or isinstance(value, (str, bytes)):
            raise TypeError(f"param group {gi}: {name} is {value!r}; expected a number or a 1-element tensor")


@functools.cache
def _numeric_fields(options_class) -> tuple[str, ...]:
    # (a scheduler's new lr each step re-validates the group: the fields are looked up once)
    return tuple(f.name for f in dataclasses.fields(options_class) if "float" in str(f.type))


def user_stacklevel() -> int:
    """The `stacklevel` that points a warning raised inside the step at the user's line: the
    number of frames up to the first one outside this package (the step is reached through
    hooks, a closure, or the compiled op, each a different depth)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _as_float(x) -> float:
    """A hyperparameter as a float: a number or a 1-element tensor (a string, which float()
    would parse, is refused as torch's arithmetic refuses it)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise TypeError(f"expected a number or a 1-element tensor, got a tensor of shape {tuple(x.shape)}")
        return float(x.item())
    if isinstance(x, (str, bytes)):
        raise TypeError(f"expected a number or a 1-element tensor, got {x!r}")
    return float(x)


# A profiler range from C++ (inductor's generated code opens its ranges with it); torch's
# Python record_function where a build lacks it.
_record_range = getattr(torch._C._profiler, "_RecordFunctionFast", torch.autograd.profiler.record_function)


class _WritesThroughSetitem:
    """`update`, `setdefault` and `|=` made of `__setitem__`, which the dict classes of
    `opt.state` override (dict's own would store the values without it)."""

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def __ior__(self, other):
        self.update(other)
        return self


class _ParamState(_WritesThroughSetitem, dict):
    """`opt.state[p]` for a parameter that has flat state.

    Assigning a tensor to a key that holds a flat-buffer view copies the tensor into the
    view instead of replacing it, so the kernel keeps seeing what outside code wrote. Every
    other change (a new key, a number, None, a removed key: `del`, `pop`, `popitem`,
    `clear`, `update`, `setdefault`, `|=`) makes the optimizer adopt the dict again
    (`Optimizer._adopt`), so that the next step sees what torch's would: a number is
    written into the scalar state, a new tensor into the flat buffer, an emptied dict
    starts afresh, and a missing key is refused when the parameter is stepped. A dict no
    longer in `opt.state` (replaced there) is a plain dict.

    `sparse_dim` (an attribute, not a key): the sparse dimensions of the gradient that
    seeded state torch keeps sparse (`Optimizer._sparse_state`), which `state_dict` then
    exports in torch's sparse layout; None for a parameter with dense gradients.
    """

    sparse_dim: int | None = None
    _owner: weakref.ref | None = None   # the optimizer (weak: no cycle keeps its buffers alive)
    _param: Tensor | None = None

    def __setitem__(self, key, value):
        current = self.get(key)
        if isinstance(current, Tensor) and isinstance(value, Tensor) and value is not current:
            if value.shape != current.shape:
                raise ValueError(
                    f"state '{key}' has shape {tuple(current.shape)}; cannot assign a tensor of shape {tuple(value.shape)}")
            if value.layout is torch.sparse_coo:  # torch's sparse momentum buffer (see Optimizer._adopt)
                self.sparse_dim = value.sparse_dim()
                value = value.to_dense()
            # detached: the state is a copy, not a node of the value's graph (`p * 0.5`)
            _flat.local(current).copy_(_flat.shard_like(value.detach(), current))
            return
        if value is current and key in self:
            return
        super().__setitem__(key, value)
        self._changed()

    def _changed(self) -> None:
        owner = self._owner() if self._owner is not None else None
        if owner is not None and isinstance(owner.state, _State) and dict.get(owner.state, self._param) is self:
            owner._adopt(self._param, self, into=self)

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        value = super().pop(*args)
        self._changed()
        return value

    def popitem(self):
        item = super().popitem()
        self._changed()
        return item

    def clear(self):
        super().clear()
        self._changed()

    def __reduce__(self):   # pickles and copies without the optimizer
        return (_rebuild_param_state, (dict(self), self.sparse_dim))


def _rebuild_param_state(entries: dict, sparse_dim: int | None) -> _ParamState:
    state = _ParamState(entries)
    state.sparse_dim = sparse_dim
    return state


def mark_sparse(state, grad: Tensor) -> None:
    """Note on a parameter's state that it was stepped with a sparse gradient of this many
    sparse dimensions (`_ParamState.sparse_dim`; a plain dict put in `opt.state` takes none)."""
    if isinstance(state, _ParamState):
        state.sparse_dim = grad.sparse_dim()


def _set_view(state: dict, key: str, view: Tensor) -> None:
    """Put a view of flat state in a parameter's entry, keeping the tensor already there
    when it is the same view (`_compile.prepare` made it when dynamo traced the step). A
    view made inside the `fusedopt::step` op, which runs below autograd's view tracking,
    has no `_base`; AOT autograd refuses a graph whose mutated inputs alias one another
    with and without one, as a graph that reads opt.state after step() has them."""
    current = dict.get(state, key)
    if isinstance(current, Tensor) and current is not view:
        a, b = _flat.local(current), _flat.local(view)
        if (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device
                and a.shape == b.shape and a.stride() == b.stride() and type(current) is type(view)):
            return
    dict.__setitem__(state, key, view)


class _State(_WritesThroughSetitem, defaultdict):
    """`opt.state`: adopts whole per-parameter dicts assigned into it (also by `update` and
    `setdefault`), and forgets a parameter's flat state when its entry is removed (also by
    `pop`, `popitem` and `clear`): its next step starts afresh, as torch's does."""

    def __init__(self, owner: Optimizer):
        super().__init__(dict)
        # Weak, as `_ParamState._owner`: `opt.state` holding the optimizer would make a
        # cycle, and `del opt` would keep every flat buffer until the cycle collector runs
        # (torch.optim's are freed at once). Outlived by its optimizer, it is a plain dict.
        self._owner_ref = weakref.ref(owner)

    @property
    def _owner(self) -> Optimizer | None:
        return self._owner_ref()

    def __missing__(self, p):
        if self._owner is None:
            return super().__missing__(p)
        entry = _ParamState()
        entry._owner, entry._param = self._owner_ref, p
        dict.__setitem__(self, p, entry)
        return entry

    def __setitem__(self, p, entries):
        owner = self._owner
        if owner is None:
            return dict.__setitem__(self, p, entries)
        owner._adopt(p, entries)

    def __delitem__(self, p):
        super().__delitem__(p)
        owner = self._owner
        if owner is not None:
            owner._forget(p)

    def pop(self, p, *default):
        if p not in self:
            return super().pop(p, *default)
        entry = dict.__getitem__(self, p)
        del self[p]
        return entry

    def popitem(self):
        p, entry = super().popitem()
        owner = self._owner
        if owner is not None:
            owner._forget(p)
        return p, entry

    def clear(self):
        for p in list(self):
            del self[p]

    def copy(self):   # torch's state is a defaultdict(dict): its copy is one, sharing the entries
        return defaultdict(dict, self)

    __copy__ = copy

    def __reduce__(self):  # pickles and deep-copies as the plain dict torch would have
        return (dict, (dict(self),))


class Optimizer(torch.optim.Optimizer):
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
    #: whether sparse gradients are stepped (torch's SGD and Adagrad take them):
    #: `_sparse_update` then steps those parameters, `_check_sparse` refuses options first
    _steps_sparse = False
    #: flat state that torch keeps sparse for a parameter whose gradients are sparse (SGD's
    #: momentum buffer: a copy of the first sparse gradient, updated with sparse ops); the
    #: flat segment holds it dense and `state_dict` exports it sparse (see `_ParamState`)
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
        self._buckets: dict[int, tuple[tuple[int, ...], list[_flat.Bucket]]] = {}
        self._valid_groups: dict[int, tuple] = {}   # group index -> the values last validated
        self._slots: dict[int, tuple[int, int, int]] = {}  # id(p) -> (group, bucket, index)
        super().__init__(params, defaults)
        self.state = _State(self)
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
        group = self.param_groups[gi]
        ids = tuple(map(id, group["params"]))
        cached = self._buckets.get(gi)
        if cached is not None and cached[0] == ids:
            buckets = cached[1]
            try:
                for b in buckets:
                    b.check_params()
                return buckets
            except _flat.StaleLayout:
                self._check_shapes(gi)
        return self._build_group(gi, ids)

    def _check_shapes(self, gi: int) -> None:
        for p in self.param_groups[gi]["params"]:
            state = dict.get(self.state, p)
            for key, value in (state or {}).items():
                if key in self._flat_state and isinstance(value, Tensor) and value.shape != p.shape:
                    index = self._global_index(p)
                    raise RuntimeError(
                        f"parameter {index} changed shape from {tuple(value.shape)} to {tuple(p.shape)} "
                        "after its optimizer state was created; its state no longer fits. "
                        "help: build a new optimizer after changing parameter shapes")

    def _global_index(self, p: Tensor) -> int:
        return next(i for i, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)) if q is p)

    def _build_group(self, gi: int, ids: tuple[int, ...]) -> list[_flat.Bucket]:
        """(Re)build group gi's buckets, carrying over any state its parameters have."""
        group = self.param_groups[gi]
        _refuse_duplicates(group["params"], gi)   # (a list edited after construction)
        self._refuse_shared(gi)
        carried = {p: dict(dict.get(self.state, p)) for p in group["params"] if dict.get(self.state, p)}
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
        self._buckets[gi] = (ids, buckets)
        for p, entries in carried.items():
            self._adopt(p, entries, carried=pending.get(id(p), False))
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
        slot = self._slots.get(id(p))
        if slot is None:
            return None
        gi, bi, i = slot
        buckets = self._group_buckets(gi)
        gi, bi, i = self._slots[id(p)]
        return gi, buckets[bi], i

    # ------------------------------------------------------------------ state

    def _adopt(self, p: Tensor, entries: dict, into: _ParamState | None = None, carried: bool | None = None) -> None:
        """Make `entries` p's state: flat kinds are copied into p's segments, numbers for
        scalar kinds into their vectors; anything else is kept as given. `into`: the
        `_ParamState` to refill (`entries` itself, after outside code changed it).
        `carried`: None for state from outside; else the state is this optimizer's own,
        carried into a rebuilt bucket (a parameter's dtype or device changed), and says
        whether it was loaded and not yet checked (`_check_loaded`)."""
        slot = self._slot(p) if isinstance(p, Tensor) else None
        if slot is None or not isinstance(entries, dict):
            dict.__setitem__(self.state, p, entries)
            return
        gi, bucket, i = slot
        items = list(entries.items())
        if into is None:
            state = _ParamState()
            state.sparse_dim = getattr(entries, "sparse_dim", None)
        else:
            state = into
            dict.clear(state)
        state._owner, state._param = weakref.ref(self), p
        flat = False
        for key, value in items:
            if key in self._scalar_state and isinstance(value, (Tensor, int, float)):
                vec = bucket.scalar(key)
                if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != vec.dtype and \
                        (value.dtype == torch.float64 or key != "step"):
                    vec = self._retype_scalar(bucket, key, value.dtype)
                vec[i] = _as_float(value)
                dict.__setitem__(state, key, vec[i])
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
                dict.__setitem__(state, key, bucket.state_view(key, i))
                flat = True
            elif value is None and key in self._optional_state:
                continue   # torch starts such state afresh (SGD's momentum_buffer = None)
            else:
                dict.__setitem__(state, key, value)
        bucket.initialized[i] = flat
        bucket.state_keys = None   # the next step checks every parameter's keys (`_buffers`)
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
        if isinstance(self.state, _State) and self.state._owner is self:
            return
        foreign, self.state = self.state, _State(self)
        for gi in range(len(self.param_groups)):
            for b in self._group_buckets(gi):
                b.initialized = [False] * len(b)
        for p, entries in foreign.items():
            if entries:
                copied = dict(entries)
                if getattr(entries, "sparse_dim", None) is not None:   # carry the mark (_ParamState)
                    copied = _ParamState(copied)
                    copied.sparse_dim = entries.sparse_dim
                self._adopt(p, copied)
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
        for i in fresh:
            state = self.state[bucket.params[i]]
            for key in keys:
                if key in self._scalar_state:
                    vec = bucket.scalar(key)
                    vec[i] = self._initial_scalar(group, key)
                    _set_view(state, key, vec[i])
                else:
                    bucket.buffer(key, self._buffer_dtype(bucket, key))
                    bucket.segment(key, i).fill_(self._initial_fill(group, key))
                    _set_view(state, key, bucket.state_view(key, i))
            bucket.initialized[i] = bool(keys)

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
        this step is stepped by no one, and not refused."""
        stepped = set(batch.index if batch is not None else ()).union(i for i, _ in sparse or ())
        for i, j in bucket.shared:
            if i in stepped and j in stepped:
                first, second = self._global_index(bucket.params[i]), self._global_index(bucket.params[j])
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

    def _check_state(self, bucket: _flat.Bucket, batch: _flat.Batch, all_keys: list[str]) -> None:
        """Raise, as torch's step would, when a stepped parameter's state lacks a kind its
        group's options need (an option such as amsgrad turned on after its first step, a
        key removed or replaced by outside code); nothing has changed yet. When every
        parameter with state has them all, the bucket remembers the keys and later steps
        skip this (`_adopt` forgets them)."""
        stepped = set(batch.index) if batch is not None else set()
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
        if state.__class__ is not _State or state._owner is not self:
            self._sync_state()
        clipped = self._clip_inputs(amp, grads) if self.max_grad_norm is not None else None
        # Every bucket's batch first: a gradient that cannot be stepped (a sparse one an
        # option refuses) raises before any parameter or state has changed.
        work = []
        for gi, group in enumerate(groups):
            keys = self._validate_group(gi, group)
            for bucket in self._group_buckets(gi):
                sparse = [] if self._steps_sparse else None
                if clipped is not None:
                    batch = clipped[0].get(id(bucket))
                else:
                    batch = bucket.collect(self._sparse_error, None if grads is None else [grads[id(p)] for p in bucket.params],
                                           sparse)
                if group.get("fused") and (batch is not None or sparse) and not bucket.dtype.is_floating_point:
                    self._refuse_fused(bucket, batch.index[0] if batch is not None else sparse[0][0])
                if amp is not None and amp[0] is not None and batch is not None and batch.user_grads is not None:
                    self._refuse_overlapping_grads(bucket, batch)
                if bucket.shared:
                    self._refuse_shared_memory(bucket, batch, sparse)
                if sparse:
                    self._check_sparse(group, bucket)
                if keys and batch is not None and getattr(bucket, "state_keys", None) is not keys:
                    self._check_state(bucket, batch, keys)
                if self._check_steps is not None and (batch is not None or sparse):
                    self._check_steps(group, bucket, batch, sparse)
                if batch is not None or sparse:
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
                if bucket.versions is not None:
                    bucket.note_writes()
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
                if bucket.versions is not None:
                    bucket.record_versions()
        if averaging is not None:
            averaging.finish()
        if self.__dict__.get("_written_back") is not None:
            self._write_back()

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
                    state[p]   # (`_State.__missing__` makes the entry; `_init_state` fills it)

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
            _as_float(group.get("lr", 0.0))   # (Rprop's options leave it out: it seeds step_size)
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


    # ------------------------------------------------------------------ torch.compile

    def _traced_step(self, closure):
        """`step()` as dynamo traces it: only cheap Python, then the `fusedopt::step` op.

        The lists below are the op's inputs (see `fusedopt/_compile.py`); reading
        `param_groups` makes dynamo guard on every option that is a Python number: one that
        changes recompiles, every time (the op's `list[float]` cannot be symbolic, where
        torch.optim's float lr becomes a graph input after one recompile); a tensor does not.
        """
        loss = self._evaluate(closure)
        groups = self.param_groups
        if any(_flat.dtensor_class() is not None and isinstance(p, _flat.dtensor_class())
               for group in groups for p in group["params"]):
            # A DTensor would need a sharding rule for the op; run this step eagerly.
            self._eager_step()
            return loss
        _compile.prepare(self)
        torch.ops.fusedopt.step(*self._op_inputs())
        return loss

    def _op_inputs(self) -> tuple:
        """The arguments of `fusedopt::step` for this optimizer's next step (see
        `fusedopt/_compile.py`): traced by dynamo, and what tests hand to opcheck."""
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params]
        options, numbers = _compile.option_leaves(self.param_groups)
        amp = self._amp_inputs()
        return self._handle, params, grads, self._op_state(), options, numbers, [] if amp is None else list(amp)

    @torch._disable_dynamo
    def _eager_step(self) -> None:
        with torch.no_grad():
            self._step_body(self.param_groups, None, self._amp_inputs())

    def _op_state(self) -> list[Tensor]:
        """Every state tensor a step may write, in a fixed order: each bucket's flat
        buffers and scalar vectors. Traced by dynamo, and listed again inside the op to
        pair the op's tensors with the optimizer's own."""
        out = []
        for gi in range(len(self.param_groups)):
            cached = self._buckets.get(gi)
            if cached is not None:
                for bucket in cached[1]:
                    out.extend(bucket.buffers.values())
                    out.extend(bucket.scalars.values())
        return out

    def _prepare_state(self) -> None:
        """Build buckets and allocate the state of every bucket that has a gradient now, as
        a step would, and create the entries in `opt.state` of the parameters it steps for
        the first time, with their initial values: called when dynamo traces a step.

        torch's optimizers create their state when dynamo traces their first step (it runs
        `_init_group` for real), so code traced after `step()` in the same graph (a step
        post-hook, a read of `opt.state[p]`) sees it; so must it here. Those parameters stay
        uninitialized for the step (`bucket.initialized`), which starts them again, as a
        first step, when the graph runs the op; if that step raises instead, the op drops
        the entries (`_step_from_op`), and the optimizer is as it was."""
        self._sync_state()
        work = []
        for gi, group in enumerate(self.param_groups):
            buckets = [b for b in self._group_buckets(gi) if any(p.grad is not None for p in b.params)]
            if buckets:
                # A group the step refuses gets nothing (it raises when the graph runs).
                work.append((group, self._validate_group(gi, group), buckets))
        created = []   # (group, bucket, indices of its first-time parameters)
        for group, keys, buckets in work:
            for bucket in buckets:
                self._allocate_state(group, bucket)
                fresh = [i for i, p in enumerate(bucket.params)
                         if keys and not bucket.initialized[i] and p.grad is not None and not p.grad.is_sparse
                         and not dict.get(self.state, p)]
                if fresh:
                    created.append((group, bucket, fresh))
        if not created:
            return
        state, ids = self.state, {id(bucket.params[i]) for _, bucket, fresh in created for i in fresh}
        for group in self.param_groups:   # in the groups' order, as a step creates them
            for p in group["params"]:
                if id(p) in ids and p not in state:
                    state[p]   # (`_State.__missing__` makes the entry; `_init_state` fills it)
        for group, bucket, fresh in created:
            self._init_state(group, bucket, fresh)
            for i in fresh:
                bucket.initialized[i] = False
        self._prepared = [(bucket.params[i], dict.get(state, bucket.params[i]))
                          for _, bucket, fresh in created for i in fresh]

    def _drop_prepared(self) -> None:
        """Forget the entries `_prepare_state` made for a step that then raised: the
        parameters were not stepped, and an optimizer whose step raised is as it was."""
        prepared, self._prepared = self.__dict__.get("_prepared"), None
        for p, entry in prepared or ():
            slot = self._slot(p)
            if slot is not None and not slot[1].initialized[slot[2]] and dict.get(self.state, p) is entry:
                dict.pop(self.state, p)

    def _allocate_state(self, group: dict, bucket: _flat.Bucket) -> None:
        for key in self._state_keys(group):
            if key in self._scalar_state:
                bucket.scalar(key)
            else:
                bucket.buffer(key, self._buffer_dtype(bucket, key))

    def _step_from_op(self, params: list[Tensor], grads: list[Tensor | None], state: list[Tensor],
                      options: list[Tensor], numbers: list[float], amp: list[Tensor | None]) -> None:
        """The body of the `fusedopt::step` op: a step on the tensors the op was given.

        Under functionalization (AOT autograd) the mutated inputs may be clones of the
        optimizer's own parameters and state, which AOT copies back after the op: they
        must hold the results. Clones are copied into the own tensors, the step runs on
        those (their addresses are what buckets, views and tables know), and the results
        are copied out.
        """
        own_params = [p for group in self.param_groups for p in group["params"]]
        own_state = self._op_state()
        pairs = [(own, given) for own, given in zip(chain(own_params, own_state), chain(params, state))
                 if given is not own and given.data_ptr() != own.data_ptr()]
        if (len(own_params) != len(params) or len(own_state) != len(state)
                or any(own.shape != given.shape or own.dtype != given.dtype for own, given in pairs)):
            # Dynamo guards on what the traced step lists, so only code that changed the
            # optimizer inside the compiled function, before step(), gets here.
            raise RuntimeError(
                "fusedopt::step: the optimizer's parameters or state changed between the start of the compiled "
                "function and its step() (parameters, state tensors or their shapes differ from what the graph "
                "was given). help: change them outside the compiled function")
        for own, given in pairs:
            own.copy_(given)
        if pairs:
            # These copies, and AOT's copies back after the last step, bump the parameters'
            # version counters: they are not the user's writes. (So a compiled step does
            # not see writes made between steps: `Bucket.versions`.)
            for _, buckets in self._buckets.values():
                for bucket in buckets:
                    if bucket.versions is not None:
                        bucket.record_versions()
        grads_by_id = {id(p): g for p, g in zip(own_params, grads)}
        amp_inputs = tuple(amp) if amp else None
        if amp_inputs is not None:
            # An eager step leaves the gradients unscaled, as torch's fused kernels do; the
            # op declares its gradients read-only, so it steps with copies and leaves the
            # user's scaled (README, "Using fusedopt with GradScaler").
            grads_by_id = {k: None if g is None else g.clone() for k, g in grads_by_id.items()}
        try:
            with torch.no_grad():
                self._step_body(_compile.groups_with(self.param_groups, options, numbers), grads_by_id, amp_inputs)
        except BaseException:
            self._drop_prepared()
            raise
        self._prepared = None
        for own, given in pairs:
            given.copy_(own)
        # An LR scheduler wraps step() to record that it ran in an attribute (torch's and
        # fusedopt's share the names). Inside a compiled function that write is lost:
        # dynamo (torch 2.13) drops attribute writes on an optimizer when the frame ends
        # without a graph break (its OptimizerVariable is not tracked as mutable), and
        # the scheduler would then warn that step() never ran. The op does run: record it.
        from .schedulers._base import _CALLED_FLAG, _WRAPPED_FLAG
        if hasattr(self.step, _WRAPPED_FLAG):
            setattr(self, _CALLED_FLAG, True)

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

    # ------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict[str, Any]:
        """torch's format: state keyed by parameter index, groups with index lists."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._sync_state()
        mapping: dict[int, int] = {}
        start = 0

        def pack(group: dict[str, Any]) -> dict[str, Any]:
            nonlocal start
            packed = {k: v for k, v in group.items() if k != "params"}
            mapping.update({id(p): i for i, p in enumerate(group["params"], start) if id(p) not in mapping})
            packed["params"] = [mapping[id(p)] for p in group["params"]]
            start += len(packed["params"])
            return packed

        param_groups = [pack(g) for g in self.param_groups]
        packed_state = {(mapping[id(k)] if isinstance(k, Tensor) else k): self._exported(v) for k, v in self.state.items()}
        state_dict = {"state": packed_state, "param_groups": param_groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _exported(self, entries: dict) -> dict:
        """A parameter's state as torch's state_dict holds it: the live tensors, except for a
        parameter stepped with sparse gradients (`_ParamState.sparse_dim`). State torch keeps
        sparse for it goes as a sparse copy of the flat segment (its nonzero rows: where
        torch's has entries, up to entries that are exactly zero), which torch's sparse SGD,
        Nesterov included, steps on. Flat state torch adds sparse gradients into (Adagrad's
        `sum`, SparseAdam's moments) goes as a copy of its own where those gradients have no
        dense dimensions (a 1-d parameter's): torch's add of such a sparse tensor into a view
        at a storage offset writes at twice the offset (`_flat.add_sparse_`), so a segment
        loaded into torch.optim, or saved and loaded, would be stepped at the wrong place and
        past the end of the buffer."""
        sparse_dim = getattr(entries, "sparse_dim", None)
        if sparse_dim is None:
            return dict(entries)
        out = dict(entries)
        for k, v in out.items():
            if isinstance(v, Tensor) and not v.is_sparse:
                if k in self._sparse_state:
                    out[k] = v.to_sparse(sparse_dim)
                elif k in self._flat_state and v.dim() == sparse_dim:
                    out[k] = v.clone()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's format (from torch.optim or fusedopt), validating it all first.

        Unlike torch, a state dict whose groups, parameter counts, state shapes or state
        keys do not fit this optimizer is rejected before anything changes.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, s in zip(groups, saved_groups):
            if len(g["params"]) != len(s["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        group_of = {key: s for s in saved_groups for key in s["params"]}
        state: dict[Any, Any] = {}
        for key, value in state_dict["state"].items():
            if key not in id_map:
                state[key] = value
                continue
            p = id_map[key]
            self._validate_entry(key, p, value, {**self.defaults, **group_of[key]})
            state[p] = {k: self._cast(p, k, v) for k, v in value.items()}
        for g, s in zip(groups, saved_groups):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
        # Everything fits: from here on nothing can fail half-way.
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _validate_entry(self, key, p: Tensor, entry, group: dict) -> None:
        """Refuse a parameter's loaded state that its step could not use: not a dict, flat
        state of another shape, a scalar kind that is not a number, or (for a parameter that
        has state) a kind its group's options need missing, which torch refuses at load
        (`step`, NAdam's `mu_product`, ASGD's `eta`) or at the step."""
        if not isinstance(entry, dict):
            raise ValueError(f"loaded state dict has state {entry!r} for parameter {key}; expected a dict")
        for name, value in entry.items():
            if name in self._flat_state and value is not None:
                if not isinstance(value, Tensor):
                    raise ValueError(f"loaded state dict has a {type(value).__name__} for state '{name}' of parameter {key}; expected a tensor")
                if value.shape != p.shape:
                    raise ValueError(
                        f"loaded state dict has state '{name}' of shape {tuple(value.shape)} for parameter {key}, "
                        f"whose shape is {tuple(p.shape)}")
            if name in self._scalar_state:
                if isinstance(value, Tensor):
                    if value.numel() != 1:
                        raise ValueError(f"loaded state dict has a '{name}' of {value.numel()} elements for parameter {key}")
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"loaded state dict has '{name}' = {value!r} for parameter {key}; expected a number "
                                     "or a 1-element tensor")
        if entry and self._flat_state:
            needed = [k for k in self._state_keys(group) if k not in self._optional_state]
            missing = [k for k in needed if entry.get(k) is None]
            if missing:
                raise KeyError(f"loaded state dict has no {missing[0]!r} in the state of parameter {key}, which its "
                               f"group's options need (it has {sorted(entry)})")

    @staticmethod
    def _cast(p: Tensor, key, value):
        """torch's policy: floating state takes the parameter's dtype and device; step stays."""
        if not isinstance(value, Tensor) or key == "step":
            return value
        if p.is_floating_point():
            return value.to(dtype=p.dtype, device=p.device)
        return value.to(device=p.device)

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
        self._buckets, self._slots, self._valid_groups = {}, {}, {}
        if "_handle" not in self.__dict__:  # unpickled or copied; load_state_dict keeps its handle
            self._handle = _compile.register(self)
        self.state = foreign if not isinstance(foreign, _State) else dict(foreign)
        self._sync_state()

