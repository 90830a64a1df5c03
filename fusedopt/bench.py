"""The benchmark runner: fusedopt's `step()` against torch.optim's for-loop, foreach and
fused paths, on the parameter lists of models that matter.

    python -m fusedopt.bench                       # every algorithm, case and dtype
    python -m fusedopt.bench --quick --out /tmp/b  # a smoke run on tiny shapes
    python -m fusedopt.bench --algorithms AdamW,SGD-momentum --cases tiny_many --dtypes fp32

Each row is one (case, algorithm, dtype): the same parameters and gradients stepped by
every path, timed interleaved (one step of each path per round, rotating the order) so
that a noisy machine slows them alike; the median of the rounds after warm-up is
reported. CUDA steps are timed with events; CPU steps with perf_counter. Before timing,
every path takes one step from the same start and is compared with torch's for-loop: a
path that does not agree is marked and never counts as torch's fastest.

A row reports each path's time, fusedopt's time over torch's fastest agreeing path, and
fusedopt's achieved bandwidth: the bytes the algorithm must move per element
(`bytes_per_element`) times the elements, over the time, next to a copy-bandwidth
ceiling (`dst.copy_(src)`) measured on the same device. Results go to results.json,
results.md (a summary and the table) and results.png in --out, and the table to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import fusedopt

from . import _bench_shapes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "fp16": torch.float16}
TORCH_PATHS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
IMPLS = tuple(TORCH_PATHS) + ("fusedopt",)


# ----------------------------------------------------------------------------- algorithms

@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    cls: str                        # the class name in torch.optim and in fusedopt
    options: dict
    # fusedopt-only options (master_weights=, ...): given to fusedopt's class only
    fused_options: dict = dataclasses.field(default_factory=dict)
    # an EMA of the parameters updated every step: torch's paths call its AveragedModel's
    # update_parameters after step(); fusedopt's attaches its AveragedModel to the optimizer
    ema: bool = False


ALGORITHMS = [
    Algorithm("SGD", "SGD", dict(lr=1e-2)),
    Algorithm("SGD-momentum", "SGD", dict(lr=1e-2, momentum=0.9)),
    Algorithm("Adam", "Adam", dict(lr=1e-3)),
    Algorithm("Adam-amsgrad", "Adam", dict(lr=1e-3, amsgrad=True)),
    Algorithm("AdamW", "AdamW", dict(lr=1e-3, weight_decay=1e-2)),
    Algorithm("NAdam", "NAdam", dict(lr=1e-3)),
    Algorithm("RAdam", "RAdam", dict(lr=1e-3)),
    Algorithm("Adamax", "Adamax", dict(lr=1e-3)),
    Algorithm("Adagrad", "Adagrad", dict(lr=1e-2)),
    Algorithm("Adadelta", "Adadelta", dict(lr=1.0)),
    Algorithm("RMSprop", "RMSprop", dict(lr=1e-3)),
    Algorithm("RMSprop-momentum", "RMSprop", dict(lr=1e-3, momentum=0.9)),
    Algorithm("RMSprop-centered", "RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)),
    Algorithm("Rprop", "Rprop", dict(lr=1e-3)),
    Algorithm("ASGD", "ASGD", dict(lr=1e-2)),
]
# fusedopt-only modes, against torch's AdamW with the same options, to the same effect where
# torch has a recipe for it: the clipped mode's torch paths run clip_grad_norm_ before each
# step, the master-weight mode's keep fp32 copies of bf16/fp16 parameters (`_MasterRecipe`),
# as a user would. Low-precision state and stochastic rounding have none: their torch paths
# are plain AdamW, which keeps fp32 state and rounds to nearest.
MODES = [
    Algorithm("AdamW-master", "AdamW", dict(lr=1e-3, weight_decay=1e-2), dict(master_weights=True)),
    Algorithm("AdamW-bf16-state", "AdamW", dict(lr=1e-3, weight_decay=1e-2), dict(state_dtype=torch.bfloat16)),
    Algorithm("AdamW-sr", "AdamW", dict(lr=1e-3, weight_decay=1e-2), dict(stochastic_rounding=True)),
    Algorithm("AdamW-clip", "AdamW", dict(lr=1e-3, weight_decay=1e-2), dict(max_grad_norm=1.0)),
    Algorithm("AdamW-ema", "AdamW", dict(lr=1e-3, weight_decay=1e-2), ema=True),
]
# AveragedModel.update_parameters, against torch.optim.swa_utils: torch's per-tensor
# average function is its 'for-loop', its multi-tensor one its 'foreach'; fusedopt gets
# the multi-tensor one (the same formula as torch's fastest path).
AVERAGES = ("AveragedModel-SWA", "AveragedModel-EMA")
EMA_DECAY = 0.999


def state_streams(cls: str, options: dict) -> int:
    """How many per-element state tensors one step reads and writes (each once)."""
    if cls == "SGD":
        return int(options.get("momentum", 0) != 0)
    if cls in ("Adam", "AdamW"):
        return 2 + bool(options.get("amsgrad", False))
    if cls == "RMSprop":
        return 1 + (options.get("momentum", 0) > 0) + bool(options.get("centered", False))
    return {"NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2, "Rprop": 2, "Adagrad": 1, "ASGD": 1}[cls]


def _written_only(cls: str, options: dict) -> int:
    """State streams a step writes without reading them: ASGD's average `ax` until averaging
    starts (step t0, 1e6 by default: until then torch copies the parameter into it)."""
    return int(cls == "ASGD")


def bytes_per_element(cls: str, options: dict, param_dtype: torch.dtype,
                      state_dtype: torch.dtype | None = None, fused_options: dict | None = None,
                      ema: bool = False) -> int:
    """The bytes one step must move per parameter element: read the parameter, its
    gradient and each state tensor, write the parameter and each state tensor, once each.

    fp32 Adam: 7 * 4 = 28 (read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq);
    SGD 12, with momentum 20; Adagrad 20; ASGD 16 (its average is written, not read, until
    averaging starts at step t0); RMSprop 20, 28 with momentum, 36 centered
    with momentum; amsgrad 36. State takes the parameter's dtype unless `state_dtype` says
    otherwise (as torch, fusedopt keeps bf16 state for bf16 parameters). An AveragedModel
    update ('AveragedModel') reads the average and the model's tensor and writes the average;
    fused into the step (`ema`), the parameter is already in registers: the average's read
    and write add 2 * 4 bytes to fp32 Adam's 28 (36; the step then update_parameters: 40).
    """
    fused_options = fused_options or {}
    p = torch.empty((), dtype=param_dtype).element_size()
    low = param_dtype in (torch.bfloat16, torch.float16)
    master = bool(fused_options.get("master_weights")) and low
    # master weights keep fp32 moments unless state_dtype says otherwise
    state_dtype = fused_options.get("state_dtype") or state_dtype or (torch.float32 if master else param_dtype)
    s = torch.empty((), dtype=state_dtype).element_size()
    if cls == "AveragedModel":
        return 3 * p
    total = 3 * p + 2 * state_streams(cls, options) * s - _written_only(cls, options) * s
    if master:  # the fp32 copy is read and written too (the parameter is read to see writes)
        total += 2 * 4
    if fused_options.get("max_grad_norm") is not None:  # the norm reads the gradient once more
        total += p
    if ema:
        total += 2 * p
    return total


# ----------------------------------------------------------------------------- timing

class Timer:
    """Seconds one call takes: CUDA events on a GPU (the device's timeline, host gaps
    included), perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


