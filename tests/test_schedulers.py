"""fusedopt.schedulers against torch.optim.lr_scheduler (torch 2.13).

Every scheduler and option set is driven step by step next to torch's own
scheduler and must produce identical values (lr, momentum / betas, and
``get_last_lr()``), also across a ``state_dict`` round trip midway (through
``torch.save`` / ``torch.load(weights_only=True)``) and when the state moves
between torch's and fusedopt's implementations. Tensor hyper-parameters must be
updated in place, and a compiled optimizer step driven by each scheduler must
compile once.
"""

from __future__ import annotations

import ast
import copy
import io
import os
import pathlib
import random
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.optim.lr_scheduler as TS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import fusedopt.schedulers as FS
except ImportError:  # the repo is not installed: import it from the checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import fusedopt.schedulers as FS

EXAMPLES = int(os.environ.get("FUSEDOPT_HYPOTHESIS_EXAMPLES", "25"))
PUBLIC = [
    "LRScheduler",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "ChainedScheduler",
    "SequentialLR",
    "ReduceLROnPlateau",
    "CyclicLR",
    "OneCycleLR",
    "CosineAnnealingWarmRestarts",
]


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------
def fusedopt_optimizer_class(name: str):
    """fusedopt's own optimizer class, or a visible skip while it does not exist yet."""
    try:
        import fusedopt
    except Exception as exc:  # pragma: no cover - depends on the rest of the repo
        pytest.skip(f"`import fusedopt` fails ({exc!r}); enable once fusedopt/__init__.py exists")
    cls = getattr(fusedopt, name, None)
    if cls is None:
        pytest.skip(f"fusedopt.{name} is not importable yet; these cases run once it is")
    return cls


def make_optimizer(kind="sgd", *, tensor=False, impl="torch", foreach=False):
    """Two param groups with different learning rates; tensor hyper-parameters if asked."""
    wrap = (lambda v: torch.tensor(v)) if tensor else (lambda v: v)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    if kind == "sgd":
        cls = torch.optim.SGD if impl == "torch" else fusedopt_optimizer_class("SGD")
        groups = [
            {"params": [params[0]], "lr": wrap(0.1), "momentum": wrap(0.9)},
            {"params": [params[1]], "lr": wrap(0.05), "momentum": wrap(0.8)},
        ]
        kwargs: dict[str, Any] = {"lr": wrap(0.1), "momentum": wrap(0.9)}
    else:
        cls = torch.optim.Adam if impl == "torch" else fusedopt_optimizer_class("Adam")
        groups = [
            {"params": [params[0]], "lr": wrap(0.01), "betas": (wrap(0.9), wrap(0.999))},
            {"params": [params[1]], "lr": wrap(0.02), "betas": (wrap(0.85), wrap(0.99))},
        ]
        kwargs = {"lr": wrap(0.01), "betas": (wrap(0.9), wrap(0.999))}
    if tensor and impl == "torch":
        # Adam's foreach path on CPU rejects a tensor lr; SGD's takes it.
        kwargs["foreach"] = foreach
    return cls(groups, **kwargs)


def hyperparameters(opt) -> list[list[float]]:
    """lr, then momentum or both betas, of every group, as floats."""
    rows = []
    for group in opt.param_groups:
        row = [float(group["lr"])]
        if "betas" in group:
            row += [float(b) for b in group["betas"]]
        elif "momentum" in group:
            row.append(float(group["momentum"]))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------
# Cases: one scheduler configuration each, built the same way from either module
# --------------------------------------------------------------------------
rng = random.Random(1234)
# A metric with improvements, plateaus, tiny changes (below the threshold) and noise.
METRIC = [1.0, 0.9, 0.9, 0.9, 0.95, 0.85, 0.85, 0.849999, 0.85, 0.85, 0.7, 0.71, 0.72]
METRIC += [round(0.7 + rng.uniform(-0.05, 0.05), 3) for _ in range(27)]
# Fractional, repeated and decreasing epochs for CosineAnnealingWarmRestarts.
FRACTIONAL = [0.0, 0.5, 1.25, 1.999, 2.0, 3.7, 5.5, 6.0, 6.01, 13.7, 4.2, 9.99, 14.0, 30.5]
FRACTIONAL += [round(i * 1.37, 2) for i in range(16)]
# Explicit integer epochs for the deprecated `step(epoch)` closed forms.
EPOCHS = [1, 2, 3, 7, 8, 2, 15, 16, 4, 0, 9, 11, 12, 30, 5, 6, 13, 14, 21, 22]


@dataclass
class Case:
    id: str
    build: Callable  # (module, optimizer) -> scheduler
    steps: int = 30
    kind: str = "sgd"
    drive: str = "plain"  # "plain" | "metric" | "epoch"
    epochs: list = field(default_factory=list)

    def advance(self, sched, i: int) -> None:
        if self.drive == "metric":
            sched.step(METRIC[i])
        elif self.drive == "epoch":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # epoch= is deprecated
                sched.step(self.epochs[i])
        else:
            sched.step()


def resumed(make, at: int):
    """Run a scheduler for ``at`` steps, then resume it as a new one with ``last_epoch=at``."""

    def build(S, opt):
        first = make(S, opt, -1)
        for _ in range(at):
            opt.step()
            first.step()
        return make(S, opt, at)

    return build


def _lambda1(t):
    return 1 / (t + 1)


def _lambda2(t):
    return 0.9**t


class ScaleByHalf:
    """A callable object: its attributes are part of the state_dict."""

    def __init__(self):
        self.base = 0.5

    def __call__(self, x):
        return self.base**x


