"""The 'native' path: torch's own CPU implementation of an algorithm, run on fusedopt's
flat state. It is what `backend='auto'` takes on a CPU.

On a CPU the fastest correct step is torch's own code: its fused kernel where torch has
one that is right for the dtype (Adam, AdamW and Adagrad in fp32, fp64 and bf16, and in fp16
for a group with `fused=True`, as torch; SGD in fp32 and fp64, see `Optimizer._native_dtypes`), its multi-tensor (foreach)
implementation otherwise, or its for-loop for the tensor sizes where that measured faster
(`LOOP_WINDOW`). The numbers are therefore torch's, to the rounding in which torch's own paths
differ from each other. What the flat layout adds is fewer, larger tensors:

* a large tensor is handed to torch as itself, with views of its state segments in its
  own shape and strides (nothing is copied);
* a run of consecutive small tensors is handed over as one tensor: its parameters and
  gradients are gathered by one `torch.cat` with the zero padding between segments, so
  the gathered tensor lines up with the run's slice of each flat state buffer, which is
  passed as it is; after the step one `_foreach_copy_` returns the parameters.

torch's multi-tensor CPU paths pay per tensor and per op (a dispatch, a loop over the
list), so a run of a thousand tiny tensors costs one tensor's overhead plus a gather and a
scatter. Its fused kernels and its SGD cost less per tensor than that: they get no runs,
only the flat state (and one op for every tensor's step count instead of one each). A run
shares one step count (and NAdam's `mu_product`, ASGD's `eta` and `mu`): runs stop where
those differ, or where a tensor has no gradient this step, and the run's first tensor's
scalars stand for it, copied to the others after the step. Padding elements compute on
zeros and stay finite; nothing reads them.

fusedopt's own options (master weights, low-precision state, stochastic rounding,
`max_grad_norm`) are steps torch's implementation does not know: `_composed.py` runs them
as torch's fused kernel with conversions around it, on this module's plans.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor
# The functional API of each algorithm (torch.optim imports only some of these modules).
from torch.optim import adadelta, adagrad, adam, adamax, asgd, nadam, radam, rmsprop, rprop, sgd

from . import _composed, _flat
from .kernels import adagrad as adagrad_kernels
from .kernels import adam as adam_kernels
from .kernels import sgd as sgd_kernels

# Tensors smaller than this (elements) join runs. torch's multi-tensor implementations pay
# a dispatch per tensor per op, ten to twenty ops a step, which a gather and a scatter (a
# copy each way) undercut up to tens of thousands of elements. Its fused kernels cost less
# per tensor (0.6 us for Adam on this CPU) than the copies would: no runs for them.
RUN_BELOW = {"fused": 0, "foreach": 16384}
# A run costs two torch.cat calls a step plus a share of one scatter, about what eight
# tensors' dispatches save: shorter sequences of small tensors (a LayerNorm's weight and
# bias between two matrices) go as tensors of their own.
MIN_RUN = 8
# Which of torch's two non-fused implementations runs an entry: the multi-tensor one (an
# op over every entry, then the next op: one dispatch per op) or the for-loop (every op on
# one entry, then the next: the entry's tensors stay in the core's cache between ops).
# Entries whose bytes fall in an algorithm's [low, high) window take the for-loop; the
# rest, and every entry of an unlisted algorithm, the multi-tensor code. A window is where
# the for-loop won on the Intel Xeon (2 MB of L2 a core) these choices were first measured
# on and did not lose on the AMD EPYC (1 MB) measured since, fp32 tensors each way, cold
# cache. For-loop time over multi-tensor time, Xeon / EPYC (two runs):
#   NAdam     128 KB-1 MB 0.80-0.90 / 0.53-1.04 (a tie at 128 KB); from 2 MB 1.10 / 0.88-0.97
#   Adamax    from 128 KB 0.70-0.80 / 0.40-0.92
#   Adadelta  from 128 KB 0.70-0.80 / 0.75-0.94
#   RMSprop   128-256 KB  0.70-0.80 / 1.02-1.07 (a loss); from 512 KB 0.70-0.80 / 0.81-0.92
#   ASGD      every size (its multi-tensor code makes more passes): 0.14-0.75 on the EPYC
# Below 128 KB the for-loop's dispatches cost more than it saves. RAdam's for-loop does
# more work, Rprop's and SGD's gain too little to pay for a second call.
# `benchmarks/loop_window.py` measures these on any CPU; the EPYC's second run is
# benchmarks/results/cpu-amd-epyc/loop_window.md.
LOOP_WINDOW = {"ASGD": (0, None), "NAdam": (1 << 17, 3 << 19), "Adamax": (1 << 17, None),
               "Adadelta": (1 << 17, None), "RMSprop": (1 << 19, None)}
# Up to this many entries in a call (a bucket of a parameter group of one weight and its
# bias, as layer-wise learning rates make them), the for-loop runs them all: the
# multi-tensor code's per-op cost is not shared out. torch's own two paths on 1, 2 and 4
# tensors of 4096 and 64 elements, for-loop time over multi-tensor time on the EPYC:
# 0.71-0.83, 0.84-1.00 and 0.97-1.23 (NAdam, RMSprop, Adadelta, Adamax, RAdam, Rprop, Adam).
# fp32 and fp64 only, as the window: in bf16 and fp16 the two paths round differently, and
# which one a tensor took would depend on what else its bucket holds.
FEW_FOR_LOOP = 2


@dataclass(frozen=True)
class Native:
    """How torch runs one algorithm: its per-tensor scalar state and its two entry points."""

    scalars: tuple[str, ...]        # per-tensor scalar kinds passed as 0-dim tensors
    fused: Callable | None          # torch's fused CPU kernel, or None
    foreach: Callable               # torch's functional API (multi-tensor or for-loop)
    # Whether runs pay off: not for SGD, whose one or three foreach ops a step cost less
    # per tensor than a gather and a scatter do.
    runs: bool = True
    # Whether torch's for-loop, with these options, steps a gradient of another dtype than
    # its parameter (`param.grad_dtype`), computing with it as it is. Where it raises (the
    # dtype checks of its Adam family's and centered RMSprop's lerp_), and only after it has
    # changed some tensors, fusedopt reads a copy in the parameter's dtype instead, as its
    # kernels do.
    takes_other_grad_dtypes: Callable[..., bool] = lambda o: True
    # Whether a group's tensor options (an lr tensor, tensor betas, ...) go to torch's
    # for-loop as they are, as torch.optim's CPU default computes with them: not for SGD,
    # whose bf16/fp16 step is torch's multi-tensor ops (issued by fusedopt), reading them
    # as numbers, as it reads Python floats.
    tensor_options: bool = True
    # Whether, given the options and the lowest step count the step starts from, torch's
    # multi-tensor code would give another result than its for-loop (torch.optim's CPU
    # default) beyond rounding: then the for-loop runs every tensor.
    loop_if: Callable[..., bool] | None = None


# ----------------------------------------------------------------------------- algorithms
# Each function takes the entries (params, grads), the state lists by key, the scalar lists
# by kind, the bucket indices the entries start at, the algorithm's options, and the
# step's context (fresh tensors, GradScaler's grad_ops). torch's functional API advances
# the step counts itself; its fused kernels read them already advanced.

def _adam_fused(params, grads, state, scalars, reps, o, ctx):
    adam_kernels.adam_native(params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", []),
                             scalars["step"], o, ctx.grad_ops)


def _adam_foreach(params, grads, state, scalars, reps, o, ctx):
    adam.adam(params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", []),
              scalars["step"], foreach=ctx.foreach, decoupled_weight_decay=o.decoupled, amsgrad=o.amsgrad,
              beta1=o.beta1, beta2=o.beta2, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps,
              maximize=o.maximize)


def _nadam(params, grads, state, scalars, reps, o, ctx):
    # torch's multi-tensor NAdam cannot take a tensor momentum_decay (its _foreach_addcdiv_
    # gets a tuple of tensors); its for-loop, what torch.optim.NAdam runs on the CPU, can.
    # Nor does it give the for-loop's mu_product where a checkpoint made it bf16/fp16 (torch's
    # load casts state to the parameter's dtype): `_foreach_mul_` rounds each mu to that dtype
    # before multiplying, `mu_product *= mu` multiplies in fp32 and rounds once.
    foreach = (ctx.foreach and not isinstance(o.momentum_decay, Tensor)
               and scalars["mu_product"][0].dtype in (torch.float32, torch.float64))
    nadam.nadam(params, grads, state["exp_avg"], state["exp_avg_sq"], scalars["mu_product"],
                scalars["step"], decoupled_weight_decay=o.decoupled, foreach=foreach, maximize=o.maximize,
                beta1=o.beta1, beta2=o.beta2, lr=o.lr, weight_decay=o.weight_decay,
                momentum_decay=o.momentum_decay, eps=o.eps)


def _radam(params, grads, state, scalars, reps, o, ctx):
    radam.radam(params, grads, state["exp_avg"], state["exp_avg_sq"], scalars["step"],
                decoupled_weight_decay=o.decoupled, foreach=ctx.foreach, maximize=o.maximize, beta1=o.beta1,
                beta2=o.beta2, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps)


def _nadam_beta2_above_1(o, lowest_step: float) -> bool:
    # A beta2 above 1 (set in a group after construction, which refuses it): torch's
    # multi-tensor NAdam takes the square root of 1 - beta2**step as a Python float, a
    # complex number its ops refuse (RuntimeError, after updating the moments); its
    # for-loop divides tensors by it, NaN, and steps on.
    return float(o.beta2) > 1


def _radam_unrectified(o, lowest_step: float) -> bool:
    # Whether a tensor takes a step before RAdam rectifies its variance (rho_t <= 5: the first
    # 5 steps with beta2 = 0.999). There torch's for-loop adds the bias-corrected momentum
    # alone; its multi-tensor code still computes lr * rect / (sqrt(exp_avg_sq) + eps) and
    # multiplies it by rect = 0, which is NaN where exp_avg_sq is 0 (gradients that were 0,
    # or whose square underflowed in fp16, where eps = 1e-8 is 0 too, or eps = 0): that
    # element's parameter is NaN for good, where torch.optim's default keeps it finite.
    # (rho_t grows with the step, so the lowest step count decides.)
    beta2 = float(o.beta2)
    step = lowest_step + 1
    if beta2 >= 1.0 or step <= 0:
        return True
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * step * beta2 ** step / (1 - beta2 ** step) <= 5


def _adamax(params, grads, state, scalars, reps, o, ctx):
    adamax.adamax(params, grads, state["exp_avg"], state["exp_inf"], scalars["step"], foreach=ctx.foreach,
                  maximize=o.maximize, eps=o.eps, beta1=o.beta1, beta2=o.beta2, lr=o.lr,
                  weight_decay=o.weight_decay)


def _adagrad_fused(params, grads, state, scalars, reps, o, ctx):
    adagrad_kernels.adagrad_native(params, grads, state["sum"], scalars["step"], o, ctx.grad_ops)


def _adagrad_foreach(params, grads, state, scalars, reps, o, ctx):
    adagrad.adagrad(params, grads, state["sum"], scalars["step"], foreach=ctx.foreach, lr=o.lr,
                    weight_decay=o.weight_decay, lr_decay=o.lr_decay, eps=o.eps, maximize=o.maximize)


def _sgd_fused(params, grads, state, scalars, reps, o, ctx):
    first = [i in ctx.fresh for i in reps] if ctx.fresh else [False] * len(reps)
    sgd_kernels.sgd_native(params, grads, state.get("momentum_buffer", []), first, o, ctx.grad_ops)


def _sgd_foreach(params, grads, state, scalars, reps, o, ctx):
    # torch's multi-tensor SGD, run by fusedopt (SGD has no for-loop window: always foreach)
    first = [i in ctx.fresh for i in reps] if ctx.fresh else None
    sgd_kernels.sgd_multi_tensor(params, grads, state.get("momentum_buffer", []), first, o)


def _adadelta(params, grads, state, scalars, reps, o, ctx):
    adadelta.adadelta(params, grads, state["square_avg"], state["acc_delta"], scalars["step"],
                      foreach=ctx.foreach, lr=o.lr, rho=o.rho, eps=o.eps, weight_decay=o.weight_decay,
                      maximize=o.maximize)


def _rmsprop(params, grads, state, scalars, reps, o, ctx):
    rmsprop.rmsprop(params, grads, state["square_avg"], state.get("grad_avg", []),
                    state.get("momentum_buffer", []), scalars["step"], foreach=ctx.foreach, maximize=o.maximize,
                    lr=o.lr, alpha=o.alpha, eps=o.eps, weight_decay=o.weight_decay,
                    momentum=o.momentum, centered=o.centered)


def _rprop(params, grads, state, scalars, reps, o, ctx):
    rprop.rprop(params, grads, state["prev"], state["step_size"], scalars["step"], foreach=ctx.foreach,
                maximize=o.maximize, step_size_min=o.step_size_min, step_size_max=o.step_size_max,
                etaminus=o.etaminus, etaplus=o.etaplus)


def _asgd(params, grads, state, scalars, reps, o, ctx):
    asgd.asgd(params, grads, state["ax"], scalars["mu"], scalars["eta"], scalars["step"], foreach=ctx.foreach,
              maximize=o.maximize, lambd=o.lambd, lr=o.lr if o.lr_tensor is None else o.lr_tensor, t0=o.t0, alpha=o.alpha,
              weight_decay=o.weight_decay)


def _never(o) -> bool:
    return False


_ADAM = Native(("step",), _adam_fused, _adam_foreach, takes_other_grad_dtypes=_never)
IMPLEMENTATIONS = {
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "NAdam": Native(("step", "mu_product"), None, _nadam, takes_other_grad_dtypes=_never, loop_if=_nadam_beta2_above_1),
    "RAdam": Native(("step",), None, _radam, takes_other_grad_dtypes=_never, loop_if=_radam_unrectified),
    "Adamax": Native(("step",), None, _adamax, takes_other_grad_dtypes=_never),
    "Adagrad": Native(("step",), _adagrad_fused, _adagrad_foreach),
    "SGD": Native((), _sgd_fused, _sgd_foreach, runs=False, tensor_options=False),
    "Adadelta": Native(("step",), None, _adadelta),
    "RMSprop": Native(("step",), None, _rmsprop, takes_other_grad_dtypes=lambda o: not o.centered),
    "Rprop": Native(("step",), None, _rprop),
    "ASGD": Native(("step", "eta", "mu"), None, _asgd),
}


@functools.lru_cache(maxsize=None)
def implementation(cls: type) -> Native | None:
    """torch's implementation of a fusedopt optimizer class (or of the fusedopt class it
    derives from); None where there is none to run on flat state (SparseAdam, LBFGS)."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("fusedopt") and klass.__name__ in IMPLEMENTATIONS:
            return IMPLEMENTATIONS[klass.__name__]
    return None


