"""fusedopt: torch.optim with every step fused into one launch per bucket of flat state.

    import fusedopt as optim
    opt = optim.AdamW(model.parameters(), lr=1e-3)
"""
from .adam import Adam
from .adamw import AdamW
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["Adam", "AdamW", "Optimizer", "SGD"]
__version__ = "0.1.0"
