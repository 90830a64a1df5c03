"""Ahead-of-time compilation of every kernel variant, with no GPU.

Each kernel module lists its variants (`VARIANTS`): the constexpr flags and dtypes a user
can reach, and how many tensor streams a whole block reads and writes. `check` compiles
each for NVIDIA sm_80 and sm_90 and AMD gfx942 and reads the assembly: a whole block must
move every stream with 128-bit accesses (PTX `ld.global.v4.b32`/`v2.b64`, AMDGCN
`global_load_dwordx4`), which is what the kernels' unmasked fast path is for. Pointer
arguments are compiled as 16-byte aligned (`tt.divisibility`), as a real launch on the
flat buffers and aligned parameters sees them.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from ._launch import NUM_WARPS, block_size
from ._triton import triton

TARGETS = {
    "sm_80": ("cuda", 80, 32),
    "sm_90": ("cuda", 90, 32),
    "gfx942": ("hip", "gfx942", 64),
}

TL_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.int64: "i64", torch.int32: "i32"}


@dataclass
class Variant:
    """One compiled specialisation of a kernel."""

    name: str
    kernel: object
    pointers: dict[str, torch.dtype]      # pointer arguments, in order, and their element dtypes
    constexprs: dict[str, object]         # BLOCK and ALIGN are added per target
    loads: int                            # tensor streams a whole block reads ...
    stores: int                           # ... and writes
    dtype: torch.dtype = torch.float32    # the streams' element type (for the expected count)
    scalars: dict[str, str] = field(default_factory=dict)  # non-pointer runtime args
    # Elements a program moves per stream, where the kernel sets it itself rather than by
    # the BLOCK the policy gives (SparseAdam: ROWS x WIDTH); None: that BLOCK.
    elements: int | None = None


def layout_pointers(param_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The leading pointer arguments every flat-state kernel shares (see `_launch.locate`)."""
    return {"anchor_ptr": param_dtype, "table_ptr": torch.int64, "segments_ptr": torch.int64,
            "numels_ptr": torch.int64, "block_tensor_ptr": torch.int32, "block_start_ptr": torch.int64}


def average_pointers(param_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The pointer arguments of an update kernel that can average (`averaging.average_into`)."""
    from ._launch import compute_dtype

    return {"avg_ptr": param_dtype, "avg_segments_ptr": torch.int64, "avg_scalars_ptr": compute_dtype(param_dtype)}


def compile_variant(v: Variant, target: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    per_target = dict(BLOCK=block_size(v.dtype, TARGETS[target][2]), ALIGN=16 // torch.empty((), dtype=v.dtype).element_size())
    constexprs = dict(v.constexprs, **{k: x for k, x in per_target.items() if k in v.kernel.arg_names})
    signature = {name: "*" + TL_TYPES[dt] for name, dt in v.pointers.items()}
    signature.update(v.scalars)
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(v.pointers))}
    src = ASTSource(v.kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget(*TARGETS[target]), options={"num_warps": NUM_WARPS})


def vector_accesses(asm: str, target: str) -> tuple[int, int]:
    """(128-bit global loads, 128-bit global stores) in the assembly."""
    if target.startswith("sm_"):
        loads = len(re.findall(r"ld\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64)", asm))
        stores = len(re.findall(r"st\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64)", asm))
    else:
        loads = len(re.findall(r"global_load_dwordx4", asm))
        stores = len(re.findall(r"global_store_dwordx4", asm))
    return loads, stores


def expected_vectors(v: Variant, target: str) -> int:
    """128-bit accesses per stream per thread in a whole block."""
    threads = NUM_WARPS * TARGETS[target][2]
    elements = block_size(v.dtype, TARGETS[target][2]) if v.elements is None else v.elements
    return elements * torch.empty((), dtype=v.dtype).element_size() // (threads * 16)


def ptxas_report(ptx: str, arch: int) -> str | None:
    """What ptxas says of the PTX's registers and local memory (`ptxas -v`), run with the
    ptxas Triton compiles with; None where this Triton does not say which that is."""
    try:
        from triton.backends.nvidia import compiler as nvidia
    except ImportError:
        return None
    try:   # (Triton 3.4 on: a knob with a path; before, a (path, version) pair; some take no arch)
        tool = nvidia.get_ptxas(arch)
    except TypeError:
        tool = nvidia.get_ptxas()
    except AttributeError:
        return None
    ptxas = tool.path if hasattr(tool, "path") else tool[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              "-o", os.devnull, src], capture_output=True, text=True)
    return out.stderr if out.returncode == 0 else None


def register_use(asm: str, target: str) -> tuple[int, int] | None:
    """(registers a thread, bytes spilled to local memory) for a compiled variant: from
    ptxas on NVIDIA (spill stores; sm_90 only, which the block policy is tuned for), from
    the AMDGCN's own metadata (VGPRs, scratch) on AMD. A streaming kernel keeps a few
    values per element in registers; a spill means a block too large for the math, and
    turns each spilled value into local-memory traffic beside the streams it was to save."""
    if target.startswith("sm_"):
        if target != "sm_90":
            return None
        report = ptxas_report(asm, TARGETS[target][1])
        regs = re.search(r"Used (\d+) registers", report or "")
        spills = re.search(r"(\d+) bytes spill stores", report or "")
        return (int(regs[1]), int(spills[1])) if regs and spills else None
    vgprs = re.search(r"NumVgprs: (\d+)", asm)
    scratch = re.search(r"ScratchSize: (\d+)", asm)
    return (int(vgprs[1]), int(scratch[1])) if vgprs and scratch else None


def check(variants: list[Variant], targets=tuple(TARGETS)) -> list[dict]:
    rows = []
    for v in variants:
        for target in targets:
            row = {"variant": v.name, "target": target, "width": "-", "regs": "-", "problem": ""}
            try:
                compiled = compile_variant(v, target)
            except Exception as exc:  # a compile failure is a row, not a crash
                row["problem"] = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                rows.append(row)
                continue
            asm = compiled.asm.get("ptx") or compiled.asm.get("amdgcn") or ""
            loads, stores = vector_accesses(asm, target)
            per_stream = expected_vectors(v, target)
            ok = loads >= v.loads * per_stream and stores >= v.stores * per_stream
            row["width"] = "128-bit" if ok else ("partly 128-bit" if loads or stores else "narrower")
            if not ok:
                row["problem"] = (f"{loads} 128-bit loads / {stores} stores; expected >= "
                                  f"{v.loads * per_stream} / {v.stores * per_stream}")
            use = register_use(asm, target)
            if use is not None:
                row["regs"] = str(use[0])
                if use[1]:
                    row["problem"] = "; ".join(filter(None, (row["problem"], f"{use[1]} bytes spilled to local memory")))
            elif target in ("sm_90", "gfx942"):
                row["problem"] = "; ".join(filter(None, (row["problem"], "register use not reported")))
            rows.append(row)
    return rows
