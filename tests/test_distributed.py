"""Distributed training: DDP, ZeroRedundancyOptimizer, FSDP2 and distributed checkpoints.

Every scenario runs on two CPU processes over gloo and compares fusedopt with torch.optim's
same class on the same model and data. The two processes are started once per module and
kept (a scenario is a function name sent to both): starting them costs more than most
scenarios. A failing scenario tears the pair down, since the other rank may be blocked in a
collective, and the next test starts a fresh pair.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

# Children inherit the environment; conftest.py sets TRITON_INTERPRET before triton is
# imported here, and a child imports this module (so triton) before any of its code runs.
import fusedopt
from fusedopt.kernels import _launch
from optim_db import OPTIMIZERS

WORLD = 2
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------------ process pair

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, port: int, inbox, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A peer that died mid-collective must not hang this one past the test's own timeout.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    while True:
        job = inbox.get()
        if job is None:
            break
        name, args = job
        try:
            results.put((rank, None, globals()[name](rank, *args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, traceback.format_exc(), None))
    dist.destroy_process_group()


class _Pair:
    def __init__(self):
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.results = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(WORLD)]
        self.procs = [ctx.Process(target=_serve, args=(r, port, self.inboxes[r], self.results), daemon=True)
                      for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, name: str, *args):
        for inbox in self.inboxes:
            inbox.put((name, args))
        out = {}
        deadline = time.monotonic() + TIMEOUT_S
        while len(out) < WORLD:
            try:
                rank, error, value = self.results.get(timeout=1)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    codes = {r: self.procs[r].exitcode for r in dead}
                    self.close()
                    pytest.fail(f"{name}: " + (f"rank(s) died, exit codes {codes}" if dead
                                              else f"no answer from every rank within {TIMEOUT_S} s"))
                continue
            if error is not None:
                self.close()
                pytest.fail(f"{name} failed on rank {rank}:\n{error}", pytrace=False)
            out[rank] = value
        return [out[r] for r in range(WORLD)]

    def close(self):
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


_PAIR: _Pair | None = None


@pytest.fixture(scope="module")
def pair():
    def get() -> _Pair:
        global _PAIR
        if _PAIR is None or not _PAIR.alive():
            _PAIR = _Pair()
        return _PAIR

    yield get
    global _PAIR
    if _PAIR is not None:
        _PAIR.close()
        _PAIR = None


def run(pair, name, *args):
    return pair().run(name, *args)


# ------------------------------------------------------------------------ shared pieces
# Everything below runs in the two processes.

def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 7 rows shard 4/3 over two ranks, the last layer's single row 1/0: uneven and empty shards.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))


def _batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 5, generator=gen), torch.randn(4, 1, generator=gen)


def _train(model, opt, steps, rank, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step, rank)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _close(name, actual, expected, rtol=1e-5, atol=1e-6):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{name}, tensor {i}: {m}")


def _equal(name, actual, expected):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"{name}, tensor {i} differs: max {(a - e).abs().max().item():.3e}"


def _same_on_every_rank(name, tensors):
    for i, t in enumerate(tensors):
        gathered = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(gathered, t.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name}: tensor {i} differs across ranks"


def _kinds(info, config):
    """fusedopt's paths to check: 'auto' and, where it runs on CPU, the Triton kernel."""
    out = [("auto", config)]
    if _launch.interpreting():
        out.append(("triton", config))
    return out


def _rows(names=None):
    """(info, config) of optim_db's rows, each with its last (most options) config."""
    return [(info, info.configs[-1]) for info in OPTIMIZERS if names is None or info.name in names]


def _single_process(info, config, steps):
    """torch.optim in one process on the whole batch (every rank's part): what data
    parallelism computes, up to the rounding of averaging gradients across ranks."""
    model = _model()
    opt = info.torch(model.parameters(), **config)
    for step in range(steps):
        xs, ys = zip(*(_batch(step, r) for r in range(WORLD)))
        nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
    return _params(model)


# ------------------------------------------------------------------------ DDP

def ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    steps = 3
    for info, config in _rows(["AdamW", "SGD", "RMSprop", "NAdam"]):
        expected = _single_process(info, config, steps)

        # Gradients as views into DDP's buckets for one row: the kernels read them in place.
        as_view = info.name == "AdamW"
        ddp_torch = DDP(_model(), gradient_as_bucket_view=as_view)
        _train(ddp_torch, info.torch(ddp_torch.parameters(), **config), steps, rank)
        for backend, kwargs in _kinds(info, config):
            model = DDP(_model(), gradient_as_bucket_view=as_view)
            _train(model, info.fused(model.parameters(), backend=backend, **kwargs), steps, rank)
            got = _params(model)
            name = f"{info.name}/{backend}"
            _same_on_every_rank(name, got)
            _close(f"{name} vs DDP torch", got, _params(ddp_torch), rtol=info.rtol32, atol=1e-6)
            _close(f"{name} vs single-process torch", got, expected)


