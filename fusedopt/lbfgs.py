"""L-BFGS: torch.optim.LBFGS's options, state and iterates, on flat vectors."""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy

from .optimizer import Optimizer


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class _FlatLayout:
    """The parameters as one flat vector: torch's order and dtype, and views into it.

    Segments follow one another with no padding, in the order of the parameter list, each
    in the parameter's logical (row-major) element order: exactly the vector torch's LBFGS
    concatenates, so dot products and norms reduce the same numbers in the same order. The
    dtype is what concatenating the parameters' (real) dtypes gives; the flat gradient's is
    what concatenating the gradients' gives (`gather_grad`), as in torch.
    """

    def __init__(self, params: list[Tensor]):
        self.key = self.key_of(params)
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise RuntimeError(
                f"LBFGS needs all parameters on one device; got {sorted(map(str, devices))}. "
                "help: move the model to one device, or optimize each device's parameters separately")
        self.reals = [_real(p) for p in params]
        self.dtype = functools.reduce(torch.promote_types, (r.dtype for r in self.reals))
        self.device = params[0].device
        self.bounds = []
        start = 0
        for r in self.reals:
            self.bounds.append((start, start + r.numel()))
            start += r.numel()
        self.numel = start
        # flat gradient buffers and their views, by dtype (see gather_grad)
        self._grads: dict[torch.dtype, tuple[Tensor, list[Tensor]]] = {}
        self._snapshot: Tensor | None = None
        self._snapshot_views: list[Tensor] = []
        self._direction: tuple[Tensor, list[Tensor]] | None = None

    @staticmethod
    def key_of(params: list[Tensor]):
        return tuple((id(p), p.shape, p.dtype, p.device, p.data_ptr()) for p in params)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat vector, shaped like the parameters' real views."""
        return [flat[a:b].view(r.shape) for (a, b), r in zip(self.bounds, self.reals)]

    def gather_grad(self, params: list[Tensor]) -> Tensor:
        """The flat gradient (zeros where a parameter has none), written into one buffer.

        Its dtype is the one torch's ``cat`` of the gradients takes: the parameters' unless
        a gradient is of a wider dtype than its parameter (``param.grad_dtype``), and every
        vector derived from it (``d``, the history) follows, as in torch.
        The buffer is reused: every caller that keeps a gradient across evaluations copies
        it (as torch's algorithm already does for the vectors it keeps).
        """
        grads = [p.grad for p in params]
        dtype = self.dtype
        for g, p in zip(grads, params):
            if g is not None and g.dtype != p.dtype:
                dtype = functools.reduce(torch.promote_types, (
                    r.dtype if g is None else _real(g).dtype for g, r in zip(grads, self.reals)))
                break
        buffers = self._grads.get(dtype)
        if buffers is None:
            flat = torch.empty(self.numel, dtype=dtype, device=self.device)
            buffers = self._grads[dtype] = (flat, self.views(flat))
        flat, views = buffers
        dst, src, missing = [], [], []
        for g, view in zip(grads, views):
            if g is None:
                missing.append(view)
                continue
            if g.is_sparse:
                g = g.to_dense()
            dst.append(view)
            src.append(_real(g))
        if dst:
            torch._foreach_copy_(dst, src)
        if missing:
            torch._foreach_zero_(missing)
        return flat

    def add(self, step, direction: Tensor) -> None:
        """params += step * direction, one multi-tensor op (torch: one add_ per parameter)."""
        cached = self._direction
        if cached is None or cached[0] is not direction:
            cached = self._direction = (direction, self.views(direction))
        torch._foreach_add_(self.reals, cached[1], alpha=step)

    def snapshot(self) -> Tensor:
        """Copy the parameters into the flat snapshot buffer (the line search's origin)."""
        if self._snapshot is None:
            self._snapshot = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            self._snapshot_views = self.views(self._snapshot)
        torch._foreach_copy_(self._snapshot_views, self.reals)
        return self._snapshot

    def restore(self) -> None:
        torch._foreach_copy_(self.reals, self._snapshot_views)


