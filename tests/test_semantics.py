"""torch.optim's semantics, one test each, on every path, compared with torch.optim."""
import copy
import pickle
import warnings
from collections import defaultdict

import pytest
import torch

import fusedopt
from fusedopt import _flat
from _compare import assert_close, assert_same_run, clone_params
from fusedopt.kernels._launch import count_launches
from optim_db import OPTIMIZERS

BACKENDS = ["triton", "reference", "auto"]

# (fusedopt class, torch class, options) that exercise every state kind of the foundation.
PAIRS = [
    pytest.param(fusedopt.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True), id="Adam"),
    pytest.param(fusedopt.AdamW, torch.optim.AdamW, dict(lr=0.01), id="AdamW"),
    pytest.param(fusedopt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01), id="SGD"),
]


def step_both(pairs_of_params, opts, grads):
    for (a, b), g in zip(pairs_of_params, grads):
        a.grad = None if g is None else g.clone()
        b.grad = None if g is None else g.clone()
    for opt in opts:
        opt.step()


def twin(params, fused_cls, torch_cls, options, backend, **extra):
    theirs = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    ours = clone_params(theirs)
    return theirs, torch_cls(theirs, **options), ours, fused_cls(ours, backend=backend, **options, **extra)


def random_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


# ---------------------------------------------------------------------------- launches

@pytest.mark.parametrize("cls,options", [(fusedopt.Adam, dict(lr=0.01)), (fusedopt.SGD, dict(lr=0.1, momentum=0.9))],
                         ids=["Adam", "SGD"])
def test_one_launch_per_step_for_200_tensors_in_one_bucket(cls, options):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(100)])  # 200 tensors
    params = list(model.parameters())
    assert len(params) == 200
    opt = cls(params, backend="triton", **options)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        with count_launches() as launches:
            opt.step()
        assert sum(launches.values()) == 1, dict(launches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_dtypes_in_one_group_make_one_bucket_each(backend):
    params = [torch.randn(5), torch.randn(7, dtype=torch.float64), torch.randn(3), torch.randn(4, dtype=torch.float64)]
    theirs, ref, ours, opt = twin(params, fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), backend)
    for step in range(3):
        with count_launches() as launches:
            step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
        if backend == "triton":
            assert sum(launches.values()) == 2
    assert_same_run(theirs, ref, ours, opt)


# ---------------------------------------------------------------------------- missing grads

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_cls,torch_cls,options", PAIRS)
def test_param_without_grad_is_not_touched(fused_cls, torch_cls, options, backend):
    params = [torch.randn(6), torch.randn(9), torch.randn(3, 3)]
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, backend)
    step_both(list(zip(theirs, ours)), [ref, opt], [torch.randn(6), None, torch.randn(3, 3)])
    assert ours[1] not in opt.state or not opt.state[ours[1]], "a parameter without grad got state"
    before = ours[1].detach().clone()
    step_both(list(zip(theirs, ours)), [ref, opt], [torch.randn(6), None, torch.randn(3, 3)])
    assert torch.equal(ours[1], before), "a parameter without grad was updated"
    step_both(list(zip(theirs, ours)), [ref, opt], [None, torch.randn(9), torch.randn(3, 3)])
    if "step" in opt.state[ours[0]]:
        # torch keeps `step` per parameter: these three now differ inside one bucket.
        assert [float(opt.state[p]["step"]) for p in ours] == [2.0, 1.0, 3.0]
    assert_same_run(theirs, ref, ours, opt)


# ---------------------------------------------------------------------------- layouts

def awkward_params():
    base = torch.randn(8, 6)
    return [
        torch.randn(5, 4).t(),                                      # dense, transposed
        torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
        base[:, ::2],                                                 # not dense: gaps
        torch.tensor(1.5),                                            # 0-dim
        torch.randn(0, 3),                                            # zero-size
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_cls,torch_cls,options", PAIRS)
def test_noncontiguous_channels_last_0dim_and_zero_size(fused_cls, torch_cls, options, backend):
    params = awkward_params()
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, backend)
    for step in range(3):
        grads = random_grads(params, step)
        if step == 1:  # a gradient whose strides differ from its parameter's
            grads[0] = grads[0].t().contiguous().t()
            grads[1] = grads[1].contiguous()
        step_both(list(zip(theirs, ours)), [ref, opt], grads)
    assert_same_run(theirs, ref, ours, opt)
    for p in ours:
        for key, value in opt.state[p].items():
            if key not in ("step",) and isinstance(value, torch.Tensor):
                assert value.stride() == torch.zeros_like(p).stride(), f"{key} strides differ from torch's"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_cls,torch_cls,options", PAIRS)
def test_a_transposed_gradient_of_a_contiguous_parameter(fused_cls, torch_cls, options, backend):
    """Every parameter contiguous and every one with a gradient: the bucket's quick collect.
    A gradient whose strides differ from its parameter's (assigned by hand, or a transposed
    view) must still be read in its own layout: taken as it lies, its elements would pair
    with the wrong elements of the parameter."""
    params = [torch.randn(4, 6), torch.randn(5)]
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, backend)
    for step in range(3):
        grads = random_grads(params, step)
        grads[0] = grads[0].t().contiguous().t()   # dense, transposed strides
        step_both(list(zip(theirs, ours)), [ref, opt], grads)
    assert_same_run(theirs, ref, ours, opt)


def misaligned(values: list[float]) -> torch.Tensor:
    """A float32 tensor one byte past an element boundary (torch's allocators never make
    one; `torch.frombuffer` can), in a buffer with a guard byte on either side."""
    raw = bytearray(4 * len(values) + 2)
    t = torch.frombuffer(raw, dtype=torch.float32, offset=1, count=len(values))
    t.copy_(torch.tensor(values))
    return t


@pytest.mark.parametrize("which", ["parameter", "gradient"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_tensor_not_aligned_to_its_element_size_is_refused_by_the_kernels(name, which):
    """The kernels address tensors in elements from an anchor: such a tensor was read and
    written a fraction of an element off, partly outside its memory, with no error in
    Triton's interpreter. The other paths (torch ops) step it as torch does."""
    values, ones = [1.0, 2.0, 3.0, 4.0, 5.0], torch.ones(5)
    raw = misaligned(values)
    for backend in ("reference", "auto"):
        p = torch.nn.Parameter(misaligned(values) if which == "parameter" else torch.tensor(values))
        p.grad = misaligned([1.0] * 5) if which == "gradient" else ones.clone()
        q = torch.nn.Parameter(torch.tensor(values))
        q.grad = ones.clone()
        getattr(fusedopt, name)([p], lr=0.5, backend=backend).step()
        getattr(torch.optim, name)([q], lr=0.5).step()
        assert torch.equal(p.detach(), q.detach()), backend
    p = torch.nn.Parameter(raw if which == "parameter" else torch.tensor(values))
    p.grad = misaligned([1.0] * 5) if which == "gradient" else ones.clone()
    before = bytes(raw.untyped_storage()) if which == "parameter" else None
    with pytest.raises(RuntimeError, match=f"a {which} of shape \\(5,\\).*not a multiple of its element size"):
        getattr(fusedopt, name)([p], lr=0.5, backend="triton").step()
    if which == "parameter":
        assert bytes(raw.untyped_storage()) == before
    assert p.detach().tolist() == values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_cls,torch_cls,options", PAIRS)
def test_params_that_do_not_require_grad(fused_cls, torch_cls, options, backend):
    params = [torch.randn(4), torch.randn(5).requires_grad_(False), torch.randn(3)]
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, backend)
    for step in range(2):
        step_both(list(zip(theirs, ours)), [ref, opt], [torch.randn(4), None, torch.randn(3)])
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_cls,torch_cls,options", PAIRS)
def test_complex_params(fused_cls, torch_cls, options, backend):
    params = [torch.randn(6, dtype=torch.complex64), torch.randn(2, 3, dtype=torch.complex64)]
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, backend)
    for step in range(3):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
    assert_same_run(theirs, ref, ours, opt)
    assert all(v.is_complex() for p in ours for k, v in opt.state[p].items() if k != "step")


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch without Tensor.grad_dtype")
@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("param_dtype,grad_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)],
                         ids=["fp32-fp64", "bf16-fp32"])
@pytest.mark.parametrize("fused_cls,torch_cls,options", [
    pytest.param(fusedopt.SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=0.1), id="SGD"),
    pytest.param(fusedopt.Adagrad, torch.optim.Adagrad, dict(lr=0.1), id="Adagrad"),
    pytest.param(fusedopt.RMSprop, torch.optim.RMSprop, dict(lr=0.01), id="RMSprop"),
])
def test_gradients_of_another_dtype_than_their_parameter(fused_cls, torch_cls, options, param_dtype, grad_dtype,
                                                         backend):
    """torch's `param.grad_dtype` lets a gradient differ in dtype from its parameter, and
    these algorithms of torch's step such gradients. The kernels read a gradient at offsets
    counted in the parameter's dtype: they read a converted copy (without it: values of
    1e19, and reads past the gradient's end)."""
    from fusedopt.kernels._launch import BLOCK

    params = [torch.randn(n, dtype=torch.float64).to(param_dtype) for n in (BLOCK + 3, 7, 1)]
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, backend)
    for p in theirs[:2] + ours[:2]:   # the last keeps a gradient of its own dtype
        p.grad_dtype = grad_dtype
    for step in range(3):
        grads = [g.to(p.grad_dtype or p.dtype) for g, p in zip(random_grads(theirs, step), theirs)]
        step_both(list(zip(theirs, ours)), [ref, opt], grads)
    assert ours[0].grad.dtype == grad_dtype
    for j, (a, b) in enumerate(zip(theirs, ours)):
        assert_close(f"param {j}", b, a)


def wide_grads(params, grad_dtype, seed):
    return [g.to(grad_dtype) for g in random_grads([p.detach().double() for p in params], seed)]


