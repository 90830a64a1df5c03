"""fusedopt-only options beyond torch.optim: fp32 master weights and low-precision state.

Each mode is compared with a float64 run in plain torch of what the mode promises (master
weights: the fp32 trajectory; bf16 state: Adam whose moments are rounded to bf16 after
every step), on the kernel (Triton's interpreter), on the reference path and on 'auto',
which on a CPU is the native path's composition around torch's fused kernel
(`fusedopt/_composed.py`), also compared with the reference step by step.
"""
import copy
import io
import pickle
import re
import warnings

import pytest
import torch

import fusedopt
from _compare import assert_close, gradients, make_params
from fusedopt import _composed
from fusedopt.kernels._launch import BLOCK
from optim_db import SHAPES

PATHS = ["triton", "reference"]
ALL_PATHS = PATHS + ["auto"]
ADAMS = [pytest.param(fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1), id="Adam-l2"),
         pytest.param(fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2), id="AdamW"),
         pytest.param(fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True),
                      id="AdamW-amsgrad-maximize"),
         # the variants that share Adam's kernel take the same keywords
         pytest.param(fusedopt.NAdam, torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.1), id="NAdam-l2"),
         pytest.param(fusedopt.RAdam, torch.optim.RAdam, dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1),
                      id="RAdamW"),
         pytest.param(fusedopt.Adamax, torch.optim.Adamax, dict(lr=1e-2, maximize=True), id="Adamax-maximize")]
SHAPES_REAL = [s for s in SHAPES if s != "channels_last"] + ["channels_last"]
# (step, parameter) pairs that get no gradient that step
MISSING = {(1, 2), (3, 4)}
BLOCK_PLUS = BLOCK + 1


def _grads(params, step):
    """Gradients of the parameters' dtype, the same for every run of a test."""
    return gradients(params, step)


def _run(opt, params, steps, twins=()):
    """Step `opt` on `params` and each (torch optimizer, its params) twin with the same
    gradients, given to the twins as exact float64/float32 copies."""
    for step in range(steps):
        grads = _grads(params, step)
        for j, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (step, j) in MISSING else g.clone()
            for _, twin in twins:
                twin[j].grad = None if (step, j) in MISSING else g.to(twin[j].dtype)
        opt.step()
        for ref, _ in twins:
            ref.step()


# ------------------------------------------------------------------------ master weights

