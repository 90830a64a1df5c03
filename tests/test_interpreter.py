"""The interpreter fixes (`fusedopt/kernels/_interpreter.py`): `tl.fma` rounds once, as on a
GPU, whatever the Triton version, which the bit-for-bit comparisons with torch rely on
(lerp in weight averaging, L2 weight decay); bf16 widens and narrows as on a GPU
(subnormals exact, nearest even)."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import DEVICE
from fusedopt.kernels import _interpreter
from fusedopt.kernels._launch import store_as
from fusedopt.kernels._triton import tl, triton
from fusedopt.kernels.sparse_adam import _rounded


def nearest(value: Fraction, dtype) -> float:
    """An exact rational rounded to the nearest `dtype` (ties to even, past the largest
    finite value to infinity): the reference."""
    if value == 0:
        return 0.0
    info = np.finfo(dtype)
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    ulp = Fraction(2) ** (max(exponent, info.minexp) - info.nmant)
    units, rest = divmod(magnitude / ulp, 1)
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and units % 2):
        units += 1
    rounded = float("inf") if units * ulp >= Fraction(2) ** info.maxexp else float(units * ulp)
    return rounded if value > 0 else -rounded


def operands(dtype, n=3000, seed=0):
    """Random operands, and ones built to round differently twice than once: products
    nearly cancelled by z, and a lerp's fma(x - a, w, a) with a small weight."""
    rng = np.random.default_rng(seed)
    x, y, z = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    near = (-(x * y) * (1 + rng.integers(-4, 5, n).astype(dtype) * np.finfo(dtype).eps)).astype(dtype)
    a = rng.standard_normal(n).astype(dtype)
    diff = ((a + rng.standard_normal(n).astype(dtype) * dtype(1e-3)).astype(dtype) - a).astype(dtype)
    return [(x, y, z), (x, y, near), (diff, np.full(n, 0.1, dtype), a)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_rounds_once(dtype):
    for x, y, z in operands(dtype):
        got = _interpreter.fma(x, y, z)
        assert got.dtype == dtype
        want = np.array([nearest(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)), dtype)
                         for a, b, c in zip(x, y, z)], dtype=dtype)
        assert np.array_equal(got, want), f"{np.sum(got != want)} of {len(got)} differ"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_special_values_and_range(dtype):
    # zeros' signs, infinities, NaN, and results that overflow or are subnormal
    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 3.0, info.max, info.tiny,
                        info.smallest_subnormal], dtype=dtype)
    x, y, z = (v.ravel() for v in np.meshgrid(special, special, special))
    got = _interpreter.fma(x, y, z)
    with np.errstate(all="ignore"):
        for a, b, c, r in zip(x, y, z, got):
            if np.isfinite(a) and np.isfinite(b) and not np.isfinite(c):
                want = c  # a finite product, however large, leaves an infinite or NaN z
            elif not (np.isfinite(a) and np.isfinite(b)) or a == 0 or b == 0:
                want = a * b + c  # the product is exact (inf, NaN, a signed zero)
            else:
                want = nearest(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)), dtype)
            want = dtype(want)
            same = (np.isnan(r) and np.isnan(want)) or (r == want and np.signbit(r) == np.signbit(want))
            assert same, f"fma({a}, {b}, {c}) = {r}, not {want}"


def test_fma_keeps_shapes():
    block = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert _interpreter.fma(*np.broadcast_arrays(block, np.float32(0.1), block)).shape == (2, 3)
    assert _interpreter.fma(np.float32(2), np.float32(3), np.float32(1)) == 7


def test_versions():
    assert _interpreter.version("3.6.0") == (3, 6)
    assert _interpreter.version("3.9.0+git1234abcd") == (3, 9)
    assert _interpreter.version("3.10.0rc1") == (3, 10)