# A large tensor, and small ones: a run of eight or more small tensors is stepped as one
# gathered copy, in the parameters' dtype.
WIDE_GRAD_SHAPES = (20000, 7) + (5,) * 10


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch without Tensor.grad_dtype")
@pytest.mark.parametrize("param_dtype,grad_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
                         ids=["bf16-fp32", "fp32-fp64"])
@pytest.mark.parametrize("fused_cls,torch_cls,options", [
    pytest.param(fusedopt.SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=0.1), id="SGD"),
    pytest.param(fusedopt.Adagrad, torch.optim.Adagrad, dict(lr=0.1, weight_decay=0.1), id="Adagrad"),
    pytest.param(fusedopt.RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5), id="RMSprop"),
    pytest.param(fusedopt.Adadelta, torch.optim.Adadelta, dict(weight_decay=0.1), id="Adadelta"),
    pytest.param(fusedopt.ASGD, torch.optim.ASGD, dict(t0=1), id="ASGD"),
])
def test_wider_gradients_step_on_the_cpu_as_torchs_for_loop_steps_them(fused_cls, torch_cls, options, param_dtype,
                                                                        grad_dtype):
    """On the CPU, torch.optim's default code, its for-loop, computes with a gradient of
    another dtype as it is. So does fusedopt's default path, bit for bit: not through torch's
    fused kernel (Adagrad), which refuses such a gradient, nor through a gathered run of small
    tensors, either of which would round it to the parameter's dtype first."""
    params = [torch.randn(n, dtype=torch.float64).to(param_dtype) for n in WIDE_GRAD_SHAPES]
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, "auto")
    for p in theirs + ours:
        p.grad_dtype = grad_dtype
    for step in range(4):
        step_both(list(zip(theirs, ours)), [ref, opt], wide_grads(theirs, grad_dtype, step))
    for j, (a, b) in enumerate(zip(theirs, ours)):
        assert torch.equal(a, b), f"param {j}: {(a.double() - b.double()).abs().max().item()} from torch's"


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch without Tensor.grad_dtype")
@pytest.mark.parametrize("cls,options", [
    pytest.param(fusedopt.Adam, dict(lr=0.01), id="Adam"),
    pytest.param(fusedopt.Adamax, dict(lr=0.01), id="Adamax"),
    pytest.param(fusedopt.NAdam, dict(lr=0.01), id="NAdam"),
    pytest.param(fusedopt.RAdam, dict(lr=0.01), id="RAdam"),
    pytest.param(fusedopt.RMSprop, dict(lr=0.01, centered=True), id="RMSprop-centered"),
])
def test_wider_gradients_where_torch_raises_are_read_in_the_parameters_dtype(cls, options):
    """torch's for-loop raises on these gradients, after it has advanced some step counts and
    moved some state (the dtype check of a lerp_). fusedopt's default CPU path steps them,
    reading each as its parameter's dtype, as the kernels do: the same numbers as gradients
    given in that dtype. (The reference path reads them in its compute dtype.)"""
    params = [torch.randn(n, dtype=torch.float64).to(torch.bfloat16) for n in WIDE_GRAD_SHAPES]
    wide, narrow = clone_params(params), clone_params(params)
    opt_wide, opt_narrow = cls(wide, **options), cls(narrow, **options)
    for p in wide[::2]:   # the others keep gradients of their own dtype
        p.grad_dtype = torch.float32
    for step in range(3):
        grads = wide_grads(params, torch.float32, step)
        for a, b, g in zip(wide, narrow, grads):
            a.grad, b.grad = g.to(a.grad_dtype or a.dtype), g.to(torch.bfloat16)
        opt_wide.step()
        opt_narrow.step()
    for j, (a, b) in enumerate(zip(wide, narrow)):
        assert torch.equal(a, b), f"param {j}"
    assert wide[0].grad.dtype == torch.float32


# ---------------------------------------------------------------------------- live options

@pytest.mark.parametrize("backend", BACKENDS)
def test_hyperparameters_edited_between_steps_take_effect(backend):
    params = [torch.randn(10), torch.randn(3, 4)]
    theirs, ref, ours, opt = twin(params, fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), backend)
    edits = [
        dict(lr=0.05),
        dict(betas=(0.5, 0.9)),
        dict(weight_decay=0.3),
        dict(lr=torch.tensor(0.02)),
        dict(eps=1e-3, amsgrad=False, maximize=True),
    ]
    for step, edit in enumerate(edits):
        for o in (ref, opt):
            for k, v in edit.items():
                o.param_groups[0][k] = v.clone() if isinstance(v, torch.Tensor) else v
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_and_tensor_lr_edited_between_steps(backend):
    params = [torch.randn(10)]
    theirs, ref, ours, opt = twin(params, fusedopt.SGD, torch.optim.SGD, dict(lr=0.1), backend)
    for step, edit in enumerate([{}, dict(momentum=0.9), dict(lr=torch.tensor(0.3)), dict(nesterov=True)]):
        for o in (ref, opt):
            o.param_groups[0].update(edit)
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
    assert_same_run(theirs, ref, ours, opt)


# ---------------------------------------------------------------------------- outside writes

@pytest.mark.parametrize("backend", BACKENDS)
def test_state_written_from_outside_is_used_by_the_next_step(backend):
    params = [torch.randn(10), torch.randn(4, 4)]
    theirs, ref, ours, opt = twin(params, fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 0))
    # A key replaced (frameworks do this) ...
    new_avg = torch.full((10,), 0.25)
    ref.state[theirs[0]]["exp_avg"] = new_avg.clone()
    opt.state[ours[0]]["exp_avg"] = new_avg.clone()
    # ... a whole entry assigned (ZeroRedundancyOptimizer does this) ...
    entry = {"step": torch.tensor(7.0), "exp_avg": torch.ones(4, 4), "exp_avg_sq": torch.full((4, 4), 2.0)}
    ref.state[theirs[1]] = {k: v.clone() for k, v in entry.items()}
    opt.state[ours[1]] = {k: v.clone() for k, v in entry.items()}
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 1))
    # ... and a tensor modified in place.
    ref.state[theirs[1]]["exp_avg_sq"].mul_(3)
    opt.state[ours[1]]["exp_avg_sq"].mul_(3)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 2))
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_reset_by_assigning_a_new_dict(backend):
    params = [torch.randn(10)]
    theirs, ref, ours, opt = twin(params, fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 0))
    ref.state = defaultdict(dict)
    opt.state = defaultdict(dict)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 1))
    assert float(opt.state[ours[0]]["step"]) == 1.0
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_entry_deleted_restarts_that_parameter(backend):
    params = [torch.randn(10), torch.randn(3)]
    theirs, ref, ours, opt = twin(params, fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 0))
    del ref.state[theirs[1]]
    del opt.state[ours[1]]
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 1))
    assert_same_run(theirs, ref, ours, opt)


