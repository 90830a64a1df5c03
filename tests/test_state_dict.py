"""state_dict: torch's exact format, interchangeable with torch both ways, validated on load."""
import copy
import io
import pickle

import pytest
import torch

import fusedopt
from _compare import assert_same_run, clone_params, gradients, groups, make_params
from optim_db import OPTIMIZERS

ROWS = [pytest.param(info, info.configs[-1], id=info.name) for info in OPTIMIZERS]


def train(params, opt, steps, start=0, closure=False):
    for step in range(start, start + steps):
        for p, g in zip(params, gradients(params, step)):
            p.grad = g
        opt.step((lambda: 0.0) if closure else None)


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("info,config", ROWS)
def test_format_equals_torch(info, config):
    p_ref = make_params()
    p_new = clone_params(p_ref)
    ref = info.torch(groups(p_ref, info, config), **config)
    new = info.fused(groups(p_new, info, config), **config)
    train(p_ref, ref, 3, closure=info.closure)
    train(p_new, new, 3, closure=info.closure)
    a, b = ref.state_dict(), new.state_dict()
    assert b["param_groups"] == a["param_groups"]
    assert sorted(b["state"]) == sorted(a["state"])
    for k in a["state"]:
        assert list(b["state"][k]) == list(a["state"][k])
        for key, value in a["state"][k].items():
            got = b["state"][k][key]
            assert type(got) is type(value), key
            if isinstance(value, torch.Tensor):
                assert (got.dtype, got.device, got.shape) == (value.dtype, value.device, value.shape), key


@pytest.mark.parametrize("info,config", ROWS + [pytest.param(None, {}, id="SparseAdam")])
def test_state_is_listed_in_parameter_order_across_dtypes(info, config):
    """torch creates a parameter's state as its step walks group["params"], so opt.state and
    state_dict()["state"] list parameters in that order; fusedopt's buckets (one per dtype)
    used to create it bucket by bucket (fp32 ones first, then fp64, ...)."""
    fused, theirs = (info.fused, info.torch) if info else (fusedopt.SparseAdam, torch.optim.SparseAdam)
    order = []
    for cls in (theirs, fused):
        gen = torch.Generator().manual_seed(0)
        dtypes = (torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float64, torch.float32)
        params = [torch.randn(3, generator=gen).to(dt).requires_grad_() for dt in dtypes]
        # two groups, each mixing dtypes; the first parameter gets its first gradient later
        opt = cls([{"params": params[:4]}, {"params": params[4:]}], **config)
        for step in range(2):
            for i, p in enumerate(params):
                p.grad = None if step == 0 and i == 0 else torch.full_like(p, 0.5 + i)
                if info is None and p.grad is not None:
                    p.grad = p.grad.to_sparse()
            opt.step((lambda: 0.0) if info and info.closure else None)
        position = {id(p): i for i, p in enumerate(params)}
        order.append((list(opt.state_dict()["state"]), [position[id(p)] for p in opt.state]))
    assert order[1] == order[0]


def test_param_names_from_named_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ref = torch.optim.AdamW(model.named_parameters())
    new = fusedopt.AdamW(model.named_parameters())
    assert new.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    assert new.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("direction", ["torch->fusedopt", "fusedopt->torch"])
@pytest.mark.parametrize("info,config", ROWS)
def test_checkpoints_move_both_ways_and_training_continues_identically(info, config, direction):
    p_src = make_params()
    src_cls, dst_cls = (info.torch, info.fused) if direction == "torch->fusedopt" else (info.fused, info.torch)
    src = src_cls(groups(p_src, info, config), **config)
    train(p_src, src, 3, closure=info.closure)
    saved = roundtrip(src.state_dict())

    # Continue in the source optimizer, and in a fresh destination loaded from the checkpoint.
    p_dst = clone_params(p_src)
    dst = dst_cls(groups(p_dst, info, config), **config)
    dst.load_state_dict(saved)
    train(p_src, src, 3, start=3, closure=info.closure)
    train(p_dst, dst, 3, start=3, closure=info.closure)
    if direction == "torch->fusedopt":
        assert_same_run(p_src, src, p_dst, dst, rtol=info.rtol32)
    else:
        assert_same_run(p_dst, dst, p_src, src, rtol=info.rtol32)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("info,config", ROWS)
