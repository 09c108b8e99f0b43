"""The Slurm executor, through submitit: one job per run (a job array per submission), requeued on time limits.

Each job runs `TrainJob`, which starts `train_accelerate.py` for its run (new, `--overwrite` when it has no
checkpoint yet, `--resume` when it has one; nothing when it is finished) and appends the output to
`<run dir>.log`. Jobs ask Slurm for submitit's signal (`--signal USR2@<delay>`) before their time limit; submitit
catches it in the job's Python process and calls `TrainJob.checkpoint`, which turns it into the training loop's
own stop request (SIGTERM: checkpoint at the next metrics read, exit), waits for that, and hands submitit a fresh
`TrainJob` for the same run, which submitit saves before it requeues the job (`scontrol requeue`). The requeued
job continues from that checkpoint, bit for bit. The training process itself ignores the USR2 that Slurm sends
to every process of the job, so the one stop request comes from here. A preemption's SIGTERM reaches the training
process directly; it checkpoints and the job waits for Slurm to requeue or end it.

Several nodes per job: one task per node, each starting `accelerate launch` with its node's rank and the first
node's address (`NodeAddr`, from `scontrol show node`). The sweep keeps one small record per submitted run in
`<runs-dir>/.slurm/<run name>.json` (job id, Slurm log), so that it never submits a run whose job is still queued
or running, and so that `status` can show the job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .local import Failure
from .plan import SCRIPT, Run, state, train_arguments

__all__ = [
    "ENDED",
    "JOBS_DIR",
    "SlurmOptions",
    "TrainJob",
    "check_processes",
    "live_jobs",
    "parse_time",
    "read_job",
    "submit",
    "wait",
]

JOBS_DIR = ".slurm"  # under the runs folder: submitit's folders and one record per submitted run
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def parse_time(text: str) -> int:
    """A Slurm time limit -> minutes: `240`, `4:00:00`, `1-00:00:00`, `30:00` (MM:SS, as Slurm reads it)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match or (match[1] and not match[3]):
        raise UserError(f"--time {text!r}: give minutes or [days-]hours:minutes:seconds, e.g. 240 or 4:00:00")
    days, first, second, third = (int(part) if part else 0 for part in match.groups())
    if match[4] is not None:  # H:M:S
        minutes = days * 1440 + first * 60 + second + (third > 0)
    elif match[3] is not None:  # days-H:M, or M:S
        minutes = days * 1440 + first * 60 + second if match[1] else first + (second > 0)
    else:
        minutes = first
    if minutes < 1:
        raise UserError(f"--time {text!r}: give at least one minute")
    return minutes


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks of Slurm; `extra` passes any other sbatch option (`--slurm-option mem=32G`)."""

    time_min: int = 240
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 256  # array tasks running at once
    signal_delay_s: int = 120  # the checkpoint signal comes this long before the time limit
    max_timeouts: int = 100  # requeues after reaching the time limit (preemptions are not counted)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def processes(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)

    def parameters(self) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters."""
        given = {
            "partition": self.partition,
            "cpus_per_task": self.cpus_per_task,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "gpus_per_node": self.gpus_per_node or None,
        }
        return {
            "job_name": "cifar-sweep",
            "time": self.time_min,
            "nodes": self.nodes,
            "ntasks_per_node": 1,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.array_parallelism,
            "additional_parameters": {"requeue": True, **self.extra},
            **{key: value for key, value in given.items() if value is not None},
        }


def _preempt_signal() -> signal.Signals:
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


def _ignore_preempt_signal() -> None:  # in the training process, before exec: inherited as "ignored"
    signal.signal(_preempt_signal(), signal.SIG_IGN)


def _head_address() -> str:
    """The first node of this job, as an address: its NodeAddr (names of nodes need not resolve)."""
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()
    shown = subprocess.run(["scontrol", "show", "node", nodes[0]], capture_output=True, text=True, check=True).stdout
    match = re.search(r"NodeAddr=(\S+)", shown)
    return match[1] if match else nodes[0]