# Every way a dict can lose or gain entries, as outside code writes them: the next step is
# torch's (a removed entry, an emptied one or SGD's momentum buffer set to None starts
# afresh; a number or a new key is used), never the hidden flat state of before.
EDITS = {
    "state.clear": lambda o, ps: o.state.clear(),
    "state.pop": lambda o, ps: o.state.pop(ps[1]),
    "state.popitem": lambda o, ps: o.state.popitem(),
    "entry.clear": lambda o, ps: o.state[ps[1]].clear(),
    "entry.popitem-all": lambda o, ps: [o.state[ps[0]].popitem() for _ in range(len(o.state[ps[0]]))],
    "entry.update": lambda o, ps: o.state[ps[1]].update(exp_avg=torch.full((3,), 0.5)),
    "entry|=": lambda o, ps: o.state[ps[1]].__ior__({"exp_avg_sq": torch.full((3,), 4.0)}),
    "state.update": lambda o, ps: o.state.update({ps[1]: {"step": torch.tensor(5.0), "exp_avg": torch.ones(3),
                                                          "exp_avg_sq": torch.full((3,), 2.0)}}),
    "state.setdefault": lambda o, ps: (o.state.pop(ps[1]), o.state.setdefault(ps[1], {
        "step": torch.tensor(2.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)})),
    "from-the-graph": lambda o, ps: o.state[ps[1]].__setitem__("exp_avg", ps[1] * 0.5),
    "new-key": lambda o, ps: (o.param_groups[0].update(amsgrad=True),
                              [o.state[p].__setitem__("max_exp_avg_sq", torch.full_like(p, 4.0)) for p in ps]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", list(EDITS))
def test_state_dict_methods_reach_the_next_step(edit, backend):
    params = [torch.randn(10), torch.randn(3)]
    theirs, ref, ours, opt = twin(params, fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 0))
    EDITS[edit](ref, theirs)
    EDITS[edit](opt, ours)
    for step in (1, 2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
    assert_same_run(theirs, ref, ours, opt)


def test_state_assigned_from_the_autograd_graph_stays_out_of_it():
    """`opt.state[p]["exp_avg"] = p * 0.5`: the value is copied into the flat buffer,
    detached, so the buffer (every parameter's state in the bucket) does not become a node
    of p's graph, and the state dict can still be deep-copied."""
    params = [torch.randn(10, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = fusedopt.Adam(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[params[1]]["exp_avg"] = params[1] * 0.5
    assert all(not v.requires_grad for entry in opt.state.values() for v in entry.values())
    saved = copy.deepcopy(opt.state_dict())
    assert torch.equal(saved["state"][1]["exp_avg"], params[1].detach() * 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["pop", "none"])
def test_sgd_momentum_buffer_removed_restarts_it(how, backend):
    params = [torch.randn(10), torch.randn(3)]
    theirs, ref, ours, opt = twin(params, fusedopt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 0))
    for o, ps in ((ref, theirs), (opt, ours)):
        if how == "pop":
            o.state[ps[1]].pop("momentum_buffer")
        else:
            o.state[ps[1]]["momentum_buffer"] = None
    for step in (1, 2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
    assert_same_run(theirs, ref, ours, opt)


def test_a_number_written_to_scalar_state_is_used():
    """torch's Adam refuses a Python-number step; fusedopt writes it into the step vector
    (and shows it as a tensor), where it counts on: the step is torch's from that count."""
    params = [torch.randn(10)]
    theirs, ref, ours, opt = twin(params, fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), "auto")
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 0))
    ref.state[theirs[0]]["step"] = torch.tensor(7.0)
    opt.state[ours[0]]["step"] = 7
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 1))
    assert float(opt.state[ours[0]]["step"]) == 8.0
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["pop-exp_avg", "pop-step", "none-exp_avg", "amsgrad-on"])
def test_state_a_step_needs_removed_raises_before_anything_changes(how, backend):
    """torch fails at the step too (KeyError, or on None); here the failure comes before
    any parameter or state has changed, the first parameter's included."""
    params = [torch.randn(10), torch.randn(3)]
    opt = fusedopt.Adam([p.clone() for p in params], lr=0.01, backend=backend)
    ours = opt.param_groups[0]["params"]
    for p, g in zip(ours, random_grads(params, 0)):
        p.grad = g
    opt.step()
    if how == "amsgrad-on":
        opt.param_groups[0]["amsgrad"] = True
    elif how.startswith("pop"):
        opt.state[ours[1]].pop(how.split("-")[1])
    else:
        opt.state[ours[1]]["exp_avg"] = None
    before = [p.clone() for p in ours], {k: v.clone() for k, v in opt.state[ours[0]].items()}
    for p, g in zip(ours, random_grads(params, 1)):
        p.grad = g
    with pytest.raises(TypeError if how.startswith("none") else KeyError, match="parameter 0|parameter 1"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, before[0]))
    assert all(torch.equal(opt.state[ours[0]][k], v) for k, v in before[1].items())



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name not in ("SGD", "Adagrad")], ids=lambda i: i.name)
def test_an_entry_given_other_keys_before_the_first_step_fails_as_in_torch(info, backend):
    """torch creates a parameter's state only while `opt.state[p]` is empty: an entry that
    got another key before the parameter's first step makes that step fail with KeyError.
    fusedopt created the state beside the key and stepped. Here it raises before anything
    changes; the parameter stepped earlier keeps its state."""
    params = [torch.randn(5), torch.randn(3, 4)]
    theirs, ref, ours, opt = twin(params, info.fused, info.torch, info.configs[0], backend)
    step_both(list(zip(theirs, ours)), [ref, opt], [random_grads(params, 0)[0], None])
    ref.state[theirs[1]]["note"] = 1.0
    opt.state[ours[1]]["note"] = 1.0
    before = [p.detach().clone() for p in ours], {k: v.clone() for k, v in opt.state[ours[0]].items()}
    grads = random_grads(params, 1)
    for a, b, g in zip(theirs, ours, grads):
        a.grad, b.grad = g.clone(), g.clone()
    with pytest.raises(KeyError):
        ref.step()
    with pytest.raises(KeyError, match="parameter 1 has no optimizer state"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, before[0]))
    assert all(torch.equal(opt.state[ours[0]][k], v) for k, v in before[1].items())
    assert dict(opt.state[ours[1]]) == {"note": 1.0}
    # Emptied again, it starts afresh at its next step, as torch's does.
    del ref.state[theirs[1]]["note"], opt.state[ours[1]]["note"]
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 2))
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name in ("SGD", "Adagrad")], ids=lambda i: i.name)
def test_an_entry_given_other_keys_steps_where_torch_steps_it(info, backend):
    # torch's SGD reads its momentum buffer with `state.get`, and its Adagrad creates
    # every parameter's state in its constructor: another key does not matter.
    params = [torch.randn(5)]
    theirs, ref, ours, opt = twin(params, info.fused, info.torch, info.configs[-1], backend)
    ref.state[theirs[0]]["note"] = 1.0
    opt.state[ours[0]]["note"] = 1.0
    for step in range(3):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
    assert_same_run(theirs, ref, ours, opt)

def test_copies_of_the_state_are_torchs():
    params = [torch.randn(10)]
    opt = fusedopt.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones(10)
    opt.step()
    for copied in (opt.state.copy(), copy.copy(opt.state)):
        assert type(copied) is defaultdict and copied[params[0]] is opt.state[params[0]]
    entry = pickle.loads(pickle.dumps(opt.state[params[0]]))
    assert torch.equal(entry["momentum_buffer"], opt.state[params[0]]["momentum_buffer"])


# ---------------------------------------------------------------------------- .data replaced

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_cls,torch_cls,options", PAIRS)
def test_data_replaced_with_same_shape_keeps_torch_numbers(fused_cls, torch_cls, options, backend):
    params = [torch.randn(10), torch.randn(3, 4)]
    theirs, ref, ours, opt = twin(params, fused_cls, torch_cls, options, backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, 0))
    fresh = torch.randn(3, 4)
    theirs[1].data = fresh.clone()
    ours[1].data = fresh.clone()
    layout = torch.randn(10)
    theirs[0].data = layout.clone()
    ours[0].data = layout.clone()
    for step in (1, 2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(params, step))
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_replaced_with_other_shape_raises_clearly(backend):
    p = torch.randn(10, requires_grad=True)
    opt = fusedopt.Adam([p], backend=backend)
    p.grad = torch.randn(10)
    opt.step()
    p.data = torch.randn(12)
    p.grad = torch.randn(12)
    with pytest.raises(RuntimeError, match=r"has shape \(12,\) and its optimizer state 'exp_avg' shape \(10,\)"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name != "SparseAdam"], ids=lambda i: i.name)
def test_a_reshaped_parameter_keeps_its_old_state_until_it_is_stepped_as_torch(info, backend):
    """New storage of another shape for a parameter with state (a frozen layer swapped for
    a smaller one): torch keeps the old state as it is and skips the parameter while it has
    no gradient, stepping the others; fusedopt raised at once, stepping none. A gradient
    for it makes both raise, fusedopt before anything changes. The shape error's help,
    `del opt.state[p]`, is torch's way to restart it, in its new shape."""
    config = info.configs[-1]
    theirs, ref, ours, opt = twin([torch.randn(10), torch.randn(3), torch.randn(2, 2)], info.fused, info.torch,
                                  config, backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, 0))
    if not ref.state:
        return   # (a stateless configuration: nothing to keep)
    for params in (theirs, ours):
        params[0].data = torch.randn(12, generator=torch.Generator().manual_seed(1))
    for step in (1, 2):
        grads = random_grads(theirs, step)
        grads[0] = None
        step_both(list(zip(theirs, ours)), [ref, opt], grads)
        assert_same_run(theirs, ref, ours, opt, rtol=info.rtol32)   # (the old state saved, in its old shape)
    reloaded = info.fused([{"params": g["params"]} for g in opt.param_groups], **config, backend=backend)
    with pytest.raises(ValueError, match="shape"):   # a state dict that does not fit is refused at the load
        reloaded.load_state_dict(opt.state_dict())

    ours[0].grad, theirs[0].grad = torch.randn(12), torch.randn(12)
    with pytest.raises(RuntimeError):
        ref.step()
    params_before, state_before = [p.detach().clone() for p in ours], copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match=r"del opt.state\[p\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ours, params_before))
    assert all(torch.equal(torch.as_tensor(opt.state_dict()["state"][i][key]), torch.as_tensor(value))
               for i, entry in state_before.items() for key, value in entry.items())

    # torch may have changed some tensors before raising (ASGD its parameter): it takes
    # fusedopt's values again
    for a, b in zip(theirs, ours):
        a.data.copy_(b)
    ref = info.torch([{"params": g["params"]} for g in ref.param_groups], **config)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    del ref.state[theirs[0]], opt.state[ours[0]]
    for step in (3, 4):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    assert_same_run(theirs, ref, ours, opt, rtol=info.rtol32)
    assert opt.state[ours[0]][next(k for k, v in opt.state[ours[0]].items() if isinstance(v, torch.Tensor)
                                   and v.dim())].shape == (12,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fusedopt.Adam, fusedopt.AdamW, fusedopt.Adagrad, fusedopt.SGD],
                         ids=lambda c: c.__name__)
def test_a_reshaped_parameter_with_state_is_refused_under_fused_where_torchs_kernel_writes_past_it(cls, backend):
    """torch's fused CPU kernels do not compare the sizes of a parameter and its state: a
    parameter given more elements is stepped past the end of its old state (a crash at
    worst), so this is not compared with torch. fusedopt's step refuses it, as on every
    other path, before anything changes."""
    options = dict(lr=0.1, fused=True, **(dict(momentum=0.9) if cls is fusedopt.SGD else {}))
    p, q = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(3))
    opt = cls([p, q], backend=backend, **options)
    p.grad, q.grad = torch.randn(10), torch.randn(3)
    opt.step()
    p.data, p.grad = torch.randn(40), torch.randn(40)
    before = p.detach().clone(), q.detach().clone(), copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match=r"has shape \(40,\) and its optimizer state '\w+' shape \(10,\)"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(q.detach(), before[1])
    assert all(torch.equal(torch.as_tensor(opt.state_dict()["state"][i][k]), torch.as_tensor(v))
               for i, entry in before[2].items() for k, v in entry.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_dropping_the_state_of_a_parameter_taken_out_of_its_group_leaves_the_others_as_torch(position, backend):
    """`group["params"].pop(j)`, then `opt.state.pop(p)` (torch's state_dict raises KeyError
    on state of a parameter in no group). The pop rebuilt the group's buckets, and the
    removed parameter's stale slot then named another parameter's place: that one's state
    started afresh without a word (or an IndexError for the last place)."""
    theirs, ref, ours, opt = twin([torch.randn(4), torch.randn(3), torch.randn(2)], fusedopt.Adam, torch.optim.Adam,
                                  dict(lr=0.1), backend)
    for step in (0, 1):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    for o in (ref, opt):
        o.state.pop(o.param_groups[0]["params"].pop(position))
    del theirs[position], ours[position]
    for step in (2, 3):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    assert_same_run(theirs, ref, ours, opt)
    assert [opt.state[p]["step"].item() for p in ours] == [4.0, 4.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.Adam], ids=["SGD", "Adam"])
