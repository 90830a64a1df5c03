"""capturable=True: the step keeps `step` and lr on the device and reads nothing back, so a
CUDA graph can capture it (issue #6).

Without a GPU the kernels run in Triton's interpreter on CPU tensors, where "the device"
is the CPU: there the tests check what can be checked anywhere -- that no tensor value is
read on the host during a step (`.item()`, `float()`, `bool()`, ...), that a tensor lr
changed in place between steps is used, that the per-step tables are reused rather than
copied again. The capture-and-replay and second-device tests need CUDA and compiled kernels
(marked `gpu`: tests/conftest.py).
"""
import copy
from unittest import mock

import pytest
import torch

import fusedopt

ADAM_FAMILY = ["Adam", "AdamW", "NAdam", "RAdam", "Adamax"]
SHAPES = [(3,), (1100,), (7, 5), ()]
cuda = pytest.mark.gpu


def params_on(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]


def set_grads(params, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def no_host_reads():
    """Every way of reading a tensor's value on the host raises inside the block."""
    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host during a capturable step")

    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
    patches = [mock.patch.object(torch.Tensor, name, host_read) for name in names]

    class Context:
        def __enter__(self):
            for p in patches:
                p.start()

        def __exit__(self, *exc):
            for p in patches:
                p.stop()

    return Context()


@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_capturable_step_reads_nothing_on_the_host_and_matches_torch(name):
    params, theirs = params_on("cpu"), params_on("cpu")
    lr, betas = torch.tensor(0.01), (torch.tensor(0.9), torch.tensor(0.99))
    opt = getattr(fusedopt, name)(params, lr=lr, betas=betas, capturable=True, backend="triton")
    ref = getattr(torch.optim, name)(theirs, lr=0.01, betas=(0.9, 0.99), foreach=False)
    for k in range(4):
        set_grads(params, k)
        set_grads(theirs, k)
        if k == 2:  # an lr changed in place, as a scheduler does for a captured graph
            lr.fill_(0.003)
            for group in ref.param_groups:
                group["lr"] = 0.003
        if k == 0:
            opt.step()  # the first step creates state (on the host, like torch's)
        else:
            with no_host_reads():
                opt.step()
        ref.step()
        for p, q in zip(params, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for p in params:
        assert opt.state[p]["step"].device == p.device and float(opt.state[p]["step"]) == 4


def test_without_capturable_a_tensor_lr_is_read_on_the_host():
    # the proxy above can fail: the default path reads lr once per step, as torch's does
    params = params_on("cpu")
    opt = fusedopt.Adam(params, lr=torch.tensor(0.01), backend="triton")
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    with pytest.raises(AssertionError, match="read on the host"), no_host_reads():
        opt.step()


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_tables_are_reused_while_addresses_stay(name):
    """The pointer table is kept while parameters and gradients stay where they are, and
    rebuilt when one moves; results equal an optimizer given new gradient tensors every step."""
    params, twins = params_on("cpu"), params_on("cpu")
    opt = getattr(fusedopt, name)(params, lr=0.01, backend="triton")
    twin = getattr(fusedopt, name)(twins, lr=0.01, backend="triton")
    (bucket,) = opt._group_buckets(0)
    kept = []
    for k in range(4):
        g = torch.Generator().manual_seed(100 + k)
        values = [torch.randn(p.shape, generator=g) for p in params]
        if k in (1, 2):  # the same gradient tensors, new values
            for p, v in zip(params, values):
                p.grad.copy_(v)
        else:  # new tensors, while the old ones stay alive: every address moves
            kept += [p.grad for p in params if p.grad is not None]
            for p, v in zip(params, values):
                p.grad = v.clone()
        for q, v in zip(twins, values):
            q.grad = v.clone()
        before = bucket.__dict__.get("_pointer_table")
        opt.step()
        twin.step()
        after = bucket._pointer_table
        assert (after is before) == (k in (1, 2)), k
        assert after[0][1:3] == ([p.data_ptr() for p in params], [p.grad.data_ptr() for p in params])
        for p, q in zip(params, twins):
            assert torch.equal(p, q), k


# ----------------------------------------------------------------------------- GPU

def captured_step(opt, eager):
    """torch's recipe: one step of each optimizer on a side stream (state and tables are
    created there), then `opt`'s step captured in a CUDA graph, which is returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
        eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


@cuda
@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_cuda_graph_replays_equal_eager_steps(name):
    params, twins = params_on("cuda"), params_on("cuda")
    make = lambda ps: getattr(fusedopt, name)(  # noqa: E731
        ps, lr=torch.tensor(0.01, device="cuda"), capturable=True, backend="triton")
    opt, eager = make(params), make(twins)
    set_grads(params, 0)
    set_grads(twins, 0)
    graph = captured_step(opt, eager)
    torch.cuda.set_sync_debug_mode("error")  # an eager capturable step makes no host sync
    try:
        for k in range(1, 4):
            g = torch.Generator().manual_seed(100 + k)
            for p, q in zip(params, twins):
                new = torch.randn(p.shape, generator=g).to("cuda")
                p.grad.copy_(new)  # the graph reads the gradients where they were captured
                q.grad.copy_(new)
            graph.replay()
            eager.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, eager.state[q][key]), key


@cuda
def test_a_parameter_written_between_graph_replays_is_taken_up_by_its_master_copy():
    """Between replays no Python of the optimizer's runs: the kernel sees a write to a
    bf16 parameter (through `.data`, which bumps no version counter) by reading the
    parameter beside its master copy, as an eager step does."""
    params = [torch.nn.Parameter(p.detach().bfloat16()) for p in params_on("cuda")]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    make = lambda ps: fusedopt.AdamW(  # noqa: E731
        ps, lr=torch.tensor(0.01, device="cuda"), capturable=True, master_weights=True, backend="triton")
    opt, eager = make(params), make(twins)
    for ps in (params, twins):
        set_grads(ps, 0)
        for p in ps:
            p.grad = p.grad.bfloat16()
    graph = captured_step(opt, eager)
    for k in range(1, 4):
        if k == 2:
            for p, q in zip(params, twins):
                p.data.view(-1)[:1].fill_(0.5)
                q.data.view(-1)[:1].fill_(0.5)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        assert (p.detach().view(-1)[:1].float() - 0.5).abs().max() < 0.05   # stepped on from the written value
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], eager.state[q]["master_param"])


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_parameters_on_a_second_device_while_the_first_is_current(name):
    torch.cuda.set_device(0)
    params, theirs = params_on("cuda:1"), params_on("cuda:1")
    opt = getattr(fusedopt, name)(params, lr=0.01, backend="triton")
    ref = getattr(torch.optim, name)(theirs, lr=0.01, foreach=False)
    for k in range(3):
        set_grads(params, k)
        set_grads(theirs, k)
        opt.step()
        ref.step()
    assert torch.cuda.current_device() == 0
    for p, q in zip(params, theirs):
        assert p.device == torch.device("cuda:1")
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
