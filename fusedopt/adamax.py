"""Adamax: torch.optim.Adamax's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from ._adam_family import AdamFamily, check_arguments
from ._options import refuse_differentiable


class Adamax(AdamFamily):
    r"""Adamax, as torch.optim.Adamax (Adam with the infinity norm), with one fused launch
    per (group, device, dtype) bucket.

    .. math::
        g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \quad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{u_t}

    with :math:`g_t` negated when ``maximize`` is set and :math:`t` the parameter's own
    step count. State per parameter: ``step``, ``exp_avg`` (:math:`m`) and ``exp_inf``
    (:math:`u`).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 2e-3), betas (default (0.9, 0.999)), eps (default 1e-8),
        weight_decay (default 0), maximize (default False): as in torch.optim.Adamax.
        foreach, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
        master_weights, state_dtype, stochastic_rounding, max_grad_norm: fusedopt only, as for
            :class:`fusedopt.Adam` (the same kernel runs them).
    """

    _variant = "adamax"
    _flat_state = ("exp_avg", "exp_inf", "master_param")
    _scalar_state = ("step",)
    _sparse_error = "Adamax does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, capturable: bool = False,
                 backend: str = "auto", master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 max_grad_norm: float | None = None, stochastic_rounding: bool = False):
        check_arguments(lr, betas, eps, weight_decay)
        refuse_differentiable(differentiable)
        self._set_extras(master_weights, state_dtype, stochastic_rounding, max_grad_norm)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, capturable=capturable)
        super().__init__(params, defaults, backend=backend)

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {"foreach": None, "maximize": False, "differentiable": False, "capturable": False}

    def _state_keys(self, group):
        return ["step", "exp_avg", "exp_inf"]