def test_groups_reordered_and_back_step_every_parameter_on_its_own_state_as_torch(cls, backend):
    """Buckets are cached per group index. Groups reversed, the second group rebuilt (a
    parameter taken out of it) with the first's parameter, then reversed back: the first
    index's cache still listed that parameter, and the step ran on buffers its state had
    left (torch's state started it afresh: step 1 against 2)."""
    torch_cls = getattr(torch.optim, cls.__name__)
    options = dict(lr=0.1, momentum=0.9) if cls is fusedopt.SGD else dict(lr=0.1)
    params = [torch.randn(3), torch.randn(4), torch.randn(2)]
    theirs = [p.clone().requires_grad_() for p in params]
    ours = clone_params(theirs)
    ref = torch_cls([{"params": theirs[:1]}, {"params": theirs[1:]}], **options)
    opt = cls([{"params": ours[:1]}, {"params": ours[1:]}], backend=backend, **options)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, 0))
    for o in (ref, opt):
        o.param_groups.reverse()
        o.state.pop(o.param_groups[0]["params"].pop(0))   # (rebuilds index 1: the first group now)
        o.param_groups.reverse()
    del theirs[1], ours[1]
    for step in (1, 2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
        assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_assigned_in_a_shape_that_does_not_fit_is_refused_at_the_step_not_broadcast(backend):
    """`opt.state[p] = {...}` with a tensor of another shape: it was copied into p's flat
    segment, which broadcast a (2,) tensor over a (3, 2) parameter without a word. It is
    kept as given, as torch keeps it, and the step refuses it; assigning one that fits, key
    by key, makes the entry the parameter's state again."""
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    opt = fusedopt.Adam([p, q], lr=0.1, backend=backend)
    p.grad, q.grad = torch.randn(3, 2), torch.randn(4)
    opt.step()
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(3, 2)}
    assert opt.state[p]["exp_avg"].shape == (2,)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' shape \(2,\)"):
        opt.step()
    opt.state[p]["exp_avg"] = torch.full((3, 2), 0.5)
    theirs = torch.optim.Adam([p.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()], lr=0.1)
    theirs.load_state_dict(copy.deepcopy(opt.state_dict()))
    for a, b in zip(theirs.param_groups[0]["params"], (p, q)):
        a.grad = b.grad.clone()
    theirs.step()
    opt.step()
    assert_same_run(theirs.param_groups[0]["params"], theirs, [p, q], opt)


@pytest.mark.parametrize("grad", ["fewer", "more", "transposed_shape"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=[info.name for info in OPTIMIZERS])
def test_a_gradient_given_another_shape_after_assignment_is_refused_as_torch(info, backend, grad):
    # torch checks a gradient's shape when it is assigned; `g.data = t` (or `set_`,
    # `resize_`) changes it after, and torch's update raises RuntimeError. Past a bucket's
    # first step, the checks on the common path once let such a gradient through: the
    # kernels read past a 5-element gradient of a 12-element parameter (SGD wrote 1e34 into
    # it) or stepped the wrong elements. Element counts are checked every step; a gradient
    # of the same count and another shape is refused where the step looks at shapes (a
    # parameter without a gradient this step), and stepped in memory order otherwise.
    shape = {"fewer": (5,), "more": (20,), "transposed_shape": (3, 4)}[grad]
    for cls, extra in ((info.torch, {}), (info.fused, dict(backend=backend))):
        p, q = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2))
        opt = cls([p, q], **info.configs[0], **extra)
        p.grad, q.grad = torch.ones(4, 3), torch.ones(2)
        opt.step()
        p.grad.data = torch.arange(1.0, 1 + torch.Size(shape).numel()).reshape(shape)
        if grad == "transposed_shape":
            q.grad = None
        before = (p.detach().clone(), q.detach().clone(), copy.deepcopy(opt.state_dict()))
        for _ in range(2):   # a refused step changes nothing, so the next is refused too
            with pytest.raises(RuntimeError) as raised:
                opt.step()
            if cls is info.torch:
                break
            assert "(4, 3)" in str(raised.value) and str(shape) in str(raised.value)
            assert torch.equal(p.detach(), before[0]) and torch.equal(q.detach(), before[1])
            now = opt.state_dict()["state"]
            assert now.keys() == before[2]["state"].keys()
            for i, entry in before[2]["state"].items():
                for key, value in entry.items():
                    assert torch.equal(torch.as_tensor(now[i][key]), torch.as_tensor(value)), f"{i} {key}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=[info.name for info in OPTIMIZERS])
def test_a_gradient_left_from_before_a_change_of_shape_is_refused(info, backend):
    # torch checks a gradient's shape when it is assigned, not when `.data` changes the
    # parameter's shape under it; its update then raises RuntimeError. A parameter without
    # state is rebuilt in its new shape, and the kernels read the 10-element gradient as 20
    # elements (past its end), the reference path raised after creating state.
    for cls, extra in ((info.torch, {}), (info.fused, dict(backend=backend))):
        p, q = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(3))
        opt = cls([p, q], **info.configs[0], **extra)
        q.grad = torch.ones(3)
        opt.step()   # p has no gradient: no state for it (but Adagrad's, made at construction)
        p.grad, q.grad = torch.ones(10), torch.ones(3)
        p.data = torch.zeros(20)
        q_before, state = q.detach().clone(), copy.deepcopy(opt.state_dict())
        for _ in range(2):   # a refused step changes nothing, so the next is refused too
            with pytest.raises(RuntimeError, match=r"\b20\b") as raised:   # (naming both shapes)
                opt.step()
            if cls is info.torch:
                break
            assert "(10,)" in str(raised.value)
            assert torch.equal(p.detach(), torch.zeros(20)) and torch.equal(q.detach(), q_before), str(raised.value)
            now = opt.state_dict()["state"]
            assert now.keys() == state["state"].keys()
            for i, entry in state["state"].items():
                for key, value in entry.items():
                    assert torch.equal(torch.as_tensor(now[i][key]), torch.as_tensor(value)), f"{i} {key}"


def _lazy_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _lazy_run(model, opt, steps: int) -> None:
    x = torch.linspace(-1, 1, 10).view(2, 5)
    for _ in range(steps):
        opt.zero_grad()
        torch.manual_seed(1)   # the first forward materializes LazyLinear from the global RNG
        model(x).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name != "Adagrad"], ids=lambda i: i.name)
def test_a_lazy_modules_parameters_are_stepped_once_materialized(info, backend):
    # A LazyLinear's weight is an UninitializedParameter until the first forward: no shape,
    # no gradient. torch's optimizers take it, skip it, and step it once the forward gave
    # it a shape, in place (the same object). fusedopt built its buckets from the
    # parameters' shapes and raised at step() or load_state_dict() before that forward.
    options = info.configs[-1]
    runs = []
    for cls, extra in ((info.torch, {}), (info.fused, dict(backend=backend))):
        model = _lazy_model(0)
        opt = cls(model.parameters(), **options, **extra)
        opt.step()   # before the first forward: nothing has a gradient
        opt.load_state_dict(opt.state_dict())
        _lazy_run(model, opt, 3)
        runs.append((list(model.parameters()), opt))
    (theirs, torch_opt), (ours, fused_opt) = runs
    assert_same_run(theirs, torch_opt, ours, fused_opt, rtol=info.rtol32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name in ("Adam", "SGD", "RMSprop")], ids=lambda i: i.name)
