"""Tune the kernels' block policy on a GPU: time fusedopt's step under each (warps, 128-bit
vectors per thread) pair and report, for each runner row, the achieved GB/s of each pair
and the best one.

The policy lives in one place, `fusedopt/kernels/_launch.py` (NUM_WARPS and
VECTORS_PER_THREAD; BLOCK follows from them and the dtype). This script sets those two
module attributes before each run of the runner (`fusedopt.bench`, which launches through
`_launch.block_config` and so reads them at every launch), and leaves choosing the winner,
and writing it into `_launch.py`, to the person reading the table. On a lent GPU:

    python benchmarks/block_sweep.py --out benchmarks/results/<gpu>/sweep

writes each configuration's runner output under --out and `sweep.json`/`sweep.md` beside
them. `--quick` is the runner's smoke size (what the test suite runs on the CPU, where the
Triton path is not taken and the table only shows that the script works).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIGS = [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--algorithms", default="Adam,AdamW,SGD-momentum,Adagrad,RMSprop")
    ap.add_argument("--cases", default="few_large,gpt2_like,tiny_many")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--configs", default=",".join(f"{w}x{v}" for w, v in CONFIGS),
                    help="comma-separated WARPSxVECTORS pairs")
    ap.add_argument("--quick", action="store_true", help="the runner's smoke size")
    ap.add_argument("--out", default="bench-results/sweep")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    from fusedopt import bench
    from fusedopt.kernels import _launch

    args = parse_args(argv)
    out = Path(args.out)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    default = (_launch.NUM_WARPS, _launch.VECTORS_PER_THREAD)
    table: dict[tuple, dict[str, float]] = {}
    try:
        for warps, vectors in configs:
            _launch.NUM_WARPS, _launch.VECTORS_PER_THREAD = warps, vectors
            name = f"{warps}x{vectors}"
            runner = ["--algorithms", args.algorithms, "--cases", args.cases, "--dtypes", args.dtypes,
                      "--out", str(out / name), "--no-progress"]
            runner += ["--device", args.device] if args.device else []
            runner += ["--quick"] if args.quick else []
            for row in bench.main(runner)["rows"]:
                table.setdefault((row["case"], row["algorithm"], row["dtype"]), {})[name] = row["gbps"]
    finally:
        _launch.NUM_WARPS, _launch.VECTORS_PER_THREAD = default
    names = [f"{w}x{v}" for w, v in configs]
    lines = ["| case | algorithm | dtype | " + " | ".join(f"{n} GB/s" for n in names) + " | best |",
             "|---" * (len(names) + 4) + "|"]
    rows = []
    for (case, algo, dtype), by in table.items():
        best = max(by, key=by.get)
        rows.append(dict(case=case, algorithm=algo, dtype=dtype, gbps=by, best=best))
        lines.append(f"| {case} | {algo} | {dtype} | " + " | ".join(f"{by.get(n, float('nan')):.3g}" for n in names)
                     + f" | {best} |")
    result = {"configs": names, "default": f"{default[0]}x{default[1]}", "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