def _cubic_minimum(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimizer of the cubic through (x1, f1, g1) and (x2, f2, g2), clamped to bounds
    (default: the interval between the points); the midpoint when the cubic has none.

    The arithmetic follows minFunc's polyinterp term by term, as torch's port does: the
    line search branches on these values, so they must round the same way.
    """
    if bounds is None:
        low, high = (x1, x2) if x1 <= x2 else (x2, x1)
    else:
        low, high = bounds
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if not d2_square >= 0:
        return (low + high) / 2.0
    d2 = d2_square.sqrt() if isinstance(d2_square, Tensor) else math.sqrt(d2_square)
    if x1 <= x2:
        min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(min_pos, low), high)


class _Bracket:
    """The line search's trial points: step, loss, flat gradient, directional derivative."""

    def __init__(self, *points):
        self.t = [pt[0] for pt in points]
        self.f = [pt[1] for pt in points]
        self.g = [pt[2] for pt in points]
        self.gtd = [pt[3] for pt in points]

    def set(self, i, t, f, g, gtd):
        self.t[i], self.f[i], self.g[i], self.gtd[i] = t, f, g, gtd

    def copy(self, dst, src):
        self.set(dst, self.t[src], self.f[src], self.g[src], self.gtd[src])

    def order(self):
        """(low, high): positions of the lower and the higher loss."""
        return (0, 1) if self.f[0] <= self.f[-1] else (1, 0)


def _strong_wolfe(evaluate, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """A step length satisfying the strong Wolfe conditions (minFunc's lswolfe).

    `evaluate(t)` returns the loss and the flat gradient at x + t d; the gradient may live
    in a reused buffer, so every one kept while evaluating further is cloned. Returns
    (loss, gradient, t, evaluations).
    """
    d_norm = d.abs().max()
    g = g.clone(memory_format=torch.contiguous_format)
    f_new, g_new = evaluate(t)
    evals = 1
    gtd_new = g_new.dot(d)

    # Phase 1: grow the step until an interval is known to contain an acceptable point.
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    tries = 0
    bracket = None
    while tries < max_ls:
        too_far = f_new > (f + c1 * t * gtd) or (tries > 1 and f_new >= f_prev)
        if too_far:
            bracket = _Bracket((t_prev, f_prev, g_prev, gtd_prev), (t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new))
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket = _Bracket((t, f_new, g_new, None))
            done = True
            break
        if gtd_new >= 0:
            bracket = _Bracket((t_prev, f_prev, g_prev, gtd_prev), (t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new))
            break
        # Extrapolate: the cubic's minimum, between 1.01 t - 0.01 t_prev and 10 t.
        t_next = _cubic_minimum(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new
        t = t_next
        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = g_new.dot(d)
        tries += 1
    if tries == max_ls:
        bracket = _Bracket((0, f, g, None), (t, f_new, g_new, None))

    # Phase 2: shrink the interval around a point that satisfies both conditions.
    stalled = False
    low, high = bracket.order()
    while not done and tries < max_ls:
        if abs(bracket.t[1] - bracket.t[0]) * d_norm < tolerance_change:
            break
        t = _cubic_minimum(bracket.t[0], bracket.f[0], bracket.gtd[0], bracket.t[1], bracket.f[1], bracket.gtd[1])
        # A trial too close to an end of the interval makes little progress: after a
        # second such trial, or one outside the interval, move it to 10% inside.
        t_max, t_min = max(bracket.t), min(bracket.t)
        margin = 0.1 * (t_max - t_min)
        if min(t_max - t, t - t_min) < margin:
            if stalled or t >= t_max or t <= t_min:
                t = t_max - margin if abs(t - t_max) < abs(t - t_min) else t_min + margin
                stalled = False
            else:
                stalled = True
        else:
            stalled = False

        f_new, g_new = evaluate(t)
        evals += 1
        gtd_new = g_new.dot(d)
        tries += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket.f[low]:
            # Not a sufficient decrease, or no better than the low end: it becomes the high end.
            bracket.set(high, t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new)
            low, high = (0, 1) if bracket.f[0] <= bracket.f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket.t[high] - bracket.t[low]) >= 0:
                # The minimum lies on the other side of the new point: the old low end
                # becomes the high end.
                bracket.copy(high, low)
            bracket.set(low, t, f_new, g_new.clone(memory_format=torch.contiguous_format), gtd_new)

    return bracket.f[low], bracket.g[low], bracket.t[low], evals


def _not_a_number(value) -> bool:
    return value is None or isinstance(value, (str, bytes))


def _check_options(group: dict, state: dict) -> None:
    """Raise what torch's step raises for a malformed option, before anything changes.

    torch's step raises only where it first uses an option: after evaluating the closure
    and counting the evaluation, and for most options after moving the parameters,
    appending to the history and overwriting ``prev_flat_grad``, so that a step retried
    once the option is fixed continues from a corrupted history. Here the same exception
    types are raised first, for the options this step's first iteration uses (and max_eval,
    which torch reads after it, unless that iteration is the last or finds no descent
    direction: a step that returns there is refused too).
    """
    line_search_fn, tolerance_grad = group["line_search_fn"], group["tolerance_grad"]
    if line_search_fn not in (None, "strong_wolfe"):
        raise RuntimeError(f"only 'strong_wolfe' is supported (line_search_fn={line_search_fn!r})")
    if _not_a_number(tolerance_grad):
        raise TypeError(f"tolerance_grad is {tolerance_grad!r}; expected a number")
    max_iter = group["max_iter"]
    if _not_a_number(max_iter):
        raise TypeError(f"max_iter is {max_iter!r}; expected a number")
    if not 0 < max_iter:
        return   # no iteration uses the others
    lr, tolerance_change = group["lr"], group["tolerance_change"]
    if _not_a_number(tolerance_change):
        raise TypeError(f"tolerance_change is {tolerance_change!r}; expected a number")
    if _not_a_number(lr) or (isinstance(lr, Tensor) and lr.numel() != 1):
        # (torch's add_ takes the step size as alpha, which must be a number)
        raise TypeError(f"lr is {lr!r}; expected a number or a 1-element tensor")
    max_eval = group["max_eval"]
    # Without a line search torch compares the evaluations with max_eval only after an
    # iteration that is not the last.
    if (line_search_fn is not None or max_iter != 1) and _not_a_number(max_eval):
        raise TypeError(f"max_eval is {max_eval!r}; expected a number")
    if line_search_fn is not None and max_eval < 1:
        # the line search gets max_eval - 1 evaluations (the step made one): fewer than
        # none leaves torch's without a bracket, and it fails reading it
        raise UnboundLocalError(
            f"max_eval={max_eval!r} leaves the strong Wolfe line search a negative number of evaluations; "
            "torch.optim.LBFGS fails there with UnboundLocalError. help: max_eval >= 1")
    history_size = group["history_size"]
    if "al" not in state and state.get("n_iter", 0) >= 1:
        # this step's first iteration creates torch's `al` as [None] * history_size (a
        # first step's second one would, if it comes: torch raises there, and so does this)
        try:
            [None] * history_size
        except TypeError:
            raise TypeError(f"history_size is {history_size!r}; expected an int") from None


def _flat_numel(params: list[Tensor]) -> int:
    """The length of torch's flat vector: every element, a complex one counted twice."""
    return sum(2 * p.numel() if p.is_complex() else p.numel() for p in params)


def _misfit(entry: dict, numel: int) -> tuple[str, tuple[int, ...]] | None:
    """(name, shape) of the first flat vector kept in a state entry (``d``,
    ``prev_flat_grad``, the history's ``old_dirs``/``old_stps``) that is not of length
    `numel`, the parameters' flat vector; None when all are."""
    vectors = [(key, entry.get(key)) for key in ("d", "prev_flat_grad")]
    for key in ("old_dirs", "old_stps"):
        history = entry.get(key)
        if isinstance(history, (list, tuple)):
            vectors += [(f"{key}[{i}]", v) for i, v in enumerate(history)]
    for name, v in vectors:
        if isinstance(v, Tensor) and v.shape != (numel,):
            return name, tuple(v.shape)
    return None


class LBFGS(Optimizer):
    """L-BFGS, as torch.optim.LBFGS: same options, state, iterates and losses.

    ``step(closure)`` runs up to ``max_iter`` iterations; the closure must clear the
    gradients, compute the loss, call ``backward()`` and return the loss. As in torch,
    there is one parameter group, all parameters are on one device, and the state is
    global, kept in ``opt.state`` of the first parameter (``func_evals``, ``n_iter``,
    ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``,
    ``prev_loss`` and ``al``), so a state dict moves between this class and torch's.

    Flat vectors: the algorithm works on the concatenated parameter vector. torch rebuilds
    it at every evaluation (a ``view(-1)`` and a ``cat`` of all gradients, one ``add_``,
    ``clone`` or ``copy_`` per parameter to move and restore the parameters). Here the
    layout is built once and reused: the gradient is written into a persistent flat
    buffer through per-parameter views, and moving, snapshotting and restoring the
    parameters are each one multi-tensor (``_foreach_*``) op between the parameters and
    views of a flat vector: on CUDA a handful of multi-tensor launches rather than one per
    parameter, and on any device a few Python calls rather than a loop over parameters.

    The parameters keep their own storage rather than becoming views into one flat buffer
    (which would make the move a single ``add_``): rebinding ``p.data`` would break
    whatever holds the old storage (weights tied through views, other optimizers' or
    wrappers' cached pointers, FSDP/DDP buffers, a later ``p.data = ...`` by the user),
    and the gradient would still need gathering, since autograd allocates fresh gradients
    after ``zero_grad(set_to_none=True)``.

    The flat vectors use no padding and torch's element order and dtype, so the vector
    reductions (dot products, norms) are the very ones torch computes and the iterates
    agree bit for bit. For the same reason there is no fused kernel: these are BLAS
    reductions and axpys whose rounding must be torch's, so every ``backend`` runs the same
    torch ops.

    Args:
        params: iterable of parameters (one group only; real or complex).
        lr (float or Tensor, default 1), max_iter (default 20), max_eval (default
        ``max_iter * 5 // 4``), tolerance_grad (default 1e-7), tolerance_change (default
        1e-9), history_size (default 100), line_search_fn (None or 'strong_wolfe'):
            as in torch.optim.LBFGS.
        backend: accepted for uniformity with fusedopt's optimizers; see above.
    """

    def __init__(self, params, lr: float | Tensor = 1, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None, *, backend: str = "auto"):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, history_size=history_size,
                        line_search_fn=line_search_fn)
        self._layout: _FlatLayout | None = None
        super().__init__(params, defaults, backend=backend)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        # torch's LBFGS keeps the group's list object it was built with and steps what that
        # list holds: a list edited in place is followed, one put in its place is not.
        self._params = self.param_groups[0]["params"]

    def __setstate__(self, state):
        super().__setstate__(state)
        self._layout = None
        if "_params" not in self.__dict__:
            self._params = self.param_groups[0]["params"]

    def _numel(self) -> int:
        return self._flat().numel

    def _choose_path(self, device, dtype=None):
        # No kernel: see the class docstring. Buckets exist only to hold the state.
        return "reference"

    def _flat(self) -> _FlatLayout:
        params = self._params
        layout = self._layout
        if layout is None or layout.key != _FlatLayout.key_of(params):
            layout = self._layout = _FlatLayout(params)
        return layout

    def _validate_entry(self, key, p: Tensor, entry, group: dict) -> None:
        # The base class checks state against its parameter's shape; LBFGS's is global, of
        # the flat vector's length. torch loads a checkpoint of other parameters and its
        # step fails on it, after evaluating the closure and counting the evaluation.
        super()._validate_entry(key, p, entry, group)
        if any(map(is_lazy, self._params)):
            return   # no length yet: checked at the step, once the closure gave them shapes
        numel = _flat_numel(self._params)
        misfit = _misfit(entry, numel)
        if misfit is not None:
            raise ValueError(
                f"loaded state dict has state '{misfit[0]}' of shape {misfit[1]} for parameter {key}; LBFGS's flat "
                f"vectors here have {numel} elements (its parameters' elements, complex ones counted twice)")

    @staticmethod
    def _cast(p, key, value):
        # Like torch: tensors inside the history lists are cast too, and the lists are
        # new lists, so loading never shares a list with the state dict it came from.
        if isinstance(value, Tensor):
            return Optimizer._cast(p, key, value)
        if isinstance(value, dict):
            return {k: LBFGS._cast(p, k, v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(LBFGS._cast(p, key, v) for v in value)
        return value

    def _fitting_flat(self, first: Tensor, max_iter: int) -> _FlatLayout:
        """The parameters' flat layout, checked against the history's vectors."""
        flat = self._flat()
        misfit = _misfit(self.state.get(first) or {}, flat.numel) if 0 < max_iter else None
        if misfit is not None:
            # parameters of another size than the history's (`p.data = ...` of another
            # shape): torch's step fails on the first vector op, after the closure and its count
            raise RuntimeError(
                f"LBFGS state '{misfit[0]}' has shape {misfit[1]}, but the parameters' flat vector now has "
                f"{flat.numel} elements (complex ones counted twice): the state belongs to other parameters. "
                "help: opt.state.clear() starts afresh")
        return flat

    @torch.no_grad()
    def step(self, closure):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable): A closure that reevaluates the model and returns the loss.
        """
        # An attached averaged model is updated after the iterations (no kernel to fuse into).
        averaging = self._attached.begin() if self._attached is not None else None
        loss = self._iterate(closure)
        if averaging is not None:
            averaging.finish()
        return loss

    def _iterate(self, closure):
        if len(self.param_groups) != 1:
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        self._sync_state()
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]
        first = self._params[0]   # (an empty group raises IndexError, as in torch)
        # (read without creating the entry: a refused step leaves no empty state behind)
        _check_options(group, self.state.get(first) or {})
        # A lazy module's parameters get their shapes in the closure's first forward: their
        # flat layout can only be made after it.
        flat = None if any(map(is_lazy, self._params)) else self._fitting_flat(first, max_iter)

        # Global state, registered under the first parameter as torch does (so that
        # load_state_dict casts it). Plain dict writes: these tensors are replaced, not
        # copied into, as in torch.
        state = self.state[first]

        def put(key, value):
            dict.__setitem__(state, key, value)

        put("func_evals", state.get("func_evals", 0))
        put("n_iter", state.get("n_iter", 0))

        orig_loss = closure()
        loss = float(orig_loss)
        evals = 1
        put("func_evals", state["func_evals"] + 1)
        if flat is None:
            flat = self._fitting_flat(first, max_iter)
        flat_grad = flat.gather_grad(self._params)
        if flat_grad.abs().max() <= tolerance_grad:
            return orig_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        H_diag = state.get("H_diag")
        prev_flat_grad, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            put("n_iter", state["n_iter"] + 1)
            first = state["n_iter"] == 1

            # Search direction: steepest descent at first, then the two-loop recursion
            # over the curvature pairs (s, y) kept in the history.
            if first:
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                H_diag = 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:  # keep only pairs with positive curvature
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    H_diag = ys / y.dot(y)
                if "al" not in state:
                    put("al", [None] * history_size)
                al = state["al"]
                q = flat_grad.neg()
                for i in reversed(range(len(old_dirs))):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, H_diag)
                for i in range(len(old_dirs)):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            # Step length: lr, except on the very first iteration, where the step is
            # also capped by 1 / |g|_1.
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if first else lr
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:  # not a descent direction (to tolerance)
                break

            step_evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                flat.snapshot()

                def evaluate(t_try, d=d):
                    flat.add(t_try, d)
                    f_try = float(closure())
                    g_try = flat.gather_grad(self._params)
                    flat.restore()
                    return f_try, g_try

                loss, flat_grad, t, step_evals = _strong_wolfe(
                    evaluate, t, d, loss, flat_grad, gtd, max_ls=max_eval - evals)
                flat.add(t, d)
                opt_cond = flat_grad.abs().max() <= tolerance_grad
            else:
                flat.add(t, d)
                if n_iter != max_iter:
                    # No evaluation after the last iteration: the next step starts with one.
                    loss = float(closure())
                    flat_grad = flat.gather_grad(self._params)
                    opt_cond = flat_grad.abs().max() <= tolerance_grad
                    step_evals = 1

            evals += step_evals
            put("func_evals", state["func_evals"] + step_evals)

            if n_iter == max_iter or evals >= max_eval:
                break
            if opt_cond:
                break
            if d.mul(t).abs().max() <= tolerance_change or abs(loss - prev_loss) < tolerance_change:
                break

        for key, value in (("d", d), ("t", t), ("old_dirs", old_dirs), ("old_stps", old_stps), ("ro", ro),
                           ("H_diag", H_diag), ("prev_flat_grad", prev_flat_grad), ("prev_loss", prev_loss)):
            put(key, value)
        return orig_loss
