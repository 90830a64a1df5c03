"""Optimizer.attach_averaged_model: the average updated inside step(), issue #8.

The contract: after ``opt.attach_averaged_model(averaged)``, ``opt.step()`` leaves the
model, the optimizer and the averaged model exactly as ``opt.step()`` followed by
``averaged.update_parameters(model)`` does. Each test runs three twins from the same start:
fusedopt with the average attached, fusedopt stepping and averaging separately (compared
bit for bit: the fused kernel must round exactly as the separate launches do), and
torch.optim with torch's AveragedModel (compared to float rounding: the numbers are
torch's). 'triton' runs the kernels (in Triton's interpreter without a GPU), where the
averaging is fused; on the other paths the step averages after the update.
"""
import copy
import gc
import pickle

import pytest
import torch
from torch.optim import swa_utils as torch_swa

import fusedopt
from fusedopt import swa
from fusedopt.kernels._launch import count_launches

from _compare import assert_close
from conftest import DEVICE
from test_swa import AVERAGES as SWA_AVERAGES, FUSED

# The built-in averages (the ones that can be attached), as test_swa builds them.
AVERAGES = {name: build for name, build in SWA_AVERAGES.items() if name in FUSED}

OPTIMIZERS = {
    "Adam": lambda m, ps, **kw: m.Adam(ps, lr=0.02, **kw),
    "AdamW-amsgrad": lambda m, ps, **kw: m.AdamW(ps, lr=0.02, weight_decay=0.1, amsgrad=True, **kw),
    "NAdam": lambda m, ps, **kw: m.NAdam(ps, lr=0.02, **kw),
    "RAdam": lambda m, ps, **kw: m.RAdam(ps, lr=0.02, **kw),
    "Adamax": lambda m, ps, **kw: m.Adamax(ps, lr=0.02, **kw),
    "SGD": lambda m, ps, **kw: m.SGD(ps, lr=0.05, **kw),
    "SGD-nesterov": lambda m, ps, **kw: m.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
    "RMSprop": lambda m, ps, **kw: m.RMSprop(ps, lr=0.01, momentum=0.5, **kw),
    "Adagrad": lambda m, ps, **kw: m.Adagrad(ps, lr=0.05, **kw),
    "Adadelta": lambda m, ps, **kw: m.Adadelta(ps, lr=0.5, **kw),
    "ASGD": lambda m, ps, **kw: m.ASGD(ps, lr=0.05, t0=1, **kw),
    "Rprop": lambda m, ps, **kw: m.Rprop(ps, lr=0.01, **kw),
}


