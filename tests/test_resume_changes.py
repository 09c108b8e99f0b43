"""Continuing a run with something changed: more epochs, or another number of processes.

Training a finished run longer (`--resume RUN --set train.epochs=N`) is supported where the lr of the steps
already taken does not depend on the run's length, and then ends with exactly the weights of a run that was
that long from the start. A checkpoint written by one number of processes continues on another, with one
warning; it used to crash (1 -> 2) or go on silently (2 -> 1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import (
    ROOT,
    TRAIN_SCRIPT,
    assert_one_line_error,
    assert_same_weights,
    free_port,
    read_metrics,
    run_main,
    write_recipe,
)

from cifar_train.cli import main

MULTISTEP = {"name": "multistep", "milestones": [2]}


def _recipe(tmp_path, digits_dir, epochs: int, schedule=MULTISTEP):
    return write_recipe(tmp_path / f"r{epochs}.toml", digits_dir, schedule=schedule, train={"epochs": epochs})


@pytest.mark.slow
def test_a_finished_run_trained_longer_equals_a_run_that_long_from_the_start(tmp_path, digits_dir):
    short, full = tmp_path / "short", tmp_path / "full"
    assert run_main(main, str(_recipe(tmp_path, digits_dir, 2)), "--output-dir", str(short)).returncode == 0
    assert run_main(main, str(_recipe(tmp_path, digits_dir, 3)), "--output-dir", str(full)).returncode == 0
    result = run_main(main, "--resume", str(short), "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    assert_same_weights(full, short)
    assert [row["epoch"] for row in read_metrics(short)] == [1, 2, 3]
    assert (short / "recipe.toml").read_text() == (full / "recipe.toml").read_text()
    env = json.loads((short / "env.json").read_text())
    assert "train.epochs=3" in env["overrides"] and env["continued"][0]["overrides"] == ["train.epochs=3"]
    assert json.loads((short / "final_metrics.json").read_text())["epoch"] == 3


def test_training_longer_is_refused_where_the_schedule_spans_the_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    run_bytes = {p.relative_to(tiny_run.run_dir): p.read_bytes() for p in tiny_run.run_dir.rglob("*") if p.is_file()}
    shutil.copytree(tiny_run.run_dir, run)
    result = run_main(main, "--resume", str(run), "--set", "train.epochs=5")  # the tiny run is cosine
    assert_one_line_error(
        result, "schedule.name = 'cosine' spreads its curve over train.epochs", "start a new run with train.epochs = 5"
    )
    result = run_main(main, "--resume", str(run), "--set", "train.epochs=2")
    assert_one_line_error(result, "train.epochs = 2 is fewer than the 3 epochs the run has already trained")
    result = run_main(main, "--resume", str(run), "--set", "optim.lr=0.5")
    assert_one_line_error(result, "optim.lr: 0.5 here, 0.05 in the run", "only train.epochs may change")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == run_bytes


def _torchrun(*args: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(TRAIN_SCRIPT), *args],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(1, 2), (2, 1)], ids=["1->2", "2->1"])
def test_a_checkpoint_continues_on_another_number_of_processes(tmp_path, digits_dir, first, then):
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, schedule=MULTISTEP, train={"epochs": 1, "batch_size": 64})
    run = tmp_path / "run"
    start = ["--output-dir", str(run)]
    made = _torchrun(str(recipe), *start, port=free_port()) if first == 2 else run_main(main, str(recipe), *start)
    assert made.returncode == 0, made.stderr[-3000:]
    more = ["--resume", str(run), "--set", "train.epochs=2"]
    result = _torchrun(*more, port=free_port()) if then == 2 else run_main(main, *more)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    warning = f"the checkpoint was written by {first} process(es), this run has {then}"
    assert output.count(warning) == 1, output[-3000:]  # one line, from the main process only
    assert "bit-exact" in output and "--overwrite" not in output
    assert [row["epoch"] for row in read_metrics(run)] == [1, 2]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["ranks_in_sync"] is True and final["step"] == 2 * (128 // 64)
