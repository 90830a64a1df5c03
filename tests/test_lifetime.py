"""Memory and object lifetime, against torch.optim doing the same: dropping an optimizer
frees everything it allocated at once (reference counting, not the cycle collector), and
steps allocate nothing that outlives them."""
import copy
import gc
import pickle
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


def reachable_bytes(root, exclude=()) -> int:
    """Bytes of the distinct storages of the tensors reachable from `root`, but those of
    the tensors in `exclude` (the parameters and gradients, which the user owns)."""
    skip = {id(x) for x in exclude}
    theirs = {x.untyped_storage().data_ptr() for x in exclude if isinstance(x, torch.Tensor)}
    seen, stack, storages = set(), [root], {}
    while stack:
        o = stack.pop()
        if id(o) in seen or id(o) in skip or isinstance(o, (type, type(gc), type(reachable_bytes))):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
            continue
        stack.extend(gc.get_referents(o))
    return sum(n for ptr, n in storages.items() if ptr not in theirs)


def stepped_adam(backend):
    model, loss = model_and_loss()
    opt = fusedopt.Adam(model.parameters(), lr=0.01, backend=backend)
    for _ in range(2):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return model, loss, opt


def held_bytes(opt) -> int:
    params = [p for g in opt.param_groups for p in g["params"]]
    return reachable_bytes(opt, params + [p.grad for p in params])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deleted_group_frees_its_state_at_the_next_step_as_torchs(backend):
    """`del opt.param_groups[i]` and its parameters' entries popped from `opt.state`: torch
    holds their state no more. fusedopt's buckets, cached by group index, kept the last
    index's flat buffers for as long as the optimizer lived, and the values it last
    validated for that index its parameters."""
    for first in (True, False):
        big, small = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(8))
        groups = [{"params": [big]}, {"params": [small]}]
        opt = fusedopt.Adam(groups if first else groups[::-1], lr=0.01, backend=backend)
        big.grad, small.grad = torch.randn(4096), torch.randn(8)
        opt.step()
        for p in opt.param_groups.pop(0 if first else 1)["params"]:
            opt.state.pop(p)
        opt.step()
        gc.collect()
        assert held_bytes(opt) < 4096 * 4, f"the deleted group's state is still held (first={first})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_keeps_no_copy_of_what_it_loaded(backend):
    """torch's state after a load is the loaded tensors; fusedopt copies them into its flat
    buffers, and kept them too (to write each step back into them), doubling the state's
    memory for the optimizer's lifetime once the caller had dropped the checkpoint."""
    model, loss, opt = stepped_adam(backend)
    own = held_bytes(opt)
    with no_cycle_collector():
        checkpoint = copy.deepcopy(opt.state_dict())
        loaded = [weakref.ref(t) for entry in checkpoint["state"].values() for t in entry.values()]
        opt.load_state_dict(checkpoint)
        del checkpoint
        assert not any(r() is not None for r in loaded)
    opt.zero_grad()
    loss().backward()
    opt.step()
    assert held_bytes(opt) <= own   # (the Triton path's tables differ by a few bytes)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        twin.step()
        assert held_bytes(twin) <= own


def averaged_and_model(lib, backend, staged=False):
    model, _ = model_and_loss()
    swa = fusedopt.swa if lib is fusedopt else torch.optim.swa_utils
    averaged = swa.AveragedModel(model, **({} if lib is torch.optim else dict(backend=backend)))
    if staged:  # a model tensor the average reads through a staged copy (other strides)
        weight = model[0].weight
        weight.data = weight.data.t().contiguous().t()
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        averaged.update_parameters(model)
    return averaged, model


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_average_kept_after_its_model_is_dropped_frees_the_model(backend):
    """torch's AveragedModel keeps nothing of the model it averages; fusedopt's cached the
    model's tensors between updates, so an average kept for evaluation kept the trained
    model's memory too."""
    for lib in (torch.optim, fusedopt):
        averaged, model = averaged_and_model(lib, backend)
        refs = [weakref.ref(p) for p in model.parameters()]
        del model
        gc.collect()
        assert not any(r() is not None for r in refs), lib
        averaged.update_parameters(averaged_and_model(lib, backend)[1])   # still averages another


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_average_keeps_no_staged_copy_between_updates(backend):
    averaged, model = averaged_and_model(fusedopt, backend, staged=True)
    plain, plain_model = averaged_and_model(fusedopt, backend)
    held = [reachable_bytes(a, list(m.parameters())) for a, m in ((averaged, model), (plain, plain_model))]
    assert held[0] <= held[1]   # (the cached batch of the plain one keeps a mask or two)