def net(dtype=torch.float32):
    """Conv (channels_last) + BatchNorm + two Linear layers, one weight straddling blocks:
    parameters, float buffers and an integer buffer. The convolution has no bias: before a
    BatchNorm its gradient is rounding noise, which Adam would normalise into +-lr steps
    that differ between any two implementations."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(64, 40), torch.nn.Tanh(), torch.nn.Linear(40, 2))
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    return model.to(dtype=dtype, device=DEVICE)


def held(model):
    """The optimizer holds every parameter but the first Linear's bias, which the averaged
    model must still average (it never moves: the average converges to it)."""
    return [p for name, p in model.named_parameters() if name != "4.bias"]


def backward(model, k, scaler=None):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(8, 3, 6, 6, generator=g).to(DEVICE, next(model.parameters()).dtype)
    model.zero_grad()
    loss = model(x).float().square().mean()
    (loss if scaler is None else scaler.scale(loss)).backward()
    if k == 2:
        model[6].bias.grad = None  # held, but no gradient this step: still averaged


def assert_equal_state(a, b, what):
    for (key, x), y in zip(a.items(), b.values()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what} {key}: max error {(x.double() - y.double()).abs().max()}"


def run_twins(optimizer, average, backend, dtype=torch.float32, steps=4, use_buffers=False, change=None, **options):
    """`change(model, averaged, optimizer)`, when given, is applied to each twin before the
    third step: what training code does to them between steps."""
    models = [net(dtype) for _ in range(3)]
    attached_model, separate_model, torch_model = models
    opt = OPTIMIZERS[optimizer](fusedopt, held(attached_model), backend=backend, **options)
    twin = OPTIMIZERS[optimizer](fusedopt, held(separate_model), backend=backend, **options)
    ref = OPTIMIZERS[optimizer](torch.optim, held(torch_model))
    averaged = swa.AveragedModel(attached_model, use_buffers=use_buffers, backend=backend, **AVERAGES[average](swa))
    separate = swa.AveragedModel(separate_model, use_buffers=use_buffers, backend=backend, **AVERAGES[average](swa))
    theirs = torch_swa.AveragedModel(torch_model, use_buffers=use_buffers, **AVERAGES[average](torch_swa))
    opt.attach_averaged_model(averaged)
    for k in range(steps):
        if change is not None and k == 2:
            for trio in ((attached_model, averaged, opt), (separate_model, separate, twin), (torch_model, theirs, ref)):
                change(*trio)
        for model in models:
            backward(model, k)
        opt.step()
        twin.step()
        separate.update_parameters(separate_model)
        ref.step()
        theirs.update_parameters(torch_model)
        assert_equal_state(averaged.state_dict(), separate.state_dict(), f"step {k}: averaged")
        assert_equal_state(attached_model.state_dict(), separate_model.state_dict(), f"step {k}: model")
        if options:  # fusedopt-only precision options: torch has nothing to compare with
            continue
        for key, value in theirs.state_dict().items():
            mine = averaged.state_dict()[key]
            if value.dtype == torch.float32:
                assert_close(f"step {k}: averaged {key} vs torch", mine, value, rtol=1e-4, atol=1e-5)
            elif value.is_floating_point():
                assert_close(f"step {k}: averaged {key} vs torch", mine, value)
            else:
                assert torch.equal(mine, value), key
    return averaged, opt, attached_model


FUSED_CASES = [(o, a, b) for o in ("Adam", "SGD-nesterov") for a in AVERAGES for b in ("triton", "auto")]
OTHER_CASES = [(o, "ema_multi", b) for o in OPTIMIZERS if o not in ("Adam", "SGD-nesterov") for b in ("triton", "auto")]


@pytest.mark.parametrize("optimizer,average,backend", FUSED_CASES + OTHER_CASES)
def test_step_equals_step_then_update_parameters(optimizer, average, backend):
    run_twins(optimizer, average, backend)


def add_layer(model, averaged, optimizer):
    """A layer appended to the model and to its averaged copy, and given to the optimizer."""
    torch.manual_seed(7)
    layer = torch.nn.Linear(2, 2).to(DEVICE, next(model.parameters()).dtype)
    model.append(layer)
    averaged.module.append(copy.deepcopy(layer))
    optimizer.add_param_group({"params": list(layer.parameters())})


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_a_layer_added_to_the_model_and_its_average_is_averaged_by_the_step(backend, use_buffers):
    # torch's update_parameters walks both modules: the new layer is averaged from then on.
    # The step's kernels averaged the new layer's parameters past the end of the averaged
    # model's layout (laid out before the layer), so they were left at their first copy.
    averaged, _, _ = run_twins("Adam", "ema_multi", backend, steps=4, use_buffers=use_buffers, change=add_layer)
    assert len(averaged.module) == 8


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_with_averaged_buffers(backend):
    run_twins("Adam", "ema_multi", backend, use_buffers=True)


@pytest.mark.parametrize("options", [{}, dict(master_weights=True), dict(stochastic_rounding=True)],
                         ids=["bf16", "master", "sr"])
@pytest.mark.parametrize("average", ["ema_multi", "swa_fn"])
def test_bf16_parameters(options, average):
    # the average reads the parameter as stored: rounded to bf16 (stochastically with sr)
    run_twins("AdamW-amsgrad", average, "triton", dtype=torch.bfloat16, **options)


@pytest.mark.parametrize("optimizer", [o for o in OPTIMIZERS if o != "AdamW-amsgrad"])
def test_bf16_parameters_of_every_update_kernel(optimizer):
    # every kernel hands the average its parameter as stored, rounded to bf16
    run_twins(optimizer, "ema_multi", "triton", dtype=torch.bfloat16, steps=3)


@pytest.mark.parametrize("optimizer", [o for o in OPTIMIZERS if o != "AdamW-amsgrad"])
def test_one_launch_fewer(optimizer):
    """With every averaged tensor updated by the kernel, the step launches nothing more than
    a plain step; a parameter without a gradient costs one averaging launch for itself."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3)).to(DEVICE)
    plain_model = copy.deepcopy(model)
    opt = OPTIMIZERS[optimizer](fusedopt, model.parameters(), backend="triton")
    plain = OPTIMIZERS[optimizer](fusedopt, plain_model.parameters(), backend="triton")
    averaged = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(0.9), backend="triton")
    opt.attach_averaged_model(averaged)
    x = torch.randn(16, 6, device=DEVICE)
    for k in range(3):
        for m in (model, plain_model):
            m.zero_grad()
            m(x).square().mean().backward()
        if k == 2:
            model[2].bias.grad = None
            plain_model[2].bias.grad = None
        with count_launches() as fused:
            opt.step()
        with count_launches() as alone:
            plain.step()
        extra = fused - alone
        assert dict(extra) == ({"average": 1} if k == 2 else {}), (k, dict(fused), dict(alone))
    assert int(averaged.n_averaged) == 3


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_grad_scaler_skipped_step_still_averages(backend):
    """fused=True: the kernel skips an inf step on the device and averages the unchanged
    parameters, as scaler.step(opt) then update_parameters(model) does."""
    models = [net() for _ in range(2)]
    opts = [fusedopt.AdamW(m.parameters(), lr=0.02, fused=True, backend=backend) for m in models]
    avgs = [swa.AveragedModel(m, multi_avg_fn=swa.get_ema_multi_avg_fn(0.7), backend=backend) for m in models]
    opts[0].attach_averaged_model(avgs[0])
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 8) for _ in models]
    for k in range(4):
        for model, opt, scaler in zip(models, opts, scalers):
            backward(model, k, scaler)
            if k == 2:  # after the average has moved off the parameters, so skipping it would show
                model[0].weight.grad[0, 0, 0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        avgs[1].update_parameters(models[1])
        assert_equal_state(avgs[0].state_dict(), avgs[1].state_dict(), f"step {k}: averaged")
        assert_equal_state(models[0].state_dict(), models[1].state_dict(), f"step {k}: model")
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0 ** 8  # the inf step was seen


def test_counts_updates_made_outside_the_step():
    """update_parameters called directly, or a loaded average, between steps: the next step
    continues from the averaged model's own n_averaged."""
    averaged, opt, model = run_twins("Adam", "swa_multi", "triton", steps=2)
    assert averaged.source_model() is model
    averaged.update_parameters(model)
    reference = copy.deepcopy(averaged)
    backward(model, 5)
    opt.step()
    assert int(averaged.n_averaged) == 4
    reference.update_parameters(model)
    assert_equal_state(averaged.state_dict(), reference.state_dict(), "after an outside update")
    averaged.load_state_dict(reference.state_dict())  # n_averaged back to what it was
    backward(model, 6)
    opt.step()
    assert int(averaged.n_averaged) == 5


def test_the_count_a_step_leaves_is_the_one_the_next_step_would_read():
    """On a GPU, n_averaged is read back (a sync) only when its tensor, storage or version
    changed; the step leaves the count it wrote in that cache. The cache had kept its old
    (id, version) form when the key gained the storage address, so it never matched and
    every step read the count: a sync at the start of each step, and a read that a CUDA
    graph capture refuses. (On the CPU the count is read every step: only the cache is
    checked here.)"""
    averaged, opt, model = run_twins("Adam", "swa_multi", "auto", steps=3)
    t = averaged.n_averaged
    assert opt._attached._n == (id(t), t.data_ptr(), t._version, 3) and int(t) == 3


@pytest.mark.parametrize("write", ["data.fill_", "data=", "fill_"])
def test_n_averaged_reset_by_any_write_restarts_the_average(write):
    """Restarting an SWA average by writing n_averaged = 0, also through `.data` (which torch
    does not count as a version): the next step copies the model, as update_parameters
    would. (On a GPU only in-place ops on the tensor are seen: see attach_averaged_model.)"""
    averaged, opt, model = run_twins("Adam", "swa_multi", "auto", steps=2)
    reference = copy.deepcopy(averaged)
    for avg in (averaged, reference):
        if write == "data.fill_":
            avg.n_averaged.data.fill_(0)
        elif write == "data=":
            avg.n_averaged.data = torch.zeros_like(avg.n_averaged)
        else:
            avg.n_averaged.fill_(0)
    backward(model, 5)
    opt.step()
    reference.update_parameters(model)
    assert int(averaged.n_averaged) == 1
    assert_equal_state(averaged.state_dict(), reference.state_dict(), f"after n_averaged {write} 0")


def test_detach_copies_and_state_dict():
    averaged, opt, model = run_twins("Adam", "ema_multi", "triton", steps=1)
    # the optimizer's checkpoint is torch's, attached or not
    assert set(opt.state_dict()) == {"state", "param_groups"}
    torch.optim.Adam(held(net()), lr=0.02).load_state_dict(opt.state_dict())
    assert copy.deepcopy(opt)._attached is None
    assert pickle.loads(pickle.dumps(opt))._attached is None
    before = averaged.state_dict()["n_averaged"].clone()
    opt.attach_averaged_model(None)
    backward(model, 3)
    opt.step()
    assert torch.equal(averaged.n_averaged, before)


def test_rejects_what_it_cannot_fuse():
    model = net()
    opt = fusedopt.Adam(model.parameters())
    with pytest.raises(TypeError, match="AveragedModel"):
        opt.attach_averaged_model(torch_swa.AveragedModel(model))
    with pytest.raises(ValueError, match="built-in average"):
        opt.attach_averaged_model(swa.AveragedModel(model, avg_fn=lambda a, x, n: 0.5 * (a + x)))
    averaged = swa.AveragedModel(model)
    with pytest.raises(ValueError, match="none of the optimizer's parameters"):
        opt.attach_averaged_model(averaged, averaged.module)  # the averaged copy, not the model
    with pytest.raises(ValueError, match="no longer exists"):
        opt.attach_averaged_model(copy.deepcopy(averaged))  # copies do not know their model
    assert opt._attached is None  # nothing was attached by the failed calls
    opt.attach_averaged_model(copy.deepcopy(averaged), model)  # naming the model works


def test_model_gone_raises_before_changing_anything():
    model = net()
    params = held(model)
    opt = fusedopt.Adam(params)
    opt.attach_averaged_model(swa.AveragedModel(model))
    backward(model, 0)
    before = [p.detach().clone() for p in params]
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_lbfgs_and_sparse_adam_average_after_their_step(backend):
    """Their steps are their own (LBFGS iterates on a closure, SparseAdam updates rows):
    the average follows the step, as update_parameters would."""
    def lbfgs_run(attach):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).to(DEVICE)
        x, y = torch.randn(20, 5, device=DEVICE), torch.randn(20, 1, device=DEVICE)
        opt = fusedopt.LBFGS(model.parameters(), lr=0.5, max_iter=4, backend=backend)
        averaged = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(0.5), backend=backend)
        if attach:
            opt.attach_averaged_model(averaged)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
            if not attach:
                averaged.update_parameters(model)
        return averaged

    def sparse_run(attach):
        torch.manual_seed(0)
        model = torch.nn.Embedding(30, 4, sparse=True).to(DEVICE)
        opt = fusedopt.SparseAdam(model.parameters(), lr=0.1, backend=backend)
        averaged = swa.AveragedModel(model, backend=backend)  # SWA
        if attach:
            opt.attach_averaged_model(averaged)
        for k in range(3):
            opt.zero_grad()
            model(torch.tensor([k, 3 * k + 1, 7], device=DEVICE)).sum().backward()
            opt.step()
            if not attach:
                averaged.update_parameters(model)
        return averaged

    for run in (lbfgs_run, sparse_run):
        attached, separate = run(True), run(False)
        assert int(attached.n_averaged) == 3
        assert_equal_state(attached.state_dict(), separate.state_dict(), run.__name__)



