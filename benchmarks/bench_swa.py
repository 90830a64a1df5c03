"""`AveragedModel.update_parameters`: fusedopt.swa against torch.optim.swa_utils.

    pytest benchmarks/bench_swa.py --benchmark-enable --benchmark-group-by=param:case

Each case averages the same model into torch's and fusedopt's AveragedModel, for torch's
default average (SWA) and for an EMA (``get_ema_multi_avg_fn``); one timed call is one
``update_parameters``. On the CPU fusedopt runs torch's own ops arranged per bucket (one
gather and a few whole-buffer ops for small tensors, foreach ops for large ones), on a GPU
one Triton launch per bucket. Under ``--benchmark-disable`` every case runs once, which
also checks that both averages agree.

CPU timings run single-threaded: on a shared machine a multi-threaded op's time is mostly
waiting for the other threads' cores, and one thread compares the work each path does.
"""
import pytest
import torch
from torch.optim import swa_utils

from fusedopt import swa
from shapes import gpt2_like, tiny_many

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Shapes(torch.nn.Module):
    """Parameters of the given shapes: a model's tensors without its forward."""

    def __init__(self, shapes):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes])


def convnet_bn(blocks: int = 16, width: int = 32) -> torch.nn.Module:
    """Conv + BatchNorm blocks: small weights, and buffers copied on every update."""
    layers = [torch.nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(blocks):
        layers += [torch.nn.Conv2d(width, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width),
                   torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10))


MODELS = {
    "convnet_bn": convnet_bn,                         # 52 parameters, 48 buffers
    "gpt2_like": lambda: Shapes(gpt2_like()),        # 76 tensors, 14M elements
    "tiny_2000": lambda: Shapes(tiny_many()),        # 2000 tensors of 1-256 elements
}
AVERAGES = {
    "swa": lambda m: {},
    "ema": lambda m: dict(multi_avg_fn=m.get_ema_multi_avg_fn(0.999)),
}


@pytest.fixture
def one_thread():
    if DEVICE != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["torch", "fusedopt"])
@pytest.mark.parametrize("average", list(AVERAGES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_update_parameters(benchmark, one_thread, model_name, average, impl):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(DEVICE)
    module = swa_utils if impl == "torch" else swa
    averaged = module.AveragedModel(model, **AVERAGES[average](module))
    averaged.update_parameters(model)  # the first update copies; time the averaging ones
    averaged.update_parameters(model)
    tensors = list(model.parameters()) + list(model.buffers())
    case = f"{model_name}-{average}-{DEVICE}"
    benchmark.group = case
    benchmark.extra_info.update(case=case, impl=impl, tensors=len(tensors),
                                elements=sum(t.numel() for t in tensors))

    def update():
        averaged.update_parameters(model)
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # time the work, not its launch

    benchmark(update)
    # the averages agree whatever the number of rounds (the model never moved)
    for mine, source in zip(averaged.module.parameters(), model.parameters()):
        torch.testing.assert_close(mine, source)
