"""Property-based differential test of an optimizer's life, not only of its steps.

Training code does more between steps than set gradients: it saves and loads checkpoints
(and moves them between torch.optim and fusedopt), adds parameter groups or appends to
one's `params`, takes a parameter out of one or reorders them (or the groups), freezes and
unfreezes parameters, writes them through `.data`, gives a parameter new storage of another
shape (before or after it has state), drops or edits a parameter's state, registers step
hooks, sets a tensor lr, steps with a closure, through GradScaler or with sparse gradients,
clips gradients (fusedopt's `max_grad_norm` against torch's `clip_grad_norm_` then the
step), and goes on with a deep or pickled copy of everything. Each of
these touches fusedopt's flat
buffers and bucket layout, which torch.optim does not have. Hypothesis draws a program of
such operations; torch.optim and fusedopt run it side by side, and after every operation
the parameters and both state dicts must agree (`assert_same_run`). Where torch raises,
fusedopt must raise the same type, and the program ends there (torch may have changed
some tensors before raising; fusedopt changes none, which tests/test_errors.py checks).

The parameters are fp32. There torch's per-parameter scalar state (`step`, NAdam's
`mu_product`, ASGD's `eta` and `mu`) has the parameter's dtype whether it was created or
loaded. In fp64 and bf16 torch's load casts that state to the parameter's dtype while state
created after the load is fp32, a mix a bucket's one vector per kind does not hold: the
README's table of differences says what that changes. Other dtypes are
tests/test_property.py's and tests/test_native.py's.

SparseAdam, whose every gradient is sparse, runs the same operations with sparse gradients
(`SparseTwins`), a quarter as many programs.

On a GPU the same programs run on CUDA tensors with the compiled kernels (`gpu`: see
tests/conftest.py). CI draws FUSEDOPT_LIFECYCLE_EXAMPLES programs (default 400, the same every run; about 15 s);
`make test-long` draws new ones.
"""
import copy
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedopt
from _compare import assert_same_run
from optim_db import OPTIMIZERS, OptimInfo

EXAMPLES = int(os.environ.get("FUSEDOPT_LIFECYCLE_EXAMPLES", "400"))
# What this test looks for (state stepped in the wrong place, started afresh, skipped) is
# off by far more; rounding is tests/test_parity.py's. Elements that are the difference of
# two terms ten times larger (RMSprop's momentum) carry an ulp of those, about 1e-6, and
# an fp64 parameter clipped beside fp32 ones a coefficient as exact as fp32's (torch adds
# the squares of fp32 norms, fusedopt fp32 sums of squares).
ATOL = 1e-5
DERANDOMIZE = "FUSEDOPT_LIFECYCLE_EXAMPLES" not in os.environ

OPERATIONS = ["step", "step", "step", "zero_grad", "set_option", "set_option", "reload", "cross_load",
              "add_param_group", "append_param", "replace_param", "write_data", "replace_data", "reshape_stateless",
              "reshape_stateful", "retype_stateless", "toggle_frozen", "drop_state", "edit_state", "pre_hook",
              "closure", "remove_param", "reorder_params", "reorder_groups", "move_param", "delete_group",
              "tensor_lr", "snapshot", "restore", "amp_step", "amp_step", "clip", "sparse_step", "copy_all",
              "swap_state", "hold_state", "edit_held"]

# fusedopt's `max_grad_norm` (torch's recipe: `clip_grad_norm_`, then the step)
CLIPPING = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SGD", "Adagrad")

# Options whose change adds a state kind (torch raises KeyError at the next step, fusedopt
# already at a load in between: README, "Where fusedopt does better than torch"), and the
# path flags, which the program draws once.
NOT_SET_BETWEEN_STEPS = {"amsgrad", "centered", "foreach", "fused"}


def flag_sets(info, config):
    """torch's path flags the row's config can take. torch's fused SGD with momentum raises
    TypeError when a parameter first gets a gradient after the optimizer's first step (its
    list of momentum buffers holds a None); fusedopt steps it, so there is nothing to match."""
    flags = [{}, {"foreach": True}, {"foreach": False}]
    if info.name in ("Adam", "AdamW", "Adagrad") or (info.name == "SGD" and not config.get("momentum")):
        flags.append({"fused": True})
    return flags


