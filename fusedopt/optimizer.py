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

from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from . import _backend, _flat, _native
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
    return float(max_grad_norm)


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class _ParamState(dict):
    """`opt.state[p]` for a parameter that has flat state.

    Assigning a tensor to a key that holds a flat-buffer view copies the tensor into the
    view instead of replacing it, so the kernel keeps seeing what outside code wrote.
    """

    def __setitem__(self, key, value):
        current = self.get(key)
        if isinstance(current, Tensor) and isinstance(value, Tensor) and value is not current:
            if value.shape != current.shape:
                raise ValueError(
                    f"state '{key}' has shape {tuple(current.shape)}; cannot assign a tensor of shape {tuple(value.shape)}")
            _flat.local(current).copy_(_flat.shard_like(value, current))
            return
        super().__setitem__(key, value)


class _State(defaultdict):
    """`opt.state`: adopts whole per-parameter dicts assigned into it."""

    def __init__(self, owner: Optimizer):
        super().__init__(dict)
        self._owner = owner

    def __missing__(self, p):
        entry = _ParamState()
        dict.__setitem__(self, p, entry)
        return entry

    def __setitem__(self, p, entries):
        self._owner._adopt(p, entries)

    def __delitem__(self, p):
        super().__delitem__(p)
        self._owner._forget(p)

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
      ``step`` then lives on the parameter's device, as in torch.
    * ``capturable``: ``step`` lives on the parameter's device, as in torch; CUDA-graph capture
      of a step is not supported yet.
    * ``differentiable``: ``True`` raises: a fused update is not differentiable.
    * ``backend`` (fusedopt's own): 'auto', 'triton' or 'reference', overridden for a process by
      ``FUSEDOPT_BACKEND``; see ``fusedopt/_backend.py``.
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
    _sparse_error: str | None = None
    #: whether the kernels can clip gradients (their GRAD_OPS prologue): `max_grad_norm`
    _clips = False
    #: fusedopt-only: clip the global gradient norm to this inside the step (None: off)
    max_grad_norm: float | None = None
    #: group keys torch's __setstate__ fills in for checkpoints that predate them
    _group_defaults: dict = {}

    def __init__(self, params, defaults: dict[str, Any], *, backend: str = "auto"):
        self.backend = _backend.resolve(backend)
        self._buckets: dict[int, tuple[tuple[int, ...], list[_flat.Bucket]]] = {}
        self._slots: dict[int, tuple[int, int, int]] = {}  # id(p) -> (group, bucket, index)
        super().__init__(params, defaults)
        self.state = _State(self)

    # ------------------------------------------------------------------ layout

    def add_param_group(self, param_group: dict[str, Any]) -> None:
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
        carried = {p: dict(dict.get(self.state, p)) for p in group["params"] if dict.get(self.state, p)}
        buckets = []
        for bi, (params, positions) in enumerate(_flat.split_group(group["params"])):
            # torch keeps `step` on the parameter's device for fused and capturable groups
            # (so a GradScaler-skipped step can be taken back without a host sync).
            on_device = self._scalars_on_param_device or group.get("fused") or group.get("capturable")
            scalar_device = _flat.local(params[0]).device if on_device else None
            bucket = _flat.Bucket(params, positions, scalar_device=scalar_device)
            bucket.path = self._choose_path(bucket.device, bucket.dtype)
            for i, p in enumerate(params):
                self._slots[id(p)] = (gi, bi, i)
            buckets.append(bucket)
        self._buckets[gi] = (ids, buckets)
        for p, entries in carried.items():
            self._adopt(p, entries)
        return buckets

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

    def _adopt(self, p: Tensor, entries: dict) -> None:
        """Make `entries` p's state: flat kinds are copied into p's segments."""
        slot = self._slot(p) if isinstance(p, Tensor) else None
        if slot is None or not isinstance(entries, dict):
            dict.__setitem__(self.state, p, entries)
            return
        gi, bucket, i = slot
        state = _ParamState()
        flat = False
        for key, value in entries.items():
            if key in self._scalar_state and isinstance(value, (Tensor, int, float)):
                vec = bucket.scalar(key)
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
                view.copy_(value)
                dict.__setitem__(state, key, bucket.state_view(key, i))
                flat = True
            else:
                dict.__setitem__(state, key, value)
        bucket.initialized[i] = flat
        dict.__setitem__(self.state, p, state)

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
                self._adopt(p, dict(entries))

    def _init_state(self, group: dict, bucket: _flat.Bucket, fresh: list[int]) -> None:
        """Create torch's initial state for parameters stepped for the first time."""
        keys = self._state_keys(group)
        if not keys:  # stateless (SGD without momentum): torch keeps no entry at all
            return
        bucket.state_keys = tuple(keys)
        for i in fresh:
            state = self.state[bucket.params[i]]
            for key in keys:
                if key in self._scalar_state:
                    vec = bucket.scalar(key)
                    vec[i] = self._initial_scalar(group, key)
                    dict.__setitem__(state, key, vec[i])
                else:
                    bucket.buffer(key, self._buffer_dtype(bucket, key))
                    bucket.segment(key, i).fill_(self._initial_fill(group, key))
                    dict.__setitem__(state, key, bucket.state_view(key, i))
            bucket.initialized[i] = bool(keys)

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
        keys = [k for k in all_keys if k not in self._scalar_state]
        if tuple(all_keys) == getattr(bucket, "state_keys", None):
            return {k: bucket.buffer(k, self._buffer_dtype(bucket, k)) for k in keys}
        for i in batch.index:
            state = dict.get(self.state, bucket.params[i], {})
            missing = [k for k in keys if not isinstance(state.get(k), Tensor)]
            if missing:
                raise KeyError(
                    f"parameter {self._global_index(bucket.params[i])} has no optimizer state {missing[0]!r}, which "
                    f"this group's options need (was an option such as amsgrad turned on after the first step?)")
        return {k: bucket.buffer(k, self._buffer_dtype(bucket, k)) for k in keys}

    # ------------------------------------------------------------------ step

    # The step's host work (gradient addresses, tables, launches) is not traceable; until
    # the launches are registered as torch.library ops, dynamo runs it eagerly inside a
    # compiled function instead of tracing it, so a changing (tensor) lr never recompiles.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = self._evaluate(closure)
        self._sync_state()
        amp = self._amp_inputs()
        clipped = self._clip_inputs(amp) if self.max_grad_norm is not None else None
        for gi, group in enumerate(self.param_groups):
            for bucket in self._group_buckets(gi):
                batch = bucket.collect(self._sparse_error) if clipped is None else clipped[0].get(id(bucket))
                if batch is None:
                    continue
                fresh = [] if all(bucket.initialized) else [i for i in batch.index if not bucket.initialized[i]]
                if fresh:
                    self._init_state(group, bucket, fresh)
                if clipped is not None:
                    # In the compute dtype, so that an fp64 bucket's coefficient is not rounded to fp32.
                    batch.grad_ops = _launch.grad_ops_tensor(bucket.device, *(amp or (None, None)),
                                                             multiplier=clipped[1],
                                                             dtype=_launch.compute_dtype(bucket.real_dtype))
                elif amp is not None:
                    batch.grad_ops = _launch.grad_ops_tensor(bucket.device, *amp)
                # The native path declines what it cannot run (then the reference steps).
                if not (bucket.path == "native" and _native.step(self, group, bucket, batch, fresh)):
                    self._update(group, bucket, batch, fresh)
                if amp is not None and amp[1] is not None:
                    self._undo_steps(bucket, batch, amp[1])
                batch.finish()
        return loss

    def _clip_inputs(self, amp) -> tuple[dict[int, _flat.Batch], Tensor] | None:
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
                batch = bucket.collect(self._sparse_error)
                if batch is not None:
                    batches[id(bucket)] = batch
                    sums.append(_clip.sum_of_squares(bucket, batch))
        if not sums:
            return None
        return batches, _clip.clip_coefficient(sums, self.max_grad_norm, amp[0] if amp is not None else None)

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
        back = found_inf.to(device=steps.device, dtype=steps.dtype, non_blocking=True).reshape(())
        if batch.everyone:
            steps.sub_(back)
        else:
            steps[batch.index_tensor().to(steps.device)] -= back

    def _update(self, group: dict, bucket: _flat.Bucket, batch: _flat.Batch, fresh: list[int]) -> None:
        raise NotImplementedError

    @staticmethod
    def _run_path(bucket: _flat.Bucket, batch: _flat.Batch, state: dict[str, Tensor], columns, o,
                  triton, reference) -> None:
        """Turn the host-computed scalar columns into the bucket's table and run its path:
        the kernel launcher or the reference, which take the same arguments."""
        table = _launch.scalar_table(columns, len(bucket), _launch.compute_dtype(bucket.real_dtype), bucket.device)
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
        packed_state = {(mapping[id(k)] if isinstance(k, Tensor) else k): dict(v) for k, v in self.state.items()}
        state_dict = {"state": packed_state, "param_groups": param_groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

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
        state: dict[Any, Any] = {}
        for key, value in state_dict["state"].items():
            if key not in id_map:
                state[key] = value
                continue
            p = id_map[key]
            self._validate_entry(key, p, value)
            state[p] = {k: self._cast(p, k, v) for k, v in value.items()}
        for g, s in zip(groups, saved_groups):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
        # Everything fits: from here on nothing can fail half-way.
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _validate_entry(self, key, p: Tensor, entry) -> None:
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
            if name in self._scalar_state and isinstance(value, Tensor) and value.numel() != 1:
                raise ValueError(f"loaded state dict has a '{name}' of {value.numel()} elements for parameter {key}")

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
        return {"defaults": self.defaults, "state": {p: dict(v) for p, v in self.state.items()},
                "param_groups": self.param_groups, "backend": self.backend, "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        foreign = state.pop("state", {})
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        for group in self.param_groups:
            for key, value in self._group_defaults.items():
                group.setdefault(key, value)
        self._buckets, self._slots = {}, {}
        self.state = foreign if not isinstance(foreign, _State) else dict(foreign)
        self._sync_state()

