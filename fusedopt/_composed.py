"""The 'native' CPU path for what torch's CPU implementation does not know: fusedopt's
precision options (master weights, low-precision state, stochastic rounding) and its
clipping inside the step. Each is composed of torch's own CPU ops around its fused kernel
(Adam, AdamW, Adagrad, SGD), which runs in the bucket's compute dtype (fp32; fp64 for
fp64 buckets) on scratch copies of whatever is not in it:

* a gradient, parameter or moment of another dtype (bf16/fp16, or bf16 moments beside
  fp32 parameters) is copied into fp32 scratch, which is exact; moments are copied back
  after the kernel, rounded to nearest even by `copy_` as the kernel and the reference
  store them, and the update has used the unrounded values, as theirs do;
* master weights: the kernel updates the fp32 master copy itself, and the parameter is
  written as the copy rounded to nearest even; first the copy takes the value of any
  parameter element that is no longer its rounding (written since the last step), as the
  Triton kernel does (`_sync_master`);
* stochastic rounding: the kernel updates an fp32 copy of the parameter, which is then
  rounded with the kernel's counter-based bits, its seeds and its element positions
  (`_launch.round_sr_int32`); the bits are the reference's, so the two paths differ only
  where torch's kernel rounds the fp32 value differently (its `v * beta2 + ...` is
  contracted to an fma: one ulp of fp32, which changes the bf16 result with probability
  2**-16);
* clipping and GradScaler's unscaling: the gradient is copied into scratch and divided by
  the scale and multiplied by the clip coefficient there, in the reference's order and
  dtype. torch's own `grad_scale` argument would write the user's gradients; this never
  does. A step GradScaler skips changes nothing. A bucket that is only clipped and whose
  dtype torch's kernel already handles (bf16 Adam, AdamW, Adagrad) keeps that kernel, fed
  a bf16 copy of the gradient scaled in fp32 and rounded once.

The numbers are therefore the reference's math in torch's fused kernel: equal to it
within the rounding in which torch's fused kernel and plain torch ops differ (and, for
that bf16 case, torch's bf16 kernel's, as without clipping).

The scratch is a chunk of elements per stream, reused: a step runs group by group, a
group being up to a chunk of consecutive entries of the native plan (`_native._Plan`:
tensors of their own and gathered runs of small ones; a large tensor is cut into
chunk-sized pieces), the chunk as large as keeps the scratch within 2 MB (`_chunk`). The
copies then meet the kernel in the core's L2 cache, and the memory stays small whatever
the model: full-size fp32 copies of bf16 moments would undo what `state_dtype` saves.
Per group: one `_foreach_copy_` in, the gradient's scaling, one fused call, the
rounding, one `_foreach_copy_` out.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _flat, _native
from .kernels import _launch

# Elements per group: as many as keep the group's scratch within SCRATCH_BYTES (this
# CPU's L2 a core: the scratch is reused between the copies and the kernel), a power of
# two, at most CHUNK. Fewer groups cost fewer calls (a fused call is 2.5 us before any
# element, a group's Python ~15 us): a clipped step needs 2-4 bytes of scratch an element
# (256K-element groups), stochastic rounding 26 (64K; 32K measured 5% slower).
CHUNK = 1 << 18
SCRATCH_BYTES = 2 << 20


def _chunk(scratch_bytes_per_element: int) -> int:
    fit = SCRATCH_BYTES // max(scratch_bytes_per_element, 1)
    return min(CHUNK, max(1 << 10, 1 << (fit.bit_length() - 1)))


def has_option(opt, bucket: _flat.Bucket) -> bool:
    """Whether a precision option is in force on the bucket, so that torch's kernel alone
    cannot step it (clipping is decided per step, by the optimizer)."""
    return _master(opt, bucket) or _stochastic(opt, bucket) or any(
        opt._buffer_dtype(bucket, key) not in (None, bucket.real_dtype)
        for key in opt._flat_state if key != "master_param")


def _master(opt, bucket) -> bool:
    has = getattr(opt, "_has_master", None)
    return bool(has and has(bucket))


def _stochastic(opt, bucket) -> bool:
    rounds = getattr(opt, "_rounds_stochastically", None)
    return bool(rounds and rounds(bucket))


def step(opt, group: dict, bucket: _flat.Bucket, batch: _flat.Batch, fresh: list[int], setup) -> bool:
    """Step one bucket with torch's fused kernel and the conversions around it."""
    impl = setup.impl
    o, all_keys, keys, _ = setup.config(opt, group)   # (torch's fused kernel reads tensor options as floats)
    if keys and all_keys != getattr(bucket, "state_keys", None):
        opt._buffers(group, bucket, batch)  # checks that every stepped tensor has them
    master, stochastic = _master(opt, bucket), _stochastic(opt, bucket)
    cdt = _launch.compute_dtype(bucket.real_dtype)
    # The kernel's dtype: the bucket's own where torch's kernel is right for it and only
    # the gradient needs preparing (clipping), the compute dtype otherwise.
    kdt = bucket.real_dtype if setup.fused and not setup.composed else cdt
    if "step" in impl.scalars:
        opt._advance_steps(bucket, batch)
    scale = mult = None
    # Reading them on the CPU costs no sync; their values are the compute dtype's.
    ops = batch.host_ops if batch.grad_ops is None else batch.grad_ops.tolist()
    if ops is not None:
        scale, mult, found_inf = ops
        if found_inf:
            return True  # GradScaler found inf/NaN: nothing changes; the caller takes the steps back
        if kdt == cdt:
            # The reference's order and dtype: g / scale * coefficient in the compute
            # dtype (a Python float operand is the compute dtype's value, as a 0-dim tensor
            # of it would be), on a copy; a factor of 1 is left out (exact).
            scale = scale if scale != 1 else None
            mult = mult if mult != 1 else None
        else:
            # A bf16 copy for torch's bf16 kernel: the gradient times coefficient / scale,
            # a Python float, which torch multiplies in fp32 and rounds once, to bf16 (2**-9
            # relative; torch's clip_grad_norm_ rounds a bf16 gradient so too). torch's
            # kernel could divide by grad_scale = scale / coefficient itself, in fp32, but
            # it then writes the quotient back, rounding to bf16 again: 25% slower.
            scale, mult = None, (mult / scale if mult != scale else None)
    fresh_set = frozenset(fresh)
    plan = _native._plan(bucket, batch, impl.scalars, fresh_set if setup.split_fresh else frozenset(),
                         setup.composed_run_below)
    params, grads = plan.gather(batch)
    if batch.mixed_dtypes:
        grads = _flat.in_dtype(grads, bucket.real_dtype)   # (see `_native.step`)
    # A coefficient of 1 (the norm under max_grad_norm) and no GradScaler scale: the kernel
    # reads the user's gradient itself, where its dtype is the kernel's.
    streams = _streams(bucket, kdt, keys, master, stochastic, scale is not None or mult is not None)
    cached = plan.__dict__.setdefault("_composed", {})
    layout = cached.get(streams)
    if layout is None or not layout.valid(bucket):
        layout = cached[streams] = _Layout(plan, bucket, kdt, streams)
    scalars = {k: plan.scalar_views(bucket, k) for k in impl.scalars}
    mix = None
    if stochastic:
        # the seeds of the reference (`AdamFamily._update`), from the advanced step counts;
        # their step-independent half is kept while the seed and the bucket's place hold
        gi, bi, _ = opt._slots[id(bucket.params[0])]
        where = (opt.sr_seed, gi << 16 | bi, len(bucket))
        if bucket.__dict__.get("_sr_key", (None,))[0] != where:
            bucket._sr_key = where, _launch.seed_key(*where)
        mix = _launch.step_seed_mix(bucket._sr_key[1], bucket.steps)
    ctx = _native._Context(fresh_set, None, True)
    layout.run(impl, params, grads, scalars, o, ctx, scale, mult, mix)
    plan.scatter(bucket, impl.scalars)
    return True


