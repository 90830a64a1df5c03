"""fusedopt.LBFGS against torch.optim.LBFGS: losses, iterates and state, bit for bit.

The flat vectors use torch's order and dtype, and the vector ops are torch's, so there
is no tolerance: every loss, parameter and state entry must be identical, on both
line-search settings, over several `step` calls (history wrapping included).
"""
import copy
import pickle

import pytest
import torch

import fusedopt

BACKENDS = ["triton", "reference", "auto"]
LINE_SEARCHES = [None, "strong_wolfe"]


# ----------------------------------------------------------------------------- problems

def rosenbrock_params(dtype):
    # A 6-D Rosenbrock split over two parameters of different shapes.
    return [torch.tensor([-1.5, 2.0, -0.5, 1.2], dtype=dtype).requires_grad_(),
            torch.tensor([[0.3], [-1.1]], dtype=dtype).requires_grad_()]


def rosenbrock(params):
    x = torch.cat([p.reshape(-1) for p in params])
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def least_squares_params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 6, generator=gen, dtype=dtype).requires_grad_(),   # weight
            torch.randn(4, generator=gen, dtype=dtype).requires_grad_(),      # bias
            torch.randn(3, generator=gen, dtype=dtype).requires_grad_(),      # unused: no gradient
            torch.randn(2, 2, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64,
                        generator=gen).requires_grad_()]                      # complex scale


_GEN = torch.Generator().manual_seed(1)
_X = torch.randn(32, 6, generator=_GEN, dtype=torch.float64)
_Y = torch.randn(32, 4, generator=_GEN, dtype=torch.float64)


def least_squares(params):
    weight, bias, _, scale = params
    x, y = _X.to(weight.dtype), _Y.to(weight.dtype)
    pred = x @ weight.t() + bias
    return (pred - y).pow(2).mean() + 0.1 * (scale.abs() ** 2 - 1).pow(2).sum() + 0.01 * weight.pow(2).sum()


PROBLEMS = {"rosenbrock": (rosenbrock_params, rosenbrock), "least_squares": (least_squares_params, least_squares)}


def closure_for(opt, params, loss_fn, log=None):
    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        if log is not None:
            log.append(loss.item())
        return loss
    return closure


# ----------------------------------------------------------------------------- comparison

def assert_same_value(name, got, expected):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{name}: {type(got).__name__} where torch has a tensor"
        assert got.dtype == expected.dtype and got.shape == expected.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
        assert torch.equal(got, expected), f"{name}: differs, max {(got - expected).abs().max().item():.3e}"
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{name}: {got!r} vs {expected!r}"
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same_value(f"{name}[{i}]", a, b)
    else:
        assert type(got) is type(expected) and got == expected, f"{name}: {got!r} != {expected!r}"


def assert_same_state(opt_new, opt_ref):
    s_new, s_ref = opt_new.state_dict(), opt_ref.state_dict()
    assert s_new["param_groups"] == s_ref["param_groups"]
    assert list(s_new["state"]) == list(s_ref["state"])
    for k, ref in s_ref["state"].items():
        new = s_new["state"][k]
        assert list(new) == list(ref), f"state keys {list(new)} != {list(ref)}"
        for key, value in ref.items():
            assert_same_value(key, new[key], value)


def run_both(problem, dtype, backend, steps=4, **options):
    make, loss_fn = PROBLEMS[problem]
    p_ref, p_new = make(dtype), make(dtype)
    opt_ref = torch.optim.LBFGS(p_ref, **options)
    opt_new = fusedopt.LBFGS(p_new, backend=backend, **options)
    step_both(opt_ref, p_ref, opt_new, p_new, loss_fn, steps)
    return p_ref, opt_ref, p_new, opt_new


