"""Property-based differential test of an averaged model's life beside its optimizer.

tests/test_lifecycle.py draws programs of what training code does to an optimizer; this
file does the same for `fusedopt.swa.AveragedModel`, alone and attached to an optimizer
(`Optimizer.attach_averaged_model`). Its flat buffers, its cached batches of the model's
tensors and the optimizer's averaging plan are keyed on the tensors they were built from,
so what this draws is what changes those tensors between updates: a parameter of the model
given new storage or replaced by a new Parameter (which the optimizer then does not
hold), the averaged copy's tensors written or re-pointed, a module added to one or both
or replaced, the average converted to fp64 (swapping tensors too), the model copied into
the average, its count reset, its state dict loaded both ways (with `assign=True` too),
the optimizers' checkpoints loaded both ways, copies and pickles of the whole training
state, `update_bn`, and BatchNorm statistics moved by forward passes. torch.optim with
torch's AveragedModel runs each program beside fusedopt's optimizer and average; with the
average attached, torch's side calls `update_parameters` after each step, which is the
attachment's contract. After every operation the models, the averages' state dicts and
the optimizers' state dicts must agree. Where torch raises, fusedopt must raise the same
type, and the program ends.

Gradients are drawn, not computed, so the two sides' parameters (which differ by
rounding where the kernels run) never feed back into them. The programs drawn are half as
many as tests/test_lifecycle.py's (FUSEDOPT_LIFECYCLE_EXAMPLES), drawn as they are there.
"""
import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.optim import swa_utils as torch_swa

import fusedopt
from fusedopt import swa

from _compare import assert_close, assert_same_run
from test_attach_average import OPTIMIZERS
from test_lifecycle import EXAMPLES, lifecycles, raised, run_ops
from test_swa import AVERAGES, FUSED

# (as tests/test_lifecycle.py: what this looks for is off by far more than rounding)
ATOL, RTOL = 1e-5, 1e-4

OPERATIONS = ["step", "step", "step", "update", "update", "forward", "attach", "detach",
              "replace_param", "replace_data", "write_average", "repoint_average", "reset_count",
              "load_average", "snapshot", "restore", "reload_optimizer", "copy_all", "add_module", "replace_module", "average_in_fp64", "average_from_model",
              "update_bn", "toggle_frozen"]


def make_model(seed: int) -> torch.nn.Module:
    """Linear (no bias: before a BatchNorm its gradient is noise), BatchNorm (float and
    integer buffers), Linear."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5, bias=False), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 2))


@st.composite
def programs(draw):
    average = draw(st.sampled_from(sorted(AVERAGES)))
    # (torch's multi-tensor SWA refuses the integer buffer it would average)
    use_buffers = draw(st.booleans()) and average != "swa_multi"
    optimizer = draw(st.sampled_from(sorted(OPTIMIZERS)))
    backend = draw(st.sampled_from(["auto", "reference", "triton"]))
    ops = draw(st.lists(st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 2 ** 16)), min_size=3, max_size=12))
    return average, use_buffers, optimizer, backend, ops


class Side:
    """One implementation's model, optimizer and averaged model."""

    def __init__(self, optim, swa_module, average, use_buffers, optimizer, device, **extra):
        self.model = make_model(0).to(device)
        # The last Linear's bias is not the optimizer's: the average must still average it.
        held = [p for name, p in self.model.named_parameters() if name != "3.bias"]
        self.opt = OPTIMIZERS[optimizer](optim, held, **extra)
        self.avg = swa_module.AveragedModel(self.model, use_buffers=use_buffers, **AVERAGES[average](swa_module),
                                            **extra)