def test_loaded_state_takes_torchs_dtypes(info, config, dtype, backend):
    """torch casts loaded state (but `step`) to the parameter's dtype: NAdam's mu_product and
    ASGD's eta and mu, float32 when created, are float64 for fp64 parameters after a load,
    bf16 for bf16 ones, and stay so. (The bf16 numbers are compared by the parity tests.)
    ASGD's later etas and mus are still rounded to float32 first (torch stores
    `torch.as_tensor(new_eta)`), on every path."""
    p_src = make_params(dtype)
    src = info.torch(groups(p_src, info, config), **config)
    train(p_src, src, 2, closure=info.closure)
    saved = roundtrip(src.state_dict())
    p_ref, p_new = clone_params(p_src), clone_params(p_src)
    ref = info.torch(groups(p_ref, info, config), **config)
    new = info.fused(groups(p_new, info, config), backend=backend, **config)
    ref.load_state_dict(saved)
    new.load_state_dict(saved)
    for when in ("loaded", "stepped"):
        a, b = ref.state_dict()["state"], new.state_dict()["state"]
        for k in a:
            for key, value in a[k].items():
                if isinstance(value, torch.Tensor):
                    assert b[k][key].dtype == value.dtype, (when, k, key)
        train(p_ref, ref, 1, start=2, closure=info.closure)
        train(p_new, new, 1, start=2, closure=info.closure)
    if dtype == torch.float64:
        assert_same_run(p_ref, ref, p_new, new, rtol=1e-12)


def test_loads_with_weights_only():
    p = make_params()
    opt = fusedopt.Adam(p, lr=torch.tensor(0.01))
    train(p, opt, 2)
    loaded = roundtrip(opt.state_dict())
    assert loaded["param_groups"][0]["lr"] == torch.tensor(0.01)
    assert float(loaded["state"][1]["step"]) == 2.0


# ---------------------------------------------------------------------------- validation

def snapshot(params, opt):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


def assert_unchanged(before, params, opt):
    sd, values = before
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert sorted(now["state"]) == sorted(sd["state"])
    for k, entry in sd["state"].items():
        for key, value in entry.items():
            assert torch.equal(now["state"][k][key], value), f"state {key} of param {k} changed"
    assert all(torch.equal(p, v) for p, v in zip(params, values))


def bad_state_dicts(good):
    wrong_groups = copy.deepcopy(good)
    wrong_groups["param_groups"].append(copy.deepcopy(wrong_groups["param_groups"][0]))
    wrong_count = copy.deepcopy(good)
    wrong_count["param_groups"][0]["params"] = wrong_count["param_groups"][0]["params"][:-1]
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][2]["exp_avg"] = torch.zeros(5)
    wrong_shape_late = copy.deepcopy(good)  # the bad entry comes after good ones
    wrong_shape_late["state"][6]["exp_avg_sq"] = torch.zeros(2, 2)
    transposed = copy.deepcopy(good)  # as many elements, another shape: the layout would be wrong
    transposed["state"][5]["exp_avg"] = torch.zeros(17, 13)
    not_a_dict = copy.deepcopy(good)
    not_a_dict["state"][3] = 1.0
    wrong_step = copy.deepcopy(good)
    wrong_step["state"][1]["step"] = torch.zeros(3)
    return {
        "groups": (wrong_groups, "different number of parameter groups"),
        "count": (wrong_count, "doesn't match the size of optimizer's group"),
        "shape": (wrong_shape, r"state 'exp_avg' of shape \(5,\) for parameter 2, whose shape is \(7,\)"),
        "late-shape": (wrong_shape_late, r"state 'exp_avg_sq' of shape \(2, 2\) for parameter 6"),
        "transposed": (transposed, r"state 'exp_avg' of shape \(17, 13\) for parameter 5, whose shape is \(13, 17\)"),
        "not-a-dict": (not_a_dict, "expected a dict"),
        "step": (wrong_step, "'step' of 3 elements"),
    }


@pytest.mark.parametrize("case", ["groups", "count", "shape", "late-shape", "transposed", "not-a-dict", "step"])
def test_a_state_dict_that_does_not_fit_is_rejected_before_anything_changes(case):
    params = make_params()
    opt = fusedopt.Adam(params, lr=0.01)
    train(params, opt, 2)
    good = copy.deepcopy(opt.state_dict())
    other = make_params(seed=3)
    donor = fusedopt.Adam(other, lr=0.5)
    train(other, donor, 4)
    bad, message = bad_state_dicts(copy.deepcopy(donor.state_dict()))[case]
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert_unchanged(before, params, opt)
    # ... and the optimizer still steps as if nothing happened.
    twin = fusedopt.Adam(clone_params(params), lr=0.01)
    twin.load_state_dict(good)
    train(params, opt, 1, start=2)
    train(twin.param_groups[0]["params"], twin, 1, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, twin.param_groups[0]["params"]))


