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
source "$(dirname "$0")/gpu_budget.sh" || exit 2
run_within_budget gpu_row 420 "[--mode M | --check-rows FILE] [--budget-seconds S] [--smoke]" "$@"
