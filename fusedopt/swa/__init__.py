"""Stochastic Weight Averaging, as torch.optim.swa_utils, with the average fused.

    from fusedopt.swa import AveragedModel, SWALR, update_bn
    swa_model = AveragedModel(model)              # or multi_avg_fn=get_ema_multi_avg_fn(0.999)
    swa_model.update_parameters(model)            # one launch per (device, dtype) bucket
"""
from ._averaged_model import AveragedModel, FlatAverage
from ._averages import Average, get_ema_avg_fn, get_ema_multi_avg_fn, get_swa_avg_fn, get_swa_multi_avg_fn
from ._swalr import SWALR, cos_anneal, linear_anneal, swa_lr_step
from ._update_bn import update_bn

__all__ = [
    "AveragedModel",
    "update_bn",
    "SWALR",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
    "Average",
    "FlatAverage",
    "cos_anneal",
    "linear_anneal",
    "swa_lr_step",
]