@st.composite
def programs(draw):
    info = draw(st.sampled_from(OPTIMIZERS))
    config = dict(draw(st.sampled_from(info.configs)))
    config.update(draw(st.sampled_from(flag_sets(info, config))))
    shapes = draw(st.lists(st.lists(st.sampled_from([0, 1, 3, 7, 33]), max_size=2).map(tuple), min_size=1, max_size=5))
    split = draw(st.integers(0, len(shapes)))
    backend = draw(st.sampled_from(["auto", "reference", "triton"]))
    ops = draw(st.lists(st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 2 ** 16)), min_size=3, max_size=12))
    return info, config, shapes, split, backend, ops


# SparseAdam steps sparse gradients only; its programs are drawn apart (`SparseTwins`).
SPARSE_ADAM = OptimInfo("SparseAdam", fusedopt.SparseAdam, torch.optim.SparseAdam,
                        configs=[dict(lr=0.01), dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=True)],
                        second_group=dict(lr=0.003, betas=(0.5, 0.99)))


@st.composite
def sparse_programs(draw):
    config = dict(draw(st.sampled_from(SPARSE_ADAM.configs)))
    shapes = draw(st.lists(st.lists(st.sampled_from([0, 1, 3, 7, 33]), min_size=1, max_size=2).map(tuple),
                           min_size=1, max_size=5))
    split = draw(st.integers(0, len(shapes)))
    backend = draw(st.sampled_from(["auto", "reference", "triton"]))
    ops = draw(st.lists(st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 2 ** 16)), min_size=3, max_size=12))
    return SPARSE_ADAM, config, shapes, split, backend, ops


def raised(*calls) -> list[Exception | None]:
    """Run each call; what each raised (None: it returned)."""
    out = []
    for call in calls:
        try:
            call()
            out.append(None)
        except Exception as e:  # noqa: BLE001 - the caller compares them
            out.append(e)
    return out