CASES = [
    Case("lambda", lambda S, o: S.LambdaLR(o, lambda t: 0.95**t)),
    Case("lambda_per_group", lambda S, o: S.LambdaLR(o, [_lambda1, _lambda2]), kind="adam"),
    Case("multiplicative", lambda S, o: S.MultiplicativeLR(o, lambda t: 0.9 if t % 2 else 0.97)),
    Case("step", lambda S, o: S.StepLR(o, step_size=3, gamma=0.5)),
    Case("step_gamma1", lambda S, o: S.StepLR(o, step_size=1, gamma=1.0), kind="adam"),
    Case("multistep", lambda S, o: S.MultiStepLR(o, milestones=[9, 2, 5, 5], gamma=0.3)),
    Case("constant", lambda S, o: S.ConstantLR(o, factor=0.5, total_iters=4)),
    Case("constant_zero_iters", lambda S, o: S.ConstantLR(o, factor=0.25, total_iters=0)),
    Case("linear", lambda S, o: S.LinearLR(o, start_factor=0.25, end_factor=0.9, total_iters=6)),
    Case("exponential", lambda S, o: S.ExponentialLR(o, gamma=0.9)),
    Case("polynomial", lambda S, o: S.PolynomialLR(o, total_iters=8, power=2.0)),
    Case("cosine", lambda S, o: S.CosineAnnealingLR(o, T_max=5, eta_min=0.001)),
    Case("cosine_T1", lambda S, o: S.CosineAnnealingLR(o, T_max=1)),
    Case("warm_restarts", lambda S, o: S.CosineAnnealingWarmRestarts(o, T_0=3)),
    Case(
        "warm_restarts_mult",
        lambda S, o: S.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=0.001),
    ),
    Case(
        "warm_restarts_fractional",
        lambda S, o: S.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=0.001),
        drive="epoch",
        epochs=FRACTIONAL,
    ),
    Case(
        "warm_restarts_fractional_mult1",
        lambda S, o: S.CosineAnnealingWarmRestarts(o, T_0=3),
        drive="epoch",
        epochs=FRACTIONAL,
    ),
    Case(
        "chained",
        lambda S, o: S.ChainedScheduler([S.ConstantLR(o, 0.5, 3), S.ExponentialLR(o, 0.9)]),
    ),
    Case(
        "chained_three",
        lambda S, o: S.ChainedScheduler(
            [S.StepLR(o, 4, 0.5), S.CosineAnnealingLR(o, 7, 0.002), S.MultiStepLR(o, [10, 20])],
            optimizer=o,
        ),
        kind="adam",
    ),
    Case(
        "sequential",
        lambda S, o: S.SequentialLR(
            o, [S.LinearLR(o, 0.1, total_iters=4), S.CosineAnnealingLR(o, 10, 0.001)], [5]
        ),
    ),
    Case(
        "sequential_three",
        lambda S, o: S.SequentialLR(
            o, [S.ConstantLR(o, 0.3, 2), S.ExponentialLR(o, 0.8), S.StepLR(o, 2, 0.5)], [3, 8]
        ),
    ),
    Case(
        "sequential_warm_restarts",
        lambda S, o: S.SequentialLR(
            o, [S.LinearLR(o, 0.5, total_iters=3), S.CosineAnnealingWarmRestarts(o, 3, 2)], [4]
        ),
        kind="adam",
    ),
    # torch warns here too: SequentialLR re-runs the ChainedScheduler's initial
    # step, which steps its children a second time before any optimizer.step().
    Case(
        "sequential_chained",
        lambda S, o: S.SequentialLR(
            o,
            [
                S.ChainedScheduler([S.LinearLR(o, 0.5, total_iters=3), S.ExponentialLR(o, 0.95)]),
                S.ExponentialLR(o, 0.9),
            ],
            [6],
        ),
    ),
    Case(
        "plateau_min_rel",
        lambda S, o: S.ReduceLROnPlateau(o, factor=0.5, patience=1, cooldown=2),
        drive="metric",
    ),
    Case(
        "plateau_min_abs",
        lambda S, o: S.ReduceLROnPlateau(
            o, threshold=0.02, threshold_mode="abs", patience=0, min_lr=0.004, eps=1.5e-3
        ),
        drive="metric",
    ),
    Case(
        "plateau_max_rel",
        lambda S, o: S.ReduceLROnPlateau(
            o, mode="max", factor=0.7, patience=2, threshold=0.05, min_lr=[0.02, 0.001]
        ),
        drive="metric",
        kind="adam",
    ),
    Case(
        "plateau_max_abs",
        lambda S, o: S.ReduceLROnPlateau(
            o, mode="max", threshold_mode="abs", threshold=0.01, patience=0, cooldown=1, eps=0.005
        ),
        drive="metric",
    ),
    Case("cyclic_triangular", lambda S, o: S.CyclicLR(o, 0.01, 0.1, step_size_up=4)),
    Case(
        "cyclic_triangular2_betas",
        lambda S, o: S.CyclicLR(
            o, [0.001, 0.002], [0.01, 0.03], 3, 5, mode="triangular2",
            base_momentum=[0.8, 0.7], max_momentum=0.95,
        ),
        kind="adam",
    ),
    Case(
        "cyclic_exp_range",
        lambda S, o: S.CyclicLR(o, 0.01, 0.1, 2, 3, mode="exp_range", gamma=0.9),
    ),
    Case(
        "cyclic_scale_fn_cycle",
        lambda S, o: S.CyclicLR(o, 0.01, 0.1, 3, scale_fn=ScaleByHalf(), cycle_momentum=False),
    ),
    Case(
        "cyclic_scale_fn_iterations",
        lambda S, o: S.CyclicLR(
            o, 0.01, 0.1, 3, 2, scale_fn=lambda x: 1 / (1 + 0.1 * x), scale_mode="iterations"
        ),
        kind="adam",
    ),
    Case(
        "one_cycle_cos",
        lambda S, o: S.OneCycleLR(o, max_lr=0.1, total_steps=30),
    ),
    Case(
        "one_cycle_linear_three_phase_betas",
        lambda S, o: S.OneCycleLR(
            o, max_lr=[0.01, 0.05], epochs=5, steps_per_epoch=6, pct_start=0.25,
            anneal_strategy="linear", three_phase=True, div_factor=10.0, final_div_factor=100.0,
        ),
        kind="adam",
    ),
    Case(
        "one_cycle_cos_three_phase_no_momentum",
        lambda S, o: S.OneCycleLR(
            o, max_lr=0.2, total_steps=31, three_phase=True, cycle_momentum=False
        ),
    ),
    # last_epoch restarts (resuming a scheduler from an epoch).
    Case("resume_step", resumed(lambda S, o, e: S.StepLR(o, 3, 0.5, last_epoch=e), 5)),
    Case("resume_multistep", resumed(lambda S, o, e: S.MultiStepLR(o, [3, 8], last_epoch=e), 2)),
    Case("resume_constant", resumed(lambda S, o, e: S.ConstantLR(o, 0.5, 4, last_epoch=e), 2)),
    Case("resume_linear", resumed(lambda S, o, e: S.LinearLR(o, 0.2, 0.8, 6, last_epoch=e), 3)),
    Case("resume_exponential", resumed(lambda S, o, e: S.ExponentialLR(o, 0.9, last_epoch=e), 4)),
    Case(
        "resume_polynomial", resumed(lambda S, o, e: S.PolynomialLR(o, 8, 2.0, last_epoch=e), 3)
    ),
    Case(
        "resume_cosine", resumed(lambda S, o, e: S.CosineAnnealingLR(o, 6, 0.01, last_epoch=e), 4)
    ),
    Case(
        "resume_lambda", resumed(lambda S, o, e: S.LambdaLR(o, _lambda2, last_epoch=e), 4)
    ),
    Case(
        "resume_warm_restarts",
        resumed(lambda S, o, e: S.CosineAnnealingWarmRestarts(o, 2, 2, last_epoch=e), 5),
    ),
    Case(
        "resume_cyclic",
        resumed(lambda S, o, e: S.CyclicLR(o, 0.01, 0.1, 3, last_epoch=e), 5),
        kind="adam",
    ),
    Case(
        "resume_one_cycle",
        resumed(lambda S, o, e: S.OneCycleLR(o, 0.1, total_steps=40, last_epoch=e), 5),
    ),
    Case(
        "resume_sequential",
        resumed(
            lambda S, o, e: S.SequentialLR(
                o, [S.ConstantLR(o, 0.5, 2), S.ExponentialLR(o, 0.9)], [3], last_epoch=e
            ),
            4,
        ),
    ),
]
# The deprecated `step(epoch)` path uses each scheduler's closed form.
CASES += [
    Case(f"epoch_{name}", build, drive="epoch", epochs=EPOCHS, steps=len(EPOCHS))
    for name, build in [
        ("step", lambda S, o: S.StepLR(o, 3, 0.5)),
        ("multistep", lambda S, o: S.MultiStepLR(o, [2, 5, 5, 12], 0.5)),
        ("constant", lambda S, o: S.ConstantLR(o, 0.5, 4)),
        ("linear", lambda S, o: S.LinearLR(o, 0.2, 0.9, 6)),
        ("exponential", lambda S, o: S.ExponentialLR(o, 0.9)),
        ("polynomial", lambda S, o: S.PolynomialLR(o, 10, 1.5)),
        ("cosine", lambda S, o: S.CosineAnnealingLR(o, 7, 0.001)),
        ("lambda", lambda S, o: S.LambdaLR(o, _lambda2)),
    ]
]
CASE_IDS = [c.id for c in CASES]


