"""The 'native' CPU path (`fusedopt/_native.py`): torch's own implementation on the flat
state, with runs of small tensors stepped as one tensor.

Runs must give torch's numbers whatever breaks them: tensors without a gradient this
step, tensors whose step counts differ (their first step came later), SGD momentum
buffers starting mid-run, complex and channels_last tensors, bf16.
"""
import copy

import pytest
import torch

import fusedopt
from _compare import assert_same_run, run_side_by_side
from fusedopt import _native
from optim_db import OPTIMIZERS

# Forty small tensors (runs) around two large ones (entries of their own; the second, 547
# KB in fp32, inside every window where `_native.LOOP_WINDOW` sends tensors to torch's
# for-loop), with the awkward ones of the parity table among them.
SMALL_SHAPES = [(n,) for n in (1, 3, 16, 17, 5, 31, 64, 2, 9, 100)] * 4
SHAPES = SMALL_SHAPES[:12] + [(70, 300)] + SMALL_SHAPES[12:30] + ["channels_last", (), (0,)] + \
    [(140000,)] + SMALL_SHAPES[30:]
# No gradient: tensor 3 on its first step (its step count lags behind its run's for good),
# 13 and 14 on step 2, the large one on step 1; 20 never before step 3.
MISSING = {(0, 3), (2, 13), (2, 14), (1, 12)} | {(s, 20) for s in range(3)}


def native_cases():
    return [pytest.param(info, config, id=f"{info.name}-{i}") for info in OPTIMIZERS
            if _native.IMPLEMENTATIONS.get(info.name) for i, config in enumerate(info.configs)
            if i in (0, len(info.configs) - 1)]


@pytest.mark.parametrize("info,config", native_cases())
def test_runs_match_torch_whatever_breaks_them(info, config, monkeypatch):
    # torch's fused kernels take no runs by default (cheap enough per tensor); force them,
    # so the gather path is checked under every algorithm.
    monkeypatch.setitem(_native.RUN_BELOW, "fused", _native.RUN_BELOW["foreach"])
    run = run_side_by_side(info, config, "auto", shapes=SHAPES, missing=MISSING, steps=max(info.steps, 5))
    assert_same_run(*run, rtol=info.rtol32)
    opt = run[3]
    plans = [b._native_plan for _, buckets in opt._buckets.values() for b in buckets]
    assert all(b.path == "native" for _, buckets in opt._buckets.values() for b in buckets)
    assert any(plan.runs for plan in plans), "no run was formed: the gather path went untested"


@pytest.mark.parametrize("info,config", native_cases())
def test_bf16_matches_torch(info, config):
    run = run_side_by_side(info, config, "auto", dtype=torch.bfloat16, shapes=SHAPES, missing=MISSING, steps=4)
    assert_same_run(*run)


