"""Sparse gradients (an `Embedding(sparse=True)`), which torch's SGD and Adagrad step: the
same parameters and state as torch's, beside dense parameters on every path; torch's
refusals (weight decay, fused=True) before anything changes; checkpoints both ways."""
import copy

import pytest
import torch

import fusedopt
from _compare import assert_close, embeddings_one_reshaped

BACKENDS = ["triton", "reference", "auto"]
CASES = [
    pytest.param("SGD", dict(lr=0.1), id="SGD"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9), id="SGD-momentum"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), id="SGD-nesterov"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.5, dampening=0.2, maximize=True), id="SGD-dampening-maximize"),
    pytest.param("Adagrad", dict(lr=0.1), id="Adagrad"),
    pytest.param("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, maximize=True),
                 id="Adagrad-options"),
]
# Rows looked up each step: repeated rows (summed by torch in one order, by the dense
# momentum buffer in another: rounding apart) and rows that come and go.
LOOKUPS = [[1, 2, 2, 7], [3, 3, 9, 1], [12], [2, 7, 7, 7, 40]]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 4, sparse=True)
        self.out = torch.nn.Linear(4, 3)


def train(model, opt, steps=len(LOOKUPS)):
    for s in range(steps):
        opt.zero_grad()
        model.out(model.emb(torch.tensor(LOOKUPS[s % len(LOOKUPS)]))).pow(2).sum().backward()
        assert model.emb.weight.grad.is_sparse
        opt.step()


def dense_state(opt, p):
    return {k: (v.to_dense() if isinstance(v, torch.Tensor) and v.is_sparse else v) for k, v in opt.state[p].items()}


def assert_same(model_ref, opt_ref, model_new, opt_new, rtol=2e-6, atol=1e-6):
    for (name, a), b in zip(model_ref.named_parameters(), model_new.parameters()):
        assert_close(name, b, a, rtol, atol)
        s_ref, s_new = dense_state(opt_ref, a), dense_state(opt_new, b)
        assert s_ref.keys() == s_new.keys(), name
        for k in s_ref:
            assert_close(f"{name}.{k}", torch.as_tensor(s_new[k]), torch.as_tensor(s_ref[k]), rtol, atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", CASES)
def test_sparse_gradients_step_as_torchs(name, options, backend):
    ref, new = Model(), Model()
    opt_ref = getattr(torch.optim, name)(ref.parameters(), **options)
    opt_new = getattr(fusedopt, name)(new.parameters(), backend=backend, **options)
    before = new.emb.weight.detach().clone()
    train(ref, opt_ref)
    train(new, opt_new)
    assert_same(ref, opt_ref, new, opt_new)
    # rows never looked up keep their values exactly (a dense momentum buffer adds zeros)
    untouched = sorted(set(range(50)) - {i for rows in LOOKUPS for i in rows})
    assert torch.equal(new.emb.weight[untouched], before[untouched])
    assert not torch.equal(new.emb.weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("rows", [[4], [1, 4]], ids=["one-entry", "two-entries"])
def test_whole_sparse_gradients_of_a_later_segment(name, options, backend, rows):
    """`g.to_sparse()` of a whole gradient (no dense dimensions) for a parameter whose state
    segment starts past the buffer's start: torch's own sparse add writes such a view's
    entries at twice its offset (here into the next parameter's segment; past a buffer's
    end, heap corruption). The parameters and every state segment are torch's."""
    def run(lib, **extra):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (40, 6, 200)]
        opt = getattr(lib, name)(params, **options, **extra)
        for s in range(3):
            params[0].grad, params[2].grad = torch.randn(40), torch.randn(200)
            g = torch.zeros(6)
            g[rows] = torch.randn(len(rows))
            params[1].grad = g.to_sparse()
            opt.step()
        return params, opt

    (ref, opt_ref), (new, opt_new) = run(torch.optim), run(fusedopt, backend=backend)
    for i, (a, b) in enumerate(zip(ref, new)):
        assert_close(f"param {i}", b, a, 2e-6, 1e-6)
        s_ref, s_new = dense_state(opt_ref, a), dense_state(opt_new, b)
        assert s_ref.keys() == s_new.keys()
        for k in s_ref:
            assert_close(f"param {i} {k}", torch.as_tensor(s_new[k]), torch.as_tensor(s_ref[k]), 2e-6, 1e-6)


@pytest.mark.parametrize("name,options", [c for c in CASES if "momentum" in c.values[1] or c.values[0] == "Adagrad"])
def test_checkpoints_with_sparse_state_load_both_ways(name, options):
    """torch keeps a sparse gradient's SGD momentum buffer sparse; fusedopt loads it (its
    values, zeros elsewhere) and exports it sparse again, which torch steps (its Nesterov
    cannot add a dense buffer to a sparse gradient)."""
    ref, new = Model(), Model()
    opt_ref = getattr(torch.optim, name)(ref.parameters(), **options)
    train(ref, opt_ref, 2)
    new.load_state_dict(ref.state_dict())
    opt_new = getattr(fusedopt, name)(new.parameters(), **options)
    opt_new.load_state_dict(copy.deepcopy(opt_ref.state_dict()))
    assert_same(ref, opt_ref, new, opt_new, rtol=0, atol=0)
    train(ref, opt_ref, 3)
    train(new, opt_new, 3)
    assert_same(ref, opt_ref, new, opt_new)
    exported = opt_new.state_dict()["state"][0]
    for key, value in opt_ref.state_dict()["state"][0].items():
        assert exported[key].layout == value.layout, key
    back, opt_back = Model(), getattr(torch.optim, name)(Model().parameters(), **options)
    back.load_state_dict(new.state_dict())
    opt_back = getattr(torch.optim, name)(back.parameters(), **options)
    opt_back.load_state_dict(copy.deepcopy(opt_new.state_dict()))
    train(back, opt_back, 2)
    train(new, opt_new, 2)
    assert_same(back, opt_back, new, opt_new)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [c.values[1] for c in CASES if "momentum" in c.values[1]])