def test_ddp_parameters_identical_across_ranks_and_equal_single_process_torch(pair):
    run(pair, "ddp")


# ------------------------------------------------------------------------ ZeRO

def _zero(model, optimizer_class, config, **kwargs):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, **config, **kwargs)


def _state_tensors(state_dict) -> list[torch.Tensor]:
    return [v for _, entry in sorted(state_dict["state"].items()) for _, v in sorted(entry.items())
            if isinstance(v, torch.Tensor)]


def zero(rank, path, names, model_fn):
    from torch.nn.parallel import DistributedDataParallel as DDP

    make = globals()[model_fn]
    for info, config in _rows(names):
        # One row with ZeRO's parameters_as_bucket_view, which replaces every parameter's
        # .data with a view into ZeRO's own buffers.
        zero_options = {"parameters_as_bucket_view": info.name == "Adam"}
        ref_model = DDP(make())
        ref = _zero(ref_model, info.torch, config, **zero_options)
        _train(ref_model, ref, 3, rank)
        ref.consolidate_state_dict(to=0)
        for backend, kwargs in _kinds(info, config):
            name = f"{info.name}/{backend}"
            model = DDP(make())
            opt = _zero(model, info.fused, kwargs, **_backend(backend), **zero_options)
            # The partition of an empty rank is a group with no parameters: it steps, doing nothing.
            local = sum(len(g["params"]) for g in opt.optim.param_groups)
            _train(model, opt, 3, rank)
            _same_on_every_rank(name, _params(model))
            _close(f"{name} vs ZeRO with torch's class", _params(model), _params(ref_model), rtol=info.rtol32, atol=1e-6)

            # consolidate -> save -> load into a fresh ZeRO -> resume, bit-equal
            opt.consolidate_state_dict(to=0)
            file = os.path.join(path, f"{info.name}-{backend}.pt")
            if rank == 0:
                full = opt.state_dict()
                full_ref = ref.state_dict()
                # ZeRO keeps every keyword it was given in its groups: `backend` too.
                groups = [{k: v for k, v in g.items() if k != "backend"} for g in full["param_groups"]]
                assert groups == full_ref["param_groups"], name
                _close(f"{name} consolidated state", _state_tensors(full), _state_tensors(full_ref),
                       rtol=info.rtol32, atol=1e-6)
                torch.save(full, file)
            dist.barrier()
            resumed_model = DDP(make())
            resumed_model.load_state_dict(model.state_dict())
            resumed = _zero(resumed_model, info.fused, kwargs, **_backend(backend), **zero_options)
            resumed.load_state_dict(torch.load(file, weights_only=True))
            _train(model, opt, 2, rank, start=3)
            _train(resumed_model, resumed, 2, rank, start=3)
            _equal(f"{name} resumed parameters", _params(resumed_model), _params(model))
            _equal(f"{name} resumed local state", _state_tensors(resumed.optim.state_dict()),
                   _state_tensors(opt.optim.state_dict()))
            assert _options(resumed.optim) == _options(opt.optim), name
    return local


def _backend(backend):
    return {} if backend == "auto" else {"backend": backend}