# --------------------------------------------------------------------------
# Driving
# --------------------------------------------------------------------------
def checkpoint(opt, sched):
    """Save both states with torch.save and load them back with weights_only=True."""
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def run(case: Case, S, *, opt_impl="torch", tensor=False, handoff=None, inspect=None):
    """Drive ``case`` with module ``S``; returns one record per step.

    ``handoff=(step, S2)``: at that step, checkpoint, rebuild with module ``S2``
    on a fresh optimizer, load both states, and carry on with the rebuilt pair.
    ``inspect(opt, sched)`` is called after every step.
    """
    opt = make_optimizer(case.kind, tensor=tensor, impl=opt_impl)
    sched = case.build(S, opt)
    records = [(hyperparameters(opt), [float(v) for v in sched.get_last_lr()])]
    for i in range(case.steps):
        if handoff is not None and i == handoff[0]:
            state = checkpoint(opt, sched)
            opt = make_optimizer(case.kind, tensor=tensor, impl=opt_impl)
            sched = case.build(handoff[1], opt)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        opt.step()
        case.advance(sched, i)
        records.append((hyperparameters(opt), [float(v) for v in sched.get_last_lr()]))
        if inspect is not None:
            inspect(opt, sched)
    return records


_reference_cache: dict[str, list] = {}


def reference(case: Case) -> list:
    if case.id not in _reference_cache:
        _reference_cache[case.id] = run(case, TS)
    return _reference_cache[case.id]


def assert_close_records(actual, expected, rel=2e-6, abs_=1e-8):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        flat_a = [x for row in a[0] for x in row] + a[1]
        flat_e = [x for row in e[0] for x in row] + e[1]
        assert flat_a == pytest.approx(flat_e, rel=rel, abs=abs_), f"step {step}"


