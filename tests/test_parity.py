"""Every row of the optimizer table against torch.optim, on every path.

'triton' runs the fused kernel (in Triton's interpreter when there is no GPU), 'reference'
the plain-torch path over the same flat buffers, 'auto' what a user gets by default.
"""
import pytest
import torch

from _compare import assert_close, assert_same_run, run_side_by_side
from optim_db import OPTIMIZERS, SHAPES, all_cases, dtype_cases

BACKENDS = ["triton", "reference", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,config", all_cases())
def test_matches_torch_fp32(info, config, backend):
    run = run_side_by_side(info, config, backend)
    assert_same_run(*run, rtol=info.rtol32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in OPTIMIZERS])
def test_frozen_parameters_among_contiguous_ones_match_torch(info, backend):
    """The table's shapes hold a channels_last tensor, which keeps its bucket off the
    common path's checks; without it, parameters that have no gradient this step (frozen
    layers) take the checks of that path, which once went through them one by one."""
    shapes = [s for s in SHAPES if s != "channels_last"]
    missing = {(0, 1), (1, 2), (1, 5), (2, 2), (3, 4)} | {(s, 3) for s in range(3)}
    run = run_side_by_side(info, info.configs[-1], backend, shapes=shapes, missing=missing, steps=5)
    assert_same_run(*run, rtol=info.rtol32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("info,dtype", dtype_cases())
def test_matches_torch_other_dtypes(info, dtype, backend):
    config = info.configs[-1]
    run = run_side_by_side(info, config, backend, dtype=dtype)
    assert_same_run(*run)


# On a GPU (`gpu`: FUSEDOPT_TEST_COMPILED=1 pytest -m gpu): the compiled kernels against
# torch.optim's default there (its multi-tensor code), every row and option set in fp32, the
# last option set in the other dtypes; the same comparisons the interpreter's run makes
# against torch's CPU for-loop.
GPU = "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("info,config", all_cases())
def test_compiled_kernels_match_torch_on_the_gpu_fp32(info, config, backend):
    run = run_side_by_side(info, config, backend, device=GPU)
    assert all(b.path == "triton" for _, buckets in run[3]._buckets.values() for b in buckets)
    assert_same_run(*run, rtol=info.rtol32)


@pytest.mark.gpu
@pytest.mark.parametrize("info,dtype", dtype_cases())
def test_compiled_kernels_match_torch_on_the_gpu_other_dtypes(info, dtype):
    run = run_side_by_side(info, info.configs[-1], "triton", dtype=dtype, device=GPU)
    assert_same_run(*run)


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in OPTIMIZERS])
def test_scalar_state_under_a_float64_default_dtype(info, dtype, backend, float64_default):
    """torch makes `step` (NAdam's mu_product, ASGD's eta and mu) float64 under a float64
    default dtype, and computes with them so: the same dtypes and numbers here."""
    run = run_side_by_side(info, info.configs[-1], backend, dtype=dtype)
    assert_same_run(*run, rtol=info.rtol32 if dtype == torch.float32 else None)


# ---------------------------------------------------------------- edge values

def _step_both(torch_cls, fused_cls, backend, params, grads, steps=1, **options):
    """Step torch's and fusedopt's optimizer on copies of `params` with the same gradients
    (one list per step) and return both parameter lists and optimizers."""
    p_ref = [p.clone().requires_grad_() for p in params]
    p_new = [p.clone().requires_grad_() for p in params]
    ref = torch_cls(p_ref, **options)
    new = fused_cls(p_new, backend=backend, **options)
    for step in range(steps):
        for a, b, g in zip(p_ref, p_new, grads[step]):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        new.step()
    return p_ref, ref, p_new, new