def test_a_checkpoint_resumes_into_a_lazy_model_loaded_after_the_optimizer(info, backend):
    # Resuming: a fresh lazy model, its optimizer given the checkpoint's state first (the
    # parameters still without shape), then the model's own state dict, which materializes
    # them. The loaded state must be there at the next step.
    options = info.configs[-1]
    model = _lazy_model(0)
    opt = info.torch(model.parameters(), **options)
    _lazy_run(model, opt, 2)
    checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
    runs = []
    for cls, extra in ((info.torch, {}), (info.fused, dict(backend=backend))):
        model = _lazy_model(5)
        opt = cls(model.parameters(), **options, **extra)
        opt.load_state_dict(copy.deepcopy(checkpoint[1]))
        model.load_state_dict(checkpoint[0])
        _lazy_run(model, opt, 2)
        runs.append((list(model.parameters()), opt))
    (theirs, torch_opt), (ours, fused_opt) = runs
    assert_same_run(theirs, torch_opt, ours, fused_opt, rtol=info.rtol32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_loaded_for_a_lazy_parameter_that_materializes_in_another_shape_is_refused(backend):
    # The state dict's shapes cannot be checked at load while the parameter has none; torch
    # fails at the step, after advancing `step`. fusedopt refuses at the step, naming both
    # shapes, before anything changes, and again at every step after.
    model = torch.nn.LazyLinear(3)
    source = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 5)).sum().backward()
    source.step()
    model = torch.nn.LazyLinear(3)
    opt = fusedopt.Adam(model.parameters(), backend=backend)
    opt.load_state_dict(source.state_dict())
    model(torch.ones(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"materialized .* shape \(3, 4\).* shape \(3, 5\)"):
            opt.step()
    assert torch.equal(model.weight.detach(), before)
    assert opt.state_dict()["state"][0]["step"].item() == 1


VIEWS_OF_THE_SAME_MEMORY = {
    "reshaped": lambda t: t.view(4, 3),
    "flattened": lambda t: t.view(12),
    "transposed": lambda t: t.t(),
    "fewer rows": lambda t: t[:2],          # contiguous, 8 of the 12 elements
    "fewer columns": lambda t: t[:, :2],    # not dense
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", list(VIEWS_OF_THE_SAME_MEMORY), ids=list(VIEWS_OF_THE_SAME_MEMORY))
def test_data_replaced_with_a_view_at_the_same_address_is_seen(view, backend):
    # `p.data = p.data.view(...)` (or `.t()`, `[:k]`) keeps the address the kernels are
    # told about, and fusedopt looked at addresses only: it went on pairing elements in
    # the old layout (a transposed gradient, a wrong update) and read and wrote 12
    # elements of an 8-element parameter and gradient. A parameter with state must raise
    # before anything changes (torch fails on the state's shape); a stateless one steps
    # in its new layout, as torch's does.
    make = VIEWS_OF_THE_SAME_MEMORY[view]
    theirs, ref, ours, opt = twin([torch.randn(3, 4)], fusedopt.SGD, torch.optim.SGD, dict(lr=0.1), backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, 0))
    for p in theirs + ours:
        p.data = make(p.data)
    assert ours[0].data_ptr() == opt._buckets[0][1][0]._ptrs[0]
    for step in (1, 2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    assert_close("param", ours[0], theirs[0])

    if view in ("reshaped", "flattened"):
        # Same size and memory order: not looked for (a comparison of shapes every step
        # cost 7% of a plain SGD step on 2000 tiny tensors); stepped element for element.
        return
    p = torch.randn(3, 4, requires_grad=True)
    opt = fusedopt.Adam([p], lr=0.01, backend=backend)
    p.grad = torch.randn(3, 4)
    opt.step()
    p.data = make(p.data)
    p.grad = torch.randn(p.shape)
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(RuntimeError, match=r"parameter 0 has shape .* and its optimizer state 'exp_avg' shape \(3, 4\)"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name not in ("SparseAdam", "LBFGS")],
                         ids=lambda i: i.name)
def test_parameter_with_state_reshaped_in_place_steps_as_before_on_every_path(info):
    """`p.data = p.data.view(12)` keeps the size and the memory order: every path steps it
    element for element, as before. torch's multi-tensor and for-loop code, which the CPU's
    'auto' path runs for most algorithms, pair tensors by shape: it raised part-way through
    the step, after counting it for every parameter (and for ASGD, updating one)."""
    runs = {}
    for backend in ("reference", "auto"):
        ps = [torch.nn.Parameter(t) for t in (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
                                              torch.randn(5, generator=torch.Generator().manual_seed(1)))]
        opt = info.fused(ps, **info.configs[0], backend=backend)
        for step in range(4):
            if step == 2:
                ps[0].data = ps[0].data.view(12)
            for p, g in zip(ps, random_grads(ps, step)):
                p.grad = g
            opt.step() if not info.closure else opt.step(lambda: torch.tensor(0.0))
        runs[backend] = [p.detach().clone() for p in ps], opt.state_dict()["state"]
    (ref_params, ref_state), (params, state) = runs["reference"], runs["auto"]
    for j, (a, b) in enumerate(zip(params, ref_params)):
        assert_close(f"param {j}", a, b, info.rtol32, 1e-6)
    for i in ref_state:
        for key, value in ref_state[i].items():
            if isinstance(value, torch.Tensor):
                assert_close(f"state {i} {key}", torch.as_tensor(state[i][key]), value, info.rtol32, 1e-6)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name not in ("SparseAdam", "LBFGS")],
                         ids=lambda i: i.name)
def test_complex_parameters_step_as_torch_on_the_cpu_default_path(info):
    """torch.optim steps complex parameters as pairs of reals; the CPU's 'auto' path hands
    its code real views. (A shape check on those views, written for real ones, once
    refused every complex step of the algorithms torch has no fused kernel for.)"""
    gen = torch.Generator().manual_seed(0)
    made = [torch.randn(4, 3, dtype=torch.complex64, generator=gen), torch.randn(5, dtype=torch.complex64, generator=gen)]
    theirs, ref, ours, opt = twin(made, info.fused, info.torch, info.configs[0], "auto")
    for step in range(3):
        for a, b in zip(theirs, ours):
            g = torch.randn(a.shape, dtype=a.dtype, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        if info.closure:
            ref.step(lambda: torch.tensor(0.0))
            opt.step(lambda: torch.tensor(0.0))
        else:
            ref.step()
            opt.step()
    assert_same_run(theirs, ref, ours, opt, rtol=info.rtol32, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name not in ("SparseAdam", "LBFGS")],
                         ids=lambda i: i.name)
def test_integer_parameter_with_a_gradient_is_refused_before_anything_changes(info, backend):
    """torch's step refuses an integer parameter (RuntimeError, or NotImplementedError, a
    kind of it); the reference path and the kernels truncated the update into it."""
    p, q = torch.tensor([10, 20, 30]), torch.nn.Parameter(torch.randn(3))
    opt = info.fused([q, p], **info.configs[0], backend=backend)
    p.grad, q.grad = torch.tensor([1, -1, 3]), torch.randn(3)
    before = q.detach().clone(), copy.deepcopy(opt.state_dict()["state"])   # (Adagrad's state is made at once)
    with pytest.raises(RuntimeError):
        opt.step() if not info.closure else opt.step(lambda: torch.tensor(0.0))
    assert torch.equal(p, torch.tensor([10, 20, 30]))
    if backend != "auto":   # (torch's own code, which 'auto' runs on the CPU, may step q before it fails)
        after = opt.state_dict()["state"]
        assert torch.equal(q.detach(), before[0]) and list(after) == list(before[1])
        assert all(torch.equal(torch.as_tensor(after[i][k]), torch.as_tensor(v)) for i in after for k, v in before[1][i].items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_parameter_given_its_transpose_as_data_steps_in_its_new_layout(backend):
    # `p.data = p.data.t()` of a square matrix: same address and shape, other strides.
    theirs, ref, ours, opt = twin([torch.randn(4, 4), torch.randn(3)], fusedopt.Adam, torch.optim.Adam,
                                  dict(lr=0.01), backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, 0))
    for p in theirs[:1] + ours[:1]:
        p.data = p.data.t()
    for step in (1, 2, 3):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    assert_same_run(theirs, ref, ours, opt)


MADE_CONTIGUOUS = {
    # (the parameter as built, what replaces its .data after a step)
    "channels_last, then a contiguous copy": (lambda: torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last),
                                               lambda t: t.contiguous()),
    "transposed, then a contiguous copy": (lambda: torch.randn(4, 6).t(), lambda t: t.contiguous()),
    "square transposed, then its transpose (same address)": (lambda: torch.randn(4, 4).t(), lambda t: t.t()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(MADE_CONTIGUOUS), ids=list(MADE_CONTIGUOUS))
@pytest.mark.parametrize("fused_cls,torch_cls,options", PAIRS)
def test_a_parameter_made_contiguous_after_its_state_was_laid_out_steps_as_torch(fused_cls, torch_cls, options,
                                                                                 layout, backend):
    """`model.to(memory_format=torch.contiguous_format)` after training in channels_last: the
    state kept the old memory order, and the step paired the now contiguous parameter and
    gradient with it element for element in memory order (20 of 24 elements off after one
    step, no error). torch pairs them by index."""
    make, replace = MADE_CONTIGUOUS[layout]
    theirs, ref, ours, opt = twin([make(), torch.randn(5)], fused_cls, torch_cls, options, backend)
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, 0))
    for p in theirs[:1] + ours[:1]:
        p.data = replace(p.data)
        assert p.is_contiguous()
    for step in (1, 2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))   # contiguous gradients
    assert_same_run(theirs, ref, ours, opt)


# Parameters made as views of one tensor: (views sharing memory, disjoint views).
SHARING_VIEWS = {
    "overlapping slices": lambda w: [w.view(-1)[:14], w.view(-1)[10:]],
    "a matrix and its transpose": lambda w: [w[:4], w[:4].t()],
    "a column and a row": lambda w: [w[:, 2], w[1:3]],
}
DISJOINT_VIEWS = {
    "adjacent slices": lambda w: [w.view(-1)[:10], w.view(-1)[10:]],
    "columns": lambda w: [w[:, :2], w[:, 2:3], w[:, 3:]],
    "every other row": lambda w: [w[::2], w[1::2]],
}