# --------------------------------------------------------------------------
# Step-by-step equality with torch
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_step_by_step(case):
    """Identical floats at every step, with a fusedopt->fusedopt state_dict round trip midway."""
    ours = run(case, FS, handoff=(case.steps // 2, FS))
    assert ours == reference(case)


@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_plateau_metric_equal_to_the_best_is_no_improvement(mode, threshold_mode):
    """torch compares strictly: with threshold 0, a metric equal to the best so far is a bad
    epoch, so a flat metric reduces the lr after `patience` epochs (METRIC's plateaus never
    equal the best in mode 'max')."""
    sign = 1.0 if mode == "min" else -1.0
    metrics = [sign * m for m in (1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25)]
    runs = []
    for S, impl in ((TS, "torch"), (FS, "fusedopt")):
        opt = make_optimizer(impl=impl)
        sched = S.ReduceLROnPlateau(opt, mode=mode, threshold=0.0, threshold_mode=threshold_mode, patience=1)
        rows = []
        for metric in metrics:
            opt.step()
            sched.step(metric)
            rows.append(hyperparameters(opt))
        runs.append(rows)
    assert runs[1] == runs[0]
    assert runs[0][-1] != runs[0][0]   # torch reduced the lr on the plateaus


@pytest.mark.parametrize("direction", ["fusedopt_to_torch", "torch_to_fusedopt"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_moves_between_implementations(case, direction):
    first, second = (FS, TS) if direction == "fusedopt_to_torch" else (TS, FS)
    assert run(case, first, handoff=(case.steps // 3, second)) == reference(case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_has_torch_layout(case):
    def states(S):
        opt = make_optimizer(case.kind)
        sched = case.build(S, opt)
        for i in range(3):
            opt.step()
            case.advance(sched, i)
        return sched.state_dict()

    ours, theirs = states(FS), states(TS)

    def keys(state):
        out = set(state)
        for child in state.get("_schedulers", []):
            out |= {f"_schedulers.{k}" for k in keys(child)}
        return out

    assert keys(ours) == keys(theirs)
    for key in ("base_lrs", "last_epoch", "_last_lr", "_step_count"):
        if key in theirs:
            assert ours[key] == theirs[key]


# --------------------------------------------------------------------------
# Tensor hyper-parameters: updated in place, same values
# --------------------------------------------------------------------------
def _tensor_slots(opt):
    slots = []
    for group in opt.param_groups:
        slots.append(group["lr"])
        if "betas" in group:
            slots.extend(group["betas"])
        else:
            slots.append(group["momentum"])
    return slots


@pytest.mark.parametrize("opt_impl", ["torch", "fusedopt"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tensor_hyperparameters_updated_in_place(case, opt_impl):
    tensors: list = []

    def inspect(opt, sched):
        if not tensors:
            tensors.extend(_tensor_slots(opt))
        now = _tensor_slots(opt)
        assert all(isinstance(t, torch.Tensor) for t in now), "a tensor was replaced by a float"
        assert all(a is b for a, b in zip(now, tensors)), "a tensor was replaced by another"
        for value in sched.get_last_lr():
            assert isinstance(value, torch.Tensor)

    ours = run(case, FS, opt_impl=opt_impl, tensor=True, inspect=inspect)
    # torch assigns floats; the in-place float32 values agree to float32 precision.
    assert_close_records(ours, reference(case))


def test_shared_tensor_default_gets_one_value_per_group():
    """Groups sharing one default tensor (add_param_group's setdefault) still get their own value."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD(
        [{"params": [params[0]]}, {"params": [params[1]]}],
        lr=torch.tensor(0.1),
        momentum=torch.tensor(0.9),
        foreach=False,
    )
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    sched = FS.CyclicLR(opt, [0.01, 0.02], [0.1, 0.3], 2, base_momentum=[0.8, 0.7])
    for _ in range(3):
        opt.step()
        sched.step()
    ref_opt = torch.optim.SGD(
        [{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, momentum=0.9
    )
    ref = TS.CyclicLR(ref_opt, [0.01, 0.02], [0.1, 0.3], 2, base_momentum=[0.8, 0.7])
    for _ in range(3):
        ref_opt.step()
        ref.step()
    for group, ref_group in zip(opt.param_groups, ref_opt.param_groups):
        assert float(group["lr"]) == pytest.approx(ref_group["lr"], rel=1e-6)
        assert float(group["momentum"]) == pytest.approx(ref_group["momentum"], rel=1e-6)


@pytest.mark.gpu
def test_cuda_graph_replay_sees_new_values():
    """A captured graph reading group['lr'] and betas[0] sees each scheduler step."""
    dev = "cuda"
    param = torch.nn.Parameter(torch.zeros(4, device=dev))
    opt = torch.optim.Adam(
        [param],
        lr=torch.tensor(0.01, device=dev),
        betas=(torch.tensor(0.9, device=dev), torch.tensor(0.999, device=dev)),
        capturable=True,
    )
    sched = FS.OneCycleLR(opt, 0.01, total_steps=10)
    group = opt.param_groups[0]
    seen = torch.zeros(2, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        seen.copy_(torch.stack([group["lr"], group["betas"][0]]))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen.copy_(torch.stack([group["lr"], group["betas"][0]]))

    ref_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4))], lr=0.01)
    ref = TS.OneCycleLR(ref_opt, 0.01, total_steps=10)
    for _ in range(6):
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()
        graph.replay()
        torch.cuda.synchronize()
        expected = [ref_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["betas"][0]]
        assert seen.tolist() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------
# fusedopt's optimizers: both directions
# --------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler_impl", ["fusedopt", "torch"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_on_fusedopt_optimizers(case, scheduler_impl):
    """fusedopt's schedulers on fusedopt's optimizers, and torch's schedulers on them too."""
    S = FS if scheduler_impl == "fusedopt" else TS
    assert run(case, S, opt_impl="fusedopt", handoff=(case.steps // 2, S)) == reference(case)


# --------------------------------------------------------------------------
# Frameworks' isinstance checks, public API, warnings
# --------------------------------------------------------------------------
def test_public_api_and_isinstance_checks():
    assert set(PUBLIC) <= set(FS.__all__)
    for name in PUBLIC:
        assert issubclass(getattr(FS, name), TS.LRScheduler), name
    assert issubclass(FS.ReduceLROnPlateau, TS.ReduceLROnPlateau)
    assert issubclass(FS.ReduceLROnPlateau, FS.LRScheduler)
    for case in CASES:
        sched = case.build(FS, make_optimizer(case.kind))
        assert isinstance(sched, TS.LRScheduler)
        assert isinstance(sched, FS.LRScheduler)
        assert isinstance(sched, TS.ReduceLROnPlateau) == (case.drive == "metric")


def test_package_imports_nothing_else_from_fusedopt():
    root = pathlib.Path(FS.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("fusedopt"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("fusedopt") for a in node.names), path


def _warnings_of(scenario: Callable, S) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scenario(S)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _scheduler_first(S):
    opt = make_optimizer()
    sched = S.StepLR(opt, 2)
    sched.step()
    opt.step()


def _right_order(S):
    opt = make_optimizer()
    sched = S.CosineAnnealingLR(opt, 4)
    for _ in range(3):
        opt.step()
        sched.step()


def _step_replaced(S):
    opt = make_optimizer()
    sched = S.ExponentialLR(opt, 0.9)
    opt.step = lambda *a, **k: None
    opt.step()
    sched.step()


def _get_lr_outside_step(S):
    opt = make_optimizer()
    S.LinearLR(opt).get_lr()


def _epoch_argument(S):
    opt = make_optimizer()
    sched = S.StepLR(opt, 2)
    opt.step()
    sched.step(3)


def _mixed_implementations(S):
    # A torch scheduler and a fusedopt one on one optimizer share the step wrapper.
    opt = make_optimizer()
    other = TS if S is FS else FS
    first, second = other.StepLR(opt, 2), S.ExponentialLR(opt, 0.9)
    opt.step()
    first.step()
    second.step()


@pytest.mark.parametrize(
    "scenario",
    [
        _scheduler_first,
        _right_order,
        _step_replaced,
        _get_lr_outside_step,
        _epoch_argument,
        _mixed_implementations,
    ],
)
def test_warnings_match_torch(scenario):
    """The same warnings, each opening with torch's first sentence: a filter written for
    torch (`warnings.filterwarnings(message=...)` matches from the start) matches ours."""
    ours, theirs = _warnings_of(scenario, FS), _warnings_of(scenario, TS)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        first = b.split(". ")[0].rstrip(".") + "."
        assert a.startswith(first), (a, first)


def test_torchs_deprecated_base_class_name_is_there():
    """torch still exports `_LRScheduler`, which older custom schedulers subclass."""

    class Warmup(FS._LRScheduler):
        def get_lr(self):
            return [base * min(1.0, (self.last_epoch + 1) / 4) for base in self.base_lrs]

    opt = make_optimizer()
    sched = Warmup(opt)
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [0.05, 0.025]


@pytest.mark.parametrize("S", [FS, TS], ids=["fusedopt", "torch"])
def test_warns_when_scheduler_steps_before_optimizer(S):
    opt = make_optimizer()
    sched = S.StepLR(opt, 2)
    with pytest.warns(UserWarning, match=r"`lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"):
        sched.step()
    opt2 = make_optimizer()
    sched2 = S.StepLR(opt2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.step()
        sched2.step()


def test_torch_swa_style_subclass_works_on_fusedopt_base():
    """A scheduler written against the base's protocol (as SWALR is) runs on fusedopt's base."""

    class Halving(FS.LRScheduler):
        def get_lr(self):
            return [g["lr"] * (0.5 if self._step_count > 1 else 1.0) for g in self.optimizer.param_groups]

    opt = make_optimizer()
    sched = Halving(opt)
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [0.05, 0.025]


@pytest.mark.parametrize("S", [FS, TS], ids=["fusedopt", "torch"])
def test_get_lr_returning_none_is_written_as_torch_writes_it(S):
    """A custom scheduler whose get_lr returns None for a group: torch writes the None (the
    optimizer's step then fails on it); the value is not taken as "leave this group alone"."""

    class EveryOther(S.LRScheduler):
        def get_lr(self):
            return [base * 0.5 if i % 2 else None for i, base in enumerate(self.base_lrs)]

    opt = make_optimizer()
    sched = EveryOther(opt)
    assert [group["lr"] for group in opt.param_groups] == [None, 0.025]
    assert sched.get_last_lr() == [None, 0.025]


def test_errors_match_torch():
    opt = make_optimizer()
    for S in (FS, TS):
        with pytest.raises(TypeError):
            S.StepLR(object(), 2)
        with pytest.raises(KeyError):
            S.StepLR(make_optimizer(), 2, last_epoch=3)
        with pytest.raises(ValueError):
            S.SequentialLR(opt, [S.StepLR(opt, 2)], [1])
        with pytest.raises(ValueError):
            S.ChainedScheduler([S.ReduceLROnPlateau(opt)])
        with pytest.raises(ValueError):
            S.CyclicLR(torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))]), 0.1, 1.0)
        one_cycle = S.OneCycleLR(make_optimizer(), 0.1, total_steps=2)
        one_cycle.step()
        one_cycle.step()
        with pytest.raises(ValueError):
            one_cycle.step()


@pytest.mark.parametrize("name,kwargs", [
    ("CosineAnnealingWarmRestarts", dict(T_0="3")),
    ("CosineAnnealingWarmRestarts", dict(T_0=None)),
    ("CosineAnnealingWarmRestarts", dict(T_0=2.5)),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, T_mult=None)),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, T_mult=1.5)),
    # numbers that are not Python ints: torch's comparison takes them, its isinstance does not
    ("CosineAnnealingWarmRestarts", dict(T_0=torch.tensor(5))),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, T_mult=torch.tensor(2))),
    ("OneCycleLR", dict(max_lr=0.1, total_steps="10")),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=0)),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=torch.tensor(10))),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10, pct_start="1")),
    ("ReduceLROnPlateau", dict(mode=None)),
    ("ReduceLROnPlateau", dict(mode="up")),
    ("ReduceLROnPlateau", dict(threshold_mode=None)),
    ("ConstantLR", dict(factor=1.5)),
])
def test_bad_arguments_raise_torchs_exception_type(name, kwargs):
    """What is not a number (or a mode that is not a string) is a TypeError in torch, a
    value out of range a ValueError."""
    with pytest.raises(Exception) as theirs:
        getattr(TS, name)(make_optimizer(), **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        getattr(FS, name)(make_optimizer(), **kwargs)
    if name in ("CosineAnnealingWarmRestarts", "OneCycleLR"):
        bad = list(kwargs.values())[-1]
        assert repr(bad) in str(ours.value)  # the message names the value refused


@pytest.mark.parametrize("wrapped", [False, True], ids=["alone", "in_sequential"])
def test_refused_step_leaves_the_scheduler_as_it_was(wrapped):
    """OneCycleLR stepped past total_steps raises torch's ValueError; torch has already
    counted the step (last_epoch, _step_count) by then, here the refused step changes nothing."""
    def build(S, opt):
        one_cycle = S.OneCycleLR(opt, 0.1, total_steps=3)
        if not wrapped:
            return one_cycle
        return S.SequentialLR(opt, [S.ConstantLR(opt, 0.5, 2), one_cycle], milestones=[1])

    def stepped(S):
        opt = make_optimizer()
        sched = build(S, opt)
        for _ in range(4 if wrapped else 3):  # up to OneCycleLR's last step
            opt.step()
            sched.step()
        return opt, sched

    torch_opt, torch_sched = stepped(TS)
    with pytest.raises(Exception) as theirs:
        torch_sched.step()
    opt, sched = stepped(FS)
    before = (copy.deepcopy(sched.state_dict()), hyperparameters(opt))
    assert before[1] == hyperparameters(torch_opt)
    for _ in range(2):
        with pytest.raises(type(theirs.value), match="total_steps=3"):
            sched.step()
        assert (sched.state_dict(), hyperparameters(opt)) == before


@pytest.mark.parametrize("nested", ["ChainedScheduler", "SequentialLR"])
def test_sequential_handing_over_to_a_composite_raises_torchs_type_and_changes_nothing(nested):
    """At a milestone SequentialLR restarts its next scheduler at epoch 0, which a chain or a
    nested SequentialLR cannot do: torch raises NotImplementedError (from its base class's
    get_lr), and so must fusedopt, rather than an AttributeError, changing nothing."""
    def stepped(S):
        opt = make_optimizer()
        inner = [S.ConstantLR(opt, 0.5, 2), S.ExponentialLR(opt, 0.9)]
        inner = S.ChainedScheduler(inner) if nested == "ChainedScheduler" else S.SequentialLR(opt, inner, [1])
        sched = S.SequentialLR(opt, [S.CosineAnnealingLR(opt, 5), inner], milestones=[2])
        opt.step()
        sched.step()   # epoch 1: the cosine
        return opt, sched

    torch_opt, torch_sched = stepped(TS)
    with pytest.raises(NotImplementedError):
        torch_sched.step()
    opt, sched = stepped(FS)
    before = (copy.deepcopy(sched.state_dict()), hyperparameters(opt))
    assert before[1] == hyperparameters(torch_opt)
    with pytest.raises(NotImplementedError):
        sched.step()
    assert (sched.state_dict(), hyperparameters(opt)) == before


@pytest.mark.parametrize("build", [
    lambda S, o: S.LambdaLR(o, _lambda2),
    lambda S, o: S.CosineAnnealingLR(o, 2),
    lambda S, o: S.SequentialLR(o, [S.ConstantLR(o, 0.5, 2), S.CosineAnnealingLR(o, 3)], [2]),
], ids=["lambda", "cosine", "sequential"])
def test_state_of_more_groups_fails_at_the_step_where_torchs_does(build):
    """A state saved with three param groups loaded into a scheduler of two: torch's get_lr
    zips base_lrs with the groups strictly and raises ValueError at the step that reads them;
    nothing may go on silently with the first two of the saved base_lrs."""
    def three_groups():
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
        return torch.optim.SGD([{"params": [p], "lr": 0.1 * (i + 1)} for i, p in enumerate(params)])

    def outcome(S):
        opt = three_groups()
        sched = build(S, opt)
        for _ in range(3):
            opt.step()
            sched.step()
        state = sched.state_dict()
        opt = make_optimizer()
        sched = build(S, opt)
        sched.load_state_dict(state)
        for step in range(4):
            opt.step()
            try:
                sched.step()
            except Exception as error:
                return step, type(error), hyperparameters(opt), sched.last_epoch
        return None

    theirs, ours = outcome(TS), outcome(FS)
    assert theirs is not None and theirs[1] is ValueError
    assert ours[:3] == theirs[:3]


def _lambda_of_three_groups(S):
    saved = S.LambdaLR(_groups(3), ScaleByHalf()).state_dict()
    return saved, S.LambdaLR(_groups(2), ScaleByHalf())


def _cyclic_without_scale_fn(S):
    saved = S.CyclicLR(_groups(2), 0.01, 0.1, scale_fn=ScaleByHalf()).state_dict()
    return saved, S.CyclicLR(_groups(2), 0.01, 0.1)


def _groups(n):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("case", [_lambda_of_three_groups, _cyclic_without_scale_fn])
def test_saved_callable_state_with_nowhere_to_go_is_refused(case):
    """A callable object's saved attributes that the scheduler has no callable for (more
    groups saved than it has, or no custom scale_fn): torch raises (IndexError,
    AttributeError) after loading the rest; here the same exception, before anything is
    loaded, never a silent drop."""
    saved, theirs = case(TS)
    with pytest.raises(Exception) as expected:
        theirs.load_state_dict(saved)
    saved, ours = case(FS)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(type(expected.value)):
        ours.load_state_dict(saved)
    assert ours.state_dict() == before


def _group_hyperparameters(opt) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]


