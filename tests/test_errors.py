"""Constructors: torch's signature and defaults, and torch's exception for every bad value."""
import inspect

import pytest
import torch

import fusedopt
from _compare import assert_close
from optim_db import OPTIMIZERS

ROWS = [pytest.param(info, id=info.name) for info in OPTIMIZERS]

# Bad values for every hyper-parameter any torch optimizer takes; each is tried where the
# torch class accepts the keyword, and fusedopt must do exactly what torch does.
BAD = [
    dict(lr=-1.0), dict(lr=-0.0), dict(lr=torch.tensor([0.1, 0.2])), dict(eps=-1e-8), dict(weight_decay=-0.1),
    dict(betas=(1.0, 0.999)), dict(betas=(0.9, 1.0)), dict(betas=(-0.1, 0.9)), dict(betas=(torch.tensor(0.9), 0.99)),
    dict(momentum=-0.5), dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1),
    dict(rho=1.5), dict(rho=-0.1), dict(lr_decay=-1.0), dict(initial_accumulator_value=-1.0),
    dict(alpha=-1.0), dict(lambd=-1.0), dict(t0=-1.0), dict(momentum_decay=-1.0),
    dict(etas=(1.5, 1.2)), dict(etas=(0.5, 0.9)), dict(step_sizes=(1e-6, 50)),
    dict(fused=True, foreach=True),
    # NaN: most torch classes test `not 0.0 <= x` (NaN fails), SGD tests `x < 0.0` (NaN passes)
    dict(lr=float("nan")), dict(eps=float("nan")), dict(weight_decay=float("nan")), dict(momentum=float("nan")),
]


FUSEDOPT_ONLY = {"master_weights": False, "state_dtype": None, "max_grad_norm": None,
                 "stochastic_rounding": False}


def accepted(cls):
    return set(inspect.signature(cls.__init__).parameters)


@pytest.mark.parametrize("info", ROWS)
def test_signature_and_defaults_equal_torch(info):
    theirs = inspect.signature(info.torch.__init__).parameters
    ours = dict(inspect.signature(info.fused.__init__).parameters)
    backend = ours.pop("backend")
    assert backend.default == "auto" and backend.kind is inspect.Parameter.KEYWORD_ONLY
    # fusedopt-only options (tests/test_extensions.py): keyword-only and off by default
    for name, off in FUSEDOPT_ONLY.items():
        if name in ours:
            extra = ours.pop(name)
            assert extra.default == off and extra.kind is inspect.Parameter.KEYWORD_ONLY, name
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


def bad_cases():
    """Each bad value with each optimizer whose torch class takes all its keywords."""
    return [pytest.param(info, bad, id=f"{info.name}-" + ",".join(f"{k}={v}" for k, v in bad.items()))
            for info in OPTIMIZERS for bad in BAD if set(bad) <= accepted(info.torch)]


@pytest.mark.parametrize("info,bad", bad_cases())
def test_bad_values_raise_what_torch_raises(info, bad):
    params = [torch.nn.Parameter(torch.randn(3))]
    try:
        info.torch(params, **bad)
        expected = None
    except Exception as exc:  # noqa: BLE001 - whatever torch raises is the spec
        expected = exc
    if expected is None:
        info.fused(params, **bad)  # torch accepts it: so must we
        return
    with pytest.raises(type(expected)) as got:
        info.fused(params, **bad)
    assert str(got.value) == str(expected)