def parameters_viewing(make, seed=0):
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
    return w, [torch.nn.Parameter(v) for v in make(w)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("views", SHARING_VIEWS)
@pytest.mark.parametrize("cls", [fusedopt.SGD, fusedopt.AdamW], ids=["SGD", "AdamW"])
def test_parameters_sharing_memory_are_refused_before_anything_changes(cls, views, backend):
    # torch.optim updates such parameters one after the other, the shared elements taking
    # both updates in an order that depends on its path; a fused step updates them at once
    # (on a GPU the two writes race; the reference path kept one update of the two).
    w, params = parameters_viewing(SHARING_VIEWS[views])
    opt = cls(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    before = w.clone()
    with pytest.raises(ValueError, match="parameters 0 and 1 share memory"):
        opt.step()
    assert torch.equal(w, before)
    assert all(not opt.state[p] for p in params)
    # One of them without a gradient: nothing races, and it steps as torch's does.
    theirs_w, theirs = parameters_viewing(SHARING_VIEWS[views])
    ref = getattr(torch.optim, cls.__name__)(theirs, lr=0.1)
    params[0].grad = theirs[0].grad = None
    theirs[1].grad = params[1].grad.clone()
    opt.step()
    ref.step()
    assert_close("memory", w, theirs_w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("views", DISJOINT_VIEWS)
def test_disjoint_views_of_one_tensor_step_as_torch_steps_them(views, backend):
    w, params = parameters_viewing(DISJOINT_VIEWS[views])
    theirs_w, theirs = parameters_viewing(DISJOINT_VIEWS[views])
    opt, ref = fusedopt.Adam(params, lr=0.1, backend=backend), torch.optim.Adam(theirs, lr=0.1)
    for step in range(2):
        step_both(list(zip(theirs, params)), [ref, opt], random_grads(theirs, step))
    assert_close("memory", w, theirs_w)


@pytest.mark.parametrize("large,backend", [(False, b) for b in BACKENDS] + [(True, "reference"), (True, "auto")],
                         ids=[f"small-{b}" for b in BACKENDS] + ["large-reference", "large-auto"])
def test_disjoint_column_blocks_of_a_large_tensor_step_as_torch(large, backend, monkeypatch):
    """Column blocks of a matrix whose elements are too many to compare one by one: their
    overlapping extents were taken as shared memory (ValueError where torch steps, for
    any pair of column blocks of a (50000, 400) matrix). They are compared as boxes of
    the matrix's grid. (Small: `EXACT_ELEMENTS` lowered, so that Triton's interpreter is
    not given 4M elements; the comparison is the bucket's, the same on every path.)"""
    if not large:
        monkeypatch.setattr(_flat, "EXACT_ELEMENTS", 8)
    rows, columns = (2048, 2050) if large else (4, 10)
    ws = [torch.zeros(rows, columns) for _ in range(2)]
    theirs, ours = ([torch.nn.Parameter(w[:, :columns // 2]), torch.nn.Parameter(w[:, columns // 2:])] for w in ws)
    assert sum(p.numel() for p in ours) > _flat.EXACT_ELEMENTS
    ref, opt = torch.optim.Adagrad(theirs, lr=0.1), fusedopt.Adagrad(ours, lr=0.1, backend=backend)
    for step in range(2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    assert_close("memory", ws[1], ws[0])
    # Overlapping blocks of it are still refused.
    params = [torch.nn.Parameter(ws[1][:, :3]), torch.nn.Parameter(ws[1][:, 2:])]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="parameters 0 and 1 share memory"):
        fusedopt.SGD(params, lr=0.1, backend=backend).step()


def _random_views(gen, base):
    """Views of `base` (a 3-d tensor) of random slices, steps, transposes and flattenings."""
    views = []
    for _ in range(int(torch.randint(2, 5, (1,), generator=gen))):
        v = base
        for dim in range(3):
            n = v.shape[dim]
            lo = int(torch.randint(0, n, (1,), generator=gen))
            hi = int(torch.randint(lo + 1, n + 1, (1,), generator=gen))
            step = int(torch.randint(1, 3, (1,), generator=gen))
            v = v.narrow(dim, lo, hi - lo)[(slice(None),) * dim + (slice(None, None, step),)]
        roll = int(torch.randint(0, 4, (1,), generator=gen))
        v = v.permute(1, 0, 2) if roll == 1 else v.flatten() if roll == 2 and v.is_contiguous() else v
        views.append(v)
    return views


@pytest.mark.parametrize("seed", range(4))
def test_shared_memory_finds_exactly_the_views_that_share_an_element(seed):
    """`_flat.shared_memory` against a brute-force comparison of element addresses, for
    random views of one tensor (up to four, so three sharing an element), and the grid
    boxes used past `EXACT_ELEMENTS`, which must give the same pairs wherever they apply.
    (Marking each element with the last tensor seen lost a pair of three that shared one.)"""
    gen = torch.Generator().manual_seed(seed)
    base = torch.zeros(5, 6, 7)
    for _ in range(100):
        views = _random_views(gen, base)
        addresses = [set(torch.arange(base.numel()).as_strided(v.shape, v.stride(), v.storage_offset()).flatten()
                         .tolist()) for v in views]
        truth = sorted((i, j) for i in range(len(views)) for j in range(i + 1, len(views))
                       if addresses[i] & addresses[j])
        assert _flat.shared_memory(views) == truth
        cluster = [(v.storage_offset(), v) for v in views]
        boxes = _flat._grid_boxes(cluster)
        if boxes is not None:
            met = sorted((i, j) for i in range(len(views)) for j in range(i + 1, len(views))
                         if all(a < d and c < b for (a, b), (c, d) in zip(boxes[i], boxes[j])))
            assert met == truth, (views, boxes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,sparse", [(fusedopt.SGD, False), (fusedopt.SGD, True), (fusedopt.Adam, False)],
                         ids=["SGD", "SGD-sparse", "Adam"])
def test_an_expanded_parameter_is_refused_before_anything_changes(cls, sparse, backend):
    # A parameter whose own elements share memory (stride 0): torch.optim's in-place update
    # raises RuntimeError for it, after updating the parameters before it. fusedopt staged
    # a copy, stepped it with the others and raised only at the copy back: the other
    # parameters and the state (Adam's step counts and moments) had moved.
    theirs = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(1).expand(4))]
    ours = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(1).expand(4))]
    ref = getattr(torch.optim, cls.__name__)(theirs, lr=0.1)
    opt = cls(ours, lr=0.1, backend=backend)
    for p in theirs + ours:
        p.grad = torch.ones(p.shape).to_sparse() if sparse else torch.ones(p.shape)
    if not sparse:   # (torch's sparse add writes such a parameter, each entry into one element)
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            ref.step()
    with pytest.raises(RuntimeError, match=r"parameter 1 has elements that share memory \(shape \(4,\), stride \(0,\)"):
        opt.step()
    assert torch.equal(ours[0], torch.ones(3)) and torch.equal(ours[1], torch.zeros(4))
    assert all(not opt.state[p] for p in ours)
    # Without a gradient it is stepped by no one, and the other parameter steps as torch's.
    theirs = [torch.nn.Parameter(torch.ones(3))]
    ref = getattr(torch.optim, cls.__name__)(theirs, lr=0.1)
    ours[1].grad = None
    step_both([(theirs[0], ours[0])], [ref, opt], [ours[0].grad])
    assert_close("param", ours[0], theirs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_given_anothers_memory_through_data_is_refused(backend):
    # Same shape, so the bucket is not rebuilt: the new address is looked at again.
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    opt = fusedopt.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    for p in params:
        p.grad = torch.randn(3, 4)
    opt.step()
    params[2].data = params[0].data
    before = [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params]
    with pytest.raises(ValueError, match="parameters 0 and 2 share memory"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before[0]))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, before[1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=[info.name for info in OPTIMIZERS])
def test_an_expanded_tensor_put_in_through_data_is_refused_before_anything_changes(info, backend):
    # torch's in-place update refuses a parameter whose elements share memory (RuntimeError).
    # fusedopt stepped it on a staging copy whose write back raised that error, after the
    # step had changed its state and the other parameters.
    ours, theirs = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)], None
    opt = info.fused(ours, **info.configs[0], backend=backend)
    for step in range(2):
        for p in ours:
            p.grad = torch.randn(4)
        if step == 1:
            ours[1].data = torch.full((1,), 0.5).expand(4)
            theirs = clone_params(ours)
            ref = info.torch(theirs, **info.configs[0])
            for a, b in zip(theirs, ours):
                a.grad = b.grad.clone()
            theirs[1].data = torch.full((1,), 0.5).expand(4)
            with pytest.raises(RuntimeError, match="more than one element"):
                ref.step()
            before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ours]
            with pytest.raises(RuntimeError, match="memory") as raised:   # (torch: "... single memory location")
                opt.step()
            assert [torch.equal(p, b) for p, b in zip(ours, before[1])] == [True] * 3
            after = opt.state_dict()["state"]
            for i, entry in before[0]["state"].items():
                for key, value in entry.items():
                    assert torch.equal(torch.as_tensor(after[i][key]), torch.as_tensor(value)), f"{i} {key}"
            assert "parameter 1 has elements that share memory" in str(raised.value)
        else:
            opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_copy_takes_up_a_transposed_view_put_in_through_data(backend):
    # The master copy is in the state's layout; after `p.data = p.data.t()` it must take
    # the parameter's values where they now are, as after any `.data` replacement: a step
    # at lr 0 leaves the parameter as it is (it wrote back the old layout's values).
    p = torch.randn(4, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = fusedopt.AdamW([p], lr=0.01, weight_decay=0, master_weights=True, backend=backend)
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    p.data = p.data.t()
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_replaced_with_other_dtype_keeps_updating(backend):
    """The state is carried over, cast to the new dtype, and that is said: torch keeps
    existing state in its old dtype (fp32 Adagrad state cast to fp16 by a `model.half()`
    after the optimizer was made turns eps = 1e-10 into 0, and a zero gradient into NaN,
    where torch's fp32 state does not). A parameter without state yet says nothing."""
    p, fresh = torch.randn(10, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = fusedopt.SGD([p, fresh], lr=0.1, momentum=0.9, backend=backend)
    p.grad = torch.ones(10)
    opt.step()
    p.data, fresh.data = p.data.double(), fresh.data.double()
    p.grad = torch.ones(10, dtype=torch.float64)
    before = p.detach().clone()
    with pytest.warns(UserWarning, match=r"parameter 0 \(momentum_buffer: torch.float32 to torch.float64\)\. "
                      r"torch.optim keeps existing state in its old dtype") as caught:
        opt.step()
    assert len(caught) == 1
    expected = before - 0.1 * (0.9 * 1.0 + 1.0)  # momentum carried over
    assert_close("param after dtype change", p.detach(), expected)
    assert opt.state[p]["momentum_buffer"].dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax", "NAdam", "RAdam"])
def test_the_adam_familys_state_cast_to_a_new_dtype_is_said_too(name, backend):
    """The Adam family adopts state through its own `_adopt` (master weights), which once
    dropped what the base class reported: its moments were cast, even fp32 to bf16, silently."""
    p = torch.randn(10, requires_grad=True)
    opt = getattr(fusedopt, name)([p], lr=0.01, backend=backend)
    p.grad = torch.ones(10)
    opt.step()
    p.data = p.data.to(torch.bfloat16)
    p.grad = torch.ones(10, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"parameter 0 \(exp_avg: torch.float32 to torch.bfloat16") as caught:
        opt.step()
    assert len([w for w in caught if "changed dtype" in str(w.message)]) == 1
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16


def test_a_model_converted_before_its_state_is_made_steps_as_torch_without_a_word():
    """`model.half()` after the optimizer is made but before its first step: no state to cast."""
    theirs, ref, ours, opt = twin([torch.randn(4, 3), torch.randn(3)], fusedopt.RMSprop, torch.optim.RMSprop,
                                  dict(lr=0.01), "auto")
    for p in theirs + ours:
        p.data = p.data.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(lr=0.01), dict(lr=0.01, fused=True)], ids=["default", "fused"])
