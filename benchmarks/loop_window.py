"""Measure, on this CPU, where torch's for-loop implementation beats its multi-tensor one:
the figures behind `fusedopt/_native.py`'s LOOP_WINDOW.

For each algorithm with a window and each tensor size, two torch.optim optimizers over
equal copies of the same tensors (`foreach=False` and `foreach=True`) step in alternating
order, each after a write to a buffer larger than the L3 cache (a training step's
optimizer starts with a cold cache: backward has just streamed activations through it).
It prints the for-loop's time over the multi-tensor time (the median over rounds of the
two timed in the same round, and its quartiles) beside what the window chooses now, and
checks that both paths gave the same parameters. Choosing a new window, and writing it
into `_native.py` with the figures, is left to the reader: a window should hold where the
for-loop wins on every CPU measured. (torch's two paths round some algorithms
differently, ASGD's and NAdam's among them: 'bitwise' then says no, which is torch's own
difference, not a fault of the measurement.)

    python benchmarks/loop_window.py [--algorithms RMSprop,NAdam] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusedopt import _native

SIZES_KB = (64, 128, 256, 512, 1024, 2048, 4096)
OPTIONS = {"RMSprop": dict(lr=1e-3), "NAdam": dict(lr=1e-3), "Adamax": dict(lr=1e-3), "Adadelta": dict(lr=1.0),
           "ASGD": dict(lr=1e-2)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default=",".join(_native.LOOP_WINDOW))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_KB)), help="tensor sizes in KB")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--total-mb", type=int, default=8, help="about this many MB of each stream per case")
    ap.add_argument("--evict-mb", type=int, default=64, help="the buffer written before each timed step")
    return ap.parse_args(argv)


def window_choice(name: str, nbytes: int) -> str:
    low, high = _native.LOOP_WINDOW.get(name, (None, None))
    inside = low is not None and nbytes >= low and (high is None or nbytes < high)
    return "for-loop" if inside else "multi-tensor"


def measure(name: str, nbytes: int, dtype: torch.dtype, rounds: int, total: int, evict: torch.Tensor) -> dict:
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    count = max(2, min(16, total // nbytes))
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen).to(dtype) for _ in range(count)]
    grads = [torch.randn(n, generator=gen).to(dtype) for _ in range(count)]
    params, opts = {}, {}
    for foreach in (False, True):
        params[foreach] = [torch.nn.Parameter(t.clone()) for t in start]
        for p, g in zip(params[foreach], grads):
            p.grad = g.clone()
        opts[foreach] = getattr(torch.optim, name)(params[foreach], **OPTIONS[name], foreach=foreach)
    for _ in range(3):
        for opt in opts.values():
            opt.step()
    ratios = []
    for r in range(rounds):
        took = {}
        for foreach in ((True, False) if r % 2 else (False, True)):
            evict.add_(1.0)
            begin = time.perf_counter()
            opts[foreach].step()
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
    print(f"{'algorithm':10s} {'size':>8s} {'tensors':>7s}  for-loop / multi-tensor  window now    bitwise")
    rows = []
    for name in args.algorithms.split(","):
        for kb in map(int, args.sizes.split(",")):
            row = measure(name, kb << 10, dtype, args.rounds, args.total_mb << 20, evict)
            rows.append(row)
            print(f"{name:10s} {kb:>6d}KB {row['tensors']:>7d}  {row['ratio']:.3f} ({row['q1']:.2f}-{row['q3']:.2f})"
                  f"          {row['window']:12s} {'yes' if row['same'] else 'NO'}", flush=True)
    return rows


if __name__ == "__main__":
    main()
