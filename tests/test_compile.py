"""torch.compile traces through `opt.step()`: the step is one `fusedopt::step` custom op.

Compiled training steps are compared with torch.optim run eagerly on the same model and
data; every compiled test also checks that the op is in the graph (a step that fell out
of the trace would still give the right numbers). opcheck exercises the op's schema, its
fake implementation, and its behaviour under functionalization (AOT autograd hands it
clones of the tensors it mutates).
"""
import copy
import warnings

import pytest
import torch

import fusedopt
from _compare import assert_close
from fusedopt import _compile

AOT_EAGER = "aot_eager"  # runs AOT autograd's functionalization, no code generation: fast


class Graphs:
    """A dynamo backend that records each graph and hands it to `backend`."""

    def __init__(self, backend=AOT_EAGER):
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.backend(gm, example_inputs)

    def op_calls(self) -> int:
        step = torch.ops.fusedopt.step
        return sum(n.target in (step, step.default) for g in self.graphs for n in g.graph.nodes)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    extra = torch.nn.Parameter(torch.randn(4))  # a second group, stepped only when used
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    return model, extra, x, y


def loss_of(model, extra, x, y, use_extra):
    loss = torch.nn.functional.mse_loss(model(x), y)
    if use_extra:
        loss = loss + (extra * x[:4, 0]).pow(2).sum()
    return loss


def groups(model, extra, lr, second):
    # A tensor lr in the first group (the case that must not recompile), a float in the second.
    return [dict(params=list(model.parameters()), lr=torch.tensor(lr)), dict(params=[extra], **second)]


# (algorithm, options, second group's options, backends, rtol against torch). Every
# algorithm on 'reference' (the paths share the step driver and the op; 'reference' is
# the one that shows the kernels' arithmetic on a CPU), the two most used on the kernel
# and on torch's CPU code too.
CASES = [
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01), dict(lr=0.05, nesterov=False),
     ("reference", "triton", "auto"), None),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1), dict(lr=0.003, betas=(0.5, 0.99)),
     ("reference", "triton", "auto"), None),
    ("AdamW", dict(lr=0.01, weight_decay=0.3), dict(lr=0.003, weight_decay=0.05), ("reference",), None),
    ("Adamax", dict(lr=0.01, weight_decay=0.1), dict(lr=0.003), ("reference",), None),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), dict(lr=0.003), ("reference",), None),
    ("RAdam", dict(lr=0.01), dict(lr=0.003, weight_decay=0.2), ("reference",), None),
    ("Adagrad", dict(lr=0.1, lr_decay=0.1, weight_decay=0.05), dict(lr=0.05), ("reference",), None),
    ("Adadelta", dict(lr=0.5, rho=0.5), dict(lr=0.3, weight_decay=0.2), ("reference",), None),
    # Without momentum: on this model's gradients the momentum buffer sums terms of
    # opposite sign, and the reference path's roundings (torch's addcmul and addcdiv
    # round once) leave it up to 3e-5 (relative) from torch's, eagerly as compiled.
    ("RMSprop", dict(lr=0.01, alpha=0.9, weight_decay=0.1), dict(lr=0.003, alpha=0.95), ("reference",), None),
    ("Rprop", dict(lr=0.01, etas=(0.3, 1.5)), dict(lr=0.03, step_sizes=(1e-3, 1.0)), ("reference",), None),
    ("ASGD", dict(lr=0.05, t0=2), dict(lr=0.02, lambd=1e-3), ("reference",), None),
]
TRAINING_CASES = [pytest.param(name, options, second, backend, rtol, id=f"{name}-{backend}")
                  for name, options, second, backends, rtol in CASES for backend in backends]


def run_torch(name, options, second, steps, use_extra):
    model, extra, x, y = model_and_data()
    opt = getattr(torch.optim, name)(groups(model, extra, options["lr"], second), **options)
    for group in opt.param_groups:  # torch's foreach CPU paths reject a tensor lr
        group["lr"] = float(group["lr"])
    for step in range(steps):
        loss_of(model, extra, x, y, use_extra(step)).backward()
        opt.step()
        opt.zero_grad()
    return [*model.parameters(), extra], opt


