"""Where an older Triton's interpreter computes differently from a GPU: the one place that
knows which Triton versions, and what fusedopt does about it.

Without a GPU the kernels run in Triton's interpreter, and the tests compare them with
torch bit for bit, so the interpreter must round as the compiled kernels do. `install` is
called by `_triton` when TRITON_INTERPRET=1; a compiled kernel never comes here.

- `tl.fma`: before Triton 3.9 (3.6 and 3.8 checked) the interpreter's builder computes
  ``x * y + z`` in the operands' numpy dtype, rounding the product and then the sum. An
  fma on a GPU rounds once, and so do torch's lerp and L2 weight decay, which the kernels
  reproduce with it (`averaging`, `_launch.load_grad_l2`). Triton 3.9 rounds once
  (libtriton's `interpreter.fma_fp32`/`fma_fp64`); for the versions before it the
  builder's `create_fma` is replaced with `fma` below, which computes what 3.9's does.
- bf16 and fp32: the interpreter (3.9 included) converts between them through its own
  float codec, which loses subnormals (bf16 1e-40 widens to 0, 1e-39 to 4.4e-39) and
  truncates when narrowing. bf16 and fp32 share their exponent range, so on a GPU
  widening is exact (the bf16 bits are the fp32 value's top half) and narrowing rounds to
  nearest even. Every kernel loads bf16 and widens it, so a subnormal gradient, state or
  parameter read wrong (Adamax with eps=0 divided by 0 where torch divides by the
  subnormal); Rprop narrows its sign product and the averaging kernel copies through
  `.to`. `cast_impl` is wrapped to do both as a GPU does, where a probe shows the
  interpreter's conversion differs.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

FMA_ROUNDS_ONCE = (3, 9)  # the first Triton whose interpreter has a correctly rounded fma


def version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '3.9.0+git1234'."""
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def install(triton) -> None:
    """Correct the interpreter of the imported `triton` module where it needs it."""
    from triton.runtime import interpreter

    _install_bf16_conversions(interpreter)
    if version(triton.__version__) >= FMA_ROUNDS_ONCE:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_fma, "fusedopt", False):
        return

    def create_fma(self, x, y, z):
        data = fma(*np.broadcast_arrays(x.data, y.data, z.data))
        return interpreter.TensorHandle(data, z.dtype.scalar)

    create_fma.fusedopt = True
    builder.create_fma = create_fma


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 values (their uint16 bits, as the interpreter stores them) as float32, exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def narrow_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values as bf16 bits (uint16), rounded to nearest even, NaN kept a NaN: the
    integer rounding of `_launch.bf16_bits`."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = np.where(np.isnan(values), bits | 0x400000, rounded) >> 16
    return out.astype(np.uint16)


def _install_bf16_conversions(interpreter) -> None:
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "fusedopt", False):
        return
    import triton.language as tl

    bf16 = np.array([0x0001, 0x00B4, 0x807F, 0x3F80], dtype=np.uint16)  # subnormals, one negative; 1
    fp32 = np.array([9.2e-41, -3e-39, 1.00390625 + 2.0 ** -20, 1.0], dtype=np.float32)  # the third rounds up
    try:
        widened = interpreter._convert_float(bf16, tl.bfloat16, tl.float32, None).view(np.uint32)
        narrowed = interpreter._convert_float(fp32, tl.float32, tl.bfloat16, None).view(np.uint16)
    except Exception:  # a Triton whose interpreter has no such helper: leave it as it is
        return
    widen = not np.array_equal(widened, widen_bf16(bf16).view(np.uint32))
    narrow = not np.array_equal(narrowed, narrow_bf16(fp32))
    if not (widen or narrow):
        return
    cast_impl = builder.cast_impl

    def bf16_cast_impl(self, src, dst_type):
        src_type, dst = src.dtype.scalar, dst_type.scalar
        if widen and src_type == tl.bfloat16 and dst == tl.float32:
            return interpreter.TensorHandle(widen_bf16(src.data), dst)
        if narrow and src_type == tl.float32 and dst == tl.bfloat16:
            return interpreter.TensorHandle(narrow_bf16(src.data), dst)
        return cast_impl(self, src, dst_type)

    # create_fp_ext and create_fp_trunc are lambdas that look cast_impl up on the
    # instance: they see this one.
    bf16_cast_impl.fusedopt = True
    builder.cast_impl = bf16_cast_impl