def step_both(opt_ref, p_ref, opt_new, p_new, loss_fn, steps):
    """Step torch's LBFGS and fusedopt's side by side: the same losses, closure points,
    parameters and state after every step, bit for bit."""
    for step in range(steps):
        log_ref, log_new = [], []
        loss_ref = opt_ref.step(closure_for(opt_ref, p_ref, loss_fn, log_ref))
        loss_new = opt_new.step(closure_for(opt_new, p_new, loss_fn, log_new))
        assert loss_new.item() == loss_ref.item(), f"step {step}: loss {loss_new.item()} != {loss_ref.item()}"
        assert log_new == log_ref, f"step {step}: the closure was evaluated at different points"
        for j, (a, b) in enumerate(zip(p_ref, p_new)):
            assert torch.equal(a, b), f"step {step}: parameter {j} differs"
        assert_same_state(opt_new, opt_ref)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_matches_torch(problem, line_search_fn, backend):
    lr = 1 if line_search_fn else 0.05
    run_both(problem, torch.float64, backend, lr=lr, line_search_fn=line_search_fn, max_iter=7, history_size=4)


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_matches_torch_fp32(problem, line_search_fn):
    lr = 1 if line_search_fn else 0.05
    run_both(problem, torch.float32, "auto", lr=lr, line_search_fn=line_search_fn, max_iter=6, history_size=3)


def test_a_list_put_in_the_groups_place_is_not_followed_as_in_torch():
    """torch's LBFGS keeps the list object its group was built with: a new list put in
    `param_groups[0]["params"]` afterwards is not stepped (the parameters it adds get no
    update, and the history stays the old parameters'). fusedopt followed the new list, and
    its history of the old size then met a flat vector of another (a RuntimeError here;
    with the same total size, silently wrong directions)."""
    runs = []
    for cls in (torch.optim.LBFGS, fusedopt.LBFGS):
        params = rosenbrock_params(torch.float64)
        extra = torch.tensor([0.5, -0.25], dtype=torch.float64, requires_grad=True)
        opt = cls(params, lr=0.05, max_iter=4, history_size=3)
        closure = closure_for(opt, params + [extra], lambda ps: rosenbrock(ps[:2]) + (ps[2] ** 2).sum())
        for _ in range(2):
            opt.step(closure)
        opt.param_groups[0]["params"] = params + [extra]
        losses = [opt.step(closure).item() for _ in range(2)]
        runs.append((losses, [p.detach().clone() for p in params + [extra]], opt))
    (ref_losses, ref_params, opt_ref), (new_losses, new_params, opt_new) = runs
    assert new_losses == ref_losses
    for j, (a, b) in enumerate(zip(ref_params, new_params)):
        assert torch.equal(a, b), f"parameter {j}"
    assert torch.equal(new_params[2], torch.tensor([0.5, -0.25], dtype=torch.float64))   # not stepped


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_default_options_converge_like_torch(line_search_fn):
    lr = 1 if line_search_fn else 0.01
    start = rosenbrock(rosenbrock_params(torch.float64)).item()
    p_ref, opt_ref, *_ = run_both("rosenbrock", torch.float64, "auto", steps=3, lr=lr, line_search_fn=line_search_fn)
    # A real run, not a trivial one.
    assert opt_ref.state_dict()["state"][0]["func_evals"] > 20
    assert rosenbrock(p_ref).item() < start / (10 if line_search_fn else 2)


@pytest.mark.parametrize("options", [
    dict(max_iter=5, max_eval=3),                                  # the evaluation budget ends the step
    dict(max_iter=5, max_eval=3, line_search_fn="strong_wolfe"),   # ... and cuts the line search short
    dict(max_iter=1),                                              # 'al' first appears on the second step
    dict(tolerance_change=1e-2, max_iter=10),                      # lack of progress ends the step
    dict(history_size=1, max_iter=6, line_search_fn="strong_wolfe"),
    dict(lr=torch.tensor(0.5), max_iter=4),
    dict(lr=torch.tensor(1.0), max_iter=4, line_search_fn="strong_wolfe"),
], ids=["max_eval", "max_eval-wolfe", "max_iter=1", "tolerance_change", "history=1", "tensor-lr", "tensor-lr-wolfe"])
def test_options_match_torch(options):
    options = {"lr": 0.05, **options}
    run_both("least_squares", torch.float64, "auto", steps=3, **options)


def test_optimal_start_returns_at_once():
    """A gradient already below tolerance_grad: one evaluation, only the counters in state."""
    p_ref, opt_ref, p_new, opt_new = run_both("rosenbrock", torch.float64, "auto", steps=1, tolerance_grad=1e10)
    assert list(opt_new.state_dict()["state"][0]) == ["func_evals", "n_iter"]


