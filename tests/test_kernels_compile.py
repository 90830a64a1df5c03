"""The ahead-of-time compile check runs as part of the suite (no GPU needed)."""
import os
import subprocess
import sys


def test_every_kernel_variant_compiles_to_128_bit_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fusedopt.kernels", "--check"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if " sm_90 " in line or " gfx942 " in line]
    assert rows, "the check listed no variants"
    assert all(row[3].isdigit() for row in rows), "a variant's register use went unreported"
    assert "of" in out.stdout.splitlines()[-1]


def run_compiling(tmp_path, name: str, code: str) -> None:
    """Run `code` as a script in a process without TRITON_INTERPRET (compiling for real
    GPUs) and assert it exits 0. Triton reads a jit function's source from its file, so a
    kernel written for a test goes into the script."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def check_own_kernel(tmp_path, name: str, kernel: str, variant: str, targets: tuple, verdict: str) -> None:
    """Compile a kernel written for the test through the check and assert the script's
    `verdict` (an expression over `rows`) holds."""
    code = (
        "import torch, sys\n"
        "from fusedopt.kernels import _aot\n"
        "from fusedopt.kernels._triton import triton, tl\n"
        "@triton.jit\n"
        f"{kernel}"
        f"v = _aot.Variant('{name}', {name}, {variant}, {{}}, loads=2, stores=2)\n"
        f"rows = _aot.check([v], {targets!r})\n"
        "print(rows)\n"
        f"sys.exit(0 if {verdict} else 1)\n"
    )
    run_compiling(tmp_path, name, code)


def test_check_fails_on_a_narrow_variant(tmp_path):
    """The check must be able to fail: a masked-only kernel never gets 128-bit accesses."""
    kernel = (
        "def narrow(x_ptr, y_ptr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):\n"
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
        "    m = offs < tl.load(y_ptr).to(tl.int32)\n"
        "    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2, mask=m)\n"
        "    tl.store(y_ptr + offs, tl.load(y_ptr + offs, mask=m) * 2, mask=m)\n"
    )
    check_own_kernel(tmp_path, "narrow", kernel, "{'x_ptr': torch.float32, 'y_ptr': torch.float32}", ("sm_90",),
                     "'128-bit' in rows[0]['problem']")


def test_check_fails_on_a_variant_that_spills(tmp_path):
    """A block too large for its math spills registers to local memory: the check says so
    on sm_90 (ptxas) and gfx942 (scratch)."""
    kernel = (
        "def spills(x_ptr, y_ptr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):\n"
        "    offs = tl.program_id(0) * 32768 + tl.arange(0, 32768)\n"
        "    a, b = tl.load(x_ptr + offs), tl.load(y_ptr + offs)\n"
        "    c, d = tl.load(x_ptr + offs + 32768), tl.load(y_ptr + offs + 32768)\n"
        "    tl.store(y_ptr + offs, tl.sqrt(a * b + c) / (d + a))\n"
        "    tl.store(x_ptr + offs, tl.exp(a * d - c) + b)\n"
    )
    check_own_kernel(tmp_path, "spills", kernel, "{'x_ptr': torch.float32, 'y_ptr': torch.float32}",
                     ("sm_90", "gfx942"), "all('spilled to local memory' in r['problem'] for r in rows)")


def test_an_ema_average_rounds_each_product_even_where_the_compiler_fuses(tmp_path):
    """An EMA's `decay * avg + (1 - decay) * x` rounds both products, as torch's two
    multiplies do. Compiled with fp fusion on (as the update kernels are, to match nvcc), a
    plain product feeding the sum became one fma: so averaging inside an optimizer's kernel
    switched fusion off for the whole update, whose numbers then differed from the same
    optimizer's without an average by an ulp. The products are now fmas with a zero addend
    (rounded once each, whatever the setting): every fma in the kernel's PTX adds zero."""
    code = (
        "import re, sys\n"
        "from fusedopt.kernels import _aot, averaging\n"
        "v, = [v for v in averaging.VARIANTS if v.name == 'average-axpby-float32']\n"
        "ptx = _aot.compile_variant(v, 'sm_90').asm['ptx']\n"
        "fmas = re.findall(r'fma\\.rn\\.f32\\s+[^,]+,\\s*[^,]+,\\s*[^,]+,\\s*([^;]+);', ptx)\n"
        "print(fmas)\n"
        "sys.exit(0 if fmas and all(a.strip() == '0f00000000' for a in fmas) else 1)\n"
    )
    run_compiling(tmp_path, "axpby", code)