@pytest.mark.parametrize("info", ROWS)
def test_empty_and_wrong_params_raise_what_torch_raises(info):
    for params, exc in (([], ValueError), (torch.randn(3), TypeError)):
        with pytest.raises(exc) as theirs:
            info.torch(params)
        with pytest.raises(exc) as ours:
            info.fused(params)
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("info", ROWS)
def test_a_lazy_modules_parameter_before_its_first_forward_is_taken_as_torch_takes_it(info):
    # torch's Adagrad creates its state in the constructor and raises the ValueError of a
    # torch function on an uninitialized parameter; the others take it and step it later.
    outcomes = []
    for cls in (info.torch, info.fused):
        try:
            cls(torch.nn.LazyLinear(3).parameters())
            outcomes.append(None)
        except Exception as e:   # noqa: BLE001 - the type and message are what is compared
            outcomes.append((type(e), str(e)))
    assert outcomes[1] == outcomes[0]
    assert (outcomes[0] is not None) == (info.name == "Adagrad")


@pytest.mark.parametrize("info", ROWS)
def test_differentiable_is_refused_clearly(info):
    assert "differentiable" in accepted(info.torch)
    with pytest.raises(RuntimeError, match="differentiable=True is not supported"):
        info.fused([torch.nn.Parameter(torch.randn(3))], differentiable=True)


@pytest.mark.parametrize("info", ROWS)
def test_a_parameter_listed_twice_in_a_group_is_refused(info):
    """torch deprecates it (and steps such a parameter once per listing, with one state); a
    fused step would step it once, so it is refused: at construction, by add_param_group
    (leaving the groups as they were), and at the step for a list edited afterwards."""
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        info.torch([p, q, p])
    with pytest.raises(ValueError, match="lists a parameter twice"):
        info.fused([p, q, p])
    opt = info.fused([p])
    with pytest.raises(ValueError, match="parameter group 1 lists a parameter twice"):
        opt.add_param_group({"params": iter([q, q])})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["params"].append(p)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="parameter group 0 lists a parameter twice"):
        opt.step(lambda: torch.tensor(0.0)) if info.closure else opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("info", ROWS)
@pytest.mark.parametrize("into", [0, 1], ids=["into-first", "into-second"])
def test_a_parameter_appended_to_a_second_group_is_refused_at_the_step(info, into):
    """torch refuses a parameter in two groups when the groups are made, but one appended
    to a group's list later it steps once per group, with one state; fusedopt stepped it
    with two states. Refused at the step, before anything changes; a parameter moved from
    one group to the other keeps its state."""
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        info.fused([{"params": [p]}, {"params": [q, p]}])
    opt = info.fused([{"params": [p]}, {"params": [q]}])
    step = (lambda: opt.step(lambda: torch.tensor(0.0))) if info.closure else opt.step
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    step()
    opt.param_groups[into]["params"].append(q if into == 0 else p)
    before = [p.detach().clone(), q.detach().clone()]
    with pytest.raises(ValueError, match="parameter groups 0 and 1 share a parameter"):
        step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    if not info.closure:   # (LBFGS takes one group)
        opt.param_groups[1 - into]["params"].pop()
        state = {k: v.clone() for k, v in opt.state[p].items()}
        step()
        assert opt.state[p].keys() == state.keys()


