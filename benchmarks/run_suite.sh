#!/usr/bin/env bash
# Run the benchmark suite and keep its JSON under benchmarks/results/, named after the machine,
# then print the table as markdown (for benchmarks/README.md).
#
#   benchmarks/run_suite.sh --quick                 # cpu-<cpu>-<cores>core-quick.json
#   benchmarks/run_suite.sh --small                 # cpu-<cpu>-<cores>core-small.json
#   benchmarks/run_suite.sh                         # the full suite (28 cases)
#   benchmarks/run_suite.sh --device cuda           # cuda-<gpu>-full.json
#
# Any option of `batchnorm bench` may be passed except --json. PYTHON picks the interpreter
# (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[[ -x $py ]] || py=python3

suite=full
device=cpu
prev=
for arg in "$@"; do
    [[ $arg == --quick ]] && suite=quick
    [[ $arg == --small ]] && suite=small
    [[ $prev == --device ]] && device=$arg
    [[ $arg == --device=* ]] && device=${arg#--device=}
    [[ $arg == --json* ]] && { echo "run_suite.sh chooses the JSON path itself; drop --json" >&2; exit 2; }
    prev=$arg
done

machine=$("$py" - "$device" <<'PY'
import os, re, sys
import torch
from batchnorm.bench import _cpu_name
device = sys.argv[1]
slug = lambda s: re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
if device.startswith("cuda") and torch.cuda.is_available():
    print("cuda-" + slug(torch.cuda.get_device_name(torch.device(device))))
else:
    print(f"cpu-{slug(_cpu_name())}-{os.cpu_count()}core")
PY
)
out=benchmarks/results/$machine-$suite.json

echo "+ $py -m batchnorm.bench $* --json $out" >&2
"$py" -m batchnorm.bench "$@" --json "$out"
echo
"$py" -c 'import json, sys; from batchnorm.bench import markdown; print(markdown(json.load(open(sys.argv[1]))), end="")' "$out"
