"""Adam: torch.optim.Adam's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _flat
from ._flat import memory_order
from .kernels import adam as kernels
from .kernels import _launch
from .optimizer import Optimizer, _as_float


def _to_scalar(x):
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


class Adam(Optimizer):
    r"""Adam, as torch.optim.Adam, with one fused launch per (group, device, dtype) bucket.

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} \,
                   \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    with L2 weight decay added to the gradient, or decoupled (AdamW) when
    ``decoupled_weight_decay`` is set; ``amsgrad`` uses the running maximum of :math:`v_t`.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-3), betas (default (0.9, 0.999)), eps (default 1e-8),
        weight_decay (default 0), amsgrad (default False), maximize (default False),
        decoupled_weight_decay (default False): as in torch.optim.Adam.
        foreach, fused: accepted for compatibility; every path here is fused, so they change
            nothing (they are kept in the param groups, as torch keeps them).
        capturable: accepted; ``step`` is kept on the CPU as for torch's non-capturable path.
        differentiable: must be False: the fused update is not differentiable.
        backend ('auto', 'triton' or 'reference'): the path; see :class:`fusedopt.Optimizer`.

    Note:
        Numbers equal torch's to float rounding: the kernel keeps torch's order of operations
        and rounds state to its dtype where torch's in-place ops do.
    """

    _flat_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _scalar_state = ("step",)
    _native = True
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, backend: str = "auto"):
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")
        if differentiable:
            raise RuntimeError("fusedopt: differentiable=True is not supported: the fused update is not "
                               "differentiable. help: use torch.optim for differentiable optimization")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, betas=tuple(map(_to_scalar, betas)), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)

    def _state_keys(self, group):
        return ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])

    def _options(self, group) -> kernels.AdamOptions:
        beta1, beta2 = group["betas"]
        return kernels.AdamOptions(
            lr=_as_float(group["lr"]), beta1=_as_float(beta1), beta2=_as_float(beta2), eps=group["eps"],
            weight_decay=_as_float(group["weight_decay"]), amsgrad=group["amsgrad"],
            maximize=group["maximize"], decoupled=group["decoupled_weight_decay"])

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        self._advance_steps(bucket, batch)
        if bucket.path == "native":
            views = {k: [bucket.segment(k, i) for i in batch.index] for k in state}
            steps = [bucket.steps[i] for i in batch.index]
            kernels.adam_native([memory_order(p) for p in batch.params], [memory_order(g) for g in batch.grads],
                                views["exp_avg"], views["exp_avg_sq"], views.get("max_exp_avg_sq", []), steps, o)
            return
        table = _launch.scalar_table(kernels.scalars(bucket.steps, o), len(bucket),
                                     _launch.compute_dtype(bucket.real_dtype), bucket.device)
        run = kernels.adam_triton if bucket.path == "triton" else kernels.adam_reference
        run(bucket, batch, state, table, o)
