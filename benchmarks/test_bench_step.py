"""`step()` on CPU: fusedopt against torch's for-loop, foreach and fused paths.

    make bench            # or: pytest benchmarks --benchmark-enable

Each case steps the same parameters and gradients; pytest-benchmark reports median times
of many rounds after warm-up. Compare rows within one run: the machine is shared.
"""
import pytest
import torch

import fusedopt
from shapes import CASES, make

ALGORITHMS = {
    "AdamW": (torch.optim.AdamW, fusedopt.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    "SGD-momentum": (torch.optim.SGD, fusedopt.SGD, dict(lr=1e-2, momentum=0.9)),
}
# torch's three paths, then fusedopt's default.
PATHS = {
    "torch-forloop": dict(foreach=False),
    "torch-foreach": dict(foreach=True),
    "torch-fused": dict(fused=True),
    "fusedopt": {},
}
BENCH_CASES = ["few_large", "gpt2_like", "tiny_2000"]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("case", BENCH_CASES)
def test_step(benchmark, case, algorithm, path):
    torch_cls, fused_cls, options = ALGORITHMS[algorithm]
    params = make(CASES[case]())
    cls = fused_cls if path == "fusedopt" else torch_cls
    opt = cls(params, **options, **PATHS[path])
    opt.step()  # state allocation belongs to warm-up, not to the steady-state step
    benchmark.extra_info.update(case=case, algorithm=algorithm, path=path,
                                elements=sum(p.numel() for p in params), tensors=len(params))
    benchmark.group = f"{case}-{algorithm}"
    benchmark(opt.step)