@pytest.mark.parametrize("backend", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused_cls,torch_cls,options", ADAMS)
def test_master_weights_follow_the_fp32_trajectory(fused_cls, torch_cls, options, dtype, backend):
    params = make_params(dtype, shapes=SHAPES_REAL)
    exact = [p.detach().double().requires_grad_() for p in params]
    opt = fused_cls(params, backend=backend, master_weights=True, **options)
    ref = torch_cls(exact, **options)
    _run(opt, params, 5, [(ref, exact)])
    for j, (p, e) in enumerate(zip(params, exact)):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and master.shape == p.shape
        # fp32 math against float64 math on the same (low-precision) gradients
        assert_close(f"master {j}", master.double(), e.detach(), rtol=1e-5, atol=1e-6)
        # the parameter is the master copy rounded to nearest
        assert torch.equal(p.detach(), master.to(dtype)), f"param {j} is not its master copy rounded"
        for key in [k for k in opt.state[p] if k not in ("step", "master_param", "mu_product")]:
            assert opt.state[p][key].dtype == torch.float32
            assert_close(f"{key} {j}", opt.state[p][key].double(), ref.state[e][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused_cls,torch_cls,options", ADAMS)
def test_master_weights_kernel_equals_reference(fused_cls, torch_cls, options):
    runs = []
    for backend in PATHS:
        params = make_params(torch.bfloat16, shapes=SHAPES_REAL)
        opt = fused_cls(params, backend=backend, master_weights=True, state_dtype=torch.bfloat16, **options)
        _run(opt, params, 4)
        runs.append((params, opt))
    (p_k, o_k), (p_r, o_r) = runs
    for j, (a, b) in enumerate(zip(p_k, p_r)):
        assert torch.equal(a, b), f"param {j}"
        for key, value in o_r.state[b].items():
            assert_close(f"{key} {j}", o_k.state[a][key], value, rtol=1e-6, atol=1e-7)
        assert o_k.state[a]["exp_avg"].dtype == torch.bfloat16


def test_plain_bf16_loses_what_master_weights_keep():
    """Updates below half a bf16 ulp vanish from a bf16 parameter; the master copy keeps them."""
    plain = torch.full((64,), 1.0, dtype=torch.bfloat16, requires_grad=True)
    mastered = plain.detach().clone().requires_grad_()
    opts = [fusedopt.Adam([plain], lr=1e-4, backend="reference"),
            fusedopt.Adam([mastered], lr=1e-4, backend="reference", master_weights=True)]
    for _ in range(100):
        for p, opt in zip((plain, mastered), opts):
            p.grad = torch.ones_like(p)
            opt.step()
    assert torch.all(plain == 1.0)                       # Adam's 1e-4 steps round away
    master = opts[1].state[mastered]["master_param"]
    assert_close("master", master.double(), torch.full((64,), 1.0 - 100e-4, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert torch.equal(mastered.detach(), master.bfloat16()) and torch.all(mastered < 1.0)


def _assert_same_continuation(opt, params, other, twins, steps=2):
    """Both optimizers step on, and every parameter and state entry stays bit-equal."""
    _run(opt, params, steps)
    _run(other, twins, steps)
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert value.dtype == other.state[b][key].dtype and torch.equal(value, other.state[b][key]), key


@pytest.mark.parametrize("backend", PATHS + ["auto"])
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.NAdam], ids=["AdamW", "NAdam"])
def test_master_copy_survives_state_dict_without_loss(backend, cls):
    """Also NAdam's fp32 mu_product, which torch's load policy would round to bf16."""
    params = make_params(torch.bfloat16, shapes=[(5, 7), (BLOCK_PLUS,)])
    opt = cls(params, lr=1e-3, backend=backend, master_weights=True)
    _run(opt, params, 2)
    saved = opt.state_dict()
    masters = [saved["state"][j]["master_param"] for j in range(len(params))]
    assert all(m.dtype == torch.float32 for m in masters)
    assert all(not torch.equal(m, m.bfloat16().float()) for m in masters), "the test needs masters off the bf16 grid"
    # through torch.save, into a fresh optimizer over copies of the parameters
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    loaded_sd = torch.load(buf)
    twins = [p.detach().clone().requires_grad_() for p in params]
    other = cls(twins, lr=1e-3, backend=backend, master_weights=True)
    other.load_state_dict(loaded_sd)
    for j, (t, m) in enumerate(zip(twins, masters)):
        got = other.state[t]["master_param"]
        assert got.dtype == torch.float32 and torch.equal(got, m), f"master {j} changed in load_state_dict"
        for key in ("exp_avg", "exp_avg_sq"):  # fp32 moments beside a bf16 parameter: no loss either
            assert torch.equal(other.state[t][key], loaded_sd["state"][j][key]), f"{key} {j} changed"
    # and both continue identically
    _assert_same_continuation(opt, params, other, twins)


@pytest.mark.parametrize("backend", PATHS + ["auto"])
def test_stochastic_rounding_resumes_from_its_checkpoint(backend):
    """NAdam's fp32 mu_product keeps its dtype through load_state_dict under stochastic
    rounding too: a resumed run is the uninterrupted one, bit for bit."""
    params = make_params(torch.bfloat16, shapes=[(5, 7), (BLOCK_PLUS,)])
    opt = fusedopt.NAdam(params, lr=1e-3, backend=backend, stochastic_rounding=True)
    _run(opt, params, 2)
    twins = [p.detach().clone().requires_grad_() for p in params]
    other = fusedopt.NAdam(twins, lr=1e-3, backend=backend, stochastic_rounding=True)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    _assert_same_continuation(opt, params, other, twins)


def test_state_dict_interchange_with_torch():
    """The options are optimizer attributes: param_groups stay torch's, torch.optim loads
    the state dict (ignoring the master copy), and a torch state dict starts the master
    copy from the parameter."""
    params = make_params(torch.bfloat16, shapes=[(5, 7), (9,)])
    opt = fusedopt.AdamW(params, lr=1e-3, backend="reference", master_weights=True, state_dtype=torch.bfloat16)
    _run(opt, params, 2)
    saved = opt.state_dict()
    assert "master_weights" not in saved["param_groups"][0] and "state_dtype" not in saved["param_groups"][0]
    twins = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(twins, lr=1e-3)
    plain.load_state_dict(saved)
    _run(plain, twins, 1)
    # torch -> fusedopt with master weights
    back = [p.detach().clone().requires_grad_() for p in twins]
    fresh = fusedopt.AdamW(back, lr=1e-3, backend="reference", master_weights=True)
    torch_sd = plain.state_dict()
    for entry in torch_sd["state"].values():
        entry.pop("master_param", None)
    fresh.load_state_dict(torch_sd)
    for p in back:
        assert torch.equal(fresh.state[p]["master_param"], p.detach().float())
        assert not fresh.state[p]["master_param"].requires_grad   # made from p at load, outside no_grad
        assert fresh.state[p]["exp_avg"].dtype == torch.float32
    _run(fresh, back, 1)


@pytest.mark.parametrize("backend", PATHS + ["auto"])
def test_a_master_copy_stepped_past_by_torch_restarts_from_the_parameter(backend):
    """fusedopt (master weights) -> torch.optim, which carries master_param along without
    stepping it -> fusedopt again. The loaded master copy is torch's steps behind the
    parameter: the first step must not put the parameter back there. It restarts the
    master copy from the parameter, as a torch checkpoint without the key does, and says so."""
    params = make_params(torch.bfloat16, shapes=[(5, 7), (BLOCK_PLUS,)])
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, master_weights=True)
    _run(opt, params, 2)
    plain = torch.optim.AdamW(params, lr=1e-2)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(plain, params, 3)
    torch_sd = plain.state_dict()
    assert all("master_param" in entry for entry in torch_sd["state"].values())
    twins = [p.detach().clone().requires_grad_() for p in params]
    stale = fusedopt.AdamW(params, lr=1e-2, backend=backend, master_weights=True)
    stale.load_state_dict(copy.deepcopy(torch_sd))
    without = copy.deepcopy(torch_sd)
    for entry in without["state"].values():
        del entry["master_param"]
    fresh = fusedopt.AdamW(twins, lr=1e-2, backend=backend, master_weights=True)
    fresh.load_state_dict(without)
    with pytest.warns(UserWarning, match=r"master copy of parameter\(s\) \[0, 1\] does not round") as record:
        _run(stale, params, 1)
    assert record[0].filename == __file__   # the user's line (here `_run`'s), not fusedopt's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(fresh, twins, 1)
    for j, (a, b) in enumerate(zip(params, twins)):
        assert torch.equal(a, b), f"param {j}"
        assert torch.equal(stale.state[a]["master_param"], fresh.state[b]["master_param"]), f"master {j}"
    _assert_same_continuation(stale, params, fresh, twins)


@pytest.mark.parametrize("backend", PATHS + ["auto"])
@pytest.mark.parametrize("source", ["fusedopt", "torch"])
def test_optimizer_loaded_before_the_model_with_master_weights(backend, source):
    """The optimizer's checkpoint loaded while the model still holds its initial values,
    the model's after: with a master copy in the checkpoint (fusedopt's) nothing is said
    and the run goes on as the uninterrupted one; without (torch's), the master copy
    starts from the loaded model, not from the initial values it saw at load."""
    params = make_params(torch.bfloat16, shapes=[(5, 7), (BLOCK_PLUS,)])
    initial = [p.detach().clone() for p in params]
    if source == "fusedopt":
        opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, master_weights=True)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2)
    _run(opt, params, 2)
    twins = [p.detach().clone().requires_grad_() for p in initial]   # a new process: initial values
    resumed = fusedopt.AdamW(twins, lr=1e-2, backend=backend, master_weights=True)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    with torch.no_grad():
        for t, p in zip(twins, params):   # model.load_state_dict
            t.copy_(p)
    if source == "torch":   # what it should continue as: the master copy made from the loaded model
        opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, master_weights=True)
        opt.load_state_dict(copy.deepcopy(resumed.state_dict()))
        for p in params:
            opt.state[p]["master_param"] = p.detach().float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same_continuation(opt, params, resumed, twins)