@pytest.mark.parametrize("info", ROWS)
@pytest.mark.parametrize("value", [None, "0.1", torch.tensor([0.1, 0.2])], ids=["None", "str", "2-element"])
def test_a_bad_value_in_a_later_group_raises_before_any_group_steps(info, value):
    """torch raises TypeError when it reaches the group, after stepping the ones before it;
    here nothing has changed when it raises."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    opt = info.fused([{"params": [params[0]]}, {"params": [params[1]]}])
    opt.param_groups[1]["lr"] = value
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}   # (Adagrad's exists already)
    with pytest.raises(TypeError):
        opt.step((lambda: torch.tensor(0.0)) if info.closure else None)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.state[params[0]].keys() == state.keys(), "the first group was stepped"
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())


@pytest.mark.parametrize("flag", ["amsgrad", "maximize"])
@pytest.mark.parametrize("value", [1, "yes"])
def test_truthy_flags_work_as_in_torch(flag, value):
    """torch tests flags for truth (`if amsgrad:`): an int from a config file works."""
    import fusedopt

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    ours, theirs = [p.detach().clone().requires_grad_() for p in params], params
    opt = fusedopt.Adam(ours, lr=0.1, **{flag: value})
    ref = torch.optim.Adam(theirs, lr=0.1, **{flag: value})
    for step in range(2):
        for a, b in zip(ours, theirs):
            a.grad = b.grad = torch.full_like(a, step + 1.0)
        opt.step()
        ref.step()
    assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))


FUSED_ROWS = [pytest.param(info, id=info.name) for info in OPTIMIZERS if "fused" in accepted(info.torch)]


def snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, before):
    params, state = before
    after = [p for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(after, params)), "a parameter changed"
    assert {id(p): s.keys() for p, s in opt.state.items()} == {k: s.keys() for k, s in state.items()}, "state created"
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) if isinstance(v, torch.Tensor) else v == state[id(p)][k], k


def _non_float(dtype):
    # an integer tensor cannot require grad: a plain tensor, given a gradient by hand
    return torch.randn(3, dtype=dtype) if dtype.is_complex else torch.arange(3, dtype=dtype)


@pytest.mark.parametrize("info", FUSED_ROWS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32])
@pytest.mark.parametrize("how", ["constructor", "added group"])
def test_fused_refuses_non_floating_params_at_the_step_as_torch(info, dtype, how):
    """torch's fused optimizers accept such a parameter at construction and raise
    RuntimeError when it is first stepped; fusedopt raises it there too, before anything
    changes (fusedopt's kernels would step a complex parameter: fused=False does). The
    odd parameter comes first: torch's SGD and Adagrad check only the first one stepped,
    and on a later one fail in the kernel instead (NotImplementedError)."""
    def build(cls):
        odd, real = _non_float(dtype), torch.nn.Parameter(torch.randn(4))
        if how == "constructor":
            return cls([odd, real], fused=True)
        opt = cls([real])
        opt.add_param_group({"params": [odd], "fused": True})
        return opt

    def grads(opt):
        for p in (p for g in opt.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        return opt

    theirs = grads(build(info.torch))
    with pytest.raises(RuntimeError) as expected:
        theirs.step()
    ours = grads(build(info.fused))
    before = snapshot(ours)
    with pytest.raises(RuntimeError, match=rf"fused=True\) requires floating-point parameters.*{dtype}") as got:
        ours.step()
    assert type(got.value) is type(expected.value)
    assert_unchanged(ours, before)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name in ("SGD", "Adam", "AdamW", "Adagrad")],
                         ids=lambda i: i.name)
def test_fused_with_differentiable_is_refused_in_torchs_words(info):
    """torch's own error inputs (common_optimizers) match this message."""
    words = "`fused` does not support `differentiable`"
    for cls in (info.torch, info.fused):
        with pytest.raises(RuntimeError, match=words):
            cls([torch.nn.Parameter(torch.randn(3))], fused=True, differentiable=True)


LATER_GROUP_REFUSALS = [
    dict(lr=torch.tensor(0.01), foreach=True),
    dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True),
    dict(fused=True, differentiable=True),
]


def later_group_cases():
    """Each combination with each optimizer whose torch class refuses it at the step."""
    return [pytest.param(info, options, how, id=f"{info.name}-{how}-" + ",".join(options))
            for info in OPTIMIZERS for options in LATER_GROUP_REFUSALS for how in ("added", "edited")
            if info.name in ("Adam", "AdamW") or (info.name == "Adagrad" and "fused" in options)]