def _streams(bucket: _flat.Bucket, kdt: torch.dtype, keys: list[str], master: bool, stochastic: bool,
             prepared: bool) -> tuple:
    """What runs where, as a hashable key of the layout: the kernel's dtype, whether the
    gradient goes through scratch (another dtype, or prepared: unscaled or clipped), where
    the kernel's parameter comes from ('master', 'scratch', 'direct'), whether it is
    rounded stochastically, and the state kinds that go through scratch and those the
    kernel updates in place."""
    grad = prepared or bucket.real_dtype != kdt
    param = "master" if master else ("scratch" if bucket.real_dtype != kdt else "direct")
    converted = tuple(k for k in keys if bucket.buffers[k].dtype != kdt)
    direct = tuple(k for k in keys if bucket.buffers[k].dtype == kdt)
    return kdt, grad, param, stochastic and param == "scratch", converted, direct


class _Group:
    """Up to a chunk of elements of consecutive plan entries, and what serves every step: the
    pieces' range in the step's list of pieces, and the static halves of the lists that
    the copies in, the kernel and the copies out take (the parameters' and gradients'
    halves change every step: autograd makes new gradients)."""

    __slots__ = (
        "down_from",
        "down_into",
        "end",
        "entries",
        "first",
        "grad",
        "member",
        "mixed",
        "n",
        "region",
        "reps",
        "seen",
        "single",
        "state",
        "steps",
        "up_from",
        "up_into",
        "up_rest",
        "work",
        "written",
    )