def _options(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def test_zero_with_fusedopt_matches_torch_class_and_resumes_bit_equal(pair, tmp_path):
    run(pair, "zero", str(tmp_path), None, "_model")


def _one_parameter():
    torch.manual_seed(0)
    return nn.Linear(5, 1, bias=False)


def zero_refuses_max_grad_norm(rank):
    """Each rank's optimizer holds its partition only: its clip would be by that norm."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    with pytest.raises(ValueError, match="max_grad_norm inside ZeroRedundancyOptimizer"):
        _zero(DDP(_model()), fusedopt.AdamW, dict(lr=0.01, max_grad_norm=1.0))
    _zero(DDP(_model()), fusedopt.AdamW, dict(lr=0.01))   # without it: fine


def test_zero_refuses_max_grad_norm(pair):
    run(pair, "zero_refuses_max_grad_norm")


def test_zero_rank_with_empty_partition_still_steps(pair, tmp_path):
    local = run(pair, "zero", str(tmp_path), ["AdamW", "SGD"], "_one_parameter")
    assert sorted(local) == [0, 1]


# ------------------------------------------------------------------------ FSDP2

def _sharded(seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(tensors):
    return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]


def _full_state(opt, params):
    return [t.full_tensor() if hasattr(t, "full_tensor") else t
            for p in params for _, t in sorted(opt.state[p].items()) if isinstance(t, torch.Tensor)]


# torch 2.13's Rprop fails on DTensors (its index_put_ on a sharded tensor has no sharding
# rule): fusedopt is compared with single-process torch on the whole batch instead.
TORCH_FAILS_ON_DTENSOR = {"Rprop"}


def fsdp2(rank):
    from torch.distributed.tensor import DTensor

    for info, config in _rows():
        if info.name in TORCH_FAILS_ON_DTENSOR:
            expected = _single_process(info, config, 4)
            ref = None
        else:
            ref_model = _sharded()
            ref = info.torch(ref_model.parameters(), **config)
            _train(ref_model, ref, 4, rank)
            expected = _full(ref_model.parameters())
        for backend, kwargs in _kinds(info, config) + [("reference", config)]:
            name = f"{info.name}/{backend}"
            model = _sharded()
            params = list(model.parameters())
            assert rank == 0 or any(p.to_local().numel() == 0 for p in params), "rank 1 should have an empty shard"
            opt = info.fused(params, backend=backend, **kwargs)
            _train(model, opt, 4, rank)
            if ref is None:
                _close(f"{name} parameters vs single-process torch.optim", _full(params), expected)
                continue
            _close(f"{name} parameters vs torch.optim", _full(params), expected, rtol=info.rtol32, atol=1e-6)
            for p, q in zip(params, ref_model.parameters()):
                mine, theirs = opt.state[p], ref.state[q]
                assert list(mine) == list(theirs), name
                for key, value in theirs.items():
                    got = mine[key]
                    assert type(got) is type(value), f"{name}: state {key!r} is a {type(got).__name__}"
                    if isinstance(value, DTensor):
                        assert (got.placements, got.device_mesh, got.shape, got.stride()) == \
                            (p.placements, p.device_mesh, p.shape, p.stride()), f"{name}: {key}"
                        assert got.to_local().shape == p.to_local().shape, f"{name}: {key}"
            _close(f"{name} state vs torch.optim", _full_state(opt, params),
                   _full_state(ref, list(ref_model.parameters())), rtol=info.rtol32, atol=1e-6)


def test_fsdp2_matches_torch_on_uneven_and_empty_shards(pair):
    run(pair, "fsdp2")


def fsdp2_clip(rank):
    """max_grad_norm on DTensor parameters clips by the whole model's norm, as torch's
    clip_grad_norm_ does (each rank's shards alone give another coefficient per rank)."""
    ref_model = _sharded()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05)
    for step in range(3):
        x, y = _batch(step, rank)
        nn.functional.mse_loss(ref_model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.01)
        ref.step()
        ref.zero_grad(set_to_none=True)
    for backend in [k for k, _ in _kinds(None, {})] + ["reference"]:
        model = _sharded()
        opt = fusedopt.AdamW(model.parameters(), lr=0.05, max_grad_norm=0.01, backend=backend)
        _train(model, opt, 3, rank)
        _close(f"clipped on {backend} vs torch.optim", _full(model.parameters()), _full(ref_model.parameters()),
               rtol=1e-5, atol=1e-6)


def test_fsdp2_max_grad_norm_is_the_global_norm(pair):
    run(pair, "fsdp2_clip")


def clip_refuses_plain_beside_dtensor(rank):
    """A param group mixing DTensor and plain parameters under max_grad_norm: each rank's norm
    of a plain tensor is not a share of the model's, and torch's clip_grad_norm_ refuses the
    mix (RuntimeError). fusedopt raised AttributeError reading a plain tensor's mesh; now
    torch's type, naming the parameter, before anything changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    a = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    b = nn.Parameter(torch.ones(3))
    a.grad, b.grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]), torch.ones(3)
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        torch.nn.utils.clip_grad_norm_([a, b], 1.0)
    for backend in [k for k, _ in _kinds(None, {})] + ["reference"]:
        opt = fusedopt.SGD([a, b], lr=0.1, momentum=0.9, max_grad_norm=1.0, backend=backend)
        with pytest.raises(RuntimeError, match=r"parameter 1 of its param group \(shape \(3,\)\) is a plain tensor"):
            opt.step()
        assert torch.equal(a.to_local(), torch.ones(2, 3)) and torch.equal(b.detach(), torch.ones(3))
        assert not opt.state[a] and not opt.state[b]


def test_max_grad_norm_refuses_plain_parameters_beside_dtensors_as_torch(pair):
    run(pair, "clip_refuses_plain_beside_dtensor")


def fsdp2_state_writes(rank):
    """Writes into opt.state[p] (in place, or by assigning DTensors or full tensors) reach
    the flat state the kernels read."""
    model = _sharded()
    params = list(model.parameters())
    opt = fusedopt.AdamW(params, lr=0.01)
    _train(model, opt, 1, rank)
    p = params[0]
    state = opt.state[p]
    before_sq = state["exp_avg_sq"].full_tensor()
    state["exp_avg"].mul_(2)                        # in place on the DTensor
    doubled = state["exp_avg"].full_tensor()
    state["exp_avg_sq"] = state["exp_avg_sq"] * 3   # a DTensor with the same placements
    state["exp_avg"] = doubled * 5                  # a plain tensor of the global shape
    opt.state[p] = {k: v for k, v in state.items()}  # a whole dict, as ZeRO does
    sd = opt.state_dict()["state"][0]
    assert torch.equal(sd["exp_avg"].full_tensor(), doubled * 5)
    assert torch.equal(sd["exp_avg_sq"].full_tensor(), before_sq * 3)
    local = opt.state[p]["exp_avg"].to_local()
    bucket = opt._group_buckets(0)[0]
    assert local.data_ptr() == bucket.view("exp_avg", 0).data_ptr() or local.numel() == 0


def test_fsdp2_state_writes_reach_the_flat_buffers(pair):
    run(pair, "fsdp2_state_writes")


def dtensor_placements(rank):
    """DTensor parameters as tensor parallelism makes them: sharded along another dim (an
    uneven split), and replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    placements = [[Shard(1)], [Replicate()], [Shard(0)]]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen), torch.randn(1, 4, generator=gen)]

    def make():
        return _dtensor_params(mesh, full, placements)

    for info, config in _rows(["AdamW", "SGD", "Adagrad", "RAdam"]):
        ref_params, params = make(), make()
        ref = info.torch(ref_params, **config)
        opt = info.fused(params, **config)
        _step_both(mesh, full, placements, (ref_params, ref.step), (params, opt.step))
        _close(f"{info.name} parameters", _full(params), _full(ref_params), rtol=info.rtol32, atol=1e-6)
        _close(f"{info.name} state", _full_state(opt, params), _full_state(ref, ref_params),
               rtol=info.rtol32, atol=1e-6)
        for p in params:
            for value in opt.state[p].values():
                if value.dim():
                    assert value.placements == p.placements and value.shape == p.shape, info.name

    # A gradient sharded unlike its parameter is refused, not paired element by element.
    p = make()[0]
    p.grad = distribute_tensor(torch.ones(5, 7), mesh, [Shard(0)], src_data_rank=None)
    try:
        fusedopt.SGD([p], lr=0.1).step()
    except RuntimeError as e:
        assert "placements" in str(e)
    else:
        raise AssertionError("a gradient with other placements was accepted")