@pytest.mark.parametrize("info,options,how", later_group_cases())
def test_options_a_constructor_refuses_are_refused_at_the_step_in_a_later_group(info, options, how):
    """torch's constructor refuses a tensor lr or betas with foreach=True (without
    capturable) and fused=True with differentiable=True; in a group added or edited
    later, its step raises the same for Adam, AdamW and Adagrad. fusedopt raises it there
    too, with torch's type, before any group has stepped."""
    def build(cls):
        params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
        if how == "added":
            opt = cls(params[:1])
            opt.add_param_group({"params": params[1:], **options})
        else:
            opt = cls([{"params": params[:1]}, {"params": params[1:]}])
            opt.param_groups[1].update(options)
        for p in params:
            p.grad = torch.ones_like(p)
        return opt

    with pytest.raises(Exception) as expected:  # noqa: PT011 - whatever torch raises is the spec
        build(info.torch).step()
    assert isinstance(expected.value, (RuntimeError, ValueError)), expected.value
    ours = build(info.fused)
    before = snapshot(ours)
    with pytest.raises(Exception) as got:  # noqa: PT011
        ours.step()
    assert type(got.value) is type(expected.value), got.value
    assert_unchanged(ours, before)


@pytest.mark.parametrize("info,options,how", later_group_cases())
def test_a_later_group_torch_would_refuse_steps_the_others_while_it_has_no_gradient(info, options, how):
    """The same groups with no gradient in the refused one: torch checks a group's options
    as it steps the group's parameters, so its step raises nothing and steps the other
    group. fusedopt checked every group, and raised (a tensor lr set on a frozen layer's
    group stopped the whole model's training)."""
    def build(cls, **extra):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))]
        if how == "added":
            opt = cls(params[:1], **extra)
            opt.add_param_group({"params": params[1:], **options})
        else:
            opt = cls([{"params": params[:1]}, {"params": params[1:]}], **extra)
            opt.param_groups[1].update(options)
        params[0].grad = torch.ones_like(params[0])
        return params, opt

    theirs, ref = build(info.torch)
    ref.step()
    ref.step()
    for backend in ("auto", "reference", "triton"):
        ours, opt = build(info.fused, backend=backend)
        opt.step()
        opt.step()
        assert_close("param", ours[0], theirs[0], rtol=info.rtol32)
        assert torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("how", ["added", "edited"])
@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if "differentiable" in i.fused([torch.zeros(1)]).defaults],
                         ids=lambda i: i.name)
def test_differentiable_in_a_later_group_is_refused_at_the_step(info, how):
    """differentiable=True is refused at construction (the update runs in a kernel, not
    under autograd); torch steps a group added or edited later with it differentiably, so
    stepping it here without a graph would be silently wrong: refused at the step, before
    any group has stepped."""
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
    if how == "added":
        opt = info.fused(params[:1])
        opt.add_param_group({"params": params[1:], "differentiable": True})
    else:
        opt = info.fused([{"params": params[:1]}, {"params": params[1:]}])
        opt.param_groups[1]["differentiable"] = True
    for p in params:
        p.grad = torch.ones_like(p)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="differentiable=True is not supported"):
        opt.step()
    assert_unchanged(opt, before)


NUMERIC_OPTIONS = ["eps", "weight_decay", "momentum", "dampening", "rho", "alpha", "lambd", "t0", "lr_decay",
                   "momentum_decay", "betas", "etas", "step_sizes"]
# A string torch's step does not read at the second step, so torch does not fail on it
# there; fusedopt refuses it anyway, before anything changes (it checks a group's options
# when they change, not when the math first uses them).
TORCH_IGNORES = {("RAdam", "eps"): "read only once the variance is tractable (step 6)",
                 ("SGD", "dampening"): "read only with momentum",
                 ("SGD", "momentum"): "its first step with momentum copies the gradient into the buffer"}
ROWS_WITH_SPARSE_ADAM = [(info.name, info.fused, info.torch) for info in OPTIMIZERS] + [
    ("SparseAdam", fusedopt.SparseAdam, torch.optim.SparseAdam)]


def string_option_cases():
    cases = []
    for name, ours, theirs in ROWS_WITH_SPARSE_ADAM:
        for key in NUMERIC_OPTIONS:
            if key in accepted(theirs) and (name, key) not in TORCH_IGNORES:
                cases.append(pytest.param(ours, theirs, key, id=f"{name}-{key}"))
    return cases


