"""RMSprop: torch.optim.RMSprop's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

from torch import Tensor

from . import _flat
from .kernels import rmsprop as kernels
from ._options import check_lr, check_nonnegative, float_option, refuse_differentiable
from .optimizer import Optimizer


class RMSprop(Optimizer):
    r"""RMSprop, as torch.optim.RMSprop, with one fused launch per (group, device, dtype) bucket.

    .. math::
        g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
        v_t = \alpha v_{t-1} + (1 - \alpha) g_t^2, \quad
        \bar g_t = \alpha \bar g_{t-1} + (1 - \alpha) g_t, \quad
        \tilde v_t = v_t - \bar g_t^2 \text{ if centered else } v_t

    .. math::
        b_t = \mu b_{t-1} + \frac{g_t}{\sqrt{\tilde v_t} + \epsilon}, \quad
        \theta_t = \theta_{t-1} - \gamma b_t
        \quad\text{(or } \theta_t = \theta_{t-1} - \gamma \frac{g_t}{\sqrt{\tilde v_t} + \epsilon}
        \text{ when } \mu = 0\text{)}

    State: ``square_avg`` (:math:`v`), ``momentum_buffer`` (:math:`b`, when momentum > 0)
    and ``grad_avg`` (:math:`\bar g`, when centered), all starting at 0.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-2), alpha (default 0.99), eps (default 1e-8),
        weight_decay (default 0), momentum (default 0), centered (default False),
        maximize (default False): as in torch.optim.RMSprop.
        foreach, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
    """

    _flat_state = ("square_avg", "momentum_buffer", "grad_avg")
    _scalar_state = ("step",)
    _sparse_error = "RMSprop does not support sparse gradients"
    _fuses_average = True

    def __init__(self, params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False, *,
                 backend: str = "auto"):
        check_lr(lr)
        check_nonnegative(eps=eps, momentum=momentum, weight_decay=weight_decay, alpha=alpha)
        refuse_differentiable(differentiable)
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults, backend=backend)

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {
        "momentum": 0, "centered": False, "foreach": None, "maximize": False, "differentiable": False,
        "capturable": False,
    }

    def _state_keys(self, group):
        return (["step", "square_avg"] + (["momentum_buffer"] if group["momentum"] > 0 else [])
                + (["grad_avg"] if group["centered"] else []))

    def _options(self, group) -> kernels.RMSpropOptions:
        return kernels.RMSpropOptions(lr=float_option(group, "lr"), alpha=group["alpha"], eps=group["eps"],
                                      weight_decay=group["weight_decay"], momentum=group["momentum"],
                                      centered=group["centered"], maximize=group["maximize"])

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        self._advance_steps(bucket, batch)
        self._run_path(bucket, batch, state, kernels.scalars(o), o,
                       kernels.rmsprop_triton, kernels.rmsprop_reference)
