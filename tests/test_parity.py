"""Every row of the optimizer table against torch.optim, on every path.

'triton' runs the fused kernel (in Triton's interpreter when there is no GPU), 'reference'
the plain-torch path over the same flat buffers, 'auto' what a user gets by default.
"""
import pytest

from _compare import assert_same_run, run_side_by_side
from optim_db import all_cases, dtype_cases

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
