"""Triton kernels, one module per algorithm: kernel, launcher and reference side by side.

`all_variants()` lists every compiled specialisation for `python -m fusedopt.kernels --check`.
Kernel modules are found by name, so a new algorithm adds a module with a `VARIANTS` list
and nothing here changes.
"""
from __future__ import annotations

import importlib
import pkgutil


def all_variants():
    variants = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        variants.extend(getattr(module, "VARIANTS", []))
    return variants