def test_sparse_gradient_is_densified_as_torch():
    def make():
        torch.manual_seed(0)
        return torch.nn.Embedding(7, 3, sparse=True)

    ref, new = make(), make()
    opt_ref = torch.optim.LBFGS(ref.parameters(), lr=0.1, max_iter=5)
    opt_new = fusedopt.LBFGS(new.parameters(), lr=0.1, max_iter=5)
    idx = torch.tensor([1, 3, 3, 5])
    for model, opt in ((ref, opt_ref), (new, opt_new)):
        for _ in range(2):
            opt.step(closure_for(opt, None, lambda _, m=model: m(idx).pow(2).sum()))
    assert torch.equal(new.weight, ref.weight)
    assert_same_state(opt_new, opt_ref)


# ----------------------------------------------------------------------------- errors

def _error(factory):
    try:
        factory()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=torch.tensor([1.0, 2.0]))], ids=["negative-lr", "tensor-lr"])
def test_validation_errors_match_torch(kwargs):
    p = torch.randn(3, requires_grad=True)
    expected = _error(lambda: torch.optim.LBFGS([p], **kwargs))
    assert expected is not None
    assert _error(lambda: fusedopt.LBFGS([p], **kwargs)) == expected


def test_one_group_only_as_torch():
    def groups():
        return [dict(params=[torch.randn(2, requires_grad=True)]), dict(params=[torch.randn(2, requires_grad=True)])]

    expected = _error(lambda: torch.optim.LBFGS(groups()))
    assert expected == (ValueError, "LBFGS doesn't support per-parameter options (parameter groups)")
    assert _error(lambda: fusedopt.LBFGS(groups())) == expected


def test_unknown_line_search_raises_as_torch():
    def attempt(cls):
        p = torch.tensor([1.0, 2.0], requires_grad=True)
        opt = cls([p], line_search_fn="bogus")
        return _error(lambda: opt.step(closure_for(opt, [p], lambda ps: ps[0].pow(2).sum())))

    theirs, ours = attempt(torch.optim.LBFGS), attempt(fusedopt.LBFGS)
    assert theirs == (RuntimeError, "only 'strong_wolfe' is supported")
    assert ours[0] is theirs[0] and ours[1].startswith(theirs[1]) and "'bogus'" in ours[1]


BAD_EDITS = {
    "line_search_fn": dict(line_search_fn="bogus"),
    "tolerance_grad-str": dict(tolerance_grad="1e-7"),
    "tolerance_grad-None": dict(tolerance_grad=None),
    "max_iter-None": dict(max_iter=None),
    "tolerance_change-None": dict(tolerance_change=None),
    "tolerance_change-str": dict(tolerance_change="1e-9"),
    "lr-None": dict(lr=None),
    "lr-str": dict(lr="0.1"),
    "lr-two-elements": dict(lr=torch.tensor([0.1, 0.2])),
    "max_eval-None": dict(max_eval=None),
    "max_eval-None-wolfe": dict(max_eval=None, line_search_fn="strong_wolfe"),
    "max_eval-0-wolfe": dict(max_eval=0, line_search_fn="strong_wolfe"),
    "history_size-None": dict(history_size=None),
}


# (history_size on a first step is read at its second iteration, if one comes: there fusedopt
# raises where torch does, after the first)
@pytest.mark.parametrize("first_step, edit", [
    pytest.param(first, edit, id=f"{'first' if first else 'later'}-step-{name}")
    for first in (True, False) for name, edit in BAD_EDITS.items() if not (first and name == "history_size-None")])
