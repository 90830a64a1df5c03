"""`import fusedopt as optim` is a one-line switch from `import torch.optim as optim`."""
import inspect
import subprocess
import sys

import torch

import fusedopt as optim

# Every optimizer class torch.optim exports.
TORCH_OPTIMIZERS = sorted(name for name, obj in vars(torch.optim).items()
                          if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer)


# Not fused yet: fusedopt exports torch's own class under the name (see fusedopt/__init__.py).
TORCH_OWN = {"Adafactor", "Muon"}


def test_every_torch_optimizer_has_a_fusedopt_class():
    assert TORCH_OPTIMIZERS, "found no torch optimizers to compare with"
    for name in TORCH_OPTIMIZERS:
        ours = getattr(optim, name)
        if name in TORCH_OWN:
            assert ours is getattr(torch.optim, name)
            continue
        assert issubclass(ours, torch.optim.Optimizer) and issubclass(ours, optim.Optimizer), name
        assert ours.__module__.startswith("fusedopt."), f"{name} comes from {ours.__module__}"


def test_torch_module_names_work():
    model = torch.nn.Linear(3, 2)
    opt = optim.AdamW(model.parameters(), lr=0.1)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    swa_model = optim.swa_utils.AveragedModel(model)
    swalr = optim.swa_utils.SWALR(opt, swa_lr=0.05)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert isinstance(swalr, torch.optim.lr_scheduler.LRScheduler)
    assert type(sched).__module__.startswith("fusedopt.") and type(swa_model).__module__.startswith("fusedopt.")
    for name in ("LRScheduler", "StepLR", "OneCycleLR", "ReduceLROnPlateau", "SequentialLR", "CyclicLR"):
        assert hasattr(optim.lr_scheduler, name), name


def test_imports_on_a_torch_without_the_newer_torch_optim_names():
    """The bootstrap reuses an installed torch from 2.4 on, which has no Muon (nor Adafactor,
    nor swap_in_optimizer_params_and_state): `import fusedopt` must still work there, and
    export only what that torch.optim has."""
    names = ("Adafactor", "Muon", "swap_in_optimizer_params_and_state")
    code = (
        "import torch.optim\n"
        f"for n in {names!r}:\n"
        "    if hasattr(torch.optim, n): delattr(torch.optim, n)\n"
        "import fusedopt\n"
        f"assert not [n for n in {names!r} if hasattr(fusedopt, n) or n in fusedopt.__all__]\n"
        "assert fusedopt.AdamW is not None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_torch_module_names_import_as_torchs_do():
    """`from torch.optim.lr_scheduler import X` becomes `from fusedopt.lr_scheduler import X`:
    the switch of an import line, not only of `import ... as optim`, keeps working, with
    every name torch's modules export, and the modules are fusedopt's own."""
    code = (
        "import torch.optim.lr_scheduler as TL, torch.optim.swa_utils as TS\n"
        "import fusedopt.lr_scheduler, fusedopt.swa_utils\n"
        "from fusedopt.lr_scheduler import StepLR, _LRScheduler\n"
        "from fusedopt.swa_utils import AveragedModel, SWALR, update_bn\n"
        "import fusedopt\n"
        "assert fusedopt.lr_scheduler is fusedopt.schedulers and fusedopt.swa_utils is fusedopt.swa\n"
        "assert StepLR is fusedopt.schedulers.StepLR and AveragedModel is fusedopt.swa.AveragedModel\n"
        "for ours, theirs in (('lr_scheduler', TL), ('swa_utils', TS)):\n"
        "    for name in theirs.__all__:\n"
        "        exec(f'from fusedopt.{ours} import {name} as x')\n"
        "        assert getattr(x, '__module__', 'fusedopt').startswith('fusedopt'), (name, x)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
