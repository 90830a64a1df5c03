"""Property-based differential test: random optimizers, layouts and runs against torch.optim.

Hypothesis draws the algorithm and one of its option sets from the optimizer table, the
group layout, the shapes, the dtypes (fp32, fp64, bf16 where the row allows it), which
parameters lack a gradient on which steps, the number of steps, and the path. CI draws
FUSEDOPT_HYPOTHESIS_EXAMPLES examples (default 25, the same ones every run); `make test-long`
draws 500 new ones.
"""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _compare import assert_same_run
from optim_db import OPTIMIZERS

EXAMPLES = int(os.environ.get("FUSEDOPT_HYPOTHESIS_EXAMPLES", "25"))
# CI's 25 examples are the same every run, so that a red CI points at the change, not at a
# new draw; `make test-long` (which sets the count) draws afresh each time.
DERANDOMIZE = "FUSEDOPT_HYPOTHESIS_EXAMPLES" not in os.environ

dims = st.sampled_from([0, 1, 2, 3, 5, 16, 31, 33, 1023, 1025])
shapes = st.lists(dims, min_size=0, max_size=2).map(tuple)


@st.composite
def runs(draw):
    info = draw(st.sampled_from(OPTIMIZERS))
    config = dict(draw(st.sampled_from(info.configs)))
    allowed = [torch.float32, torch.float64] + ([torch.bfloat16] if torch.bfloat16 in info.dtypes else [])
    n = draw(st.integers(1, 6))
    params = []
    for _ in range(n):
        dtype = draw(st.sampled_from(allowed))
        params.append(torch.randn(draw(shapes), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
                      .to(dtype))
    split = draw(st.integers(0, n))
    steps = draw(st.integers(1, info.steps + 2))
    missing = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=steps, max_size=steps))
    backend = draw(st.sampled_from(["triton", "reference", "auto"]))
    return info, config, params, split, missing, backend


def build(info, config, params, split, backend=None):
    first, second = params[:split], params[split:]
    groups = [g for g in ({"params": first}, {"params": second, **info.second_group}) if g["params"]]
    kwargs = dict(config, backend=backend) if backend else config
    return (info.fused if backend else info.torch)(groups, **kwargs)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=DERANDOMIZE)
@given(runs())
def test_random_runs_match_torch(run):
    info, config, params, split, missing, backend = run
    theirs = [p.clone().requires_grad_() for p in params]
    ours = [p.clone().requires_grad_() for p in params]
    ref = build(info, config, theirs, split)
    opt = build(info, config, ours, split, backend)
    for step, absent in enumerate(missing):
        gen = torch.Generator().manual_seed(step)
        for a, b, skip in zip(theirs, ours, absent):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a.dtype)
            a.grad, b.grad = (None, None) if skip else (g.clone(), g.clone())
        closure = (lambda: 0.0) if info.closure else None
        ref.step(closure)
        opt.step(closure)
    assert_same_run(theirs, ref, ours, opt, rtol=info.rtol32 if all(p.dtype == torch.float32 for p in params) else None)
