"""Adagrad: torch.optim.Adagrad's signature, defaults, validation and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _flat
from .kernels import adagrad as kernels
from ._options import check_lr, check_max_grad_norm, check_nonnegative, float_option, refuse_differentiable
from ._state import mark_sparse
from .optimizer import Optimizer


class Adagrad(Optimizer):
    r"""Adagrad, as torch.optim.Adagrad, with one fused launch per (group, device, dtype) bucket.

    .. math::
        \tilde\gamma_t = \frac{\gamma}{1 + (t - 1)\eta}, \quad
        g_t \leftarrow g_t + \lambda\theta_{t-1}, \quad
        s_t = s_{t-1} + g_t^2, \quad
        \theta_t = \theta_{t-1} - \tilde\gamma_t \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`s_0 = \tau` (``initial_accumulator_value``), :math:`\eta` the ``lr_decay``
    and :math:`t` the parameter's own step count.

    As in torch, every parameter's state (``step`` = 0, ``sum`` = :math:`\tau`) exists from
    construction, and parameters added later get theirs on their first step, from the
    constructor's ``initial_accumulator_value`` (torch reads it from the defaults, never
    from a group).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-2), lr_decay (default 0), weight_decay (default 0),
        initial_accumulator_value (default 0), eps (default 1e-10), maximize (default False):
            as in torch.optim.Adagrad.
        foreach, fused, differentiable, backend: torch's flags and fusedopt's path, as for every
            optimizer here; see :class:`fusedopt.Optimizer`.
        max_grad_norm (default None): fusedopt only; clips the global gradient norm inside
            the step, see :class:`fusedopt.Adam`.

    Sparse gradients (an ``Embedding(sparse=True)``) are stepped by torch's own sparse
    Adagrad on the parameter and its flat ``sum`` segment; as in torch, not with
    ``weight_decay`` or ``fused=True``.
    """

    _flat_state = ("sum",)
    _scalar_state = ("step",)
    _native = True
    _clips = True
    _fuses_average = True
    _steps_sparse = True

    def __init__(self, params, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 backend: str = "auto", max_grad_norm: float | None = None):
        check_lr(lr)
        check_nonnegative(lr_decay=lr_decay, weight_decay=weight_decay,
                          initial_accumulator_value=initial_accumulator_value, eps=eps)
        refuse_differentiable(differentiable, fused)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, fused=fused)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        super().__init__(params, defaults, backend=backend)
        if fused:
            # As torch's fused optimizers: GradScaler hands over grad_scale and found_inf
            # and the kernel unscales and skips on the device. Off by default, because
            # frameworks (Lightning) refuse to clip gradients for such optimizers.
            self._step_supports_amp_scaling = True
        # torch creates every parameter's state here, not at its first step, in the
        # groups' order (the buckets below go by dtype and device).
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]
                # A lazy module's parameter not yet materialized has no shape to hold the
                # sum: torch's constructor raises the ValueError that a torch function on
                # an uninitialized parameter raises, and this torch function raises it.
                torch.is_complex(p)
        for gi, group in enumerate(self.param_groups):
            for bucket in self._group_buckets(gi):
                self._init_state(group, bucket, list(range(len(bucket))))

    # Keys older checkpoints may lack, filled in on load as torch's __setstate__ does.
    _group_defaults = {"foreach": None, "maximize": False, "differentiable": False, "fused": None}

    def share_memory(self) -> None:
        """Move the flat ``sum`` buffers (what every ``state[p]['sum']`` views) to shared memory."""
        for gi in range(len(self.param_groups)):
            for bucket in self._group_buckets(gi):
                if "sum" in bucket.buffers:
                    bucket.buffers["sum"].share_memory_()

    def _check_group(self, group):
        # torch's step refuses it for a group added or edited after construction
        refuse_differentiable(group.get("fused") and group.get("differentiable"), fused=True)

    def _state_keys(self, group):
        return ["step", "sum"]

    def _initial_fill(self, group, key):
        return float(self.defaults["initial_accumulator_value"]) if key == "sum" else 0.0

    def _options(self, group) -> kernels.AdagradOptions:
        return kernels.AdagradOptions(lr=float_option(group, "lr"), lr_decay=group["lr_decay"],
                                      weight_decay=group["weight_decay"], eps=group["eps"],
                                      maximize=bool(group["maximize"]))

    def _check_steps(self, group, bucket: _flat.Bucket, batch, sparse) -> None:
        """A negative lr_decay (refused by the constructor, set in a group afterwards) makes
        torch's step divide lr by 1 + (step - 1) * lr_decay = 0 at some step, a Python float
        division that raises ZeroDivisionError (its fused kernel, which `backend='auto'` runs
        without fused=True too, steps with an infinite lr instead). Raised here before
        anything changes, for the tensors this step steps."""
        lr_decay = group["lr_decay"]
        if isinstance(lr_decay, Tensor) or not lr_decay < 0 or group.get("fused"):
            return
        stepped = ([] if batch is None else list(batch.index)) + [i for i, _ in sparse or ()]
        counts = bucket.scalar("step")[stepped].to("cpu", torch.float64)   # (step - 1) of the coming step
        zero = (counts * lr_decay + 1 == 0).nonzero()
        if len(zero):
            raise ZeroDivisionError(
                f"float division by zero: lr_decay is {lr_decay!r}, and torch's Adagrad divides lr by "
                f"1 + (step - 1) * lr_decay, which is 0 at step {int(counts[zero[0, 0]]) + 1} of parameter "
                f"{self._global_index(bucket.params[stepped[zero[0, 0]]])} (its constructor refuses a negative lr_decay)")

    def _check_sparse(self, group, bucket: _flat.Bucket) -> None:
        super()._check_sparse(group, bucket)
        if group["weight_decay"] != 0:
            raise RuntimeError(f"weight_decay option is not compatible with sparse gradients "
                               f"(fusedopt.Adagrad, weight_decay={group['weight_decay']})")

    def _sparse_update(self, group, bucket: _flat.Bucket, sparse, fresh) -> None:
        """torch's single-tensor Adagrad, which steps a sparse gradient's entries only, on
        each such parameter with its flat `sum` segment and its step count: torch's ops,
        with its sparse adds into the segment made by `_flat.add_sparse_`'s indexing (torch's
        own add faults at a storage offset)."""
        o = self._options(group)
        steps = bucket.scalar("step")
        for i, g in sparse:
            mark_sparse(self.state[bucket.params[i]], g)   # (for `state_dict`: Optimizer._exported)
            steps[i] += 1
            clr = o.lr / (1 + (steps[i].item() - 1) * o.lr_decay)
            g = (-g if o.maximize else g).coalesce()   # the update is not linear: unique indices
            where, values = tuple(g._indices()), g._values()
            total = bucket.state_view("sum", i)
            total.index_put_(where, values.pow(2), accumulate=True)
            std = total[where].sqrt_().add_(o.eps)
            update = torch.sparse_coo_tensor(g._indices(), values / std, g.shape, check_invariants=False)
            _flat.add_sparse_(bucket.params[i], update, alpha=-clr)

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        self._advance_steps(bucket, batch)
        self._run_path(bucket, batch, state, kernels.scalars(bucket.steps, o), o,
                       kernels.adagrad_triton, kernels.adagrad_reference)