def run_fusedopt(name, options, second, backend, steps, use_extra, compile_with=None):
    model, extra, x, y = model_and_data()
    opt = getattr(fusedopt, name)(groups(model, extra, options["lr"], second), backend=backend, **options)

    def train(use):
        loss_of(model, extra, x, y, use).backward()
        opt.step()
        opt.zero_grad()

    f = train if compile_with is None else torch.compile(train, backend=compile_with)
    for step in range(steps):
        f(use_extra(step))
    return [*model.parameters(), extra], opt


@pytest.mark.parametrize("name,options,second,backend,rtol", TRAINING_CASES)
def test_compiled_training_step_matches_eager_and_torch(name, options, second, backend, rtol):
    """forward, backward, step and zero_grad in one compiled function (backward breaks
    the graph; the step is traced), with a parameter that has no gradient on some steps:
    the same bits as the eager step, and torch's numbers."""
    steps, use_extra = 5, (lambda step: step % 3 != 1)
    graphs = Graphs()
    p_new, opt = run_fusedopt(name, options, second, backend, steps, use_extra, graphs)
    assert graphs.op_calls() >= 2, "the step was not traced into the graph (once with, once without extra's grad)"
    p_eager, opt_eager = run_fusedopt(name, options, second, backend, steps, use_extra)
    for j, (a, b) in enumerate(zip(p_eager, p_new)):
        assert torch.equal(a, b), f"param {j}: the compiled step's differs from the eager step's"
    s_eager, s_new = opt_eager.state_dict()["state"], opt.state_dict()["state"]
    assert sorted(s_eager) == sorted(s_new)
    for k, entry in s_eager.items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(s_new[k][key]), torch.as_tensor(value)), f"state {key} of param {k} differs"
    p_ref, opt_ref = run_torch(name, options, second, steps, use_extra)
    for j, (a, b) in enumerate(zip(p_ref, p_new)):
        assert_close(f"param {j}", b, a, rtol)
    assert_states_match(opt_ref, opt, rtol)


def assert_states_match(opt_ref, opt, rtol=None, atol=None):
    s_ref, s_new = opt_ref.state_dict()["state"], opt.state_dict()["state"]
    assert sorted(s_ref) == sorted(s_new)
    for k, entry in s_ref.items():
        assert list(s_new[k]) == list(entry), f"param {k}: state keys differ"
        for key, value in entry.items():
            got = s_new[k][key]
            if key == "step":
                assert float(got) == float(value), f"param {k}: step {got} != {value}"
            elif isinstance(value, torch.Tensor):
                assert_close(f"state {key} of param {k}", got, value, rtol, atol)


