"""Test-suite set-up that must happen before Triton is imported.

The suite runs in one of two modes, because TRITON_INTERPRET decides when triton is
imported whether every kernel is interpreted or compiled, and compiled kernels refuse CPU
tensors:

* By default (CI, and any machine): the Triton path runs in Triton's interpreter on CPU
  tensors, so the kernels are tested without a GPU instead of skipped. Tests marked `gpu`
  skip.
* With FUSEDOPT_TEST_COMPILED=1 on a machine with CUDA: only the tests marked `gpu` run
  (`pytest -m gpu`), on CUDA tensors with compiled kernels: CUDA graphs, a second device,
  and the compiled kernels against torch.optim on the GPU. The rest skip, having run in
  the default mode.
"""
import os

import pytest
import torch

COMPILED = os.environ.get("FUSEDOPT_TEST_COMPILED") == "1" and torch.cuda.is_available()
if not COMPILED:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns unless FMA contraction is chosen explicitly; torch's CUDA kernels
# contract too, so keep it on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

DEVICE = "cuda" if COMPILED else "cpu"


def pytest_collection_modifyitems(config, items):
    for item in items:
        gpu = item.get_closest_marker("gpu") is not None
        if gpu and not COMPILED:
            item.add_marker(pytest.mark.skip(
                reason="needs CUDA and compiled kernels: FUSEDOPT_TEST_COMPILED=1 pytest -m gpu on a GPU machine"))
        elif COMPILED and not gpu:
            item.add_marker(pytest.mark.skip(reason="runs in the default mode (Triton's interpreter, CPU tensors)"))