def test_bad_options_raise_what_torch_raises_before_anything_changes(edit, first_step):
    """torch raises on these where its step first uses the option: after evaluating the
    closure and counting the evaluation, mostly after moving the parameters, appending to
    the history and overwriting prev_flat_grad, so that a step retried with the option
    fixed goes on from a corrupted history. fusedopt raises the same type before any of
    that, and the optimizer and parameters are as they were."""
    def attempt(cls):
        p = torch.tensor([1.0, 2.0, -3.0], requires_grad=True)
        # (one iteration first: torch creates the history's `al` at the second)
        opt = cls([p], lr=0.1, max_iter=1)
        objective = lambda ps: (ps[0] ** 4).sum() + ps[0].prod()  # noqa: E731
        if not first_step:
            opt.step(closure_for(opt, [p], objective))
        opt.param_groups[0].update({"max_iter": 3, **edit})
        before = (p.detach().clone(), copy.deepcopy(opt.state_dict()["state"]))
        return _error(lambda: opt.step(closure_for(opt, [p], objective))), p, opt, before

    theirs = attempt(torch.optim.LBFGS)[0]
    ours, p, opt, (value, state) = attempt(fusedopt.LBFGS)
    assert theirs is not None and ours is not None and ours[0] is theirs[0], (ours, theirs)
    assert torch.equal(p, value)
    after = opt.state_dict()["state"]
    assert list(after) == list(state)
    for k, entry in state.items():
        assert list(after[k]) == list(entry)
        for key, v in entry.items():
            assert_same_value(key, after[k][key], v)


def test_options_used_by_no_iteration_are_not_checked_as_in_torch():
    """An option the step never reaches raises nothing, in torch or here: max_eval without
    a line search when max_iter is 1, anything but tolerance_grad when max_iter is 0."""
    make, loss_fn = PROBLEMS["least_squares"]
    for edit in (dict(max_eval=None, max_iter=1), dict(max_iter=0, lr=None, tolerance_change=None, max_eval=None,
                                                        line_search_fn="strong_wolfe")):
        p_ref, p_new = make(torch.float64), make(torch.float64)
        opt_ref, opt_new = torch.optim.LBFGS(p_ref, lr=0.05), fusedopt.LBFGS(p_new, lr=0.05)
        for opt in (opt_ref, opt_new):
            opt.param_groups[0].update(edit)
        step_both(opt_ref, p_ref, opt_new, p_new, loss_fn, 2)


def test_an_empty_group_raises_what_torch_raises():
    def attempt(cls):
        opt = cls([{"params": []}])
        return _error(lambda: opt.step(lambda: torch.tensor(0.0)))

    theirs = attempt(torch.optim.LBFGS)
    assert theirs is not None and attempt(fusedopt.LBFGS)[0] is theirs[0] is IndexError


def test_optimizer_conventions():
    p = torch.randn(3, requires_grad=True)
    opt = fusedopt.LBFGS([p])
    assert isinstance(opt, fusedopt.Optimizer) and isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults == torch.optim.LBFGS([p]).defaults
    assert fusedopt.LBFGS is fusedopt.lbfgs.LBFGS


# ----------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused"])
def test_state_dict_round_trip(direction, line_search_fn):
    """Two steps with one implementation, load into the other, two more with both."""
    options = dict(lr=1 if line_search_fn else 0.05, line_search_fn=line_search_fn, max_iter=5, history_size=3)
    make, loss_fn = PROBLEMS["least_squares"]
    fused = lambda ps: fusedopt.LBFGS(ps, **options)  # noqa: E731
    native = lambda ps: torch.optim.LBFGS(ps, **options)  # noqa: E731
    make_src, make_dst = (fused, native) if direction == "fused_to_torch" else (native, fused)

    p_src = make(torch.float64)
    opt_src = make_src(p_src)
    for _ in range(2):
        opt_src.step(closure_for(opt_src, p_src, loss_fn))
    # torch's load_state_dict keeps tensors and lists' contents that need no cast: copy,
    # so that the two optimizers do not share their history.
    saved = copy.deepcopy(opt_src.state_dict())

    p_dst = [p.detach().clone().requires_grad_() for p in p_src]
    opt_dst = make_dst(p_dst)
    opt_dst.load_state_dict(saved)
    loaded = opt_dst.state_dict()
    for key, value in saved["state"][0].items():
        assert_same_value(key, loaded["state"][0][key], value)
    if direction == "torch_to_fused":
        assert loaded["state"][0]["old_dirs"] is not saved["state"][0]["old_dirs"], "history list shared"

    for _ in range(2):
        loss_src = opt_src.step(closure_for(opt_src, p_src, loss_fn))
        loss_dst = opt_dst.step(closure_for(opt_dst, p_dst, loss_fn))
        assert loss_src.item() == loss_dst.item()
    for a, b in zip(p_src, p_dst):
        assert torch.equal(a, b)
    assert_same_state(*((opt_src, opt_dst) if direction == "fused_to_torch" else (opt_dst, opt_src)))


