"""fusedopt.SparseAdam against torch.optim.SparseAdam, on every path.

Gradients are sparse COO, as ``nn.Embedding(sparse=True)`` makes them: uncoalesced, with
repeated indices on some steps, empty on one, missing for some parameters on others. The
parameters cover the work table's cases: short and long (chunked) rows, a 1-D parameter,
two sparse dimensions, rows that are not contiguous in memory (transposed, sliced), a
zero-size parameter, and a second dtype in the same group (a second bucket).

Moments must match torch bit for bit on every path. Parameters too on the reference path;
the kernel may differ by an ulp where torch's vectorised CPU sqrt is not correctly
rounded (see fusedopt/kernels/sparse_adam.py), so there they get the dtype's tolerance.
"""
import copy
import warnings

import pytest
import torch

import fusedopt
from _compare import assert_close, embeddings_one_reshaped
from fusedopt.kernels._launch import BLOCK, count_launches

BACKENDS = ["triton", "reference", "auto"]

# (name, shape, sparse_dim, layout)
SPECS = [
    ("embedding", (40, 8), 1, "contiguous"),
    ("long_rows", (5, BLOCK + 300), 1, "contiguous"),
    ("vector", (13,), 1, "contiguous"),
    ("two_sparse_dims", (6, 4, 5), 2, "contiguous"),
    ("rows_of_matrices", (6, 3, 4), 1, "contiguous"),
    ("transposed", (9, 6), 1, "transposed"),
    ("sliced", (8, 5), 1, "sliced"),
    ("zero_size", (0, 4), 1, "contiguous"),
]
# (step, parameter name): no gradient that step
MISSING = {(1, "embedding"), (2, "vector"), (2, "transposed"), (3, "long_rows"), (0, "other_dtype")}
EMPTY = {(3, "two_sparse_dims")}  # a gradient with no entries: the step counts, nothing moves

CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=True),
    dict(lr=torch.tensor(0.02)),
]
SECOND_GROUP = dict(lr=0.003, betas=(0.5, 0.99))


def _param(shape, layout, dtype, gen):
    if layout == "transposed":
        t = torch.randn(shape[::-1], generator=gen).to(dtype).t()
    elif layout == "sliced":
        t = torch.randn(shape[0], 2 * shape[1], generator=gen).to(dtype)[:, ::2]
    else:
        t = torch.randn(shape, generator=gen).to(dtype)
    return t


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    specs = SPECS + [("other_dtype", (10, 3), 1, "contiguous")]
    names, params, sparse_dims = [], [], []
    for name, shape, sparse_dim, layout in specs:
        d = dtype
        if name == "other_dtype":
            d = torch.float32 if dtype == torch.float64 else torch.float64
        names.append(name)
        params.append(_param(shape, layout, d, gen).requires_grad_())
        sparse_dims.append(sparse_dim)
    return names, params, sparse_dims


def clone(params):
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
        q.copy_(p.detach())
        out.append(q.requires_grad_())
    return out


def sparse_grad(p, sparse_dim, step, gen, empty=False):
    """An uncoalesced gradient; on even steps its indices repeat (a narrow index range)."""
    shape = p.shape
    nnz = 0 if empty or p.numel() == 0 else 7
    indices = []
    for d in range(sparse_dim):
        high = max(1, shape[d] // 2 if step % 2 == 0 else shape[d])
        indices.append(torch.randint(0, high, (nnz,), generator=gen))
    indices = torch.stack(indices) if indices else torch.zeros(0, nnz, dtype=torch.long)
    values = torch.randn(nnz, *shape[sparse_dim:], generator=gen).to(p.dtype)
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)


def two_groups(params, names):
    first = [p for p, n in zip(params, names) if n not in ("vector", "sliced")]
    second = [p for p, n in zip(params, names) if n in ("vector", "sliced")]
    return [dict(params=first), dict(params=second, **SECOND_GROUP)]


def set_grads(names, sparse_dims, params_a, params_b, step, seed):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    for name, k, a, b in zip(names, sparse_dims, params_a, params_b):
        if (step, name) in MISSING:
            a.grad = b.grad = None
            continue
        g = sparse_grad(a, k, step, gen, empty=(step, name) in EMPTY)
        a.grad, b.grad = g.clone(), g.clone()