@pytest.mark.parametrize("cls,options,key,value,error,message", [
    ("Adam", {}, "step", None, KeyError, "no 'step' in the state of parameter 1"),
    ("Adam", {}, "exp_avg", None, KeyError, "no 'exp_avg'"),
    ("Adam", dict(amsgrad=True), "max_exp_avg_sq", None, KeyError, "no 'max_exp_avg_sq'"),
    ("NAdam", {}, "mu_product", None, KeyError, "no 'mu_product'"),
    ("ASGD", {}, "eta", None, KeyError, "no 'eta'"),
    ("Adam", {}, "step", "3", ValueError, "'step' = '3' for parameter 1"),
    # torch loads these and fails at the step; laying them out reads them as numbers,
    # which once happened after the groups and the entry had been replaced
    ("Adam", {}, "step", torch.tensor(3 + 0j), RuntimeError, "'step' of dtype torch.complex64"),
    ("Adadelta", {}, "step", torch.tensor(3.0, device="meta"), RuntimeError, "'step' of dtype torch.float32 on meta"),
    ("ASGD", {}, "eta", torch.tensor(True), RuntimeError, "'eta' of dtype torch.bool"),
])
def test_state_a_step_needs_missing_is_rejected_at_load(cls, options, key, value, error, message):
    """torch refuses a missing `step` (NAdam's `mu_product`, ASGD's `eta`) at load and any
    other missing kind at the step; fusedopt refuses all at load, before anything changes."""
    params = make_params()
    opt = getattr(fusedopt, cls)(params, lr=0.01, **options)
    train(params, opt, 2)
    bad = copy.deepcopy(opt.state_dict())
    if value is None:
        del bad["state"][1][key]
    else:
        bad["state"][1][key] = value
    bad["param_groups"][0]["lr"] = 999.0
    before = snapshot(params, opt)
    with pytest.raises(error, match=message):
        opt.load_state_dict(bad)
    assert_unchanged(before, params, opt)
    assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("name", ["Adam", "NAdam", "ASGD"])