class TrainJob:
    """What one Slurm job runs (see the module docstring); submitit pickles it, and calls it in the job."""

    def __init__(self, run: Run, *, nodes: int, gpus_per_node: int, signal_delay_s: int) -> None:
        self.run, self.nodes, self.gpus_per_node, self.signal_delay_s = run, nodes, gpus_per_node, signal_delay_s
        self._child: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_child"}

    def __setstate__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values, _child=None)

    def command(self, node: int) -> tuple[list[str], dict[str, str]]:
        """The command (and extra environment) of node `node`'s task, for the run's state now."""
        arguments = [str(SCRIPT), *train_arguments(self.run, state(self.run))]
        per_node = max(1, self.gpus_per_node)
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.nodes == 1 and per_node == 1:
            return ([*launch, "--num_processes", "1"] if self.gpus_per_node else [sys.executable]) + arguments, {}
        if self.nodes == 1:
            return [*launch, "--multi_gpu", "--num_processes", str(per_node), *arguments], {}
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000
        machines = [
            *("--multi_gpu", "--num_machines", str(self.nodes), "--num_processes", str(self.nodes * per_node)),
            *("--machine_rank", str(node), "--main_process_ip", _head_address(), "--main_process_port", str(port)),
        ]
        return [*launch, *machines, *arguments], ({} if self.gpus_per_node else {"ACCELERATE_USE_CPU": "1"})

    def __call__(self) -> int:
        node = int(os.environ.get("SLURM_NODEID", "0"))
        current = state(self.run)
        if current.name == "finished":
            print(f"{self.run.run_dir} is finished; nothing to do", flush=True)
            return 0
        if current.name == "running" and node == 0:
            raise RuntimeError(f"{self.run.run_dir} is in use by {current.holder}; a run never starts twice")
        command, env = self.command(node)
        log = self.run.log if node == 0 else self.run.log.with_name(f"{self.run.run_dir.name}.node{node}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        job = os.environ.get("SLURM_ARRAY_JOB_ID", "") or os.environ.get("SLURM_JOB_ID", "?")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        with open(log, "a", encoding="utf-8") as handle:
            now = dt.datetime.now().isoformat(timespec="seconds")
            handle.write(f"=== {now} slurm job {job}{f'_{task}' if task else ''} {' '.join(command)}\n")
            handle.flush()
            self._child = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                preexec_fn=_ignore_preempt_signal,  # this process runs no threads
            )
            status = self._supervise()
        if -status in STOP_SIGNALS or status - 128 in STOP_SIGNALS:
            # Stopped by Slurm (a preemption, scancel): the run checkpointed; Slurm requeues or ends this job now.
            time.sleep(self.signal_delay_s)
        if status != 0:
            raise RuntimeError(f"{self.run.run_dir.name} failed (exit status {status}); log {log}")
        return 0

    def _supervise(self, until: float | None = None) -> int | None:
        """Wait for the training process by polling: the checkpoint signal's handler may run meanwhile."""
        while self._child.poll() is None:
            if until is not None and time.time() > until:
                return None
            time.sleep(0.2)
        return self._child.returncode

    def checkpoint(self) -> Any:
        """submitit's hook on the checkpoint signal: stop the training at its next read (it checkpoints), then
        give submitit the job to requeue. Past the signal delay the job is requeued anyway: it then continues from
        the newest complete checkpoint."""
        import submitit

        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)
            self._supervise(until=time.time() + max(5, self.signal_delay_s - 15))
        fresh = TrainJob(
            self.run, nodes=self.nodes, gpus_per_node=self.gpus_per_node, signal_delay_s=self.signal_delay_s
        )
        return submitit.helpers.DelayedSubmission(fresh)


# --------------------------------------------------------------------------------------------------------------
# Submitting and following


def _record_path(run: Run) -> Path:
    return run.run_dir.parent / JOBS_DIR / f"{run.run_dir.name}.json"