# Two tensors of their own; and ten tiny ones, which the CPU's path steps as one gathered run
WRITTEN_SHAPES = {"two": [(5, 7), (BLOCK_PLUS,)], "tiny": [(3,)] * 5 + [(2, 2)] * 5 + [(5, 7)]}


@pytest.mark.parametrize("backend", ALL_PATHS)
@pytest.mark.parametrize("edit", ["load_state_dict", "clamp", "data=", "vector_to_parameters", "data.copy_",
                                  "data.clamp_"])
@pytest.mark.parametrize("shapes", list(WRITTEN_SHAPES))
def test_a_parameter_written_between_steps_is_taken_up_by_its_master_copy(backend, edit, shapes):
    """torch's optimizers step the parameter the user sees, so a write to it between steps
    holds: a model's load_state_dict, a clamp under no_grad (as WGAN clips its critic's
    weights), a new tensor put in through `.data` (`p.data = t`, torch's
    `vector_to_parameters`), or a write through `.data` (`p.data.copy_(t)`,
    `p.data.clamp_()`: old code's idiom, which bumps no version counter). With master
    weights the copy must take it up, or the next step puts the old values back, silently.
    Element by element: where the parameter is no longer its copy's rounding the copy takes
    the written value, elsewhere it keeps its precision. The twin makes the same writes by
    hand, to its copies and to its parameters."""
    params = make_params(torch.bfloat16, shapes=WRITTEN_SHAPES[shapes])
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, master_weights=True)
    other = fusedopt.AdamW(twins, lr=1e-2, backend=backend, master_weights=True)
    _run(opt, params, 3)
    _run(other, twins, 3)
    loaded = make_params(torch.bfloat16, shapes=WRITTEN_SHAPES[shapes], seed=1)
    with torch.no_grad():
        for p, t, new in zip(params, twins, loaded):
            if edit in ("clamp", "data.clamp_"):
                (p if edit == "clamp" else p.data).clamp_(-0.05, 0.05)
                t.data.clamp_(-0.05, 0.05)
            else:
                if edit == "load_state_dict":
                    p.copy_(new)
                elif edit == "data=":
                    p.data = new.detach().clone()
                elif edit == "data.copy_":
                    p.data.copy_(new)
                t.data.copy_(new)
            master = other.state[t]["master_param"]
            master.copy_(torch.where(master.to(t.dtype) == t, master, t.float()))
    if edit == "vector_to_parameters":
        torch.nn.utils.vector_to_parameters(torch.cat([new.flatten() for new in loaded]), params)
    written = [p.detach().clone() for p in params]
    _run(opt, params, 1)
    _run(other, twins, 1)
    for p, w in zip(params, written):   # one step of lr 1e-2 from the written values
        assert (p.float() - w.float()).abs().max() < 0.05
    for j, (a, b) in enumerate(zip(params, twins)):
        assert torch.equal(a, b), f"param {j}"
        assert torch.equal(opt.state[a]["master_param"], other.state[b]["master_param"]), f"master {j}"
    _assert_same_continuation(opt, params, other, twins)



@pytest.mark.parametrize("backend", ALL_PATHS)
def test_a_parameter_converted_to_another_dtype_keeps_a_copy_only_while_it_needs_one(backend):
    """`p.data = p.data.float()` (a model converted mid-run) rebuilds the bucket and carries
    the state over. An fp32 parameter has no master copy: none stays in its state, where no
    step would update it and state_dict() would save it stale. Converted back, the copy
    starts from the parameter, as for state from an optimizer without master weights; and
    nothing warns, since nothing was loaded (the copy is the optimizer's own)."""
    params = make_params(torch.bfloat16, shapes=[(5, 7), (BLOCK_PLUS,)])
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, master_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(opt, params, 2)
        params[0].data = params[0].data.float()
        _run(opt, params, 2)
        assert "master_param" not in opt.state[params[0]]
        assert "master_param" not in opt.state_dict()["state"][0]
        params[0].data = params[0].data.bfloat16()
        twins = [p.detach().clone().requires_grad_() for p in params]
        other = fusedopt.AdamW(twins, lr=1e-2, backend=backend, master_weights=True)
        other.load_state_dict(copy.deepcopy(opt.state_dict()))
        _assert_same_continuation(opt, params, other, twins)
        for p in params:
            assert torch.equal(p.detach(), opt.state[p]["master_param"].to(p.dtype))

