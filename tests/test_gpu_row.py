"""benchmarks/gpu_row.sh, the one-call full-length seed row, end to end in its --smoke mode on a CPU: a finished
run is evaluated and recorded; a run whose first epochs project past the budget is stopped cleanly (checkpoint
kept, nothing recorded) with the projection reported. And how it picks its mode from a GPU check's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_row


def _gpu_row(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR_RECIPES_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_row.sh"), str(out), "--smoke", "--results", str(tmp_path / "results"),
         *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    return done, json.loads((out / "gpu_row.json").read_text())


@pytest.mark.slow
def test_gpu_row_smoke_trains_evaluates_and_records(tmp_path):
    done, summary = _gpu_row(tmp_path, "--epochs", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["status"] == "recorded" and summary["mode"] == "eager"
    assert summary["evaluation"]["num_samples"] == 360 and 0 <= summary["evaluation"]["top1"] <= 100
    (record_path,) = summary["records"]
    record = json.loads((tmp_path / "out" / "results" / os.path.basename(record_path)).read_text())
    assert record["recipe"] == gpu_row.RECIPE and record["epochs"] == 2
    assert (tmp_path / "results" / os.path.basename(record_path)).is_file()  # --results, as results/ on a GPU
    assert list((tmp_path / "out" / "results" / "weights").glob("*/model.safetensors"))  # --with-weights


@pytest.mark.slow
def test_gpu_row_stops_cleanly_when_its_first_epochs_project_past_the_budget(tmp_path):
    done, summary = _gpu_row(tmp_path, "--epochs", "1000", "--budget-seconds", "150", "--after-seconds", "10")
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["status"] == "stopped" and summary["stop_asked_after_epochs"] >= 2
    assert summary["projected_end_in_seconds"] > summary["deadline_in_seconds"]
    assert summary["returncode"] == 128 + 15  # the loop's own SIGTERM path: checkpoint, then exit
    assert list((tmp_path / "out" / "run" / "checkpoints").iterdir())
    assert not (tmp_path / "results").exists()  # a shortened run is not a seed row


def test_projection_leaves_out_the_first_epoch_and_adds_the_time_after_training():
    assert gpu_row.projected_end(100.0, [50.0], 200, after=45) is None  # one epoch: compilation, no pace yet
    assert gpu_row.projected_end(100.0, [50.0, 52.0, 54.0], 200, after=45) == 100.0 + 197 * 2.0 + 45


def test_the_fastest_mode_the_check_saw_work_is_chosen():
    rows = [
        {"phase": "modes", "target": "resnet_preact20", "precision": "bf16", "mode": "eager", "status": "ok"},
        {"phase": "modes", "target": "resnet_preact20", "precision": "bf16", "mode": "reduce-overhead", "status": "ok"},
        {"phase": "modes", "target": "resnet_preact20", "precision": "bf16", "mode": "default", "status": "failed"},
    ]
    loops = [("eager", 20_000), ("reduce-overhead", 45_000), ("default", 60_000)]
    rows += [
        {"phase": "throughput", "target": "resnet_preact20", "precision": "bf16", "mode": mode, "status": "ok",
         "loop_images_per_second": rate, "entry": f"resnet_preact20@128 {mode}"}
        for mode, rate in loops
    ]  # fmt: skip
    assert gpu_row.fastest_known_mode(rows)[0] == "reduce-overhead"  # "default" was faster but its short run failed
    assert gpu_row.fastest_known_mode([])[0] == "eager"