def test_complex_parameters_run_through_their_real_view():
    info = next(i for i in OPTIMIZERS if i.name == "AdamW")
    gen = torch.Generator().manual_seed(0)
    made = [torch.randn(n, dtype=torch.complex64, generator=gen) for n in (3, 5, 200)]
    p_ref = [torch.nn.Parameter(t.clone()) for t in made]
    p_new = [torch.nn.Parameter(t.clone()) for t in made]
    opt_ref, opt_new = info.torch(p_ref, lr=0.1, foreach=False), info.fused(p_new, lr=0.1)
    for step in range(3):
        for a, b in zip(p_ref, p_new):
            g = torch.randn(a.shape, dtype=a.dtype, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_new.step()
    assert_same_run(p_ref, opt_ref, p_new, opt_new)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_group_edits_between_steps_reach_the_step(tensor_lr):
    """The native path keeps a group's options until one of the group's values changes: a
    new lr, an lr tensor changed in place, a flipped flag must all reach the next step."""
    info = next(i for i in OPTIMIZERS if i.name == "AdamW")
    gen = torch.Generator().manual_seed(0)
    made = [torch.randn(n, generator=gen) for n in (5, 300)]
    p_ref = [torch.nn.Parameter(t.clone()) for t in made]
    p_new = [torch.nn.Parameter(t.clone()) for t in made]
    lr = (lambda: torch.tensor(0.1)) if tensor_lr else (lambda: 0.1)
    opt_ref, opt_new = info.torch(p_ref, lr=lr(), foreach=False), info.fused(p_new, lr=lr())
    for step in range(4):
        for a, b in zip(p_ref, p_new):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        if step == 1:
            for opt in (opt_ref, opt_new):
                if tensor_lr:
                    opt.param_groups[0]["lr"].fill_(0.01)
                else:
                    opt.param_groups[0]["lr"] = 0.01
        if step == 2:
            for opt in (opt_ref, opt_new):
                opt.param_groups[0]["maximize"] = True
        opt_ref.step()
        opt_new.step()
        assert_same_run(p_ref, opt_ref, p_new, opt_new)


@pytest.mark.parametrize("config", next(i for i in OPTIMIZERS if i.name == "SGD").configs + [
    dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.1, momentum=0.5, weight_decay=0.1, maximize=True)],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_sgd_is_torchs_multi_tensor_sgd_bit_for_bit(config, dtype):
    """bf16/fp16 SGD runs torch's multi-tensor ops itself (without torch's regrouping): the
    same numbers as torch's foreach SGD, to the bit, through buffers starting mid-run; and,
    unlike torch's (whose Nesterov adds into them), the gradients are left as they were."""
    info = next(i for i in OPTIMIZERS if i.name == "SGD")
    gen = torch.Generator().manual_seed(0)
    made = [torch.randn(n, generator=gen).to(dtype) for n in (3, 40, 700, 5)]
    p_ref = [torch.nn.Parameter(t.clone()) for t in made]
    p_new = [torch.nn.Parameter(t.clone()) for t in made]
    opt_ref, opt_new = info.torch(p_ref, foreach=True, **config), info.fused(p_new, **config)
    for step in range(4):
        for j, (a, b) in enumerate(zip(p_ref, p_new)):
            g = torch.randn(a.shape, generator=gen).to(dtype)
            a.grad, b.grad = (None, None) if (step, j) in {(0, 1), (1, 1), (0, 3)} else (g.clone(), g.clone())
        given = [None if b.grad is None else b.grad.clone() for b in p_new]
        opt_ref.step()
        opt_new.step()
        for a, b in zip(p_ref, p_new):
            assert torch.equal(a, b), f"step {step}: {(a.float() - b.float()).abs().max()}"
        assert all(g is None or torch.equal(g, b.grad) for g, b in zip(given, p_new))
    assert_same_run(p_ref, opt_ref, p_new, opt_new, rtol=0, atol=0)


def step_beside_torch(name: str, options: dict, steps: int, dtype=torch.float32):
    """torch.optim's and fusedopt's `name` (each given its own copy of any tensor option)
    stepped side by side on three small tensors: their parameters and the optimizers."""
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(n, generator=gen, dtype=dtype).requires_grad_() for n in (3, 17, 64)]
    new = [p.detach().clone().requires_grad_() for p in ref]
    opts = [getattr(module, name)(ps, **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in options.items()})
            for module, ps in ((torch.optim, ref), (fusedopt, new))]
    for step in range(steps):
        for opt, ps in zip(opts, (ref, new)):
            for i, p in enumerate(ps):
                p.grad = torch.sin(p.detach() * (i + 1) + step)
            opt.step()
    return ref, new, opts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nadam_with_a_tensor_momentum_decay_steps_as_torchs(dtype):
    """torch.optim.NAdam takes a tensor momentum_decay (its CPU for-loop computes mu with
    it); its multi-tensor implementation, which the native path runs on small tensors,
    raised TypeError from inside `_foreach_addcdiv_`."""
    ref, new, _ = step_beside_torch("NAdam", dict(lr=0.01, momentum_decay=torch.tensor(4e-3, dtype=dtype)), 4,
                                    torch.float64)
    for a, b in zip(ref, new):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-element"])
