"""The GPU check (benchmarks/gpu_check.py): its rows reach the disk one by one, a failing entry is recorded and the
next one runs, an entry the budget cannot hold is skipped with the reason; and the whole check runs end to end in
its --smoke mode on a CPU, so it cannot rot while no GPU is lent. Also the installer of what a GPU machine lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check
import gpu_deps

WHEELS = ROOT.parent / "shared" / "gpu-wheels"


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_row_is_on_disk_when_its_entry_ends_and_a_failure_does_not_stop_the_next(tmp_path):
    check = gpu_check.Check(tmp_path, deadline=time.time() + gpu_check.KEEP_FOR_LATER["modes"] + 60)
    on_disk_before: list[list[str]] = []

    def broken() -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def looks_at_the_file() -> dict:
        on_disk_before.append([row["entry"] for row in _rows(tmp_path / "gpu_check.jsonl")])
        return {"images_per_second": 1234}

    check.run("modes", "first", lambda: {"train_loss": 2.3}, estimate=1.0)
    check.run("modes", "broken", broken, estimate=1.0)
    check.run("modes", "third", looks_at_the_file, estimate=1.0)  # the same phase, still running
    check.run("modes", "too long", lambda: {}, estimate=1000.0)
    assert on_disk_before == [["first", "broken"]]
    rows = _rows(tmp_path / "gpu_check.jsonl")
    assert [(row["entry"], row["status"]) for row in rows] == [
        ("first", "ok"), ("broken", "failed"), ("third", "ok"), ("too long", "skipped"),
    ]  # fmt: skip
    assert rows[1]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert rows[2]["images_per_second"] == 1234
    assert "needs ~1000 s" in rows[3]["reason"] and "left for this phase" in rows[3]["reason"]
    assert check.failed == 1


def test_an_entry_that_would_eat_the_next_phases_time_is_skipped_and_a_measurement_replaces_the_guess(tmp_path):
    check = gpu_check.Check(tmp_path, deadline=time.time() + gpu_check.KEEP_FOR_LATER["modes"] + 30)
    assert check.run("throughput", "fits", lambda: {}, estimate=40.0, cost_key="k")["status"] == "ok"
    assert check.run("modes", "would eat the throughput phase's time", lambda: {}, estimate=40.0)["status"] == "skipped"
    assert check.estimate("k", "compile") < 40.0  # measured: a fraction of a second, not the guess
    assert check.estimate("other", "compile") == gpu_check.GUESSES["compile"]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_phase(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR_RECIPES_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--smoke"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(tmp_path / "out" / "gpu_check.jsonl")
    assert [row["phase"] for row in rows[:2]] == ["environment", "modes"]
    assert not [row for row in rows if row["status"] == "failed"], rows
    modes = {row["entry"]: row for row in rows if row["phase"] == "modes"}
    assert len(modes) == 2 * len(gpu_check.MODE_ORDER)  # every precision x mode x model: run or skipped with a reason
    ran = [entry for entry, row in modes.items() if row["status"] == "ok"]
    assert ran == ["resnet_preact20 no eager", "wrn28_10_ricap no eager"]
    assert all(row["reason"] for row in modes.values() if row["status"] == "skipped")
    throughput = [row for row in rows if row["phase"] == "throughput"]
    assert [row["target"] for row in throughput] == ["resnet_preact20"]  # the smoke measures one
    assert all(row["bare_step_images_per_second"] > 0 and row["loop_images_per_second"] > 0 for row in throughput)
    (syncs,) = [row for row in rows if row["phase"] == "syncs"]
    assert syncs["status"] == "skipped" and "CUDA" in syncs["reason"]
    (projection,) = [row for row in rows if row["phase"] == "projections"]
    assert set(projection) >= {row["entry"] for row in throughput}
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("[modes]") == len(modes)


# ----------------------------------------------------------------------------------------------------------
# What a GPU machine lacks, from wheels


@pytest.fixture
def gpu_machine() -> dict[str, str]:
    """Installed versions as on the GPU machine this project is lent: torch and the usual image, no `datasets`."""
    return {
        "torch": "2.11.0", "torchvision": "0.26.0", "timm": "1.0.20", "accelerate": "1.10.1", "safetensors": "0.6.2",
        "rich": "14.1.0", "numpy": "2.3.2", "pyarrow": "24.0.0", "pandas": "2.3.1", "huggingface-hub": "1.31.2",
        "fsspec": "2025.9.0", "filelock": "3.19.1", "tqdm": "4.67.1", "xxhash": "3.5.0", "packaging": "25.0",
        "pyyaml": "6.0.2", "requests": "2.32.5",
    }  # fmt: skip


def _plan(machine: dict[str, str], python=(3, 12)) -> list[str]:
    if not WHEELS.is_dir():
        pytest.skip(f"the GPU wheels are not at {WHEELS}")
    wheels = gpu_deps.wheels_by_name(WHEELS, python=python)
    return [path.name.split("-")[0] for path in gpu_deps.plan_installs(gpu_deps.project_requirements(), wheels,
                                                                        version_of=machine.get)]  # fmt: skip


def test_gpu_deps_installs_only_what_the_machine_lacks(gpu_machine):
    assert _plan(gpu_machine) == ["datasets", "dill", "multiprocess"]
    assert _plan({**gpu_machine, "timm": "0.9.16"}) == ["timm", "datasets", "dill", "multiprocess"]  # too old
    assert _plan({**gpu_machine, "datasets": "4.0.0", "dill": "0.3.8", "multiprocess": "0.70.16"}) == []


def test_gpu_deps_never_installs_torchs_own_dependencies_nor_a_wheel_for_another_python(gpu_machine):
    without = {name: version for name, version in gpu_machine.items() if name != "filelock"}  # torch needs it
    with pytest.raises(gpu_deps.Missing, match=r"filelock .*torch or one of its dependencies"):
        _plan(without)
    with pytest.raises(gpu_deps.Missing, match=r"multiprocess.* no wheel for this Python"):
        _plan(gpu_machine, python=(3, 11))  # the multiprocess wheel is built for 3.12
