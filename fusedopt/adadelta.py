"""Adadelta: torch.optim.Adadelta's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

from torch import Tensor

from . import _flat
from .kernels import adadelta as kernels
from ._options import check_lr, check_nonnegative, float_option, refuse_differentiable
from .optimizer import Optimizer


class Adadelta(Optimizer):
    r"""Adadelta, as torch.optim.Adadelta, with one fused launch per (group, device, dtype) bucket.

    .. math::
        g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
        v_t = \rho v_{t-1} + (1 - \rho) g_t^2, \quad
        \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} \, g_t, \quad
        u_t = \rho u_{t-1} + (1 - \rho) \Delta_t^2, \quad
        \theta_t = \theta_{t-1} - \gamma\Delta_t

    with :math:`v` the ``square_avg`` and :math:`u` the ``acc_delta`` state, both starting at 0.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1.0), rho (default 0.9), eps (default 1e-6),
        weight_decay (default 0), maximize (default False): as in torch.optim.Adadelta.
        foreach, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
    """

    _flat_state = ("square_avg", "acc_delta")
    _scalar_state = ("step",)
    _sparse_error = "Adadelta does not support sparse gradients"
    _fuses_average = True

    def __init__(self, params, lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0, foreach: bool | None = None, *, capturable: bool = False,
                 maximize: bool = False, differentiable: bool = False, backend: str = "auto"):
        check_lr(lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        check_nonnegative(eps=eps, weight_decay=weight_decay)
        refuse_differentiable(differentiable)
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        capturable=capturable, foreach=foreach, differentiable=differentiable)
        super().__init__(params, defaults, backend=backend)

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {"foreach": None, "maximize": False, "differentiable": False, "capturable": False}

    def _state_keys(self, group):
        return ["step", "square_avg", "acc_delta"]

    def _options(self, group) -> kernels.AdadeltaOptions:
        return kernels.AdadeltaOptions(lr=float_option(group, "lr"), rho=group["rho"], eps=group["eps"],
                                       weight_decay=group["weight_decay"], maximize=group["maximize"])

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        self._advance_steps(bucket, batch)
        self._run_path(bucket, batch, state, kernels.scalars(o), o,
                       kernels.adadelta_triton, kernels.adadelta_reference)