def test_a_zero_size_parameter_given_storage_of_another_dtype_steps_as_torchs(options, backend):
    """A tensor without elements has address 0 whatever its dtype, so the address check
    alone missed `p.data = p.data.float()` on one: its state was made in the old dtype
    (state_dict off torch's) and torch's fused kernel refused the step."""
    params = [torch.randn(5, dtype=torch.float64), torch.randn(0, 3, dtype=torch.float64)]
    theirs, ref, ours, opt = twin(params, fusedopt.AdamW, torch.optim.AdamW, options, backend)
    for p in theirs[:1] + ours[:1]:
        p.grad = torch.ones(5, dtype=torch.float64)
    ref.step()
    opt.step()
    for p in theirs[1:] + ours[1:]:
        p.data = p.data.float()
    for step in range(2):
        step_both(list(zip(theirs, ours)), [ref, opt], random_grads(theirs, step))
    assert_same_run(theirs, ref, ours, opt)
    assert opt.state_dict()["state"][1]["exp_avg"].dtype == torch.float32


# ---------------------------------------------------------------------------- autograd's view of a step

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=[info.name for info in OPTIMIZERS])
def test_a_step_is_an_in_place_write_to_autograd(info, backend):
    # torch.optim updates parameters in place, which bumps their version counters, so a
    # graph that saved a parameter before the step refuses a backward after it (a second
    # backward through a retained graph, a GAN's generator stepped between the losses).
    # The kernels write through pointers and torch's fused CPU ops bump nothing: that
    # backward ran, silently, with the new values. A parameter without a gradient is not
    # written, and its graph stays usable, in torch and here.
    for cls, extra in ((info.torch, {}), (info.fused, dict(backend=backend))):
        w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
        opt = cls([w, b], **info.configs[0], **extra)
        x = torch.randn(2, 3, requires_grad=True)
        saves_w, saves_b = (x @ w).sum(), (x * b).sum()   # each saves its parameter for x's gradient
        w.grad = torch.randn(3, 4)
        opt.step()
        saves_b.backward()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saves_w.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_in_two_optimizers_with_master_weights_keeps_both_updates(backend):
    # The second optimizer's master copy must take up the first one's step, as it takes up
    # any write to the parameter (its version counter); the kernel's write bumped none, so
    # at lr 0 the second put its stale copy back and undid the first one's update.
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    alone = p.detach().clone().requires_grad_()
    first = fusedopt.AdamW([p], lr=0.1, master_weights=True, backend=backend)
    second = fusedopt.AdamW([p], lr=0.0, weight_decay=0.0, master_weights=True, backend=backend)
    reference = fusedopt.AdamW([alone], lr=0.1, master_weights=True, backend=backend)
    for step in range(3):
        p.grad = alone.grad = torch.randn(64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(step))
        first.step()
        second.step()
        reference.step()
        assert torch.equal(p.detach(), alone.detach()), f"step {step}"


# ---------------------------------------------------------------------------- closures, zero_grad

@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_closure_returns_its_loss(backend):
    w = torch.randn(5, requires_grad=True)
    ref_w = w.detach().clone().requires_grad_()
    opt = fusedopt.SGD([w], lr=0.1, backend=backend)
    ref = torch.optim.SGD([ref_w], lr=0.1)

    def closure_for(param, o):
        def closure():
            o.zero_grad()
            loss = (param ** 2).sum()
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        assert torch.equal(opt.step(closure_for(w, opt)), ref.step(closure_for(ref_w, ref)))
    assert_close("param", w.detach(), ref_w.detach())


def test_zero_grad_sets_grads_to_none_by_default():
    p = torch.randn(3, requires_grad=True)
    opt = fusedopt.Adam([p])
    p.grad = torch.ones(3)
    opt.zero_grad()
    assert p.grad is None
    p.grad = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(3))


def test_add_param_group_is_stepped_like_torch():
    a, b = torch.randn(4), torch.randn(6)
    theirs, ref, ours, opt = twin([a], fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), "auto")
    tb, ob = b.clone().requires_grad_(), b.clone().requires_grad_()
    step_both(list(zip(theirs, ours)), [ref, opt], random_grads([a], 0))
    ref.add_param_group({"params": [tb], "lr": 0.1})
    opt.add_param_group({"params": [ob], "lr": 0.1})
    step_both([(theirs[0], ours[0]), (tb, ob)], [ref, opt], random_grads([a, b], 1))
    assert_same_run(theirs + [tb], ref, ours + [ob], opt)


def test_subclass_of_torch_optimizer_with_plain_step_method():
    p = torch.randn(3, requires_grad=True)
    opt = fusedopt.AdamW([p])
    assert isinstance(opt, torch.optim.Optimizer)
    assert "step" in type(opt).__mro__[0].__dict__ or "step" in fusedopt.Optimizer.__dict__
    # torch's schedulers wrap opt.step.__func__; construction must work.
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)


# ---------------------------------------------------------------------------- scalar tables

@pytest.mark.parametrize("variant", ["adam", "nadam", "radam"])
@pytest.mark.parametrize("lr,betas,wd", [(1e-3, (0.9, 0.999), 0.01), (3e-4, (0.95, 0.98), 0.1), (0.1, (0.0, 0.99), 0.0)])
def test_uniform_step_table_is_the_per_tensor_table(lr, betas, wd, variant):
    """Tensors all at one step get their Adam-family table row from Python floats (torch's
    for-loop math) instead of per-tensor torch ops: the same fp32 table at every step up
    to 5000, and float64 values that differ at most in their last bits (torch's
    lr / bias_correction1 is one division where the per-tensor ops multiply by a
    reciprocal; Python's pow and torch's vectorised one differ in the last bit, which
    1 - beta2 ** step and RAdam's rho_t magnify)."""
    from fusedopt.kernels import adam

    o = adam.AdamOptions(lr=lr, beta1=betas[0], beta2=betas[1], eps=1e-8, weight_decay=wd, amsgrad=False,
                         maximize=False, decoupled=True, variant=variant, momentum_decay=4e-3)
    n = 5000
    steps = torch.arange(1, n + 1, dtype=torch.float32)
    products = None
    if variant == "nadam":  # the float32 state, advanced as torch advances it
        products, product = [], torch.ones(())
        for step in range(1, n + 1):
            product = product * adam.momentum_cache(torch.tensor(float(step), dtype=torch.float64), o)[0].float()
            products.append(product.item())
    per_tensor = torch.stack([c if isinstance(c, torch.Tensor) else torch.full(steps.shape, float(c), dtype=torch.float64)
                              for c in adam.scalars(steps, o, None if products is None else torch.tensor(products))], dim=1)
    uniform = torch.tensor([adam.uniform_scalars(s, o, None if products is None else products[i])
                            for i, s in enumerate(steps.tolist())], dtype=torch.float64)
    # (the columns a variant never reads are NaN in both)
    assert torch.equal(uniform.isnan(), per_tensor.isnan())
    assert torch.equal(uniform.float().nan_to_num(), per_tensor.float().nan_to_num())
    torch.testing.assert_close(uniform, per_tensor, rtol=1e-12, atol=0, equal_nan=True)


def test_adam_steps_take_the_uniform_table_until_steps_differ(monkeypatch):
    """The row is used while every tensor is at one step, and not once a tensor lags."""
    from fusedopt.kernels import adam

    calls = []
    real = adam.uniform_scalars
    monkeypatch.setattr(adam, "uniform_scalars", lambda step, *rest: calls.append(step) or real(step, *rest))
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    opt = fusedopt.AdamW(params, backend="reference")
    for step in range(3):
        for j, p in enumerate(params):
            p.grad = None if (step, j) == (1, 2) else torch.randn(5)
        opt.step()
    assert calls == [1.0]   # step 2 leaves tensor 2 behind: per-tensor tables from then on


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_momentum_turned_on_mid_training_starts_buffers_as_torch(backend):
    """Without momentum SGD keeps no state (every step takes the cached table); when a
    group's momentum is set later, the buffers start on that step as copies of the gradient."""
    params = [torch.randn(5), torch.randn(3, 4)]
    theirs, ref, ours, opt = twin(params, fusedopt.SGD, torch.optim.SGD, dict(lr=0.1), backend)
    for step in range(5):
        if step == 2:  # (with dampening: a buffer that starts as a copy differs from one updated from zeros)
            for group in (ref.param_groups[0], opt.param_groups[0]):
                group.update(momentum=0.9, dampening=0.3)
        step_both(list(zip(theirs, ours)), (ref, opt), random_grads(params, step))
        assert (len(opt.state) == 0) == (step < 2)
    assert_same_run(theirs, ref, ours, opt)


