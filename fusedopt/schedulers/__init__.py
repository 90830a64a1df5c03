"""Learning-rate schedulers for fusedopt and torch.optim optimizers.

Drop-in replacements for ``torch.optim.lr_scheduler``: the same classes,
arguments, values (bit for bit on float hyper-parameters), warnings and
``state_dict`` layout, and ``isinstance`` checks against torch's
``LRScheduler`` / ``ReduceLROnPlateau`` pass. In addition, hyper-parameters
stored as tensors (``lr``, ``momentum``, ``betas``) are updated in place, so a
``torch.compile``d or CUDA-graph-captured optimizer step sees every new value
without recompiling.

The curve formulas are pure functions, exposed as ``fusedopt.schedulers.curves``.
This package imports nothing else from fusedopt and works with any
``torch.optim.Optimizer``.
"""

from . import _curves as curves
from ._base import LRScheduler, _LRScheduler
from ._composite import ChainedScheduler, SequentialLR
from ._cyclic import CyclicLR, OneCycleLR
from ._decay import (
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiplicativeLR,
    MultiStepLR,
    PolynomialLR,
    StepLR,
)
from ._plateau import ReduceLROnPlateau

__all__ = [
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
    "curves",
]