class Twins:
    """torch.optim and fusedopt, each on its own copy of the same parameters."""

    def __init__(self, info, config, shapes, split, backend, device="cpu"):
        self.info, self.config, self.backend, self.device = info, config, backend, device
        gen = torch.Generator().manual_seed(len(shapes))
        made = [torch.randn(s, generator=gen).to(device) for s in shapes]
        self.theirs = [t.clone().requires_grad_() for t in made]
        self.ours = [t.clone().requires_grad_() for t in made]

        def groups(params):
            first, second = params[:split], params[split:]
            return [g for g in ({"params": first}, {"params": second, **info.second_group}) if g["params"]]

        self.ref = info.torch(groups(self.theirs), **config)
        self.opt = info.fused(groups(self.ours), **config, backend=backend)

    def pairs(self):
        return zip(self.theirs, self.ours)

    def new_pair(self, shape, k):
        t = torch.randn(shape, generator=torch.Generator().manual_seed(k)).to(self.device)
        a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
        self.theirs.append(a)
        self.ours.append(b)
        return a, b

    def set_gradients(self, k):
        gen = torch.Generator().manual_seed(k)
        for a, b in self.pairs():
            draw = torch.rand((), generator=gen).item()
            g = torch.randn(a.shape, generator=gen, dtype=a.dtype).to(self.device)
            if not a.requires_grad or draw < 0.15:
                a.grad = b.grad = None
            elif draw < 0.3:
                pass   # keeps last step's gradient (or none)
            else:
                a.grad, b.grad = g.clone(), g.clone()

    def both(self, call) -> bool:
        """Run `call` on (torch's optimizer, its params) and on ours; False when both
        raised (the same exception type), which ends the program."""
        theirs, ours = raised(lambda: call(self.ref, self.theirs), lambda: call(self.opt, self.ours))
        if theirs is None and ours is None:
            return True
        if ours is None and "add(sparse, dense) is not supported" in str(theirs):
            # torch's SGD keeps a momentum buffer that a sparse gradient started sparse, and
            # its step cannot add a dense gradient to it; fusedopt steps it (README, "Where
            # fusedopt does better"). The two have parted: the program ends.
            return False
        assert type(theirs) is type(ours), f"torch: {theirs!r}; fusedopt: {ours!r}"
        return False

    def rebuilt(self, opt, params_of, cls, **extra):
        return cls([{"params": list(g["params"])} for g in opt.param_groups], **self.config, **extra)

    # ------------------------------------------------------------------ the operations
    # Each takes the drawn integer k (an index, a value, a seed) and returns False to end
    # the program.

    def _clipped(self, opt, step, unscale=None, closure=None):
        """Run `step` of either optimizer; where fusedopt clips (`max_grad_norm`), torch's
        runs torch's recipe: `clip_grad_norm_` over the gradients the step will use (after
        GradScaler's `unscale`, the step pre-hooks, the `closure`), which are put back after
        the step (fusedopt's are never written)."""
        max_norm = getattr(self, "max_norm", None)
        if opt is self.opt or max_norm is None:
            return step(closure) if closure is not None else step()
        kept = []

        def clip():
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            kept[:] = [(p, p.grad.clone()) for p in params]
            torch.nn.utils.clip_grad_norm_(params, max_norm)

        if unscale is not None:
            unscale()
        if closure is not None:
            def clipping_closure():
                loss = closure()
                clip()
                return loss
            handle = None
        else:
            handle = opt.register_step_pre_hook(lambda *_: clip())   # (after the other pre-hooks)
        try:
            return step(clipping_closure) if closure is not None else step()
        finally:
            if handle is not None:
                handle.remove()
            for p, g in kept:
                p.grad = g

    def step(self, k):
        self.set_gradients(k)
        return self.both(lambda opt, _: self._clipped(opt, opt.step))

    def sparse_step(self, k):
        """A step with sparse COO gradients (an `Embedding(sparse=True)`'s, some rows absent)
        for the parameters of two or more dimensions: SGD and Adagrad step them (not with
        weight decay), the others refuse them, as torch does. (Not while clipping: torch's
        clip_grad_norm_ cannot take a sparse gradient's norm, and fusedopt refuses it. Not
        of one dimension: torch's CPU `add_` of a sparse tensor without dense dimensions
        into a view at a storage offset writes past the view, and a checkpoint of
        fusedopt's, loaded into torch.optim, holds such views: README, "Differences".)"""
        if getattr(self, "max_norm", None) is not None:
            return
        self.set_gradients(k)
        gen = torch.Generator().manual_seed(k)
        for a, b in self.pairs():
            if a.grad is not None and a.dim() >= 2:
                rows = (torch.rand(a.shape[0], generator=gen) < 0.6).to(self.device)
                g = (a.grad * rows.view(-1, *[1] * (a.dim() - 1))).to_sparse(1)
                a.grad, b.grad = g.clone(), g.clone()
        return self.both(lambda opt, _: self._clipped(opt, opt.step))

    def copy_all(self, k):
        """Go on with a deep copy, or an unpickled copy, of each optimizer and its parameters
        (a checkpoint of the whole training state in one object)."""
        for side in ("theirs", "ours"):
            opt_name = "ref" if side == "theirs" else "opt"
            both = (getattr(self, side), getattr(self, opt_name))
            params, opt = copy.deepcopy(both) if k % 2 else pickle.loads(pickle.dumps(both))
            setattr(self, side, params)
            setattr(self, opt_name, opt)
        if hasattr(self, "scalers"):
            del self.scalers   # (GradScaler keeps per-optimizer state by id)

    def clip(self, k):
        """Turn fusedopt's `max_grad_norm` on (torch: clip_grad_norm_ before each step), or off."""
        sparse = any(a.grad is not None and a.grad.is_sparse for a in self.theirs)   # (see `sparse_step`)
        if self.info.name in CLIPPING and not sparse:
            self.max_norm = [None, 0.05, 0.5, 5.0][k % 4]
            self.opt.max_grad_norm = self.max_norm

    def amp_step(self, k):
        """A step through `torch.amp.GradScaler`, each optimizer with its own scaler, from
        gradients scaled by it (a power of two: unscaling is exact); now and then with an
        inf in a gradient, which skips the step and halves the scale. torch's optimizer is
        unscaled by the scaler, fusedopt's gets the scale and found_inf and unscales in its
        step (`_step_supports_amp_scaling`)."""
        if not hasattr(self, "scalers"):
            self.scalers = [torch.amp.GradScaler(self.device, init_scale=2.0 ** (k % 7), growth_interval=2)
                            for _ in range(2)]
            for scaler in self.scalers:
                scaler.scale(torch.ones((), device=self.device))   # (makes the scale)
        self.set_gradients(k)
        scale = self.scalers[0].get_scale()
        with_grad = [(a, b) for a, b in self.pairs() if a.grad is not None and a.grad.numel()]
        for a, b in self.pairs():
            if a.grad is not None:
                a.grad, b.grad = a.grad * scale, b.grad * scale
        # (Not under fused SGD: torch's fused CPU SGD leaves a momentum buffer uninitialised
        # when GradScaler skips its first step; tests/test_amp.py compares that case with
        # the unfused class.)
        if with_grad and k % 5 == 0 and not (self.info.name == "SGD" and self.config.get("fused")):
            for p in with_grad[k % len(with_grad)]:
                p.grad.view(-1)[0] = float("inf")

        def step(opt, params):
            scaler = self.scalers[opt is self.opt]
            self._clipped(opt, lambda: scaler.step(opt), unscale=lambda: scaler.unscale_(opt))
            scaler.update()

        if not self.both(step):
            return False
        assert self.scalers[0].get_scale() == self.scalers[1].get_scale()
        for a, b in self.pairs():
            if a.grad is not None and not a.grad.is_sparse and not a.grad.isfinite().all():
                # (the inf is GradScaler's to skip: a later step that kept it, clipped to NaN,
                # has no one torch answer: its fused amsgrad max drops a NaN, its for-loop's keeps it)
                a.grad = b.grad = None

    def zero_grad(self, k):
        for opt in (self.ref, self.opt):
            opt.zero_grad(set_to_none=bool(k % 2))

    def set_option(self, k):
        """Give a group an option value another of the row's configs uses (SGD's momentum
        turned on or off included), or a new lr."""
        gi = k % len(self.ref.param_groups)
        choices = [(key, value) for config in self.info.configs + [self.info.second_group]
                   for key, value in config.items() if key not in NOT_SET_BETWEEN_STEPS
                   and not (self.info.name == "RMSprop" and key == "momentum")]
        choices += [(self.info.lr_key, lr) for lr in (0.001, 0.02, 0.1)]
        key, value = choices[k % len(choices)]
        for opt in (self.ref, self.opt):
            opt.param_groups[gi][key] = value

    def _load(self, torch_from, ours_from):
        ref = self.rebuilt(self.ref, self.theirs, self.info.torch)
        opt = self.rebuilt(self.opt, self.ours, self.info.fused, backend=self.backend)
        ref.load_state_dict(copy.deepcopy(torch_from.state_dict()))
        if self._unfit():
            # State that no longer fits its parameter (`reshape_stateful`): torch loads it
            # as it is, fusedopt refuses a state dict that does not fit, before anything
            # changes (README, "Where fusedopt does better").
            with pytest.raises(ValueError, match="shape"):
                opt.load_state_dict(copy.deepcopy(ours_from.state_dict()))
            return False
        opt.load_state_dict(copy.deepcopy(ours_from.state_dict()))
        opt.max_grad_norm = getattr(self, "max_norm", None)
        self.ref, self.opt = ref, opt

    def _unfit(self, state=None) -> bool:
        """Whether state (torch's, or a saved state dict's `state`) has a tensor that does not
        fit its parameter's shape."""
        if state is None:
            return any(key in self.opt._flat_state and isinstance(v, torch.Tensor) and v.shape != p.shape
                       for p, entry in self.ref.state.items() for key, v in entry.items())
        params = [p for group in self.ref.param_groups for p in group["params"]]
        return any(key in self.opt._flat_state and isinstance(v, torch.Tensor) and i < len(params)
                   and v.shape != params[i].shape for i, entry in state.items() for key, v in entry.items())

    def snapshot(self, k):
        self.saved = copy.deepcopy((self.ref.state_dict(), self.opt.state_dict()))

    def restore(self, k):
        """Load a state dict saved earlier into the optimizers as they are now (not rebuilt):
        state for parameters that have changed since, groups with other options."""
        saved = getattr(self, "saved", None)
        if saved is None:
            return
        theirs, ours = copy.deepcopy(saved)
        if self._unfit(theirs["state"]) and \
                [len(g["params"]) for g in theirs["param_groups"]] == [len(g["params"]) for g in self.ref.param_groups]:
            self.ref.load_state_dict(theirs)
            with pytest.raises(ValueError, match="shape"):   # (see `_load`)
                self.opt.load_state_dict(ours)
            return False
        return self.both(lambda opt, _: opt.load_state_dict(theirs if opt is self.ref else ours))

    def reload(self, k):
        return self._load(self.ref, self.opt)

    def cross_load(self, k):
        """torch's optimizer loads fusedopt's checkpoint, and fusedopt loads torch's."""
        return self._load(self.opt, self.ref)

    def add_param_group(self, k):
        a, b = self.new_pair((1 + k % 5,), k)
        self.ref.add_param_group({"params": [a], self.info.lr_key: 0.005})
        self.opt.add_param_group({"params": [b], self.info.lr_key: 0.005})

    def append_param(self, k):
        gi = k % len(self.ref.param_groups)
        a, b = self.new_pair((1 + k % 40,), k)
        self.ref.param_groups[gi]["params"].append(a)
        self.opt.param_groups[gi]["params"].append(b)

    def _stateless(self, k):
        """(group index, position) of a parameter torch keeps no state for, or None."""
        for gi, group in enumerate(self.ref.param_groups):
            for j, p in enumerate(group["params"]):
                if (gi + j + k) % 3 == 0 and not self.ref.state.get(p):
                    return gi, j
        return None

    def replace_param(self, k):
        """Put a new tensor in a group in place of one that has no state yet."""
        slot = self._stateless(k)
        if slot is None:
            return
        gi, j = slot
        old = self.ref.param_groups[gi]["params"][j]
        at = next(i for i, p in enumerate(self.theirs) if p is old)
        a, b = self.new_pair((2, 1 + k % 4), k)
        self.theirs[at], self.ours[at] = self.theirs.pop(), self.ours.pop()
        self.ref.param_groups[gi]["params"][j] = a
        self.opt.param_groups[gi]["params"][j] = b

    def remove_param(self, k):
        """Take a parameter out of its group's list, and its state out of `opt.state` (torch's
        `state_dict` raises KeyError on state of a parameter in no group)."""
        gi = k % len(self.ref.param_groups)
        if len(self.ref.param_groups[gi]["params"]) < 2:
            return
        j = k % len(self.ref.param_groups[gi]["params"])
        for opt in (self.ref, self.opt):
            p = opt.param_groups[gi]["params"].pop(j)
            opt.state.pop(p, None)

    def reorder_params(self, k):
        """Reverse, or rotate, a group's list of parameters."""
        gi = k % len(self.ref.param_groups)
        for opt in (self.ref, self.opt):
            params = opt.param_groups[gi]["params"]
            opt.param_groups[gi]["params"] = params[::-1] if k % 2 else params[1:] + params[:1]

    def move_param(self, k):
        """Move a parameter, with its state, to the end of another group's list."""
        groups = self.ref.param_groups
        if len(groups) < 2:
            return
        gi = k % len(groups)
        if len(groups[gi]["params"]) < 2:
            return
        j = k % len(groups[gi]["params"])
        for opt in (self.ref, self.opt):
            opt.param_groups[(gi + 1) % len(groups)]["params"].append(opt.param_groups[gi]["params"].pop(j))

    def delete_group(self, k):
        """Delete a group, and its parameters' state."""
        groups = self.ref.param_groups
        if len(groups) < 2:
            return
        gi = k % len(groups)
        for opt in (self.ref, self.opt):
            for p in opt.param_groups.pop(gi)["params"]:
                opt.state.pop(p, None)

    def tensor_lr(self, k):
        """A 0-dim tensor lr (torch's LR schedulers update one in place with fill_)."""
        gi = k % len(self.ref.param_groups)
        key = self.info.lr_key
        for opt in (self.ref, self.opt):
            lr = opt.param_groups[gi][key]
            if isinstance(lr, torch.Tensor):
                lr.fill_(lr.item() * 0.5)
            else:
                opt.param_groups[gi][key] = torch.tensor(lr)

    def reorder_groups(self, k):
        for opt in (self.ref, self.opt):
            opt.param_groups.reverse()

    def write_data(self, k):
        i = k % len(self.theirs)
        value = torch.randn(self.theirs[i].shape, generator=torch.Generator().manual_seed(k),
                            dtype=self.theirs[i].dtype).to(self.device)
        for p in (self.theirs[i], self.ours[i]):
            p.data.mul_(0.5) if k % 2 else p.data.copy_(value)

    def replace_data(self, k):
        """New storage of the same shape and dtype (another dtype, with state, is where
        torch raises and fusedopt converts: README, "Where fusedopt does better")."""
        i = k % len(self.theirs)
        value = torch.randn(self.theirs[i].shape, generator=torch.Generator().manual_seed(k),
                            dtype=self.theirs[i].dtype).to(self.device)
        self.theirs[i].data, self.ours[i].data = value.clone(), value.clone()

    def reshape_stateless(self, k):
        """New storage of another shape for a parameter without state (torch steps it as it
        now is; fusedopt must rebuild its bucket)."""
        slot = self._stateless(k)
        if slot is None:
            return
        old = self.ref.param_groups[slot[0]]["params"][slot[1]]
        i = next(i for i, p in enumerate(self.theirs) if p is old)
        value = torch.randn(3, 1 + k % 3, generator=torch.Generator().manual_seed(k)).to(self.device)
        for p in (self.theirs[i], self.ours[i]):
            p.data = value.clone()
            p.grad = None

    def reshape_stateful(self, k):
        """New storage with more elements for a parameter with state, which is frozen (a
        frozen layer swapped for a larger one): torch keeps its state as it was and skips
        it while it has no gradient; a gradient for it (`toggle_frozen`) makes both raise.
        (More elements: torch's in-place update of the old state then always fails. Not
        under fused=True: torch's fused CPU kernels do not compare sizes, and read and write
        past the old state's memory, a crash at worst; fusedopt raises there too.)"""
        with_state = [i for i, p in enumerate(self.theirs) if self.ref.state.get(p)]
        if not with_state or self.config.get("fused"):
            return
        i = with_state[k % len(with_state)]
        shape = (self.theirs[i].numel() + 1 + k % 3,)
        value = torch.randn(shape, generator=torch.Generator().manual_seed(k)).to(self.device)
        for p in (self.theirs[i], self.ours[i]):
            p.data = value.clone()
            p.grad = None
            p.requires_grad_(False)

    def retype_stateless(self, k):
        """fp32 storage to fp64 or back for a parameter without state: it moves to another
        bucket. (Of a zero-size one too, whose address is 0 in every dtype.) Not for NAdam
        and ASGD, whose scalar state in fp64 takes its dtype from its history in torch (see
        the module's docstring)."""
        slot = self._stateless(k)
        if slot is None or self.info.name in ("NAdam", "ASGD"):
            return
        old = self.ref.param_groups[slot[0]]["params"][slot[1]]
        i = next(i for i, p in enumerate(self.theirs) if p is old)
        dtype = torch.float32 if old.dtype == torch.float64 else torch.float64
        # Both get torch's values: steps before may have left them an ulp of fp32 apart,
        # which fp64's tolerance would not take.
        value = old.detach().to(dtype)
        for p in (self.theirs[i], self.ours[i]):
            p.data = value.clone()
            p.grad = None

    def toggle_frozen(self, k):
        i = k % len(self.theirs)
        frozen = self.theirs[i].requires_grad
        for p in (self.theirs[i], self.ours[i]):
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    def drop_state(self, k):
        i = k % len(self.theirs)
        if self.theirs[i] in self.ref.state:
            del self.ref.state[self.theirs[i]]
            del self.opt.state[self.ours[i]]

    def edit_state(self, k):
        i = k % len(self.theirs)
        entry = self.ref.state.get(self.theirs[i], {})
        key = next((key for key, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if key is not None:
            self.ref.state[self.theirs[i]][key].mul_(0.5)
            self.opt.state[self.ours[i]][key].mul_(0.5)

    def swap_state(self, k):
        """Swap two parameters' entries in opt.state (torch rebinds them)."""
        i, j = k % len(self.theirs), (k // len(self.theirs)) % len(self.theirs)
        a, b = self.theirs[i], self.theirs[j]
        if i == j or a.shape != b.shape or a.dtype != b.dtype or a not in self.ref.state or b not in self.ref.state:
            return None
        for opt, ps in ((self.ref, self.theirs), (self.opt, self.ours)):
            opt.state[ps[i]], opt.state[ps[j]] = opt.state[ps[j]], opt.state[ps[i]]

    def hold_state(self, k):
        """Keep a parameter's state tensor, as a callback would (`edit_held` edits it later):
        whatever torch's tensor is by then, the state or a leftover, so must fusedopt's be."""
        i = k % len(self.theirs)
        entry = self.ref.state.get(self.theirs[i], {})
        key = next((key for key, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if key is not None:
            self.held = (self.ref.state[self.theirs[i]][key], self.opt.state[self.ours[i]][key])

    def edit_held(self, k):
        for t in getattr(self, "held", ()):
            t.mul_(0.5)

    def pre_hook(self, k):
        def halve_gradients(opt, args, kwargs):
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(0.5)

        for opt in (self.ref, self.opt):
            opt.register_step_pre_hook(halve_gradients)

    def closure(self, k):
        gen = torch.Generator().manual_seed(k)
        grads = [torch.randn(a.shape, generator=gen, dtype=a.dtype).to(self.device) if a.requires_grad else None
                 for a in self.theirs]

        def step(opt, params):
            def closure():
                for p, g in zip(params, grads):
                    p.grad = None if g is None else g.clone()
                return torch.tensor(1.0, device=self.device)

            self._clipped(opt, opt.step, closure=closure)

        return self.both(step)


class SparseTwins(Twins):
    """SparseAdam's life. Every gradient is sparse COO, of some of a parameter's rows, now
    and then uncoalesced (an index twice); only parameters of two or more dimensions get
    one (see `sparse_step`: a checkpoint of fusedopt's, loaded into torch's SparseAdam, holds
    views at a storage offset). GradScaler steps are left out (an inf cannot be put in a
    gradient as the other programs put it); clipping is not SparseAdam's."""

    def set_gradients(self, k):
        super().set_gradients(k)
        gen = torch.Generator().manual_seed(k + 1)
        for a, b in self.pairs():
            if a.grad is None:
                continue
            if a.dim() < 2:
                a.grad = b.grad = None
                continue
            rows = (torch.rand(a.shape[0], generator=gen) < 0.6).to(self.device)
            g = (a.grad * rows.view(-1, *[1] * (a.dim() - 1))).to_sparse(1)
            if k % 3 == 0 and g._nnz():
                g = torch.sparse_coo_tensor(torch.cat([g._indices(), g._indices()[:, :1]], 1),
                                            torch.cat([g._values(), g._values()[:1]]), g.shape, check_invariants=True)
            a.grad, b.grad = g.clone(), g.clone()

    def sparse_step(self, k):
        return self.step(k)

    def amp_step(self, k):
        return None

    def closure(self, k):
        # The gradients are drawn once, before either step: drawing them in each closure
        # would append a duplicate index to a kept uncoalesced gradient once more on the
        # second side, which then steps on a different gradient.
        self.set_gradients(k)
        grads = [None if a.grad is None else a.grad.clone() for a in self.theirs]

        def step(opt, params):
            def closure():
                for p, g in zip(params, grads):
                    p.grad = None if g is None else g.clone()
                return torch.tensor(1.0, device=self.device)

            opt.step(closure)

        return self.both(step)


def run_ops(twins, ops, check) -> None:
    """Run the program's operations on `twins`, `check()` after each; a failure names the
    operations run."""
    for done, (op, k) in enumerate(ops):
        try:
            if getattr(twins, op)(k) is False:
                break
            check()
        except AssertionError as e:
            raise AssertionError(f"after {[o for o, _ in ops[:done + 1]]}: {e}") from None


def lifecycles(examples: int = EXAMPLES):
    """Hypothesis settings for a lifecycle test drawing `examples` programs."""
    return settings(max_examples=max(examples, 1), deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=DERANDOMIZE)


def run_program(program, device):
    info, config, shapes, split, backend, ops = program
    twins = (SparseTwins if info is SPARSE_ADAM else Twins)(info, config, shapes, split, backend, device)
    run_ops(twins, ops, lambda: assert_same_run(twins.theirs, twins.ref, twins.ours, twins.opt,
                                                rtol=info.rtol32, atol=ATOL))


@lifecycles()
@given(programs())
def test_random_lifecycles_match_torch(program):
    run_program(program, "cpu")


@lifecycles(EXAMPLES // 4)
@given(sparse_programs())
def test_random_sparse_adam_lifecycles_match_torch(program):
    run_program(program, "cpu")


# On a GPU (tests/conftest.py): the compiled kernels, and torch.optim's default there.
@pytest.mark.gpu
@lifecycles()
@given(programs())
def test_random_lifecycles_match_torch_on_the_gpu(program):
    run_program(program, "cuda")
