#!/usr/bin/env bash
# What a session with a lent GPU runs (README, "Speed", "GPU"), stage by stage, so that
# each stage fits one command of the device tool (10 minutes at most) and the logs come
# back even when one is cut off. Run from the repository root, with the machine's own
# python3 (its torch and triton; nothing is installed):
#
#     bash benchmarks/gpu_session.sh OUT [STAGE ...]
#
# Stages, in the order they pay off (default: all of them):
#   env        the GPU, driver, Python, torch and triton versions           -> OUT/env.txt
#   gpu-tests  what only a GPU shows, the tests marked `gpu` on compiled kernels: every
#              row against torch.optim on the GPU, random optimizer and averaged-model lifecycles,
#              CUDA-graph capture and replay, a second device                 -> OUT/gpu-tests.log
#   sweep      the block policy sweep (benchmarks/block_sweep.py; SWEEP_ARGS)  -> OUT/sweep/sweep.{json,md},
#              each configuration's runner output packed in OUT/sweep/configs.tar.gz
#   bench      the runner at full size, CUDA events; BENCH_ARGS (say "--cases few_large,gpt2_like")
#              splits it over commands, each with its own OUT               -> OUT/results.*
#   tests      the rest of the suite as CI runs it (Triton's interpreter, CPU tensors),
#              on the machine's own torch and triton                          -> OUT/tests.log
# Copy OUT to benchmarks/results/<gpu>/ and commit it with this command line. A device
# command brings back at most 8 files: give each command its own OUT, a stage or two each.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUT [STAGE ...]}
shift
stages=${*:-env gpu-tests sweep bench tests}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Nothing is installed on the lent machine: scripts run by path (benchmarks/block_sweep.py)
# import fusedopt from the checkout. Compiled kernels and the default path, whatever the
# caller's environment says (an interpreter or a backend override would time something else).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FUSEDOPT_BACKEND FUSEDOPT_TEST_COMPILED
mkdir -p "$out"
status=0
for stage in $stages; do
    case $stage in
        env)
            { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
              $py -c 'import platform, torch, triton; print("python", platform.python_version(), "torch", torch.__version__,
"triton", triton.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
            } 2>&1 | tee "$out/env.txt" ;;
        gpu-tests)
            FUSEDOPT_TEST_COMPILED=1 $py -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests 2>&1 | tee "$out/gpu-tests.log" ;;
        tests)
            $py -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" ;;
        sweep)
            # shellcheck disable=SC2086 # (SWEEP_ARGS: say "--configs 4x1,4x2", to split it)
            $py benchmarks/block_sweep.py --out "$out/sweep" ${SWEEP_ARGS:-} 2>&1 | tee "$out/sweep.log"
            rc=$?
            # one file for the configurations' own outputs (3 files each), so that the
            # summaries come back within the device's 8 files
            (cd "$out/sweep" && configs=$(find . -mindepth 1 -maxdepth 1 -type d -printf '%f\n') \
                && [ -n "$configs" ] && tar -czf configs.tar.gz $configs && rm -rf $configs)
            (exit $rc) ;;
        bench)
            # shellcheck disable=SC2086 # (BENCH_ARGS is a list of options)
            $py -m fusedopt.bench --device cuda --out "$out" --no-progress ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" ;;
        *)
            echo "unknown stage: $stage (env, gpu-tests, tests, sweep, bench)" >&2
            exit 2 ;;
    esac
    rc=$?
    echo "stage $stage: exit $rc" | tee -a "$out/stages.txt"
    [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
