"""Rprop: torch.optim.Rprop's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import math

from torch import Tensor

from . import _flat
from .kernels import rprop as kernels
from ._options import as_float, check_lr, float_option, pair, refuse_differentiable
from .optimizer import Optimizer


class Rprop(Optimizer):
    r"""Rprop (resilient backpropagation), as torch.optim.Rprop, with one fused launch per
    (group, device, dtype) bucket.

    .. math::
        \eta_t = \begin{cases} \eta_+ & g_t g_{t-1} > 0 \\ \eta_- & g_t g_{t-1} < 0 \\ 1 & \text{otherwise}
                 \end{cases}, \quad
        \Delta_t = \operatorname{clamp}(\eta_t \Delta_{t-1}, \Delta_{\min}, \Delta_{\max}), \quad
        \theta_t = \theta_{t-1} - \operatorname{sign}(g_t)\,\Delta_t

    where :math:`g_t` is set to 0 wherever :math:`\eta_t = \eta_-` (the gradient changed
    sign: no move this step) and stored as ``prev`` (:math:`g_{t-1}`, starting at 0); the
    step sizes ``step_size`` (:math:`\Delta`) start at :math:`\gamma` (the group's lr at the
    parameter's first step). lr plays no other part.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-2), etas (default (0.5, 1.2)), step_sizes (default
        (1e-6, 50); None on one side for no bound), maximize (default False): as in
        torch.optim.Rprop.
        foreach, capturable, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
    """

    _flat_state = ("prev", "step_size")
    _scalar_state = ("step",)
    _sparse_error = "Rprop does not support sparse gradients"
    _fuses_average = True

    def __init__(self, params, lr: float | Tensor = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False,
                 backend: str = "auto"):
        check_lr(lr)
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        refuse_differentiable(differentiable)
        defaults = dict(lr=lr, etas=etas, step_sizes=step_sizes, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, capturable=capturable)
        super().__init__(params, defaults, backend=backend)

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {"foreach": None, "maximize": False, "differentiable": False, "capturable": False}

    def _state_keys(self, group):
        return ["step", "prev", "step_size"]

    def _initial_fill(self, group, key):
        return float_option(group, "lr") if key == "step_size" else 0.0

    def _options(self, group) -> kernels.RpropOptions:
        etaminus, etaplus = pair(group, "etas")
        step_size_min, step_size_max = pair(group, "step_sizes")
        # torch clamps the step sizes with `clamp_(min, max)`, where None leaves that side
        # unbounded and two Nones raise
        if step_size_min is None and step_size_max is None:
            raise RuntimeError("step_sizes is (None, None): torch's Rprop clamps the step sizes with "
                               "torch.clamp, which needs at least one of its min and max")
        return kernels.RpropOptions(
            etaminus=as_float(etaminus, "etas[0]"), etaplus=as_float(etaplus, "etas[1]"),
            step_size_min=-math.inf if step_size_min is None else as_float(step_size_min, "step_sizes[0]"),
            step_size_max=math.inf if step_size_max is None else as_float(step_size_max, "step_sizes[1]"),
            maximize=group["maximize"])

    _lr_seeds_state = True

    def _check_steps(self, group, bucket: _flat.Bucket, batch, sparse) -> None:
        """torch's Rprop reads lr only to fill a parameter's first step sizes, with
        `full_like(grad, lr)`: an lr that is not a number there (None, a string, a tensor
        that requires grad, which full_like refuses) raises TypeError when some parameter
        steps for the first time, and not at the steps after. Raised here for those
        parameters, before anything changes."""
        lr = group["lr"]
        if type(lr) in (float, int) or (isinstance(lr, Tensor) and not lr.requires_grad and lr.numel() == 1):
            return
        if batch is None or all(bucket.initialized[i] for i in batch.index):
            return
        if isinstance(lr, Tensor) and lr.requires_grad:
            raise TypeError(f"lr is a tensor that requires grad ({lr!r}); torch's Rprop fills a parameter's "
                            "first step sizes with full_like(grad, lr), which takes a number")
        as_float(lr, "lr")

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        self._advance_steps(bucket, batch)
        self._run_path(bucket, batch, state, kernels.scalars(o, bucket.real_dtype), o,
                       kernels.rprop_triton, kernels.rprop_reference)
