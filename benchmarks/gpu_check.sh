#!/usr/bin/env bash
# The GPU checks of issue 3 as prepared runs, for a session lent a GPU for a few minutes (the device
# tool: one command of at most 10 minutes, about 15 minutes of device time in all):
#
#   bash benchmarks/gpu_check.sh quick   # the Triton kernels' tests and the layers' parity on the Triton
#                                        # path, on the GPU, then `batchnorm bench --device cuda --quick`
#   bash benchmarks/gpu_check.sh paths   # the training step's split and whole-channel paths against
#                                        # torch's kernel (benchmarks/triton_paths.py): the path rule
#   bash benchmarks/gpu_check.sh full    # the full bench suite (28 cases): the issue's GPU targets
#
# In that order where the lease allows. Each step has a time limit (in all at most 560 s for quick,
# 300 s for paths, 540 s for full), so a slow step leaves the others their time and the run ends
# inside the tool's 600 s; the bench runs without torch.compile, whose compile times would eat the
# lease. Logs and the JSON go to $OUT (the device tool's folder that comes back), else
# /tmp/gpu_check: machine.txt, tests.log, bench.log, paths.log, cuda-<gpu>-<suite>.json. The exit
# status is the first failing step's. Runs from the checkout without installing it
# (PYTHONPATH=src): the GPU machines' python3 has torch, triton, typer, rich and pytest. PYTHON
# picks another interpreter. Nobody has run it on a GPU yet: its limits are
# estimates (the kernels' first compiles dominate).
set -uo pipefail
cd "$(dirname "$0")/.."
suite=${1:-quick}
[[ $suite == quick || $suite == paths || $suite == full ]] || { echo "usage: $0 quick|paths|full" >&2; exit 2; }
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Compiled kernels (Triton's, and the CPU kernel's) in an ignored folder of the checkout: the device
# tool keeps ignored files between calls on a warm machine, so a second mode after the first
# reuses the first's compiles instead of paying them again out of the lease.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.gpu-cache/triton} BATCHNORM_CACHE=${BATCHNORM_CACHE:-$PWD/.gpu-cache/cpu}
status=0

step() {  # step LIMIT_S LOG COMMAND...: run with a time limit, output to the screen and LOG
    local limit=$1 log=$2
    shift 2
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc after $((SECONDS - start))s" | tee -a "$log"
    ((status == 0 && rc != 0)) && status=$rc
    return 0
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
    "$py" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("no triton:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
else:
    print("no CUDA device: the checks below need one")
PY
} 2>&1 | tee "$out/machine.txt"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || exit 2

if [[ $suite == quick ]]; then
    # The kernels (the file's tests but the `gpu`-marked ones, then those: larger shapes, and of the
    # other files training steps under the sync debug mode), the layers' parity on the Triton path,
    # every backend's parity, the fused BN + ReLU layers.
    step 150 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_triton_kernels.py
    step 140 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_kernels.py \
        tests/test_act.py tests/test_errors.py
    step 120 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -k "triton or gpu" \
        tests/test_parity.py tests/test_backends.py tests/test_act.py
fi

gpu=$("$py" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
if [[ $suite == paths ]]; then
    step 300 "$out/paths.log" "$py" benchmarks/triton_paths.py --json "$out/cuda-$gpu-paths.json"
    exit $status
fi
flags=(--device cuda --no-compile --json "$out/cuda-$gpu-$suite.json")
[[ $suite == quick ]] && flags+=(--quick)
step $([[ $suite == quick ]] && echo 150 || echo 540) "$out/bench.log" "$py" -m batchnorm.bench "${flags[@]}"
exit $status
