"""The one-call GPU check runs end to end in its --smoke mode on a CPU, so it cannot rot while no GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_phase(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR_RECIPES_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--smoke"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["environment", "throughput", "host_syncs", "accuracy", "projections"]
    assert not [name for name, phase in phases.items() if "error" in phase], phases
    (measured,) = [value for key, value in phases["throughput"].items() if key != "seconds"]
    assert measured["bare_step_images_per_second"] > 0 and measured["loop_images_per_second"] > 0
    assert [row["epoch"] for row in phases["accuracy"]["epochs"]] == [1, 2]
    assert "train_accelerate.py recipes/experiments/resnet_preact20.toml" in phases["accuracy"]["command"]
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("== ") == 5