@triton.jit
def _fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.fma(tl.load(x_ptr + offs), tl.load(y_ptr + offs), tl.load(z_ptr + offs)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tl_fma_in_a_kernel_rounds_once(dtype):
    # x = 1 + 2**-k with 2k past the significand: x * x rounds to 1 + 2**(1 - k), so
    # fma(x, x, -round(x * x)) is the low part 2**-2k, where rounding twice gives 0.
    k = 12 if dtype == torch.float32 else 27
    x = torch.full((16,), 1 + 2.0 ** -k, dtype=dtype, device=DEVICE)
    out = torch.empty_like(x)
    _fma_kernel[(1,)](x, x, -(x * x), out, N=16)
    assert torch.equal(out.cpu(), torch.full((16,), 2.0 ** (-2 * k), dtype=dtype))


@triton.jit
def _bf16_kernel(b_ptr, widened_ptr, f_ptr, narrowed_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(widened_ptr + offs, tl.load(b_ptr + offs).to(tl.float32))
    tl.store(narrowed_ptr + offs, tl.load(f_ptr + offs).to(tl.bfloat16))


def test_bf16_conversions_in_a_kernel_are_a_gpus():
    # Every bf16 bit pattern widens exactly (subnormals included, which Triton's own
    # interpreter flushes or misplaces), and fp32 values narrow to nearest even, as
    # torch's .bfloat16() and a GPU's conversion do (the interpreter truncates).
    n = 1 << 16
    bits = torch.arange(n, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(n, generator=gen) * torch.logspace(-45, 38, n).to(torch.float32)
    f[:8] = torch.tensor([9.2e-41, -3e-39, 1e-45, 3.4e38, -0.0, float("inf"), -float("inf"), 1 + 2 ** -8 + 2 ** -20])
    widened, narrowed = torch.empty(n, device=DEVICE), torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    _bf16_kernel[(1,)](bits.to(DEVICE), widened, f.to(DEVICE), narrowed, N=n)
    expected = bits.float()
    finite = ~expected.isnan()
    assert torch.equal(widened.cpu()[finite].view(torch.int32), expected[finite].view(torch.int32))
    assert widened.cpu()[~finite].isnan().all()
    assert torch.equal(narrowed.cpu().view(torch.int16), f.bfloat16().view(torch.int16))


def test_rprop_bf16_subnormal_gradients_on_the_kernel():
    # End to end: Rprop's sign product of two bf16 subnormals, and subnormal gradients
    # read by the kernel, step as torch's do (before the conversions were a GPU's, the
    # kernel read 1e-40 as 0 and stepped those elements the other way).
    import fusedopt

    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([1e-40, -1e-40, 3e-39, -2e-38, 1.0, 1e-3, -0.0, 0.0] * 4)
    p_ref = torch.randn(32, generator=gen).bfloat16().requires_grad_()
    p_new = p_ref.detach().clone().to(DEVICE).requires_grad_()
    ref = torch.optim.Rprop([p_ref], lr=0.01, maximize=True)
    new = fusedopt.Rprop([p_new], lr=0.01, maximize=True, backend="triton")
    for step in range(4):
        g = (scale * torch.randn(32, generator=gen).sign()).bfloat16()
        p_ref.grad, p_new.grad = g.clone(), g.clone().to(DEVICE)
        ref.step()
        new.step()
        assert torch.equal(p_new.detach().cpu().view(torch.int16), p_ref.detach().view(torch.int16)), step
        for key in ("prev", "step_size"):
            assert torch.equal(new.state[p_new][key].cpu().view(torch.int16), ref.state[p_ref][key].view(torch.int16)), (step, key)


@triton.jit
def _bf16_rounding_kernel(x_ptr, like_ptr, stored_ptr, rounded_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    store_as(stored_ptr, offs, x, None)
    tl.store(rounded_ptr + offs, _rounded(x, like_ptr))


def test_bf16_rounding_helpers_keep_every_nan():
    # The kernels' own bf16 rounding (`store_as`, SparseAdam's `_rounded`) against torch's,
    # over every fp32 with one of 2**16 upper halves and random lower halves, and the NaNs
    # whose rounding by adding half an ulp would carry: a GPU's default NaN 0x7FFFFFFF (to
    # -0.0), 0xFFFFFFFF (to +0.0), 0x7F800001 and 0x7FBFFFFF (to inf).
    gen = torch.Generator().manual_seed(0)
    upper = torch.arange(1 << 16, dtype=torch.int64) << 16
    bits = upper | torch.randint(0, 1 << 16, (1 << 16,), generator=gen)
    bits[:4] = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FBFFFFF])
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    like = torch.empty(1, dtype=torch.bfloat16, device=DEVICE)
    stored = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    rounded = torch.empty(x.numel(), device=DEVICE)
    _bf16_rounding_kernel[(1,)](x.to(DEVICE), like, stored, rounded, N=x.numel())
    expected = x.bfloat16()
    nan = x.isnan()
    for name, got in (("store_as", stored.cpu()), ("_rounded", rounded.cpu().bfloat16())):
        assert torch.equal(got.isnan(), nan), f"{name}: NaN lost at {(got.isnan() != nan).nonzero().flatten()[:4].tolist()}"
        assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16)), name