def test_options_survive_pickle_and_deepcopy():
    params = make_params(torch.bfloat16, shapes=[(5, 7)])
    opt = fusedopt.Adam(params, backend="reference", master_weights=True, state_dtype=torch.bfloat16)
    _run(opt, params, 1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.master_weights and clone.state_dtype == torch.bfloat16
        (p,) = clone.param_groups[0]["params"]
        assert clone.state[p]["master_param"].dtype == torch.float32
        assert clone.state[p]["exp_avg"].dtype == torch.bfloat16


def test_master_weights_leave_fp32_parameters_alone():
    p = torch.randn(10, requires_grad=True)
    opt = fusedopt.Adam([p], master_weights=True)
    p.grad = torch.randn(10)
    opt.step()
    assert "master_param" not in opt.state[p]
    assert opt._buckets[0][1][0].path == "native"  # torch's CPU kernel still runs fp32 buckets


def test_auto_takes_the_native_path_on_cpu_for_extended_buckets_where_torch_has_a_fused_kernel():
    p = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(10, requires_grad=True)
    r = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    nadam = fusedopt.NAdam([r])
    nadam.stochastic_rounding = True  # an attribute of the family; NAdam has no fused kernel to compose
    for opt, path in ((fusedopt.Adam([p], master_weights=True), "native"),
                      (fusedopt.Adam([q], state_dtype=torch.bfloat16), "native"), (nadam, "reference")):
        opt.param_groups[0]["params"][0].grad = torch.ones(10, dtype=opt.param_groups[0]["params"][0].dtype)
        opt.step()
        assert opt._buckets[0][1][0].path == path


# ------------------------------------------------------------------------ low-precision state

def _adam_bf16_state_reference(params, steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """Adam in float64 whose moments are stored as bf16 after every step, as the kernel
    stores them; the update itself uses the unrounded moments, as the kernel does."""
    ps = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps]
    v = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps]
    count = [0] * len(ps)
    for step in range(steps):
        grads = _grads(params, step)
        for j, g in enumerate(grads):
            if (step, j) in MISSING:
                continue
            count[j] += 1
            t = count[j]
            g = g.double()
            m_new = torch.lerp(m[j].double(), g, 1 - betas[0])
            v_new = v[j].double() * betas[1] + (1 - betas[1]) * g * g
            m[j], v[j] = m_new.bfloat16(), v_new.bfloat16()
            denom = v_new.sqrt() / (1 - betas[1] ** t) ** 0.5 + eps
            ps[j] = ps[j] - lr / (1 - betas[0] ** t) * m_new / denom
    return ps, m, v


@pytest.mark.parametrize("backend", PATHS + ["auto"])
def test_bf16_state_matches_float64_reference(backend):
    params = make_params(torch.float32, shapes=SHAPES_REAL)
    opt = fusedopt.Adam(params, lr=1e-2, backend=backend, state_dtype=torch.bfloat16)
    _run(opt, params, 5)
    ps, m, v = _adam_bf16_state_reference(make_params(torch.float32, shapes=SHAPES_REAL), 5, 1e-2)
    for j, p in enumerate(params):
        st = opt.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
        # A moment whose fp32 and float64 values straddle a bf16 rounding boundary may
        # round one ulp apart; that moves the parameter by up to lr * 2**-8.
        assert_close(f"param {j}", p.detach().double(), ps[j], rtol=1e-5, atol=1e-4)
        assert_close(f"exp_avg {j}", st["exp_avg"], m[j], rtol=2 ** -7, atol=1e-6)
        assert_close(f"exp_avg_sq {j}", st["exp_avg_sq"], v[j], rtol=2 ** -7, atol=1e-8)


@pytest.mark.parametrize("backend", ALL_PATHS)
def test_bf16_state_keeps_a_nan_of_any_payload(backend):
    """A NaN gradient makes NaN moments, whatever its bits: a GPU's default NaN is
    0x7FFFFFFF, and rounding that to bf16 by adding half an ulp carries into the sign bit
    (-0.0) unless NaN is kept apart (0xFFFFFFFF wraps to +0.0). A moment that drops its
    NaN would hide a diverged run."""
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    p = torch.randn(BLOCK + 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = fusedopt.Adam([p], lr=1e-2, backend=backend, state_dtype=torch.bfloat16)
    g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    where = [0, 1, BLOCK + 1, BLOCK + 3]   # in a whole block and in the masked tail
    g[where] = nans
    p.grad = g
    opt.step()
    for key in ("exp_avg", "exp_avg_sq"):
        state = opt.state[p][key]
        assert state.isnan().nonzero().flatten().tolist() == where, key
    assert p.isnan().nonzero().flatten().tolist() == where


def test_bf16_state_halves_state_memory():
    params = make_params(torch.float32, shapes=[(1024,), (33,)])
    opts = [fusedopt.Adam(params, backend="reference"),
            fusedopt.Adam(params, backend="reference", state_dtype=torch.bfloat16)]
    for opt in opts:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    nbytes = [sum(b.numel() * b.element_size() for b in opt._buckets[0][1][0].buffers.values()) for opt in opts]
    assert nbytes[1] * 2 == nbytes[0]


def test_invalid_state_dtype():
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fusedopt.Adam([torch.zeros(1, requires_grad=True)], state_dtype=torch.int8)


# ------------------------------------------------------------------------ fused clipping

CLIPPERS = [pytest.param(fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2), id="AdamW"),
            pytest.param(fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True), id="Adam-amsgrad"),
            pytest.param(fusedopt.SGD, torch.optim.SGD, dict(lr=1e-1, momentum=0.9, nesterov=True), id="SGD-nesterov"),
            pytest.param(fusedopt.Adagrad, torch.optim.Adagrad, dict(lr=1e-1, weight_decay=0.1), id="Adagrad"),
            pytest.param(fusedopt.NAdam, torch.optim.NAdam, dict(lr=1e-2), id="NAdam"),
            pytest.param(fusedopt.RAdam, torch.optim.RAdam, dict(lr=1e-2), id="RAdam"),
            pytest.param(fusedopt.Adamax, torch.optim.Adamax, dict(lr=1e-2), id="Adamax")]


def _clipped_run(fused_cls, torch_cls, options, backend, dtype, max_norm, steps=4):
    """fusedopt with max_grad_norm against torch's clip_grad_norm_ then step, in `dtype`
    and in float64; two groups, and a group whose second half is float64 (two buckets)."""
    params = make_params(dtype, shapes=SHAPES_REAL)
    params[-2] = params[-2].detach().double().requires_grad_()  # another bucket in the same norm
    copies = {d: [p.detach().to(d if p.dtype != torch.float64 else torch.float64).clone().requires_grad_()
                  for p in params] for d in (dtype, torch.float64)}
    half = len(params) // 2

    def groups(ps):
        return [dict(params=ps[:half]), dict(params=ps[half:], lr=options["lr"] / 2)]

    opt = fused_cls(groups(params), backend=backend, max_grad_norm=max_norm, **options)
    refs = {d: torch_cls(groups(ps), **options) for d, ps in copies.items()}
    for step in range(steps):
        grads = [g * 3 for g in _grads(params, step)]
        for j, g in enumerate(grads):
            missing = (step, j) in MISSING
            params[j].grad = None if missing else g.clone()
            for ps in copies.values():
                ps[j].grad = None if missing else g.to(ps[j].dtype)
        kept = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        for p, k in zip(params, kept):  # the gradients are read, never written
            assert (p.grad is None and k is None) or torch.equal(p.grad, k)
        for d, ref in refs.items():
            torch.nn.utils.clip_grad_norm_(copies[d], max_norm)
            ref.step()
    return params, copies


