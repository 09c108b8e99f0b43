"""Several seeds of one recipe in one command: `python -m cifar_train.sweep RECIPE --seeds 0 1 2`.

    python -m cifar_train.sweep recipes/cifar10/resnet110.toml --seeds 0 1 2
    python -m cifar_train.sweep recipes/experiments/resnet_preact20.toml --seeds 0 1 --set train.epochs=15
    python -m cifar_train.sweep recipes/wrn_ricap.toml --seeds 0 1 2 3 --gpus 0 1 2 3

Each seed is one run, `train_accelerate.py RECIPE --set train.seed=S [--set ...] --output-dir
<runs-dir>/<recipe stem>[-<overrides hash>]-seed<S>`, its output in `<run dir>.log`. With several GPUs
visible the seeds run side by side, one per GPU, each under `accelerate launch --num_processes 1` with
CUDA_VISIBLE_DEVICES set to its GPU; otherwise one after another (`accelerate launch` when there is a GPU,
plain `python` on a CPU). Calling it again skips finished seeds and continues interrupted ones from their
newest checkpoint (`--resume`). A seed that fails stops the sweep with its exit status; at the end every
finished seed is recorded in `results/` (see `cifar_train.records`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .recipe import load_recipe, parse_overrides
from .records import RESULTS_DIR, ROOT, collect, overrides_hash

__all__ = ["Seed", "SeedFailed", "launch_command", "main", "plan", "run_dir_name", "visible_gpus"]

SCRIPT = ROOT / "train_accelerate.py"
LAUNCHERS = ("auto", "python", "accelerate")
ACTIONS = {
    "skip": "finished, skipping",
    "resume": "continuing from its newest checkpoint",
    "restart": "no checkpoint yet, starting it again",
    "start": "starting",
}


@dataclass(frozen=True)
class Seed:
    """One seed's run: where it lives and what to do with it (`start`, `restart`, `resume` or `skip`)."""

    seed: int
    run_dir: Path
    action: str

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(f"{self.run_dir.name}.log")


def run_dir_name(recipe: str | os.PathLike, overrides: Sequence[str], seed: int) -> str:
    digest = overrides_hash(overrides)
    return f"{Path(recipe).stem}{f'-{digest}' if digest else ''}-seed{seed}"


def _check_own_run(run_dir: Path, recipe: str, overrides: Sequence[str], seed: int) -> None:
    """A run directory already there must hold this recipe's run (a recipe of the same stem elsewhere, or an
    edited recipe file, would otherwise be skipped or continued as if it were this one)."""
    try:
        theirs = load_recipe(run_dir / "recipe.toml")
    except UserError as err:
        raise UserError(f"{run_dir} exists but does not hold a run this sweep can use ({err})") from None
    if theirs != load_recipe(recipe, [f"train.seed={seed}", *overrides]):
        raise UserError(
            f"{run_dir} holds a run of another recipe (or {recipe} changed since it started); "
            "remove it or choose another --runs-dir"
        )


def plan(recipe: str, overrides: Sequence[str], seeds: Sequence[int], runs_dir: Path) -> list[Seed]:
    """What each seed needs: skip (finished), resume (checkpointed), restart (no checkpoint yet) or start."""
    from .checkpoint import find_checkpoints

    jobs = []
    for seed in seeds:
        run_dir = runs_dir / run_dir_name(recipe, overrides, seed)
        if not run_dir.exists():
            action = "start"
        elif not run_dir.is_dir():
            raise UserError(f"{run_dir} is a file, not a run directory; remove it or choose another --runs-dir")
        elif not any(run_dir.iterdir()):
            action = "start"
        else:
            _check_own_run(run_dir, recipe, overrides, seed)
            if (run_dir / "final_metrics.json").is_file():
                action = "skip"
            else:
                action = "resume" if find_checkpoints(run_dir) else "restart"
        jobs.append(Seed(seed, run_dir, action))
    return jobs


def launch_command(job: Seed, recipe: str, overrides: Sequence[str], launcher: str) -> list[str]:
    """The command line that runs (or continues) one seed; `launcher` is "python" or "accelerate"."""
    if launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(SCRIPT)]
    else:
        prefix = [sys.executable, str(SCRIPT)]
    if job.action == "resume":
        return [*prefix, "--resume", str(job.run_dir)]
    sets = [item for override in [f"train.seed={job.seed}", *overrides] for item in ("--set", override)]
    restart = ["--overwrite"] if job.action == "restart" else []
    return [*prefix, recipe, *sets, "--output-dir", str(job.run_dir), *restart]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (torch asked in a subprocess)."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        count = int(done.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        count = 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed is not None else []
    return (ids or [str(i) for i in range(count)])[:count]


class SeedFailed(Exception):
    """A seed's run ended with a non-zero status; the sweep stops with it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Run:
    """One seed's training process; its output is appended to the seed's log (and shown, with `tee`)."""

    def __init__(self, job: Seed, command: list[str], gpu: str | None, *, tee: bool) -> None:
        self.job, self.tee = job, tee
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(job.log, "a", encoding="utf-8")  # noqa: SIM115  (closed in wait())
        self.log.write(f"=== {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(command)}\n")
        self.log.flush()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE if tee else self.log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            start_new_session=not tee,  # side by side: a process group of its own, stopped by us, not the terminal
        )

    def wait(self) -> int:
        if self.tee:
            for line in self.process.stdout:
                sys.stdout.write(line)
                self.log.write(line)
        status = self.process.wait()
        self.log.close()
        return status

    def stop(self, signum: int) -> None:
        """Ask the run to stop; it checkpoints on SIGINT/SIGTERM, so the next sweep continues it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def failed(self, status: int) -> SeedFailed:
        code = 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell reports it
        where = f"run directory {self.job.run_dir}, log {self.job.log}"
        return SeedFailed(code, f"seed {self.job.seed} failed (exit status {code}); {where}")