def test_state_dict_casts_history_as_torch():
    """Loading into float32 parameters casts the history tensors inside the lists too."""
    make, loss_fn = PROBLEMS["rosenbrock"]
    p64 = make(torch.float64)
    opt = torch.optim.LBFGS(p64, max_iter=4)
    opt.step(closure_for(opt, p64, loss_fn))
    saved = copy.deepcopy(opt.state_dict())
    ref = torch.optim.LBFGS(make(torch.float32))
    new = fusedopt.LBFGS(make(torch.float32))
    ref.load_state_dict(copy.deepcopy(saved))
    new.load_state_dict(copy.deepcopy(saved))
    assert_same_state(new, ref)
    assert new.state_dict()["state"][0]["old_dirs"][0].dtype == torch.float32


def test_pickle_and_deepcopy_keep_working():
    make, loss_fn = PROBLEMS["least_squares"]
    params = make(torch.float64)
    opt = fusedopt.LBFGS(params, max_iter=3)
    opt.step(closure_for(opt, params, loss_fn))
    clone = copy.deepcopy(opt)
    p2 = clone.param_groups[0]["params"]
    clone.step(closure_for(clone, p2, loss_fn))
    opt.step(closure_for(opt, params, loss_fn))
    for a, b in zip(params, p2):
        assert torch.equal(a, b)
    restored = pickle.loads(pickle.dumps(opt))
    assert list(restored.state_dict()["state"][0]) == list(opt.state_dict()["state"][0])


# ----------------------------------------------------------------------------- flat layout

def test_parameters_keep_their_storage():
    """The flat vectors live beside the parameters: nothing is rebound to a flat buffer."""
    make, loss_fn = PROBLEMS["least_squares"]
    params = make(torch.float64)
    ptrs = [p.data_ptr() for p in params]
    opt = fusedopt.LBFGS(params, max_iter=3, line_search_fn="strong_wolfe")
    opt.step(closure_for(opt, params, loss_fn))
    assert [p.data_ptr() for p in params] == ptrs


def test_replaced_parameter_data_is_followed():
    """`p.data = ...` between steps (same shape) is picked up, as torch picks it up."""
    make, loss_fn = PROBLEMS["least_squares"]
    p_ref, p_new = make(torch.float64), make(torch.float64)
    opt_ref = torch.optim.LBFGS(p_ref, max_iter=3, lr=0.05)
    opt_new = fusedopt.LBFGS(p_new, max_iter=3, lr=0.05)
    for step in range(3):
        if step == 1:
            for a, b in zip(p_ref, p_new):
                fresh = a.detach() * 0.5
                a.data, b.data = fresh.clone(), fresh.clone()
        opt_ref.step(closure_for(opt_ref, p_ref, loss_fn))
        opt_new.step(closure_for(opt_new, p_new, loss_fn))
    for a, b in zip(p_ref, p_new):
        assert torch.equal(a, b)
    assert_same_state(opt_new, opt_ref)


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_a_lazy_module_materialized_by_the_first_closure(line_search_fn, resume):
    # A LazyLinear's parameters get their shapes in the closure's first forward. fusedopt
    # laid out the flat vector before calling the closure, and raised on the shapeless
    # parameter; a checkpoint loaded before that forward was refused for the same reason.
    x = _X.float()

    def make():
        torch.manual_seed(3)
        model = torch.nn.LazyLinear(2)
        return model, model.parameters()

    checkpoint = None
    if resume:
        model, params = make()
        source = torch.optim.LBFGS(params, max_iter=3)
        source.step(closure_for(source, model, lambda m: m(x).pow(2).mean()))
        checkpoint = source.state_dict()
    runs = []
    for cls in (torch.optim.LBFGS, fusedopt.LBFGS):
        model, params = make()
        opt = cls(params, max_iter=3, history_size=2, line_search_fn=line_search_fn)
        if checkpoint is not None:
            opt.load_state_dict(copy.deepcopy(checkpoint))
        for _ in range(2):
            torch.manual_seed(4)   # the first forward materializes the weight from the global RNG
            opt.step(closure_for(opt, model, lambda m: m(x).pow(2).mean()))
        runs.append((model, opt))
    (m_ref, opt_ref), (m_new, opt_new) = runs
    for a, b in zip(m_ref.parameters(), m_new.parameters()):
        assert torch.equal(a, b)
    assert_same_state(opt_new, opt_ref)