@functools.lru_cache(maxsize=None)
def _loop_window(cls: type) -> tuple[int, int | None] | None:
    return next((LOOP_WINDOW[k.__name__] for k in cls.__mro__ if k.__name__ in LOOP_WINDOW), None)


_shape = operator.attrgetter("shape")


def uses_fused(opt, dtype: torch.dtype | None, asked: bool = False) -> bool:
    """Whether torch's fused kernel runs this optimizer's buckets of `dtype`; `asked`:
    whether their group says ``fused=True``."""
    impl = implementation(type(opt))
    return (impl is not None and impl.fused is not None and getattr(opt, "_native", False)
            and (dtype is None or dtype in opt._native_dtypes or (asked and dtype in opt._native_fused_on_request)))


# ----------------------------------------------------------------------------- the step

class _Context(NamedTuple):
    fresh: frozenset
    grad_ops: Tensor | None
    foreach: bool           # torch's multi-tensor implementation, or its for-loop


def step(opt, group: dict, bucket: _flat.Bucket, batch: _flat.Batch, fresh: list[int]) -> bool:
    """Step one bucket with torch's implementation. False when it cannot (the caller then
    takes the reference path): GradScaler's unscaling needs torch's fused kernel."""
    setup = bucket.__dict__.get("_native_setup")
    if setup is None or (setup.asked is not None and setup.asked is not bool(group.get("fused"))):
        setup = bucket._native_setup = _Setup(opt, bucket, group)
    impl = setup.impl
    if impl is None:
        return False
    if setup.composed or opt.max_grad_norm is not None:
        # fusedopt's own options: torch's fused kernel with conversions around it
        # (_composed.py); an algorithm without a fused kernel takes the reference.
        return impl.fused is not None and _composed.step(opt, group, bucket, batch, fresh, setup)
    if batch.grad_ops is not None and not setup.fused:
        return False
    o, all_keys, state_keys, tensor_o = setup.config(opt, group)
    if state_keys and all_keys != getattr(bucket, "state_keys", None):
        opt._buffers(group, bucket, batch)  # checks that every stepped tensor has them
    fresh_set = frozenset(fresh)
    fused, every_tensor_in_loop, grads_in_own_dtype = setup.fused, False, False
    # With GradScaler, torch's kernel writes the unscaled gradients back, which must reach
    # the user's own tensors: no runs then.
    run_below = setup.run_below if batch.grad_ops is None else 0
    if batch.mixed_dtypes:
        # A gradient of another dtype than its parameter: a run's gathered copy, and torch's
        # fused kernels (which refuse it), would round it to the parameter's dtype, where
        # torch's default CPU code, its for-loop, computes with it as it is. That is what
        # runs, where the for-loop takes such gradients and GradScaler needs no fused kernel;
        # elsewhere torch's code reads a copy (see `Native.takes_other_grad_dtypes`).
        run_below = 0
        if batch.grad_ops is None and impl.takes_other_grad_dtypes(o):
            fused, every_tensor_in_loop = False, True
        else:
            grads_in_own_dtype = True
    if tensor_o is not None and not fused:
        # A tensor option: torch.optim's CPU default, its for-loop (its multi-tensor code
        # refuses a tensor lr), computes with the tensor, in the tensor's dtype (a float32
        # lr makes lr / bias_correction a float32 tensor on float64 parameters), where its
        # float would be a double. Runs only where they give its numbers (see `_Setup`).
        o, every_tensor_in_loop = tensor_o, True
        run_below = run_below if setup.exact_runs else 0
    if impl.loop_if is not None and not (fused or every_tensor_in_loop):
        steps = bucket.scalar("step")
        if impl.loop_if(o, float((steps if batch.everyone else steps[batch.index]).min())):
            every_tensor_in_loop = True
            run_below = run_below if setup.exact_runs else 0
    plan = _plan(bucket, batch, impl.scalars, fresh_set if setup.split_fresh else frozenset(), run_below)
    # (the guards spare a stateless step calls and comprehension frames, which cost most
    # with the cold cache a step that follows another model's work starts with)
    params, grads = plan.gather(batch) if plan.runs else (batch.params, batch.grads)
    if grads_in_own_dtype:
        grads = _flat.in_dtype(grads, bucket.real_dtype)
    given = grads   # (what GradScaler's unscaled gradients are told apart by: `Batch.leave_unscaled`)
    if not fused:
        params, grads = plan.in_state_shapes(params, grads)
    one_d = fused and bool(plan.flat)
    if one_d:
        params, grads = plan.one_d(params), plan.one_d(grads)
    state = {k: plan.state_views(bucket, k, one_d) for k in state_keys} if state_keys else {}
    scalars = {k: plan.scalar_views(bucket, k) for k in impl.scalars} if impl.scalars else {}
    if fused and "step" in impl.scalars:
        # One op on the bucket's step vector, where torch's fused wrapper adds to each
        # tensor's step in turn (2000 tiny tensors: 3 ms on this CPU).
        opt._advance_steps(bucket, batch)
    call = impl.fused if fused else impl.foreach
    if every_tensor_in_loop or (not fused and setup.exact_runs and len(plan.entries) <= FEW_FOR_LOOP):
        call(params, grads, state, scalars, plan.reps, o, _Context(fresh_set, batch.grad_ops, False))
    elif setup.loop_window is None:
        call(params, grads, state, scalars, plan.reps, o, _Context(fresh_set, batch.grad_ops, True))
    else:
        for foreach, pick in plan.split(setup.loop_window):
            if pick is None:
                call(params, grads, state, scalars, plan.reps, o, _Context(fresh_set, batch.grad_ops, foreach))
                continue

            def sub(xs):
                return [xs[e] for e in pick]
            call(sub(params), sub(grads), {k: sub(v) for k, v in state.items()},
                 {k: sub(v) for k, v in scalars.items()}, sub(plan.reps), o, _Context(fresh_set, batch.grad_ops, foreach))
    if plan.runs:
        plan.scatter(bucket, impl.scalars)
    if batch.grad_ops is not None:
        batch.unscaled = given   # torch's fused kernel wrote them back unscaled
    return True


