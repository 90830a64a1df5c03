"""What Adamax, NAdam and RAdam share: torch's argument checks, and the step, which runs
Adam's kernel (kernels/adam.py) with the class's VARIANT."""
from __future__ import annotations

from torch import Tensor

from . import _flat
from .kernels import adam as kernels
from .optimizer import Optimizer, _as_float


def check_arguments(lr, betas, eps, weight_decay) -> None:
    """torch's checks for the Adam family's shared arguments, in torch's order."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
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


class AdamFamily(Optimizer):
    """Base of the optimizers that run Adam's kernel: Adam, AdamW, and the other VARIANTs."""

    _variant = "adam"
    _native = False  # torch has a fused CPU kernel for Adam and AdamW only

    def _options(self, group) -> kernels.AdamOptions:
        beta1, beta2 = group["betas"]
        return kernels.AdamOptions(
            lr=_as_float(group["lr"]), beta1=_as_float(beta1), beta2=_as_float(beta2), eps=group["eps"],
            weight_decay=_as_float(group["weight_decay"]), amsgrad=group.get("amsgrad", False), maximize=group["maximize"],
            decoupled=group.get("decoupled_weight_decay", False), variant=self._variant,
            momentum_decay=group.get("momentum_decay", 0.0))

    def _update(self, group, bucket: _flat.Bucket, batch: _flat.Batch, fresh) -> None:
        o = self._options(group)
        state = self._buffers(group, bucket, batch)
        self._advance_steps(bucket, batch)
        self._advance_scalars(bucket, batch, o)
        kernels.step_bucket(bucket, batch, state, o)

    def _advance_scalars(self, bucket: _flat.Bucket, batch: _flat.Batch, o: kernels.AdamOptions) -> None:
        """Per-parameter scalar state other than `step` that the step itself updates."""
