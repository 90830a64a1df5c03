"""Memory and object lifetime, against torch.optim doing the same: dropping an optimizer
frees everything it allocated at once (reference counting, not the cycle collector), and
steps allocate nothing that outlives them."""
import gc
import weakref

import pytest
import torch

import fusedopt
from optim_db import OPTIMIZERS

BACKENDS = ["triton", "reference", "auto"]


def model_and_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, lambda: model(torch.randn(3, 4)).sum()


def state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor in opt.state, and (fusedopt) every flat buffer and scalar vector."""
    found = [v for entry in opt.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    for _, buckets in getattr(opt, "_buckets", {}).values():
        for bucket in buckets:
            found += [t for t in bucket.buffers.values()] + [t for t in bucket.scalars.values()]
    return found


class no_cycle_collector:
    """Reference counting alone: what a training loop sees between the collector's runs."""

    def __enter__(self):
        gc.collect()
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was_enabled:
            gc.enable()


def alive_after_del(make, steps=2, keep=None):
    """How many of an optimizer's state tensors outlive `del opt` without the collector
    (its model stays alive, as a training script's does)."""
    model, loss = model_and_loss()
    make(model.parameters())   # torch's first construction imports dynamo: those frames make a cycle
    with no_cycle_collector():
        opt = make(model.parameters())
        others = keep(opt, model) if keep else None
        for _ in range(steps):
            opt.zero_grad()
            loss().backward()
            opt.step()
        refs = [weakref.ref(t) for t in state_tensors(opt)]
        assert refs
        del opt, others
        return sum(r() is not None for r in refs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=[info.name for info in OPTIMIZERS])
def test_del_frees_the_state_without_the_cycle_collector(info, backend):
    """torch.optim's state goes with `del opt`: no cycle holds the flat buffers (which on a
    GPU would hold device memory until the collector happens to run)."""
    options = info.configs[-1]
    assert alive_after_del(lambda p: info.torch(p, **options)) == 0
    assert alive_after_del(lambda p: info.fused(p, backend=backend, **options)) == 0


def test_state_outliving_its_optimizer_is_a_plain_dict():
    """`opt.state` kept after the optimizer is gone (as torch's defaultdict is) still works."""
    model, loss = model_and_loss()
    opt = fusedopt.Adam(model.parameters(), lr=0.01)
    loss().backward()
    opt.step()
    state = opt.state
    del opt
    gc.collect()
    p = next(model.parameters())
    exp_avg = state[p]["exp_avg"]
    state[p] = {"exp_avg": exp_avg}
    assert state[p]["exp_avg"] is exp_avg
    del state[p]
    assert state[p] == {} and state.popitem()[0] is not None
