#!/usr/bin/env bash
# One full-length seed row on a GPU in one call (see benchmarks/gpu_row.py): ResNet-preact-20, CIFAR-10, 200
# epochs, evaluated and recorded. Writes OUT_DIR/gpu_row.json, OUT_DIR/gpu_row.log, OUT_DIR/train.log, OUT_DIR/run/
# and OUT_DIR/results/ (the record and its weights, also written to results/). Exit 0 recorded, 3 stopped because
# the first epochs projected past the budget, 1 failed, 2 could not start.
#
#   benchmarks/gpu_row.sh OUT_DIR                                   # at most 7 minutes, all included
#   benchmarks/gpu_row.sh OUT_DIR --check-rows CHECK/gpu_check.jsonl   # the fastest mode the check saw work
#   benchmarks/gpu_row.sh OUT_DIR --mode reduce-overhead            # or name it
#   benchmarks/gpu_row.sh OUT_DIR --smoke                           # a CPU, seconds (the tests run this)
set -uo pipefail
started=$(date +%s)
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: benchmarks/gpu_row.sh OUT_DIR [--mode M | --check-rows FILE] [--budget-seconds S] [--smoke]" >&2
    exit 2
fi
out=$1
shift
budget=420
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[i]}" = "--budget-seconds" ]; then budget=${args[i + 1]:-420}; fi
done
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2
source benchmarks/gpu_env.sh
left=$((budget - ($(date +%s) - started)))
# gpu_row.py stops the training itself when it projects past the budget; `timeout` is the backstop (it signals
# its whole process group, the training included, which checkpoints on SIGTERM).
timeout --signal=TERM --kill-after=5 "$((left - 5))" \
    "$python" benchmarks/gpu_row.py --out "$out" --started "$started" --budget-seconds "$budget" "$@" 2>&1 |
    tee "$out/gpu_row.log"
exit "${PIPESTATUS[0]}"