@dataclasses.dataclass
class Settings:
    repeat: int          # rounds at most
    warmup: int          # untimed steps of each path first
    min_rounds: int      # rounds at least, whatever the budget
    budget: float        # seconds per path and row after which a path stops being timed


def measure(fns: dict[str, Callable[[], object]], timer: Timer, s: Settings) -> dict[str, dict]:
    """Median milliseconds of each function, timed in interleaved rounds, and each round's
    time (`samples_ms`, in round order: entry i of every path is from round i).

    A path past its time budget (a Python for-loop over thousands of tensors) stops after
    `min_rounds`, so one slow path does not stretch the run; it stops for good (its sum
    only grows), so its rounds are the first ones of every other path.
    """
    for fn in fns.values():
        for _ in range(s.warmup):
            fn()
    timer.sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(s.repeat):
        active = [k for k in fns if len(samples[k]) < s.min_rounds or sum(samples[k]) < s.budget]
        if not active:
            break
        shift = r % len(active)
        for k in active[shift:] + active[:shift]:
            samples[k].append(timer(fns[k]))
    return {k: dict(ms=statistics.median(v) * 1e3, rounds=len(v),
                    iqr_ms=(_quantile(v, 0.75) - _quantile(v, 0.25)) * 1e3, samples_ms=[t * 1e3 for t in v])
            for k, v in samples.items()}


