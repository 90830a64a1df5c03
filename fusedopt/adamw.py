"""AdamW: Adam with decoupled weight decay, as torch.optim.AdamW."""
from __future__ import annotations

import torch
from torch import Tensor

from .adam import Adam


class AdamW(Adam):
    r"""AdamW, as torch.optim.AdamW: Adam whose weight decay multiplies the parameter by
    :math:`1 - \gamma\lambda` before the update instead of entering the gradient.

    Args: as :class:`fusedopt.Adam`, with ``weight_decay`` defaulting to 1e-2 and
    ``decoupled_weight_decay`` always True.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backend: str = "auto", master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
                 stochastic_rounding: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, master_weights=master_weights,
                         state_dtype=state_dtype, max_grad_norm=max_grad_norm,
                         stochastic_rounding=stochastic_rounding)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