@pytest.mark.parametrize("name,kind,kwargs", [
    ("CyclicLR", "sgd", dict(base_lr=0.01, max_lr=[0.1])),
    ("CyclicLR", "sgd", dict(base_lr=None, max_lr=0.1)),
    ("CyclicLR", "sgd", dict(base_lr=0.01, max_lr=0.1, mode="up")),
    ("CyclicLR", "sgd", dict(base_lr=0.01, max_lr=0.1, step_size_up="two")),
    ("CyclicLR", "sgd", dict(base_lr=0.01, max_lr=0.1, step_size_up=0, step_size_down=0)),
    ("CyclicLR", "sgd", dict(base_lr=0.01, max_lr=0.1, base_momentum=[0.8])),
    ("CyclicLR", "adam", dict(base_lr=0.01, max_lr=0.1, max_momentum=[0.9, 0.9, 0.9])),
    ("CyclicLR", "adagrad", dict(base_lr=0.01, max_lr=0.1)),
    ("OneCycleLR", "adagrad", dict(max_lr=0.1, total_steps=10)),
    ("OneCycleLR", "sgd", dict(max_lr=0.1, total_steps=10, max_momentum=[0.9])),
    ("OneCycleLR", "adam", dict(max_lr=0.1, total_steps=10, base_momentum=[0.8, 0.8, 0.8])),
    ("OneCycleLR", "sgd", dict(max_lr=0.1, total_steps=10, final_div_factor=0)),
])
def test_refused_construction_leaves_the_optimizer_as_it_was(name, kind, kwargs):
    """torch writes the lr (CyclicLR's base_lr, OneCycleLR's initial/max/min lr) into the
    groups before it checks the remaining arguments; here nothing is written until all are
    accepted. The exception is torch's."""
    def build(S):
        if kind == "adagrad":
            return torch.optim.Adagrad([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                                        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}])
        return make_optimizer(kind)

    with pytest.raises(Exception) as theirs:
        getattr(TS, name)(build(TS), **kwargs)
    opt = build(FS)
    before = _group_hyperparameters(opt)
    with pytest.raises(type(theirs.value)):
        getattr(FS, name)(opt, **kwargs)
    assert _group_hyperparameters(opt) == before