@pytest.mark.parametrize("backend", PATHS + ["auto"])
@pytest.mark.parametrize("fused_cls,torch_cls,options", CLIPPERS)
def test_max_grad_norm_equals_clip_grad_norm_then_step(fused_cls, torch_cls, options, backend):
    params, copies = _clipped_run(fused_cls, torch_cls, options, backend, torch.float32, max_norm=1.0)
    for j, p in enumerate(params):
        # torch's own fp32 answer to fp32 rounding, and the float64 one to fp32 precision
        assert_close(f"param {j}", p, copies[torch.float32][j], rtol=1e-5, atol=1e-6)
        assert_close(f"param {j} (fp64)", p.detach().double(), copies[torch.float64][j].detach().double(),
                     rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_PATHS)
def test_max_grad_norm_in_float64(backend):
    params, copies = _clipped_run(fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2), backend, torch.float64, 0.5)
    for j, p in enumerate(params):
        assert_close(f"param {j}", p, copies[torch.float64][j], rtol=1e-10, atol=1e-12)


def test_clip_coefficient_on_the_host_is_torchs_arithmetic():
    """On the CPU the coefficient is computed in Python floats (`clip._coefficient_on_host`):
    it must be what torch's ops give, `clamp(max_norm / (sqrt(total) + 1e-6), max=1)`, bit
    for bit in fp32 and fp64, given the same (correctly rounded) square root; with a
    GradScaler scale, over several buckets, and for inf and NaN norms."""
    import math

    from fusedopt.kernels import clip

    gen = torch.Generator().manual_seed(0)

    def by_torch(sums, max_norm, dtype):
        total = torch.stack([s.to(dtype) for s in sums]).sum() if len(sums) > 1 else sums[0].to(dtype)
        total = torch.tensor(math.sqrt(total.item()), dtype=torch.float64).to(dtype)  # rounded once
        return torch.clamp(max_norm / (total + 1e-6), max=1.0)

    checked = 0
    for dtype in (torch.float32, torch.float64):
        sums = torch.rand(2000, generator=gen, dtype=torch.float64).mul(10.0 ** torch.randint(-6, 9, (2000,),
                                                                                            generator=gen)).to(dtype)
        for j in range(0, 2000, 2):
            for max_norm in (1.0, 0.37, 3e3):
                one = [sums[j]]
                for given in (one, [sums[j], sums[j + 1]]) if dtype == torch.float32 else (one,):
                    got = clip.clip_coefficient(given, max_norm)
                    want = by_torch(given, max_norm, dtype)
                    assert isinstance(got, float) and got == want.item(), (given, max_norm, got, want)
                    checked += 1
    assert checked > 4000
    for special, want in ((float("inf"), 0.0), (float("nan"), None)):
        got = clip.clip_coefficient([torch.tensor(special)], 1.0)
        assert got == want if want is not None else math.isnan(got)


def test_max_grad_norm_is_one_reduction_launch_per_bucket_and_no_clip_below_it():
    from fusedopt.kernels._launch import count_launches
    params = make_params(torch.float32, shapes=[(100,), (7,)]) + make_params(torch.float64, shapes=[(5,)])
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedopt.AdamW(params, backend="triton", max_grad_norm=1e6)
    plain = fusedopt.AdamW(twins, backend="triton")
    for ps in (params, twins):
        for p in ps:
            p.grad = torch.ones_like(p)
    with count_launches() as c:
        opt.step()
    assert dict(c) == {"sumsq": 2, "adam": 2}
    plain.step()
    for a, b in zip(params, twins):
        assert torch.equal(a, b)  # coefficient 1: the same numbers as no clipping


