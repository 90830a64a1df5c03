"""`opt.state`: the mapping torch's code and users read and write, kept one with the flat
buffers.

An optimizer's `state` is a `State`, whose entries are `ParamState`s holding views of the
parameter's segments of its bucket's flat buffers (`_flat.Bucket.state_view`). A tensor
assigned over a view is copied into it; every other change to an entry or to the mapping
(a new key, a number, a removed key, a whole entry assigned or removed) is handed to the
optimizer that owns it, through its `_adopt` and `_forget`, which bring the flat state in
line (`optimizer.Optimizer`).
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import _flat

if TYPE_CHECKING:
    from .optimizer import Optimizer


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


class ParamState(_WritesThroughSetitem, dict):
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

    `unfit` (an attribute): the entry's state does not fit its parameter's shape and is kept
    as it is, out of the flat buffers (`Optimizer._keep_unfit`); a tensor assigned to it
    replaces the one there, and the entry is adopted again.
    """

    sparse_dim: int | None = None
    unfit: bool = False
    _owner: weakref.ref | None = None   # the optimizer (weak: no cycle keeps its buffers alive)
    _param: Tensor | None = None

    def __setitem__(self, key, value):
        current = self.get(key)
        if isinstance(current, Tensor) and isinstance(value, Tensor) and value is not current and not self.unfit:
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

    def bind(self, owner: Optimizer, param: Tensor) -> None:
        """Make this the entry of `param` in `owner.state`, whose changes `owner` adopts."""
        self._owner, self._param = weakref.ref(owner), param

    def _changed(self) -> None:
        owner = self._owner() if self._owner is not None else None
        if owner is not None and isinstance(owner.state, State) and dict.get(owner.state, self._param) is self:
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


def _rebuild_param_state(entries: dict, sparse_dim: int | None) -> ParamState:
    state = ParamState(entries)
    state.sparse_dim = sparse_dim
    return state


def mark_sparse(state, grad: Tensor) -> None:
    """Note on a parameter's state that it was stepped with a sparse gradient of this many
    sparse dimensions (`ParamState.sparse_dim`; a plain dict put in `opt.state` takes none)."""
    if isinstance(state, ParamState):
        state.sparse_dim = grad.sparse_dim()


def set_view(state: dict, key: str, view: Tensor) -> None:
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


class State(_WritesThroughSetitem, defaultdict):
    """`opt.state`: adopts whole per-parameter dicts assigned into it (also by `update` and
    `setdefault`), and forgets a parameter's flat state when its entry is removed (also by
    `pop`, `popitem` and `clear`): its next step starts afresh, as torch's does."""

    def __init__(self, owner: Optimizer):
        super().__init__(dict)
        # Weak, as `ParamState._owner`: `opt.state` holding the optimizer would make a
        # cycle, and `del opt` would keep every flat buffer until the cycle collector runs
        # (torch.optim's are freed at once). Outlived by its optimizer, it is a plain dict.
        self._owner_ref = weakref.ref(owner)

    @property
    def owner(self) -> Optimizer | None:
        return self._owner_ref()

    def __missing__(self, p):
        owner = self.owner
        if owner is None:
            return super().__missing__(p)
        entry = ParamState()
        entry.bind(owner, p)
        dict.__setitem__(self, p, entry)
        return entry

    def __setitem__(self, p, entries):
        owner = self.owner
        if owner is None:
            return dict.__setitem__(self, p, entries)
        owner._adopt(p, entries)

    def __delitem__(self, p):
        super().__delitem__(p)
        owner = self.owner
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
        owner = self.owner
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
