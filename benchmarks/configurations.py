"""Time fusedopt's default CPU step against torch.optim's paths on configurations the runner
(`python -m fusedopt.bench`: one group, every parameter with a gradient, contiguous
parameters) does not cover, and which training code often has:

* frozen layers: half the parameters without a gradient each step (fine-tuning);
* a parameter group per layer (layer-wise learning rates): 200 groups of a weight and its bias;
* convolution weights in channels_last (ResNet-50's list at the CPU size);
* `load_state_dict` of a 400-tensor optimizer.

Each round times one step (or call) of fusedopt and of each of torch's paths, in turn; a
row gives fusedopt's time over that of torch's fastest path, as the median over rounds of
the ratios taken in the same round, with its quartiles, and fusedopt's median time.
Every torch path is checked to give fusedopt's parameters (to 1e-6; `bitwise` says when
exactly) before it is timed, so the times are of the same work.

    python benchmarks/configurations.py [--rounds 60] [--size quick] [--out FILE]

`--out` also writes the table, the command, the CPU and the versions to FILE (markdown).
"""
from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time

import torch

import fusedopt
from fusedopt import _bench_shapes

ALGORITHMS = {"SGD": dict(momentum=0.9), "AdamW": {}, "NAdam": {}, "RMSprop": {}}
# torch's paths per algorithm: fused where torch has a fused CPU kernel
PATHS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
FUSED = {"SGD", "AdamW", "Adam", "Adagrad"}


def _params(shapes, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen)
        if channels_last and t.dim() == 4:
            t = t.to(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(t))
    return out


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen)) for p in params]


def _case(name: str, options: dict, shapes, groups=None, frozen=False, channels_last=False):
    """{label: (optimizer, params)} for fusedopt and each torch path, stepped twice."""
    made = {}
    labels = ["fusedopt"] + [k for k in PATHS if k != "fused" or name in FUSED]
    for label in labels:
        params = _params(shapes, channels_last=channels_last)
        given = params if groups is None else groups(params)
        if label == "fusedopt":
            opt = getattr(fusedopt, name)(given, lr=1e-3, **options)
        else:
            opt = getattr(torch.optim, name)(given, lr=1e-3, **options, **PATHS[label])
        made[label] = (opt, params)
    return made


def _set_grads(made, step, frozen):
    ref = next(iter(made.values()))[1]
    grads = _grads(ref, step)
    for _, params in made.values():
        for j, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if frozen and j % 2 == 0 else g.clone(memory_format=torch.preserve_format)


def time_steps(made, rounds: int, frozen: bool) -> dict:
    for step in range(3):
        _set_grads(made, step, frozen)
        for opt, _ in made.values():
            opt.step()
    mine = made["fusedopt"][1]
    agree = {}
    for label, (_, params) in made.items():
        if label != "fusedopt":
            agree[label] = (all(torch.equal(a, b) for a, b in zip(mine, params)),
                            all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(mine, params)))
    times = {label: [] for label in made}
    labels = list(made)
    for r in range(rounds):
        _set_grads(made, 3 + r % 2, frozen)
        # (each round starts with another path: the one after the gradients' writes, or
        # after another path's step, finds its memory in another state of the cache)
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            opt = made[label][0]
            t = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t)
    return _row(times, agree)


def time_loads(n: int, rounds: int) -> dict:
    made = {}
    for label, lib in (("fusedopt", fusedopt), ("for-loop", torch.optim)):
        params = _params([(8,)] * n)
        opt = lib.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        made[label] = (opt, copy.deepcopy(opt.state_dict()))
    times = {label: [] for label in made}
    for r in range(rounds):
        for label, (opt, saved) in (list(made.items()) if r % 2 else list(made.items())[::-1]):
            t = time.perf_counter()
            opt.load_state_dict(saved)
            times[label].append(time.perf_counter() - t)
    return _row(times, {"for-loop": (True, True)})


def _row(times, agree) -> dict:
    paths = [k for k in times if k != "fusedopt" and agree[k][1]]
    ratios = sorted(times["fusedopt"][r] / min(times[k][r] for k in paths) for r in range(len(times["fusedopt"])))
    q = statistics.quantiles(ratios, n=4)
    fastest = min(paths, key=lambda k: statistics.median(times[k]))
    return dict(ratio=statistics.median(ratios), q1=q[0], q3=q[2], ms=statistics.median(times["fusedopt"]) * 1e3,
                fastest=fastest, bitwise=",".join(k for k in paths if agree[k][0]) or "-",
                skipped=",".join(k for k in agree if not agree[k][1]) or "-")


def rows(rounds: int, size: str = "cpu"):
    cpu = _bench_shapes.cases(size)
    per_layer = [(64, 64), (64,)] * (100 if size == "cpu" else 5)
    configs = [
        ("frozen half, 2000 tiny tensors", cpu["tiny_many"], None, True, False),
        ("frozen half, GPT-2 list", cpu["gpt2_like"], None, True, False),
        ("200 groups of a weight and a bias", per_layer, lambda ps: [{"params": ps[i:i + 2]} for i in range(0, len(ps), 2)],
         False, False),
        ("ResNet-50 list, channels_last", cpu["resnet50_like"], None, False, True),
    ]
    for label, shapes, groups, frozen, channels_last in configs:
        for name, options in ALGORITHMS.items():
            made = _case(name, options, shapes, groups, frozen, channels_last)
            yield label, name, time_steps(made, rounds, frozen)
    count = 400 if size == "cpu" else 20
    yield f"load_state_dict, {count} tensors", "AdamW", time_loads(count, rounds)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--size", choices=("cpu", "quick"), default="cpu", help="quick: a smoke run")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    lines = ["| configuration | algorithm | fusedopt / torch's fastest (quartiles) | fusedopt ms | torch's fastest "
             "| bitwise equal to | not compared (differ) |", "|---|---|---|---|---|---|---|"]
    print(lines[0])
    for label, name, r in rows(args.rounds, args.size):
        results.append(dict(configuration=label, algorithm=name, **r))
        line = (f"| {label} | {name} | {r['ratio']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}) | {r['ms']:.3g} | {r['fastest']} "
                f"| {r['bitwise']} | {r['skipped']} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# fusedopt's CPU step on configurations beyond the runner's\n\n")
            f.write(f"    python benchmarks/configurations.py {shlex.join(sys.argv[1:] if argv is None else argv)}\n\n")
            f.write(f"{platform.processor() or platform.machine()}, one thread, torch {torch.__version__}, "
                    f"Python {platform.python_version()}\n\n")
            f.write("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
