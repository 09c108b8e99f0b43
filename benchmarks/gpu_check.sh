#!/usr/bin/env bash
# The one-call GPU check (see benchmarks/gpu_check.py): writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log.
#
#   benchmarks/gpu_check.sh OUT_DIR            # a machine with a CUDA GPU; under 8 minutes on one H200
#   benchmarks/gpu_check.sh OUT_DIR --smoke    # any machine, a few seconds on a CPU (the test suite runs this)
#
# On a machine without `datasets` (and without internet), put its wheels in .gpu/wheels and a copy of
# CIFAR-10 in the Hub's layout in .gpu/cifar10 (both ignored by git); the script installs the wheels into
# .gpu/site and puts them on PYTHONPATH. Extra arguments go to gpu_check.py.
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: benchmarks/gpu_check.sh OUT_DIR [--smoke] [gpu_check.py options]" >&2
    exit 2
fi
out=$1
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import datasets" 2>/dev/null; then
    if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
        echo "error: datasets is not installed and .gpu/wheels holds no wheels to install it from" >&2
        exit 2
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/wheels/*.whl || exit 2
    export PYTHONPATH="$PWD/.gpu/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1
"$python" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