FULLGRAPH_CASES = [
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05), backend, id=f"SGD-{backend}")
    for backend in ("reference", "triton", "auto")
] + [
    pytest.param("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), backend, id=f"Adam-{backend}")
    for backend in ("reference", "triton", "auto")
] + [pytest.param("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-6), "reference", id="RMSprop-reference")]


@pytest.mark.parametrize("name,options,backend", FULLGRAPH_CASES)
def test_fullgraph_step_compiles_once_and_orders_reads_after_it(name, options, backend):
    """`fullgraph=True`: no graph break. The function reads the parameters after the step,
    so the graph must order those reads after the op; and from the very first step (the
    state is created inside the traced step) nothing recompiles."""
    model, extra, x, y = model_and_data()
    ref = getattr(torch.optim, name)(list(model.parameters()), **options)
    twin = copy.deepcopy(model)
    opt = getattr(fusedopt, name)(list(twin.parameters()), backend=backend, **options)
    backend_ = Graphs()

    def check(read):
        for j, (a, b) in enumerate(zip(model.parameters(), read)):
            assert_close(f"param {j} as read in the graph", b, a.detach())

    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_beside_torch(ref, opt, model, twin, x, y, backend_, steps=4,
                              read=lambda: [p * 1 for p in twin.parameters()], check=check)
    assert backend_.op_calls() == 1
    assert_states_match(ref, opt)


def compiled_beside_torch(ref, opt, model, twin, x, y, backend_, steps=3, before=None, ref_grads=None,
                          read=None, check=None):
    """Train `model` with torch's `ref` eagerly and `twin` with `opt.step()` compiled
    (fullgraph) beside it, from the same data; `before(i)` runs before step i (an lr
    change), `ref_grads()` on torch's gradients before its step (clipping); `read()` runs
    in the graph after the step, and `check(values)` gets what it returned. Then the
    parameters must agree."""
    @torch.compile(backend=backend_, fullgraph=True)
    def step():
        opt.step()
        return None if read is None else read()

    for i in range(steps):
        if before is not None:
            before(i)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if ref_grads is not None:
            ref_grads()
        ref.step()
        ref.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        values = step()
        opt.zero_grad()
        if check is not None:
            check(values)
    for j, (a, b) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_close(f"param {j}", b, a)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_tensor_lr_changing_every_step_compiles_once(backend):
    model, extra, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW(model.parameters(), lr=0.01)
    lr = torch.tensor(0.01)
    opt = fusedopt.AdamW(twin.parameters(), lr=lr, backend=backend)
    backend_ = Graphs()

    def new_lr(i):
        lr.fill_(0.01 * 0.7 ** i)
        ref.param_groups[0]["lr"] = float(lr)

    # From the very first call: the state the first step creates needs no recompilation.
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_beside_torch(ref, opt, model, twin, x, y, backend_, steps=5, before=new_lr)
    assert backend_.op_calls() == 1
    assert_states_match(ref, opt)


def test_float_lr_changing_recompiles_as_for_torch_and_keeps_torch_numbers():
    """A Python-number lr is a constant of the graph (dynamo guards on it, as for
    torch.optim): each new value compiles again, and each step uses its own value."""
    model, extra, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = fusedopt.SGD(twin.parameters(), lr=0.1, momentum=0.9, backend="reference")
    backend_ = Graphs()

    def new_lr(i):
        ref.param_groups[0]["lr"] = opt.param_groups[0]["lr"] = 0.1 * 0.5 ** i

    compiled_beside_torch(ref, opt, model, twin, x, y, backend_, before=new_lr)
    assert backend_.op_calls() == 3


def test_scheduler_between_compiled_steps():
    """fusedopt's OneCycleLR writes the tensor lr and betas in place between compiled
    training steps: one compilation, and torch's numbers (its scheduler, float values)."""
    model, extra, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch.optim.Adam(model.parameters(), lr=0.01)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, 0.05, total_steps=8)
    # float64 tensors: their values are torch's floats exactly
    opt = fusedopt.Adam(twin.parameters(), lr=torch.tensor(0.01, dtype=torch.float64),
                        betas=(torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64)))
    sched = fusedopt.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=8)
    backend_ = Graphs()

    @torch.compile(backend=backend_)
    def train():
        torch.nn.functional.mse_loss(twin(x), y).backward()
        opt.step()
        opt.zero_grad()

    train()
    compiled = len(backend_.graphs)
    torch.nn.functional.mse_loss(model(x), y).backward()
    ref.step()
    ref.zero_grad()
    # The scheduler knows that step() ran (dynamo drops the attribute its step wrapper
    # sets; the op sets it), so it does not warn that the schedule ran ahead.
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*before `optimizer.step\\(\\)`")
        for _ in range(6):
            ref_sched.step()
            sched.step()
            torch.nn.functional.mse_loss(model(x), y).backward()
            ref.step()
            ref.zero_grad()
            train()
    assert len(backend_.graphs) == compiled and backend_.op_calls() == 1
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)
    assert float(opt.param_groups[0]["betas"][0]) == pytest.approx(ref.param_groups[0]["betas"][0], rel=1e-12)
    for j, (a, b) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_close(f"param {j}", b, a)
    assert_states_match(ref, opt)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_options_changed_inside_the_compiled_function_reach_the_step(backend):
    """Changes the graph makes before step(): a tensor lr written in place (AOT defers the
    write to the real tensor until after the graph) and a float weight decay assigned
    (dynamo applies Python side effects after the graph). The op is given both as the
    graph has them, so the step uses the new values, as eagerly."""
    def run(compile_it):
        model, extra, x, y = model_and_data()
        lr = torch.tensor(0.01)
        opt = fusedopt.SGD(model.parameters(), lr=lr, momentum=0.9, backend=backend)

        def train(i):
            torch.nn.functional.mse_loss(model(x), y).backward()
            lr.mul_(0.5)
            opt.param_groups[0]["weight_decay"] = 0.1 * (i + 1)
            opt.step()
            opt.zero_grad()

        f = torch.compile(train, backend=Graphs()) if compile_it else train
        for i in range(3):
            f(i)
        return list(model.parameters()), opt

    p_eager, _ = run(False)
    p_compiled, opt = run(True)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.3)
    for j, (a, b) in enumerate(zip(p_eager, p_compiled)):
        assert_close(f"param {j}", b, a)


