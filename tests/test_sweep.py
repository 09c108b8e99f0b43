"""`python -m cifar_train.sweep`: several seeds of a recipe, resumable, recorded at the end.

Real runs (ResNet-20 on 128 of scikit-learn's digits, two epochs) through the real command line, on the CPU:
two seeds one after another, a second call that skips both, unfinished seeds continued side by side (one per
"GPU" slot; CUDA_VISIBLE_DEVICES names no real GPU here), and a failing seed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import write_recipe

from cifar_train import records, results, sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here runs the sweep command, which starts real training processes
OVERRIDES = ["train.epochs=2"]


def tiny_recipe(path: Path, dataset: Path) -> Path:
    """The standard tiny recipe (tests/helpers.py), 3 epochs as written (the sweeps below --set 2)."""
    return write_recipe(path, dataset, train={"checkpoint_every": 10})


def run_sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cifar_train.sweep", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def files_and_mtimes(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, digits_dir):
    """Two seeds of the tiny recipe, swept once: (recipe, runs dir, results dir, the finished process)."""
    folder = tmp_path_factory.mktemp("sweep")
    recipe = tiny_recipe(folder / "tiny.toml", digits_dir)
    runs, out = folder / "runs", folder / "results"
    sets = [item for override in OVERRIDES for item in ("--set", override)]
    done = run_sweep(str(recipe), "--seeds", "0", "1", *sets, "--runs-dir", str(runs), "--results", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return recipe, runs, out, done


def test_two_seeds_give_two_runs_and_two_records(swept) -> None:
    recipe, runs, out, done = swept
    names = [f"tiny-{records.overrides_hash(OVERRIDES)}-seed{seed}" for seed in (0, 1)]
    assert sorted(p.name for p in runs.iterdir()) == sorted([*names, *(f"{name}.log" for name in names)])
    for seed, name in enumerate(names):
        run_dir = runs / name
        assert (run_dir / "final_metrics.json").is_file()
        resolved = tomllib.loads((run_dir / "recipe.toml").read_text())
        assert resolved["train"]["seed"] == seed
        assert resolved["train"]["epochs"] == 2  # the --set reached the run (the recipe says 3)
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        assert f"seed {seed}: starting ({run_dir})" in done.stdout
        log = (runs / f"{name}.log").read_text()
        assert log.startswith("=== ") and f"--set train.seed={seed} --set train.epochs=2" in log.splitlines()[0]
        assert "final val top-1" in log  # the run's own output went to its log (and to the terminal)

    found = records.load_records(out)
    assert sorted(r["seed"] for r in found) == [0, 1]
    assert all(r["recipe"] == recipe.as_posix() and r["epochs"] == 2 for r in found)
    assert [r["overrides"] for r in found] == [["train.seed=0", *OVERRIDES], ["train.seed=1", *OVERRIDES]]
    assert done.stdout.count("recorded ") == 2

    # Both records count for the one row of this recipe with these overrides: median (mean ± sd, 2 runs; best).
    tables = out.parent / "tables.toml"
    tables.write_text(
        '[documents."README.md"]\ntitle = "Results"\nlevel = 2\n\n'
        '[[tables]]\ndocument = "README.md"\nheading = "Tiny"\n'
        f'rows = [{{ label = "tiny", seed = "—", recipe = "{recipe}", overrides = ["train.epochs=2"] }}]\n'
    )
    readme = results.render(results.load_tables(tables), found)["README.md"]
    errors = sorted(r["final_error"] for r in found)
    assert f"| {sum(errors) / 2:.2f} (" in readme and ", 2 runs; best " in readme


def test_a_second_call_skips_finished_seeds_and_touches_nothing(swept, tmp_path) -> None:
    recipe, runs, out, _ = swept
    before = files_and_mtimes(runs, out)
    again = run_sweep(
        str(recipe), "--seeds", "0", "1", "--set", *OVERRIDES, "--runs-dir", str(runs), "--results", str(out)
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipping") == 2 and "starting" not in again.stdout
    assert again.stdout.count("already recorded") == 2
    assert files_and_mtimes(runs, out) == before


def test_with_weights_records_copy_the_finished_runs_weights(swept, tmp_path) -> None:
    recipe, runs, _, _ = swept
    out = tmp_path / "results"
    done = run_sweep(
        str(recipe), "--seeds", "0", "1", "--set", *OVERRIDES, "--runs-dir", str(runs), "--results", str(out),
        "--with-weights",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("finished, skipping") == 2 and done.stdout.count("recorded ") == 2
    for record in records.load_records(out):
        folder = out / "weights" / Path(record["file"]).stem
        run_dir = runs / f"tiny-{records.overrides_hash(OVERRIDES)}-seed{record['seed']}"
        assert record["weights"].startswith(f"Committed in {folder}/")
        assert (folder / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()


def test_unfinished_seeds_continue_from_their_checkpoints_side_by_side(swept, tmp_path) -> None:
    recipe, runs, out, _ = swept
    runs_copy, out_copy = shutil.copytree(runs, tmp_path / "runs"), shutil.copytree(out, tmp_path / "results")
    for run_dir in runs_copy.glob("*-seed?"):
        (run_dir / "final_metrics.json").unlink()
    done = run_sweep(
        str(recipe),
        *("--seeds", "0", "1", "--set", *OVERRIDES),
        *("--runs-dir", str(runs_copy), "--results", str(out_copy)),
        *("--gpus", "0", "1", "--launcher", "python"),  # two slots: both seeds at once, each told its own device
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("continuing from its newest checkpoint") == 2
    assert "seed 0: running on GPU 0" in done.stdout and "seed 1: running on GPU 1" in done.stdout
    for run_dir in runs_copy.glob("*-seed?"):
        final = json.loads((run_dir / "final_metrics.json").read_text())
        assert final["epoch"] == 2
        log = run_dir.with_name(f"{run_dir.name}.log").read_text()
        assert log.count("=== ") == 2 and f"--resume {run_dir}" in log
    assert len(list(out_copy.glob("*.json"))) == 2  # the same two runs: still two records


def test_a_failing_seed_stops_the_sweep_and_names_its_run_and_log(digits_dir, tmp_path) -> None:
    recipe = tiny_recipe(tmp_path / "tiny.toml", digits_dir)
    runs, out = tmp_path / "runs", tmp_path / "results"
    missing = tmp_path / "no_such_dataset"
    done = run_sweep(
        str(recipe),
        "--seeds",
        "0",
        "1",
        "--set",
        f"data.dataset={missing}",
        "--runs-dir",
        str(runs),
        "--results",
        str(out),
    )
    assert done.returncode == 2  # the run's own exit status (a dataset that does not exist)
    name = f"tiny-{records.overrides_hash([f'data.dataset={missing}'])}-seed0"
    assert done.stderr.splitlines()[-1] == (
        f"error: seed 0 failed (exit status 2); run directory {runs / name}, log {runs / f'{name}.log'}"
    )
    assert str(missing) in (runs / f"{name}.log").read_text()
    assert not (runs / name.replace("seed0", "seed1.log")).exists()  # seed 1 never started
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seeds", "0", "--set", "train.seed=3"], "clashes with --seeds"),
        (["--seeds", "0", "0"], "give distinct seeds"),
        (["--seeds", "0", "--set", "optim.lrr=0.1"], "did you mean 'lr'"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(args, message, digits_dir, tmp_path) -> None:
    recipe = tiny_recipe(tmp_path / "tiny.toml", digits_dir)
    done = run_sweep(str(recipe), *args, "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_launch_commands() -> None:
    start = sweep.Seed(3, Path("runs/tiny-seed3"), "start")
    assert sweep.launch_command(start, "recipes/a.toml", ["train.epochs=2"], "python") == [
        sys.executable,
        str(sweep.SCRIPT),
        "recipes/a.toml",
        *("--set", "train.seed=3", "--set", "train.epochs=2"),
        *("--output-dir", "runs/tiny-seed3"),
    ]
    resume = sweep.Seed(3, Path("runs/tiny-seed3"), "resume")
    assert sweep.launch_command(resume, "recipes/a.toml", [], "accelerate") == [
        *(sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(sweep.SCRIPT)),
        *("--resume", "runs/tiny-seed3"),
    ]
    restart = sweep.Seed(3, Path("runs/tiny-seed3"), "restart")
    assert sweep.launch_command(restart, "recipes/a.toml", [], "python")[-1] == "--overwrite"
    assert sweep.run_dir_name("recipes/cifar10/wrn28_10.toml", [], 2) == "wrn28_10-seed2"
    assert sweep.run_dir_name("recipes/a.toml", ["optim.lr=0.2", "train.seed=9"], 0) == (
        f"a-{records.overrides_hash(['optim.lr=0.2'])}-seed0"
    )


def test_visible_gpus_are_the_cuda_visible_devices_entries(monkeypatch) -> None:
    class Probe:  # what `torch.cuda.device_count()` printed in the probe subprocess
        stdout = "2\n"

    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: Probe())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert sweep.visible_gpus() == ["5", "7"]  # each seed gets one of the parent's devices, not "0" and "1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sweep.visible_gpus() == ["0", "1"]
    Probe.stdout = "0\n"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # set, but no GPU there: run one after another
    assert sweep.visible_gpus() == []