def read_job(run: Run) -> dict[str, str] | None:
    """The record of the job last submitted for `run` (job_id, log, folder), or None."""
    try:
        return json.loads(_record_path(run).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


ENDED = frozenset(  # Slurm's states of a job that has ended
    ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")
)


def live_jobs() -> dict[str, str] | None:
    """Slurm's jobs of this user that it still knows, ended ones included, {job id (array tasks as 12_3): state};
    None when squeue does not answer."""
    import getpass

    try:
        done = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in done.stdout.split() if "|" in line)


def check_processes(runs: Sequence[Run], options: SlurmOptions) -> None:
    """A run pinned to P processes (a row of the multi-GPU table) needs jobs of P processes."""
    for run in runs:
        if run.processes and run.processes != options.processes:
            raise UserError(
                f"{run.label or run.recipe} runs on {run.processes} processes; give --nodes and --gpus-per-node "
                f"whose product is {run.processes} (now {options.nodes} x {max(1, options.gpus_per_node)})"
            )


def submit(runs: Sequence[Run], options: SlurmOptions, runs_dir: Path) -> list[tuple[Run, Any]]:
    """Submit one job per run (one job array), record each; returns (run, submitit job) pairs."""
    check_processes(runs, options)
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--executor slurm needs submitit: pip install 'cifar-recipes[slurm]' (or pip install submitit)"
        ) from None
    folder = runs_dir / JOBS_DIR
    created = [path for path in (runs_dir, folder) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=options.max_timeouts)
    executor.update_parameters(**options.parameters())
    jobs = []
    try:
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # sbatch's complaint: one line below
            for run in runs:
                job = TrainJob(
                    run, nodes=options.nodes, gpus_per_node=options.gpus_per_node, signal_delay_s=options.signal_delay_s
                )
                jobs.append(executor.submit(job))
    except submitit.core.utils.FailedJobError as err:  # sbatch refused (a partition, an account, no controller)
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        said = [line for line in str(err).splitlines() if line.strip()]
        raise UserError(f"sbatch refused the jobs: {said[-1] if said else err}") from None
    for run, job in zip(runs, jobs, strict=True):
        record = {"job_id": job.job_id, "log": str(job.paths.stdout), "folder": str(job.paths.folder)}
        _record_path(run).write_text(json.dumps(record) + "\n", encoding="utf-8")
        print(f"{run.run_dir.name}: submitted as Slurm job {job.job_id} (log {run.log})", flush=True)
    return list(zip(runs, jobs, strict=True))


def _outcome(job: Any) -> tuple[str, Any] | None:
    from submitit.core.utils import pickle_load

    path = job.paths.result_pickle
    return pickle_load(path) if path.exists() else None


def wait(submitted: Sequence[tuple[Run, Any]], poll_s: float = 2.0) -> list[Failure]:
    """Follow the jobs until each has ended; returns the runs whose job failed (with the Slurm log named).

    A job has ended when its result is written, or when Slurm shows it ended (or no longer knows it) without
    one, three polls in a row (a result file may take a moment to appear). A poll squeue does not answer counts
    for nothing.
    """
    pending, failures, ended = list(submitted), [], {}
    while pending:
        time.sleep(poll_s)
        jobs = live_jobs()
        for run, job in list(pending):
            outcome = _outcome(job)
            if outcome is None:
                slurm_state = (jobs or {}).get(job.job_id)
                if jobs is None or (slurm_state is not None and slurm_state not in ENDED):
                    ended.pop(job.job_id, None)
                    continue
                ended[job.job_id] = ended.get(job.job_id, 0) + 1
                if ended[job.job_id] < 3:
                    continue
                why = f"the job ended without a result ({slurm_state or 'no longer known to Slurm'})"
            elif outcome[0] == "success":
                print(f"{run.run_dir.name}: done (Slurm job {job.job_id})", flush=True)
                pending.remove((run, job))
                continue
            else:
                why = str(outcome[1]).strip().splitlines()[-1]
            pending.remove((run, job))
            failures.append(Failure(run, 1, f"Slurm job {job.job_id}: {why}; Slurm log {job.paths.stdout}"))
            print(f"{run.run_dir.name}: failed (Slurm job {job.job_id}; log {run.log})", flush=True)
    return failures