class Twins:
    def __init__(self, average, use_buffers, optimizer, backend, device="cpu"):
        self.average, self.device = average, device
        self.theirs = Side(torch.optim, torch_swa, average, use_buffers, optimizer, device)
        self.ours = Side(fusedopt, swa, average, use_buffers, optimizer, device, backend=backend)
        self.attached = False

    def sides(self):
        return self.theirs, self.ours

    def both(self, call) -> bool:
        """Run `call` on each side; False when both raised (the same exception type), which
        ends the program."""
        theirs, ours = raised(lambda: call(self.theirs), lambda: call(self.ours))
        if theirs is None and ours is None:
            return True
        assert type(theirs) is type(ours), f"torch: {theirs!r}; fusedopt: {ours!r}"
        return False

    def check(self):
        a, b = self.theirs, self.ours
        mine, expected = b.model.state_dict(), a.model.state_dict()
        assert list(mine) == list(expected), f"model keys {list(mine)} != {list(expected)}"
        for key, value in expected.items():
            assert_close(f"model {key}", mine[key], value, RTOL, ATOL)
        mine, expected = b.avg.state_dict(), a.avg.state_dict()
        assert list(mine) == list(expected), f"average keys {list(mine)} != {list(expected)}"
        for key, value in expected.items():
            assert_close(f"average {key}", mine[key], value, RTOL, ATOL)
        held = [[p for g in side.opt.param_groups for p in g["params"]] for side in self.sides()]
        assert_same_run(held[0], a.opt, held[1], b.opt, rtol=RTOL, atol=ATOL)

    # ------------------------------------------------------------------ the operations
    # Each takes the drawn integer k and returns False to end the program.

    def step(self, k):
        """A step from drawn gradients (some None); with the average attached, torch's side
        then updates its average, as the attachment promises fusedopt's step does."""
        gen = torch.Generator().manual_seed(k)
        pairs = list(zip(self.theirs.model.parameters(), self.ours.model.parameters()))
        for a, b in pairs:
            g = torch.randn(a.shape, generator=gen, dtype=a.dtype).to(self.device)
            a.grad, b.grad = (None, None) if not a.requires_grad or torch.rand((), generator=gen) < 0.15 \
                else (g.clone(), g.clone())

        def step(side):
            side.opt.step()
            if self.attached and side is self.theirs:
                side.avg.update_parameters(side.model)

        return self.both(step)

    def update(self, k):
        """update_parameters outside the step (attached or not: it counts either way)."""
        return self.both(lambda side: side.avg.update_parameters(side.model))

    def forward(self, k):
        """A forward pass, in train mode (BatchNorm's statistics and count move) or eval."""
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(k)).to(self.device)
        with torch.no_grad():
            for side in self.sides():
                side.model.train(k % 3 != 0)
                side.model(x)

    def attach(self, k):
        """Attach the average to the optimizer. fusedopt refuses a user's function (nothing
        to fuse), and a model none of whose parameters the optimizer holds."""
        opt, avg, model = self.ours.opt, self.ours.avg, self.ours.model
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        if self.average not in FUSED or not any(id(p) in held for p in model.parameters()):
            with pytest.raises(ValueError):
                opt.attach_averaged_model(avg, model)
            return
        opt.attach_averaged_model(avg, model)   # (naming the model: the average may be a copy)
        self.attached = True

    def detach(self, k):
        self.ours.opt.attach_averaged_model(None)
        self.attached = False

    def _param(self, k, side):
        params = list(side.model.named_parameters())
        return params[k % len(params)]

    def replace_param(self, k):
        """A new Parameter in a parameter's place (same shape): the optimizer still holds the
        old one; the average follows the model."""
        name, p = self._param(k, self.theirs)
        value = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)).to(self.device)
        module_name, _, attr = name.rpartition(".")
        for side in self.sides():
            setattr(side.model.get_submodule(module_name), attr, torch.nn.Parameter(value.clone()))

    def replace_data(self, k):
        """New storage of the same shape through `.data`: the optimizer follows it."""
        _, p = self._param(k, self.theirs)
        value = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)).to(self.device)
        for side in self.sides():
            self._param(k, side)[1].data = value.clone()

    def _averaged(self, k, side):
        tensors = list(side.avg.module.parameters()) + list(side.avg.module.buffers())
        return tensors[k % len(tensors)]

    def write_average(self, k):
        """Write into the averaged copy in place (it is a view of fusedopt's flat buffer)."""
        for side in self.sides():
            t = self._averaged(k, side)
            t.data.mul_(2) if t.dtype == torch.long else t.data.mul_(0.5)

    def repoint_average(self, k):
        """Give one of the averaged copy's tensors new storage of the same values (fusedopt
        must lay out its buffers again), or replace it by `load_state_dict(assign=True)`."""
        if k % 2:
            for side in self.sides():
                t = self._averaged(k, side)
                t.data = t.data.clone()
        else:
            saved = copy.deepcopy(self.theirs.avg.state_dict())
            return self.both(lambda side: side.avg.load_state_dict(copy.deepcopy(saved), assign=True))

    def reset_count(self, k):
        """Start the average again: n_averaged set to 0 (in place, or through `.data`, which
        an attached average does not see on a GPU: `attach_averaged_model` says so)."""
        through_data = k % 2 and not (self.attached and self.device != "cpu")
        for side in self.sides():
            (side.avg.n_averaged.data if through_data else side.avg.n_averaged).fill_(0)

    def load_average(self, k):
        """Each average loads the other implementation's state dict."""
        saved = [copy.deepcopy(side.avg.state_dict()) for side in self.sides()]
        return self.both(lambda side: side.avg.load_state_dict(saved[side is self.theirs]))

    def snapshot(self, k):
        self.saved = [copy.deepcopy(side.avg.state_dict()) for side in self.sides()]

    def restore(self, k):
        saved = getattr(self, "saved", None)
        if saved is not None:
            return self.both(lambda side: side.avg.load_state_dict(copy.deepcopy(saved[side is self.ours])))

    def reload_optimizer(self, k):
        """Each optimizer loads its own checkpoint (or the other implementation's), the
        average staying attached."""
        saved = [copy.deepcopy(side.opt.state_dict()) for side in self.sides()]
        cross = bool(k % 2)
        return self.both(lambda side: side.opt.load_state_dict(saved[(side is self.ours) != cross]))

    def copy_all(self, k):
        """Go on with a deep copy, or an unpickled copy, of the model, optimizer and average
        together. fusedopt's attachment is not part of a copy: attach the copy again. (Only
        the default average pickles: the functions are local, in torch as in fusedopt.)"""
        deep = k % 2 or self.average != "default"
        for side in self.sides():
            trio = (side.model, side.opt, side.avg)
            side.model, side.opt, side.avg = copy.deepcopy(trio) if deep else pickle.loads(pickle.dumps(trio))
        if self.attached:
            self.ours.opt.attach_averaged_model(self.ours.avg, self.ours.model)

    def add_module(self, k):
        """A Linear appended to the model and its averaged copy (or to the model only, whose
        extra tensors torch then does not average), now and then given to the optimizer."""
        torch.manual_seed(k)
        extra = torch.nn.Linear(2, 2).to(self.device)
        name = f"extra{k}"
        for side in self.sides():
            side.model.add_module(name, copy.deepcopy(extra))
            if k % 3:
                side.avg.module.add_module(name, copy.deepcopy(extra))
            if k % 2:
                side.opt.add_param_group({"params": list(getattr(side.model, name).parameters())})

    def replace_module(self, k):
        """The last Linear replaced by a new one of the same shape (under the same name) in
        the averaged copy, and now and then in the model too (whose optimizer still holds the
        old one's parameters)."""
        torch.manual_seed(k)
        layer = torch.nn.Linear(5, 2).to(self.device)
        for side in self.sides():
            side.avg.module[3] = copy.deepcopy(layer).to(next(side.avg.module[0].parameters()).dtype)
            if k % 2:
                side.model[3] = copy.deepcopy(layer)

    def average_in_fp64(self, k):
        """Keep the average in fp64 (`averaged.double()`) while the model stays fp32; now and
        then with torch's swapping conversion (the averaged module's Parameter objects stay,
        their contents are swapped for new tensors)."""
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(bool(k % 2))
        try:
            for side in self.sides():
                side.avg.double()
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)

    def average_from_model(self, k):
        """Copy the model into its averaged copy (`averaged.module.load_state_dict`)."""
        return self.both(lambda side: side.avg.module.load_state_dict(side.model.state_dict()))

    def update_bn(self, k):
        gen = torch.Generator().manual_seed(k)
        loader = [torch.randn(4, 3, generator=gen).to(self.device) for _ in range(2)]

        def update_bn(side):
            module = torch_swa if side is self.theirs else swa
            module.update_bn([t.to(next(side.avg.parameters()).dtype) for t in loader], side.avg)

        return self.both(update_bn)

    def toggle_frozen(self, k):
        for side in self.sides():
            p = self._param(k, side)[1]
            p.requires_grad_(not p.requires_grad)


def run_program(program, device):
    average, use_buffers, optimizer, backend, ops = program
    twins = Twins(average, use_buffers, optimizer, backend, device)
    run_ops(twins, ops, twins.check)


@lifecycles(EXAMPLES // 2)
@given(programs())
def test_random_average_lifecycles_match_torch(program):
    run_program(program, "cpu")


# On a GPU (tests/conftest.py): the compiled kernels, the averaging fused into them.
@pytest.mark.gpu
@lifecycles(EXAMPLES // 2)
@given(programs())
def test_random_average_lifecycles_match_torch_on_the_gpu(program):
    run_program(program, "cuda")
