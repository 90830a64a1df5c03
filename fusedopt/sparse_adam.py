"""SparseAdam: torch.optim.SparseAdam's signature, validation, state and numbers, fused."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _flat
from .kernels import _launch
from .kernels import sparse_adam as kernels
from ._options import as_float, check_numbers, pair
from ._state import mark_sparse
from .optimizer import Optimizer

_DENSE_ERROR = "SparseAdam does not support dense gradients, please consider Adam instead"


class SparseAdam(Optimizer):
    r"""Adam for sparse gradients (``nn.Embedding(sparse=True)``), as torch.optim.SparseAdam.

    Only the entries a gradient lists are updated: their moments and parameter values,
    by Adam's rule with bias corrections from the parameter's step count. Duplicate
    indices are summed first (``coalesce``), as in torch. Parameters must be dense and
    real; gradients must be sparse COO.

    Each step launches one kernel per (group, device, dtype) bucket, over a table of the
    rows the bucket's gradients touch (see :mod:`fusedopt.kernels.sparse_adam`). The
    moments live in the bucket's flat buffers; ``opt.state[p]`` holds views of them and
    ``step`` as a Python int, as torch keeps it.

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr (float or Tensor, default 1e-3), betas (default (0.9, 0.999)), eps (default 1e-8),
        maximize (default False): as in torch.optim.SparseAdam.
        backend: the path, as for every optimizer here; see :class:`fusedopt.Optimizer`.

    Note:
        torch checks gradients and options group by group and raises on a dense gradient
        or a bad option (a string, None) after it has stepped what came before; here every
        group is checked first, and a step that raises changes nothing.
    """

    _flat_state = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 maximize: bool = False, *, backend: str = "auto"):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults, backend=backend)

        sparse_params, complex_params = [], []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.is_sparse:
                    sparse_params.append([gi, pi])
                if p.is_complex():
                    complex_params.append([gi, pi])
        if sparse_params:
            raise ValueError(f"Sparse params at indices {sparse_params}: SparseAdam requires dense parameter tensors")
        if complex_params:
            raise ValueError(
                f"Complex params at indices {complex_params}: SparseAdam does not support complex parameters")

    def _state_keys(self, group):
        return ["step", "exp_avg", "exp_avg_sq"]

    def _init_state(self, group, bucket: _flat.Bucket, fresh: list[int]) -> None:
        # torch keeps `step` a Python int here, not a tensor: it is plain per-parameter
        # state, not one of the bucket's scalar vectors.
        bucket.views_made = True
        for i in fresh:
            state = self.state[bucket.params[i]]
            dict.__setitem__(state, "step", 0)
            for key in self._flat_state:
                bucket.buffer(key)
                bucket.segment(key, i).zero_()
                dict.__setitem__(state, key, bucket.view(key, i))
            bucket.initialized[i] = True

    def _options(self, group) -> kernels.SparseAdamOptions:
        beta1, beta2 = pair(group, "betas")
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        return kernels.SparseAdamOptions(lr=lr, beta1=as_float(beta1, "betas[0]"),
                                         beta2=as_float(beta2, "betas[1]"),
                                         eps=group["eps"], maximize=group.get("maximize", False))

    # Not traced through the fusedopt::step op as Optimizer.step is: dynamo cannot take a
    # sparse tensor into a graph ("torch.compile does not support sparse Tensors"), so a
    # compiled function runs this step eagerly, between graphs.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = self._evaluate(closure)
        self._sync_state()
        checked = []
        for gi, group in enumerate(self.param_groups):
            if any(p.grad is not None and not p.grad.is_sparse for p in group["params"]):
                raise RuntimeError(_DENSE_ERROR)
            # A gradient left from before its parameter changed shape (`p.data = t`): torch's
            # sparse_mask refuses it; the kernel would write its rows past the parameter's end.
            for p in group["params"]:
                if p.grad is not None and p.grad.shape != p.shape:
                    raise RuntimeError(
                        f"SparseAdam: a parameter of shape {tuple(p.shape)} has a gradient of shape "
                        f"{tuple(p.grad.shape)}, left from before the parameter changed shape (torch's sparse_mask "
                        "refuses it). help: set the gradient to None (opt.zero_grad()) after changing its shape")
            o = self._options(group)
            check_numbers(o, gi)
            # Parameters sharing memory: the kernel updates a bucket's rows at once, where
            # torch.optim updates one parameter after the other (refused as every optimizer's
            # step refuses them, before anything changes).
            for bucket in self._group_buckets(gi):
                self._reattach_state(bucket)
                for p in bucket.params:   # state that no longer fits p's shape (`Optimizer._keep_unfit`)
                    entry = dict.get(self.state, p)
                    if p.grad is not None and getattr(entry, "unfit", False):
                        raise self._unfit_error(p, entry)
                if bucket.shared:
                    self._refuse_shared_memory(bucket, None, [(i, p.grad) for i, p in enumerate(bucket.params)
                                                              if p.grad is not None])
                if bucket.path == "triton":
                    # The kernel addresses rows in elements from the anchor (as the dense
                    # kernels do: `_launch.pointer_table`), so a tensor a fraction of an
                    # element off would be written outside itself.
                    size = bucket.real_dtype.itemsize
                    for p in bucket.params:
                        if p.grad is not None:
                            _launch.refuse_misaligned("parameter", p, p.data_ptr(), size)
                            _launch.refuse_misaligned("gradient", p.grad, p.grad._values().data_ptr(), size)
            checked.append((gi, group, o))
        # torch creates a parameter's state in its group's order, the buckets below go by
        # dtype and device: the entries are made first, in that order
        state = self.state
        for gi, group, o in checked:
            for p in group["params"]:
                if p.grad is not None and p not in state:
                    state[p]
        # An attached averaged model is updated after the sparse update (which it cannot share).
        averaging = self._attached.begin() if self._attached is not None else None
        for gi, group, o in checked:
            for bucket in self._group_buckets(gi):
                stepped = [(i, p) for i, p in enumerate(bucket.params) if p.grad is not None]
                if not stepped:
                    continue
                fresh = [i for i, _ in stepped if not bucket.initialized[i]]
                if fresh:
                    self._init_state(group, bucket, fresh)
                steps = {}
                for i, p in stepped:
                    state = self.state[p]
                    state["step"] += 1
                    mark_sparse(state, p.grad)   # (for `state_dict`: Optimizer._exported)
                    steps[i] = state["step"]
                grads = [kernels.SparseGrad.of(i, p, p.grad) for i, p in stepped]
                if all(sg.empty for sg in grads):  # torch skips empty gradients after counting the step
                    continue
                buffers = {k: bucket.buffer(k) for k in self._flat_state}
                table = _launch.scalar_table(kernels.scalars(len(bucket), steps, o), len(bucket),
                                             _launch.compute_dtype(bucket.real_dtype), bucket.device)
                run = kernels.sparse_adam_triton if bucket.path == "triton" else kernels.sparse_adam_reference
                run(bucket, grads, buffers, table, o)
                # The kernel writes through pointers: bump autograd's version counters as
                # torch's in-place update does (see `Optimizer._step_body`).
                torch._C._increment_version([p for _, p in stepped])
                if bucket.views_made:
                    bucket.views_made = False
                    bucket.state_uses = bucket.storage_uses()
        if averaging is not None:
            averaging.finish()
        return loss
