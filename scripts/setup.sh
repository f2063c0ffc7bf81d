#!/usr/bin/env bash
# Set up a virtual environment in .venv with batchnorm installed (editable).
#
#   bash scripts/setup.sh          # the library, the command line and the lab
#   bash scripts/setup.sh --dev    # also the test tools
#
# torch comes first, as the CPU wheel torch==2.13.0: a bare `torch`
# requirement on Linux pulls a CUDA build of several GB. If torch is already
# importable in .venv it is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="lab"
[ "${1:-}" = "--dev" ] && extras="lab,dev"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/python -m pip"

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing the CPU build of torch 2.13.0"
    $pip install --quiet "torch==2.13.0"
fi
echo "setup: installing batchnorm[$extras]"
$pip install --quiet -e ".[$extras]"
echo "setup: done; run .venv/bin/batchnorm --help"
