"""fusedopt: torch.optim with every step fused into one launch per bucket of flat state.

    import fusedopt as optim
    opt = optim.AdamW(model.parameters(), lr=1e-3)
"""
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
# and `optim.swa_utils.Y` working: the one-line switch covers schedulers and SWA too.
lr_scheduler = schedulers
swa_utils = swa

# torch.optim also has Adafactor and Muon (row/column-factored and matrix-orthogonalising
# updates, not element-wise). fusedopt has no fused step for them yet: the names are
# torch's own classes, so code that uses them keeps working after the switch.
from torch.optim import Adafactor, Muon  # noqa: E402

__all__ = ["ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam", "Optimizer", "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam", "lr_scheduler", "schedulers", "swa", "swa_utils"]
# torch's context manager that steps an optimizer on other parameters and state (newer
# torch versions): torch's own function, which works on fusedopt's optimizers.
import torch.optim as _torch_optim  # noqa: E402

if hasattr(_torch_optim, "swap_in_optimizer_params_and_state"):
    from torch.optim import swap_in_optimizer_params_and_state  # noqa: E402
    __all__.append("swap_in_optimizer_params_and_state")
__version__ = "0.1.0"
