"""torch.amp.GradScaler drives fusedopt's optimizers as it drives torch's.

By default fusedopt optimizers do not set `_step_supports_amp_scaling`, so the scaler
unscales gradients itself and skips `step()` on inf/NaN: frameworks (Lightning) can then
clip unscaled gradients between `unscale_` and `step`.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

import fusedopt
from _compare import assert_close

BACKENDS = ["triton", "reference", "auto"]
OPTIMIZERS = [
    pytest.param(torch.optim.AdamW, fusedopt.AdamW, dict(lr=1e-2), id="AdamW"),
    pytest.param(torch.optim.SGD, fusedopt.SGD, dict(lr=1e-2, momentum=0.9), id="SGD"),
    pytest.param(torch.optim.RMSprop, fusedopt.RMSprop, dict(lr=1e-2, centered=True), id="RMSprop"),
]


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    return model, x, y


def train(model, opt, scaler, x, y, steps, inf_at=(), clip=None):
    scales = []
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step in inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("torch_cls,fused_cls,options", OPTIMIZERS)
@pytest.mark.parametrize("clip", [None, 0.5], ids=["plain", "unscale-clip"])
def test_grad_scaler_matches_torch_and_skips_inf_steps(torch_cls, fused_cls, options, backend, clip):
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch_cls(model.parameters(), **options)
    opt = fused_cls(twin.parameters(), backend=backend, **options)
    assert not getattr(opt, "_step_supports_amp_scaling", False)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s_new = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    a = train(model, ref, s_ref, x, y, 3, clip=clip)
    b = train(twin, opt, s_new, x, y, 3, clip=clip)
    # An inf gradient: the step is skipped, nothing moves, the scale halves.
    params_before = [p.detach().clone() for p in twin.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    scale_before = s_new.get_scale()
    a += train(model, ref, s_ref, x, y, 1, inf_at=(0,), clip=clip)
    b += train(twin, opt, s_new, x, y, 1, inf_at=(0,), clip=clip)
    assert s_new.get_scale() == scale_before / 2
    assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), params_before))
    for k, entry in state_before.items():
        for key, value in entry.items():
            assert torch.equal(opt.state_dict()["state"][k][key], value), f"{key} of param {k} changed on a skipped step"
    a += train(model, ref, s_ref, x, y, 3, clip=clip)
    b += train(twin, opt, s_new, x, y, 3, clip=clip)
    assert a == b
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_close(f"param {i}", q.detach(), p.detach())


FUSED = [
    pytest.param(torch.optim.AdamW, fusedopt.AdamW, dict(lr=1e-2, amsgrad=True), id="AdamW"),
    pytest.param(torch.optim.Adam, fusedopt.Adam, dict(lr=1e-2, weight_decay=0.1, maximize=True), id="Adam"),
    pytest.param(torch.optim.SGD, fusedopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True), id="SGD"),
    pytest.param(torch.optim.Adagrad, fusedopt.Adagrad, dict(lr=1e-2, weight_decay=0.1), id="Adagrad"),
]


def assert_same_grads(model, twin):
    # Close, not equal: the parameters they are taken at agree to rounding, which the
    # backward pass amplifies. A gradient left scaled would be off by the scale (2^7-2^9).
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_close(f"grad of param {i}", q.grad, p.grad, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("torch_cls,fused_cls,options", FUSED)
def test_fused_true_unscales_in_the_kernel_like_torch_fused(torch_cls, fused_cls, options, backend):
    """fused=True: GradScaler hands grad_scale/found_inf to step(), as to torch's fused optimizers."""
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch_cls(model.parameters(), fused=True, **options)
    opt = fused_cls(twin.parameters(), fused=True, backend=backend, **options)
    assert opt._step_supports_amp_scaling and ref._step_supports_amp_scaling
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s_new = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    a = train(model, ref, s_ref, x, y, 3)
    b = train(twin, opt, s_new, x, y, 3)
    assert_same_grads(model, twin)   # torch's fused kernels leave them unscaled
    params_before = [p.detach().clone() for p in twin.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    a += train(model, ref, s_ref, x, y, 1, inf_at=(0,))
    b += train(twin, opt, s_new, x, y, 1, inf_at=(0,))
    assert_same_grads(model, twin)   # and a skipped step leaves them scaled
    assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), params_before)), "a skipped step moved params"
    for k, entry in state_before.items():
        for key, value in entry.items():
            assert torch.equal(opt.state_dict()["state"][k][key], value), f"{key} of param {k} changed on a skipped step"
    a += train(model, ref, s_ref, x, y, 3)
    b += train(twin, opt, s_new, x, y, 3)
    assert a == b
    for (i, (p, q)), (k, entry) in zip(enumerate(zip(model.parameters(), twin.parameters())), ref.state_dict()["state"].items()):
        assert_close(f"param {i}", q.detach(), p.detach())
        for key, value in entry.items():
            got = opt.state_dict()["state"][k][key]
            assert got.device == value.device and got.dtype == value.dtype, key
            assert_close(f"{key} of param {k}", got, value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_fused_sgd_first_step_skipped_starts_momentum_at_the_next(backend, dampening):
    """A first step GradScaler skips (fused=True) must leave the next one a first step: its
    momentum buffer starts as the gradient, undampened, as torch.optim.SGD's does, which
    GradScaler never steps then. (torch's fused CPU SGD keeps an uninitialised buffer after
    such a step, so the unfused class is the reference.) A zero buffer here dampened the
    next step's gradient."""
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    options = dict(lr=1e-2, momentum=0.9, dampening=dampening)
    ref = torch.optim.SGD(model.parameters(), **options)
    opt = fusedopt.SGD(twin.parameters(), fused=True, backend=backend, **options)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    s_new = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    a = train(model, ref, s_ref, x, y, 1, inf_at=(0,))
    b = train(twin, opt, s_new, x, y, 1, inf_at=(0,))
    if dampening:
        assert opt.state_dict()["state"] == {}, "a skipped first step left state behind"
    a += train(model, ref, s_ref, x, y, 3)
    b += train(twin, opt, s_new, x, y, 3)
    assert a == b
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_close(f"param {i}", q.detach(), p.detach())
        assert_close(f"momentum_buffer of param {i}", opt.state[q]["momentum_buffer"], ref.state[p]["momentum_buffer"])


class _AsyncCopiesToTheCPU(torch.overrides.TorchFunctionMode):
    """Records where fusedopt's code calls `Tensor.to(..., non_blocking=True)` with the CPU as
    the destination (torch's GradScaler does so for CPU tensors, where it is a no-op)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.to and kwargs.get("non_blocking") and isinstance(out, torch.Tensor) \
                and out.device.type == "cpu":
            caller = sys._getframe(1).f_code
            if Path(fusedopt.__file__).parent in Path(caller.co_filename).parents:
                self.seen.append(f"{caller.co_filename}:{caller.co_name}")
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_copy_to_the_cpu_is_asynchronous(backend):
    """A non_blocking copy from a GPU to the CPU returns before its data has landed, and a
    CPU op that reads it reads garbage: every copy whose destination may be the CPU (the
    found_inf that takes a skipped step back, GradScaler's scale and the clip coefficient,
    a tensor lr's column) waits. Steps GradScaler skips, clipped, with a tensor lr."""
    model, x, y = model_and_data()
    opt = fusedopt.AdamW(model.parameters(), lr=torch.tensor(1e-2), fused=True, backend=backend, max_grad_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with _AsyncCopiesToTheCPU() as mode:
        train(model, opt, scaler, x, y, 3, inf_at=(1,))
    assert mode.seen == []


# Gradients the kernels cannot write in place (a staged copy stands in for a gradient whose
# strides are not its parameter's, a converted one for a gradient of another dtype), and
# the modes that step from a copy of the gradient (master weights, clipping).
GRAD_CASES = {
    "bf16": dict(dtype=torch.bfloat16),
    "transposed-grad": dict(layout="transposed"),
    "fp32-grad-bf16-param": dict(dtype=torch.bfloat16, grad_dtype=torch.float32),
    "master-weights": dict(dtype=torch.bfloat16, options=dict(master_weights=True)),
    "clipped": dict(options=dict(max_grad_norm=0.5)),
}
GRAD_CASE_PARAMS = [pytest.param(name, case, id=f"{case}-{name}") for name in ("AdamW", "SGD", "Adagrad")
                    for case in GRAD_CASES if case != "master-weights" or name == "AdamW"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,case", GRAD_CASE_PARAMS)
@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["step", "skip"])
def test_fused_true_leaves_gradients_unscaled_like_torch_fused(backend, name, case, found_inf):
    """After a step with GradScaler's scale (fused=True) each gradient holds grad / scale in
    its own dtype, as torch's fused kernels leave it (they divide in fp32 and store); a step
    GradScaler skips leaves it as it was. Checked against torch's fused optimizer where it
    takes the gradients, and against that division where it does not (another dtype)."""
    spec = GRAD_CASES[case]
    dtype, grad_dtype = spec.get("dtype", torch.float32), spec.get("grad_dtype")
    torch.manual_seed(0)
    values = [torch.randn(24, 16), torch.randn(3), torch.randn(40, 8)]
    grads = [torch.randn_like(v) * 100 for v in values]
    scale = torch.tensor(3.0)   # not a power of 2: a division and a multiplication differ

    def stepped(module, fused_options):
        params = [torch.nn.Parameter(v.to(dtype)) for v in values]
        for p, g in zip(params, grads):
            g = g.to(grad_dtype or dtype, copy=True)
            if grad_dtype is not None:
                p.grad_dtype = grad_dtype
            p.grad = g.t().contiguous().t() if spec.get("layout") == "transposed" and g.dim() == 2 else g
        opt = getattr(module, name)(params, lr=1e-2, fused=True, **fused_options)
        opt.grad_scale, opt.found_inf = scale, torch.tensor(found_inf)
        opt.step()
        return params

    ours = stepped(fusedopt, dict(backend=backend, **spec.get("options", {})))
    for i, (p, g) in enumerate(zip(ours, grads)):
        given = g.to(grad_dtype or dtype)
        if found_inf:
            expected = given
        elif grad_dtype is None:
            expected = None
        else:
            expected = (given.float() / scale).to(given.dtype)
        if expected is not None:
            assert torch.equal(p.grad, expected), f"grad {i}: {p.grad.flatten()[:3]} against {expected.flatten()[:3]}"
        assert p.grad.stride() == (given.t().contiguous().t() if spec.get("layout") and g.dim() == 2
                                   else given).stride()
    if grad_dtype is None and not found_inf:
        theirs = stepped(torch.optim, {})
        for i, (p, q) in enumerate(zip(ours, theirs)):
            assert torch.equal(p.grad, q.grad), f"grad {i}: {p.grad.flatten()[:3]} against torch's {q.grad.flatten()[:3]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adagrad"])
@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["step", "skip"])
def test_fused_true_refuses_a_gradient_whose_elements_share_memory(backend, name, found_inf):
    """GradScaler's step (fused=True) writes the unscaled gradients back; an expanded
    gradient cannot take that write. torch refuses the in-place write with RuntimeError
    (GradScaler's unscale_ of an unfused optimizer), and its fused CPU kernels run past
    such a tensor; fusedopt raised it after the update had moved the parameters and created
    state. It must be refused before anything changes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    params[0].grad = torch.arange(3.0).expand(4, 3)
    params[1].grad = torch.randn(5)
    opt = getattr(fusedopt, name)(params, lr=1e-2, fused=True, backend=backend)
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])   # (Adagrad's is made at construction)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(found_inf)
    with pytest.raises(RuntimeError, match="parameter 0's gradient"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before)), "a refused step moved parameters"
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), "a refused step unscaled gradients"
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys() and all(
        torch.equal(after[k][key], v) for k in state for key, v in state[k].items()), "a refused step changed state"
    # The unfused path: GradScaler's own unscale_ refuses it, with torch.optim as with fusedopt.
    for module in (torch.optim, fusedopt):
        p = torch.nn.Parameter(torch.randn(4, 3))
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(p.sum()).backward()
        p.grad = p.grad[:1].expand(4, 3)
        with pytest.raises(RuntimeError):
            scaler.step(getattr(module, name)([p], lr=1e-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("torch_cls,fused_cls,options", FUSED)
def test_fused_true_loading_an_unfused_checkpoint_keeps_unscaling(torch_cls, fused_cls, options, backend):
    """README: a fused=True optimizer loading a fused=False checkpoint takes its groups
    ("fused": None or False, as torch's load does) and still applies GradScaler's scale, with the
    numbers of a fused=True run throughout (torch.optim raises AssertionError there)."""
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch_cls(model.parameters(), fused=True, **options)
    opt = fused_cls(twin.parameters(), backend=backend, **options)
    s_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    s_new = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    a = train(model, ref, s_ref, x, y, 2)
    b = train(twin, opt, s_new, x, y, 2)
    saved = opt.state_dict()
    opt = fused_cls(twin.parameters(), fused=True, backend=backend, **options)
    opt.load_state_dict(saved)
    assert not opt.param_groups[0]["fused"] and opt._step_supports_amp_scaling
    a += train(model, ref, s_ref, x, y, 3, inf_at=(1,))
    b += train(twin, opt, s_new, x, y, 3, inf_at=(1,))
    assert a == b
    assert_same_grads(model, twin)
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_close(f"param {i}", q.detach(), p.detach())
