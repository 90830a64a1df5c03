"""ASGD: torch.optim.ASGD's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _flat
from .kernels import asgd as kernels
from ._options import check_lr, check_nonnegative, float_option, refuse_differentiable
from .optimizer import Optimizer


class ASGD(Optimizer):
    r"""Averaged stochastic gradient descent, as torch.optim.ASGD, with one fused launch per
    (group, device, dtype) bucket.

    .. math::
        g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
        \theta_t = (1 - \lambda_d \eta_{t-1})\,\theta_{t-1} - \eta_{t-1} g_t, \quad
        a_t = \begin{cases} a_{t-1} + \mu_{t-1}(\theta_t - a_{t-1}) & \mu_{t-1} \ne 1 \\
                            \theta_t & \mu_{t-1} = 1 \end{cases}

    .. math::
        \eta_t = \frac{\gamma}{(1 + \lambda_d \gamma t)^{\alpha}}, \quad
        \mu_t = \frac{1}{\max(1, t - t_0)}

    with :math:`\lambda_d` the ``lambd`` decay, :math:`\lambda` the ``weight_decay``,
    :math:`\eta_0 = \gamma`, :math:`\mu_0 = 1`, and :math:`a` the average ``ax``. As in torch,
    ``step``, ``eta`` and ``mu`` are float32 scalars on the parameter's device.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-2), lambd (default 1e-4), alpha (default 0.75),
        t0 (default 1e6), weight_decay (default 0), maximize (default False):
            as in torch.optim.ASGD.
        foreach, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`. ``eta`` and ``mu`` are computed on the
            host, as on torch's non-capturable path.
    """

    _flat_state = ("ax",)
    _scalar_state = ("step", "eta", "mu")
    _scalars_on_param_device = True
    _sparse_error = "ASGD does not support sparse gradients"
    _fuses_average = True

    def __init__(self, params, lr: float | Tensor = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, capturable: bool = False, *, backend: str = "auto"):
        check_lr(lr)
        check_nonnegative(weight_decay=weight_decay)
        refuse_differentiable(differentiable)
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, capturable=capturable)
        super().__init__(params, defaults, backend=backend)

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {"foreach": None, "maximize": False, "differentiable": False, "capturable": False}

    def _state_keys(self, group):
        return ["step", "eta", "mu", "ax"]

    def _initial_scalar(self, group, key):
        return {"eta": float_option(group, "lr"), "mu": 1.0}.get(key, 0.0)

    def _options(self, group) -> kernels.ASGDOptions:
        lr = group["lr"]
        return kernels.ASGDOptions(lr=float_option(group, "lr"), lambd=group["lambd"], alpha=group["alpha"],
                                   t0=group["t0"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                                   lr_tensor=lr if isinstance(lr, Tensor) else None)

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        eta, mu = bucket.scalar("eta"), bucket.scalar("mu")
        # The per-tensor scalars come to the host: torch reads them with .item() too. While
        # every tensor has the same (every one stepped every time), they are one float each.
        etas, mus = eta.tolist(), mu.tolist()
        if etas.count(etas[0]) == len(etas) and mus.count(mus[0]) == len(mus):
            columns = kernels.scalars(etas[0], mus[0], o)
        else:
            columns = kernels.scalars(eta.cpu(), mu.cpu(), o)
        self._run_path(bucket, batch, state, columns, o, kernels.asgd_triton, kernels.asgd_reference)
        self._advance_steps(bucket, batch)
        steps = bucket.steps.tolist()
        # torch stores `torch.as_tensor(new_eta)`: the Python float rounded to the default
        # dtype first, then to the state's. They differ after a load, which casts eta and mu
        # to the parameter's dtype: an fp64 parameter's then hold fp32-rounded values.
        # (A tensor lr makes new_eta a tensor of the lr's dtype.)
        default = torch.get_default_dtype()
        made = default if o.lr_tensor is None else o.lr_tensor.dtype
        if batch.everyone and steps.count(steps[0]) == len(steps):
            (new_eta,), (new_mu,) = kernels.next_eta_mu(steps[:1], o)
            for vec, value, dtype in ((eta, new_eta, made), (mu, new_mu, default)):
                vec.fill_(value if vec.dtype == dtype else torch.tensor(value, dtype=dtype).item())
            return
        index = batch.index_tensor()
        new_eta, new_mu = kernels.next_eta_mu([steps[i] for i in batch.index], o)
        eta[index.to(eta.device)] = torch.tensor(new_eta, dtype=made).to(eta.dtype).to(eta.device)
        mu[index.to(mu.device)] = torch.tensor(new_mu, dtype=default).to(mu.dtype).to(mu.device)