def test_max_grad_norm_in_a_compiled_step():
    """Clipping reduces every bucket before updating any: inside the one op."""
    model, extra, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = fusedopt.SGD(twin.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.05, backend="reference")
    backend_ = Graphs()
    compiled_beside_torch(ref, opt, model, twin, x, y, backend_,
                          ref_grads=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
    assert backend_.op_calls() == 1


def test_inductor_runs_the_op_on_the_real_tensors():
    """The default backend: Inductor re-inplaces the op (no clones) and the numbers hold."""
    model, extra, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    opt = fusedopt.Adam(twin.parameters(), lr=0.01, amsgrad=True)
    backend_ = Graphs("inductor")
    compiled_beside_torch(ref, opt, model, twin, x, y, backend_)
    assert len(backend_.graphs) == 1 and backend_.op_calls() == 1
    assert_states_match(ref, opt)


def test_sparse_adam_steps_eagerly_inside_a_compiled_function():
    """Dynamo cannot take sparse gradients into a graph: SparseAdam's step stays eager."""
    def run(cls, compile_it):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = cls(emb.parameters(), lr=0.01)
        idx = torch.tensor([1, 2, 2, 7])

        def train():
            emb(idx).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()

        f = torch.compile(train, backend=AOT_EAGER) if compile_it else train
        for _ in range(3):
            f()
        return emb.weight

    assert_close("weight", run(fusedopt.SparseAdam, True), run(torch.optim.SparseAdam, False))


# ------------------------------------------------------------------------------ opcheck

OPCHECK_CASES = [
    pytest.param("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1), backend, id=f"Adam-{backend}")
    for backend in ("reference", "triton", "auto")
] + [
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2), backend, id=f"SGD-{backend}")
    for backend in ("reference", "triton", "auto")
] + [
    pytest.param("RMSprop", dict(lr=0.01, centered=True, momentum=0.5), backend, id=f"RMSprop-{backend}")
    for backend in ("reference", "triton")
]


