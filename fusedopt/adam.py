"""Adam: torch.optim.Adam's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from ._adam_family import AdamFamily, check_arguments
from ._options import refuse_differentiable


def _to_scalar(x):
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


class Adam(AdamFamily):
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
        foreach, fused, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
        master_weights (default False): fusedopt only. bf16/fp16 parameters get an fp32 copy,
            ``state[p]["master_param"]``, which the step updates (in fp32, with fp32 moments
            unless ``state_dtype`` says otherwise) and rounds into the parameter in the same
            pass. The copy is the truth: write new values into it, not only into the
            parameter. state_dict() and load_state_dict() keep it fp32.
        state_dtype (default None: the parameter's dtype): fusedopt only. The dtype of the
            moment buffers (torch.bfloat16 halves their memory); the math stays fp32 and
            each store rounds to nearest even. Complex parameters keep torch's dtype.
        stochastic_rounding (default False): fusedopt only. bf16 parameters (without a master
            copy) take the fp32 result rounded up or down at random, with the probability
            that makes the rounding unbiased, so updates smaller than half an ulp move the
            parameter in expectation instead of vanishing. The random bits are a hash of
            (``opt.sr_seed``, bucket, tensor, its step count, element): a step is reproducible.
        max_grad_norm (default None): fusedopt only. Clip the global norm of every gradient
            this step updates to this value, as ``torch.nn.utils.clip_grad_norm_`` followed
            by ``step()`` would, inside the step: one reduction launch per bucket and the
            coefficient applied in the update kernel, without writing the gradients or a
            host sync. Under GradScaler it is the norm of the unscaled gradients.

    Note:
        Numbers equal torch's to float rounding: the kernel keeps torch's order of operations
        and rounds state to its dtype where torch's in-place ops do.
    """

    _flat_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
    _scalar_state = ("step",)
    _variant = "adam"
    _native = True
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, backend: str = "auto",
                 master_weights: bool = False, state_dtype: torch.dtype | None = None,
                 max_grad_norm: float | None = None, stochastic_rounding: bool = False):
        if isinstance(lr, Tensor) and foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        check_arguments(lr, betas, eps, weight_decay)
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")
        refuse_differentiable(differentiable, fused)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, betas=tuple(map(_to_scalar, betas)), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._set_extras(master_weights, state_dtype, stochastic_rounding, max_grad_norm)
        super().__init__(params, defaults, backend=backend)
        if fused:
            # As torch's fused optimizers: GradScaler hands over grad_scale and found_inf
            # and the kernel unscales and skips on the device. Off by default, because
            # frameworks (Lightning) refuse to clip gradients for such optimizers.
            self._step_supports_amp_scaling = True

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "decoupled_weight_decay": False, "fused": None,
    }

    def _check_group(self, group):
        super()._check_group(group)
        # torch's step refuses these for a group added or edited after construction
        # (its constructor refuses them in the keywords, as __init__ does here).
        refuse_differentiable(group.get("fused") and group.get("differentiable"), fused=True)
        if group.get("foreach") and not group.get("capturable"):
            if isinstance(group["lr"], Tensor):
                raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
            for index, beta in enumerate(group["betas"], 1):
                if isinstance(beta, Tensor):
                    raise ValueError(f"beta{index} as a Tensor is not supported for capturable=False and foreach=True")

    def _state_keys(self, group):
        return ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