# --------------------------------------------------------------------------
# Compiled steps compile once
# --------------------------------------------------------------------------
COMPILE_CASES = [
    ("LambdaLR", "sgd", lambda S, o: S.LambdaLR(o, _lambda2)),
    ("MultiplicativeLR", "sgd", lambda S, o: S.MultiplicativeLR(o, lambda t: 0.9)),
    ("StepLR", "sgd", lambda S, o: S.StepLR(o, 2, 0.5)),
    ("MultiStepLR", "sgd", lambda S, o: S.MultiStepLR(o, [1, 3])),
    ("ConstantLR", "sgd", lambda S, o: S.ConstantLR(o, 0.5, 2)),
    ("LinearLR", "sgd", lambda S, o: S.LinearLR(o, 0.2, total_iters=4)),
    ("ExponentialLR", "adam", lambda S, o: S.ExponentialLR(o, 0.9)),
    ("PolynomialLR", "sgd", lambda S, o: S.PolynomialLR(o, 4)),
    ("CosineAnnealingLR", "adam", lambda S, o: S.CosineAnnealingLR(o, 3)),
    ("CosineAnnealingWarmRestarts", "sgd", lambda S, o: S.CosineAnnealingWarmRestarts(o, 2)),
    (
        "ChainedScheduler",
        "sgd",
        lambda S, o: S.ChainedScheduler([S.ConstantLR(o, 0.5, 2), S.ExponentialLR(o, 0.9)]),
    ),
    (
        "SequentialLR",
        "sgd",
        lambda S, o: S.SequentialLR(o, [S.LinearLR(o, 0.5, total_iters=2), S.StepLR(o, 1)], [2]),
    ),
    ("ReduceLROnPlateau", "sgd", lambda S, o: S.ReduceLROnPlateau(o, factor=0.5, patience=0)),
    # Cycling SGD's (float) momentum would recompile whoever writes it; the
    # tensor-momentum case is Adam's beta1.
    ("CyclicLR", "sgd", lambda S, o: S.CyclicLR(o, 0.01, 0.1, 2, cycle_momentum=False)),
    ("CyclicLR_betas", "adam", lambda S, o: S.CyclicLR(o, 0.001, 0.01, 2)),
    ("OneCycleLR", "sgd", lambda S, o: S.OneCycleLR(o, 0.1, total_steps=10, cycle_momentum=False)),
    ("OneCycleLR_betas", "adam", lambda S, o: S.OneCycleLR(o, 0.01, total_steps=10)),
]