def test_asgd_with_a_tensor_lr_steps_as_torchs(shape):
    """torch.optim.ASGD given a tensor lr computes each new eta in tensor ops on it
    (`lr / ((1 + lambd * lr * step) ** alpha)` in fp32), 1 ulp off the float formula at
    some steps; the native path passed torch's code, and computed itself, the lr as a
    float, so eta and then the parameters drifted from torch's (from the fourth step)."""
    ref, new, opts = step_beside_torch("ASGD", dict(lr=torch.full(shape, 0.01), lambd=1e-3, t0=5), 40)
    for a, b in zip(ref, new):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for key in ("eta", "mu", "ax"):
            torch.testing.assert_close(opts[1].state[b][key], opts[0].state[a][key], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-element"])
def test_sgd_with_a_tensor_momentum_steps_as_torchs(shape):
    """torch.optim.SGD's CPU path multiplies by a tensor momentum of one element (its
    `buf.mul_(momentum)`); torch's fused CPU kernel, which the native path calls, takes
    only a float, and raised TypeError for a (1,)-shaped one. The run is the one with the
    float, bit for bit, and torch's (its fused kernel and its for-loop: to rounding)."""
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(n, generator=gen).requires_grad_() for n in (3, 17, 64)]
    runs = [[p.detach().clone().requires_grad_() for p in ref] for _ in range(2)]
    opts = [torch.optim.SGD(ref, lr=0.1, momentum=torch.full(shape, 0.9)),
            fusedopt.SGD(runs[0], lr=0.1, momentum=torch.full(shape, 0.9)),
            fusedopt.SGD(runs[1], lr=0.1, momentum=0.9)]
    for step in range(4):
        for opt, ps in zip(opts, (ref, *runs)):
            for i, p in enumerate(ps):
                p.grad = torch.sin(p.detach() * (i + 1) + step)
            opt.step()
    for a, b, c in zip(ref, *runs):
        torch.testing.assert_close(b, c, rtol=0, atol=0)
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nadam_after_a_torch_checkpoint_is_torchs_in_low_precision(dtype):
    """torch's load casts NAdam's mu_product to a bf16/fp16 parameter's dtype. Its CPU
    for-loop then multiplies it by mu in fp32 and rounds once; its multi-tensor code, which
    the native path runs on small tensors, rounds mu to bf16 first (`_foreach_mul_`), and
    the product drifted an ulp a step from torch's."""
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in (5, 40, 3)]
    new = [p.detach().clone().requires_grad_() for p in ref]

    def step(opt, ps, k):
        for i, p in enumerate(ps):
            p.grad = torch.sin(p.detach().float() * (i + 1) + k).to(dtype)
        opt.step()

    trained = torch.optim.NAdam(ref, lr=1e-2)
    for k in range(2):
        step(trained, ref, k)
    with torch.no_grad():
        for a, b in zip(ref, new):
            b.copy_(a)
    opts = [torch.optim.NAdam(ref, lr=1e-2), fusedopt.NAdam(new, lr=1e-2)]
    for opt in opts:
        opt.load_state_dict(copy.deepcopy(trained.state_dict()))
    for k in range(2, 6):
        for opt, ps in zip(opts, (ref, new)):
            step(opt, ps, k)
    for a, b in zip(ref, new):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for key, value in opts[0].state[a].items():
            torch.testing.assert_close(opts[1].state[b][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad"])
def test_fp16_with_fused_true_is_torchs_fused_kernel(name):
    """torch's `fused=True` runs its fused CPU kernel in fp16 too, whose math is fp32: a
    squared gradient that underflows to 0 in fp16 is still divided by its fp32 square root.
    The native path ran torch's for-loop there (its fp16 choice when fused is not asked
    for), which divides by eps alone: -inf and NaN where torch's answer is finite. A group
    loaded without `fused` goes back to the for-loop, as torch's does."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(300, generator=gen).half()
    grads = [(torch.randn(300, generator=gen) * 1e-2).half() for _ in range(4)]
    ref, new = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    opts = [getattr(torch.optim, name)([ref], lr=1e-2, fused=True), getattr(fusedopt, name)([new], lr=1e-2, fused=True)]
    for k, g in enumerate(grads):
        if k == 2:   # the same checkpoint, without fused, into both
            saved = opts[0].state_dict()
            saved["param_groups"][0]["fused"] = None
            for opt in opts:
                opt.load_state_dict(copy.deepcopy(saved))
        for opt, p in zip(opts, (ref, new)):
            p.grad = g.clone()
            opt.step()
        # (after the load: torch's for-loop against its multi-tensor code, to an ulp)
        exact = dict(rtol=0, atol=0) if k < 2 else {}
        assert ref.isfinite().all() or k >= 2
        torch.testing.assert_close(new, ref, equal_nan=True, **exact)
        for key, value in opts[0].state[ref].items():
            torch.testing.assert_close(opts[1].state[new][key], value, equal_nan=True, **exact)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize("name,options", [("SGD", dict(momentum=0.9)), ("Adam", dict(amsgrad=True)), ("AdamW", {}),
                                          ("Adagrad", {})], ids=["SGD", "Adam", "AdamW", "Adagrad"])
def test_dense_non_contiguous_tensors_go_to_the_fused_kernel_as_1d_views(name, options, scaled):
    """channels_last weights and transposed matrices go to torch's fused kernels as 1-D
    views in memory order (their own layout runs at half the speed there): torch's fused
    numbers to the bit, the state in the parameter's layout, and under GradScaler the
    user's gradients left unscaled once, by the kernel through those views."""
    gen = torch.Generator().manual_seed(0)
    made = [torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
            torch.randn(6, 5, generator=gen).t(), torch.randn(7, generator=gen), torch.randn(2, 1, 3, generator=gen)]
    theirs = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in made]
    ours = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in made]
    ref = getattr(torch.optim, name)(theirs, lr=0.01, fused=True, **options)
    opt = getattr(fusedopt, name)(ours, lr=0.01, fused=True, **options)   # (GradScaler's protocol asks for it)
    for step in range(4):
        for a, b in zip(theirs, ours):
            g = torch.empty_like(a).copy_(torch.randn(a.shape, generator=gen))
            a.grad, b.grad = g.clone(memory_format=torch.preserve_format), g.clone(memory_format=torch.preserve_format)
        if scaled:
            scale = torch.tensor(4.0)
            for p in theirs + ours:
                p.grad.mul_(4.0)
            ref.grad_scale, opt.grad_scale = scale, scale.clone()
            ref.found_inf, opt.found_inf = torch.tensor(0.0), torch.tensor(0.0)
        ref.step()
        opt.step()
        for a, b in zip(theirs, ours):
            assert torch.equal(a.detach(), b.detach()) and a.stride() == b.stride()
            assert torch.equal(a.grad, b.grad)
        for a, b in zip(theirs, ours):
            for key, value in ref.state[a].items():
                assert torch.equal(opt.state[b][key], value), key
                assert opt.state[b][key].stride() == value.stride(), key
    assert any(getattr(bk, "_native_plan", None) is not None and bk._native_plan.flat
               for _, buckets in opt._buckets.values() for bk in buckets)


