"""`python -m cifar_train.sweep`: recipes, seed-table rows or a grid, times seeds, on this machine or on Slurm.

    python -m cifar_train.sweep recipes/cifar10/resnet110.toml --seeds 0 1 2
    python -m cifar_train.sweep recipes/a.toml recipes/b.toml --grid optim.lr=0.1,0.2 --seeds 0 1 --set train.epochs=15
    python -m cifar_train.sweep --table "Fashion-MNIST" --rows 1 3 --seeds 0 1 2 --dry-run
    python -m cifar_train.sweep --table "Fashion-MNIST" --seeds 0 1 2 --executor slurm --partition gpu \\
        --gpus-per-node 1 --time 4:00:00 --array-parallelism 16
    python -m cifar_train.sweep status --table "Fashion-MNIST" --seeds 0 1 2      # a sweep under way

Each run is `train_accelerate.py RECIPE --set train.seed=S [--set ...] --output-dir <runs-dir>/<name>` (see
`plan.py` for the names), its output in `<run dir>.log`. Called again, a sweep skips finished runs, continues
checkpointed ones (`--resume`) and never starts a run whose directory is locked or whose Slurm job is queued. A
failed run is reported with its log and the others go on; at the end every finished run is recorded in
`results/` (see `cifar_train.records`). `--dry-run` lists every run (directory, state, command) and starts nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from ..records import RESULTS_DIR, collect

__all__ = ["main"]

ACTIONS = {
    "finished": "finished, skipping",
    "checkpointed": "continuing from its newest checkpoint",
    "new": "starting",
    "running": "running elsewhere, not started twice",
    "queued": "has a Slurm job queued or running, not submitted again",
}
TABLES_DEFAULT = RESULTS_DIR / "seed_tables.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_train.sweep",
        usage="%(prog)s [status] [RECIPE ...] [--table HEADING [--rows R ...]] [--grid KEY=V1,V2 ...] --seeds S ...",
        description=__doc__.splitlines()[0],
        epilog="`status` first: show every run's state (and Slurm job) for a sweep under way; starts nothing.",
    )
    what = parser.add_argument_group("what to run")
    what.add_argument("recipes", nargs="*", metavar="RECIPE", help="TOML recipes, e.g. recipes/cifar10/resnet110.toml")
    what.add_argument("--table", metavar="HEADING", help="the rows of this table of --tables (its heading)")
    what.add_argument("--rows", nargs="+", default=[], metavar="R", help="with --table: rows by number (1..) or label")
    what.add_argument("--tables", default=str(TABLES_DEFAULT), help="seed tables (default: results/seed_tables.toml)")
    what.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="every combination of these values (repeat)"
    )
    what.add_argument("--seeds", nargs="+", type=int, required=True, metavar="S", help="one run per seed")
    what.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to every run"
    )
    what.add_argument("--runs-dir", default="runs", help="where the run directories go (default: runs)")
    what.add_argument("--results", default=str(RESULTS_DIR), help="records folder (default: results/)")
    what.add_argument(
        "--with-weights",
        action="store_true",
        help="records also copy each run's weights, config and card to <results>/weights/ (at most 8 MiB of weights)",
    )
    what.add_argument("--dry-run", action="store_true", help="list every run (directory, state, command); run nothing")
    where = parser.add_argument_group("where it runs")
    where.add_argument("--executor", choices=("local", "slurm"), default="local", help="this machine, or Slurm jobs")
    where.add_argument(
        "--launcher", choices=("auto", "python", "accelerate"), default="auto", help="local: accelerate with a GPU"
    )
    where.add_argument("--gpus", nargs="+", metavar="ID", help="local: GPUs to spread the runs over (default: all)")
    slurm = parser.add_argument_group("Slurm (--executor slurm, through submitit)")
    slurm.add_argument("--partition", help="partition to submit to (default: the cluster's)")
    slurm.add_argument("--time", default="240", help="time limit per job: minutes or [days-]H:MM:SS (default: 240)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per job, one launcher per node (default: 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one process each (0: one CPU one)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per node's task")
    slurm.add_argument("--account", help="passed to sbatch")
    slurm.add_argument("--qos", help="passed to sbatch")
    slurm.add_argument("--constraint", help="passed to sbatch")
    slurm.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE", help="any sbatch option")
    slurm.add_argument("--array-parallelism", type=int, default=256, help="jobs of the array running at once")
    slurm.add_argument(
        "--signal-delay", type=int, default=120, help="seconds before the time limit when jobs checkpoint and requeue"
    )
    slurm.add_argument("--max-timeouts", type=int, default=100, help="requeues after time limits per job")
    slurm.add_argument("--no-wait", action="store_true", help="submit and return; the sweep again records them")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    status_view = bool(argv) and argv[0] == "status"
    args = _parser().parse_args(argv[1:] if status_view else argv)
    return guarded(lambda: _sweep(args, status_view), debug=args.debug)


# --------------------------------------------------------------------------------------------------------------


def _runs(args: argparse.Namespace) -> list:
    from .plan import expand, recipe_targets, table_targets

    if args.rows and not args.table:
        raise UserError("--rows needs --table HEADING")
    if not args.recipes and not args.table:
        raise UserError("say what to run: RECIPE files, or --table HEADING (see --help)")
    if Path(args.runs_dir).is_file():
        raise UserError(f"--runs-dir {args.runs_dir!r} is a file; give a folder")
    targets = recipe_targets(args.recipes)
    if args.table:
        targets += table_targets(args.tables, args.table, args.rows)
    return expand(targets, args.grid, args.overrides, args.seeds, Path(args.runs_dir))


def _slurm_options(args: argparse.Namespace):
    from .slurm import SlurmOptions, parse_time

    extra = {}
    for item in args.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-option {item!r}: give an sbatch option as KEY=VALUE, e.g. mem=32G")
        extra[key.strip().lstrip("-").replace("-", "_")] = value
    for name in ("nodes", "array_parallelism", "signal_delay", "max_timeouts"):
        if getattr(args, name) < (0 if name == "max_timeouts" else 1):
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: give a positive number")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {args.gpus_per_node}: give 0 (CPU) or more")
    return SlurmOptions(
        time_min=parse_time(args.time),
        partition=args.partition,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        array_parallelism=args.array_parallelism,
        signal_delay_s=args.signal_delay,
        max_timeouts=args.max_timeouts,
        extra=extra,
    )


def _states(runs: list) -> list[tuple]:
    """(run, state, Slurm job record or None, the job's Slurm state or None) per run."""
    from .plan import state
    from .slurm import JOBS_DIR, live_jobs, read_job

    records = {run: read_job(run) for run in runs} if any((r.run_dir.parent / JOBS_DIR).is_dir() for r in runs) else {}
    known = live_jobs() if any(records.values()) else {}
    rows = []
    for run in runs:
        job = records.get(run)
        slurm_state = (known or {}).get(job["job_id"]) if job else None
        rows.append((run, state(run), job, slurm_state))
    return rows


def _queued(slurm_state: str | None) -> bool:
    """A Slurm job state of a job not ended: pending, running, requeued, suspended..."""
    from .slurm import ENDED

    return bool(slurm_state) and slurm_state not in ENDED


def _show(rows: list[tuple], commands: dict | None) -> None:
    for run, current, job, job_state in rows:
        slurm = f"; Slurm job {job['job_id']} {job_state or 'ended'}" if job else ""
        print(f"{run.run_dir}  {current}{slurm}  [{run.label or Path(run.recipe).name}, seed {run.seed}]")
        if commands is not None and run in commands:
            print(f"    {' '.join(commands[run])}")
        elif commands is None and run.log.is_file() and current.name != "finished":
            slurm_log = f", Slurm log {job['log']}" if job else ""
            print(f"    log {run.log}{slurm_log}")
    counts = {}
    for _, current, _job, job_state in rows:
        name = "queued" if _queued(job_state) and current.name != "running" else current.name
        counts[name] = counts.get(name, 0) + 1
    print(f"{len(rows)} runs: " + ", ".join(f"{count} {name}" for name, count in counts.items()))


def _commands(rows: list[tuple], todo: list, options, launcher: str) -> dict:
    """{run: the command that starts or continues it} for the runs to do (for Slurm: what each job's node runs)."""
    from .local import launch_prefix
    from .plan import SCRIPT, train_arguments

    commands = {}
    for run, current, _, _ in rows:
        if run in todo:
            if options is None:
                prefix = launch_prefix(launcher, run.processes)
            else:  # on several nodes each adds its rank (see slurm.TrainJob.command)
                prefix = launch_prefix("accelerate" if options.gpus_per_node else "python", options.processes)
            commands[run] = [*prefix, str(SCRIPT), *train_arguments(run, current)]
    return commands


def _execute(args: argparse.Namespace, options, todo: list, commands: dict, gpus: list[str]) -> list | None:
    """Run (or submit and follow) the runs to do; the failures, or None when --no-wait returned at once."""
    from .local import run_locally

    if options is None:
        return run_locally([(run, commands[run]) for run in todo], gpus)
    from .slurm import submit, wait

    submitted = submit(todo, options, Path(args.runs_dir)) if todo else []
    if args.no_wait:
        print("submitted; follow them with `python -m cifar_train.sweep status` and the same arguments", flush=True)
        return None
    return wait(submitted)


def _sweep(args: argparse.Namespace, status_view: bool) -> int:
    from .local import Interrupted, visible_gpus

    runs = _runs(args)
    options = _slurm_options(args) if args.executor == "slurm" else None
    if options is not None:
        from .slurm import check_processes

        check_processes(runs, options)
    rows = _states(runs)
    if status_view:
        _show(rows, None)
        return 0
    startable = ("new", "checkpointed")
    todo = [run for run, current, _, job_state in rows if current.name in startable and not _queued(job_state)]
    gpus, launcher = [], "python"
    if options is None:
        needed = bool(todo) and not args.dry_run
        gpus = list(args.gpus) if args.gpus else (visible_gpus() if needed and args.launcher != "python" else [])
        launcher = args.launcher if args.launcher != "auto" else ("accelerate" if gpus else "python")
    commands = _commands(rows, todo, options, launcher)
    if args.dry_run:
        if options is not None:
            print(f"slurm: one job per run, {options.parameters()}")
        _show(rows, commands)
        return 0
    for run, current, _, job_state in rows:
        name = "queued" if _queued(job_state) and current.name != "running" else current.name
        print(f"{run.run_dir.name}: {ACTIONS[name]} ({run.run_dir})", flush=True)
    try:
        failures = _execute(args, options, todo, commands, gpus)
    except Interrupted:
        print("error: interrupted; the runs keep their checkpoints: the sweep again continues them", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # following Slurm jobs
        print("error: stopped following; the Slurm jobs go on (see `status`)", file=sys.stderr)
        return 130
    if failures is None:
        return 0
    finished = [run.run_dir for run in runs if (run.run_dir / "final_metrics.json").is_file()]
    written = collect(finished, args.results, with_weights=args.with_weights) if finished else []
    for path, changed in written:
        print(f"{'recorded' if changed else 'already recorded'} {path}")
    if any(changed for _, changed in written):
        print("the tables from the records: python -m cifar_train.results table --write")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return failures[0].status if failures else 0
