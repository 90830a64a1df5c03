"""What Adamax, NAdam and RAdam share: torch's argument checks, and the step, which runs
Adam's kernel (kernels/adam.py) with the class's VARIANT."""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from . import _flat, _native
from .kernels import _launch
from .kernels import adam as kernels
from ._options import as_float, check_lr, check_max_grad_norm, check_nonnegative, float_option, pair
from ._state import set_view
from .optimizer import Optimizer, user_stacklevel

#: parameter dtypes that get an fp32 master copy under master_weights=True
LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_arguments(lr, betas, eps, weight_decay) -> None:
    """torch's checks for the Adam family's shared arguments, in torch's order."""
    check_lr(lr)
    check_nonnegative(eps=eps)
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    check_nonnegative(weight_decay=weight_decay)


class AdamFamily(Optimizer):
    """Base of the optimizers that run Adam's kernel: Adam, AdamW, and the other VARIANTs."""

    _variant = "adam"
    _native = False  # torch has a fused CPU kernel for Adam and AdamW only
    _clips = True
    _fuses_average = True
    # fusedopt-only precision options. They are optimizer attributes, not group entries,
    # so that state_dict()'s param_groups stay torch's and torch.optim loads them.
    master_weights = False
    state_dtype: torch.dtype | None = None
    stochastic_rounding = False
    #: the base of stochastic rounding's per-step seeds; a step's random bits depend only
    #: on it, the bucket, the tensor's position and its step count
    sr_seed = 0

    def _set_extras(self, master_weights: bool, state_dtype: torch.dtype | None, stochastic_rounding: bool,
                    max_grad_norm: float | None) -> None:
        """fusedopt's keywords beyond torch's, checked before anything is built."""
        self._set_precision(master_weights, state_dtype, stochastic_rounding)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)

    def _set_precision(self, master_weights: bool, state_dtype: torch.dtype | None,
                       stochastic_rounding: bool = False) -> None:
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype} (expected one of "
                             f"{', '.join(map(str, STATE_DTYPES))}, or None for the parameters' dtype)")
        if master_weights and stochastic_rounding:
            raise ValueError("master_weights and stochastic_rounding exclude each other: with an fp32 master "
                             "copy nothing is lost in rounding the parameter")
        self.master_weights = bool(master_weights)
        self.state_dtype = state_dtype
        self.stochastic_rounding = bool(stochastic_rounding)

    def _check_group(self, group: dict) -> None:
        """A beta torch's constructor refuses, set in a group afterwards, makes torch's step
        divide a Python float by zero (ZeroDivisionError) in these cases, after stepping the
        groups and parameters before it: Adam, AdamW and Adamax divide lr by the bias
        correction 1 - beta1**step (not with capturable=True or fused=True, which compute
        it as tensors), RAdam computes rho_inf = 2 / (1 - beta2) - 1. Raised here before
        anything changes; torch's fused kernel (the 'auto' CPU path for Adam and AdamW)
        would instead write NaN into every parameter. Likewise a beta2 above 1: Adam and
        AdamW take the square root of 1 - beta2**step as a Python float, a complex number,
        which their update refuses with RuntimeError (NAdam's for-loop, Adamax and RAdam's
        take it as a tensor or not at all, and step on)."""
        beta1, beta2 = pair(group, "betas")
        if self._variant == "radam":
            if not isinstance(beta2, Tensor) and beta2 == 1:
                raise ZeroDivisionError(f"float division by zero: betas[1] is {beta2!r}, and torch's "
                                        f"{type(self).__name__} computes rho_inf = 2 / (1 - beta2) - 1 "
                                        "(its constructor refuses betas outside [0, 1))")
        elif self._variant != "nadam" and not group.get("capturable") and not group.get("fused"):
            if not isinstance(beta1, Tensor) and beta1 == 1:
                raise ZeroDivisionError(f"float division by zero: betas[0] is {beta1!r}, and torch's "
                                        f"{type(self).__name__} divides lr by the bias correction 1 - beta1**step "
                                        "(its constructor refuses betas outside [0, 1))")
            if self._variant == "adam" and not isinstance(beta2, Tensor) and beta2 > 1:
                raise RuntimeError(f"betas[1] is {beta2!r}: torch's {type(self).__name__} takes the square root "
                                   "of the bias correction 1 - beta2**step, negative for it, and refuses the complex "
                                   "result (its constructor refuses betas outside [0, 1))")

    def _rounds_stochastically(self, bucket: _flat.Bucket) -> bool:
        return self.stochastic_rounding and not bucket.is_complex and bucket.real_dtype == torch.bfloat16

    def _has_master(self, bucket: _flat.Bucket) -> bool:
        return self.master_weights and not bucket.is_complex and bucket.real_dtype in LOW_PRECISION

    def _buffer_dtype(self, bucket: _flat.Bucket, key: str) -> torch.dtype | None:
        if key == "master_param":
            return torch.float32
        # A complex view of a low-precision buffer does not exist: complex state keeps torch's dtype.
        if self.state_dtype is not None and not bucket.is_complex:
            return self.state_dtype
        # Master weights without a state_dtype: the moments are fp32 as well, as mixed
        # precision training keeps them; bf16 moments are what state_dtype asks for.
        return torch.float32 if self._has_master(bucket) else None

    def _choose_path(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        path = super()._choose_path(device, dtype)
        # torch's CPU implementation knows neither a master copy nor state of another
        # dtype. The native path composes them around torch's fused kernel
        # (fusedopt/_composed.py), which only Adam and AdamW have.
        if path == "native" and dtype is not None and not dtype.is_complex and (
                (self.master_weights and dtype in LOW_PRECISION)
                or (self.stochastic_rounding and dtype == torch.bfloat16)
                or (self.state_dtype is not None and self.state_dtype != dtype)):
            return "native" if _native.implementation(type(self)).fused is not None else "reference"
        return path

    def _init_state(self, group: dict, bucket: _flat.Bucket, fresh: list[int]) -> None:
        super()._init_state(group, bucket, fresh)
        if self._has_master(bucket):
            self._init_master(bucket, fresh)

    def _allocate_state(self, group: dict, bucket: _flat.Bucket) -> None:
        super()._allocate_state(group, bucket)
        if self._has_master(bucket):
            bucket.buffer("master_param", torch.float32)

    def _init_master(self, bucket: _flat.Bucket, indices) -> None:
        """The master copy starts as the parameter's value (exact: fp32 holds bf16/fp16).
        Detached: at load_state_dict, outside the step's no_grad, copying the parameter
        itself would make the flat buffer a node of the parameter's autograd graph."""
        bucket.buffer("master_param", torch.float32)
        for i in indices:
            bucket.view("master_param", i).copy_(_flat.local(bucket.params[i]).detach())
            set_view(self.state[bucket.params[i]], "master_param", bucket.state_view("master_param", i))

    def _adopt(self, p: Tensor, entries: dict, into=None, carried: bool | None = None):
        loaded = isinstance(entries, dict) and "master_param" in entries
        if carried is not None and loaded and not self._has_master(self._slot(p)[1]):
            # The parameter left the dtypes that get a copy (`p.data = p.data.float()`): no
            # step would update the copy, and state_dict() would save it stale.
            entries = {key: value for key, value in entries.items() if key != "master_param"}
            loaded = False
        # (`carried` passed on: the base class reports state cast to a new dtype, which
        # `_build_group` warns of, and clones state it keeps aside for a carried entry)
        cast = super()._adopt(p, entries, into, carried)
        slot = self._slot(p) if isinstance(p, Tensor) and isinstance(entries, dict) else None
        if slot is None:
            return cast
        _, bucket, i = slot
        if not (self._has_master(bucket) and bucket.initialized[i]):
            return cast
        if not loaded:
            # State from an optimizer without master weights (torch's, or fusedopt's
            # without the option): the master copy starts from the parameter, as on a
            # first step. (A model loaded after this is a write the step takes up.)
            self._init_master(bucket, [i])
        elif carried is not False:
            # The parameter is the value the user sees, and the master copy must round to
            # it. A loaded one may not: its checkpoint may have been stepped since by an
            # optimizer that only carried it along (torch.optim keeps the key). Taken up
            # element by element, as the step takes up a write, it would mix that
            # optimizer's trajectory with the copy's: checked whole at the first step.
            # (The optimizer's own copy, carried into a rebuilt bucket, is not news.)
            bucket.unchecked[i] = True
        return cast

    def _check_loaded(self, bucket: _flat.Bucket, batch: _flat.Batch) -> None:
        """A loaded master copy that does not round to its parameter restarts whole from it,
        with a warning: its checkpoint is not the model's (stepped since by an optimizer
        that only carried the copy along). Whatever else wrote the parameter since the copy
        was made or stepped (the model's load after the optimizer's, a clamp, `p.data`) the
        update itself takes up, element by element (`kernels/adam.py`, MASTER)."""
        if self._has_master(bucket):
            stale = []
            for i in batch.index:
                if bucket.unchecked.pop(i, None) is None:
                    continue
                p = _flat.local(bucket.params[i])
                master = bucket.view("master_param", i)
                rounded = master.to(p.dtype)
                kept = (rounded == p) | (p != p) & (rounded != rounded)   # NaN where NaN was
                if not bool(kept.all()):
                    master.copy_(p)
                    stale.append(self._global_index(bucket.params[i]))
            if stale:
                warnings.warn(
                    f"fusedopt.{type(self).__name__}: the loaded master copy of parameter(s) {stale} does not round "
                    "to the parameter's value, so the parameter changed after the master copy was saved (stepped "
                    "by an optimizer without master weights, or set by hand): the master copy restarts from the "
                    "parameter", stacklevel=user_stacklevel())
            return
        super()._check_loaded(bucket, batch)

    def _cast(self, p: Tensor, key, value):
        # torch casts floating state to the parameter's dtype: that would round the master
        # copy and fp32 moments of a bf16 parameter, and NAdam's fp32 mu_product, which the
        # fp32 math then reads. With a precision option, that state keeps its dtype here and
        # is rounded once, to its buffer's dtype, when copied in.
        precision = self.master_weights or self.state_dtype is not None or self.stochastic_rounding
        if ((key in self._flat_state or key in self._scalar_state) and isinstance(value, Tensor)
                and value.is_floating_point() and precision):
            return value.to(device=p.device)
        return Optimizer._cast(p, key, value)

    def __getstate__(self):
        state = super().__getstate__()
        state.update(master_weights=self.master_weights, state_dtype=self.state_dtype,
                     stochastic_rounding=self.stochastic_rounding, sr_seed=self.sr_seed)
        return state

    def _options(self, group, on_device: bool = False) -> kernels.AdamOptions:
        """The group's options for the kernels. `on_device` (capturable=True): a tensor lr or
        betas stays a tensor, so that the scalar table is computed on the device from the
        device-side step counts and no value is read back to the host (a CUDA graph can
        capture the step, and a changed lr tensor is seen by the replays)."""
        beta1, beta2 = pair(group, "betas")
        scalar = as_float if not on_device else (lambda x, name: x.to(torch.float64) if isinstance(x, Tensor) else x)
        return kernels.AdamOptions(
            lr=scalar(group["lr"], "lr"), beta1=scalar(beta1, "betas[0]"), beta2=scalar(beta2, "betas[1]"),
            eps=group["eps"], weight_decay=float_option(group, "weight_decay"),
            amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group["maximize"]),
            decoupled=bool(group.get("decoupled_weight_decay", False)), variant=self._variant,
            momentum_decay=group.get("momentum_decay", 0.0))

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group, on_device=bool(group.get("capturable")))
        state = self._buffers(group, bucket, batch)
        if self._has_master(bucket):
            o = dataclasses.replace(o, master=True)
            state["master_param"] = bucket.buffers["master_param"]
        self._advance_steps(bucket, batch)
        self._advance_scalars(bucket, batch, o)
        if self._rounds_stochastically(bucket):
            o = dataclasses.replace(o, stochastic_rounding=True)
            gi, bi, _ = self._slots[id(bucket.params[0])]
            state["sr_seeds"] = _launch.step_seeds(self.sr_seed, gi << 16 | bi, bucket.steps).to(bucket.device)
        kernels.step_bucket(bucket, batch, state, o)

    def _advance_scalars(self, bucket: _flat.Bucket, batch: _flat.Batch, o: kernels.AdamOptions) -> None:
        """Per-parameter scalar state other than `step` that the step itself updates."""
