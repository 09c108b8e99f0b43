#!/usr/bin/env bash
# The one-call GPU check (see benchmarks/gpu_check.py): rows in OUT_DIR/gpu_check.jsonl, the output in
# OUT_DIR/gpu_check.log. Exit 0 when no entry failed, 1 when one did, 2 when it could not start.
#
#   benchmarks/gpu_check.sh OUT_DIR                        # a CUDA machine: at most 4 minutes, all included
#   benchmarks/gpu_check.sh OUT_DIR --budget-seconds 600   # a longer window: more entries fit
#   benchmarks/gpu_check.sh OUT_DIR --smoke                # any machine, seconds on a CPU (the tests run this)
#
# Offline: CIFAR-10 in the Hub's layout in .gpu/cifar10 (or --dataset DIR) and, for what the machine lacks
# (datasets, an old timm), wheels in .gpu/wheels; both folders are ignored by git (see the README's GPU section).
set -uo pipefail
started=$(date +%s)
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: benchmarks/gpu_check.sh OUT_DIR [--smoke] [--budget-seconds S] [gpu_check.py options]" >&2
    exit 2
fi
out=$1
shift
budget=240
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[i]}" = "--budget-seconds" ]; then budget=${args[i + 1]:-240}; fi
done
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2
source benchmarks/gpu_env.sh
left=$((budget - ($(date +%s) - started)))
# The check keeps to its budget entry by entry; `timeout` is the backstop for an entry that overruns its estimate
# (rows already measured are on disk either way).
timeout --signal=TERM --kill-after=5 "$((left - 5))" \
    "$python" benchmarks/gpu_check.py --out "$out" --started "$started" --budget-seconds "$budget" "$@" 2>&1 |
    tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