def test_a_fusedopt_checkpoint_of_sparse_momentum_steps_in_torch(options, backend):
    """Trained by fusedopt from the start, its checkpoint holds the momentum buffer sparse,
    as torch's would, also after a deep copy of the optimizer and a state put back in
    place; torch loads it and steps on (with Nesterov too) to fusedopt's numbers."""
    new = Model()
    opt_new = fusedopt.SGD(new.parameters(), backend=backend, **options)
    train(new, opt_new, 2)
    opt_new = copy.deepcopy(opt_new)   # the parameters too: a new model around them
    model = Model()
    model.emb.weight, model.out.weight, model.out.bias = opt_new.param_groups[0]["params"]
    opt_new.state = {p: copy.copy(entries) for p, entries in opt_new.state.items()}   # adopted again
    saved = opt_new.state_dict()["state"]
    assert saved[0]["momentum_buffer"].is_sparse and not saved[1]["momentum_buffer"].is_sparse
    back = Model()
    back.load_state_dict(model.state_dict())
    opt_back = torch.optim.SGD(back.parameters(), **options)
    opt_back.load_state_dict(copy.deepcopy(opt_new.state_dict()))
    train(back, opt_back, 3)
    train(model, opt_new, 3)
    assert_same(back, opt_back, model, opt_new)