def stepped_then_set(cls, key, value, in_pair=True):
    """An optimizer of two groups stepped once, then the second group's `key` set to
    `value` (in the first place of a pair option, betas, etas, step_sizes, or in place of
    the pair with `in_pair=False`)."""
    sparse = cls in (torch.optim.SparseAdam, fusedopt.SparseAdam)
    params = [torch.nn.Parameter(torch.randn(4, 2)) for _ in range(2)]
    opt = cls([{"params": params[:1]}, {"params": params[1:]}])
    for p in params:
        p.grad = torch.ones(4, 2).to_sparse() if sparse else torch.ones_like(p)
    opt.step()
    default = opt.param_groups[1][key]
    opt.param_groups[1][key] = (value, default[1]) if isinstance(default, tuple) and in_pair else value
    return opt


@pytest.mark.parametrize("ours,theirs,key", string_option_cases())
def test_a_string_option_in_a_later_group_raises_what_torch_raises_before_any_group_steps(ours, theirs, key):
    """torch raises TypeError when its step reaches the group, after stepping the groups
    before it; fusedopt raises it before anything has changed."""
    with pytest.raises(TypeError):
        stepped_then_set(theirs, key, "x").step()
    opt = stepped_then_set(ours, key, "x")
    before = snapshot(opt)
    with pytest.raises(TypeError, match="'x'"):
        opt.step()
    assert_unchanged(opt, before)


# None where torch's step does not fail on it either (beside TORCH_IGNORES)
NONE_TORCH_STEPS_WITH = {("Rprop", "step_sizes"): "torch clamps by them, and clamp_ takes None for no bound",
                         ("Rprop", "lr"): "torch reads it at a parameter's first step only, to seed step_size"}


def none_option_cases():
    cases = []
    for name, ours, theirs in ROWS_WITH_SPARSE_ADAM:
        for key in ["lr"] + NUMERIC_OPTIONS:
            if key in accepted(theirs) and (name, key) not in TORCH_IGNORES.keys() | NONE_TORCH_STEPS_WITH.keys():
                cases.append(pytest.param(ours, theirs, key, True, id=f"{name}-{key}"))
                if key in ("betas", "etas", "step_sizes"):
                    cases.append(pytest.param(ours, theirs, key, False, id=f"{name}-{key}-whole"))
    return cases


@pytest.mark.parametrize("ours,theirs,key,in_pair", none_option_cases())
def test_an_option_set_to_none_later_raises_torch_s_exception_naming_it(ours, theirs, key, in_pair):
    """torch's arithmetic raises on it without naming the option (`float() argument must
    be ... not 'NoneType'` was fusedopt's); fusedopt raises the same type, before anything
    changes, naming the option and the value."""
    with pytest.raises(Exception) as theirs_raised:
        stepped_then_set(theirs, key, None, in_pair).step()
    opt = stepped_then_set(ours, key, None, in_pair)
    before = snapshot(opt)
    with pytest.raises(Exception) as ours_raised:
        opt.step()
    assert ours_raised.type is theirs_raised.type, f"{ours_raised.value!r}; torch: {theirs_raised.value!r}"
    message = str(ours_raised.value)
    assert key in message and "None" in message, message
    assert_unchanged(opt, before)