@pytest.mark.parametrize("views", [False, True], ids=["own", "views"])
@pytest.mark.parametrize("scale", [None, 2.0 ** 100], ids=["unscaled", "grad-scale"])
@pytest.mark.parametrize("chunk", [None, 64], ids=["chunk", "small-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sum_of_squares_of_the_native_and_reference_paths(dtype, chunk, scale, views, monkeypatch):
    """The sum of squares against float64 and against the Triton kernel's: norms of the
    large tensors (whole, or by rows and what is left after the last row), dot products of
    packed chunks of the rest (bf16 widened), cut and packed across tensors. With
    GradScaler's scale, the sum of the unscaled gradients' squares: 2**100 times gradients
    near 1 squares to inf in fp32, the unscaled ones do not. With `views`, the gradients
    are views of one flat buffer at storage offsets (DDP's gradient_as_bucket_view)."""
    from fusedopt.kernels import clip
    if chunk is not None:
        # read in place from 100 elements: up to 128 whole, larger by rows of 64 (3x70:
        # three rows and 18 packed; 80x80: a hundred rows); packed 64 at a time
        monkeypatch.setattr(clip, "CHUNK", chunk)
        monkeypatch.setattr(clip, "DIRECT", 100)
        monkeypatch.setattr(clip, "NORM_PIECE", 128)
        monkeypatch.setattr(clip, "ROW", 64)
    params = make_params(dtype, shapes=[(3, 70), (5,), (64,), (1,), (120,), (40,), (33, 2), (200,), (80, 80)])
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen).to(dtype)
    if views:
        # in reverse order: the 3x70 gradient, three rows and 18 packed, lies at an offset
        flat = torch.cat([p.grad.flatten() for p in reversed(params)])
        start = 0
        for p in reversed(params):
            p.grad = flat[start:start + p.numel()].view(p.shape)
            start += p.numel()
    exact = sum(float(p.grad.double().square().sum()) for p in params)
    if scale is not None:
        for p in params:
            p.grad.mul_(scale)   # a power of two: exact
    sums = {}
    for backend in ("reference", "triton"):
        opt = fusedopt.AdamW(params, backend=backend, max_grad_norm=1.0)
        bucket, = opt._group_buckets(0)
        got = clip.sum_of_squares(bucket, bucket.collect(None), None if scale is None else torch.tensor(scale))
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        sums[backend] = float(got)
    # fp32 sums of ~7000 squares: over 60 seeds the worst was 1.007e-6 off
    rel = 1e-12 if dtype == torch.float64 else 4e-6
    assert sums["reference"] == pytest.approx(exact, rel=rel)
    assert sums["triton"] == pytest.approx(sums["reference"], rel=rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_grad_norm_above_the_norm_is_plain_steps_on_auto(dtype):
    """A coefficient of 1: the native path steps the user's gradients as without clipping
    (no copy), to the bit, and leaves them as they were."""
    params = make_params(dtype, shapes=SHAPES_REAL + [(300, 1000)])
    twins = [p.detach().clone().requires_grad_() for p in params]
    clipped, plain = fusedopt.AdamW(params, max_grad_norm=1e6), fusedopt.AdamW(twins)
    for step in range(2):
        for p, t, g in zip(params, twins, _grads(params, step)):
            p.grad, t.grad = g.clone(), g.clone()
        clipped.step()
        plain.step()
        assert all(torch.equal(p.grad, t.grad) for p, t in zip(params, twins))
    for j, (a, b) in enumerate(zip(params, twins)):
        assert torch.equal(a, b), f"param {j}"


@pytest.mark.parametrize("backend", PATHS + ["auto"])
@pytest.mark.parametrize("init_scale,growth_interval,inf_step,final_scale,steps",
                         [(2.0 ** 8, 2000, 2, 2.0 ** 7, 3), (2.0 ** 80, 1, None, 2.0 ** 84, 4)],
                         ids=["inf-skip", "past-fp32-square-root"])
def test_max_grad_norm_with_grad_scaler_clips_the_unscaled_gradient(backend, init_scale, growth_interval, inf_step,
                                                                    final_scale, steps):
    """torch's recipe is unscale_, clip_grad_norm_, step. A step with an inf gradient is
    skipped (and not counted). And GradScaler doubles its scale every `growth_interval`
    steps without an inf; under bf16 autocast it never meets one and grows past 1.8e19,
    where the scaled gradients' squares overflow fp32: the norm must still be the unscaled
    gradients', not inf, which would clip every gradient to 0 and stop the parameters
    without a word."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = fusedopt.AdamW(twin.parameters(), lr=1e-2, fused=True, max_grad_norm=0.1, backend=backend)
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval) for _ in range(2)]
    start = [p.detach().clone() for p in twin.parameters()]
    for step in range(steps + (inf_step is not None)):
        for net, o, scaler in ((model, ref, scalers[0]), (twin, opt, scalers[1])):
            o.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
            if step == inf_step:
                next(net.parameters()).grad[0, 0] = float("inf")
            if o is ref:
                scaler.unscale_(o)
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            scaler.step(o)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == final_scale
    for j, (a, b, s) in enumerate(zip(model.parameters(), twin.parameters(), start)):
        assert not torch.equal(b, s), f"param {j} did not move"
        assert_close(f"param {j}", b, a, rtol=1e-5, atol=1e-6)
        assert float(opt.state[b]["step"]) == float(ref.state[a]["step"]) == steps


def test_max_grad_norm_errors():
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        fusedopt.SGD([torch.zeros(1, requires_grad=True)], max_grad_norm=0.0)
    p = torch.zeros(3, requires_grad=True)
    opt = fusedopt.RMSprop([p])
    opt.max_grad_norm = 1.0
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="RMSprop cannot clip gradients inside its kernel"):
        opt.step()


@pytest.mark.parametrize("value", ["x", 0, -1.0, float("nan"), True, torch.tensor(0.5)], ids=repr)
def test_max_grad_norm_assigned_between_steps_is_checked_as_at_construction(value):
    """A value the constructor refuses is refused when assigned too, naming it, and the
    optimizer goes on clipping by the value it had: it used to be taken, and then failed
    inside the step with struct.error ("x") or clipped by what construction refuses."""
    params = make_params(torch.float32, shapes=[(5, 7), (3,)])
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedopt.AdamW(params, lr=1e-2, max_grad_norm=0.5)
    other = fusedopt.AdamW(twins, lr=1e-2, max_grad_norm=0.5)
    _run(opt, params, 1)
    _run(other, twins, 1)
    with pytest.raises(ValueError, match=re.escape(f"Invalid max_grad_norm: {value!r}")):
        opt.max_grad_norm = value
    assert opt.max_grad_norm == 0.5
    _assert_same_continuation(opt, params, other, twins)
    opt.max_grad_norm = None   # off, as at construction
    assert opt.max_grad_norm is None


def test_max_grad_norm_survives_pickle():
    opt = fusedopt.SGD([torch.zeros(1, requires_grad=True)], max_grad_norm=2.0)
    assert pickle.loads(pickle.dumps(opt)).max_grad_norm == 2.0
    assert copy.deepcopy(opt).max_grad_norm == 2.0
    assert "max_grad_norm" not in opt.state_dict()["param_groups"][0]


# ------------------------------------------------------------------------ stochastic rounding

def _constant_gradient_run(backend, steps, **options):
    """Adam on 4096 bf16 parameters at 1 with a constant gradient: every step moves each by
    lr (Adam's normalised step), far below half a bf16 ulp (2**-9 just below 1)."""
    p = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
    opt = fusedopt.Adam([p], lr=1e-4, backend=backend, **options)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("backend", PATHS + ["auto"])
def test_stochastic_rounding_tracks_the_fp32_trajectory_where_bf16_stalls(backend):
    steps = 40
    plain, _ = _constant_gradient_run(backend, steps)
    assert torch.all(plain == 1.0), "plain bf16 loses every update: the parameter never moves"
    rounded, _ = _constant_gradient_run(backend, steps, stochastic_rounding=True)
    # float64 reference: the fp32 trajectory (Adam's step with a constant gradient is lr)
    exact = 1.0 - steps * 1e-4
    mean = rounded.double().mean().item()
    # each element is a bf16 neighbour of the trajectory; their mean is unbiased. The
    # spread of one element's walk is at most ulp * sqrt(steps / 4), over 4096 elements.
    spread = 2 ** -8 * (steps / 4) ** 0.5 / 4096 ** 0.5
    assert abs(mean - exact) < 5 * spread, (mean, exact, spread)
    assert rounded.unique().numel() > 1


def test_stochastic_rounding_kernel_equals_reference_and_is_reproducible():
    runs = []
    for backend in ("triton", "reference", "triton", "auto"):
        params = make_params(torch.bfloat16, shapes=SHAPES_REAL)
        opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, stochastic_rounding=True)
        _run(opt, params, 3)
        runs.append(params)
    for j, (a, b, c, d) in enumerate(zip(*runs)):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"param {j}: kernel != reference"
        assert torch.equal(a, c), f"param {j}: not reproducible"
        assert torch.equal(d.view(torch.int16), b.view(torch.int16)), f"param {j}: native != reference"
    # another seed draws other bits: each of the 3 steps may round the other way (an ulp,
    # 2**-7 relative at most), and the moments respond a little to the changed parameter
    params = make_params(torch.bfloat16, shapes=SHAPES_REAL)
    opt = fusedopt.AdamW(params, lr=1e-2, backend="reference", stochastic_rounding=True)
    opt.sr_seed = 1
    _run(opt, params, 3)
    assert any(not torch.equal(a, b) for a, b in zip(params, runs[0]))
    for j, (a, b) in enumerate(zip(params, runs[0])):
        assert_close(f"param {j}", a, b, rtol=4 * 2 ** -7, atol=1e-2)


def test_int32_stochastic_rounding_has_the_reference_bits():
    """`round_sr_int32` (the native path's) against `round_sr_torch` (the reference's, the
    kernel's bits), specials included: NaNs (quiet, signalling, all ones), infinities, -0."""
    from fusedopt.kernels import _launch
    n, start = 70001, 12345
    value = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 100
    bits = value.view(torch.int32)
    bits[:6] = torch.tensor([0x7FC00000, 0x7F800001, -1, 0x7F800000, -8388608, -2147483648], dtype=torch.int32)
    seeds = torch.tensor([-7, 0, 2 ** 31 - 1], dtype=torch.int32)
    which = torch.arange(n) % 3
    positions = torch.arange(start, start + n)
    mixed = _launch.mixed_positions(start + n)[start:]
    out = torch.empty(n, dtype=torch.bfloat16)
    x, tmp = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
    for mix, seed in ((_launch.seed_mix(seeds)[which], seeds[which]),      # a seed per element
                      (_launch.seed_mix(seeds)[0], seeds[0].expand(n))):  # one seed
        _launch.round_sr_int32(value, mixed, mix, out, x, tmp)
        expected = _launch.round_sr_torch(value, seed.to(torch.int64), positions)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    assert out[:3].isnan().all() and out[3] == float("inf") and out[4] == -float("inf")


def test_int32_step_seeds_are_the_reference_seeds():
    from fusedopt.kernels import _launch
    steps = torch.tensor([0.0, 1.0, 2.0, 7.0, 1000.0, 2.0 ** 24])
    for base, salt in ((0, 0), (12345, 3 << 16 | 2), (2 ** 40 + 7, 65535)):
        expected = _launch.seed_mix(_launch.step_seeds(base, salt, steps))
        assert torch.equal(_launch.step_seed_mix(_launch.seed_key(base, salt, len(steps)), steps), expected)


def test_stochastic_rounding_options():
    with pytest.raises(ValueError, match="exclude each other"):
        fusedopt.Adam([torch.zeros(1, requires_grad=True)], master_weights=True, stochastic_rounding=True)
    # fp32 parameters are unaffected, and keep torch's CPU kernel
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opts = [fusedopt.Adam([p], stochastic_rounding=True), torch.optim.Adam([q])]
    for t, o in zip((p, q), opts):
        t.grad = torch.ones(10)
        o.step()
    assert torch.equal(p, q) and opts[0]._buckets[0][1][0].path == "native"
    clone = pickle.loads(pickle.dumps(opts[0]))
    assert clone.stochastic_rounding


@pytest.mark.parametrize("backend", ALL_PATHS)
def test_master_weights_under_grad_scaler_skip_and_unscale(backend):
    params = make_params(torch.bfloat16, shapes=[(5, 7), (BLOCK_PLUS,)])
    exact = [p.detach().double().requires_grad_() for p in params]
    opt = fusedopt.AdamW(params, lr=1e-2, fused=True, backend=backend, master_weights=True)
    ref = torch.optim.AdamW(exact, lr=1e-2)
    scale = torch.tensor(2.0 ** 10)
    for step in range(3):
        grads = _grads(params, step)
        for p, e, g in zip(params, exact, grads):
            p.grad = (g.float() * scale).bfloat16()     # exact: a power of two
            e.grad = g.double()
        opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0 if step == 1 else 0.0)
        opt.step()
        if step != 1:
            ref.step()
    for j, (p, e) in enumerate(zip(params, exact)):
        assert_close(f"master {j}", opt.state[p]["master_param"].double(), e.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), opt.state[p]["master_param"].bfloat16())
        assert float(opt.state[p]["step"]) == 2


