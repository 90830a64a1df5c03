"""Checkpoints in torch's format: `state_dict()` (the live state views, SGD's sparse
momentum exported sparse) and `load_state_dict()`, which validates everything against the
optimizer before anything changes and casts loaded state as torch does."""
from __future__ import annotations

import numbers
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy


class Checkpoint:
    """`state_dict` and `load_state_dict` of `fusedopt.Optimizer` (a mixin of it only: it
    reads the state kinds the base class declares, and loads through its `__setstate__`)."""

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
        parameter stepped with sparse gradients (`ParamState.sparse_dim`). State torch keeps
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
        saved_groups = list(deepcopy(state_dict["param_groups"]))   # (a tuple too, as torch takes it)
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
        # A checkpoint's values are copied in, not adopted for writing back after each step
        # as a dict put in place of `opt.state` is (`_sync_state`): torch steps a loaded
        # tensor itself, but nothing relies on a checkpoint following the optimizer, and a
        # caller who keeps it (`ckpt = torch.load(...)` in scope for the whole run) would
        # have every step copy the state back into it: twice an Adam step's time on a CPU.
        self._written_back = None
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
                # (a lazy module's parameter not yet materialized has no shape: its state is
                # checked when it gets one, `Optimizer._group_buckets`)
                if not is_lazy(p) and value.shape != p.shape:
                    raise ValueError(
                        f"loaded state dict has state '{name}' of shape {tuple(value.shape)} for parameter {key}, "
                        f"whose shape is {tuple(p.shape)}")
            if name in self._scalar_state:
                if isinstance(value, Tensor):
                    if value.numel() != 1:
                        raise ValueError(f"loaded state dict has a '{name}' of {value.numel()} elements for parameter {key}")
                    if value.is_complex() or value.dtype == torch.bool or value.is_meta:
                        # Read as a number when the state is laid out, after the groups are
                        # replaced; torch keeps it and fails at the step (RuntimeError).
                        raise RuntimeError(
                            f"loaded state dict has a '{name}' of dtype {value.dtype} on {value.device} for parameter "
                            f"{key}; expected a real number readable on the host")
                elif isinstance(value, bool) or not isinstance(value, numbers.Real):
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
