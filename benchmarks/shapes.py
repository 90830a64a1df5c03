"""Parameter lists of models that matter, for the benchmarks (no model code, only shapes).

The shapes live in the package (`fusedopt._bench_shapes`) so that the runner,
`python -m fusedopt.bench`, works from an installed package; this module keeps the names
the pytest-benchmark suites import. Sizes here are scaled to what a 2-core CPU steps in
tens of milliseconds.
"""
from __future__ import annotations

from fusedopt._bench_shapes import few_large, gpt2_like, make, resnet50_like, tiny_many

CASES = {"few_large": few_large, "gpt2_like": gpt2_like, "resnet50_like": resnet50_like, "tiny_2000": tiny_many}

__all__ = ["CASES", "few_large", "gpt2_like", "make", "resnet50_like", "tiny_many"]
