"""SGD: torch.optim.SGD's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _flat
from .kernels import sgd as kernels
from ._options import check_max_grad_norm, float_option, refuse_differentiable
from .optimizer import Optimizer


class SGD(Optimizer):
    r"""Stochastic gradient descent (optionally with momentum), as torch.optim.SGD.

    .. math::
        g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
        b_t = \mu b_{t-1} + (1 - \tau) g_t \;(b_1 = g_1), \quad
        \theta_t = \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-3), momentum (default 0), dampening (default 0),
        weight_decay (default 0), nesterov (default False), maximize (default False):
            as in torch.optim.SGD.
        foreach, fused, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
        max_grad_norm (default None): fusedopt only. Clip the global norm of every gradient
            this step updates to this value, as ``torch.nn.utils.clip_grad_norm_`` followed
            by ``step()`` would, inside the step: one reduction launch per bucket and the
            coefficient applied in the update kernel, without writing the gradients or a
            host sync. Under GradScaler it is the norm of the unscaled gradients.
    """

    _flat_state = ("momentum_buffer",)
    _native = True
    _clips = True
    _steps_sparse = True
    _sparse_state = ("momentum_buffer",)
    _optional_state = ("momentum_buffer",)
    _fuses_average = True
    # In torch 2.13 `SGD(fused=True)` on CPU leaves bf16 and fp16 parameters unchanged,
    # silently (tests/test_backend.py pins it): those take torch's foreach SGD instead.
    _native_dtypes = (torch.float32, torch.float64, torch.complex64, torch.complex128)
    _native_fused_on_request = ()

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 backend: str = "auto", max_grad_norm: float | None = None):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        refuse_differentiable(differentiable, fused)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        super().__init__(params, defaults, backend=backend)
        if fused:
            # As torch's fused optimizers: GradScaler hands over grad_scale and found_inf
            # and the kernel unscales and skips on the device. Off by default, because
            # frameworks (Lightning) refuse to clip gradients for such optimizers.
            self._step_supports_amp_scaling = True

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {
        "nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False,
    }

    def _state_keys(self, group):
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _options(self, group) -> kernels.SGDOptions:
        # Numbers: torch's fused CPU kernel, which the native path calls, takes them only as
        # floats, where torch's own default path also multiplies by a 1-element tensor.
        return kernels.SGDOptions(lr=float_option(group, "lr"), momentum=float_option(group, "momentum"),
                                  dampening=float_option(group, "dampening"),
                                  weight_decay=float_option(group, "weight_decay"),
                                  nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))

    def _check_sparse(self, group, bucket: _flat.Bucket) -> None:
        super()._check_sparse(group, bucket)
        if float_option(group, "weight_decay") != 0:
            raise RuntimeError(
                f"fusedopt.SGD: weight_decay={group['weight_decay']} does not apply to sparse gradients (torch.optim.SGD "
                "fails on them too: add(sparse, dense) is not supported). help: put the parameters with sparse "
                "gradients in a param group with weight_decay=0")

    def _sparse_update(self, group, bucket: _flat.Bucket, sparse, fresh) -> None:
        """torch's single-tensor SGD on each parameter with a sparse gradient (an
        Embedding(sparse=True)): the parameter changes only where the gradient (or the
        momentum) has entries. torch keeps such a parameter's momentum buffer sparse; here it
        is the flat state's dense segment, with the same values (zeros where torch's has no
        entry) and so the same parameters, up to the order in which repeated indices are
        summed. A checkpoint holds it sparse, as torch's does: torch's Nesterov step
        cannot add a dense buffer to a sparse gradient."""
        o = self._options(group)
        for i, g in sparse:
            p = bucket.params[i]
            if o.maximize:
                g = -g
            if o.momentum != 0:
                buf = bucket.state_view("momentum_buffer", i)
                if i in fresh:
                    # torch: a copy of the gradient, sparse; a buffer a dense gradient made
                    # stays dense, sparse gradients added into it
                    self.state[p].sparse_dim = g.sparse_dim()
                    buf.copy_(g.to_dense())
                else:
                    _flat.add_sparse_(buf.mul_(o.momentum), g, alpha=1 - o.dampening)
                g = torch.add(g.to_dense(), buf, alpha=o.momentum) if o.nesterov else buf
            _flat.add_sparse_(p, g, alpha=-o.lr) if g.is_sparse else p.add_(g, alpha=-o.lr)

    def _skipped_first_step(self, group, bucket: _flat.Bucket, fresh, found_inf) -> None:
        """A momentum buffer starts as the first gradient, and later steps dampen theirs;
        a zero buffer left by a skipped first step would make the next step dampen its
        gradient as if it were not the first. torch.optim.SGD never steps when GradScaler
        skips (its fused CPU kernel leaves an uninitialised buffer instead): drop the
        entries, so that the next step starts the buffers, as torch's does. With
        dampening 0 the zero buffer gives the same numbers, and this reads found_inf back
        (a sync on a GPU) only where it would not."""
        if group["momentum"] != 0 and group["dampening"] != 0 and bool(found_inf):
            for i in fresh:
                del self.state[bucket.params[i]]

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        # A momentum buffer starts as a copy of the gradient on its parameter's first step.
        # Every other step the column is 0 for all: a float, so that the table is the
        # bucket's cached one (no per-step ops, nothing copied to the device).
        first = 0.0
        if fresh and o.momentum != 0:  # (without momentum a parameter stays 'fresh': no state)
            first = torch.zeros(len(bucket), dtype=torch.float64)
            first[torch.tensor(fresh)] = 1.0
        self._run_path(bucket, batch, state, kernels.scalars(first, o), o,
                       kernels.sgd_triton, kernels.sgd_reference)
