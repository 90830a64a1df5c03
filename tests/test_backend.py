"""Choosing a path: the backend keyword, FUSEDOPT_BACKEND, and machines without triton."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedopt
from fusedopt import _native
from _compare import assert_close


def paths(opt):
    opt._group_buckets(0)
    return [b.path for b in opt._buckets[0][1]]


def test_auto_on_cpu_takes_torch_native_kernel_where_torch_has_one():
    p = [torch.nn.Parameter(torch.randn(3))]
    assert paths(fusedopt.Adam(p)) == ["native"]
    assert paths(fusedopt.SGD(p)) == ["native"]


def test_backend_keyword_picks_the_path():
    p = [torch.nn.Parameter(torch.randn(3))]
    assert paths(fusedopt.Adam(p, backend="reference")) == ["reference"]
    assert paths(fusedopt.Adam(p, backend="triton")) == ["triton"]


def test_environment_variable_overrides_the_keyword(monkeypatch):
    monkeypatch.setenv("FUSEDOPT_BACKEND", "reference")
    p = [torch.nn.Parameter(torch.randn(3))]
    assert paths(fusedopt.Adam(p, backend="triton")) == ["reference"]


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="Invalid backend: 'cuda'"):
        fusedopt.Adam([torch.nn.Parameter(torch.randn(3))], backend="cuda")


def run_python(code, **env_changes):
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine 'triton' is the native path")
def test_triton_on_cpu_without_the_interpreter_says_what_to_do():
    out = run_python("""
        import torch, fusedopt
        p = torch.nn.Parameter(torch.randn(3))
        try:
            fusedopt.Adam([p], backend="triton")._group_buckets(0)
        except RuntimeError as e:
            print("ERR", e)
    """, TRITON_INTERPRET=None)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_import_and_step_without_triton_installed():
    out = run_python("""
        import sys
        sys.modules["triton"] = None          # what a missing package looks like to import
        import torch, fusedopt
        p = torch.nn.Parameter(torch.ones(3))
        opt = fusedopt.Adam([p], lr=0.1)
        p.grad = torch.ones(3)
        opt.step()
        print("stepped", p.data.tolist())
        try:
            fusedopt.Adam([p], backend="triton")._group_buckets(0)
        except RuntimeError as e:
            print("ERR", e)
    """)
    assert "stepped [0.9" in out.stdout, out.stdout + out.stderr
    assert "needs the `triton` package" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_on_cpu_avoids_torch_fused_kernels_for_low_precision(dtype):
    """torch 2.13's fused CPU SGD leaves bf16/fp16 parameters unchanged without a word.
    fusedopt must not inherit that: 'auto' runs torch's foreach SGD for those dtypes."""
    p = torch.nn.Parameter(torch.randn(64).to(dtype))
    p.grad = torch.ones(64, dtype=dtype)
    opt = fusedopt.SGD([p], lr=0.5)
    assert paths(opt) == ["native"]
    assert not _native.uses_fused(opt, dtype)
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before - 0.5)


def test_the_torch_fact_behind_the_native_dtype_rule():
    """If this starts failing, torch fixed its fused CPU SGD for bf16 and the rule can widen.
    (Its scalar tail is right; the vectorised body, 64 elements here, is what never moves.)"""
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    p.grad = torch.ones(64, dtype=torch.bfloat16)
    torch.optim.SGD([p], lr=0.5, fused=True).step()
    assert torch.equal(p.detach(), torch.ones(64, dtype=torch.bfloat16))


def late_gradient_run(cls, **options):
    """Two parameters; the second first gets a gradient at the second step (a layer unfrozen
    after the first step). Returns the parameters after three steps, or the exception."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, generator=gen)) for _ in range(2)]
    opt = cls(params, lr=0.1, momentum=0.9, **options)
    try:
        for step in range(3):
            for p in params[:1 + (step > 0)]:
                p.grad = torch.randn(40, generator=gen)
            opt.step()
    except TypeError as e:
        return e
    return [p.detach() for p in params]


def test_the_torch_fact_behind_stepping_a_late_momentum_buffer():
    """If this starts failing, torch's fused SGD steps a parameter whose momentum buffer
    starts after the first step, and the README's note on it can go."""
    assert isinstance(late_gradient_run(torch.optim.SGD, fused=True), TypeError)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_fused_sgd_steps_a_parameter_whose_momentum_starts_late(backend):
    """fusedopt.SGD(fused=True) starts the late buffer as the gradient, as torch's for-loop
    (what torch.optim.SGD runs on the CPU by default) does."""
    expected = late_gradient_run(torch.optim.SGD, foreach=False)
    got = late_gradient_run(fusedopt.SGD, fused=True, backend=backend)
    for j, (a, b) in enumerate(zip(got, expected)):
        assert_close(f"param {j}", a, b)


def test_native_path_matches_torch_for_loop_in_fp32_and_fp64():
    for dtype in (torch.float32, torch.float64):
        for cls, kw in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=0.1))):
            p0, g = torch.randn(64, dtype=dtype), torch.randn(64, dtype=dtype)
            out = []
            for fused in (False, True):
                p = torch.nn.Parameter(p0.clone())
                p.grad = g.clone()
                o = cls([p], fused=fused, **kw)
                o.step()
                o.step()
                out.append(p.detach())
            assert_close(f"{cls.__name__} {dtype}", out[1], out[0])
