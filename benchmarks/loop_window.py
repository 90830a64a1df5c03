"""Measure, on this CPU, where torch's for-loop implementation beats its multi-tensor one:
the figures behind `fusedopt/_native.py`'s LOOP_WINDOW.

For each algorithm with a window and each tensor size, torch's functional API (what the
native path calls: `torch.optim.rmsprop.rmsprop`, ...) steps equal copies of the same
tensors with `foreach=False` and `foreach=True`, in alternating order, each after a write
to a buffer larger than the L3 cache (a training step's optimizer starts with a cold
cache: backward has just streamed activations through it).
It prints the for-loop's time over the multi-tensor time (the median over rounds of the
two timed in the same round, and its quartiles) beside what the window chooses now, and
checks that both paths gave the same parameters. Choosing a new window, and writing it
into `_native.py` with the figures, is left to the reader: a window should hold where the
for-loop wins on every CPU measured. (torch's two paths round some algorithms
differently, ASGD's and NAdam's among them: 'bitwise' then says no, which is torch's own
difference, not a fault of the measurement.)

    python benchmarks/loop_window.py [--algorithms RMSprop,NAdam] [--dtype bf16] [--out FILE]

`--out` also writes the table, the command, the CPU and the versions to FILE (markdown).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from torch.optim import adadelta, adamax, asgd, nadam, rmsprop

from fusedopt import _native, bench

SIZES_KB = (64, 128, 256, 512, 1024, 2048, 4096)


def _step(name: str, params, grads, first, second, foreach: bool):
    """One step of torch's functional `name` with default hyperparameters: `first` and
    `second` are its per-element state tensors (one or two), the step counts made here."""
    n = len(params)
    steps = [torch.tensor(3.0) for _ in range(n)]
    if name == "RMSprop":
        return lambda: rmsprop.rmsprop(params, grads, first, [], [], steps, foreach=foreach, lr=1e-2, alpha=0.99,
                                       eps=1e-8, weight_decay=0, momentum=0, centered=False)
    if name == "Adamax":
        return lambda: adamax.adamax(params, grads, first, second, steps, foreach=foreach, eps=1e-8, beta1=0.9,
                                     beta2=0.999, lr=2e-3, weight_decay=0)
    if name == "Adadelta":
        return lambda: adadelta.adadelta(params, grads, first, second, steps, foreach=foreach, lr=1.0, rho=0.9,
                                         eps=1e-6, weight_decay=0, maximize=False)
    if name == "NAdam":
        mu_products = [torch.tensor(1.0) for _ in range(n)]
        return lambda: nadam.nadam(params, grads, first, second, mu_products, steps, foreach=foreach, beta1=0.9,
                                   beta2=0.999, lr=2e-3, weight_decay=0, momentum_decay=4e-3, eps=1e-8)
    if name == "ASGD":
        etas, mus = [torch.tensor(1e-2) for _ in range(n)], [torch.tensor(1.0) for _ in range(n)]
        return lambda: asgd.asgd(params, grads, first, mus, etas, steps, foreach=foreach, lambd=1e-4, lr=1e-2,
                                 t0=1e6, alpha=0.75, weight_decay=0)
    raise SystemExit(f"no functional call for {name!r} here; choose from RMSprop, Adamax, Adadelta, NAdam, ASGD")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default=",".join(_native.LOOP_WINDOW))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_KB)), help="tensor sizes in KB")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--total-mb", type=int, default=8, help="about this many MB of each stream per case")
    ap.add_argument("--evict-mb", type=int, default=64, help="the buffer written before each timed step")
    ap.add_argument("--out", default=None, help="also write the table, with the command and the CPU, here")
    return ap.parse_args(argv)


def window_choice(name: str, nbytes: int) -> str:
    low, high = _native.LOOP_WINDOW.get(name, (None, None))
    inside = low is not None and nbytes >= low and (high is None or nbytes < high)
    return "for-loop" if inside else "multi-tensor"


def measure(name: str, nbytes: int, dtype: torch.dtype, rounds: int, total: int, evict: torch.Tensor) -> dict:
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    count = max(2, min(16, total // nbytes))
    gen = torch.Generator().manual_seed(0)
    # parameters, then two state tensors, non-negative (square averages among them)
    start = [[(torch.randn if k == 0 else torch.rand)(n, generator=gen).to(dtype) for _ in range(count)]
             for k in range(3)]
    grads = [torch.randn(n, generator=gen).to(dtype) for _ in range(count)]
    params, steps = {}, {}
    for foreach in (False, True):
        p, first, second = ([t.clone() for t in ts] for ts in start)
        params[foreach] = p
        steps[foreach] = _step(name, p, grads, first, second, foreach)
    for _ in range(3):
        for step in steps.values():
            step()
    ratios = []
    for r in range(rounds):
        took = {}
        for foreach in ((True, False) if r % 2 else (False, True)):
            evict.add_(1.0)
            begin = time.perf_counter()
            steps[foreach]()
            took[foreach] = time.perf_counter() - begin
        ratios.append(took[False] / took[True])
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    same = all(torch.equal(a, b) for a, b in zip(params[False], params[True]))
    return dict(algorithm=name, kb=nbytes >> 10, tensors=count, ratio=statistics.median(ratios), q1=q1, q3=q3,
                window=window_choice(name, nbytes), same=same)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    evict = torch.empty((args.evict_mb << 20) // 4)
    dtype = DTYPES[args.dtype]
    lines = [f"| algorithm | size | tensors | for-loop / multi-tensor (quartiles) | window now | bitwise |",
             "|---|---|---|---|---|---|"]
    print(f"{'algorithm':10s} {'size':>8s} {'tensors':>7s}  for-loop / multi-tensor  window now    bitwise")
    rows = []
    for name in args.algorithms.split(","):
        for kb in map(int, args.sizes.split(",")):
            row = measure(name, kb << 10, dtype, args.rounds, args.total_mb << 20, evict)
            rows.append(row)
            same = "yes" if row["same"] else "no"
            print(f"{name:10s} {kb:>6d}KB {row['tensors']:>7d}  {row['ratio']:.3f} ({row['q1']:.2f}-{row['q3']:.2f})"
                  f"          {row['window']:12s} {same}", flush=True)
            lines.append(f"| {name} | {kb} KB | {row['tensors']} | {row['ratio']:.3f} ({row['q1']:.2f}-{row['q3']:.2f}) "
                         f"| {row['window']} | {same} |")
    if args.out:
        argv = sys.argv[1:] if argv is None else argv
        head = [f"# torch's for-loop against its multi-tensor code: {bench._device_name(torch.device('cpu'))}, "
                "1 thread", "",
                f"- command: `python benchmarks/loop_window.py {shlex.join(argv)}`",
                "- versions: " + ", ".join(f"{k} {v}" for k, v in bench._versions().items()),
                f"- {args.dtype} tensors, {args.rounds} rounds, a {args.evict_mb} MB buffer written before each timed "
                "step; below 1: the for-loop is faster", ""]
        with open(args.out, "w") as f:
            f.write("\n".join(head + lines) + "\n")
    return rows

if __name__ == "__main__":
    main()
