"""A whole optimizer step as one `torch.library` custom op, `fusedopt::step`, so that
`torch.compile` traces through `opt.step()` instead of breaking the graph around it.

What a step does on the host (gradients found by address, pointer and scalar tables,
float64 step-dependent scalars, lazily built buckets and state) cannot be traced by
dynamo, so the op is opaque: dynamo traces only the cheap Python around it (the lists
of parameters, gradients and state tensors) and the graph calls the op, whose eager
implementation runs `Optimizer._step_body` when the graph runs.

Why `custom_op` and not `torch.library.triton_op` (for the Triton path on a GPU):
`triton_op` registers the function itself as the op's fake implementation and, under
`FunctionalTensorMode`, traces it to decompose the op for Inductor (torch/_library/
triton.py), so the body must be made of ops on tensors and `wrap_triton` kernel calls
whose tensor arguments are everything the kernel touches. fusedopt's launcher computes
`data_ptr()` offsets of parameters and gradients from an anchor pointer (a fake tensor
has no data pointer), and its kernels reach parameters and gradients only through that
offset table, which no tracer can see through.

Why one op per step and not one per bucket: clipping (`max_grad_norm`) reduces every
bucket's gradients before any bucket is updated, and a first step builds buckets and
their state; one op keeps both inside the opaque part with the eager code's order.

The op's inputs are what the step reads and writes, so that functionalization orders it
correctly against the rest of the graph:

* ``params`` (mutated): every parameter, in `param_groups` order;
* ``grads`` (read): each parameter's ``.grad`` or None;
* ``state`` (mutated): every flat buffer and scalar vector of every bucket
  (`TracedStep._op_state`): `opt.state[p]` holds views of them;
* ``options`` and ``numbers`` (read): the groups' hyperparameters, tensors and Python
  numbers, in the order `option_leaves` walks them (so that an lr the compiled function
  changed before `step()` reaches the op as the graph has it);
* ``amp`` (read): GradScaler's ``grad_scale`` and ``found_inf`` (fused=True).

AOT autograd may hand the op clones of the mutated inputs and copy them back afterwards
(`auto_functionalized`); `TracedStep._step_from_op` then copies the clones in, runs the
step on the optimizer's own tensors, and copies the results out.

The optimizer's side of all this (the traced step, the op's inputs, the state a traced
first step prepares, the op's body) is `TracedStep`, a mixin of `fusedopt.Optimizer`.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import _flat

# Optimizers by handle: the op's int argument names its optimizer. Weak, so that a
# compiled graph that outlives its optimizer does not keep it alive.
_OPTIMIZERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register(opt) -> int:
    handle = next(_HANDLES)
    _OPTIMIZERS[handle] = opt
    return handle


def optimizer(handle: int):
    opt = _OPTIMIZERS.get(handle)
    if opt is None:
        raise RuntimeError(f"fusedopt::step: optimizer {handle} no longer exists (a compiled step outlived it)")
    return opt


# Declared `Tensor?[]` and not mutated: the op never writes a gradient (an eager step
# under GradScaler with fused=True leaves them unscaled; the op steps with copies of them,
# see `TracedStep._step_from_op`). torch 2.13 cannot functionalize a mutated `Tensor?[]`
# that holds a None (auto_functionalize_v2 appends to a dict), which a parameter without
# a gradient gives.
@torch.library.custom_op("fusedopt::step", mutates_args=("params", "state"))
def step(handle: int, params: list[Tensor], grads: list[Optional[Tensor]], state: list[Tensor],
         options: list[Tensor], numbers: list[float], amp: list[Optional[Tensor]]) -> None:
    """One optimizer step of optimizer `handle` on the given tensors; see the module docstring."""
    optimizer(handle)._step_from_op(params, grads, state, options, numbers, amp)


@step.register_fake
def _(handle, params, grads, state, options, numbers, amp) -> None:
    # Mutates its inputs in place and returns nothing: no metadata to compute.
    return None


def _leaves(value):
    return value if isinstance(value, (tuple, list)) else (value,)


def _is_number(x) -> bool:
    return isinstance(x, (bool, int, float)) and not isinstance(x, Tensor)


# Not passed to the op: "params" are its own input, and dynamo shows every traced param
# group with "capturable": True whatever the group holds (OptimizerVariable._set_capturable
# in torch/_dynamo/variables/optimizer.py, for torch's own optimizers' sake); the op reads
# the real value, which only decides where a new bucket keeps `step`.
_NOT_OPTIONS = ("params", "capturable")


def option_leaves(groups: list[dict]) -> tuple[list[Tensor], list[float]]:
    """The groups' tensor and numeric hyperparameters (one level of tuples and lists
    opened, for betas and etas), in group and key order. Traced by dynamo."""
    tensors, numbers = [], []
    for group in groups:
        for key, value in group.items():
            if key in _NOT_OPTIONS:
                continue
            for leaf in _leaves(value):
                if isinstance(leaf, Tensor):
                    tensors.append(leaf)
                elif _is_number(leaf):
                    numbers.append(float(leaf))
    return tensors, numbers


def groups_with(groups: list[dict], tensors: list[Tensor], numbers: list[float]) -> list[dict]:
    """`groups` with the op's hyperparameters in place of their own, walked as
    `option_leaves` walks them. A group whose values are the same is returned itself."""
    t, n = iter(tensors), iter(numbers)
    out = []
    try:
        for group in groups:
            changed = {}
            for key, value in group.items():
                if key in _NOT_OPTIONS:
                    continue
                leaves, differs = [], False
                for leaf in _leaves(value):
                    if isinstance(leaf, Tensor):
                        given = next(t)
                    elif _is_number(leaf):
                        # The graph's float: an int option (SGD's weight_decay=0) may have
                        # become 0.2 in it; a flag stays a bool.
                        given = next(n)
                        given = bool(given) if isinstance(leaf, bool) else leaf if given == leaf else given
                    else:
                        given = leaf
                    differs |= given is not leaf
                    leaves.append(given)
                if differs:
                    changed[key] = type(value)(leaves) if isinstance(value, (tuple, list)) else leaves[0]
            out.append({**group, **changed} if changed else group)
        leftover = next(t, None) is not None or next(n, None) is not None
    except StopIteration:
        leftover = True
    if leftover:
        raise RuntimeError(
            "fusedopt: a parameter group's options changed shape inside the compiled function before step() "
            "(a key added or removed, or a value changed between a tensor and a number); the compiled step "
            "cannot match them to the group. help: change options outside the compiled function, or keep "
            "their types")
    return out


def prepare(opt) -> int:
    """Build the buckets and allocate the state tensors the next step will use, and
    create the `opt.state` entries of the parameters it steps for the first time.

    Dynamo calls it with the real optimizer when it traces `step()`, outside the graph,
    and bakes in its result (see below), so that the state exists before the traced code
    lists it: a first step compiled from scratch then compiles once, not again when the
    state appears, and code traced after `step()` (a post-hook, a read of `opt.state[p]`)
    sees the entries, as torch's optimizers, whose `_init_group` dynamo runs at trace
    time, create theirs. The step itself still starts those parameters' state when the
    graph runs (SGD's momentum starts as the first gradient), and drops the entries if
    it raises (`TracedStep._prepare_state`).
    """
    try:
        opt._prepare_state()
    except Exception:  # noqa: BLE001
        # The step raises it, with its own type, when the graph runs the op.
        pass
    return 0


# What `torch.compiler.assume_constant_result(prepare)` does (torch/_dynamo/decorators.py),
# without importing torch._dynamo (a second) at `import fusedopt`; tests/test_compile.py
# checks that torch still marks functions this way.
prepare._dynamo_marked_constant = True


class TracedStep:
    """The part of `fusedopt.Optimizer` that runs under `torch.compile`: the step dynamo
    traces (`_traced_step`), the op's inputs, the state a traced first step prepares, and
    the op's body (`_step_from_op`), which runs the eager `_step_body` on the op's tensors.
    A mixin of the base class only: it uses the optimizer's buckets and state as its own."""

    def _traced_step(self, closure):
        """`step()` as dynamo traces it: only cheap Python, then the `fusedopt::step` op.

        The lists below are the op's inputs (see the module docstring); reading
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
        prepare(self)
        torch.ops.fusedopt.step(*self._op_inputs())
        return loss

    def _op_inputs(self) -> tuple:
        """The arguments of `fusedopt::step` for this optimizer's next step (see the
        module docstring): traced by dynamo, and what tests hand to opcheck."""
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params]
        options, numbers = option_leaves(self.param_groups)
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
                    state[p]   # (`State.__missing__` makes the entry; `_init_state` fills it)
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
        pairs = [(own, given) for own, given in zip(itertools.chain(own_params, own_state),
                                                    itertools.chain(params, state))
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
        grads_by_id = {id(p): g for p, g in zip(own_params, grads)}
        amp_inputs = tuple(amp) if amp else None
        if amp_inputs is not None:
            # An eager step leaves the gradients unscaled, as torch's fused kernels do; the
            # op declares its gradients read-only, so it steps with copies and leaves the
            # user's scaled (README, "Using fusedopt with GradScaler").
            grads_by_id = {k: None if g is None else g.clone() for k, g in grads_by_id.items()}
        try:
            with torch.no_grad():
                self._step_body(groups_with(self.param_groups, options, numbers), grads_by_id, amp_inputs)
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
