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
#   sweep      the block policy sweep (benchmarks/block_sweep.py)             -> OUT/sweep/
#   bench      the runner at full size, CUDA events                           -> OUT/results.*
#   tests      the rest of the suite as CI runs it (Triton's interpreter, CPU tensors),
#              on the machine's own torch and triton                          -> OUT/tests.log
# Copy OUT to benchmarks/results/<gpu>/ and commit it with this command line.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUT [STAGE ...]}
shift
stages=${*:-env gpu-tests sweep bench tests}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
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
            $py benchmarks/block_sweep.py --out "$out/sweep" 2>&1 | tee "$out/sweep.log" ;;
        bench)
            $py -m fusedopt.bench --device cuda --out "$out" --no-progress 2>&1 | tee "$out/bench.log" ;;
        *)
            echo "unknown stage: $stage (env, gpu-tests, tests, sweep, bench)" >&2
            exit 2 ;;
    esac
    rc=$?
    echo "stage $stage: exit $rc" | tee -a "$out/stages.txt"
    [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
