"""`python -m fusedopt.kernels --check`: compile every kernel variant ahead of time.

No GPU is needed. Prints one row per (variant, target) with the width of the whole-block
global accesses, the registers a thread uses (sm_90, from ptxas; gfx942, VGPRs) and any
problem, and exits non-zero if a variant fails to compile, its accesses on 16-byte aligned
buffers are not 128-bit, or it spills registers to local memory.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compile every variant for sm_80, sm_90, gfx942")
    parser.add_argument("--target", action="append", help="limit to these targets (repeatable)")
    parser.add_argument("-k", dest="pattern", default="", help="only variants whose name contains this")
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fusedopt.kernels --check compiles for real GPUs: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    from . import _aot, all_variants

    variants = [v for v in all_variants() if args.pattern in v.name]
    rows = _aot.check(variants, tuple(args.target or _aot.TARGETS))
    width = max(len(r["variant"]) for r in rows)
    print(f"{'variant':<{width}}  target  access    regs  problem")
    for r in rows:
        print(f"{r['variant']:<{width}}  {r['target']:<6}  {r['width']:<8}  {r['regs']:>4}  {r['problem']}")
    failed = [r for r in rows if r["problem"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} variant builds OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