@pytest.mark.parametrize("name,options,backend", OPCHECK_CASES)
def test_opcheck(name, options, backend):
    """Schema (exactly params and state mutated), fake implementation, and AOT dispatch
    (the op given clones) for a bucket where one parameter has no gradient, two groups
    with a tensor lr in one."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (7,), (2, 2)]]
    opt = getattr(fusedopt, name)([dict(params=params[:3], lr=torch.tensor(options["lr"])), dict(params=params[3:])],
                                  backend=backend, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists: every run of the op below starts from the same tensors
    params[1].grad = None
    for p in params:
        if p.grad is not None:
            p.grad = torch.randn_like(p)
    args = opt._op_inputs()
    assert any(g is None for g in args[2]) and len(args[3]) >= 2
    torch.library.opcheck(torch.ops.fusedopt.step.default, args)
    # And the op's step is the eager step: run it on clones, as functionalization does.
    twin = copy.deepcopy(opt)
    handle, ps, gs, state, options_, numbers, amp = args
    clones = [p.detach().clone() for p in ps], [s.clone() for s in state]
    torch.ops.fusedopt.step(handle, clones[0], gs, clones[1], options_, numbers, amp)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, g in zip(twin_params, gs):
        p.grad = g
    twin.step()
    for j, (a, b) in enumerate(zip(twin_params, clones[0])):
        assert_close(f"param {j} (given a clone)", b, a)
        assert torch.equal(ps[j], b), f"param {j}: the op's result is not in the optimizer's own parameter"


# --------------------------------------------------------------------------- mechanics

def test_eager_step_calls_no_op(monkeypatch):
    """Eagerly the step runs its body directly: the op's dispatch costs several times a
    small model's whole step (200 small tensors, Adam: ~1 ms through the op, ~0.25 ms
    direct, on this project's CPU)."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    opt = fusedopt.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)

    def refuse(*args, **kwargs):
        raise AssertionError("the eager step went through fusedopt::step")

    monkeypatch.setattr(fusedopt.Optimizer, "_step_from_op", refuse)
    opt.step()
    assert opt.state[params[0]]["step"] == 1


def test_prepare_is_marked_as_torch_marks_assume_constant_result():
    """`_compile.prepare` sets by hand what `torch.compiler.assume_constant_result` sets
    (to keep torch._dynamo out of `import fusedopt`): fail loudly if torch changes it."""
    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    added = {k: v for k, v in vars(marked).items()}
    assert added and all(getattr(_compile.prepare, k, None) == v for k, v in added.items())


def test_copies_get_their_own_handle():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedopt.Adam(params)
    twin = copy.deepcopy(opt)
    assert twin._handle != opt._handle and _compile.optimizer(twin._handle) is twin
    handle = opt._handle
    opt.load_state_dict(twin.state_dict())
    assert opt._handle == handle


def test_a_step_that_outlives_its_optimizer_says_so():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fusedopt.Adam(params)
    params[0].grad = torch.ones(3)
    args = opt._op_inputs()
    del opt
    import gc
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.fusedopt.step(*args)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("fused", [False, True], ids=["scaler-unscales", "kernel-unscales"])
def test_grad_scaler_inside_a_compiled_step_matches_eager(fused, backend):
    """GradScaler's step inside the compiled function, an inf step among them: the scaler
    skips it (default) or the kernel does (fused=True); parameters and scale as eager."""
    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = fusedopt.AdamW(model.parameters(), lr=torch.tensor(0.01), fused=fused, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)

        def train_step(x, inf):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if inf:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        for k in range(5):
            step(torch.randn(5, 4, generator=torch.Generator().manual_seed(k)), k == 2)
        return [p.detach().clone() for p in model.parameters()], scaler.get_scale()

    torch._dynamo.reset()
    (got, got_scale), (expected, expected_scale) = run(True), run(False)
    assert got_scale == expected_scale
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_state_read_after_the_first_compiled_step_is_the_new_state(backend):
    """torch's optimizers create their state when dynamo traces their first step, so code
    traced after `step()` in the same graph (a step post-hook, a read of opt.state) sees
    it. fusedopt's did not: `fullgraph=True` raised KeyError on every call, a hook that
    summed the state logged 0 for the first step, and the graph compiled again."""
    model, extra, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = fusedopt.Adam(twin.parameters(), lr=0.01, backend=backend)
    logged = [None]

    def post_hook(o, args, kwargs):
        logged[0] = sum((s["exp_avg_sq"].sum() for s in o.state.values()), torch.zeros(())) * 1

    opt.register_step_post_hook(post_hook)
    backend_ = Graphs()

    def check(read):
        exp_avg, step = read
        assert_close("exp_avg read in the graph", exp_avg, ref.state[model[0].weight]["exp_avg"])
        assert float(step) == float(ref.state[model[2].bias]["step"])
        assert_close("state summed by the post-hook", logged[0],
                     sum(s["exp_avg_sq"].sum() for s in ref.state.values()))

    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_beside_torch(ref, opt, model, twin, x, y, backend_, steps=3, check=check,
                              read=lambda: (opt.state[twin[0].weight]["exp_avg"] * 1,
                                            opt.state[twin[2].bias]["step"] * 1))
    assert backend_.op_calls() == 1
    assert_states_match(ref, opt)


