# Sourced by gpu_check.sh and gpu_row.sh: run benchmarks/<name>.py within a time budget counted from the
# calling script's start, installs included (gpu_env.sh), with `timeout` as the backstop 5 s inside it.
#
#   run_within_budget NAME DEFAULT_BUDGET USAGE OUT_DIR [options...]
#
# The Python script keeps to the budget itself (entry by entry, or by projecting the run); `timeout` signals the
# whole process group if it does not (a training run checkpoints on SIGTERM; rows already written stay on disk).
run_within_budget() {
    local name=$1 budget=$2 usage=$3 started
    shift 3
    started=$(date +%s)
    if [ $# -lt 1 ] || [[ $1 == -* ]]; then
        echo "usage: benchmarks/$name.sh OUT_DIR $usage" >&2
        return 2
    fi
    local out=$1
    shift
    local args=("$@") i
    for ((i = 0; i < ${#args[@]}; i++)); do
        if [ "${args[i]}" = "--budget-seconds" ]; then budget=${args[i + 1]:-$budget}; fi
    done
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 2
    mkdir -p "$out" || return 2
    source benchmarks/gpu_env.sh || return 2
    local left=$((budget - ($(date +%s) - started)))
    timeout --signal=TERM --kill-after=5 "$((left - 5))" \
        "$python" "benchmarks/$name.py" --out "$out" --started "$started" --budget-seconds "$budget" "$@" 2>&1 |
        tee "$out/$name.log"
    return "${PIPESTATUS[0]}"
}
