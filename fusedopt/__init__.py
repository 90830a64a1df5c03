"""fusedopt: torch.optim with every step fused into one launch per bucket of flat state.

    import fusedopt as optim
    opt = optim.AdamW(model.parameters(), lr=1e-3)
"""
import sys as _sys

from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam
from .adamax import Adamax
from .adamw import AdamW
from .asgd import ASGD
from .lbfgs import LBFGS
from .nadam import NAdam
from .optimizer import Optimizer
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD
from .sparse_adam import SparseAdam
from . import schedulers, swa

# torch.optim's module names, so `import fusedopt as optim` keeps `optim.lr_scheduler.X`
# and `optim.swa_utils.Y` working: the one-line switch covers schedulers and SWA too. They
# are importable as torch's are (`from fusedopt.lr_scheduler import StepLR`, `import
# fusedopt.swa_utils`): the import system looks a dotted name up in sys.modules first, as
# it does for `os.path`, so each is the same module object under both names.
lr_scheduler = schedulers
swa_utils = swa
_sys.modules[__name__ + ".lr_scheduler"] = schedulers
_sys.modules[__name__ + ".swa_utils"] = swa

__all__ = ["ASGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "NAdam", "Optimizer", "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam", "lr_scheduler", "schedulers", "swa", "swa_utils"]

import torch.optim as _torch_optim  # noqa: E402

# torch.optim also has Adafactor and Muon (row/column-factored and matrix-orthogonalising
# updates, not element-wise). fusedopt has no fused step for them yet: the names are
# torch's own classes, so code that uses them keeps working after the switch. So is torch's
# context manager that steps an optimizer on other parameters and state, which works on
# fusedopt's optimizers. Each only where this torch has it (all three are newer than the
# torch 2.4 the bootstrap reuses): an unconditional import failed `import fusedopt` there.
for _name in ("Adafactor", "Muon", "swap_in_optimizer_params_and_state"):
    if hasattr(_torch_optim, _name):
        globals()[_name] = getattr(_torch_optim, _name)
        __all__.append(_name)
del _name
__version__ = "0.1.0"
