"""accelerate's AcceleratedOptimizer around a fusedopt optimizer: it patches step() to see
whether GradScaler skipped it, and passes state_dict/load_state_dict through. Compared
with torch.optim's same class."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import fusedopt

accelerate = pytest.importorskip("accelerate")


def run(optim, fused):
    from accelerate.optimizer import AcceleratedOptimizer
    accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = AcceleratedOptimizer(optim.AdamW(model.parameters(), lr=1e-2, fused=fused), device_placement=False,
                               scaler=scaler)
    skipped = []
    for i in range(5):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        scaler.scale(model(x).pow(2).mean()).backward()
        if i == 2:
            model[0].weight.grad[0, 0] = float("inf")
        opt.step()
        skipped.append(opt.step_was_skipped)
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = AcceleratedOptimizer(optim.AdamW(model.parameters(), lr=1e-2, fused=fused), scaler=None)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    return model, opt, skipped, fresh


@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
def test_accelerated_optimizer_with_grad_scaler(fused):
    ref, ref_opt, ref_skipped, ref_fresh = run(torch.optim, fused)
    new, opt, skipped, fresh = run(fusedopt, fused)
    # Without fused=True GradScaler does not call the skipped step; with it the step runs
    # and skips inside, so accelerate sees no skip: the same for both.
    assert skipped == ref_skipped == [False, False, fused is None, False, False]
    for a, b in zip(new.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for p, q in zip(new.parameters(), ref.parameters()):
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 4
        for key, value in ref_fresh.state[q].items():
            torch.testing.assert_close(fresh.state[p][key].cpu(), value.cpu(), rtol=1e-6, atol=1e-6)