class _Setup:
    """What stays fixed for a bucket: torch's implementation and how the native path runs it."""

    def __init__(self, opt, bucket: _flat.Bucket, group: dict):
        self.impl = implementation(type(opt))
        # For a dtype torch's fused kernel runs only on request (fp16), whether the group
        # asked, so that a group whose `fused` changes (a loaded state dict) gets set up again;
        # None where the flag changes nothing.
        self.asked = bool(group.get("fused")) if bucket.dtype in opt._native_fused_on_request else None
        self.fused = uses_fused(opt, bucket.dtype, bool(self.asked))
        # torch's SGD starts a momentum buffer on a tensor's first step, one flag per call.
        self.split_fresh = self.impl is not None and self.impl.foreach is _sgd_foreach
        run_below = RUN_BELOW["fused" if self.fused or not (self.impl and self.impl.runs) else "foreach"]
        self.run_below = run_below if _can_run(bucket.numels, run_below) else 0
        # A precision option on this bucket (master weights, bf16 state, stochastic
        # rounding): every step is composed. Its per-tensor copies cost what the
        # multi-tensor code's ops do, so runs pay as they do there.
        self.composed = _composed.has_option(opt, bucket)
        below = RUN_BELOW["foreach"]
        self.composed_run_below = below if _can_run(bucket.numels, below) else 0
        window = None if self.fused else _loop_window(type(opt))
        itemsize = torch.empty((), dtype=bucket.real_dtype).element_size()
        if window is not None and window != (0, None) and itemsize < 4:
            # bf16/fp16 math is bound by conversions, not memory: the for-loop's cache
            # gains nothing there (measured), ASGD's fewer passes still do.
            window = None
        self.loop_window = None if window is None else tuple(None if w is None else w // itemsize for w in window)
        # Whether a run gives torch's for-loop numbers to the bit: not in bf16/fp16, where
        # torch's CPU `add_(x, alpha=a)` rounds an element by where it falls in its tensor
        # (the vectorized body fuses the multiply-add, the scalar tail does not), which a
        # gathered run moves.
        self.exact_runs = itemsize >= 4
        self._config: tuple | None = None

    def config(self, opt, group: dict) -> tuple:
        """The group's options, its state keys (torch's order), the flat ones among them, and,
        where the group holds a tensor option, the options with the group's tensors in place
        of their floats for torch's for-loop (`_tensor_options`; None otherwise); rebuilt
        only when one of the group's values is replaced (a scheduler's lr, an option
        edited): building them is a few microseconds of Python every step otherwise.

        Values are compared by identity (no tensor's __eq__ runs), so the cache is kept only
        for groups whose options are all immutable (numbers, strings, tuples of them): an lr
        tensor, or a list, can change in place. The key holds every value of the group, the
        parameter list too, whose identity is all it needs of it (the options do not depend
        on it): one C-level tuple, where leaving it out took a generator's frame per step."""
        key = tuple(group.values())
        cached = self._config
        if cached is not None and len(cached[0]) == len(key) and all(map(operator.is_, cached[0], key)):
            return cached[1]
        all_keys = tuple(opt._state_keys(group))
        o = opt._options(group)
        immutable = all(type(v) in _IMMUTABLE or (type(v) is tuple and all(type(x) in _IMMUTABLE for x in v))
                        for k, v in group.items() if k not in _NOT_OPTIONS)
        tensor_o = None if immutable or not self.impl.tensor_options else _tensor_options(o, group)
        made = o, all_keys, [k for k in all_keys if k not in opt._scalar_state], tensor_o
        self._config = (key, made) if immutable else None
        return made


# The options an algorithm's `_options` reads as floats (the kernels' scalars are computed
# from floats), by field, and where the group keeps each: (key, index in a pair or None).
# Its other options are the group's values as they are.
_FLOATED = {"lr": ("lr", None), "beta1": ("betas", 0), "beta2": ("betas", 1), "etaminus": ("etas", 0),
            "etaplus": ("etas", 1), "step_size_min": ("step_sizes", 0), "step_size_max": ("step_sizes", 1)}


def _tensor_options(o, group: dict):
    """`o` with the group's own tensors in place of the floats read from them, where the
    group holds a tensor option (any, the ones `o` keeps as they are included); None
    otherwise. torch's for-loop computes with a tensor option as a tensor: in its dtype,
    and reading it at the step, so a value written in place (`lr.fill_`, a scheduler's) is
    the value used."""
    if not any(isinstance(v, Tensor) or (type(v) in (tuple, list) and any(isinstance(x, Tensor) for x in v))
               for k, v in group.items() if k not in _NOT_OPTIONS):
        return None
    changes = {}
    for field in dataclasses.fields(o):
        where = _FLOATED.get(field.name)
        if where is not None and where[0] in group:
            key, index = where
            value = group[key] if index is None else group[key][index]
            # (a pair's tensor of one element but not 0-dim, which torch squeezes only for
            # Adam, at construction, makes its for-loop raise halfway through a step on
            # some parameters and not others: that one stays a float, as before)
            if isinstance(value, Tensor) and (index is None or value.dim() == 0):
                changes[field.name] = value
    return dataclasses.replace(o, **changes)


# Group entries that are not options, and the types whose values cannot change in place.
_NOT_OPTIONS = frozenset(("params", "param_names"))
_IMMUTABLE = frozenset((float, int, bool, str, type(None)))


def _can_run(numels: list[int], below: int) -> bool:
    """Whether MIN_RUN consecutive tensors are smaller than `below`: otherwise no step can
    form a run, and the plan need not look for one (on a small model that search, a
    comparison of the step vectors every step, cost 10 us of a 100 us step)."""
    streak = 0
    for n in numels:
        streak = streak + 1 if n < below else 0
        if streak >= MIN_RUN:
            return True
    return False


def _one_d(t: Tensor) -> Tensor:
    # A 1-D tensor of a batch is already in memory order (a stride on a one-element
    # dimension does not matter).
    return t if t.dim() == 1 else _flat.memory_order(t)


def _plan(bucket: _flat.Bucket, batch: _flat.Batch, kinds: tuple[str, ...], split: frozenset, run_below: int):
    """The bucket's cached plan for this step's batch, rebuilt when what decides the runs changed."""
    breaks: set[int] = set()
    if not run_below:
        key = (None if batch.everyone else tuple(batch.index), (), 0)
    else:
        for kind in kinds:
            vec = bucket.scalars.get(kind)
            if vec is not None and len(vec) > 1 and not torch.equal(vec[1:], vec[:-1]):
                breaks.update((torch.nonzero(vec[1:] != vec[:-1]).flatten() + 1).tolist())
        for i in split:
            if i - 1 not in split:
                breaks.add(i)
            if i + 1 not in split:
                breaks.add(i + 1)
        key = (None if batch.everyone else tuple(batch.index), tuple(sorted(breaks)), run_below)
    cached = bucket.__dict__.get("_native_plan")
    if cached is None or cached.key != key:
        cached = bucket._native_plan = _Plan(bucket, batch.index, breaks, run_below, key)
        bucket.views_made = True   # (its state views; `Optimizer._reattach_state`)
    return cached


class _Plan:
    """Which tensors of a bucket go to torch as themselves and which as runs, and the views
    and buffers that serve every step with the same batch and breaks.

    A tensor of its own goes as it is, with state views of its shape and strides (a batch's
    tensors are dense in their state's layout; complex ones come as real views). A run goes
    as 1-D gather buffers and 1-D slices of the state buffers.
    """

    def __init__(self, bucket: _flat.Bucket, index: list[int], breaks: set[int], run_below: int, key):
        self.key = key
        self.entries: list[tuple[int, int]] = []     # [j0, j1) positions in the batch
        n, j = len(index), 0
        while j < n:
            k = j + 1
            if bucket.numels[index[j]] < run_below:
                while (k < n and index[k] == index[k - 1] + 1 and bucket.numels[index[k]] < run_below
                       and index[k] not in breaks):
                    k += 1
            if k - j < MIN_RUN:
                self.entries += [(m, m + 1) for m in range(j, k)]
            else:
                self.entries.append((j, k))
            j = k
        self.reps = [index[j0] for j0, _ in self.entries]
        self.spans = [(bucket.offsets[index[j0]], bucket.offsets[index[j1 - 1]] + bucket.numels[index[j1 - 1]])
                      for j0, j1 in self.entries]
        self.runs = [e for e, (j0, j1) in enumerate(self.entries) if j1 - j0 > 1]
        # The shape each entry's state views have (`state_views`): a tensor's own (a complex
        # one's as real views, with a last dimension of 2), a run's 1-D.
        pair = (2,) if bucket.is_complex else ()
        self.shapes = [torch.Size(bucket.shapes[index[j0]] + pair) if j1 - j0 == 1 else torch.Size([b - a])
                       for (j0, j1), (a, b) in zip(self.entries, self.spans)]
        # Entries that are one tensor, dense but not contiguous (channels_last convolution
        # weights, transposed matrices): torch's fused CPU kernels step those at about half
        # their speed on contiguous memory (ResNet-50's list in channels_last: 1.8 ms against
        # 1.1 for the same tensors as 1-D views; its foreach 1.8), so they get them as 1-D
        # views in memory order, where the parameter, its gradient and its state line up
        # element for element (a batch's tensors are dense in their state's layout).
        self.flat = [e for e, (j0, j1) in enumerate(self.entries)
                     if j1 - j0 == 1 and not bucket.contiguous[index[j0]] and bucket.numels[index[j0]] > 1]
        # Per run: a gather buffer for params and one for grads, torch.cat's inputs with
        # the zero padding between segments (empty pads left out: cat takes a slow path
        # for them), and the views of the params' places in the gather buffer.
        zeros = torch.zeros(_flat.SEGMENT_ALIGN, dtype=bucket.real_dtype, device=bucket.device)
        self.buffers, self.templates, self.homes = {}, {}, []
        members, reps_of = [], []
        for e in self.runs:
            j0, j1 = self.entries[e]
            start, end = self.spans[e]
            p_buf, g_buf = (torch.empty(end - start, dtype=bucket.real_dtype, device=bucket.device) for _ in range(2))
            self.buffers[e] = (p_buf, g_buf)
            template, places = [], []
            for j in range(j0, j1):
                i = index[j]
                places.append(len(template))
                template.append(None)
                pad = bucket.offsets[i + 1] - bucket.offsets[i] - bucket.numels[i] if j < j1 - 1 else 0
                if pad:
                    template.append(zeros[:pad])
                self.homes.append(p_buf[bucket.offsets[i] - start:bucket.offsets[i] - start + bucket.numels[i]])
            self.templates[e] = (template, places)
            members += index[j0 + 1:j1]
            reps_of += [index[j0]] * (j1 - j0 - 1)
        self.members = torch.tensor(members, dtype=torch.long)
        self.reps_of = torch.tensor(reps_of, dtype=torch.long)
        self._views: dict[str, tuple[tuple[int, int], list[Tensor]]] = {}
        self._splits: dict[tuple, list] = {}
        self._params: list[Tensor] = []

    def split(self, window: tuple[int, int | None]) -> list[tuple[bool, list[int] | None]]:
        """(foreach, entries) pairs: entries whose elements fall in the window for the
        for-loop, the rest for foreach; None for all of them."""
        parts = self._splits.get(window)
        if parts is None:
            low, high = window
            loop = [low <= b - a and (high is None or b - a < high) for a, b in self.spans]
            picks = ((False, [e for e, x in enumerate(loop) if x]), (True, [e for e, x in enumerate(loop) if not x]))
            parts = [(foreach, None if len(pick) == len(self.spans) else pick) for foreach, pick in picks if pick]
            self._splits[window] = parts
        return parts

    def gather(self, batch: _flat.Batch) -> tuple[list[Tensor], list[Tensor]]:
        """The entries' parameters and gradients, runs gathered."""
        if not self.runs:
            return batch.params, batch.grads
        ps, gs = batch.params, batch.grads
        params, grads, scattered = [], [], []
        for e, (j0, j1) in enumerate(self.entries):
            if j1 - j0 == 1:
                params.append(ps[j0])
                grads.append(gs[j0])
                continue
            p_buf, g_buf = self.buffers[e]
            template, places = self.templates[e]
            members = [_one_d(p) for p in ps[j0:j1]]
            for src, dst in ((members, p_buf), (gs[j0:j1], g_buf)):
                inputs = template.copy()
                for place, t in zip(places, src):
                    inputs[place] = _one_d(t)
                torch.cat(inputs, out=dst)
            params.append(p_buf)
            grads.append(g_buf)
            scattered += members
        self._params = scattered
        return params, grads

    def in_state_shapes(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The entries' parameters and gradients in their state's shapes. A parameter given
        another shape of the same size and memory order (`p.data = p.data.view(12)`, and
        its gradient with it) is stepped as before on every path (the state pairs with it
        element for element); torch's multi-tensor and for-loop code pair tensors by shape,
        and would raise part-way through the step, after counting it."""
        if list(map(_shape, params)) == self.shapes and list(map(_shape, grads)) == self.shapes:
            return params, grads
        return ([t.view(s) if t.shape != s and t.is_contiguous() else t for t, s in zip(params, self.shapes)],
                [t.view(s) if t.shape != s and t.is_contiguous() else t for t, s in zip(grads, self.shapes)])

    def one_d(self, tensors: list[Tensor]) -> list[Tensor]:
        """`tensors` (the entries' parameters or gradients) with the `flat` entries as 1-D
        views in memory order."""
        out = list(tensors)
        for e in self.flat:
            out[e] = _flat.memory_order(out[e])
        return out

    def state_views(self, bucket: _flat.Bucket, key: str, one_d: bool = False) -> list[Tensor]:
        """The entries' state of kind `key`; with `one_d`, the `flat` entries' as 1-D views
        in memory order (beside `one_d`'s parameters and gradients)."""
        buf = bucket.buffers[key]
        name = key + "/1-d" if one_d else key
        cached = self._views.get(name)
        if cached is None or cached[0] != (buf.data_ptr(), buf.numel()):
            views = []
            for (a, b), (j0, j1), i in zip(self.spans, self.entries, self.reps):
                if j1 - j0 > 1:
                    views.append(buf[a:b])
                else:
                    view = bucket.view(key, i)
                    views.append(torch.view_as_real(view) if view.is_complex() else view)
            if one_d:
                views = self.one_d(views)
            cached = self._views[name] = ((buf.data_ptr(), buf.numel()), views)
        return cached[1]

    def scalar_views(self, bucket: _flat.Bucket, kind: str) -> list[Tensor]:
        vec = bucket.scalar(kind)
        cached = self._views.get("#" + kind)
        if cached is None or cached[0] != (vec.data_ptr(), vec.numel()):
            cached = self._views["#" + kind] = ((vec.data_ptr(), vec.numel()), [vec[i] for i in self.reps])
        return cached[1]

    def scatter(self, bucket: _flat.Bucket, kinds: tuple[str, ...]) -> None:
        """The runs' parameters back to the user's tensors; the runs' scalars to every member."""
        if not self.runs:
            return
        torch._foreach_copy_(self._params, self.homes)
        self._params = []
        for kind in kinds:
            vec = bucket.scalar(kind)
            members, reps_of = self.members.to(vec.device), self.reps_of.to(vec.device)
            vec[members] = vec[reps_of]