def run(config, backend, dtype, steps=5, seed=0):
    names, p_ref, sparse_dims = make_params(dtype, seed)
    p_new = clone(p_ref)
    opt_ref = torch.optim.SparseAdam(two_groups(p_ref, names), **config)
    opt_new = fusedopt.SparseAdam(two_groups(p_new, names), backend=backend, **config)
    for step in range(steps):
        set_grads(names, sparse_dims, p_ref, p_new, step, seed)
        opt_ref.step()
        opt_new.step()
    return names, p_ref, opt_ref, p_new, opt_new


def assert_same(names, p_ref, opt_ref, p_new, opt_new, exact_params):
    for name, a, b in zip(names, p_ref, p_new):
        assert b.stride() == a.stride(), f"{name}: strides changed"
        if exact_params:
            assert torch.equal(b, a), f"param {name} differs: max {(b.double() - a.double()).abs().max().item()}"
        else:
            assert_close(f"param {name}", b, a)
    s_ref, s_new = opt_ref.state_dict(), opt_new.state_dict()
    assert s_new["param_groups"] == s_ref["param_groups"]
    assert sorted(s_new["state"]) == sorted(s_ref["state"]), "state covers different parameters"
    for k, ref in s_ref["state"].items():
        new = s_new["state"][k]
        assert list(new) == list(ref) == ["step", "exp_avg", "exp_avg_sq"]
        assert type(new["step"]) is int and new["step"] == ref["step"], f"param {k}: step {new['step']!r} != {ref['step']!r}"
        for key in ("exp_avg", "exp_avg_sq"):
            assert new[key].dtype == ref[key].dtype and new[key].stride() == ref[key].stride()
            assert torch.equal(new[key].nan_to_num(), ref[key].nan_to_num()), f"state {key} of param {k} differs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "maximize-betas-eps", "tensor-lr"])
def test_matches_torch_fp32(config, backend):
    result = run(config, backend, torch.float32)
    assert_same(*result, exact_params=backend != "triton")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_matches_torch_other_dtypes(dtype, backend):
    result = run(CONFIGS[1], backend, dtype, steps=4)
    assert_same(*result, exact_params=backend != "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_rows_narrower_than_a_block_step_as_torch_without_a_word(backend):
    """Triton's interpreter reported 0/0 in the masked lanes of fp16 rows (eps rounded per
    op to fp16 is 0, and a masked lane's second moment was 0) as a numpy RuntimeWarning at
    every step: noise to a suite that turns warnings into errors. Masked lanes now divide
    by nonzero and are still never stored."""
    gen = torch.Generator().manual_seed(0)
    theirs = torch.nn.Parameter(torch.randn(7, 3, generator=gen).half())
    ours = torch.nn.Parameter(theirs.detach().clone())
    ref, opt = torch.optim.SparseAdam([theirs], lr=0.05), fusedopt.SparseAdam([ours], lr=0.05, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            g = torch.sparse_coo_tensor(torch.tensor([[0, 2, 2, 5]]), torch.randn(4, 3, generator=gen).half(), (7, 3))
            theirs.grad, ours.grad = g.clone(), g.clone()
            ref.step()
            opt.step()
    assert_close("param", ours, theirs)


def test_a_parameter_not_aligned_to_its_element_size_is_refused_before_anything_changes():
    """SparseAdam's kernel addresses rows in elements from an anchor, as the dense kernels
    do, but it did not refuse a parameter a fraction of an element off (`torch.frombuffer(
    ..., offset=1)`): it wrote garbage into rows torch leaves alone, and past the tensor.
    The other paths step it as torch does."""
    def misaligned_rows():
        raw = bytearray(4 * 64 + 2)
        return torch.frombuffer(raw, dtype=torch.float32, offset=1, count=64).copy_(torch.arange(64.0)).view(16, 4)

    grad = torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.ones(2, 4), (16, 4))
    for backend in ("reference", "auto"):
        p, q = torch.nn.Parameter(misaligned_rows()), torch.nn.Parameter(torch.arange(64.0).view(16, 4))
        p.grad, q.grad = grad.clone(), grad.clone()
        fusedopt.SparseAdam([p], lr=0.5, backend=backend).step()
        torch.optim.SparseAdam([q], lr=0.5).step()
        assert torch.equal(p.detach(), q.detach()), backend
    p = torch.nn.Parameter(misaligned_rows())
    p.grad = grad.clone()
    before = bytes(p.untyped_storage())
    opt = fusedopt.SparseAdam([p], lr=0.5, backend="triton")
    with pytest.raises(RuntimeError, match=r"a parameter of shape \(16, 4\).*not a multiple of its element size"):
        opt.step()
    assert bytes(p.untyped_storage()) == before and not opt.state[p]


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_model(backend):
    """The intended use: nn.Embedding(sparse=True) inside a model, with a closure."""
    torch.manual_seed(0)
    ref = torch.nn.EmbeddingBag(30, 16, mode="sum", sparse=True)
    new = torch.nn.EmbeddingBag(30, 16, mode="sum", sparse=True)
    new.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.1)
    opt_new = fusedopt.SparseAdam(new.parameters(), lr=0.1, backend=backend)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        batch = torch.randint(0, 30, (6, 5), generator=gen)  # repeats within and across bags
        target = torch.randn(6, 16, generator=gen)
        losses = []
        for model, opt in ((ref, opt_ref), (new, opt_new)):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = (model(batch) - target).pow(2).mean()
                loss.backward()
                return loss
            losses.append(opt.step(closure))  # step returns the closure's loss
        assert torch.equal(losses[0], losses[1])
        if backend != "triton":
            assert torch.equal(opt_new.state[new.weight]["exp_avg"], opt_ref.state[ref.weight]["exp_avg"])
        else:
            # The kernel's sqrt is correctly rounded, torch's CPU one is not (module
            # docstring): a weight an ulp apart gives the next batch a gradient a few ulps
            # apart (measured 4e-6 relative on an AMD EPYC, where 17% of torch's fp32
            # square roots are an ulp off; exact on a Xeon, where 1 in 130 is).
            assert_close("exp_avg", opt_new.state[new.weight]["exp_avg"], opt_ref.state[ref.weight]["exp_avg"],
                         rtol=2e-5, atol=1e-9)
    assert_close("weight", new.weight, ref.weight)