# -- a correctly rounded fma in numpy ------------------------------------------------------
# numpy has no fma, so it is built from exact transformations (Knuth's TwoSum, Dekker's
# product) and rounding to odd: a sum rounded to odd in a precision at least two bits
# wider than the target's rounds to nearest (even) in the target exactly as the exact sum
# would (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved
# algorithms using rounding to odd", IEEE Trans. Computers 57(4), 2008).

def _two_sum(a, b):
    """(s, e): s = a + b rounded, e its exact error (a + b == s + e), for finite s."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _round_to_odd(s, e):
    """The exact sum s + e rounded to odd: s itself when exact or odd, else the float next
    to it on the side of the exact sum."""
    s = np.asarray(s, dtype=np.float64)
    step = np.isfinite(e) & (e != 0) & ((s.view(np.uint64) & 1) == 0)
    return np.where(step, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)


_SPLIT = 2.0 ** 27 + 1  # Veltkamp's splitter for float64: 53 bits as 26 + 27


def _two_product(a, b):
    """(p, e): p = a * b rounded, e its exact error, when neither overflows nor underflows."""
    p = a * b
    ca, cb = _SPLIT * a, _SPLIT * b
    ah, bh = ca - (ca - a), cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _fma32(x, y, z):
    # The product of two 24-bit significands is exact in float64, the sum's rounding to
    # odd in 53 bits then rounds to nearest in 24 as the exact value does.
    p = x.astype(np.float64) * y.astype(np.float64)
    return _round_to_odd(*_two_sum(p, z.astype(np.float64))).astype(np.float32)


def _fma64(x, y, z):
    uh, ul = _two_product(x, y)
    th, tl = _two_sum(z, uh)
    out = th + _round_to_odd(*_two_sum(tl, ul))  # Boldo and Melquiond's emulated fma
    # Exactly as computed only within range of the splitting and the error terms; zeros,
    # infinities and NaN operands, and values near under- or overflow, go elsewhere.
    ax, ay, auh = np.abs(x), np.abs(y), np.abs(uh)
    safe = ((ax < 2.0 ** 995) & (ay < 2.0 ** 995) & (np.abs(z) < 2.0 ** 1000)
            & (auh < 2.0 ** 1000) & (auh > 2.0 ** -900))
    if safe.all():
        return out
    out = np.array(out, dtype=np.float64)
    finite_xy = np.isfinite(x) & np.isfinite(y)
    product_exact = ~finite_xy | (x == 0) | (y == 0)  # x * y is exact: inf, NaN or a zero
    z_decides = finite_xy & ~product_exact & ~np.isfinite(z)  # finite * finite + inf/NaN
    naive = x * y + z
    out[product_exact] = naive[product_exact]
    out[z_decides] = z[z_decides]
    for i in np.flatnonzero(~safe & ~product_exact & ~z_decides):
        out[i] = _fma_exact(float(x[i]), float(y[i]), float(z[i]))
    return out


def _fma_exact(x: float, y: float, z: float) -> float:
    """fma of finite floats with x * y nonzero, in rational arithmetic (int / int rounds
    correctly); an exact zero is +0, as round to nearest gives it."""
    value = Fraction(x) * Fraction(y) + Fraction(z)
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def fma(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x * y + z rounded once, elementwise, in z's dtype (the three of one shape)."""
    dtype, shape = z.dtype, z.shape
    x, y, z = (np.ravel(a) for a in (x, y, z))  # 1-D, so scalars index as blocks do
    with np.errstate(all="ignore"):
        if dtype == np.float64:
            out = _fma64(x.astype(np.float64), y.astype(np.float64), z)
        elif dtype == np.float32:
            out = _fma32(x, y, z)
        else:
            # as Triton 3.9: narrower floats (fp16) through float64, which holds their
            # product exactly and is wide enough for the sum to round once in effect
            out = np.add(np.multiply(x, y, dtype=np.float64), z, dtype=np.float64)
    return np.asarray(out).astype(dtype, copy=False).reshape(shape)
