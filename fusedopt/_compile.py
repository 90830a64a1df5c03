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
  (`Optimizer._op_state`): `opt.state[p]` holds views of them;
* ``options`` and ``numbers`` (read): the groups' hyperparameters, tensors and Python
  numbers, in the order `option_leaves` walks them (so that an lr the compiled function
  changed before `step()` reaches the op as the graph has it);
* ``amp`` (read): GradScaler's ``grad_scale`` and ``found_inf`` (fused=True).

AOT autograd may hand the op clones of the mutated inputs and copy them back afterwards
(`auto_functionalized`); `Optimizer._step_from_op` then copies the clones in, runs the
step on the optimizer's own tensors, and copies the results out.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

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
# see `Optimizer._step_from_op`). torch 2.13 cannot functionalize a mutated `Tensor?[]`
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
    it raises (`Optimizer._prepare_state`).
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