def _assert_same_specials(name, actual, expected, rtol=None, atol=None):
    """NaN and infinities where torch has them, zeros of torch's sign, the rest close."""
    a, e = actual.detach(), expected.detach()
    assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN at {a.isnan().nonzero().flatten().tolist()}, torch's at {e.isnan().nonzero().flatten().tolist()}"
    keep = ~e.isnan()
    a, e = a[keep], e[keep]
    assert torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()]), f"{name}: {a} against torch's {e}"
    zeros = (a == 0) & (e == 0)
    assert torch.equal(a[zeros].signbit(), e[zeros].signbit()), f"{name}: signs of zeros differ: {a} against torch's {e}"
    assert_close(name, a, e, rtol, atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_centered_rmsprop_keeps_a_parameter_whose_square_avg_overflowed(backend, dtype):
    """A huge gradient makes square_avg inf and grad_avg**2 overflow: torch's
    `square_avg.addcmul(grad_avg, grad_avg, value=-1)` is an fma, inf, so the step divides
    by inf and the parameter stays. A rounded product (inf - inf) made it NaN."""
    import fusedopt

    huge = torch.finfo(dtype).max / 4
    p = torch.tensor([1.5, -0.25, 2.0, 0.75], dtype=dtype)
    g = torch.tensor([huge, -huge, 0.5, -1.0], dtype=dtype)
    for momentum in (0.0, 0.9):
        p_ref, ref, p_new, new = _step_both(torch.optim.RMSprop, fusedopt.RMSprop, backend, [p], [[g], [g / 2]],
                                            steps=2, lr=0.01, centered=True, momentum=momentum)
        _assert_same_specials("param", p_new[0], p_ref[0])
        for key in ("square_avg", "grad_avg"):
            _assert_same_specials(key, new.state[p_new[0]][key], ref.state[p_ref[0]][key])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", [("Adagrad", dict(lr=0.1, eps=1e-10)), ("RMSprop", dict(lr=0.01, eps=1e-10)),
                                          ("Adam", dict(lr=0.01, eps=1e-10)), ("NAdam", dict(lr=0.01, eps=1e-10))])
def test_l2_decay_that_cancels_the_gradient_rounds_once(name, options, backend):
    """torch's L2 decay, `grad.add(param, alpha=weight_decay)`, is an fma: where the
    gradient is minus the rounded decay term, what is left is the rounding error of
    weight_decay * param, and an algorithm that normalises its step turns that into a step
    of about lr. Rounded twice, the sum is 0 and the parameter does not move."""
    import fusedopt

    weight_decay = 0.1
    from fusedopt.kernels._launch import BLOCK

    p = torch.randn(BLOCK + 5, generator=torch.Generator().manual_seed(0))
    g = -(p * weight_decay)   # fp32: rounded
    p_ref, ref, p_new, new = _step_both(getattr(torch.optim, name), getattr(fusedopt, name), backend, [p], [[g], [g]],
                                        steps=2, weight_decay=weight_decay, **options)
    assert (p_ref[0] - p).abs().max() > options["lr"] / 10   # torch's own step is visible
    assert_close("param", p_new[0], p_ref[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_asgd_ax_is_the_parameter_until_averaging_starts(backend, dtype):
    """While mu is 1 (up to step t0) torch copies the parameter into ax: bit for bit, where
    averaging with weight 1, ax + (p - ax), rounds wherever p crossed zero or halved."""
    import fusedopt

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(2000, generator=gen, dtype=dtype) * 0.05
    grads = [[torch.randn(2000, generator=gen, dtype=dtype)] for _ in range(4)]
    p_ref, ref, p_new, new = _step_both(torch.optim.ASGD, fusedopt.ASGD, backend, [p], grads, steps=4, lr=0.05, t0=100)
    assert torch.equal(ref.state[p_ref[0]]["ax"], p_ref[0].detach())   # torch's copy
    assert torch.equal(new.state[p_new[0]]["ax"], p_new[0].detach())
    assert_close("param", p_new[0], p_ref[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options,key", [
    ("Adam", dict(lr=0.01, weight_decay=0.1), "exp_avg"),
    ("AdamW", dict(lr=0.01, betas=(0.3, 0.999)), "exp_avg"),
    ("RMSprop", dict(lr=1e-3, centered=True), "grad_avg"),
    ("RMSprop", dict(lr=1e-3, alpha=1.5, centered=True), "grad_avg"),   # a negative weight 1 - alpha
], ids=["Adam", "AdamW-beta1-0.3", "RMSprop", "RMSprop-alpha-1.5"])
def test_lerp_rounds_once_as_torchs(name, options, key, backend):
    """torch's lerp (Adam's exp_avg, centered RMSprop's grad_avg) is one fma on the CPU (its
    vectorised kernel) and on CUDA, with the formula exact at the nearer end: the state is
    torch's bit for bit. The interpreter rounded a written-out lerp twice (a third of the
    elements an ulp off)."""
    import fusedopt

    gen = torch.Generator().manual_seed(0)
    from fusedopt.kernels._launch import BLOCK

    p = torch.randn(BLOCK + 5, generator=gen)
    grads = [[torch.randn(p.shape, generator=gen)] for _ in range(3)]
    p_ref, ref, p_new, new = _step_both(getattr(torch.optim, name), getattr(fusedopt, name), backend, [p], grads,
                                        steps=3, **options)
    want, got = ref.state[p_ref[0]][key], new.state[p_new[0]][key]
    assert torch.equal(got, want), f"{key}: {int((got != want).sum())} of {want.numel()} elements differ"
