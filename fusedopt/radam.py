"""RAdam: torch.optim.RAdam's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from ._adam_family import AdamFamily, check_arguments
from ._options import refuse_differentiable


class RAdam(AdamFamily):
    r"""RAdam, as torch.optim.RAdam (Adam with a rectified adaptive learning rate), with one
    fused launch per (group, device, dtype) bucket.

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
        \rho_\infty = \frac{2}{1 - \beta_2} - 1, \quad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t},

        \theta_t = \theta_{t-1} - \gamma \frac{m_t}{1 - \beta_1^t} \cdot
        \begin{cases}
            r_t \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}, &
                r_t = \sqrt{\dfrac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
                & \text{if } \rho_t > 5 \\
            1 & & \text{otherwise}
        \end{cases}

    with L2 weight decay added to :math:`g_t`, or, when ``decoupled_weight_decay`` is set
    (RAdamW), :math:`\theta_{t-1}` multiplied by :math:`1 - \gamma\lambda` first;
    :math:`g_t` negated when ``maximize`` is set. :math:`t` is the parameter's own step
    count, so whether the update is rectified is decided per parameter (it needs
    :math:`\rho_t > 5`, about six steps). State per parameter: ``step``, ``exp_avg``,
    ``exp_avg_sq``.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-3), betas (default (0.9, 0.999)), eps (default 1e-8),
        weight_decay (default 0), decoupled_weight_decay (default False), maximize (default
        False): as in torch.optim.RAdam.
        foreach, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
        master_weights, state_dtype, stochastic_rounding, max_grad_norm: fusedopt only, as for
            :class:`fusedopt.Adam` (the same kernel runs them).
    """

    _variant = "radam"
    _flat_state = ("exp_avg", "exp_avg_sq", "master_param")
    _scalar_state = ("step",)
    _sparse_error = "RAdam does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 backend: str = "auto", master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 max_grad_norm: float | None = None, stochastic_rounding: bool = False):
        check_arguments(lr, betas, eps, weight_decay)
        refuse_differentiable(differentiable)
        self._set_extras(master_weights, state_dtype, stochastic_rounding, max_grad_norm)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, capturable=capturable, decoupled_weight_decay=decoupled_weight_decay,
                        differentiable=differentiable)
        super().__init__(params, defaults, backend=backend)

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {
        "foreach": None, "maximize": False, "differentiable": False, "decoupled_weight_decay": False,
        "capturable": False,
    }

    def _state_keys(self, group):
        return ["step", "exp_avg", "exp_avg_sq"]