def paired_ratio(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """The median over rounds of our time over theirs in the same round, and the quartiles
    of those ratios. A shared machine's slow spells (another job's burst) slow every path
    of a round alike, which this cancels and a ratio of two medians does not."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return statistics.median(ratios), _quantile(ratios, 0.25), _quantile(ratios, 0.75)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def copy_ceiling(device: torch.device, timer: Timer, numel: int, rounds: int) -> float:
    """GB/s of `dst.copy_(src)` of `numel` fp32 elements on the device: 2 * numel * 4 bytes."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for r in range(rounds + 2):
        t = timer(lambda: dst.copy_(src))
        if r >= 2:
            times.append(t)
    return 2 * numel * 4 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- rows

# Agreement after one step, per element: within a few units in the last place of the
# larger of the value before and after (so that a result near zero, where two correct
# roundings of the same formula differ most in relative terms, is judged on its inputs'
# scale). A path agrees when at most 0.1% of the elements fall outside; a path that does
# not move, or moves differently, misses far more.
AGREE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}
AGREE_FRACTION = 1e-3


def _mismatch(tensors: list[torch.Tensor], reference: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    bad = total = 0
    for a, b, s in zip(tensors, reference, before):
        a, b, s = a.detach().double(), b.detach().double(), s.detach().double()
        tol = AGREE_RTOL.get(reference[0].dtype, 1e-4) * torch.maximum(b.abs(), s.abs())
        off = ((a - b).abs() > tol) & ~(a.isnan() & b.isnan())
        bad += int(off.sum())
        total += off.numel()
    return bad / max(total, 1)


def _clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.detach().clone()
        out.append(q)
    return out


def _paths(opt) -> list[str]:
    return sorted({b.path for _, buckets in opt._buckets.values() for b in buckets})


def step_row(case: str, shapes, algo: Algorithm, dtype: torch.dtype, device: torch.device,
             timer: Timer, s: Settings) -> dict:
    base = _bench_shapes.make(shapes, dtype, device)
    torch_cls, fused_cls = getattr(torch.optim, algo.cls), getattr(fusedopt, algo.cls)
    max_norm = algo.fused_options.get("max_grad_norm")
    recipe = bool(algo.fused_options.get("master_weights")) and dtype in (torch.bfloat16, torch.float16)
    opts, params, notes, emas = {}, {}, {}, {}
    result = _row_header(case, algo.name, algo.cls, dtype, base)
    for name in IMPLS:
        ps = _clone(base)
        try:
            if name == "fusedopt":
                opts[name] = fused_cls(ps, **algo.options, **algo.fused_options)
            elif recipe:
                opts[name] = _MasterRecipe(torch_cls, ps, algo.options, name)
            else:
                opts[name] = torch_cls(ps, **algo.options, **TORCH_PATHS[name])
        except (RuntimeError, ValueError, TypeError) as e:   # torch has no such path here
            notes[name] = f"unavailable: {e}"
            continue
        params[name] = ps
        if algo.ema:
            emas[name] = _ema(name, opts[name], ps)
    before = [p.detach().clone() for p in base]
    del base
    result["bytes_per_element"] = bytes_per_element(algo.cls, algo.options, dtype, fused_options=algo.fused_options,
                                                    ema=algo.ema)

    def stepper(name, opt):
        if name in emas and name != "fusedopt":
            averaged, model = emas[name]
            return lambda: (opt.step(), averaged.update_parameters(model))
        if max_norm is None or name == "fusedopt":
            return opt.step
        return lambda: (torch.nn.utils.clip_grad_norm_(params[name], max_norm, foreach=name != "forloop"), opt.step())

    steps = {name: stepper(name, opt) for name, opt in opts.items()}
    # The first step of every path from the same start, compared with torch's for-loop.
    # A path that fails (fusedopt's compiled kernel included: never yet run on a GPU) is
    # noted in its row, and the others are timed.
    for name, step in list(steps.items()):
        try:
            step()
        except Exception as e:   # noqa: BLE001 - a compile error is not a RuntimeError
            notes[name] = f"failed: {type(e).__name__}: {e}"
            del opts[name], steps[name]
    timer.sync()
    mismatch = {name: _mismatch(params[name], params["forloop"], before) for name in opts}
    timings = measure(steps, timer, dataclasses.replace(s, warmup=max(s.warmup - 1, 0)))
    result["fusedopt_path"] = ",".join(_paths(opts["fusedopt"])) if "fusedopt" in opts else "failed"
    return _finish(result, timings, mismatch, notes)


class _MasterRecipe:
    """fp32 master weights the torch.optim way, for bf16/fp16 parameters: the optimizer
    steps fp32 copies, whose gradients are the parameters' widened, and the parameters are
    then the copies rounded. `fusedopt`'s `master_weights=True` does this inside the step."""

    def __init__(self, torch_cls, params, options: dict, path: str):
        self.params = params
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        self.opt = torch_cls(self.masters, **options, **TORCH_PATHS[path])
        self.foreach = path != "forloop"

    @torch.no_grad()
    def step(self) -> None:
        grads = [m.grad for m in self.masters]
        if self.foreach:
            torch._foreach_copy_(grads, [p.grad for p in self.params])
            self.opt.step()
            torch._foreach_copy_(self.params, self.masters)
            return
        for g, p in zip(grads, self.params):
            g.copy_(p.grad)
        self.opt.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)