def test_low_precision_state_takes_assigned_tensors():
    p = torch.randn(6, requires_grad=True)
    opt = fusedopt.Adam([p], backend="reference", state_dtype=torch.bfloat16)
    p.grad = torch.ones(6)
    opt.step()
    opt.state[p]["exp_avg"] = torch.full((6,), 0.3)
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(opt._buckets[0][1][0].buffers["exp_avg"][:6], torch.full((6,), 0.3).bfloat16())


# ------------------------------------------------------------------------ the native path's composition

# The modes on 'auto' (on a CPU: torch's fused kernel with conversions around it) against
# the reference, step by step. Parameters around a tensor larger than a chunk (cut into
# pieces) and eight small ones in a row (a run: gathered, one span of positions for
# stochastic rounding, several seeds).
COMPOSED_SHAPES = SHAPES_REAL + [(190, 180)] + [(n,) for n in (1, 3, 16, 17, 5, 31, 64, 2, 9)]
MODES = [pytest.param(torch.bfloat16, dict(master_weights=True), id="master-bf16"),
         pytest.param(torch.float16, dict(master_weights=True), id="master-fp16"),
         pytest.param(torch.bfloat16, dict(master_weights=True, state_dtype=torch.bfloat16), id="master-bf16state"),
         pytest.param(torch.float32, dict(state_dtype=torch.bfloat16), id="bf16state-fp32"),
         pytest.param(torch.bfloat16, dict(state_dtype=torch.float32), id="fp32state-bf16"),
         pytest.param(torch.float64, dict(state_dtype=torch.float32), id="fp32state-fp64"),
         pytest.param(torch.bfloat16, dict(stochastic_rounding=True), id="sr"),
         pytest.param(torch.bfloat16, dict(stochastic_rounding=True, state_dtype=torch.float32), id="sr-fp32state"),
         pytest.param(torch.float32, dict(max_grad_norm=0.5), id="clip-fp32"),
         pytest.param(torch.bfloat16, dict(max_grad_norm=0.5, master_weights=True), id="clip-master")]
