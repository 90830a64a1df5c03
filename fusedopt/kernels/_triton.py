"""Triton, if it is installed: `import fusedopt` must work without it.

Without triton, `triton.jit` here is a stand-in that keeps the kernel modules importable;
launching such a kernel raises (the optimizer never does: it takes the reference path).
"""
from __future__ import annotations

import os

# Triton 3.9 warns unless FMA contraction is chosen explicitly. torch's own CUDA kernels
# are built with contraction on (nvcc's default), so the fused step keeps it on; a user
# who sets the variable keeps their choice.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    AVAILABLE = False

    class _Missing:
        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    class _Unavailable:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError("fusedopt: the Triton path needs the `triton` package (pip install triton)")

    class triton:  # noqa: N801 - stands in for the module
        @staticmethod
        def jit(fn=None, **kwargs):
            return _Unavailable(fn) if fn is not None else _Unavailable

    tl = _Missing()

if AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Older Tritons' interpreters round some ops differently from a GPU; see _interpreter.
    from . import _interpreter

    _interpreter.install(triton)

__all__ = ["AVAILABLE", "triton", "tl"]