def _one_after_another(jobs: list[Seed], commands: list[list[str]], gpu: str | None) -> None:
    for job, command in zip(jobs, commands):
        run = _Run(job, command, gpu, tee=True)
        try:
            status = run.wait()
        except KeyboardInterrupt:  # the run got the terminal's SIGINT too: let it write its checkpoint
            status = run.wait()
        if status != 0:
            raise run.failed(status)
        print(f"seed {job.seed}: done ({job.run_dir})", flush=True)


def _side_by_side(jobs: list[Seed], commands: list[list[str]], gpus: list[str]) -> None:
    queue, running = list(zip(jobs, commands)), {}
    try:
        while queue or running:
            for gpu in [g for g in gpus if g not in running]:
                if queue:
                    job, command = queue.pop(0)
                    print(f"seed {job.seed}: running on GPU {gpu} (log {job.log})", flush=True)
                    running[gpu] = _Run(job, command, gpu, tee=False)
            time.sleep(0.5)
            for gpu, run in list(running.items()):
                if run.process.poll() is None:
                    continue
                status = run.wait()
                del running[gpu]
                if status != 0:
                    for other in running.values():
                        other.stop(signal.SIGTERM)
                        other.wait()
                    raise run.failed(status)
                print(f"seed {run.job.seed}: done on GPU {gpu} ({run.job.run_dir})", flush=True)
    except KeyboardInterrupt:
        for run in running.values():
            run.stop(signal.SIGINT)
            run.wait()
        message = "interrupted; the runs keep their checkpoints: run the sweep again to continue them"
        raise SeedFailed(128 + signal.SIGINT, message) from None


def run_seeds(jobs: list[Seed], recipe: str, overrides: Sequence[str], launcher: str, gpus: list[str]) -> None:
    """Run the seeds that need it: one per GPU side by side when there are several, else one after another."""
    pending = [job for job in jobs if job.action != "skip"]
    commands = [launch_command(job, recipe, overrides, launcher) for job in pending]
    if len(gpus) > 1:
        _side_by_side(pending, commands, gpus)
    else:
        _one_after_another(pending, commands, gpus[0] if gpus else None)


def _check_args(args: argparse.Namespace) -> None:
    if Path(args.recipe).is_dir():
        raise UserError(f"recipe {args.recipe!r} is a folder; give a TOML file")
    for path, _ in parse_overrides(args.overrides):
        if ".".join(path) == "train.seed":
            raise UserError("--set train.seed=... clashes with --seeds; give the seeds with --seeds only")
    load_recipe(args.recipe, args.overrides)  # every key and value checked before anything runs
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: give distinct seeds >= 0")
    if Path(args.runs_dir).is_file():
        raise UserError(f"--runs-dir {args.runs_dir!r} is a file; give a folder")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_train.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="TOML recipe, e.g. recipes/cifar10/resnet110.toml")
    parser.add_argument("--seeds", nargs="+", type=int, required=True, metavar="S", help="one run per seed")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to every run"
    )
    parser.add_argument("--runs-dir", default="runs", help="where the run directories go (default: runs)")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="records folder (default: results/)")
    parser.add_argument(
        "--launcher", choices=LAUNCHERS, default="auto", help="auto: accelerate launch with a GPU, python on a CPU"
    )
    parser.add_argument("--gpus", nargs="+", metavar="ID", help="GPUs to spread the seeds over (default: all visible)")
    parser.add_argument(
        "--with-weights",
        action="store_true",
        help="records also copy each run's weights, config and card to <results>/weights/ (at most 2 MiB of weights)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import guarded

    args = _parser().parse_args(argv)
    return guarded(lambda: _sweep(args), debug=args.debug)


def _sweep(args) -> int:
    try:
        _check_args(args)
        recipe = str(Path(args.recipe)) if Path.cwd().resolve() == ROOT else str(Path(args.recipe).resolve())
        jobs = plan(recipe, args.overrides, args.seeds, Path(args.runs_dir))
        needed = any(job.action != "skip" for job in jobs)
        gpus = list(args.gpus) if args.gpus else (visible_gpus() if needed and args.launcher != "python" else [])
        launcher = args.launcher if args.launcher != "auto" else ("accelerate" if gpus else "python")
        for job in jobs:
            print(f"seed {job.seed}: {ACTIONS[job.action]} ({job.run_dir})", flush=True)
        run_seeds(jobs, recipe, args.overrides, launcher, gpus)
        written = collect([job.run_dir for job in jobs], args.results, with_weights=args.with_weights)
    except SeedFailed as failed:
        print(f"error: {failed}", file=sys.stderr)
        return failed.status
    for path, changed in written:
        print(f"{'recorded' if changed else 'already recorded'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