def test_tensor_parallel_placements_match_torch(pair):
    run(pair, "dtensor_placements")


def _dtensor_params(mesh, full, placements):
    """Parameters distributed from the full tensors with the given placements."""
    from torch.distributed.tensor import distribute_tensor

    return [nn.Parameter(distribute_tensor(t.clone(), mesh, pl, src_data_rank=None)) for t, pl in zip(full, placements)]


def _step_both(mesh, full, placements, *runs, steps=3):
    """Give every run (its DTensor parameters, its step function) the same gradients,
    distributed like the parameters, and step them all, `steps` times."""
    from torch.distributed.tensor import distribute_tensor

    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        grads = [torch.randn(t.shape, generator=gen) for t in full]
        for params, step in runs:
            for p, g, pl in zip(params, grads, placements):
                p.grad = distribute_tensor(g, mesh, pl, src_data_rank=None)
            step()


def compiled_dtensor_step(rank):
    """A compiled function that steps DTensor parameters: the fusedopt::step op would need
    a sharding rule, so the step runs eagerly there (a graph break), with torch's numbers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    torch._dynamo.reset()
    mesh = init_device_mesh("cpu", (WORLD,))
    placements = [[Shard(0)], [Replicate()]]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen)]

    ref_params, params = _dtensor_params(mesh, full, placements), _dtensor_params(mesh, full, placements)
    ref = torch.optim.AdamW(ref_params, lr=0.01)
    opt = fusedopt.AdamW(params, lr=torch.tensor(0.01))
    _step_both(mesh, full, placements, (ref_params, ref.step), (params, torch.compile(opt.step, backend="aot_eager")))
    _close("parameters", _full(params), _full(ref_params))
    _close("state", _full_state(opt, params), _full_state(ref, ref_params))
    torch._dynamo.reset()


def test_compiled_step_on_dtensor_parameters_matches_torch(pair):
    run(pair, "compiled_dtensor_step")


# ------------------------------------------------------------------------ distributed checkpoint

def dcp_roundtrip(rank, path, names):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    for info, config in _rows(names):
        model = _sharded()
        opt = info.fused(model.parameters(), **config)
        _train(model, opt, 3, rank)

        # sharded: DTensors through torch.distributed.checkpoint
        sharded_dir = os.path.join(path, f"{info.name}-sharded")
        osd = get_optimizer_state_dict(model, opt)
        dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=sharded_dir)

        # full, offloaded to the CPU: a plain torch.save on rank 0
        full_file = os.path.join(path, f"{info.name}-full.pt")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_optimizer_state_dict(model, opt, options=options)
        full_model = get_model_state_dict(model, options=options)
        if rank == 0:
            assert full["state"], "rank 0 holds the full state"
            torch.save({"model": full_model, "optim": full}, full_file)
        dist.barrier()

        # A torch.optim run on the same trajectory gives the same full state dict.
        ref_model = _sharded()
        ref = info.torch(ref_model.parameters(), **config)
        _train(ref_model, ref, 3, rank)
        ref_full = get_optimizer_state_dict(ref_model, ref, options=options)
        if rank == 0:
            assert full["param_groups"] == ref_full["param_groups"], info.name
            assert list(full["state"]) == list(ref_full["state"]), info.name
            for fqn in ref_full["state"]:
                _close(f"{info.name} full state {fqn}", [full["state"][fqn][k] for k in ref_full["state"][fqn]],
                       list(ref_full["state"][fqn].values()), rtol=info.rtol32, atol=1e-6)

        # Load each into a fresh model and optimizer (no state yet: DCP materialises it
        # by a step at lr 0), resume, and compare with the run that never stopped.
        fresh = []
        for kind in ("sharded", "full"):
            m = _sharded(seed=1)
            o = info.fused(m.parameters(), **config)
            if kind == "sharded":
                msd, osd2 = get_model_state_dict(m), get_optimizer_state_dict(m, o)
                assert all(g["lr"] == config.get("lr", g["lr"]) for g in o.param_groups), "lr restored"
                dcp.load({"model": msd, "optim": osd2}, checkpoint_id=sharded_dir)
                set_model_state_dict(m, msd)
                set_optimizer_state_dict(m, o, osd2)
            else:
                loaded = torch.load(full_file, weights_only=True) if rank == 0 else {"model": {}, "optim": {}}
                load_options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
                set_model_state_dict(m, loaded["model"], options=load_options)
                set_optimizer_state_dict(m, o, loaded["optim"], options=load_options)
            fresh.append((kind, m, o))
        for kind, m, o in fresh:
            _equal(f"{info.name} {kind}: loaded parameters", _full(m.parameters()), _full(model.parameters()))
            _equal(f"{info.name} {kind}: loaded state", _full_state(o, list(m.parameters())),
                   _full_state(opt, list(model.parameters())))
        _train(model, opt, 2, rank, start=3)
        for kind, m, o in fresh:
            _train(m, o, 2, rank, start=3)
            _equal(f"{info.name} {kind}: resumed parameters", _full(m.parameters()), _full(model.parameters()))
            _equal(f"{info.name} {kind}: resumed state", _full_state(o, list(m.parameters())),
                   _full_state(opt, list(model.parameters())))


def dcp_materialise(rank):
    """DCP creates a fresh optimizer's state by a step at lr 0 (a CPU tensor for a tensor lr)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    for lr in (0.01, torch.tensor(0.01)):
        model = _sharded()
        before = _full(model.parameters())
        opt = fusedopt.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        osd = get_optimizer_state_dict(model, opt)
        assert opt.param_groups[0]["lr"] is lr
        _equal("parameters after DCP's step at lr 0", _full(model.parameters()), before)
        assert all(p.grad is None for p in model.parameters())
        for entry in osd["state"].values():
            assert int(entry["step"]) == 1 and entry["exp_avg"].full_tensor().abs().sum() == 0


def test_distributed_checkpoint_materialises_fresh_state_at_lr_zero(pair):
    run(pair, "dcp_materialise")


def test_distributed_checkpoint_sharded_and_full_roundtrip(pair, tmp_path):
    run(pair, "dcp_roundtrip", str(tmp_path), ["AdamW", "SGD", "RMSprop", "NAdam"])
