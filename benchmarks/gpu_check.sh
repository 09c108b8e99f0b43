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
source "$(dirname "$0")/gpu_budget.sh" || exit 2
run_within_budget gpu_check 240 "[--smoke] [--budget-seconds S] [gpu_check.py options]" "$@"