def test_one_launch_per_bucket():
    names, params, sparse_dims = make_params(torch.float32)
    opt = fusedopt.SparseAdam(two_groups(params, names), backend="triton")
    _, shadow, _ = make_params(torch.float32)
    # Step 0: group 0 has a float32 and a float64 bucket (the float64 one without
    # gradients this step), group 1 one bucket: two launches.
    set_grads(names, sparse_dims, shadow, params, 0, 0)
    with count_launches() as launches:
        opt.step()
    assert launches == {"sparse_adam": 2}
    set_grads(names, sparse_dims, shadow, params, 1, 0)
    with count_launches() as launches:
        opt.step()
    assert launches == {"sparse_adam": 3}
    # Only empty gradients: the steps count, nothing is launched.
    before = [opt.state[p]["step"] for p in params]
    for k, p in zip(sparse_dims, params):
        p.grad = sparse_grad(p, k, 0, torch.Generator(), empty=True)
    with count_launches() as launches:
        opt.step()
    assert launches.total() == 0
    assert [opt.state[p]["step"] for p in params] == [s + 1 for s in before]


def test_reference_path_launches_nothing():
    names, params, sparse_dims = make_params(torch.float32)
    opt = fusedopt.SparseAdam(two_groups(params, names), backend="reference")
    set_grads(names, sparse_dims, clone(params), params, 1, 0)
    with count_launches() as launches:
        opt.step()
    assert launches.total() == 0


def _error(factory):
    try:
        factory()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.0), dict(lr=-1.0), dict(eps=0.0), dict(eps=-1e-8), dict(betas=(1.0, 0.9)),
    dict(betas=(0.9, -0.1)), dict(betas=(-0.5, 0.9)), dict(lr=torch.tensor([0.1, 0.2])),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_validation_errors_match_torch(kwargs):
    p = torch.randn(3, requires_grad=True)
    expected = _error(lambda: torch.optim.SparseAdam([p], **kwargs))
    assert expected is not None
    assert _error(lambda: fusedopt.SparseAdam([p], **kwargs)) == expected


