"""The one table of optimizers under test.

Every parity, state_dict and error test reads OPTIMIZERS. A row names fusedopt's class,
torch's class, and option sets; a new algorithm is one new row. `second_group` holds the
options the second parameter group overrides, so every run has two groups that differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fusedopt

# Awkward sizes on purpose: 0-dim, 1, a prime, one less and one more than the kernel's
# block, a matrix, a channels_last 4-d tensor, and a zero-size tensor last.
from fusedopt.kernels._launch import BLOCK

SHAPES = [(), (1,), (7,), (BLOCK - 1,), (BLOCK + 1,), (13, 17), "channels_last", (0,)]


@dataclass
class OptimInfo:
    name: str
    fused: type
    torch: type
    configs: list[dict]
    second_group: dict = field(default_factory=dict)
    steps: int = 6
    lr_key: str = "lr"
    # Algorithms whose first steps divide by tiny numbers (Rprop's sign logic, Adadelta's
    # ratio) get a looser fp32 tolerance, named here rather than hidden in a test.
    rtol32: float = 1e-6
    closure: bool = False
    # Low-precision dtypes compared with torch. fp16 is left out where torch's own fp16
    # arithmetic underflows (Adam's exp_avg_sq and eps round to 0 in fp16 after every op
    # in torch, never in the kernel's fp32 math), so there is no torch answer to match.
    dtypes: tuple = (torch.float64, torch.bfloat16, torch.float16)

    def ids(self) -> list[str]:
        return [f"{self.name}-" + ("-".join(f"{k}={v}" for k, v in c.items()) or "default") for c in self.configs]


OPTIMIZERS: list[OptimInfo] = [
    OptimInfo(
        "SGD", fusedopt.SGD, torch.optim.SGD,
        configs=[
            dict(lr=0.1),
            dict(lr=0.1, momentum=0.9),
            dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
            dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
            dict(lr=0.1, momentum=0.5, maximize=True),
        ],
        second_group=dict(lr=0.05, weight_decay=0.1),
    ),
    OptimInfo(
        "Adam", fusedopt.Adam, torch.optim.Adam,
        configs=[
            dict(lr=0.01),
            dict(lr=0.01, amsgrad=True),
            dict(lr=0.01, weight_decay=0.1),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
            dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, maximize=True, amsgrad=True),
        ],
        second_group=dict(lr=0.003, betas=(0.5, 0.99), weight_decay=0.2),
        dtypes=(torch.float64, torch.bfloat16),
    ),
    OptimInfo(
        "AdamW", fusedopt.AdamW, torch.optim.AdamW,
        configs=[
            dict(lr=0.01),
            dict(lr=0.01, amsgrad=True, weight_decay=0.3),
            dict(lr=0.01, maximize=True, weight_decay=0),
        ],
        second_group=dict(lr=0.003, weight_decay=0.05),
        dtypes=(torch.float64, torch.bfloat16),
    ),
]


def by_name(name: str) -> OptimInfo:
    return next(info for info in OPTIMIZERS if info.name == name)


def dtype_cases():
    import pytest

    return [pytest.param(info, dtype, id=f"{info.name}-{str(dtype)[6:]}") for info in OPTIMIZERS for dtype in info.dtypes]


def all_cases():
    """(info, config) pairs with readable ids, for pytest.mark.parametrize."""
    import pytest

    return [pytest.param(info, config, id=cid) for info in OPTIMIZERS for config, cid in zip(info.configs, info.ids())]