def test_compiled_step_averages_as_the_eager_one():
    """Under torch.compile the step is the fusedopt::step op; its body averages too."""
    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DEVICE)
        opt = fusedopt.AdamW(model.parameters(), lr=torch.tensor(0.01), backend="triton")
        averaged = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(0.9), backend="triton")
        opt.attach_averaged_model(averaged)

        def train_step(x):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        for k in range(4):
            step(torch.randn(5, 4, generator=torch.Generator().manual_seed(k)).to(DEVICE))
        return averaged

    torch._dynamo.reset()
    compiled, eager = run(True), run(False)
    assert int(compiled.n_averaged) == 4
    assert_equal_state(compiled.state_dict(), eager.state_dict(), "compiled")


def test_attachment_survives_loading_the_optimizers_checkpoint():
    """load_state_dict rebuilds the buckets (and their fusion plans); the average stays
    attached and keeps equalling step-then-update."""
    averaged, opt, model = run_twins("SGD-nesterov", "ema_multi", "triton", steps=2)
    reference = copy.deepcopy(averaged)
    twin_model = copy.deepcopy(model)
    twin_opt = OPTIMIZERS["SGD-nesterov"](fusedopt, held(twin_model), backend="triton")
    twin_opt.load_state_dict(opt.state_dict())
    opt.load_state_dict(opt.state_dict())
    for k in (2, 3):
        backward(model, k)
        backward(twin_model, k)
        opt.step()
        twin_opt.step()
        reference.update_parameters(twin_model)
    assert int(averaged.n_averaged) == 4
    assert_equal_state(averaged.state_dict(), reference.state_dict(), "after load_state_dict")
