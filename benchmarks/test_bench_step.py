"""`step()`: fusedopt against torch's foreach path, and its fused path where torch has one.

    make bench            # or: pytest benchmarks --benchmark-enable

Every algorithm of the runner (`fusedopt.bench.ALGORITHMS`) on the runner's four cases,
at the runner's sizes for the device (`fusedopt._bench_shapes`), fp32. Each case steps the
same parameters and gradients; pytest-benchmark reports median times of many rounds after
warm-up. Compare rows within one run: the machine is shared. `python -m fusedopt.bench`
is the fuller comparison (for-loop too, bf16, bandwidth, a plot).
"""
import pytest
import torch

import fusedopt
from fusedopt import _bench_shapes
from fusedopt.bench import ALGORITHMS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = _bench_shapes.cases("gpu" if DEVICE == "cuda" else "cpu")
# torch's paths, then fusedopt's default.
PATHS = {
    "torch-foreach": dict(foreach=True),
    "torch-fused": dict(fused=True),
    "fusedopt": {},
}


@pytest.fixture
def one_thread():
    """CPU timings run single-threaded, as the runner's: on a shared machine a
    multi-threaded op's time is mostly waiting for other jobs' cores."""
    if DEVICE != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.name)
@pytest.mark.parametrize("case", list(SHAPES))
def test_step(benchmark, one_thread, case, algorithm, path):
    params = _bench_shapes.make(SHAPES[case], device=DEVICE)
    if path == "fusedopt":
        opt = getattr(fusedopt, algorithm.cls)(params, **algorithm.options)
    else:
        try:
            opt = getattr(torch.optim, algorithm.cls)(params, **algorithm.options, **PATHS[path])
        except (RuntimeError, ValueError, TypeError) as e:
            pytest.skip(f"torch has no {path} path here: {e}")
    opt.step()  # state allocation belongs to warm-up, not to the steady-state step
    benchmark.extra_info.update(case=case, algorithm=algorithm.name, path=path,
                                elements=sum(p.numel() for p in params), tensors=len(params))
    benchmark.group = f"{case}-{algorithm.name}"

    def step():
        opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # time the work, not its launch

    benchmark(step)