@pytest.mark.parametrize("name", ["NAdam", "RAdam", "Adamax", "RMSprop", "Adadelta", "Rprop"])
def test_buckets_of_one_or_two_tensors_run_torchs_for_loop(name):
    """A bucket of one or two tensors (a group per layer, as layer-wise learning rates make
    them) runs torch's for-loop, faster there than its multi-tensor code: torch.optim's CPU
    default, to the bit (NAdam's multi-tensor code differed from it by an ulp)."""
    gen = torch.Generator().manual_seed(0)
    made = [torch.randn(s, generator=gen) for s in [(33, 17), (17,), (40,), (5, 5), (5,)]]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:3], "lr": 2e-3}, {"params": ps[3:]}]
    theirs = [torch.nn.Parameter(t.clone()) for t in made]
    ours = [torch.nn.Parameter(t.clone()) for t in made]
    ref = getattr(torch.optim, name)(groups(theirs), lr=1e-3)   # (its CPU default: the for-loop)
    opt = getattr(fusedopt, name)(groups(ours), lr=1e-3)
    for step in range(5):
        for a, b in zip(theirs, ours):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ref.step()
        opt.step()
    for a, b in zip(theirs, ours):
        assert torch.equal(a.detach(), b.detach()), (a - b).abs().max()


def _tensor(value, dtype=torch.float32):
    return lambda: torch.tensor(value, dtype=dtype)


# Two groups an algorithm's tensor options differ in (a float64 lr tensor in the second),
# as factories: each optimizer gets tensors of its own.
TENSOR_OPTION_GROUPS = {
    "NAdam": [dict(lr=_tensor(0.01), betas=(_tensor(0.9), _tensor(0.999)), weight_decay=0.1),
              dict(lr=_tensor(0.02, torch.float64), momentum_decay=_tensor(5e-3), weight_decay=0.1,
                   decoupled_weight_decay=True)],
    "RAdam": [dict(lr=_tensor(0.01), betas=(_tensor(0.9), _tensor(0.99)), weight_decay=0.1),
              dict(lr=_tensor(0.02, torch.float64), weight_decay=0.1, decoupled_weight_decay=True)],
    "Adamax": [dict(lr=_tensor(0.01), betas=(_tensor(0.9), _tensor(0.999))),
               dict(lr=_tensor(0.02, torch.float64), weight_decay=0.1)],
    "Adadelta": [dict(lr=_tensor(0.5), rho=_tensor(0.8)), dict(lr=_tensor(1.0, torch.float64), weight_decay=0.1)],
    "RMSprop": [dict(lr=_tensor(0.01), alpha=_tensor(0.9)),
                dict(lr=_tensor(0.02, torch.float64), momentum=0.9, centered=True, weight_decay=0.1)],
    "Rprop": [dict(lr=_tensor(0.01), etas=(_tensor(0.4), _tensor(1.3))),
              dict(lr=_tensor(0.02, torch.float64), step_sizes=(_tensor(1e-5), _tensor(1.0)))],
    "ASGD": [dict(lr=_tensor(0.01), weight_decay=0.1, t0=2), dict(lr=_tensor(0.02, torch.float64), lambd=1e-3)],
    # In fp16 these run torch's for-loop too. In fp32, fp64 and bf16 the native path runs
    # torch's fused kernel, which reads a tensor option as a double: torch.optim's numbers
    # with fused=True are the ones given there.
    "Adam": [dict(lr=_tensor(0.01), betas=(_tensor(0.9), _tensor(0.999)), weight_decay=0.1),
             dict(lr=_tensor(0.02, torch.float64), amsgrad=True)],
    "AdamW": [dict(lr=_tensor(0.01), betas=(_tensor(0.9), _tensor(0.999))), dict(lr=_tensor(0.02, torch.float64))],
    "Adagrad": [dict(lr=_tensor(0.01), lr_decay=0.01), dict(lr=_tensor(0.02, torch.float64), weight_decay=0.1)],
}


