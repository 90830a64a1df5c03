"""fusedopt.swa against torch.optim.swa_utils, update by update, on every path.

'triton' runs the averaging kernel (in Triton's interpreter when there is no GPU),
'reference' the plain-torch path over the same flat buffers, 'auto' what a user gets
(on the CPU, torch ops arranged for few dispatches). Each path keeps torch's formula and
rounding points, so real dtypes are compared bit for bit.
"""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.optim import swa_utils as ref

import fusedopt
from fusedopt import swa
from fusedopt.kernels._launch import count_launches

from _compare import assert_close
from conftest import DEVICE

BACKENDS = ["triton", "reference", "auto"]


# ----------------------------------------------------------------------------- models

def bn_model(seed=0, dtype=torch.float32):
    """Conv + BatchNorm (a channels_last weight among them) + Linear: parameters, float
    buffers and an integer buffer (num_batches_tracked)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    model[0].weight.data = model[0].weight.data.contiguous(memory_format=torch.channels_last)
    return model.to(dtype=dtype, device=DEVICE)


class TwoDtypes(torch.nn.Module):
    """bn_model and a float64 layer: two (device, dtype) buckets of floating tensors."""

    def __init__(self):
        super().__init__()
        self.net = bn_model()
        self.extra = torch.nn.Linear(3, 3).double().to(DEVICE)

    def forward(self, x):
        return self.net(x)


class Tensors(torch.nn.Module):
    """Parameters of awkward shapes: scalar, empty, one block +- 1 element, channels_last."""

    def __init__(self, dtype, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = [(), (1,), (7,), (1023,), (1025,), (13, 17), (0,)]
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes])
        self.cl = torch.nn.Parameter(
            torch.randn(3, 5, 2, 2, generator=g).to(dtype).contiguous(memory_format=torch.channels_last))
        self.to(DEVICE)


def train_a_little(model, k):
    """Move the parameters and the BatchNorm statistics, deterministically."""
    g = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype).to(p.device))
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model.train()
            model(torch.randn(6, 3, 6, 6, generator=g).to(DEVICE, next(model.parameters()).dtype))


def user_multi(averaged, current, n):
    if averaged[0].is_floating_point():
        torch._foreach_lerp_(averaged, current, 0.3)
    else:
        torch._foreach_copy_(averaged, current)


AVERAGES = {
    "default": lambda m: {},
    "ema_multi": lambda m: dict(multi_avg_fn=m.get_ema_multi_avg_fn(0.9)),
    "swa_multi": lambda m: dict(multi_avg_fn=m.get_swa_multi_avg_fn()),
    "ema_fn": lambda m: dict(avg_fn=m.get_ema_avg_fn(0.9)),
    "swa_fn": lambda m: dict(avg_fn=m.get_swa_avg_fn()),
    "user_fn": lambda m: dict(avg_fn=lambda a, x, n: 0.25 * a + 0.75 * x),
    "user_multi": lambda m: dict(multi_avg_fn=user_multi),
}
FUSED = {"default", "ema_multi", "swa_multi", "ema_fn", "swa_fn"}


# On the CPU every path reproduces torch's bits. On a GPU, whether torch's own kernels
# contract a multiply-add is nvcc's choice, so there they are compared to rounding.
EXACT = DEVICE == "cpu"


def assert_same_state(mine, theirs, exact=EXACT):
    a, b = mine.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), f"{key}: max error {(a[key].double() - b[key].double()).abs().max()}"
        else:
            assert_close(key, a[key], b[key])


def side_by_side(model, average, backend, updates=4, use_buffers=False, exact=EXACT):
    theirs = ref.AveragedModel(model, use_buffers=use_buffers, **AVERAGES[average](ref))
    mine = swa.AveragedModel(model, use_buffers=use_buffers, backend=backend, **AVERAGES[average](swa))
    update_both(model, mine, theirs, range(updates), exact)
    return mine, theirs


def update_both(model, mine, theirs, steps, exact=EXACT):
    """Train `model` a little before each of `steps`, update both averages, compare them."""
    for k in steps:
        train_a_little(model, k)
        theirs.update_parameters(model)
        mine.update_parameters(model)
        assert_same_state(mine, theirs, exact)


# ----------------------------------------------------------------------------- AveragedModel

# A user's function runs as torch runs it whatever the backend, so once; torch's
# multi-tensor SWA refuses integer buffers (test_swa_multi_on_integer_buffers_raises_as_torch).
MATCH_CASES = [(backend, average, use_buffers)
               for backend in BACKENDS for average in AVERAGES for use_buffers in (False, True)
               if (average in FUSED or backend == "auto") and not (average == "swa_multi" and use_buffers)]


@pytest.mark.parametrize("backend,average,use_buffers", MATCH_CASES)
def test_matches_torch(backend, average, use_buffers):
    side_by_side(bn_model(), average, backend, updates=3, use_buffers=use_buffers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swa_multi_on_integer_buffers_raises_as_torch(backend):
    # torch's multi-tensor SWA uses addcdiv on num_batches_tracked, which torch refuses
    model = bn_model()
    theirs = ref.AveragedModel(model, multi_avg_fn=ref.get_swa_multi_avg_fn(), use_buffers=True)
    mine = swa.AveragedModel(model, multi_avg_fn=swa.get_swa_multi_avg_fn(), use_buffers=True, backend=backend)
    theirs.update_parameters(model)
    mine.update_parameters(model)
    with pytest.raises(RuntimeError, match="addcdiv") as expected:
        theirs.update_parameters(model)
    with pytest.raises(RuntimeError, match="addcdiv") as got:
        mine.update_parameters(model)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("average", sorted(FUSED))
def test_cpu_paths(monkeypatch, average, flat):
    # 'auto' on the CPU gathers a bucket into one buffer when its tensors are small, else
    # runs foreach ops over the segments; force each, on both kinds of tensors.
    from fusedopt.kernels import averaging

    monkeypatch.setattr(averaging, "FLAT_MAX_MEAN_NUMEL", dict.fromkeys(averaging.FORMULAS, 10**9 if flat else 0))
    for use_buffers in (False, True):
        if not (average == "swa_multi" and use_buffers):
            side_by_side(bn_model(), average, "auto", updates=3, use_buffers=use_buffers)
    for dtype in (torch.float64, torch.bfloat16):
        side_by_side(Tensors(dtype), average, "auto", updates=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.complex64])
@pytest.mark.parametrize("average", sorted(FUSED))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_other_dtypes(backend, average, dtype):
    # The kernel rounds where torch's ops round (lerp once, the three-op formulas after
    # each op), so even bf16 is bit for bit; complex tensors are averaged with torch's own
    # functions (complex arithmetic differs from arithmetic on the real view by an ulp).
    side_by_side(Tensors(dtype), average, backend, updates=3)


@pytest.mark.parametrize("average", sorted(FUSED))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept,model_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
                         ids=["bf16-of-fp32", "fp32-of-fp64"])
def test_an_average_kept_narrower_than_its_model(backend, average, kept, model_dtype):
    """`AveragedModel(model).to(torch.bfloat16)`: torch averages in the wider dtype and rounds
    once; so does fusedopt (the kernel would round the model's value first). torch's
    multi-tensor functions refuse the mix, and so do they here."""
    model = Tensors(model_dtype)
    theirs = ref.AveragedModel(model, **AVERAGES[average](ref)).to(kept)
    mine = swa.AveragedModel(model, backend=backend, **AVERAGES[average](swa)).to(kept)
    for k in range(3):
        train_a_little(model, k)
        try:
            theirs.update_parameters(model)
        except RuntimeError as e:
            with pytest.raises(RuntimeError, match="expected dtype"):
                mine.update_parameters(model)
            assert k == 1 and "multi" in average, e
            return
        mine.update_parameters(model)
        assert_same_state(mine, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_swa_late_in_training(backend, dtype):
    # n_averaged + 1 beyond what bf16/fp16 represent exactly: the weight and the divisor
    # must round as torch's do (the lerp weight is a float32 tensor, the divisor an integer)
    model = Tensors(dtype)
    for average in ("default", "swa_multi", "swa_fn"):
        theirs = ref.AveragedModel(model, **AVERAGES[average](ref))
        mine = swa.AveragedModel(model, backend=backend, **AVERAGES[average](swa))
        for averaged in (theirs, mine):
            averaged.update_parameters(model)
            averaged.n_averaged.fill_(4097)
        for k in range(2):
            train_a_little(model, k)
            theirs.update_parameters(model)
            mine.update_parameters(model)
            assert_same_state(mine, theirs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_one_launch_per_bucket(backend):
    model = TwoDtypes()
    for average, use_buffers in [("default", False), ("ema_multi", True), ("swa_fn", False)]:
        mine = swa.AveragedModel(model, backend=backend, use_buffers=use_buffers, **AVERAGES[average](swa))
        for _ in range(3):
            with count_launches() as launches:
                mine.update_parameters(model)
            # float32 and float64 buckets; num_batches_tracked goes through torch's functions
            assert launches.total() == (2 if backend == "triton" else 0), (average, use_buffers, launches)
    mine = swa.AveragedModel(model, backend=backend, **AVERAGES["user_fn"](swa))
    with count_launches() as launches:
        mine.update_parameters(model)
        mine.update_parameters(model)
    assert launches.total() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dtypes_match_torch(backend):
    model = TwoDtypes()
    side_by_side(model, "default", backend, use_buffers=True)


def test_averaged_tensors_are_views_of_flat_buffers():
    model = bn_model()
    for use_buffers in (False, True):
        mine = swa.AveragedModel(model, use_buffers=use_buffers, multi_avg_fn=swa.get_ema_multi_avg_fn(0.99))
        flat = mine.flat_average()
        assert flat.n_averaged is mine.n_averaged
        owners = {}
        for bucket, buffer in zip(flat.buckets, flat.buffers()):
            start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
            for i, t in enumerate(bucket.params):
                assert start <= t.data_ptr() < end or t.numel() == 0
                owners[id(t)] = (bucket, i)
        params, buffers = list(mine.module.parameters()), list(mine.module.buffers())
        assert all(id(t) in owners for t in params + buffers)
        # each bucket: averaged tensors, then the synced buffers
        for t in params:
            bucket, i = owners[id(t)]
            assert i < bucket.first_copy and bucket.average == swa.Average("ema", "lerp", 0.99)
        for t in buffers:
            bucket, i = owners[id(t)]
            assert (i < bucket.first_copy) == use_buffers
        sources = mine.sources(model)
        for pos, source in enumerate(sources):
            b, i = flat.locate(pos)
            assert flat.buckets[b].positions[i] == pos
            assert flat.buckets[b].params[i].shape == source.shape


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_layout_follows_replaced_tensors(backend):
    model = bn_model()
    theirs = ref.AveragedModel(model, use_buffers=True)
    mine = swa.AveragedModel(model, use_buffers=True, backend=backend)
    for k in range(2):
        train_a_little(model, k)
        theirs.update_parameters(model)
        mine.update_parameters(model)
    # assign=True replaces the module's tensors; the next update must use the new ones
    state = {k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in theirs.module.state_dict().items()}
    theirs.module.load_state_dict(state)
    mine.module.load_state_dict(state, assign=True)
    # .to() re-points every tensor
    mine.module.to(torch.float64).to(torch.float32)
    # the model changes layout too: its averaged copy must read it through a staged copy
    model[0].weight.data = model[0].weight.data.contiguous()
    update_both(model, mine, theirs, range(2, 4))


class Buffers(torch.nn.Module):
    """A module with buffers only."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(3))
        self.register_buffer("count", torch.tensor(4))

    def forward(self, x):
        return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("added", ["layer", "buffers"])
def test_a_module_added_to_the_average_and_the_model_is_averaged_like_torch(added, backend, use_buffers):
    # torch walks both modules every update: a layer added to both after the first update is
    # averaged from then on (its buffers kept in sync). fusedopt kept its first layout and
    # left the new layer at its copy, and took a module of buffers only for a model that
    # does not fit (ValueError).
    model = bn_model()
    mine, theirs = side_by_side(model, "default", backend, updates=2, use_buffers=use_buffers)
    extra = (torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)) if added == "layer"
             else Buffers()).to(DEVICE)
    model.append(extra)
    theirs.module.append(copy.deepcopy(extra))
    mine.module.append(copy.deepcopy(extra))
    update_both(model, mine, theirs, range(2, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("replaced", ["submodule", "module"])
def test_a_module_of_the_average_replaced_is_averaged_like_torch(replaced, backend):
    # A layer of the model and of its averaged copy replaced under the same name (or the
    # whole averaged copy): torch averages into the new one. fusedopt saw the old tensors
    # still in the old layer and went on averaging them, out of the model's reach.
    model = bn_model()
    mine, theirs = side_by_side(model, "ema_multi", backend, updates=2)
    for avg in (None, mine, theirs):
        torch.manual_seed(5)
        layer = torch.nn.Linear(4 * 4 * 4, 5).to(DEVICE)
        if avg is None:
            model[4] = layer
        elif replaced == "submodule":
            avg.module[4] = layer
        else:
            avg.module = copy.deepcopy(model)
    update_both(model, mine, theirs, range(2, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_added_to_the_average_alone_raise_as_torch_before_anything_changes(backend):
    # torch pairs the averaged copy's buffers with the model's one for one (zip strict)
    model = bn_model()
    mine, theirs = side_by_side(model, "default", backend, updates=2)
    for avg in (mine, theirs):
        avg.module.append(Buffers().to(DEVICE))
    train_a_little(model, 2)
    before = copy.deepcopy(mine.state_dict())
    with pytest.raises(ValueError):
        theirs.update_parameters(model)
    with pytest.raises(ValueError, match="buffers"):
        mine.update_parameters(model)
    for key, value in mine.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_model_tensor_moved_by_data_assignment():
    model = bn_model()
    theirs, mine = ref.AveragedModel(model), swa.AveragedModel(model, backend="triton")
    theirs.update_parameters(model)
    mine.update_parameters(model)
    with torch.no_grad():
        model[4].weight.data = model[4].weight.data * 2  # a new address for one tensor
    theirs.update_parameters(model)
    mine.update_parameters(model)
    assert_same_state(mine, theirs)


def test_device_argument_and_forward():
    model = bn_model()
    mine = swa.AveragedModel(model, device=DEVICE, backend="reference")
    theirs = ref.AveragedModel(model, device=DEVICE)
    assert mine.n_averaged.device == theirs.n_averaged.device
    train_a_little(model, 0)
    mine.update_parameters(model)
    theirs.update_parameters(model)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    mine.eval(), theirs.eval()
    assert torch.equal(mine(x), theirs(x))


def test_fewer_model_tensors_average_a_prefix_like_torch():
    # torch zips the parameter lists without strict: extra averaged tensors are left alone
    big = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    small = torch.nn.Sequential(torch.nn.Linear(3, 3))
    for backend in ("triton", "reference", "auto"):
        theirs, mine = ref.AveragedModel(big), swa.AveragedModel(big, backend=backend)
        for k in range(3):
            train_a_little(small, k)
            theirs.update_parameters(small)
            mine.update_parameters(small)
        assert_same_state(mine, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", [True, False], ids=["copy", "average"])
def test_model_of_another_shape_raises_torchs_error_and_changes_nothing(backend, first):
    """torch's copy_ (first update) and average (later ones) raise RuntimeError on a
    tensor whose shape does not match; the refused update leaves the average as it was."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(DEVICE)
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)).to(DEVICE)
    theirs, mine = ref.AveragedModel(model), swa.AveragedModel(model, backend=backend)
    if not first:
        theirs.update_parameters(model)
        mine.update_parameters(model)
    with pytest.raises(Exception) as expected:
        theirs.update_parameters(other)
    before = copy.deepcopy(mine.state_dict())
    with pytest.raises(type(expected.value), match=r"shape \(5, 3\)"):
        mine.update_parameters(other)
    after = mine.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rejects_both_functions_and_bad_backend(monkeypatch):
    with pytest.raises(AssertionError):
        swa.AveragedModel(bn_model(), avg_fn=swa.get_swa_avg_fn(), multi_avg_fn=swa.get_swa_multi_avg_fn())
    with pytest.raises(ValueError, match="backend"):
        swa.AveragedModel(bn_model(), backend="cuda")
    monkeypatch.setenv("FUSEDOPT_BACKEND", "reference")
    mine = swa.AveragedModel(bn_model(), backend="triton")
    assert {b.path for b in mine.flat_average().buckets} == {"reference"}


# ----------------------------------------------------------------------------- state

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_state_dict_loads_both_ways(backend):
    model = bn_model()
    theirs = ref.AveragedModel(model, multi_avg_fn=ref.get_ema_multi_avg_fn(0.8))
    mine = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(0.8), backend=backend)
    for k in range(3):
        train_a_little(model, k)
        theirs.update_parameters(model)
        mine.update_parameters(model)
    # through bytes, as a checkpoint goes
    buffer = io.BytesIO()
    torch.save(mine.state_dict(), buffer)
    buffer.seek(0)
    torch_restored = ref.AveragedModel(bn_model(seed=1), multi_avg_fn=ref.get_ema_multi_avg_fn(0.8))
    torch_restored.load_state_dict(torch.load(buffer))
    mine_restored = swa.AveragedModel(bn_model(seed=1), multi_avg_fn=swa.get_ema_multi_avg_fn(0.8), backend=backend)
    mine_restored.load_state_dict(theirs.state_dict())
    assert int(mine_restored.n_averaged) == 3
    assert_same_state(mine_restored, theirs)
    assert_same_state(torch_restored, theirs)
    for k in range(3, 5):
        train_a_little(model, k)
        for averaged in (theirs, mine, torch_restored, mine_restored):
            averaged.update_parameters(model)
        assert_same_state(mine_restored, theirs)
        assert_same_state(torch_restored, theirs)
        assert_same_state(mine, theirs)


def test_deepcopy_and_pickle():
    model = bn_model()
    mine = swa.AveragedModel(model, backend="reference")
    theirs = ref.AveragedModel(model)
    for averaged in (mine, theirs):
        averaged.update_parameters(model)
    for clone in (copy.deepcopy(mine), pickle.loads(pickle.dumps(mine))):
        reference = copy.deepcopy(theirs)
        for k in range(2):
            train_a_little(model, k)
            clone.update_parameters(model)
            reference.update_parameters(model)
        assert_same_state(clone, reference)
        # the copy has buffers of its own
        assert clone.module[0].weight.data_ptr() != mine.module[0].weight.data_ptr()


# ----------------------------------------------------------------------------- functions

def test_functions_called_directly_match_torch():
    g = torch.Generator().manual_seed(0)
    avg = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
    cur = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
    n = torch.tensor(3)
    for mine, theirs in [(swa.get_ema_multi_avg_fn(0.7), ref.get_ema_multi_avg_fn(0.7)),
                         (swa.get_swa_multi_avg_fn(), ref.get_swa_multi_avg_fn())]:
        a, b = [t.clone() for t in avg], [t.clone() for t in avg]
        mine(a, cur, n)
        theirs(b, cur, n)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for mine, theirs in [(swa.get_ema_avg_fn(0.7), ref.get_ema_avg_fn(0.7)),
                         (swa.get_swa_avg_fn(), ref.get_swa_avg_fn())]:
        assert torch.equal(mine(avg[0], cur[0], n), theirs(avg[0], cur[0], n))
    ints = [torch.tensor(5)], [torch.tensor(12)]
    swa.get_ema_multi_avg_fn(0.9)(*ints, n)
    assert ints[0][0].item() == 5   # 5 * 0.9 + 12 * 0.1 = 5.7, truncated as torch does
    for bad in (-0.1, 1.5):
        for factory in (swa.get_ema_multi_avg_fn, swa.get_ema_avg_fn):
            with pytest.raises(ValueError, match="decay"):
                factory(bad)


def test_user_multi_avg_fn_gets_groups_by_dtype():
    model = TwoDtypes()
    calls = []

    def average(a, x, n):
        calls.append(({t.dtype for t in a}, len(a), int(n)))
        torch._foreach_lerp_(a, x, 0.5)

    mine = swa.AveragedModel(model, multi_avg_fn=average)
    mine.update_parameters(model)
    assert calls == []  # the first update copies
    mine.update_parameters(model)
    assert calls == [({torch.float32}, 10, 1), ({torch.float64}, 2, 1)]


# ----------------------------------------------------------------------------- SWALR

def lr_sequences(make_scheduler, module, groups=2, steps=16, lr=0.5, tensor_lr=False):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p], "lr": (torch.tensor(lr * (i + 1)) if tensor_lr else lr * (i + 1))}
                           for i, p in enumerate(params)])
    scheduler = make_scheduler(module, opt)
    seen = [[float(g["lr"]) for g in opt.param_groups]]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        seen.append([float(g["lr"]) for g in opt.param_groups])
    return seen, scheduler, opt


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("anneal_epochs", [0, 1, 3, 10])
@pytest.mark.parametrize("swa_lr", [0.05, [0.05, 0.2]])
def test_swalr_matches_torch(swa_lr, anneal_epochs, strategy, tensor_lr):
    def make(module, opt):
        return module.SWALR(opt, swa_lr=swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)

    mine, scheduler, _ = lr_sequences(make, swa, tensor_lr=tensor_lr)
    theirs, torch_scheduler, _ = lr_sequences(make, ref, tensor_lr=tensor_lr)
    assert mine == theirs
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    assert scheduler.get_last_lr() == torch_scheduler.get_last_lr()


def test_swalr_chains_after_another_scheduler_and_state_dict():
    def run(module, steps, cut=None):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=1.0)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        swalr = module.SWALR(opt, swa_lr=0.1, anneal_epochs=4, anneal_strategy="linear")
        lrs = []
        for epoch in range(steps):
            opt.step()
            (swalr if epoch >= 5 else cosine).step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, swalr

    mine, mine_sched = run(swa, 12)
    theirs, torch_sched = run(ref, 12)
    assert mine == theirs
    # state dicts carry the same keys and load into each other
    mine_state, torch_state = mine_sched.state_dict(), torch_sched.state_dict()
    assert set(mine_state) == set(torch_state)
    _, fresh_torch = run(ref, 1)
    fresh_torch.load_state_dict(mine_state)
    _, fresh_mine = run(swa, 1)
    fresh_mine.load_state_dict(torch_state)
    assert fresh_mine.anneal_func(0.5) == fresh_torch.anneal_func(0.5) == 0.5
    assert fresh_mine._step_count == torch_sched._step_count


def test_swalr_validation_matches_torch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for kwargs in [dict(swa_lr=[0.1, 0.2]), dict(swa_lr=0.1, anneal_strategy="exp"),
                   dict(swa_lr=0.1, anneal_epochs=-1), dict(swa_lr=0.1, anneal_epochs=2.0),
                   dict(swa_lr=0.1, anneal_strategy=["cos"])]:
        with pytest.raises(ValueError) as expected:
            ref.SWALR(opt, **kwargs)
        opt.param_groups[0].pop("swa_lr", None)  # torch writes it before its other checks
        with pytest.raises(ValueError) as got:
            swa.SWALR(opt, **kwargs)
        assert str(got.value) == str(expected.value)
        # a refused construction leaves the optimizer as it was
        assert "swa_lr" not in opt.param_groups[0]


def test_swalr_with_fusedopt_optimizer_and_get_lr_warning():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fusedopt.SGD([p], lr=1.0, momentum=0.9)
    scheduler = swa.SWALR(opt, swa_lr=0.25, anneal_epochs=2)
    p.grad = torch.ones(3)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.625)
    with pytest.warns(UserWarning, match="get_last_lr"):
        scheduler.get_lr()


def test_anneal_curves():
    assert swa.linear_anneal(0.25) == 0.25
    assert swa.cos_anneal(0) == 0 and swa.cos_anneal(1) == 1 and swa.cos_anneal(0.5) == pytest.approx(0.5)
    # after the anneal the rate is swa_lr, whatever it was
    assert swa.swa_lr_step(0.3, 0.05, 7, 3, swa.cos_anneal) == 0.05


# ----------------------------------------------------------------------------- update_bn

def loaders():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 3, 6, 6, generator=g) * 3 + 1 for _ in range(4)]
    return {"tensors": xs, "tuples": [(x, torch.zeros(8)) for x in xs], "lists": [[x, 0] for x in xs]}


@pytest.mark.parametrize("kind", ["tensors", "tuples", "lists"])
def test_update_bn_matches_torch(kind):
    loader = loaders()[kind]
    mine, theirs = bn_model(), bn_model()
    mine[1].momentum = 0.3
    theirs[1].momentum = 0.3
    for m in (mine, theirs):
        train_a_little(m, 0)
        m.eval()
    swa.update_bn(loader, mine, device=DEVICE)
    ref.update_bn(loader, theirs, device=DEVICE)
    assert_same_state(mine, theirs)
    assert not mine.training
    assert mine[1].momentum == 0.3 and mine[5].momentum == 0.1


def test_update_bn_on_averaged_model_and_without_batchnorm():
    model = bn_model()
    mine, theirs = swa.AveragedModel(model), ref.AveragedModel(model)
    for k in range(2):
        train_a_little(model, k)
        mine.update_parameters(model)
        theirs.update_parameters(model)
    swa.update_bn(loaders()["tuples"], mine, device=DEVICE)
    ref.update_bn(loaders()["tuples"], theirs, device=DEVICE)
    assert_same_state(mine, theirs)

    class Exploding:
        def __iter__(self):
            raise AssertionError("a model without BatchNorm must not read the loader")

    swa.update_bn(Exploding(), torch.nn.Linear(2, 2))


def test_update_bn_restores_momenta_and_mode_when_the_loader_raises():
    """torch's update_bn leaves every BatchNorm's momentum None (a cumulative average from
    then on) and the model in train mode when the loader or the model raises; fusedopt's
    restores both, as its docstring says, and lets the exception through."""
    class Failing:
        def __iter__(self):
            yield loaders()["tensors"][0]
            raise OSError("the data went away")

    model = bn_model()
    model[1].momentum = 0.3
    model.eval()
    with pytest.raises(OSError, match="went away"):
        swa.update_bn(Failing(), model, device=DEVICE)
    assert [m.momentum for m in (model[1], model[5])] == [0.3, 0.1]
    assert not model.training


# ----------------------------------------------------------------------------- recipe

def recipe(optimizer_cls, averaged_cls, swalr_cls, update_bn, epochs=8, swa_start=4, **avg_kwargs):
    """torch's SWA recipe: cosine schedule, switch to SWALR at swa_start, average every
    epoch after it, update_bn at the end, predict with the averaged model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3)).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g).to(DEVICE), torch.randint(0, 3, (8,), generator=g).to(DEVICE))
            for _ in range(4)]
    opt = optimizer_cls(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    averaged = averaged_cls(model, **avg_kwargs)
    swa_scheduler = swalr_cls(opt, swa_lr=0.05, anneal_epochs=2)
    lrs = []
    for epoch in range(epochs):
        model.train()
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if epoch > swa_start:
            averaged.update_parameters(model)
            swa_scheduler.step()
        else:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    update_bn(data, averaged)
    averaged.eval()
    with torch.no_grad():
        return averaged(torch.cat([x for x, _ in data])), lrs, averaged


@pytest.mark.parametrize("optimizer", ["torch", "fusedopt"])
@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_recipe_matches_torch(backend, optimizer):
    expected, expected_lrs, theirs = recipe(torch.optim.SGD, ref.AveragedModel, ref.SWALR, ref.update_bn)
    sgd = torch.optim.SGD if optimizer == "torch" else fusedopt.SGD
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scheduler-order warnings with either optimizer
        got, lrs, mine = recipe(sgd, lambda m: swa.AveragedModel(m, backend=backend), swa.SWALR, swa.update_bn)
    assert lrs == expected_lrs
    if optimizer == "torch" and EXACT:
        assert torch.equal(got, expected)
        assert_same_state(mine, theirs)
    else:  # fusedopt.SGD equals torch's SGD to float rounding
        assert_close("predictions", got, expected, rtol=1e-5, atol=1e-5)
        assert_same_state(mine, theirs, exact=False)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_recipe_with_ema_of_buffers(backend):
    # use_buffers=True averages the BatchNorm statistics, so no update_bn pass
    def no_update_bn(loader, model):
        pass

    expected, _, _ = recipe(torch.optim.SGD, ref.AveragedModel, ref.SWALR, no_update_bn,
                            multi_avg_fn=ref.get_ema_multi_avg_fn(0.9), use_buffers=True)
    got, _, _ = recipe(torch.optim.SGD, lambda m, **kw: swa.AveragedModel(m, backend=backend, **kw), swa.SWALR,
                       no_update_bn, multi_avg_fn=swa.get_ema_multi_avg_fn(0.9), use_buffers=True)
    assert torch.equal(got, expected) if EXACT else torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", ["swa", "ema"])
@pytest.mark.parametrize("how", ["update_parameters", "attached"])
def test_an_update_is_an_in_place_write_to_autograd(backend, average, how):
    """torch's update_parameters writes the averaged tensors in place, bumping their
    autograd version counters: a graph that saved one before the update refuses a backward
    after it. The kernels write through pointers: that backward used the new values
    without a word."""
    outcomes = []
    for swa_module, optim in ((ref, torch.optim), (swa, fusedopt)):
        model = bn_model()
        kw = {} if average == "swa" else dict(multi_avg_fn=swa_module.get_ema_multi_avg_fn(0.9))
        if swa_module is swa:
            kw["backend"] = backend
        averaged = swa_module.AveragedModel(model, **kw)
        opt = optim.SGD(model.parameters(), lr=0.1)
        attached = how == "attached" and swa_module is swa
        if attached:
            opt.attach_averaged_model(averaged)
        x = torch.randn(3, 3, 6, 6, device=DEVICE)
        for step in range(3):
            model(x).square().mean().backward()
            saved = averaged.module[6](torch.randn(2, 5, device=DEVICE, requires_grad=True)).sum()
            opt.step()
            if not attached:
                averaged.update_parameters(model)
            try:
                saved.backward()
                outcomes.append("stale graph stepped")
            except RuntimeError as error:
                assert "modified by an inplace operation" in str(error)
                outcomes.append("refused")
    assert outcomes == ["refused"] * 6, outcomes
