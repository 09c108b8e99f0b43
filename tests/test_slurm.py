"""Sweeps and multi-node runs on a real Slurm: munged, slurmctld and two slurmd (n1, n2, one CPU each) on this
host, started once for this module by the `slurm_cluster` fixture (tests/slurm_cluster.py).

- the tiny 2-row table x 2 seeds through `--executor slurm`: four jobs of one array, four finished runs, four
  records; `status` and `--dry-run` afterwards show them finished and submit nothing;
- a job signalled as Slurm signals it before its time limit (USR2, submitit's `--signal`), or requeued as a
  preemption does (`scontrol requeue`), mid-epoch: requeued, continued from its checkpoint, and its weights are
  those of an uninterrupted run of the same recipe and seed, bit for bit;
- scripts/slurm/train_multinode.sbatch, as the README shows it, on both nodes: one run, two ranks in sync; the
  same through a sweep with `--nodes 2`;
- a submission sbatch refuses (an unknown partition): one line, nothing left behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_weights, checkpoints, run_main, run_sweep, write_recipe
from test_sweep import check_table_sweep, table_run_dirs, tiny_table

from cifar_train.cli import main
from cifar_train.sweep.cli import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm" / "train_multinode.sbatch"
pytestmark = pytest.mark.slow  # every test here starts Slurm jobs that train


def slurm(cluster, *command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **cluster.env})
    assert done.returncode == 0, done.stderr
    return done.stdout


def job_field(cluster, job_id: str, name: str) -> str:
    return re.search(rf"\b{name}=(\S+)", slurm(cluster, "scontrol", "show", "job", job_id))[1]


@pytest.fixture(scope="module")
def slurm_swept(tmp_path_factory, digits_dir, slurm_cluster):
    folder = tmp_path_factory.mktemp("slurm_sweep")
    recipe, tables = tiny_table(folder, digits_dir)
    runs, out = folder / "runs", folder / "results"
    args = ["--table", "Tiny", "--tables", str(tables), "--seeds", "0", "1", "--runs-dir", str(runs)]
    done = run_sweep(*args, "--results", str(out), "--executor", "slurm", "--time", "10", env=slurm_cluster.env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return recipe, tables, runs, out, args, done


def test_a_two_row_table_times_two_seeds_on_slurm_gives_four_runs_and_four_records(slurm_swept, slurm_cluster):
    recipe, tables, runs, out, _, done = slurm_swept
    check_table_sweep(recipe, tables, runs, out)
    job_ids = []
    for run_dir in table_run_dirs(runs):
        job = json.loads((runs / ".slurm" / f"{run_dir.name}.json").read_text())
        job_ids.append(job["job_id"])
        assert f"{run_dir.name}: submitted as Slurm job {job['job_id']}" in done.stdout
        assert f"{run_dir.name}: done (Slurm job {job['job_id']})" in done.stdout
        assert f"slurm job {job['job_id']} " in run_dir.with_name(f"{run_dir.name}.log").read_text()
        assert job_field(slurm_cluster, job["job_id"], "JobState") == "COMPLETED"
    (array,) = {job_id.split("_")[0] for job_id in job_ids}  # one array of four tasks
    assert sorted(job_ids) == [f"{array}_{task}" for task in range(4)]


def test_status_and_dry_run_show_the_finished_sweep_and_submit_nothing(slurm_swept, slurm_cluster, monkeypatch):
    _, _, runs, out, args, _ = slurm_swept
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])  # for the squeue the command asks
    before = slurm(slurm_cluster, "squeue", "-h", "-a", "-o", "%i")
    status = run_main(sweep_main, "status", *args)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(" finished; Slurm job ") == 4 and status.stdout.splitlines()[-1] == "4 runs: 4 finished"
    dry = run_main(sweep_main, *args, "--results", str(out), "--executor", "slurm", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == "4 runs: 4 finished" and "train_accelerate.py" not in dry.stdout
    assert slurm(slurm_cluster, "squeue", "-h", "-a", "-o", "%i") == before
    assert len(list((runs / ".slurm").glob("*.json"))) == 4  # no job record was added


@pytest.fixture(scope="module")
def long_recipe(tmp_path_factory, digits_dir):
    """A recipe long enough to be caught mid-epoch (all 1,437 digits, 45 steps an epoch, a read every step: two
    epochs of steps after the first checkpoint), and its uninterrupted run at seed 0 (the command a sweep runs)."""
    folder = tmp_path_factory.mktemp("long")
    recipe = write_recipe(
        folder / "long.toml", digits_dir, data={"train_limit": 0}, train={"epochs": 3}, log={"every_steps": 1}
    )
    reference = folder / "reference"
    done = run_main(main, str(recipe), "--set", "train.seed=0", "--output-dir", str(reference))
    assert done.returncode == 0, done.stderr
    return recipe, reference


def wait_until(predicate, what: str, process: subprocess.Popen, timeout: float = 240, poll: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {process.communicate()}")
        time.sleep(poll)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("how", ["time-limit signal", "scontrol requeue"])
def test_a_job_stopped_mid_epoch_is_requeued_and_ends_bit_identical(how, long_recipe, slurm_cluster, tmp_path):
    recipe, reference = long_recipe
    runs = tmp_path / "runs"
    run_dir = runs / "long-seed0"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "cifar_train.sweep", str(recipe), "--seeds", "0", "--executor", "slurm",
         "--time", "10", "--signal-delay", "60", "--runs-dir", str(runs), "--results", str(tmp_path / "results")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **slurm_cluster.env},
    )  # fmt: skip
    wait_until(lambda: checkpoints(run_dir, "step_*_e0001_b000000"), "the first epoch's checkpoint", sweep)
    job_id = json.loads((runs / ".slurm" / "long-seed0.json").read_text())["job_id"]
    if how == "time-limit signal":  # what `--signal USR2@60` makes Slurm send to the job's processes
        slurm(slurm_cluster, "scancel", "--signal=USR2", job_id)
    else:  # what a preemption with PreemptMode=REQUEUE does: SIGTERM to every process, then requeue
        slurm(slurm_cluster, "scontrol", "requeue", job_id)
    wait_until(lambda: job_field(slurm_cluster, job_id, "Restarts") == "1", "the requeue", sweep, poll=0.2)
    # Slurm holds a requeued job for about two minutes before it may start again; let it start sooner, but not in
    # the second the old incarnation was killed: slurmd refuses a credential of this job made in that second as
    # revoked ("Job credential revoked"), and the job ends FAILED without running (seen 2 times in 3 with "now").
    pending = lambda: job_field(slurm_cluster, job_id, "JobState") == "PENDING"  # noqa: E731
    wait_until(pending, "the job pending again", sweep, poll=0.2)
    slurm(slurm_cluster, "scontrol", "update", f"JobId={job_id}", "StartTime=now+2")
    stdout, stderr = sweep.communicate(timeout=300)
    jobs_logs = "\n".join(path.read_text()[-1500:] for path in sorted((runs / ".slurm").glob("*/*_log.*")))
    assert sweep.returncode == 0, "\n".join([stdout[-2000:], stderr[-2000:], jobs_logs, slurm_cluster.logs()])

    log = run_dir.with_name("long-seed0.log").read_text()
    starts = [line for line in log.splitlines() if line.startswith("=== ")]
    assert len(starts) == 2 and "--output-dir" in starts[0] and f"--resume {run_dir}" in starts[1]
    stopped = re.search(r"interrupted by SIGTERM; checkpoint \S+/(step_\S+);", log)
    assert stopped and not stopped[1].endswith("_b000000"), f"expected a mid-epoch checkpoint: {log[-2000:]}"
    assert f"resuming {run_dir} at epoch " in log
    assert_same_weights(reference, run_dir)
    assert f"recorded {tmp_path / 'results'}" in stdout


def assert_one_run_over_both_nodes(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 2 * (128 // 32)
    assert json.loads((run_dir / "env.json").read_text())["num_processes"] == 2
    assert json.loads((run_dir / "final_metrics.json").read_text())["ranks_in_sync"] is True  # identical weights


def test_the_multinode_sbatch_script_runs_one_run_on_both_nodes(slurm_cluster, digits_dir, tmp_path):
    """The script, exactly as README.md shows it, through sbatch on n1 and n2: one CPU process each."""
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{SCRIPT.read_text()}```" in readme
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"epochs": 2, "batch_size": 32})
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["sbatch", "--parsable", f"--output={output}", str(SCRIPT), str(recipe), str(run_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    deadline = time.time() + 600
    while job_field(slurm_cluster, job_id, "JobState") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.time() < deadline, "the job did not end in 10 minutes"
        time.sleep(0.5)
    log = output.read_text() if output.is_file() else ""
    assert job_field(slurm_cluster, job_id, "JobState") == "COMPLETED", log[-3000:]
    assert job_field(slurm_cluster, job_id, "NodeList") == "n[1-2]"
    assert_one_run_over_both_nodes(run_dir)


def test_a_sweep_with_two_nodes_per_job_runs_over_both(slurm_cluster, digits_dir, tmp_path):
    """`--nodes 2`: one job, one launcher per node with its rank, one run over both."""
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"epochs": 2, "batch_size": 32})
    runs = tmp_path / "runs"
    done = run_sweep(
        str(recipe), "--seeds", "0", "--executor", "slurm", "--nodes", "2", "--runs-dir", str(runs),
        "--results", str(tmp_path / "results"), env={**slurm_cluster.env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    job_id = json.loads((runs / ".slurm" / "r-seed0.json").read_text())["job_id"]
    assert job_field(slurm_cluster, job_id, "NodeList") == "n[1-2]"
    for rank, log in enumerate((runs / "r-seed0.log", runs / "r-seed0.node1.log")):
        assert f"--num_machines 2 --num_processes 2 --machine_rank {rank} " in log.read_text().splitlines()[0]
    assert_one_run_over_both_nodes(runs / "r-seed0")


def test_a_refused_submission_is_one_line_and_leaves_nothing(slurm_cluster, digits_dir, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.toml", digits_dir)
    runs = tmp_path / "runs"
    done = run_sweep(
        str(recipe), "--seeds", "0", "--runs-dir", str(runs), "--executor", "slurm", "--partition", "nosuch",
        env=slurm_cluster.env,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "error: sbatch refused the jobs: sbatch: error: Batch job submission failed: Invalid partition name specified"
    ]
    assert not runs.exists()