def test_a_checkpoint_of_other_parameters_is_refused_at_load():
    """README: load_state_dict refuses state of the wrong shape before anything changes.
    LBFGS's state is one flat vector over all parameters: torch loads a checkpoint of a
    model of another size, and its next step fails after evaluating the closure and
    counting it. fusedopt refuses it at load, naming the vector."""
    make, loss_fn = PROBLEMS["least_squares"]
    params = make(torch.float64)
    src = torch.optim.LBFGS(params, max_iter=3, history_size=2)
    for _ in range(2):
        src.step(closure_for(src, params, loss_fn))
    saved = copy.deepcopy(src.state_dict())

    other = make(torch.float64)
    other[2] = torch.randn(4, dtype=torch.float64, requires_grad=True)   # one element more
    opt = fusedopt.LBFGS(other, max_iter=3, history_size=2)
    with pytest.raises(ValueError, match=r"'d' of shape \(39,\).*40 elements"):
        opt.load_state_dict(saved)
    assert not opt.state
    # each history vector is checked too
    saved["state"][0]["d"] = torch.zeros(40, dtype=torch.float64)
    saved["state"][0]["prev_flat_grad"] = torch.zeros(40, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'old_dirs\[0\]' of shape \(39,\)"):
        opt.load_state_dict(saved)
    assert not opt.state


def test_parameters_of_another_size_raise_before_anything_changes():
    """A parameter given data of another size between steps: the history is of the old
    size. torch's step fails on it (RuntimeError) after evaluating the closure and counting
    it; fusedopt raises RuntimeError before that."""
    make, loss_fn = PROBLEMS["least_squares"]
    runs = []
    for cls in (torch.optim.LBFGS, fusedopt.LBFGS):
        params = make(torch.float64)
        opt = cls(params, lr=0.05, max_iter=3)
        opt.step(closure_for(opt, params, loss_fn))
        with torch.no_grad():
            params[2].data = torch.zeros(5, dtype=torch.float64)   # unused by the loss: 3 -> 5 elements
        before = copy.deepcopy(opt.state_dict()["state"])
        runs.append((_error(lambda: opt.step(closure_for(opt, params, loss_fn))), before, opt.state_dict()["state"]))
    (theirs, *_), (ours, before, after) = runs
    assert theirs[0] is ours[0] is RuntimeError and "'d' has shape (39,)" in ours[1]
    for key, value in before[0].items():
        assert_same_value(key, after[0][key], value)


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_gradients_wider_than_their_parameters_as_torch(line_search_fn):
    """With `param.grad_dtype` a bf16 parameter's gradient is fp32: torch's flat gradient
    (a cat of the gradients) is then fp32, and so are d, the history and the steps taken.
    fusedopt's was in the parameters' dtype, rounding every gradient to bf16."""
    def make():
        g = torch.Generator().manual_seed(0)
        wide = torch.randn(6, generator=g).to(torch.bfloat16).requires_grad_()
        wide.grad_dtype = torch.float32
        plain = torch.randn(3, generator=g).to(torch.bfloat16).requires_grad_()
        return [wide, plain]

    def loss_fn(ps):
        return ((ps[0].float() - 1) ** 4).sum() + (ps[1].float() ** 2).sum()

    p_ref, p_new = make(), make()
    options = dict(lr=1 if line_search_fn else 0.05, max_iter=5, line_search_fn=line_search_fn)
    opt_ref, opt_new = torch.optim.LBFGS(p_ref, **options), fusedopt.LBFGS(p_new, **options)
    step_both(opt_ref, p_ref, opt_new, p_new, loss_fn, 3)
    assert opt_new.state[p_new[0]]["d"].dtype == torch.float32
