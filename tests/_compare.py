"""Labelled comparisons and a side-by-side runner shared by the tests.

`assert_close` names the tensor, prints the largest error and the number of mismatches,
and treats NaN/Inf patterns as part of the answer. Tolerances travel with the dtype.
"""
from __future__ import annotations

import torch

from optim_db import SHAPES

TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.complex64: (1e-6, 1e-6),
    # bf16/fp16: torch rounds after every op, the kernel once per step: a few ulps.
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol=None, atol=None) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.layout == expected.layout, f"{name}: layout {actual.layout} != {expected.layout}"
    if expected.is_sparse:   # (SGD's momentum buffer as torch keeps it for sparse gradients)
        actual, expected = actual.to_dense(), expected.to_dense()
    d_rtol, d_atol = TOLERANCES.get(expected.dtype, (1e-6, 1e-6))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_complex():
        a, e = torch.view_as_real(a), torch.view_as_real(e)
    a, e = a.double(), e.double()
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), f"{name}: NaN pattern differs ({int((nan_a ^ nan_e).sum())} places)"
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        err = (a - e).abs()[~nan_e]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ; max abs error {err.max().item():.3e}, "
            f"max rel error {(err / e[~nan_e].abs().clamp_min(1e-30)).max().item():.3e} (rtol={rtol}, atol={atol})")


def make_params(dtype=torch.float32, device="cpu", shapes=SHAPES, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if shape == "channels_last":
            t = torch.randn(3, 5, 2, 2, generator=gen).to(memory_format=torch.channels_last)
        else:
            t = torch.randn(shape, generator=gen)
        out.append(t.to(dtype=dtype, device=device).requires_grad_())
    return out


def clone_params(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def gradients(params, step: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device) if p.numel() else torch.zeros_like(p)
            for p in params]


def groups(params, info, config):
    """Two groups with different options: the first half and the second half of params."""
    half = len(params) // 2
    return [dict(params=params[:half]), dict(params=params[half:], **info.second_group)]


def run_side_by_side(info, config, backend, dtype=torch.float32, steps=None, missing=((1, 2), (3, 5)), seed=0,
                     shapes=SHAPES, device="cpu"):
    """Step torch's and fusedopt's optimizer on identical params and gradients.

    `missing` lists (step, parameter) pairs that get no gradient that step.
    """
    steps = steps or info.steps
    p_ref = make_params(dtype, device=device, shapes=shapes, seed=seed)
    p_new = clone_params(p_ref)
    opt_ref = info.torch(groups(p_ref, info, config), **config)
    opt_new = info.fused(groups(p_new, info, config), backend=backend, **config)
    for step in range(steps):
        grads = gradients(p_ref, step, seed)
        for j, (a, b, g) in enumerate(zip(p_ref, p_new, grads)):
            if (step, j) in missing:
                a.grad = b.grad = None
            else:
                a.grad, b.grad = g.clone(), g.clone()
        if info.closure:
            opt_ref.step(lambda: 0.0)
            opt_new.step(lambda: 0.0)
        else:
            opt_ref.step()
            opt_new.step()
    return p_ref, opt_ref, p_new, opt_new


def assert_same_run(p_ref, opt_ref, p_new, opt_new, rtol=None, atol=None):
    for j, (a, b) in enumerate(zip(p_ref, p_new)):
        assert_close(f"param {j}", b, a, rtol, atol)
    s_ref, s_new = opt_ref.state_dict(), opt_new.state_dict()
    assert sorted(s_new["state"]) == sorted(s_ref["state"]), "state covers different parameters"
    for k, ref_entry in s_ref["state"].items():
        new_entry = s_new["state"][k]
        assert list(new_entry) == list(ref_entry), f"param {k}: state keys {list(new_entry)} != {list(ref_entry)}"
        for key, value in ref_entry.items():
            got = new_entry[key]
            if isinstance(value, torch.Tensor):
                assert got.device == value.device, f"state {key} of param {k}: device {got.device} != {value.device}"
                if key == "step":
                    assert got.dtype == value.dtype and float(got) == float(value), f"param {k}: step {got} != {value}"
                else:
                    assert_close(f"state {key} of param {k}", got, value, rtol, atol)
            else:
                assert got == value, f"state {key} of param {k}: {got!r} != {value!r}"


def embeddings_one_reshaped(cls, **options):
    """Two sparse embeddings stepped once by `cls(..., **options)`; then the first is given
    new storage of more rows and no gradient, and the second is stepped twice more. A
    parameter that keeps its old state while it is skipped (tests/test_sparse_grads.py,
    tests/test_sparse_adam.py). Returns (the first, the second, the optimizer)."""
    torch.manual_seed(0)
    emb, other = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(5, 3, sparse=True)
    opt = cls([emb.weight, other.weight], **options)
    (emb(torch.tensor([1, 2])).sum() + other(torch.tensor([1])).sum()).backward()
    opt.step()
    emb.weight.data = torch.ones(12, 3)
    emb.weight.grad = None
    for rows in ([3], [0, 4]):
        other.weight.grad = None
        other(torch.tensor(rows)).pow(2).sum().backward()
        opt.step()
    return emb, other, opt