class _Layout:
    """A plan's groups, with their views into the state buffers and the bucket's scratch."""

    def __init__(self, plan, bucket: _flat.Bucket, kdt: torch.dtype, streams: tuple):
        _, grad, param, stochastic, converted, direct = streams
        self.grad, self.param, self.stochastic, self.converted = grad, param, stochastic, converted
        # a gradient that is only scaled, not converted: one op from the user's tensor into
        # the copy where a group is one piece
        self.scaled_only = grad and bucket.real_dtype == kdt
        itemsize = torch.empty((), dtype=kdt).element_size()
        per_element = itemsize * ((1 if grad else 0) + (1 if param == "scratch" else 0) + len(converted)) + \
            (4 + 4 + 2 if stochastic else 0)
        self.chunk = _chunk(per_element)
        read = ("master_param",) if param == "master" else ()
        self.buffers = {k: bucket.buffers[k] for k in (*converted, *direct, *read)}
        self._ptrs = self._pointers(bucket)
        # Pieces: a whole entry, or a chunk of a larger one (as `Tensor.split(chunk)` cuts).
        pieces = []
        self.split = []    # per entry: whether it is cut
        chunk = self.chunk
        for e, (a, b) in enumerate(plan.spans):
            n = b - a  # a tensor's elements, or a run's span with the padding inside it
            self.split.append(n > chunk)
            pieces += [(e, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)] if n > chunk else [(e, None, n)]
        packed, first, size = [], 0, 0
        for j, (e, lo, hi) in enumerate(pieces):
            n = hi - (lo or 0)
            if j > first and size + n > chunk:
                packed.append((first, j))
                first, size = j, 0
            size += n
        if pieces:
            packed.append((first, len(pieces)))
        width = max((sum(hi - (lo or 0) for _, lo, hi in pieces[a:b]) for a, b in packed), default=0)
        # One float scratch of `width` elements per converted stream, in the kernel's dtype.
        names = (["grad"] if grad else []) + (["param"] if param == "scratch" else []) + list(converted)
        scratch = _scratch(bucket, "float", kdt, width * len(names))
        regions = {name: scratch[j * width:(j + 1) * width] for j, name in enumerate(names)}
        if stochastic:
            ints = _scratch(bucket, "int", torch.int32, 2 * width)
            self.ints = (ints[:width], ints[width:])
            rounded = _scratch(bucket, "bf16", torch.bfloat16, width)
        if param == "master":
            # The master copies rounded as the parameters were written, the parameters as
            # they are now, and their bits' difference (`_sync_master`).
            seen = _scratch(bucket, "seen", bucket.real_dtype, 2 * width)
            differs = _scratch(bucket, "differs", torch.int16, width)
        views = {k: plan.state_views(bucket, k) for k in self.buffers}
        self.groups = []
        for a, b in packed:
            part = pieces[a:b]
            g = _Group()
            g.first, g.end = a, b
            g.n = sum(hi - (lo or 0) for _, lo, hi in part)
            g.entries = [e for e, _, _ in part]
            g.reps = [plan.reps[e] for e in g.entries]
            g.single = len(part) == 1
            g.region = {name: region[:g.n] for name, region in regions.items()}
            # Per stream, a scratch view per piece, shaped as the entry the kernel sees
            # (the parameter's shape and strides for a whole tensor of its own): the
            # copies then pair elements in memory order, as the kernel does.
            cut = {name: self._cut(region, part, plan, bucket) for name, region in g.region.items()}
            home = {k: [entry_views[e] if lo is None else self.buffers[k][plan.spans[e][0] + lo:plan.spans[e][0] + hi]
                        for e, lo, hi in part] for k, entry_views in views.items()}
            g.up_into = (cut.get("grad", []) + cut.get("param", [])
                         + [v for k in converted for v in cut[k]])
            g.up_rest = g.up_into[len(cut.get("grad", [])):]   # without the gradient
            g.up_from = [v for k in converted for v in home[k]]
            g.state = {k: cut[k] if k in converted else home[k] for k in (*converted, *direct)}
            g.work = home["master_param"] if param == "master" else cut.get("param")   # None: the parameters
            g.grad = cut.get("grad")                                                   # None: the gradients
            g.down_into = [v for k in converted for v in home[k]]
            g.down_from = [v for k in converted for v in cut[k]]
            # what the parameters are written from (None: the kernel wrote them)
            g.written = (g.work if param != "scratch" or not stochastic else self._cut(rounded[:g.n], part, plan, bucket)) \
                if param != "direct" else None
            if stochastic:
                g.region["rounded"] = rounded[:g.n]
                self._positions(g, part, plan, bucket)
            g.seen = None
            if param == "master":
                g.region.update(copy_rounded=seen[:g.n], now=seen[width:width + g.n], differs=differs[:g.n])
                # (one piece: its bits are compared where they lie, no copy beside them)
                g.seen = tuple(self._cut(g.region[name], part, plan, bucket)
                               for name in ("copy_rounded", "differs" if g.single else "now"))
            g.steps = None
            self.groups.append(g)
        self._steps_from: dict = {}

    def _pointers(self, bucket: _flat.Bucket) -> tuple:
        return tuple((k, b.data_ptr(), b.numel()) for k, b in bucket.buffers.items() if k in self.buffers)

    def valid(self, bucket: _flat.Bucket) -> bool:
        """False when a state buffer was replaced (amsgrad added, a rebuild): views go stale."""
        return self._pointers(bucket) == self._ptrs

    @staticmethod
    def _cut(region: Tensor, part, plan, bucket: _flat.Bucket) -> list[Tensor]:
        out, at = [], 0
        for e, lo, hi in part:
            n = hi - (lo or 0)
            flat = region[at:at + n]
            at += n
            j0, j1 = plan.entries[e]
            out.append(_shaped(flat, bucket, plan.reps[e]) if lo is None and j1 - j0 == 1 else flat)
        return out

    @staticmethod
    def _positions(g: _Group, part, plan, bucket: _flat.Bucket) -> None:
        """Stochastic rounding's inputs that the layout fixes: each element's position in
        the bucket (the kernel's `seg + offs`; a run's padding included, as its span is),
        as slices of the shared mixed-position table, and which tensor's seed it takes."""
        g.mixed = [(plan.spans[e][0] + (lo or 0), hi - (lo or 0)) for e, lo, hi in part]
        members = []
        for e, lo, hi in part:
            first, n = plan.spans[e][0] + (lo or 0), hi - (lo or 0)
            j0, j1 = plan.entries[e]
            if j1 - j0 == 1:
                members.append(torch.full((n,), plan.reps[e], dtype=torch.int32))
                continue
            # a run: element k belongs to the last member whose segment starts at or before it
            starts = torch.tensor([bucket.offsets[i] for i in range(plan.reps[e], plan.reps[e] + j1 - j0)])
            where = torch.searchsorted(starts, torch.arange(first, first + n), right=True) - 1
            members.append((where + plan.reps[e]).to(torch.int32))
        e = part[0][0]
        one = len(part) == 1 and plan.entries[e][1] - plan.entries[e][0] == 1
        # One tensor: its seed is a number; otherwise one seed per element.
        g.member = plan.reps[e] if one else torch.cat(members)

    def pieces(self, tensors: list[Tensor]) -> list[Tensor]:
        """The step's parameters or gradients (one per plan entry) as the layout's pieces."""
        if not any(self.split):
            return tensors
        out = []
        for t, cut in zip(tensors, self.split):
            if cut:
                out += _native._one_d(t).split(self.chunk)
            else:
                out.append(t)
        return out

    def run(self, impl, params, grads, scalars, o, ctx, scale, mult, mix) -> None:
        ps, gs = self.pieces(params), self.pieces(grads)
        # The plan's lists of scalar views, by identity: it rebuilds them when a vector moves.
        if any(self._steps_from.get(k) is not v for k, v in scalars.items()):
            self._steps_from = dict(scalars)
            for g in self.groups:
                g.steps = {k: [v[e] for e in g.entries] for k, v in scalars.items()}
        for g in self.groups:
            p, d = ps[g.first:g.end], gs[g.first:g.end]
            rest = (p if self.param == "scratch" else []) + g.up_from
            if self.scaled_only and g.single and (scale is None) != (mult is None):
                # the copy and the scaling in one op (the same rounding: one)
                op = torch.mul if scale is None else torch.div
                op(d[0], mult if scale is None else scale, out=g.grad[0])
                if rest:
                    torch._foreach_copy_(g.up_rest, rest)
            else:
                if self.grad or rest:
                    torch._foreach_copy_(g.up_into, (d if self.grad else []) + rest)
                if scale is not None:
                    g.region["grad"].div_(scale)
                if mult is not None:
                    g.region["grad"].mul_(mult)
            if g.seen is not None:
                _sync_master(g, p)
            impl.fused(p if g.work is None else g.work, d if g.grad is None else g.grad, g.state, g.steps,
                       g.reps, o, ctx)
            into, source, written = g.down_into, g.down_from, g.written
            if self.stochastic:
                x, tmp = (t[:g.n] for t in self.ints)
                if isinstance(g.member, int):
                    (start, n), = g.mixed
                    mixed, seeds = _launch.mixed_positions(start + n)[start:], mix[g.member]
                else:
                    mixed = _mixed(g.mixed, tmp)
                    seeds = torch.index_select(mix, 0, g.member, out=x)
                # One piece: the rounded bits go straight into the parameter.
                out = _native._one_d(p[0]) if g.single else g.region["rounded"]
                _launch.round_sr_int32(g.region["param"], mixed, seeds, out, x, tmp)
                if g.single:
                    written = None
            if written is not None:
                into, source = into + p, source + written
            if into:
                torch._foreach_copy_(into, source)