def test_scalar_state_saved_as_numpy_numbers_loads_as_torchs(name):
    """torch takes any real number for a scalar kind (numpy's float32 is not a Python
    float); fusedopt refused it, and would have kept it out of the step-count vector."""
    np = pytest.importorskip("numpy")
    params = make_params()
    opt = getattr(fusedopt, name)(params, lr=0.01)
    train(params, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        for key, value in entry.items():
            if key in ("step", "mu_product", "eta", "mu"):
                entry[key] = np.float32(value.item())
    ours = clone_params(params)
    mine = getattr(fusedopt, name)(ours, lr=0.01)
    mine.load_state_dict(saved)
    torch_params = clone_params(params)
    getattr(torch.optim, name)(torch_params, lr=0.01).load_state_dict(saved)   # (torch takes it too)
    # ... and steps on from the saved counts, as the optimizer that saved them does
    train(ours, mine, 2, start=2)
    train(params, opt, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(ours, params))


# ---------------------------------------------------------------------------- copies

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_continue_identically(how):
    params = make_params()
    opt = fusedopt.Adam(params, lr=0.01, amsgrad=True)
    train(params, opt, 2)
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2.param_groups[0]["params"][0] is params2[0]
    train(params, opt, 2, start=2)
    train(params2, opt2, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    # The copy's state is its own, not views of the original's buffers.
    assert opt2.state[params2[1]]["exp_avg"].data_ptr() != opt.state[params[1]]["exp_avg"].data_ptr()


def test_state_dict_pickles():
    params = make_params()
    opt = fusedopt.SGD(params, lr=0.1, momentum=0.9)
    train(params, opt, 2)
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    fresh = fusedopt.SGD(clone_params(params), lr=0.1, momentum=0.9)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.state_dict()["state"][2]["momentum_buffer"], opt.state_dict()["state"][2]["momentum_buffer"])


@pytest.mark.parametrize("saved", [
    # an entry of opt.state pickled while its class lived in fusedopt/optimizer.py, by its
    # __reduce__ and, before it had one, by its class
    b"\x80\x02cfusedopt.optimizer\n_rebuild_param_state\nq\x00}q\x01X\x04\x00\x00\x00stepq\x02G@\x08\x00\x00\x00"
    b"\x00\x00\x00sK\x01\x86q\x03Rq\x04.",
    b"\x80\x02cfusedopt.optimizer\n_ParamState\nq\x00)\x81q\x01X\x04\x00\x00\x00stepq\x02G@\x08\x00\x00\x00\x00\x00"
    b"\x00s}q\x03X\n\x00\x00\x00sparse_dimq\x04K\x01sb.",
], ids=["reduce", "class"])
def test_state_entries_pickled_by_older_versions_load(saved):
    entry = pickle.loads(saved)
    assert entry == {"step": 3.0} and entry.sparse_dim == 1


# ---------------------------------------------------------------------------- hooks

def test_the_six_hooks_run_as_torch_runs_them():
    params = make_params()
    opt = fusedopt.Adam(params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = dict(sd)
        sd.pop("extra", None)
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train(params, opt, 1)
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_global_step_hooks_run_too():
    seen = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(type(o).__name__))
    try:
        params = make_params()
        train(params, fusedopt.SGD(params), 1)
    finally:
        handle.remove()
    assert seen == ["SGD"]


def _hook_protocol(cls):
    """What torch's step wrapper does with hooks: pre-hooks (global first) may replace the
    arguments, post-hooks (per optimizer first) see the replaced ones, and a pre-hook that
    returns anything else is refused."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = [torch.nn.Parameter(torch.full((3, 2), 0.5)) for _ in range(2)]
    opt = cls(params, lr=0.1)
    seen = []

    def closure():
        seen.append("closure")
        return torch.tensor(1.0)

    def replace(o, args, kwargs):
        seen.append(("pre", len(args), dict(kwargs)))
        return args, {"closure": closure}

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global post", sorted(k))))]
    try:
        opt.register_step_pre_hook(replace)
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", sorted(k))))
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.register_step_pre_hook(lambda o, a, k: "not a pair")
        with pytest.raises(RuntimeError, match="must return None or a tuple") as info:
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return seen, str(info.value).split(" must")[1]


@pytest.mark.parametrize("name", ["SGD", "AdamW", "LBFGS"])
def test_step_hooks_follow_torchs_protocol(name):
    assert _hook_protocol(getattr(fusedopt, name)) == _hook_protocol(getattr(torch.optim, name))


def test_step_is_one_profiler_range_named_as_torchs():
    """Profiles show fusedopt's step where torch's would be: Optimizer.step#<class>.step."""
    params = make_params()
    opt = fusedopt.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    with torch.profiler.profile() as prof:
        opt.step()
        opt.step()
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#AdamW.step") == 2


@pytest.mark.parametrize("info,config", ROWS)
def test_old_checkpoints_without_optional_group_keys_load_as_in_torch(info, config):
    """torch's __setstate__ fills in keys older checkpoints lack (maximize, foreach, ...)."""
    p_ref, p_new = make_params(), make_params()
    ref = info.torch(groups(p_ref, info, config), **config)
    new = info.fused(groups(p_new, info, config), **config)
    sd = ref.state_dict()
    required = {"params", "lr", "param_names"} | {k for k in info.torch.__init__.__code__.co_varnames
                                                  if k in ("betas", "momentum", "rho", "alpha", "etas")}
    for group in sd["param_groups"]:
        for key in [k for k in group if k not in required]:
            del group[key]
    ref.load_state_dict(copy.deepcopy(sd))
    new.load_state_dict(copy.deepcopy(sd))
    assert new.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


@pytest.mark.skipif(not hasattr(torch.optim, "swap_in_optimizer_params_and_state"),
                    reason="torch without swap_in_optimizer_params_and_state")
@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("name,options", [("Adam", dict(lr=0.01)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                          ("RMSprop", dict(lr=0.01, centered=True))])
def test_swap_in_optimizer_params_and_state_steps_the_given_state_in_place(name, options, backend):
    """torch's `swap_in_optimizer_params_and_state` puts a state_dict's state in place of the
    optimizer's for a step on other parameters, and promises that in-place tensor edits
    propagate back to that state_dict. fusedopt adopted the state into its flat buffers
    and never wrote it back: the step moved the parameters, and the given state stayed
    where it was (repeated swapped-in steps silently lost their moments and counts)."""
    swap = torch.optim.swap_in_optimizer_params_and_state
    results = []
    for cls, kwargs in ((getattr(torch.optim, name), {}), (getattr(fusedopt, name), dict(backend=backend))):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        opt = cls(model.parameters(), **options, **kwargs)
        for step in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            opt.step()
        live = copy.deepcopy(opt.state_dict())
        given = copy.deepcopy(opt.state_dict())
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(2):
            for j, p in enumerate(params.values()):
                p.grad = torch.full_like(p, 0.5 * (j + 1))
            with swap(opt, params, given):
                opt.step()
        results.append((params, given))
        for key, entry in opt.state_dict()["state"].items():   # the live state is untouched
            for k, v in entry.items():
                torch.testing.assert_close(v, live["state"][key][k], rtol=0, atol=0)
    (ref_params, ref_given), (new_params, new_given) = results
    for n in ref_params:
        torch.testing.assert_close(new_params[n], ref_params[n])
    assert list(new_given["state"]) == list(ref_given["state"])
    for key, entry in ref_given["state"].items():
        for k, v in entry.items():
            torch.testing.assert_close(new_given["state"][key][k], v, msg=f"state {key} {k}")


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_a_loaded_checkpoint_kept_by_the_caller_is_copied_in_not_written_every_step(backend):
    """`ckpt = torch.load(...)` stays in scope for a whole run. Its tensors were adopted like
    a dict put in place of `opt.state` and written back after every step while the caller
    held them: an Adam step then took twice its time on a CPU. Loading copies the values in;
    the steps are torch's, and the checkpoint stays as it was loaded."""
    torch.manual_seed(0)
    start = [torch.randn(6, 4), torch.randn(4)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    source = torch.optim.Adam([torch.nn.Parameter(t.clone()) for t in start], lr=0.1)
    for p, g in zip(source.param_groups[0]["params"], grads[0]):
        p.grad = g
    source.step()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    runs = []
    for cls, kwargs in ((torch.optim.Adam, {}), (fusedopt.Adam, dict(backend=backend))):
        buffer.seek(0)
        ckpt = torch.load(buffer, weights_only=True)
        kept = copy.deepcopy(ckpt)
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = cls(params, lr=0.1, **kwargs)
        opt.load_state_dict(ckpt)
        for step_grads in grads[1:]:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
        if cls is fusedopt.Adam:
            for key, entry in kept["state"].items():
                for k, v in entry.items():
                    torch.testing.assert_close(ckpt["state"][key][k], v, rtol=0, atol=0, msg=f"{key} {k}")
    (ref_params, ref), (new_params, new) = runs
    assert_same_run(ref_params, ref, new_params, new)


def test_param_groups_loaded_from_a_tuple_are_a_list_as_torchs():
    """A checkpoint whose `param_groups` became a tuple (a round trip through a format
    without lists) loads in torch as a list; kept a tuple, `add_param_group` failed after."""
    for cls in (torch.optim.Adam, fusedopt.Adam):
        params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
        source = cls(params[:2], lr=0.1)
        sd = source.state_dict()
        sd["param_groups"] = tuple(sd["param_groups"])
        opt = cls(params[:2], lr=0.1)
        opt.load_state_dict(sd)
        assert type(opt.param_groups) is list
        opt.add_param_group({"params": [params[2]]})
        assert len(opt.param_groups) == 2


def test_loading_checks_each_bucket_once_not_once_per_parameter(monkeypatch):
    """Every parameter's adoption looks its bucket up; checking the bucket's parameters at
    each lookup made a load quadratic in the parameter count (1600 tensors: 1.5 s)."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(50)] + \
             [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(50)]
    opt = fusedopt.AdamW(params, lr=0.01)
    train(params, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    calls = []
    real = fusedopt._flat.Bucket.check_params
    monkeypatch.setattr(fusedopt._flat.Bucket, "check_params", lambda self: calls.append(self) or real(self))
    opt.load_state_dict(saved)
    assert len(calls) <= 2 * 2   # two buckets (fp32, fp64); at most twice each
    twin = fusedopt.AdamW(clone_params(params), lr=0.01)
    twin.load_state_dict(saved)
    train(params, opt, 1, start=1)
    train(twin.param_groups[0]["params"], twin, 1, start=1)
    assert all(torch.equal(a, b) for a, b in zip(params, twin.param_groups[0]["params"]))