def _tensor_option_cases():
    for name in TENSOR_OPTION_GROUPS:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("name,dtype", list(_tensor_option_cases()))
def test_tensor_options_step_as_torchs_for_loop_bit_for_bit(name, dtype):
    """torch.optim's CPU default for an algorithm without a fused kernel (and for fp16) is
    its for-loop, which computes with a tensor lr, betas, ... as tensors, in their dtype: a
    float32 lr makes `lr / bias_correction` a float32 tensor on float64 parameters, a bf16
    one is read in bf16. The native path read them as Python floats (torch's numbers for a
    float lr: NAdam differed on every element in fp64). Here: torch's, to the bit, with
    small tensors that would form runs, per-group tensors of two dtypes, and the tensors
    written in place between steps, as schedulers write them."""
    gen = torch.Generator().manual_seed(0)
    made = [[torch.randn(n, generator=gen).to(dtype) for n in [40] + [9] * 10 + [3000]] for _ in range(2)]

    def groups(params):
        return [dict(params=ps, **{k: tuple(f() for f in v) if type(v) is tuple else v() if callable(v) else v
                                   for k, v in options.items()})
                for ps, options in zip(params, TENSOR_OPTION_GROUPS[name])]
    ref = [[torch.nn.Parameter(t.clone()) for t in ts] for ts in made]
    new = [[torch.nn.Parameter(t.clone()) for t in ts] for ts in made]
    fused = _native.IMPLEMENTATIONS[name].fused is not None and dtype != torch.float16
    opts = [getattr(torch.optim, name)(groups(ref), **(dict(fused=True) if fused else {})),
            getattr(fusedopt, name)(groups(new))]
    for step in range(5):
        for a, b in zip(sum(ref, []), sum(new, [])):
            g = torch.randn(a.shape, generator=gen).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        if step == 2:
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"].mul_(0.5)
        for opt in opts:
            opt.step()
        for a, b in zip(sum(ref, []), sum(new, [])):
            # (fp16: torch's for-loop overflows to inf and NaN, which must be the same too)
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"step {step}: {m}")
    assert_same_run(sum(ref, []), opts[0], sum(new, []), opts[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype,eps,steps", [(torch.float32, 0.0, 8), (torch.float16, 1e-8, 5), (torch.bfloat16, 0.0, 8)])
def test_radam_before_rectification_keeps_zero_gradient_elements_finite_as_torchs_default(dtype, eps, steps):
    """Before RAdam rectifies its variance (its first 5 steps), torch's for-loop, the CPU
    default, adds the momentum alone; its multi-tensor code multiplies lr / (sqrt(v) + eps)
    by 0, NaN where v is 0 (zero gradients; in fp16 also squares that underflow, with eps 0
    there). The native path ran that code: fp16 RAdam turned such parameters NaN for good.
    Many small tensors (a run) and large ones, a tensor whose first step comes later, and
    elements whose gradient is 0 for the first 4 steps. (fp16: up to step 5; after it both
    divide by an underflowed sqrt(v) + eps, and the two codes round the infinities apart.)"""
    torch.manual_seed(0)
    shapes = [(5,)] * 12 + [(70, 300)] + [(3,)] * 9
    start = [torch.randn(s).to(dtype) for s in shapes]
    runs = []
    for opt_cls, kwargs in ((torch.optim.RAdam, dict(foreach=False)), (fusedopt.RAdam, {})):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = opt_cls(params, lr=0.01, eps=eps, **kwargs)
        for step in range(steps):
            for i, p in enumerate(params):
                g = torch.Generator().manual_seed(100 * step + i)
                grad = torch.randn(p.shape, generator=g) * (1e-3 if i % 2 else 1.0)
                grad.view(-1)[::3] = 0.0 if step < 4 else grad.view(-1)[::3]
                p.grad = None if (i == 5 and step < 3) else grad.to(dtype)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for ours, theirs in zip(runs[1], runs[0]):
        assert torch.isfinite(theirs).all()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