def _compiled_run(S, kind, build, steps=6, opt_impl="torch"):
    """Compile ``opt.step()`` and drive it with a scheduler; return the number of graphs."""
    torch._dynamo.reset()
    opt = make_optimizer(kind, tensor=True, impl=opt_impl, foreach=kind == "sgd")
    if kind == "sgd":
        # torch's SGD branches on `momentum != 0`, which with a tensor momentum is
        # data-dependent and makes dynamo skip the whole step: keep it a float.
        # (Its single-tensor path also turns a tensor lr into a Python number,
        # hence foreach=True.)
        for group in opt.param_groups:
            group["momentum"] = float(group["momentum"])
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()  # eager first step: creates the optimizer state
    sched = build(S, opt)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    params = [p for group in opt.param_groups for p in group["params"]]

    # A whole training step (backward breaks the graph; fusedopt's step is traced as the
    # fusedopt::step op, torch's as its foreach ops).
    @torch.compile(backend=counting_backend)
    def compiled_step():
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        opt.step()
        opt.zero_grad()

    # The first call compiles (one graph or several, wherever the step breaks the graph);
    # after that, no scheduler step may recompile: the tensor hyper-parameters are
    # graph inputs, written in place.
    compiled_step()
    first = len(graphs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(steps):
            if isinstance(sched, TS.ReduceLROnPlateau):
                sched.step(1.0)  # never improves: reduces every step
            else:
                sched.step()
            compiled_step()
    torch._dynamo.reset()
    return first, len(graphs), hyperparameters(opt)


# Every scheduler on torch's optimizers; two representatives on fusedopt's
# (each compile costs seconds; the scheduler code path is the same).
COMPILE_PARAMS = [pytest.param(*c, "torch", id=f"{c[0]}-torch") for c in COMPILE_CASES] + [
    pytest.param(*c, "fusedopt", id=f"{c[0]}-fusedopt")
    for c in COMPILE_CASES
    if c[0] in ("StepLR", "OneCycleLR_betas")
]


@pytest.mark.parametrize("name,kind,build,opt_impl", COMPILE_PARAMS)
def test_compiled_step_compiles_once(name, kind, build, opt_impl):
    first, total, values = _compiled_run(FS, kind, build, opt_impl=opt_impl)
    assert first > 0, "nothing was compiled"
    assert total == first, f"{total - first} recompilations"
    # And the schedule moved: the last values are not the starting ones.
    start = hyperparameters(make_optimizer(kind))
    assert values != start


def test_torch_scheduler_recompiles_on_tensor_betas():
    """The contrast: torch replaces tensor betas with floats, which recompiles the step."""
    build = dict((c[0], c[2]) for c in COMPILE_CASES)["OneCycleLR_betas"]
    with pytest.raises(torch._dynamo.exc.RecompileError):
        _compiled_run(TS, "adam", build)


# --------------------------------------------------------------------------
# The curves: chainable forms compose to the closed forms
# --------------------------------------------------------------------------
C = FS.curves


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    t_end=st.integers(1, 40),
    gamma=st.floats(0.1, 1.0),
    step_size=st.integers(1, 7),
    total=st.integers(1, 12),
    start=st.floats(0.05, 1.0),
    end=st.floats(0.0, 1.0),
    power=st.floats(0.5, 3.0),
    T_max=st.integers(1, 9),
    milestones=st.lists(st.integers(0, 40), max_size=5),
)
def test_chainable_forms_compose_to_closed_forms(
    t_end, gamma, step_size, total, start, end, power, T_max, milestones
):
    from collections import Counter

    base, eta_min = 0.1, 0.001
    counts = Counter(milestones)
    ordered = sorted(milestones)
    lr_step = base
    lr_multi = base
    lr_const = base * C.constant_warmup_factor(0.5, 0, total)
    lr_lin = base * C.linear_warmup_factor(start, end, 0, total)
    lr_poly = base
    lr_cos = base
    for t in range(1, t_end + 1):
        lr_step *= C.step_decay_factor(gamma, t, step_size)
        lr_multi *= C.multistep_decay_factor(gamma, t, counts)
        lr_const *= C.constant_warmup_factor(0.5, t, total)
        lr_lin *= C.linear_warmup_factor(start, end, t, total)
        if t <= total:
            lr_poly *= C.polynomial_decay_factor(t, total, power)
        if C.cosine_annealing_restart_due(t, T_max):
            lr_cos = C.cosine_annealing_restart_step(lr_cos, base, eta_min, T_max)
        else:
            lr_cos = C.cosine_annealing_step(lr_cos, eta_min, t, T_max)
    t = t_end
    close = dict(rel=1e-9, abs=1e-12)
    assert lr_step == pytest.approx(C.step_decay(base, gamma, t, step_size), **close)
    multi_closed = C.multistep_decay(base, gamma, t, ordered) / gamma ** counts.get(0, 0)
    assert lr_multi == pytest.approx(multi_closed, **close)
    assert lr_const == pytest.approx(C.constant_warmup(base, 0.5, t, total), **close)
    assert lr_lin == pytest.approx(C.linear_warmup(base, start, end, t, total), **close)
    assert lr_poly == pytest.approx(C.polynomial_decay(base, t, total, power), rel=1e-9, abs=1e-9)
    assert lr_cos == pytest.approx(C.cosine_annealing(base, eta_min, t, T_max), rel=1e-9, abs=1e-9)
    # Documented values: cosine hits eta_min at T_max and base_lr at 2 T_max.
    assert C.cosine_annealing(base, eta_min, T_max, T_max) == pytest.approx(eta_min)
    assert C.cosine_annealing(base, eta_min, 2 * T_max, T_max) == pytest.approx(base)


def test_curve_formulas_match_documentation():
    assert C.warm_restart_position(7.5, 2, 2) == (1.5, 8)  # periods 2, 4, 8: 7.5 = 2 + 4 + 1.5
    assert C.warm_restart_position(7.5, 2, 1) == (1.5, 2)
    assert C.warm_restart_advance(3, 4, 2) == (0, 8)
    assert C.cyclic_position(0, 10.0, 0.5) == (1, 0.0)
    assert C.cyclic_position(5, 10.0, 0.5) == (1, 1.0)
    assert C.cyclic_position(10, 10.0, 0.5) == (2, 0.0)
    assert C.cyclic_lr(0.1, 1.1, 0.5, 1.0) == pytest.approx(0.6)
    assert C.cyclic_momentum(0.8, 0.9, 1.0, 1.0) == pytest.approx(0.8)
    assert C.triangular2_scale(3) == 0.25
    assert C.anneal_cos(1.0, 0.0, 0.5) == pytest.approx(0.5)
    assert C.anneal_linear(1.0, 3.0, 0.25) == 1.5
    assert C.one_cycle_position(0, [2.0, 9]) == (0, 0.0)
    assert C.one_cycle_position(5, [2.0, 9]) == (1, 3 / 7)
    assert C.plateau_improved(0.5, 1.0, "min", "rel", 0.1)
    assert not C.plateau_improved(0.95, 1.0, "min", "abs", 0.1)
    assert C.plateau_reduced_lr(0.1, 0.5, 0.06) == 0.06


# --------------------------------------------------------------------------
# Property test: drawn scheduler parameters, compared with torch
# --------------------------------------------------------------------------
gammas = st.floats(0.05, 1.0, allow_nan=False)
factors = st.floats(0.05, 1.0, allow_nan=False)
small = st.integers(1, 8)


