"""The benchmark runner's smoke run: `python -m fusedopt.bench --quick` on tiny shapes
writes the rows and fields it promises. Nothing here looks at timings."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fusedopt
from fusedopt import bench

ALGORITHMS = ["Adam", "SGD-momentum", "NAdam", "AveragedModel-EMA"]
DTYPES = ["fp32", "bf16"]


def test_bytes_per_element_is_what_each_algorithm_must_move():
    fp32 = {"SGD": 12, "SGD-momentum": 20, "Adam": 28, "AdamW": 28, "NAdam": 28, "RAdam": 28, "Adamax": 28,
            "Adadelta": 28, "Rprop": 28, "Adam-amsgrad": 36, "Adagrad": 20, "RMSprop": 20,
            "RMSprop-momentum": 28, "RMSprop-centered": 36, "ASGD": 16}   # (ASGD's ax: written, not read)
    for a in bench.ALGORITHMS:
        assert bench.bytes_per_element(a.cls, a.options, torch.float32) == fp32[a.name], a.name
        # bf16 parameters with bf16 state (torch's and fusedopt's choice) move half
        assert bench.bytes_per_element(a.cls, a.options, torch.bfloat16) == fp32[a.name] // 2, a.name
    # bf16 parameters with fp32 state: p, g read and p written in bf16, state in fp32
    assert bench.bytes_per_element("Adam", {}, torch.bfloat16, torch.float32) == 3 * 2 + 4 * 4
    assert bench.bytes_per_element("AveragedModel", {}, torch.float32) == 12


def test_quick_run_writes_every_row_and_field(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fusedopt.bench", "--quick", "--device", "cpu", "--no-progress",
         "--algorithms", ",".join(ALGORITHMS), "--dtypes", ",".join(DTYPES), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, FUSEDOPT_BACKEND=""))
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    meta = results["meta"]
    for field in ("device", "device_name", "torch", "triton", "threads", "command", "copy_gbps", "settings"):
        assert field in meta, field
    assert meta["copy_gbps"] > 0
    algorithms = [a for a in ALGORITHMS if meta["averaged_model"] or not a.startswith("AveragedModel")]
    rows = {(r["case"], r["algorithm"], r["dtype"]): r for r in results["rows"]}
    expected = {(c, a, d) for c in ("few_large", "gpt2_like", "resnet50_like", "tiny_many") for a in algorithms
                for d in ("float32", "bfloat16")}
    assert set(rows) == expected
    for key, r in rows.items():
        for field in ("tensors", "elements", "bytes_per_element", "paths", "torch_best", "torch_best_ms", "ratio",
                      "gbps", "fusedopt_path"):
            assert field in r, (key, field)
        assert set(r["paths"]) == {"forloop", "foreach", "fused", "fusedopt"}
        assert r["paths"]["fusedopt"]["ms"] > 0 and r["paths"]["fusedopt"]["agrees"], key
        assert r["ratio"] is not None and r["gbps"] > 0, key
        low, high = r["ratio_quartiles"]
        assert low <= r["ratio"] <= high, key
        assert "samples_ms" not in r["paths"]["fusedopt"], key   # per-round times stay out of the file
        if r["algorithm"].startswith("AveragedModel"):
            continue
        assert r["fusedopt_path"] == "native", key      # 'auto' on a CPU
        assert r["paths"]["forloop"]["agrees"], key
    assert rows[("tiny_many", "Adam", "float32")]["bytes_per_element"] == 28
    assert rows[("tiny_many", "Adam", "bfloat16")]["bytes_per_element"] == 14
    assert rows[("tiny_many", "Adam", "float32")]["tensors"] == 200
    # torch's fused SGD leaves bf16 parameters where they were (torch 2.13): the runner
    # must not count it as torch's fastest.
    sgd_bf16 = rows[("few_large", "SGD-momentum", "bfloat16")]
    if sgd_bf16["paths"]["fused"].get("ms") is not None and not sgd_bf16["paths"]["fused"]["agrees"]:
        assert sgd_bf16["torch_best"] != "fused"
    assert "vs fastest" in out.stdout
    assert "| Adam |" in (tmp_path / "results.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results.png").stat().st_size > 0


def test_the_ratio_pairs_each_round():
    """Rounds slowed alike (a burst of another job) leave the ratio alone: fusedopt took half
    torch's time in every round, though the median of its times is twice torch's median."""
    timings = {"fusedopt": dict(ms=10.0, samples_ms=[1.0, 10.0, 10.0]),
               "fused": dict(ms=5.0, samples_ms=[2.0, 20.0, 20.0 / 4])}
    row = bench._finish(dict(bytes_per_element=28, elements=1000), timings, {"fusedopt": 0.0, "fused": 0.0}, {})
    assert row["torch_best"] == "fused"
    assert row["ratio"] == 0.5
    assert row["ratio_quartiles"] == [0.5, 1.25]
    assert "samples_ms" not in row["paths"]["fused"]


def test_a_fusedopt_that_disagrees_with_torch_is_marked_in_the_summary_and_left_out_of_the_plot():
    """The table marked such a time with `!`, but the summary (the README's table) showed its
    ratio as a plain speed-up, and the plot drew it: the compiled kernels have yet to run on
    a GPU, where wrong numbers would first show."""
    timings = {"fusedopt": dict(ms=1.0, samples_ms=[1.0]), "fused": dict(ms=2.0, samples_ms=[2.0])}
    row = bench._finish(dict(case="few_large", algorithm="Adam", dtype="float32", bytes_per_element=28,
                             elements=1000), timings, {"fusedopt": 0.9, "fused": 0.0}, {})
    assert row["fusedopt_agrees"] is False and row["ratio"] == 0.5
    results = {"meta": {}, "rows": [row]}
    assert "0.50x! (1 ms)" in bench.summary(results)


def test_a_path_or_a_row_that_fails_is_noted_and_the_run_goes_on(tmp_path, monkeypatch):
    """One failure (a compile error, a kernel that raises) lost the whole run: only the rows
    before it reached results.json, and no results.md or plot were written. A failing
    first step is noted in its path; a row that raises is kept as a failed row."""
    real_measure = bench.measure

    def failing_step(self, closure=None):
        raise ValueError("a compile error stands in here")

    def measure(fns, timer, s):
        if "fusedopt" in fns and getattr(measure, "rows", 0) == 0:   # the Adam row (SGD's fusedopt failed)
            measure.rows = 1
            raise KeyError("a timing failure")
        return real_measure(fns, timer, s)

    monkeypatch.setattr(fusedopt.SGD, "step", failing_step)
    monkeypatch.setattr(bench, "measure", measure)
    results = bench.main(["--quick", "--device", "cpu", "--no-progress", "--algorithms", "SGD,Adam,Adagrad",
                          "--cases", "tiny_many", "--dtypes", "fp32", "--out", str(tmp_path)])
    rows = {r["algorithm"]: r for r in results["rows"]}
    assert set(rows) == {"SGD", "Adam", "Adagrad"}
    assert rows["SGD"]["fusedopt_path"] == "failed" and rows["SGD"]["ratio"] is None
    assert "ValueError: a compile error stands in here" in rows["SGD"]["paths"]["fusedopt"]["note"]
    assert rows["SGD"]["paths"]["forloop"]["ms"] > 0   # torch's paths were still timed
    assert "KeyError" in rows["Adam"]["error"] and rows["Adam"]["fusedopt_path"] == "error"
    assert rows["Adagrad"]["ratio"] > 0
    assert sum(r["ratio"] is not None for r in results["rows"]) == 1
    assert (tmp_path / "results.md").exists() and len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 3


def test_bytes_per_element_of_the_fusedopt_only_modes():
    modes = {m.name: m for m in bench.MODES}
    bpe = lambda name, dtype: bench.bytes_per_element(modes[name].cls, modes[name].options, dtype,  # noqa: E731
                                                      fused_options=modes[name].fused_options, ema=modes[name].ema)
    # g 2 + master 4+4 + p read (to see writes since the last step) and written 2+2 + fp32 moments 16
    assert bpe("AdamW-master", torch.bfloat16) == 30
    assert bpe("AdamW-master", torch.float32) == 28     # fp32 parameters have no master copy
    assert bpe("AdamW-bf16-state", torch.float32) == 20
    assert bpe("AdamW-sr", torch.bfloat16) == 14
    assert bpe("AdamW-clip", torch.float32) == 32        # the norm reads the gradient once more
    assert bpe("AdamW-ema", torch.float32) == 36         # the average read and written, not the parameter
    assert bpe("AdamW-ema", torch.bfloat16) == 18


def test_block_sweep_runs_each_configuration(tmp_path):
    """benchmarks/block_sweep.py (the GPU tuning tool) on the CPU at smoke size: a figure per
    configuration for every runner row, and the block policy restored afterwards."""
    import importlib.util

    from fusedopt.kernels import _launch

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "block_sweep.py")
    spec = importlib.util.spec_from_file_location("block_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    before = (_launch.NUM_WARPS, _launch.VECTORS_PER_THREAD)
    result = sweep.main(["--quick", "--device", "cpu", "--algorithms", "Adam,SGD", "--cases", "tiny_many",
                         "--dtypes", "fp32", "--configs", "4x2,8x1", "--out", str(tmp_path)])
    assert (_launch.NUM_WARPS, _launch.VECTORS_PER_THREAD) == before
    assert {(r["algorithm"], r["dtype"]) for r in result["rows"]} == {("Adam", "float32"), ("SGD", "float32")}
    for row in result["rows"]:
        assert set(row["gbps"]) == {"4x2", "8x1"} and all(v > 0 for v in row["gbps"].values())
    assert (tmp_path / "sweep.md").read_text().count("| tiny_many |") == 2


def test_master_weight_row_runs_torchs_recipe_to_the_same_numbers():
    """The AdamW-master row's torch paths step fp32 copies of the bf16 parameters and round
    them back (what a torch.optim user writes for master weights): after a few steps every
    path holds fusedopt's parameters, to bf16 rounding, and has moved them."""
    mode = next(m for m in bench.MODES if m.name == "AdamW-master")
    base = bench._bench_shapes.make([(300,), (17, 5)], torch.bfloat16)
    start = [p.detach().clone() for p in base]
    ours = bench._clone(base)
    opt = getattr(__import__("fusedopt"), mode.cls)(ours, **mode.options, **mode.fused_options)
    recipes = {name: (ps := bench._clone(base), bench._MasterRecipe(torch.optim.AdamW, ps, mode.options, name))
               for name in bench.TORCH_PATHS}
    for _ in range(5):
        opt.step()
        for _, recipe in recipes.values():
            recipe.step()
    for name, (ps, recipe) in recipes.items():
        for a, b, m, s in zip(ps, ours, recipe.masters, start):
            assert a.dtype == torch.bfloat16 and not torch.equal(a, s), name
            assert torch.equal(a, m.to(torch.bfloat16)), name
            torch.testing.assert_close(a, b, rtol=2 ** -7, atol=0, msg=name)
    assert bench._mismatch(recipes["fused"][0], ours, start) == 0


def test_loop_window_script_measures_both_paths_on_the_same_work(tmp_path):
    """benchmarks/loop_window.py (the figures behind `_native.LOOP_WINDOW`) at a tiny size:
    a row per algorithm and size, naming what the window chooses now, with both of torch's
    paths having stepped the same tensors to the same numbers (RMSprop's two paths agree
    bitwise in fp32)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "loop_window.py")
    spec = importlib.util.spec_from_file_location("loop_window", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "loop_window.md"
    rows = script.main(["--algorithms", "RMSprop,Adamax", "--sizes", "4,1024", "--rounds", "3", "--total-mb", "1",
                        "--evict-mb", "1", "--out", str(out)])
    assert [(r["algorithm"], r["kb"]) for r in rows] == [("RMSprop", 4), ("RMSprop", 1024), ("Adamax", 4),
                                                         ("Adamax", 1024)]
    assert [r["window"] for r in rows] == ["multi-tensor", "for-loop", "multi-tensor", "for-loop"]
    assert all(r["ratio"] > 0 and r["q1"] <= r["q3"] for r in rows)
    assert all(r["same"] for r in rows if r["algorithm"] == "RMSprop")
    table = out.read_text()
    assert "--algorithms RMSprop,Adamax" in table and table.count("| RMSprop |") == 2 and "| Adamax | 1024 KB |" in table


def test_configurations_script_times_the_same_work_on_every_path(tmp_path):
    """benchmarks/configurations.py (frozen layers, a group per layer, channels_last,
    load_state_dict) at smoke size: a row per configuration and algorithm, every torch path
    it times having given fusedopt's parameters (torch's fused SGD to the bit)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configurations.py")
    spec = importlib.util.spec_from_file_location("configurations", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "configurations.md"
    rows = script.main(["--size", "quick", "--rounds", "3", "--out", str(out)])
    assert len(rows) == 4 * len(script.ALGORITHMS) + 1
    assert all(r["ratio"] > 0 and r["q1"] <= r["q3"] and r["skipped"] == "-" for r in rows)
    assert all("fused" in r["bitwise"].split(",") for r in rows if r["algorithm"] == "SGD")
    assert out.read_text().count("| SGD |") == 4