class _Shapes(torch.nn.Module):
    """A list of parameters as a model, for AveragedModel."""

    def __init__(self, params):
        super().__init__()
        self.ps = torch.nn.ParameterList(params)


def _ema(name: str, opt, params):
    """An EMA of `params` for an optimizer: fusedopt's attached to it, torch's for the
    caller to update after each step. Returns (averaged model, model)."""
    from torch.optim import swa_utils

    from . import swa

    model = _Shapes(params)
    module = swa if name == "fusedopt" else swa_utils
    averaged = module.AveragedModel(model, multi_avg_fn=module.get_ema_multi_avg_fn(EMA_DECAY))
    if name == "fusedopt":
        opt.attach_averaged_model(averaged, model)
    return averaged, model


def average_row(case: str, shapes, average: str, dtype: torch.dtype, device: torch.device,
                timer: Timer, s: Settings, swa) -> dict:
    from torch.optim import swa_utils

    Shapes = _Shapes
    model = Shapes(_bench_shapes.make(shapes, dtype, device))
    with torch.no_grad():
        moved = Shapes(_clone(list(model.ps)))   # a second model state, so averages move
        for p in moved.ps:
            p.add_(p.grad)
    if average == "AveragedModel-SWA":
        kinds = {"forloop": (swa_utils, dict(avg_fn=swa_utils.get_swa_avg_fn())),
                 "foreach": (swa_utils, dict(multi_avg_fn=swa_utils.get_swa_multi_avg_fn())),
                 "fusedopt": (swa, dict(multi_avg_fn=swa.get_swa_multi_avg_fn()))}
    else:
        kinds = {"forloop": (swa_utils, dict(avg_fn=swa_utils.get_ema_avg_fn(EMA_DECAY))),
                 "foreach": (swa_utils, dict(multi_avg_fn=swa_utils.get_ema_multi_avg_fn(EMA_DECAY))),
                 "fusedopt": (swa, dict(multi_avg_fn=swa.get_ema_multi_avg_fn(EMA_DECAY)))}
    averaged, notes = {}, {"fused": "unavailable: torch has no fused average"}
    for name, (module, kwargs) in kinds.items():
        averaged[name] = module.AveragedModel(model, **kwargs)
        averaged[name].update_parameters(model)     # the first update copies
        averaged[name].update_parameters(moved)
    timer.sync()
    result = _row_header(case, average, "AveragedModel", dtype, list(model.ps))
    result["bytes_per_element"] = bytes_per_element("AveragedModel", {}, dtype)
    mismatch = {name: _mismatch(list(a.module.parameters()), list(averaged["forloop"].module.parameters()),
                                list(model.ps)) for name, a in averaged.items()}
    timings = measure({name: (lambda a=a: a.update_parameters(model)) for name, a in averaged.items()}, timer, s)
    buckets = getattr(getattr(averaged["fusedopt"], "_layout", None), "buckets", [])
    result["fusedopt_path"] = ",".join(sorted({getattr(b, "path", "?") for b in buckets}))
    return _finish(result, timings, mismatch, notes)