@pytest.mark.parametrize("bad", ["sparse", "complex"])
def test_parameter_errors_match_torch(bad):
    def params():
        ok = torch.randn(3, requires_grad=True)
        if bad == "sparse":
            odd = torch.randn(4, 2).to_sparse().requires_grad_()
        else:
            odd = torch.randn(4, dtype=torch.complex64, requires_grad=True)
        return [dict(params=[ok]), dict(params=[ok.detach().clone().requires_grad_(), odd])]

    expected = _error(lambda: torch.optim.SparseAdam(params()))
    assert expected is not None and expected[0] is ValueError
    assert _error(lambda: fusedopt.SparseAdam(params())) == expected


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dense_gradient_raises_as_torch(backend):
    def attempt(cls, **kw):
        p = torch.randn(5, 3, requires_grad=True)
        p.grad = torch.randn(5, 3)
        return _error(lambda: cls([p], **kw).step())

    expected = attempt(torch.optim.SparseAdam)
    assert expected == (RuntimeError, "SparseAdam does not support dense gradients, please consider Adam instead")
    assert attempt(fusedopt.SparseAdam, backend=backend) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_left_from_before_a_change_of_shape_is_refused(backend):
    # `p.data = t` of fewer rows under a gradient of the old shape: torch's sparse_mask
    # raises RuntimeError. The kernel wrote rows 8 and 9 of a 5-row parameter (past its
    # end); the reference path raised IndexError after creating state and counting a step.
    for cls, extra in ((torch.optim.SparseAdam, {}), (fusedopt.SparseAdam, dict(backend=backend))):
        emb, other = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(4, 3, sparse=True)
        opt = cls([emb.weight, other.weight], lr=0.1, **extra)
        emb(torch.tensor([8, 9])).sum().backward()
        other(torch.tensor([1])).sum().backward()
        emb.weight.data = torch.zeros(5, 3)
        before = other.weight.detach().clone()
        with pytest.raises(RuntimeError, match=r"\[5, 3\]|\(5, 3\)"):
            opt.step()
        if cls is fusedopt.SparseAdam:
            assert torch.equal(emb.weight.detach(), torch.zeros(5, 3))
            assert torch.equal(other.weight.detach(), before) and not opt.state


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reshaped_parameter_keeps_its_old_state_until_it_is_stepped_as_torch(backend):
    # An embedding with state given more rows: torch keeps its moments in the old shape
    # and steps the other parameters while it has no gradient; a gradient for it makes
    # torch's sparse_mask raise. fusedopt raised at once, stepping none; now it steps as
    # torch does, and refuses the update before anything changes.
    results = []
    for cls, extra in ((torch.optim.SparseAdam, {}), (fusedopt.SparseAdam, dict(backend=backend))):
        emb, other, opt = embeddings_one_reshaped(cls, lr=0.1, **extra)
        results.append((other.weight.detach().clone(), copy.deepcopy(opt.state_dict()["state"])))
        emb(torch.tensor([11])).sum().backward()
        before = other.weight.detach().clone()
        with pytest.raises(RuntimeError):
            opt.step()
        if cls is fusedopt.SparseAdam:
            assert torch.equal(emb.weight.detach(), torch.ones(12, 3))
            assert torch.equal(other.weight.detach(), before)
            assert_close("exp_avg", opt.state[emb.weight]["exp_avg"], results[0][1][0]["exp_avg"])
    (theirs, their_state), (ours, our_state) = results
    assert_close("param", ours, theirs)
    for i in (0, 1):
        for key, value in their_state[i].items():
            assert_close(f"{key} of parameter {i}", torch.as_tensor(our_state[i][key]), torch.as_tensor(value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_is_an_in_place_write_to_autograd(backend):
    # torch's update is in place: a graph that saved the parameter before the step refuses
    # a backward after it. The kernel writes through pointers and bumped no version counter,
    # so that backward ran silently with the new values.
    for cls, extra in ((torch.optim.SparseAdam, {}), (fusedopt.SparseAdam, dict(backend=backend))):
        emb = torch.nn.Embedding(6, 3, sparse=True)
        opt = cls(emb.parameters(), lr=0.1, **extra)
        x = torch.randn(3, requires_grad=True)
        saves_weight = (emb.weight[0] * x).sum()
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saves_weight.backward()


@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_state_dict_round_trip(direction, backend):
    """Train 3 steps with one implementation, load into the other, train 2 more with both."""
    names, p_src, sparse_dims = make_params(torch.float32)
    config = dict(lr=0.02, betas=(0.85, 0.98))
    if direction == "fused_to_torch":
        make_src = lambda ps: fusedopt.SparseAdam(two_groups(ps, names), backend=backend, **config)  # noqa: E731
        make_dst = lambda ps: torch.optim.SparseAdam(two_groups(ps, names), **config)  # noqa: E731
    else:
        make_src = lambda ps: torch.optim.SparseAdam(two_groups(ps, names), **config)  # noqa: E731
        make_dst = lambda ps: fusedopt.SparseAdam(two_groups(ps, names), backend=backend, **config)  # noqa: E731
    opt_src = make_src(p_src)
    for step in range(3):
        set_grads(names, sparse_dims, clone(p_src), p_src, step, 0)
        opt_src.step()
    # torch's load_state_dict keeps tensors that need no cast: without a copy, the two
    # optimizers would go on updating the same moments.
    saved = copy.deepcopy(opt_src.state_dict())

    p_dst = clone(p_src)
    opt_dst = make_dst(p_dst)
    opt_dst.load_state_dict(saved)
    loaded = opt_dst.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for k, entry in saved["state"].items():
        assert list(loaded["state"][k]) == list(entry)
        assert loaded["state"][k]["step"] == entry["step"] and type(loaded["state"][k]["step"]) is int
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded["state"][k][key], entry[key])
            if direction == "torch_to_fused":
                assert loaded["state"][k][key] is not entry[key], "loading must copy into the flat buffers"

    for step in range(3, 5):
        set_grads(names, sparse_dims, p_src, p_dst, step, 0)
        opt_src.step()
        opt_dst.step()
    if direction == "fused_to_torch":
        assert_same(names, p_dst, opt_dst, p_src, opt_src, exact_params=backend != "triton")
    else:
        assert_same(names, p_src, opt_src, p_dst, opt_dst, exact_params=backend != "triton")


def test_state_is_a_view_of_the_flat_buffers():
    """Writes through opt.state[p] land where the kernel reads them."""
    names, params, sparse_dims = make_params(torch.float32)
    opt = fusedopt.SparseAdam(params, backend="triton")
    ref = torch.optim.SparseAdam(clone(params))
    ref_params = ref.param_groups[0]["params"]
    set_grads(names, sparse_dims, ref_params, params, 0, 0)
    opt.step()
    ref.step()
    for a, b in zip(ref_params, params):
        if b in opt.state:
            opt.state[b]["exp_avg"].fill_(0.25)
            ref.state[a]["exp_avg"].fill_(0.25)
    set_grads(names, sparse_dims, ref_params, params, 1, 0)
    opt.step()
    ref.step()
    for a, b in zip(ref_params, params):
        if a in ref.state:
            assert torch.equal(opt.state[b]["exp_avg"], ref.state[a]["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("views", ["overlapping rows", "expanded"])
def test_parameters_sharing_memory_are_refused_before_anything_changes(views, backend):
    """Every other optimizer refuses a step that would update two parameters sharing memory
    (or a parameter whose own elements do) before anything changes; SparseAdam stepped them.
    Its kernel updates a bucket's rows at once, where torch.optim updates one parameter
    after the other: the shared rows took one update (the same program order on the CPU, a
    race on a GPU), and an expanded parameter took each row's update into one row."""
    w = torch.randn(8, 5)
    if views == "overlapping rows":
        params = [torch.nn.Parameter(w[:6]), torch.nn.Parameter(w[3:])]
        match = "parameters 0 and 1 share memory"
    else:
        params = [torch.nn.Parameter(w[:1].expand(6, 5)), torch.nn.Parameter(w[1:])]
        match = r"parameter 0 has elements that share memory \(shape \(6, 5\), stride \(0, 1\)"
    opt = fusedopt.SparseAdam(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.ones(p.shape).to_sparse(1)
    before = w.clone()
    with pytest.raises(ValueError if views == "overlapping rows" else RuntimeError, match=match):
        opt.step()
    assert torch.equal(w, before)
    assert all(not opt.state[p] for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_given_other_memory_through_data_is_still_what_the_step_updates(backend):
    """`v.data = v.data.to(device)` on every state tensor (the `optimizer_to` helper): torch
    steps the same objects after it; so must the flat moments' views (`_reattach_state`)."""
    def run(lib, **extra):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = lib.SparseAdam(emb.parameters(), lr=0.1, **extra)
        for step in range(4):
            emb(torch.tensor([1, 2, step])).sum().backward()
            opt.step()
            opt.zero_grad()
            if step == 1:
                for entry in opt.state.values():
                    for value in entry.values():
                        if torch.is_tensor(value):
                            value.data = value.data.clone()
                opt.state[emb.weight]["exp_avg"].zero_()
        return emb.weight.detach(), opt.state_dict()["state"][0]
    theirs, ours = run(torch.optim), run(fusedopt, backend=backend)
    assert_close("weight", ours[0], theirs[0])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours[1][key], theirs[1][key]), key
