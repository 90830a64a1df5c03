"""Which path runs a bucket: the `backend=` keyword, FUSEDOPT_BACKEND, and the device.

Shared by the optimizers and AveragedModel, so that 'auto' means the same everywhere.
"""
from __future__ import annotations

import os

import torch

from .kernels import _launch
from .kernels._triton import AVAILABLE as TRITON_AVAILABLE

BACKENDS = ("auto", "triton", "reference")


def resolve(backend: str) -> str:
    """The backend in force: FUSEDOPT_BACKEND overrides the keyword for a whole process."""
    chosen = os.environ.get("FUSEDOPT_BACKEND") or backend
    if chosen not in BACKENDS:
        raise ValueError(f"Invalid backend: {chosen!r} (expected one of {', '.join(BACKENDS)})")
    return chosen


def choose_path(backend: str, device: torch.device, cpu_fast_path: str | None = None) -> str:
    """'triton', 'reference', or the caller's fast CPU path.

    'auto' takes the kernel on GPUs (CUDA and ROCm both report 'cuda') and, on the CPU,
    `cpu_fast_path` where the caller has one that is correct for this bucket.
    """
    if backend == "reference":
        return "reference"
    if backend == "triton":
        _launch.check_runnable(device)
        return "triton"
    if device.type == "cuda" and TRITON_AVAILABLE:
        return "triton"
    if device.type == "cpu" and cpu_fast_path is not None:
        return cpu_fast_path
    return "reference"
