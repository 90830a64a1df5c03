"""`opt.state`: the mapping torch's code and users read and write, kept one with the flat
buffers.

An optimizer's `state` is a `State`, whose entries are `ParamState`s holding views of the
parameter's segments of its bucket's flat buffers (`_flat.Bucket.state_view`). A tensor
assigned over a view is copied into it; every other change to an entry or to the mapping
(a new key, a number, a removed key, a whole entry assigned or removed) is handed to the
optimizer that owns it, through its `_adopt` and `_forget`, which bring the flat state in
line (`optimizer.Optimizer`).

torch rebinds: a tensor or entry replaced or removed in its `opt.state` keeps its values
and is no longer stepped. Here it is a view of a segment the next write reuses, so one
that anything else still holds (a swap of two parameters' state, an entry popped to be put
back later) is first given memory of its own, with its values (`let_go`). Whether
anything else holds it is its reference count: a tensor nobody else can reach costs no copy.
"""
from __future__ import annotations

import sys
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
        if isinstance(current, Tensor) and isinstance(value, Tensor) and value is not current and not self.unfit \
                and self._owner is not None:
            if value.shape != current.shape:
                raise ValueError(
                    f"state '{key}' has shape {tuple(current.shape)}; cannot assign a tensor of shape {tuple(value.shape)}")
            if value.layout is torch.sparse_coo:  # torch's sparse momentum buffer (see Optimizer._adopt)
                self.sparse_dim = value.sparse_dim()
                value = value.to_dense()
            # detached: the state is a copy, not a node of the value's graph (`p * 0.5`)
            source = _flat.shard_like(value.detach(), current)
            if sys.getrefcount(current) > _ONLY_HERE:   # (the entry, `current`, the call's argument)
                # held elsewhere (`a, b = st[k], ...`, a swap): it keeps its values, the
                # entry takes a new view of the segment
                fresh = _another_view(current)
                if fresh is not None:
                    let_go(current)
                    dict.__setitem__(self, key, fresh)
                    current = fresh
            target = _flat.local(current)
            if source.untyped_storage().data_ptr() == target.untyped_storage().data_ptr():
                source = source.clone()   # (`st[k] = st[k].t()`: a copy_ between overlapping elements raises)
            target.copy_(source)
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

    def release(self, held: bool) -> None:
        """This entry is no longer its parameter's state (replaced or removed in `opt.state`):
        it becomes a plain dict, and its views of the flat state, which the optimizer reuses,
        are given memory of their own where anything else can reach them: every one if the
        entry itself is `held`, else those held on their own."""
        if self._owner is None:
            return
        self._owner = self._param = None
        if self.unfit:
            return   # (its tensors are its own: `Optimizer._keep_unfit`)
        for key in list(self):
            t = dict.__getitem__(self, key)
            if isinstance(t, Tensor) and (held or sys.getrefcount(t) > _ONLY_HERE):   # (the entry, `t`, the argument)
                let_go(t)


# `sys.getrefcount` of a value that only its dict, one local name and the call's own
# argument reference: more means that something else holds it.
_ONLY_HERE = 3


def _another_view(t: Tensor) -> Tensor | None:
    """A new tensor object viewing the same elements as the plain tensor `t` (None for a
    tensor subclass, a DTensor: such state keeps being written in place)."""
    if type(t) is not Tensor:
        return None
    return t.as_strided(t.shape, t.stride(), t.storage_offset())


def let_go(t: Tensor) -> None:
    """Give a view of the flat state memory of its own, with the values it shows: it is no
    longer the optimizer's state, which goes on in the segment it viewed."""
    if type(t) is Tensor:
        t.data = t.detach().clone()


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
        old = dict.get(self, p)
        if isinstance(old, ParamState) and old is not entries:
            # A rebuild the group has pending (its list edited) runs first: it carries the
            # entries as they are, and must not carry this one once it is let go.
            owner._slot(p)
            # (held: by more than this dict, `old` and the argument; `opt.state[a],
            # opt.state[b] = opt.state[b], opt.state[a]` holds a's entry until b's is set)
            old.release(sys.getrefcount(old) > _ONLY_HERE)
        owner._adopt(p, entries)

    def __delitem__(self, p):
        old = dict.__getitem__(self, p) if p in self else None
        super().__delitem__(p)
        owner = self.owner
        if owner is not None:
            if isinstance(old, ParamState):
                old.release(sys.getrefcount(old) > _ONLY_HERE - 1)   # (`old` and the argument; `pop` holds it too)
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
            if isinstance(entry, ParamState):
                entry.release(True)   # (returned to the caller)
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
