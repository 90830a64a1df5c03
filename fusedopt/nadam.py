"""NAdam: torch.optim.NAdam's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _flat
from ._adam_family import AdamFamily, check_arguments
from ._options import refuse_differentiable
from .kernels import adam as kernels


class NAdam(AdamFamily):
    r"""NAdam, as torch.optim.NAdam (Adam with Nesterov momentum), with one fused launch per
    (group, device, dtype) bucket.

    .. math::
        \mu_t = \beta_1 \left(1 - \tfrac{1}{2} \, 0.96^{t\psi}\right), \quad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2,

        \theta_t = \theta_{t-1} - \gamma \left(
            \frac{(1 - \mu_t)\, g_t}{1 - \prod_{i=1}^{t} \mu_i}
            + \frac{\mu_{t+1}\, m_t}{1 - \prod_{i=1}^{t+1} \mu_i} \right)
            \Big/ \left(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon\right)

    with L2 weight decay added to :math:`g_t`, or, when ``decoupled_weight_decay`` is set
    (NAdamW), :math:`\theta_{t-1}` multiplied by :math:`1 - \gamma\lambda` first;
    :math:`g_t` negated when ``maximize`` is set. :math:`t` is the parameter's own step
    count, and :math:`\prod_{i \le t} \mu_i` its ``mu_product`` state, a float32 scalar as
    in torch. State per parameter: ``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 2e-3), betas (default (0.9, 0.999)), eps (default 1e-8),
        weight_decay (default 0), momentum_decay (:math:`\psi`, default 4e-3),
        decoupled_weight_decay (default False), maximize (default False): as in
        torch.optim.NAdam.
        foreach, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
        master_weights, state_dtype, stochastic_rounding, max_grad_norm: fusedopt only, as for
            :class:`fusedopt.Adam` (the same kernel runs them).
    """

    _variant = "nadam"
    _flat_state = ("exp_avg", "exp_avg_sq", "master_param")
    _scalar_state = ("step", "mu_product")
    _sparse_error = "NAdam does not support sparse gradients"

    def __init__(self, params, lr: float | Tensor = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
                 *, foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, backend: str = "auto", master_weights: bool = False,
                 state_dtype: torch.dtype | None = None, max_grad_norm: float | None = None,
                 stochastic_rounding: bool = False):
        check_arguments(lr, betas, eps, weight_decay)
        if not 0.0 <= momentum_decay:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        refuse_differentiable(differentiable)
        self._set_extras(master_weights, state_dtype, stochastic_rounding, max_grad_norm)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable)
        super().__init__(params, defaults, backend=backend)

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {
        "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "decoupled_weight_decay": False,
    }

    def _state_keys(self, group):
        return ["step", "mu_product", "exp_avg", "exp_avg_sq"]

    def _initial_scalar(self, group, key):
        return 1.0 if key == "mu_product" else 0.0

    def _advance_scalars(self, bucket: _flat.Bucket, batch: _flat.Batch, o: kernels.AdamOptions) -> None:
        kernels.advance_mu_product(bucket.scalar("mu_product"), bucket.steps, batch, o)
