"""Every row of the optimizer table against torch.optim, on every path.

'triton' runs the fused kernel (in Triton's interpreter when there is no GPU), 'reference'
the plain-torch path over the same flat buffers, 'auto' what a user gets by default.
"""
import pytest
import torch

from _compare import assert_same_run, run_side_by_side
from optim_db import OPTIMIZERS, all_cases, dtype_cases

BACKENDS = ["triton", "reference", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,config", all_cases())
def test_matches_torch_fp32(info, config, backend):
    run = run_side_by_side(info, config, backend)
    assert_same_run(*run, rtol=info.rtol32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("info,dtype", dtype_cases())
def test_matches_torch_other_dtypes(info, dtype, backend):
    config = info.configs[-1]
    run = run_side_by_side(info, config, backend, dtype=dtype)
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