def _row_header(case: str, algorithm: str, cls: str, dtype: torch.dtype, params) -> dict:
    return dict(case=case, algorithm=algorithm, cls=cls, dtype=str(dtype).replace("torch.", ""),
                tensors=len(params), elements=sum(p.numel() for p in params))


def _finish(result: dict, timings: dict, mismatch: dict, notes: dict) -> dict:
    """The row: every path's timing and agreement, torch's fastest agreeing path (by
    median), and fusedopt's ratio to it (`paired_ratio`, with its quartiles)."""
    paths, samples = {}, {}
    for name in IMPLS:
        if name in timings:
            agrees = mismatch[name] <= AGREE_FRACTION
            timing = dict(timings[name])
            samples[name] = timing.pop("samples_ms", None)
            paths[name] = dict(timing, mismatch=mismatch[name], agrees=agrees)
        else:
            paths[name] = dict(ms=None, note=notes.get(name, "unavailable"))
    result["paths"] = paths
    candidates = {k: v["ms"] for k, v in paths.items() if k != "fusedopt" and v.get("ms") is not None and v["agrees"]}
    best = min(candidates, key=candidates.get) if candidates else None
    ms = paths["fusedopt"]["ms"]
    # A fusedopt that disagrees with torch's for-loop keeps its ratio, marked: the summary
    # and the plot must not show a speed-up of wrong numbers as one.
    result["fusedopt_agrees"] = paths["fusedopt"].get("agrees")
    result["torch_best"] = best
    result["torch_best_ms"] = candidates.get(best)
    result["ratio"] = result["ratio_quartiles"] = None
    if best and ms:
        if samples["fusedopt"] and samples[best]:
            ratio, low, high = paired_ratio(samples["fusedopt"], samples[best])
            result["ratio"], result["ratio_quartiles"] = ratio, [low, high]
        else:
            result["ratio"] = ms / candidates[best]
    moved = result["bytes_per_element"] * result["elements"]
    result["gbps"] = moved / (ms * 1e-3) / 1e9 if ms else None
    result["torch_best_gbps"] = moved / (candidates[best] * 1e-3) / 1e9 if best else None
    return result


# ----------------------------------------------------------------------------- output

def _where(meta: dict) -> str:
    threads = meta.get("threads")
    return meta["device_name"] + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    """The printed table: one line per row, times in ms."""
    ceiling = results["meta"]["copy_gbps"]
    head = ["case", "algorithm", "dtype", "for-loop", "foreach", "fused", "fusedopt", "path", "vs fastest",
            "quartiles", "GB/s", "% copy"]
    lines = [head]
    for r in results["rows"]:
        cells = []
        for name in IMPLS:
            info = r["paths"][name]
            cell = _fmt(info.get("ms"))
            if info.get("ms") is not None and not info["agrees"]:
                cell += "!"
            cells.append(cell)
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        quartiles = r.get("ratio_quartiles")
        spread = "-" if not quartiles else f"{quartiles[0]:.2f}-{quartiles[1]:.2f}"
        pct = "-" if r["gbps"] is None else f"{100 * r['gbps'] / ceiling:.0f}%"
        lines.append([r["case"], r["algorithm"], r["dtype"], *cells, r.get("fusedopt_path", ""), ratio, spread,
                      _fmt(r["gbps"]), pct])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    meta = results["meta"]
    out.append(f"times: median ms per step ({_where(meta)}); "
               "vs fastest: the median over rounds of fusedopt / torch's fastest agreeing path (by median) in the "
               f"same round; quartiles: of those per-round ratios; copy ceiling {ceiling:.3g} GB/s; "
               "! = disagrees with torch's for-loop after one step (never counted as fastest)")
    return "\n".join(out)