# What torch's fused kernel and the reference's plain ops may differ by: a few fp32 (fp64)
# roundings, and so one ulp where a low-precision store rounds them to either side.
ONE_ULP = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 ** -7, 1e-6),
           torch.float16: (2 ** -10, 1e-6)}


# ADAMS, but with an L2 decay whose fp32 product with a bf16 parameter never lies on the
# bf16 grid. With weight_decay=0.1 (or 1/3), fl(0.1 * p) is a bf16 number for a fifth of
# the bf16 significands, and a bf16 gradient of exactly minus it (one element in ~20000
# of randn data) makes the reference's g + wd * p exactly 0, where torch's kernel, which
# contracts it to an fma, keeps a 1e-10 residue that Adam normalises into a step of a
# whole lr. Both are right to fp32 rounding of an input that cancels.
# Only Adam and AdamW have a fused torch kernel to compose; Adamax, NAdam and RAdam take
# the reference path on the CPU for these modes.
COMPOSED_ADAMS = [pytest.param(fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.0987), id="Adam-l2"),
                  *[p for p in ADAMS[1:] if p.values[0] in (fusedopt.Adam, fusedopt.AdamW)]]


@pytest.mark.parametrize("chunk", [None, 1000], ids=["chunk", "small-chunk"])
@pytest.mark.parametrize("dtype,mode", MODES)
@pytest.mark.parametrize("fused_cls,torch_cls,options", COMPOSED_ADAMS)
def test_native_composition_equals_reference(fused_cls, torch_cls, options, dtype, mode, chunk, monkeypatch):
    if chunk is not None:  # every group a few pieces: packing, and positions across pieces
        monkeypatch.setattr(_composed, "CHUNK", chunk)
    runs = []
    for backend in ("reference", "auto"):
        params = make_params(dtype, shapes=COMPOSED_SHAPES)
        opt = fused_cls(params, backend=backend, **mode, **options)
        _run(opt, params, 4)
        runs.append((params, opt))
    (p_ref, o_ref), (p_new, o_new) = runs
    assert {b.path for _, buckets in o_new._buckets.values() for b in buckets} == {"native"}
    assert any(b._native_plan.runs for _, buckets in o_new._buckets.values() for b in buckets), "no run formed"
    # A bf16 moment that the two round to either side of a boundary moves the parameter by
    # up to lr * 2**-8, as in test_bf16_state_matches_float64_reference.
    moved = 1e-4 if mode.get("state_dtype") == torch.bfloat16 else 0.0

    def tol(dtype, key):
        rtol, atol = ONE_ULP[dtype]
        return rtol, max(atol, moved) if key in ("param", "master_param") else atol

    for j, (a, b) in enumerate(zip(p_ref, p_new)):
        if mode.get("stochastic_rounding"):
            # the reference's bits, seeds and positions
            assert torch.equal(b.view(torch.int16), a.view(torch.int16)), f"param {j}"
        else:
            assert_close(f"param {j}", b, a, *tol(dtype, "param"))
        for key, value in o_ref.state[a].items():
            got = o_new.state[b][key]
            assert got.dtype == value.dtype, f"{key} {j}"
            if key == "step":
                assert float(got) == float(value)
            else:
                assert_close(f"{key} {j}", got, value, *tol(value.dtype, key))
        if mode.get("master_weights"):
            assert torch.equal(b.detach(), o_new.state[b]["master_param"].to(dtype)), f"param {j} is not its master rounded"


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("fused_cls,torch_cls,options", CLIPPERS)
def test_max_grad_norm_in_bf16(fused_cls, torch_cls, options, backend):
    """bf16 parameters (and a float64 bucket) under max_grad_norm against torch's
    clip_grad_norm_ then step in float64, to bf16 precision. On 'auto' torch's bf16 kernel
    steps Adam, AdamW and Adagrad with a bf16 copy of the clipped gradient, and SGD (whose
    bf16 kernel torch gets wrong) runs in fp32 scratch."""
    params, copies = _clipped_run(fused_cls, torch_cls, options, backend, torch.bfloat16, max_norm=0.5)
    for j, p in enumerate(params):
        assert_close(f"param {j}", p, copies[torch.float64][j].detach().to(p.dtype))