def _sync_master(g: _Group, params: list[Tensor]) -> None:
    """The kernel's first move with a master copy (`kernels/adam.py`): where a parameter is
    no longer its copy's rounding (written since the last step, by whatever means), the copy
    takes the written value; elsewhere it keeps its precision.

    Found in scratch: the copies rounded to the parameters' 16-bit dtype beside the
    parameters, their bits XORed and the extremes taken (torch's CPU compare and `any` ran
    at a tenth of the speed of these integer ops: 350 and 120 us for 256K bf16 elements,
    against 35 for both). Equal bits are equal values; a group where some differ (a write,
    or a zero of the other sign) takes the values piece by piece, compared as the kernel
    compares them."""
    copy_rounded, other = g.seen
    torch._foreach_copy_(copy_rounded, g.work)
    if g.single:
        bits = torch.bitwise_xor(copy_rounded[0].view(torch.int16), params[0].view(torch.int16), out=other[0])
    else:
        torch._foreach_copy_(other, params)
        bits = torch.bitwise_xor(g.region["copy_rounded"].view(torch.int16), g.region["now"].view(torch.int16),
                                 out=g.region["differs"])
    low, high = torch.aminmax(bits)
    if low or high:
        for work, p in zip(g.work, params):
            torch.where(work.to(p.dtype) == p, work, p, out=work)


def _shaped(flat: Tensor, bucket: _flat.Bucket, i: int) -> Tensor:
    """A 1-D scratch slice viewed as parameter i's state views are (a real view for complex)."""
    if bucket.is_complex:
        return torch.view_as_real(torch.view_as_complex(flat.view(-1, 2)).as_strided(bucket.shapes[i], bucket.strides[i]))
    return flat.as_strided(bucket.shapes[i], bucket.strides[i])


def _scratch(bucket: _flat.Bucket, name: str, dtype: torch.dtype, n: int) -> Tensor:
    """The bucket's scratch of one kind, at least n elements, reused by every layout."""
    store = bucket.__dict__.setdefault("_composed_scratch", {})
    buf = store.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = store[name] = torch.empty(n, dtype=dtype, device=bucket.device)
    return buf[:n]


def _mixed(slices: list[tuple[int, int]], out: Tensor) -> Tensor:
    """The mixed positions of a group's pieces, one tensor (a view when there is one piece)."""
    table = _launch.mixed_positions(max(start + n for start, n in slices))
    if len(slices) == 1:
        start, n = slices[0]
        return table[start:start + n]
    return torch.cat([table[start:start + n] for start, n in slices], out=out)