@pytest.mark.parametrize("name,options,message", [
    ("SGD", dict(lr=0.1, weight_decay=0.01), "weight_decay=0.01 does not apply to sparse gradients"),
    ("Adagrad", dict(lr=0.1, weight_decay=0.01), "weight_decay option is not compatible with sparse gradients"),
    ("SGD", dict(lr=0.1, momentum=0.9, fused=True), r"fused=True\) does not support sparse gradients"),
    ("Adagrad", dict(lr=0.1, fused=True), r"fused=True\) does not support sparse gradients"),
    ("SGD", dict(lr=0.1, max_grad_norm=1.0), "max_grad_norm does not clip sparse gradients"),
    ("Adam", dict(lr=0.1), "Adam does not support sparse gradients"),
])
def test_what_torch_refuses_raises_before_anything_changes(name, options, message):
    """torch refuses these too (SGD's weight decay as add(sparse, dense), its fused kernels
    outright), but only after updating the parameters before the sparse one: here a dense
    group stepped first is left as it was, and so is the state."""
    model = Model()
    cls = getattr(fusedopt, name)
    dense_first = dict(params=list(model.out.parameters()))
    extra = {k: options.pop(k) for k in ("max_grad_norm",) if k in options}
    opt = cls([dense_first, dict(params=[model.emb.weight])], **options, **extra)
    model.out(torch.randn(2, 4)).sum().backward()  # a first step without the sparse gradient: some state
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model.out(model.emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for key, entry in state["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][key][k]), torch.as_tensor(v)), (key, k)


@pytest.mark.parametrize("name,options", [CASES[1], CASES[4]])
def test_sparse_gradients_inside_a_compiled_function(name, options):
    """Dynamo cannot take sparse gradients into a graph; the step still runs, as torch's."""
    ref, new = Model(), Model()
    opt_ref = getattr(torch.optim, name)(ref.parameters(), **options)
    opt_new = getattr(fusedopt, name)(new.parameters(), **options)
    train(ref, opt_ref, 3)
    torch.compile(lambda: train(new, opt_new, 3), backend="aot_eager")()
    assert_same(ref, opt_ref, new, opt_new)


def test_an_attached_average_takes_the_sparse_parameters_too():
    """The sparse parameter is not in the kernel's batch: the averaged model averages it
    after the step, so attaching equals step() then update_parameters, bit for bit."""
    def run(attach):
        model = Model()
        ema = fusedopt.swa.AveragedModel(model, multi_avg_fn=fusedopt.swa.get_ema_multi_avg_fn(0.9))
        opt = fusedopt.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if attach:
            opt.attach_averaged_model(ema)
        for s in range(3):
            train(model, opt, 1)
            if not attach:
                ema.update_parameters(model)
        return [p.detach().clone() for p in ema.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,key", [("Adagrad", "sum"), ("SparseAdam", "exp_avg")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_of_1d_sparse_state_steps_in_torch(name, key, backend):
    """torch's add of a sparse tensor without dense dimensions (a 1-d parameter's gradient)
    into a view at a storage offset writes at twice the offset: the flat segments that
    `state_dict` handed out, loaded into torch.optim (or saved and loaded: views keep their
    offsets), were stepped at the wrong place (past the buffer's end for a late one: heap
    corruption), and the parameter's own entry kept its old value. Such state goes out as
    tensors of its own. (The last parameter is large, so that the wrong write stays inside
    the buffer here.)"""
    def grads(step):
        return [torch.sparse_coo_tensor(torch.tensor([[(step + i) % 3]]), torch.tensor([1.0 + i]), (n,))
                for i, n in enumerate((3, 3, 200))]

    def stepped(opt, params, step):
        for p, g in zip(params, grads(step)):
            p.grad = g
        opt.step()

    ref = [torch.zeros(n) for n in (3, 3, 200)]
    new = [p.clone() for p in ref]
    opt_ref = getattr(torch.optim, name)(ref, lr=0.1)
    opt_new = getattr(fusedopt, name)(new, lr=0.1, backend=backend)
    stepped(opt_ref, ref, 0)
    stepped(opt_new, new, 0)
    loaded = [p.detach().clone() for p in new]
    into_torch = getattr(torch.optim, name)(loaded, lr=0.1)
    into_torch.load_state_dict(opt_new.state_dict())
    for step in (1, 2):
        stepped(opt_ref, ref, step)
        stepped(into_torch, loaded, step)
    for i, (a, b) in enumerate(zip(ref, loaded)):
        assert_close(f"param {i}", b, a)
        assert_close(f"{key} {i}", into_torch.state[b][key], opt_ref.state[a][key])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", [c for c in CASES if c.id != "SGD"])
def test_a_reshaped_embedding_keeps_its_old_state_until_a_sparse_gradient_steps_it(name, options, backend):
    # An embedding with state given more rows: torch keeps its state in the old shape and
    # steps the others while it has no gradient; a sparse gradient for it makes torch's
    # update raise. fusedopt's sparse steps would have started it afresh in its new shape.
    results = []
    for cls, extra in ((getattr(torch.optim, name), {}), (getattr(fusedopt, name), dict(backend=backend))):
        emb, other, opt = embeddings_one_reshaped(cls, **options, **extra)
        results.append(copy.deepcopy((other.weight.detach(), dense_state(opt, emb.weight), dense_state(opt, other.weight))))
        emb(torch.tensor([11])).sum().backward()
        before = other.weight.detach().clone()
        with pytest.raises(RuntimeError):
            opt.step()
        if extra:
            assert torch.equal(emb.weight.detach(), torch.ones(12, 3))
            assert torch.equal(other.weight.detach(), before)
    (theirs, *their_state), (ours, *our_state) = results
    assert_close("param", ours, theirs)
    for theirs_, ours_ in zip(their_state, our_state):
        assert theirs_.keys() == ours_.keys()
        for key in theirs_:
            assert_close(key, torch.as_tensor(ours_[key]), torch.as_tensor(theirs_[key]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", [c for c in CASES if c.id.startswith("SGD-")])
def test_a_dense_gradient_after_sparse_ones_steps_where_torchs_sgd_raises(name, options, backend):
    # torch keeps a momentum buffer that a sparse gradient started sparse, and its step
    # cannot add a dense gradient to it (add(sparse, dense) is not supported). fusedopt's
    # buffer is dense: it steps with the numbers of torch's update on a dense buffer.
    made = []
    for cls, extra in ((torch.optim.SGD, {}), (fusedopt.SGD, dict(backend=backend))):
        model = Model()
        opt = cls(model.parameters(), **options, **extra)
        train(model, opt, steps=2)
        made.append((model, opt))
    (model_ref, ref), (model_new, opt) = made
    for model in (model_ref, model_new):
        model.emb.weight.grad = torch.ones_like(model.emb.weight)   # dense
    with pytest.raises(RuntimeError, match=r"add\(sparse, dense\)"):
        ref.step()
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))   # (torch changed some state before raising)
    for p_ref, p_new in zip(model_ref.parameters(), model_new.parameters()):
        p_ref.data.copy_(p_new)
    buf = ref.state[model_ref.emb.weight]["momentum_buffer"]
    ref.state[model_ref.emb.weight]["momentum_buffer"] = buf.to_dense()
    for model in (model_ref, model_new):
        model.emb.weight.grad = torch.ones_like(model.emb.weight)
    ref.step()
    opt.step()
    assert_close("emb.weight", model_new.emb.weight, model_ref.emb.weight, 2e-6, 1e-6)
    assert_close("momentum", dense_state(opt, model_new.emb.weight)["momentum_buffer"],
                 ref.state[model_ref.emb.weight]["momentum_buffer"], 2e-6, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", ["sparse", "dense"])
def test_a_checkpoint_holds_the_momentum_buffer_in_torchs_layout(first, backend):
    # torch's SGD keeps a momentum buffer sparse when a sparse gradient started it, dense when
    # a dense one did, whatever comes after. fusedopt saved it sparse after any sparse
    # step, and dense again once its bucket was rebuilt (a parameter appended to the group).
    made = []
    for cls, extra in ((torch.optim.SGD, {}), (fusedopt.SGD, dict(backend=backend))):
        model = Model()
        opt = cls(model.parameters(), lr=0.1, momentum=0.9, **extra)
        if first == "dense":
            model.emb.weight.grad = torch.ones_like(model.emb.weight)
            opt.step()
        train(model, opt, steps=2)
        made.append([model, opt, opt.state_dict()["state"][0]["momentum_buffer"].layout])
        opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.ones(3)))
        train(model, opt, steps=1)
        made[-1].append(opt.state_dict()["state"][0]["momentum_buffer"].layout)
    (model_ref, ref, *theirs), (model_new, opt, *ours) = made
    assert ours == theirs == [torch.sparse_coo if first == "sparse" else torch.strided] * 2
    assert_same(model_ref, ref, model_new, opt)