@st.composite
def simple_scheduler(draw):
    """(name, builder(S, optimizer, last_epoch=-1)) for a chainable scheduler."""
    kind = draw(
        st.sampled_from(
            ["step", "multistep", "constant", "linear", "exponential", "polynomial", "cosine",
             "lambda", "multiplicative", "warm_restarts"]
        )
    )
    if kind == "step":
        a = (draw(small), draw(gammas))
        return kind, lambda S, o, e=-1: S.StepLR(o, *a, last_epoch=e)
    if kind == "multistep":
        a = (draw(st.lists(st.integers(0, 30), max_size=6)), draw(gammas))
        return kind, lambda S, o, e=-1: S.MultiStepLR(o, *a, last_epoch=e)
    if kind == "constant":
        a = (draw(factors), draw(st.integers(0, 10)))
        return kind, lambda S, o, e=-1: S.ConstantLR(o, *a, last_epoch=e)
    if kind == "linear":
        a = (draw(factors), draw(st.floats(0.0, 1.0)), draw(small))
        return kind, lambda S, o, e=-1: S.LinearLR(o, *a, last_epoch=e)
    if kind == "exponential":
        g = draw(gammas)
        return kind, lambda S, o, e=-1: S.ExponentialLR(o, g, last_epoch=e)
    if kind == "polynomial":
        a = (draw(small), draw(st.floats(0.3, 3.0)))
        return kind, lambda S, o, e=-1: S.PolynomialLR(o, *a, last_epoch=e)
    if kind == "cosine":
        a = (draw(small), draw(st.floats(0.0, 0.01)))
        return kind, lambda S, o, e=-1: S.CosineAnnealingLR(o, *a, last_epoch=e)
    if kind == "lambda":
        g = draw(gammas)
        return kind, lambda S, o, e=-1: S.LambdaLR(o, lambda t: g ** (t // 2), last_epoch=e)
    if kind == "multiplicative":
        g = draw(gammas)
        return kind, lambda S, o, e=-1: S.MultiplicativeLR(
            o, lambda t: g if t % 3 == 0 else 1.0, last_epoch=e
        )
    a = (draw(small), draw(st.integers(1, 3)), draw(st.floats(0.0, 0.01)))
    return kind, lambda S, o, e=-1: S.CosineAnnealingWarmRestarts(o, *a, last_epoch=e)


@st.composite
def any_case(draw):
    steps = draw(st.integers(1, 30))
    opt_kind = draw(st.sampled_from(["sgd", "adam"]))
    family = draw(
        st.sampled_from(["simple", "resumed", "chained", "sequential", "cyclic", "one_cycle",
                         "plateau", "epochs"])
    )
    if family in ("simple", "resumed", "epochs"):
        name, make = draw(simple_scheduler())
        build = resumed(make, draw(st.integers(0, 6))) if family == "resumed" else make
        drive, epochs = "plain", []
        if family == "epochs":
            drive = "epoch"
            scale = draw(st.sampled_from([0.25, 0.5, 1.0])) if name == "warm_restarts" else 1
            epochs = [e * scale for e in
                      draw(st.lists(st.integers(0, 40), min_size=steps, max_size=steps))]
        return Case(f"{family}:{name}", build, steps, opt_kind, drive, epochs)
    if family in ("chained", "sequential"):
        parts = [b for _, b in draw(st.lists(simple_scheduler(), min_size=1, max_size=3))]
        if family == "chained":
            build = lambda S, o: S.ChainedScheduler([b(S, o) for b in parts])  # noqa: E731
        else:
            cuts = sorted(draw(st.lists(st.integers(1, 20), min_size=len(parts) - 1,
                                        max_size=len(parts) - 1)))
            build = lambda S, o: S.SequentialLR(o, [b(S, o) for b in parts], cuts)  # noqa: E731
        return Case(family, build, steps, opt_kind)
    if family == "cyclic":
        kwargs = dict(
            step_size_up=draw(small),
            step_size_down=draw(st.none() | small),
            mode=draw(st.sampled_from(["triangular", "triangular2", "exp_range"])),
            gamma=draw(st.floats(0.5, 1.0)),
            cycle_momentum=draw(st.booleans()),
            base_momentum=draw(st.floats(0.5, 0.85)),
            max_momentum=draw(st.floats(0.86, 0.99)),
        )
        low = draw(st.floats(1e-4, 0.01) | st.lists(st.floats(1e-4, 0.01), min_size=2, max_size=2))
        high = draw(st.floats(0.02, 1.0))
        return Case("cyclic", lambda S, o: S.CyclicLR(o, low, high, **kwargs), steps, opt_kind)
    if family == "one_cycle":
        total = draw(st.integers(2, 40))
        kwargs = dict(
            total_steps=total,
            pct_start=draw(st.floats(0.05, 0.95)),
            anneal_strategy=draw(st.sampled_from(["cos", "linear"])),
            three_phase=draw(st.booleans()),
            cycle_momentum=draw(st.booleans()),
            div_factor=draw(st.floats(2.0, 100.0)),
            final_div_factor=draw(st.floats(2.0, 1e4)),
        )
        peak = draw(st.floats(0.01, 1.0))
        return Case("one_cycle", lambda S, o: S.OneCycleLR(o, peak, **kwargs), steps, opt_kind)
    kwargs = dict(
        mode=draw(st.sampled_from(["min", "max"])),
        factor=draw(st.floats(0.05, 0.95)),
        patience=draw(st.integers(0, 4)),
        threshold=draw(st.floats(0.0, 0.1)),
        threshold_mode=draw(st.sampled_from(["rel", "abs"])),
        cooldown=draw(st.integers(0, 3)),
        min_lr=draw(st.floats(0.0, 0.02) | st.lists(st.floats(0.0, 0.02), min_size=2, max_size=2)),
        eps=draw(st.sampled_from([1e-8, 1e-4, 1e-2])),
    )
    return Case("plateau", lambda S, o: S.ReduceLROnPlateau(o, **kwargs), steps, opt_kind,
                "metric")


def _outcome(case, S, **kw):
    """Records, or the type of the exception raised (torch and fusedopt must agree on both)."""
    try:
        return run(case, S, **kw)
    except Exception as exc:  # e.g. ZeroDivisionError for a degenerate OneCycleLR phase
        return type(exc)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=any_case(), handoff=st.sampled_from([None, "fused", "cross"]))
def test_property_matches_torch(case, handoff):
    expected = _outcome(case, TS)
    if handoff is None or case.steps < 2:
        actual = _outcome(case, FS)
    else:
        target = FS if handoff == "fused" else TS
        actual = _outcome(case, FS, handoff=(case.steps // 2, target))
    assert actual == expected