def test_adagrad_tensors_at_one_step_share_one_float_and_the_cached_table():
    """Adagrad's step size from Python floats (torch's for-loop math) while every tensor is
    at one step: the fp32 values of the per-tensor ops at every step to 5000; and without
    lr_decay the step size never changes, so every step reuses the bucket's table."""
    from fusedopt.kernels import adagrad

    o = adagrad.AdagradOptions(lr=0.01, lr_decay=1e-3, weight_decay=0.0, eps=1e-10, maximize=False)
    steps = torch.arange(1, 5001, dtype=torch.float32)
    per_tensor = adagrad.scalars(steps, o)[0]
    assert isinstance(per_tensor, torch.Tensor)
    uniform = torch.tensor([adagrad.scalars(torch.full((3,), s), o)[0] for s in steps.tolist()], dtype=torch.float64)
    assert torch.equal(uniform.float(), per_tensor.float())
    torch.testing.assert_close(uniform, per_tensor, rtol=1e-15, atol=0)

    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = fusedopt.Adagrad(params, backend="reference")
    tables = []
    for step in range(3):
        for p in params:
            p.grad = torch.randn(4)
        opt.step()
        (bucket,) = opt._group_buckets(0)
        tables.append(bucket._scalar_table[1])
    assert tables[0] is tables[1] is tables[2]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("lagging", [False, True], ids=["together", "one-lags"])
@pytest.mark.parametrize("name,options,keys,steps", [
    ("NAdam", dict(lr=0.01), ("mu_product",), 60),
    ("ASGD", dict(lr=0.05, lambd=1e-3, t0=10, weight_decay=0.01), ("eta", "mu"), 30),   # past t0: mu moves
])
def test_per_tensor_scalar_state_is_torchs_bit_for_bit(name, options, keys, steps, backend, lagging):
    """NAdam's float32 mu_product and ASGD's eta and mu, advanced as one float for all while
    every tensor steps together and per tensor once one lags, are torch's for-loop's to the
    bit, and so are the parameters' updates to rounding."""
    params = [torch.randn(4), torch.randn(2, 3), torch.randn(5)]
    theirs, ref, ours, opt = twin(params, getattr(fusedopt, name), getattr(torch.optim, name),
                                  dict(options, foreach=False), backend)
    for step in range(steps):
        grads = random_grads(params, step)
        if lagging and step == 3:
            grads[1] = None
        step_both(list(zip(theirs, ours)), (ref, opt), grads)
    for a, b in zip(theirs, ours):
        for key in keys:
            assert torch.equal(ref.state[a][key], opt.state[b][key]), key
    assert_same_run(theirs, ref, ours, opt)


def _give_state_other_memory(opt):
    """The widely copied `optimizer_to(optim, device)` helper, as a round trip to another
    device leaves the state: every state tensor given a copy of itself through `.data`."""
    for entry in opt.state.values():
        for value in entry.values():
            if torch.is_tensor(value):
                value.data = value.data.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01)),
                                          ("ASGD", dict(lr=0.01, t0=0))], ids=["SGD", "Adam", "ASGD"])
def test_state_given_other_memory_through_data_is_still_what_the_step_updates(name, options, backend):
    """torch steps the tensors in `opt.state` themselves; given other memory through
    `.data`, they were cut off from the flat buffers: the step went on without them, so
    state_dict() saved them stale and an edit to them (a reset of the moments) was lost."""
    theirs, ref, ours, opt = twin([torch.randn(4, 3), torch.randn(5)], getattr(fusedopt, name),
                                  getattr(torch.optim, name), options, backend)
    for step in range(5):
        for a, b, g in zip(theirs, ours, random_grads(theirs, step)):
            a.grad, b.grad = g.clone(), g.clone()
        if step == 1:
            _give_state_other_memory(ref)
            _give_state_other_memory(opt)
            held = {key: t for key, t in opt.state[ours[0]].items()}
        if step == 3:
            first = next(k for k in held if k != "step" and held[k].dim())
            ref.state[theirs[0]][first].zero_()
            held[first].zero_()   # the object moved at step 1, edited in place
        ref.step()
        opt.step()
        for key, t in (held.items() if step >= 1 else ()):
            assert opt.state[ours[0]][key] is t, f"{key}: not the object the user holds"
        saved, expected = opt.state_dict()["state"], ref.state_dict()["state"]
        for i in expected:
            for key, value in expected[i].items():
                assert_close(f"step {step}, state {i} {key}", torch.as_tensor(saved[i][key]), torch.as_tensor(value))
        for j, (a, b) in enumerate(zip(theirs, ours)):
            assert_close(f"step {step}, param {j}", b.detach(), a.detach())


def _swap_entries(opt, a, b):
    opt.state[a], opt.state[b] = opt.state[b], opt.state[a]


def _reorder_then_swap_entries(opt, a, b):
    # (the group's buckets are rebuilt inside the first assignment: they must not carry the
    # entry that assignment lets go)
    opt.param_groups[0]["params"].reverse()
    _swap_entries(opt, a, b)


def _swap_tensors(opt, a, b):
    sa, sb = opt.state[a], opt.state[b]
    for key in list(sa):
        sa[key], sb[key] = sb[key], sa[key]


_HELD = {}   # (the two-part edits' entries between their calls, by optimizer)


def _pop_and_put_back(opt, a, b):
    if id(opt) not in _HELD:
        _HELD[id(opt)] = opt.state.pop(a)
    else:
        opt.state[a] = _HELD.pop(id(opt))


def _empty_and_put_back(opt, a, b):
    if id(opt) not in _HELD:
        _HELD[id(opt)] = opt.state[a]
        opt.state[a] = {}
    else:
        opt.state[a] = _HELD.pop(id(opt))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", [_swap_entries, _reorder_then_swap_entries, _swap_tensors, _pop_and_put_back,
                                  _empty_and_put_back],
                         ids=["swap entries", "reorder, swap entries", "swap tensors", "pop, put back",
                              "empty, put back"])
@pytest.mark.parametrize("name,options", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01, amsgrad=True)),
                                          ("ASGD", dict(lr=0.01, t0=0))], ids=["SGD", "Adam", "ASGD"])
def test_state_replaced_in_opt_state_keeps_its_values_where_it_is_held(name, options, edit, backend):
    """torch rebinds: an entry or tensor replaced or removed in `opt.state` keeps its values.
    Here it is a view of a segment the next write reuses: state swapped between two
    parameters came out as the second one's twice, and an entry popped and put back after a
    step came back as the fresh state of that step."""
    theirs, ref, ours, opt = twin([torch.randn(4, 3), torch.randn(4, 3), torch.randn(5)], getattr(fusedopt, name),
                                  getattr(torch.optim, name), options, backend)
    for step in range(5):
        for a, b, g in zip(theirs, ours, random_grads(theirs, step)):
            a.grad, b.grad = g.clone(), g.clone()
        if step in (2, 3):   # (the two-part edits put back at the next step)
            edit(ref, theirs[0], theirs[1])
            edit(opt, ours[0], ours[1])
        ref.step()
        opt.step()
        assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_tensor_held_across_a_rebuild_stays_the_state(backend):
    """torch's state tensors stay the same objects when a parameter is appended to a group,
    when another one's storage changes shape, and through load_state_dict(state_dict()): a
    momentum buffer kept by a callback that resets it was cut off from the rebuilt buffers,
    and the reset never reached the step."""
    theirs, ref, ours, opt = twin([torch.randn(6), torch.randn(3)], fusedopt.SGD, torch.optim.SGD,
                                  dict(lr=0.1, momentum=0.9), backend)
    extra = torch.randn(4)
    theirs.append(torch.nn.Parameter(extra.clone()))
    ours.append(torch.nn.Parameter(extra.clone()))
    for step in range(7):
        for a, b, g in zip(theirs, ours, random_grads(theirs, step)):
            a.grad, b.grad = g.clone(), g.clone()
        if step == 1:
            held = [(o.state[p]["momentum_buffer"], o.state[p]) for o, p in ((ref, theirs[0]), (opt, ours[0]))]
        if step == 2:   # another parameter appended to the group's list
            ref.param_groups[0]["params"].append(theirs[2])
            opt.param_groups[0]["params"].append(ours[2])
        if step == 3:
            ref.load_state_dict(ref.state_dict())
            opt.load_state_dict(opt.state_dict())
        if step == 4:   # another parameter's storage given another shape (frozen from now on)
            for ps in (theirs, ours):
                ps[1].data = ps[1].data[:2]
        if step == 5:
            for buf, _ in held:
                buf.zero_()
        if step >= 4:
            for ps in (theirs, ours):
                ps[1].grad = None
        ref.step()
        opt.step()
        if step < 1:
            continue
        assert opt.state[ours[0]]["momentum_buffer"] is held[1][0]
        if step < 3:   # (torch's load_state_dict makes new entries, with the same tensors)
            assert opt.state[ours[0]] is held[1][1]
        assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_assigned_from_its_own_transpose_is_copied(backend):
    """`st[k] = st[k].t()` on a square parameter: torch rebinds; the copy into the segment
    read and wrote the same elements and raised."""
    theirs, ref, ours, opt = twin([torch.randn(3, 3)], fusedopt.Adam, torch.optim.Adam, dict(lr=0.01), backend)
    for step in range(3):
        for a, b, g in zip(theirs, ours, random_grads(theirs, step)):
            a.grad, b.grad = g.clone(), g.clone()
        if step == 1:
            for o, p in ((ref, theirs[0]), (opt, ours[0])):
                o.state[p]["exp_avg"] = o.state[p]["exp_avg"].t()
        ref.step()
        opt.step()
        assert_same_run(theirs, ref, ours, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_given_memory_of_another_shape_through_data_is_refused_before_anything_changes(backend):
    p = torch.nn.Parameter(torch.randn(6))
    opt = fusedopt.Adam([p], lr=0.01, backend=backend)
    p.grad = torch.ones(6)
    opt.step()
    opt.state[p]["exp_avg"].data = torch.zeros(3)
    before = p.detach().clone(), opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["step"].clone()
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' was given other memory through .data, of shape \(3,\)"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg_sq"], before[1])
    assert torch.equal(opt.state[p]["step"], before[2])