def summary(results: dict) -> str:
    """A markdown matrix: one line per algorithm, one column per case and dtype, each cell
    fusedopt's time over torch's fastest agreeing path, and fusedopt's median ms."""
    rows = results["rows"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    cols = sorted(dict.fromkeys((r["case"], r["dtype"]) for r in rows), key=lambda cd: dtypes.index(cd[1]))
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    short = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64", "float16": "fp16"}
    lines = ["| algorithm | " + " | ".join(f"{c} {short.get(d, d)}" for c, d in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for algo in algos:
        cells = []
        for c, d in cols:
            hit = [r for r in rows if r["algorithm"] == algo and r["case"] == c and r["dtype"] == d]
            if not hit or hit[0]["ratio"] is None:
                cells.append("-")
            else:
                r = hit[0]
                mark = "!" if r.get("fusedopt_agrees") is False else ""
                cells.append(f"{r['ratio']:.2f}x{mark} ({r['paths']['fusedopt']['ms']:.3g} ms)")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict) -> str:
    """results.md: where and how the numbers were taken, the summary, the full table."""
    m = results["meta"]
    return "\n".join([
        f"# fusedopt vs torch.optim: {_where(m)}", "",
        f"- command: `{m['command']}`",
        f"- torch {m['torch']}, triton {m['triton']}, Python {m['python']}; {m['date']}",
        f"- copy ceiling: {m['copy_gbps']:.3g} GB/s (`dst.copy_(src)`, {m['copy_numel']} fp32 elements)",
        f"- rounds: at most {m['settings']['repeat']} after {m['settings']['warmup']} warm-up step(s), "
        f"at least {m['settings']['min_rounds']}, a path stopping after {m['settings']['budget']} s; "
        "median, paths interleaved", "",
        "fusedopt's time over that of torch's fastest path (by median) that agrees with torch's for-loop after "
        "one step, the median over rounds of the two timed in the same round (below 1: fusedopt faster), and "
        "fusedopt's median time per step (`!`: fusedopt's own step disagreed with torch's for-loop; such a "
        "row is left out of the plot):", "",
        summary(results), "", "Every path:", "", "```", table(results), "```", ""])


def plot(results: dict, path: Path) -> bool:
    """Ratio and GB/s by model and algorithm, one column per dtype. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return False
    rows = [r for r in results["rows"] if r["ratio"] is not None and r.get("fusedopt_agrees") is not False]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows)) or ["float32"]
    cases = [c for c in _bench_shapes.CASE_NAMES if any(r["case"] == c for r in rows)]
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    ceiling = results["meta"]["copy_gbps"]
    fig, axes = plt.subplots(2, len(dtypes), figsize=(max(8.0, 0.55 * len(algos) * len(dtypes) + 2), 8),
                             squeeze=False)
    width = 0.8 / max(len(cases), 1)
    for col, dt in enumerate(dtypes):
        for row_i, (key, label) in enumerate((("ratio", "fusedopt time / torch's fastest"), ("gbps", "fusedopt GB/s"))):
            ax = axes[row_i][col]
            for ci, case in enumerate(cases):
                xs, ys = [], []
                for ai, algo in enumerate(algos):
                    hit = [r for r in rows if r["case"] == case and r["algorithm"] == algo and r["dtype"] == dt]
                    if hit and hit[0][key]:
                        xs.append(ai + (ci - (len(cases) - 1) / 2) * width)
                        ys.append(hit[0][key])
                ax.bar(xs, ys, width, label=case)
            if key == "ratio":
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(ticker.FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200]))
                ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.set_title(f"{dt}: below 1 = fusedopt faster")
            else:
                ax.axhline(ceiling, color="black", linestyle="--", linewidth=0.8, label="copy ceiling")
                ax.set_title(f"{dt}: achieved bandwidth")
            ax.set_ylabel(label)
            ax.set_xticks(range(len(algos)))
            ax.set_xticklabels(algos, rotation=60, ha="right", fontsize=7)
            ax.legend(fontsize=7, loc="best")
    meta = results["meta"]
    fig.suptitle(f"fusedopt vs torch.optim, {_where(meta)}, torch {meta['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU {model}, {os.cpu_count()} cores visible"


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                fusedopt=getattr(fusedopt, "__version__", None))


def _select(names: list[str], wanted: str | None, what: str) -> list[str]:
    if not wanted:
        return names
    out = []
    for w in (x.strip() for x in wanted.split(",") if x.strip()):
        hits = [n for n in names if n.lower() == w.lower()] or [n for n in names if n.lower().startswith(w.lower() + "-")]
        if not hits:
            raise SystemExit(f"unknown {what} {w!r}; choose from {', '.join(names)}")
        out += [h for h in hits if h not in out]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fusedopt.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--algorithms", default=None,
                    help="comma-separated names, exact (SGD is plain SGD) or a family prefix "
                         "(AveragedModel: both averages); default all")
    ap.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(_bench_shapes.CASE_NAMES)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds at most (default 15 on CPU, 100 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CPU, 10 on CUDA)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per path and row after which a slow path stops (default 1 on CPU, 2 on CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1: on a shared machine a multi-threaded op mostly waits for "
                         "other jobs' cores; one thread compares the work each path does)")
    ap.add_argument("--out", default="bench-results", help="directory for results.json and results.png")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few rounds: a smoke run")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads or 1)
    size = "quick" if args.quick else ("gpu" if cuda else "cpu")
    settings = Settings(
        repeat=args.repeat or (3 if args.quick else 100 if cuda else 15),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 10 if cuda else 3),
        min_rounds=2 if args.quick else 5,
        budget=args.budget if args.budget is not None else (0.2 if args.quick else 2.0 if cuda else 1.0))
    try:
        from . import swa
        swa.AveragedModel  # noqa: B018 - the rows need it
    except (ImportError, AttributeError):
        swa = None
    all_algos = [a.name for a in ALGORITHMS + MODES] + (list(AVERAGES) if swa is not None else [])
    algos = _select(all_algos, args.algorithms, "algorithm")
    case_names = _select(list(_bench_shapes.CASE_NAMES), args.cases, "case")
    dtype_names = _select(list(DTYPES), args.dtypes, "dtype")
    shapes = _bench_shapes.cases(size)
    timer = Timer(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # The copy moves what an fp32 Adam step on the largest case holds (p, g, exp_avg,
    # exp_avg_sq): a ceiling for the same working set, in cache where the cases are.
    copy_numel = 2 * max(sum(math.prod(s) for s in shapes[c]) for c in case_names)
    ceiling = copy_ceiling(device, timer, numel=copy_numel, rounds=3 if args.quick else 20)
    meta = dict(device=device.type, device_name=_device_name(device), **_versions(),
                threads=torch.get_num_threads() if not cuda else None,
                command="python -m fusedopt.bench " + " ".join(sys.argv[1:] if argv is None else argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                sizes=size, settings=dataclasses.asdict(settings), copy_gbps=ceiling, copy_numel=copy_numel,
                agree=dict(rtol={str(k).replace("torch.", ""): v for k, v in AGREE_RTOL.items()},
                           max_fraction=AGREE_FRACTION),
                averaged_model=swa is not None)
    results = {"meta": meta, "rows": []}
    jobs = [(c, a, d) for c in case_names for a in algos for d in dtype_names]
    progress = _progress(len(jobs), disable=args.no_progress)
    by_name = {a.name: a for a in ALGORITHMS + MODES}
    for case, algo, dt in jobs:
        progress.set_description(f"{case} {algo} {dt}")
        try:
            if algo in by_name:
                row = step_row(case, shapes[case], by_name[algo], DTYPES[dt], device, timer, settings)
            else:
                row = average_row(case, shapes[case], algo, DTYPES[dt], device, timer, settings, swa)
        except Exception as e:   # noqa: BLE001 - one row's failure must not lose the rest of the run
            row = _failed_row(case, algo, dt, e)
            print(f"{case} {algo} {dt}: failed: {row['error']}", file=sys.stderr, flush=True)
        results["rows"].append(row)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        progress.update(1)
        if args.no_progress:   # (a log cut off midway still shows how far the run got)
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            print(f"{case} {algo} {dt}: {ratio}", flush=True)
    progress.close()
    print(table(results))
    (out_dir / "results.md").write_text(report(results))
    if plot(results, out_dir / "results.png"):
        print(f"wrote {out_dir / 'results.json'}, results.md and results.png")
    else:
        print(f"wrote {out_dir / 'results.json'} and results.md (no plot: matplotlib is not installed)")
    return results


def _failed_row(case: str, algo: str, dt: str, error: Exception) -> dict:
    """A row whose measurement raised: every field the outputs read, and the error."""
    return dict(case=case, algorithm=algo, cls=algo.split("-")[0], dtype=str(DTYPES[dt]).replace("torch.", ""),
                error=f"{type(error).__name__}: {error}"[:500], paths={name: dict(ms=None, note="row failed")
                                                                   for name in IMPLS},
                fusedopt_path="error", torch_best=None, torch_best_ms=None, ratio=None, ratio_quartiles=None,
                gbps=None, torch_best_gbps=None)


class _NoProgress:
    def set_description(self, _):
        pass

    def update(self, _):
        pass

    def close(self):
        pass


def _progress(total: int, disable: bool):
    if disable:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr)


if __name__ == "__main__":
    main()
