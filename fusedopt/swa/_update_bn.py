"""update_bn: recompute BatchNorm running statistics with one pass over the data."""
from __future__ import annotations

import torch
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def update_bn(loader, model: Module, device: int | torch.device | None = None) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them over `loader`,
    as :func:`torch.optim.swa_utils.update_bn`.

    Each batch is a tensor, or a list/tuple whose first element is the input; it is moved
    to `device` when one is given. Statistics are the plain average over the batches
    (momentum None while the pass runs); momenta and train/eval mode are restored after,
    also when the loader or the model raises (torch's then leaves momentum None, which
    would turn every later training step's running statistics into a cumulative average).
    A model without BatchNorm is left untouched and the loader is not read.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return
    momenta = {}
    for bn in norms:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
    was_training = model.training
    model.train()
    for bn in momenta:
        # momentum None: running stats become the cumulative average of the batch statistics
        bn.momentum = None
    try:
        for batch in loader:
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                inputs = inputs.to(device)
            model(inputs)
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        model.train(was_training)
