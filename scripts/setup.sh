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
if [ "$extras" = "lab,dev" ] && ! command -v chromium >/dev/null 2>&1; then
    # The report test opens the lab's page in a real headless browser; it
    # skips (with a message) where none can be installed.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian's chromium for the report test"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
            >/dev/null 2>&1 || echo "setup: chromium could not be installed; the browser test will skip"
    fi
fi
# Build the CPU kernel now (once per machine, ~15 s with its C++ entry points) rather than in
# the first call; if it cannot be built, say why: batchnorm then runs on torch's ops.
echo "setup: building the CPU kernel"
.venv/bin/python - <<'PY'
from batchnorm.kernels import cpu
if cpu.extension() is None:
    print("setup: note:", cpu.why_unavailable() or cpu.extension_why_unavailable())
PY
echo "setup: done; run .venv/bin/batchnorm --help"