def rprop_side_by_side(backend, edit, steps=3, **options):
    """torch's Rprop and fusedopt's on the same two groups, `edit(opt)` applied to each
    after the first step, stepped `steps` times; returns (torch's, fusedopt's) parameters."""
    out = []
    for cls, kw in ((torch.optim.Rprop, {}), (fusedopt.Rprop, dict(backend=backend))):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]
        opt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 0.3}], **options, **kw)
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            if step == 0:
                edit(opt)
        out.append(params)
    return out


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("step_sizes", [(None, 0.05), (0.2, None)], ids=["no-min", "no-max"])
@pytest.mark.parametrize("when", ["constructor", "later"])
def test_rprop_step_sizes_of_none_leave_that_side_unbounded_as_torch(backend, step_sizes, when):
    """torch's Rprop clamps the step sizes with clamp_(min, max), which takes None for no
    bound; fusedopt refused None as not a number."""
    def edit(opt):
        if when == "later":
            opt.param_groups[1]["step_sizes"] = step_sizes
    theirs, ours = rprop_side_by_side(backend, edit, steps=6,
                                      **(dict(step_sizes=step_sizes) if when == "constructor" else {}))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(f"param {i}", a, b)


def test_rprop_step_sizes_of_two_nones_raise_what_torch_raises_before_anything_changes():
    for cls in (torch.optim.Rprop, fusedopt.Rprop):
        opt = stepped_then_set(cls, "step_sizes", (None, None), in_pair=False)
        before = snapshot(opt) if cls is fusedopt.Rprop else None
        with pytest.raises(RuntimeError, match="torch.clamp"):
            opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("lr", [None, "x", torch.tensor(0.5, requires_grad=True)], ids=["None", "str", "grad-tensor"])
def test_rprop_lr_is_read_only_at_a_parameter_s_first_step_as_torch(backend, lr):
    """torch's Rprop reads lr only to fill a parameter's first step sizes
    (`full_like(grad, lr)`): set to what full_like refuses after that, its steps go on,
    and a parameter stepped for the first time then raises TypeError. fusedopt refused
    the first; it raises the second before anything changes."""
    def edit(opt):
        opt.param_groups[1]["lr"] = lr
    theirs, ours = rprop_side_by_side(backend, edit)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(f"param {i}", a, b)
    for cls in (torch.optim.Rprop, fusedopt.Rprop):
        opt = stepped_then_set(cls, "lr", lr)
        late = torch.nn.Parameter(torch.randn(3))
        late.grad = torch.ones(3)
        opt.param_groups[1]["params"].append(late)
        if cls is fusedopt.Rprop:
            opt = cls(opt.param_groups, backend=backend)   # (a parameter is added to a group by a new optimizer)
            before = snapshot(opt)
        with pytest.raises(TypeError, match="fill_value" if cls is torch.optim.Rprop else "lr"):
            opt.step()
    assert_unchanged(opt, before)