def test_a_first_compiled_step_that_raises_leaves_no_state():
    """The state a traced first step creates for the graph's sake is dropped when the
    step then raises: the optimizer is as it was, as after the eager step's error."""
    real = torch.nn.Parameter(torch.randn(3))
    complex_ = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = fusedopt.Adam([real, complex_], lr=0.01, fused=True)
    real.grad, complex_.grad = torch.ones(3), torch.ones(3, dtype=torch.complex64)
    step = torch.compile(opt.step, backend=Graphs())
    with pytest.raises(RuntimeError, match="floating-point parameters"):
        step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    complex_.grad = None   # and the next step is a first step
    step()
    assert float(opt.state[real]["step"]) == 1 and complex_ not in opt.state
    assert_close("exp_avg", opt.state[real]["exp_avg"], torch.full((3,), 0.1))


@pytest.mark.parametrize("first", ["eager", "compiled"])
def test_state_read_after_a_compiled_step_with_state_made_eagerly_and_inside_the_op(first):
    """State a parameter gets in a compiled step and state made eagerly are views of the
    same flat buffers. A view made inside the op (below autograd's view tracking) has no
    `_base`, and Inductor's AOT refused a graph given both kinds as mutated aliases
    ("does not yet handle non-differentiable view input mutations"): reading opt.state
    after step() then failed to compile. The entries the op fills keep the views made
    when the step was traced (the first step, compiled, makes views when traced too)."""
    model, extra, x, y = model_and_data()
    twin = copy.deepcopy(model)
    ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.2)
    opt = fusedopt.SGD(twin.parameters(), lr=0.1, momentum=0.9, dampening=0.2)
    backend_ = Graphs("inductor")

    @torch.compile(backend=backend_)
    def step(read):
        opt.step()
        if read:
            return [opt.state[p]["momentum_buffer"] * 1 for p in twin.parameters() if p in opt.state]

    # (uncached: AOT autograd's cache may hold this graph compiled from views that all had
    # a `_base`, and hand it back without the check that refused it)
    with torch._inductor.config.patch(force_disable_caches=True):
        for i in range(4):
            for m, o in ((model, ref), (twin, None)):
                torch.nn.functional.mse_loss(m(x), y).backward()
                if i == 0:
                    m[2].bias.grad = None   # its first step is the compiled one
                if o is not None:
                    o.step()
                elif i == 0 and first == "eager":
                    opt.step()
                else:
                    read = step(True)
                m.zero_grad()
    for j, (a, b) in enumerate(zip(model.parameters(), read)):
        assert_close(f"momentum_buffer {j} read in the graph", b, ref.state[a]["momentum_buffer"])
    assert_states_match(ref, opt)


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_a_parameter_written_between_compiled_steps_is_taken_up_by_its_master_copy(backend):
    """A compiled step runs the op with no Python of the optimizer's between steps to watch
    the parameters, so a write between steps (here a model's load_state_dict) is seen by
    the update reading the parameter against its master copy, as eagerly."""
    def run(compile_it):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 5).to(torch.bfloat16)
        x, y = torch.randn(16, 6, dtype=torch.bfloat16), torch.randn(16, 5, dtype=torch.bfloat16)
        opt = fusedopt.AdamW(model.parameters(), lr=0.01, master_weights=True, backend=backend)

        def train():
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        f = torch.compile(train, backend=Graphs()) if compile_it else train
        f()
        f()
        loaded = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
        model.load_state_dict(loaded)
        f()
        return model, opt

    eager, _ = run(False)
    compiled, opt = run(True)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (a.float() - 0.5).abs().max() < 0.1, name   # one step from the loaded values
        assert torch.equal(a, b), name
        assert torch.equal(opt.state[b]["master_param"].to(b.dtype), b), name