# (algorithm, betas set in a group later, what torch's step raises, the beta named)
BETAS_TORCH_REFUSES = [("Adam", (1.0, 0.999), ZeroDivisionError, 0), ("AdamW", (1.0, 0.999), ZeroDivisionError, 0),
                       ("Adamax", (1.0, 0.999), ZeroDivisionError, 0), ("RAdam", (0.9, 1.0), ZeroDivisionError, 1),
                       ("Adam", (0.9, 1.5), RuntimeError, 1), ("AdamW", (0.9, 1.5), RuntimeError, 1)]


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("name,betas,error,which", BETAS_TORCH_REFUSES, ids=[f"{c[0]}-{c[1]}" for c in BETAS_TORCH_REFUSES])
@pytest.mark.parametrize("when", ["first step", "later step"])
def test_a_beta_set_later_that_torch_refuses_at_the_step_raises_before_anything_changes(
        name, betas, error, which, backend, when):
    """torch's constructor refuses betas outside [0, 1); set in a group afterwards, torch's
    step raises after stepping what came before: beta = 1 divides a Python float by zero
    (lr / (1 - beta1**step); RAdam's 2 / (1 - beta2)), and Adam's and AdamW's beta2 above 1
    makes the square root of 1 - beta2**step, a Python float, complex, which their update
    refuses with RuntimeError. fusedopt raises the same before anything changes; its 'auto'
    path (torch's fused kernel for Adam) wrote NaN into the parameters without a word, and
    its others raised a math domain ValueError for beta2 above 1."""
    def build(cls, **kw):
        params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
        opt = cls([{"params": params[:1]}, {"params": params[1:]}], **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        if when == "later step":
            opt.step()
        opt.param_groups[1]["betas"] = betas
        return opt

    with pytest.raises(error):
        build(getattr(torch.optim, name)).step()
    ours = build(getattr(fusedopt, name), backend=backend)
    before = snapshot(ours)
    with pytest.raises(error, match=rf"betas\[{which}\] is {betas[which]}"):
        ours.step()
    assert_unchanged(ours, before)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_negative_lr_decay_set_later_raises_where_torch_divides_by_zero(backend, sparse):
    """torch's constructor refuses lr_decay < 0; set in a group afterwards, torch's Adagrad
    divides lr by 1 + (step - 1) * lr_decay, 0 at the third step for -0.5, and raises
    ZeroDivisionError after counting the step. fusedopt raises the same before anything
    changes; its 'auto' path (torch's fused kernel) stepped on with an infinite lr, and
    NaN parameters, without a word. The steps before it are torch's."""
    def build(module, **kw):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, generator=gen))
        opt = module.Adagrad([torch.nn.Parameter(torch.randn(3, generator=gen)), p], lr=0.1, **kw)
        opt.param_groups[0]["lr_decay"] = -0.5
        return opt, p

    def grad(step):
        g = torch.randn(5, generator=torch.Generator().manual_seed(step))
        return g.to_sparse() if sparse else g

    (theirs, p_theirs), (ours, p_ours) = build(torch.optim), build(fusedopt, backend=backend)
    for step in (1, 2):
        for p in (p_theirs, p_ours):
            p.grad = grad(step)
        theirs.step()
        ours.step()
        assert_close(f"param after step {step}", p_ours.detach(), p_theirs.detach())
    p_theirs.grad, p_ours.grad = grad(3), grad(3)
    with pytest.raises(ZeroDivisionError):
        theirs.step()
    before = snapshot(ours)
    with pytest.raises(ZeroDivisionError, match=r"lr_decay is -0.5.*step 3 of parameter 1"):
        ours.step()
    assert_unchanged(ours, before)


BETAS_TORCH_STEPS_WITH = [("NAdam", (1.0, 0.999)), ("RAdam", (1.0, 0.999)), ("Adamax", (0.9, 1.5)),
                          ("RAdam", (0.9, 1.5)), ("NAdam", (0.9, 1.5)), ("Adam", (1.0, 0.999), dict(fused=True))]


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("case", BETAS_TORCH_STEPS_WITH, ids=lambda c: f"{c[0]}-{c[1]}" + ("-fused" if len(c) > 2 else ""))
def test_a_beta_set_later_that_torch_steps_with_is_stepped_as_torch(case, backend):
    """Other out-of-range betas torch's step takes without an error (NAdam and RAdam never
    divide by 1 - beta1**step in Python, Adamax never takes the square root of
    1 - beta2**step, nor RAdam before its rectification, torch's fused kernel computes on
    tensors): fusedopt raised ZeroDivisionError or a math domain ValueError there. NAdam's
    beta2 above 1 on 'auto' ran torch's multi-tensor code, which raises where the for-loop,
    torch.optim's default, steps."""
    name, betas, options = case[0], case[1], (case[2] if len(case) > 2 else {})
    results = []
    for cls, kw in ((getattr(torch.optim, name), {}), (getattr(fusedopt, name), dict(backend=backend))):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, generator=gen))
        opt = cls([p], lr=0.01, **options, **kw)
        opt.param_groups[0]["betas"] = betas
        for _ in range(3):
            p.grad = torch.randn(6, generator=gen)
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[1].isnan(), results[0].isnan())
    assert torch.allclose(results[1], results[0], rtol=1e-6, atol=1e-7, equal_nan=True)
