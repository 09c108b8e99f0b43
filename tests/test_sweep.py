"""`python -m cifar_train.sweep` on this machine (the local executor), and what every sweep shares.

Real runs (ResNet-20 on 128 of scikit-learn's digits, two epochs) through the real command line, on the CPU: a
2-row table x 2 seeds one after another, a second call that skips them all, unfinished runs continued side by
side (one per "GPU" slot; CUDA_VISIBLE_DEVICES names no real GPU here), a failing run that does not stop the
next. Without training (quick): the runs a grid, a table's rows and several recipes make, what `--dry-run`
lists, and bad input. The same table through Slurm is in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import run_main, run_sweep, write_recipe, write_table

from cifar_train import records, results
from cifar_train.sweep import cli, local, plan

ROOT = Path(__file__).resolve().parents[1]


def tiny_table(folder: Path, dataset: Path) -> tuple[Path, Path]:
    """The standard tiny recipe at 2 epochs, and a table of it in two rows (the second at another lr)."""
    recipe = write_recipe(folder / "tiny.toml", dataset, train={"epochs": 2, "checkpoint_every": 10})
    rows = [{"label": "tiny", "recipe": str(recipe)}, {"label": "tiny lr", "recipe": str(recipe)}]
    rows[1]["overrides"] = ["optim.lr=0.02"]
    return recipe, write_table(folder / "tables.toml", "Tiny", rows)


def table_run_dirs(runs: Path) -> list[Path]:
    """The four run directories of the tiny table x seeds 0, 1, in row then seed order."""
    rows = ([], ["optim.lr=0.02"])
    return [runs / plan.run_dir_name("tiny.toml", overrides, seed) for overrides in rows for seed in (0, 1)]


def files_and_mtimes(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def check_table_sweep(recipe: Path, tables: Path, runs: Path, out: Path) -> None:
    """Four finished runs of the right recipe, overrides and seed, four records, each row rendered from 2 runs."""
    run_dirs = table_run_dirs(runs)
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == sorted(
        [*(d.name for d in run_dirs), *(f"{d.name}.log" for d in run_dirs)]
    )
    for run_dir, (lr, seed) in zip(run_dirs, [(0.05, 0), (0.05, 1), (0.02, 0), (0.02, 1)], strict=True):
        resolved = tomllib.loads((run_dir / "recipe.toml").read_text())
        assert (resolved["train"]["seed"], resolved["optim"]["lr"]) == (seed, lr)
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        assert json.loads((run_dir / "final_metrics.json").read_text())["epoch"] == 2
        log = run_dir.with_name(f"{run_dir.name}.log").read_text()
        assert log.startswith("=== ") and f"--set train.seed={seed}" in log.splitlines()[0]
        assert "final val top-1" in log  # the run's own output went to its log
    found = records.load_records(out)
    assert sorted((r["seed"], tuple(r["overrides"])) for r in found) == [
        (0, ("train.seed=0",)),
        (0, ("train.seed=0", "optim.lr=0.02")),
        (1, ("train.seed=1",)),
        (1, ("train.seed=1", "optim.lr=0.02")),
    ]
    assert all(r["recipe"] == recipe.as_posix() and r["epochs"] == 2 for r in found)
    readme = results.render(results.load_tables(tables), found)["README.md"]
    assert readme.count(", 2 runs; best ") == 2  # each row: its two seeds
    assert "4 run records, each counted in the row it ran" in readme


@pytest.fixture(scope="module")
def swept(tmp_path_factory, digits_dir):
    """The tiny table's two rows x seeds 0, 1, swept once here: (recipe, tables, runs dir, results dir, process)."""
    folder = tmp_path_factory.mktemp("sweep")
    recipe, tables = tiny_table(folder, digits_dir)
    runs, out = folder / "runs", folder / "results"
    table = ["--table", "Tiny", "--tables", str(tables)]
    done = run_sweep(*table, "--seeds", "0", "1", "--runs-dir", str(runs), "--results", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return recipe, tables, runs, out, done


@pytest.mark.slow
def test_a_two_row_table_times_two_seeds_gives_four_runs_and_four_records(swept) -> None:
    recipe, tables, runs, out, done = swept
    check_table_sweep(recipe, tables, runs, out)
    for run_dir in table_run_dirs(runs):
        assert f"{run_dir.name}: starting ({run_dir})" in done.stdout
    assert done.stdout.count("recorded ") == 4
    assert "the tables from the records: python -m cifar_train.results table --write" in done.stdout


@pytest.mark.slow
def test_a_second_call_skips_finished_runs_and_touches_nothing(swept) -> None:
    _, tables, runs, out, _ = swept
    before = files_and_mtimes(runs, out)
    again = run_sweep(
        "--table", "Tiny", "--tables", str(tables), "--seeds", "0", "1", "--runs-dir", str(runs), "--results", str(out)
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished, skipping") == 4 and "starting" not in again.stdout
    assert again.stdout.count("already recorded") == 4 and "table --write" not in again.stdout  # nothing new
    assert files_and_mtimes(runs, out) == before


@pytest.mark.slow
def test_with_weights_records_copy_the_finished_runs_weights(swept, tmp_path) -> None:
    _, tables, runs, _, _ = swept
    out = tmp_path / "results"
    done = run_sweep(
        "--table", "Tiny", "--tables", str(tables), "--rows", "tiny", "--seeds", "0", "1",
        "--runs-dir", str(runs), "--results", str(out), "--with-weights",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("finished, skipping") == 2 and done.stdout.count("recorded ") == 2
    for record in records.load_records(out):
        folder = out / "weights" / Path(record["file"]).stem
        run_dir = runs / f"tiny-seed{record['seed']}"
        assert record["weights"].startswith(f"Committed in {folder}/")
        assert (folder / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_unfinished_runs_continue_from_their_checkpoints_side_by_side(swept, tmp_path) -> None:
    _, tables, runs, out, _ = swept
    runs_copy, out_copy = shutil.copytree(runs, tmp_path / "runs"), shutil.copytree(out, tmp_path / "results")
    unfinished = [runs_copy / "tiny-seed0", runs_copy / "tiny-seed1"]
    for run_dir in unfinished:
        (run_dir / "final_metrics.json").unlink()
    done = run_sweep(
        *("--table", "Tiny", "--tables", str(tables), "--rows", "1", "--seeds", "0", "1"),
        *("--runs-dir", str(runs_copy), "--results", str(out_copy)),
        *("--gpus", "0", "1", "--launcher", "python"),  # two slots: both runs at once, each told its own device
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("continuing from its newest checkpoint") == 2
    assert "tiny-seed0: running on GPU 0" in done.stdout and "tiny-seed1: running on GPU 1" in done.stdout
    for run_dir in unfinished:
        assert json.loads((run_dir / "final_metrics.json").read_text())["epoch"] == 2
        log = run_dir.with_name(f"{run_dir.name}.log").read_text()
        assert log.count("=== ") == 2 and f"--resume {run_dir}" in log
    assert len(list(out_copy.glob("*.json"))) == 4  # the same runs: still four records


@pytest.mark.slow
def test_a_failing_run_is_reported_with_its_log_and_the_next_still_runs(digits_dir, tmp_path) -> None:
    missing = tmp_path / "no_such_dataset"
    bad = write_recipe(tmp_path / "bad.toml", missing, train={"epochs": 1})
    good = write_recipe(tmp_path / "good.toml", digits_dir, train={"epochs": 1})
    runs, out = tmp_path / "runs", tmp_path / "results"
    done = run_sweep(str(bad), str(good), "--seeds", "0", "--runs-dir", str(runs), "--results", str(out))
    assert done.returncode == 2  # the failed run's own exit status (a dataset that does not exist)
    assert done.stderr.splitlines()[-1] == (
        f"error: bad-seed0 failed (exit status 2); run directory {runs / 'bad-seed0'}, log {runs / 'bad-seed0.log'}"
    )
    assert str(missing) in (runs / "bad-seed0.log").read_text()
    assert (runs / "good-seed0" / "final_metrics.json").is_file()  # the failure did not stop the next run
    assert [r["recipe"] for r in records.load_records(out)] == [good.as_posix()]


# --------------------------------------------------------------------------------------------------------------
# Without training


def test_a_grid_times_seeds_lists_every_combination_and_runs_nothing(digits_dir, tmp_path) -> None:
    recipe = write_recipe(tmp_path / "tiny.toml", digits_dir)
    runs = tmp_path / "runs"
    result = run_main(
        cli.main,
        *(str(recipe), "--grid", "optim.lr=0.1,0.2", "--grid", "train.batch_size=16,32", "--seeds", "0", "1"),
        *("--set", "train.epochs=1", "--runs-dir", str(runs), "--dry-run"),
    )
    assert result.returncode == 0, result.stderr
    listed = [line for line in result.stdout.splitlines() if line.startswith(str(runs))]
    assert len(listed) == 8 and all("  new  " in line for line in listed)
    commands = [line.strip() for line in result.stdout.splitlines() if "train_accelerate.py" in line]
    for lr in ("0.1", "0.2"):
        for batch in ("16", "32"):
            for seed in (0, 1):
                point = [f"optim.lr={lr}", f"train.batch_size={batch}", "train.epochs=1"]
                sets = " ".join(f"--set {item}" for item in [f"train.seed={seed}", *point])
                name = plan.run_dir_name(recipe, point, seed)
                assert sum(sets in c and c.endswith(f"--output-dir {runs / name}") for c in commands) == 1
    assert result.stdout.splitlines()[-1] == "8 runs: 8 new"
    assert not runs.exists()


def test_table_rows_by_number_and_label_and_several_recipes(digits_dir, tmp_path) -> None:
    recipe, tables = tiny_table(tmp_path, digits_dir)
    other = write_recipe(tmp_path / "other.toml", digits_dir, model={"name": "resnet_preact20"})
    targets = plan.table_targets(tables, "Tiny", ["2"]) + plan.table_targets(tables, "Tiny", ["tiny"])
    assert [(t.overrides, t.label) for t in targets] == [(("optim.lr=0.02",), "row 2: tiny lr"), ((), "row 1: tiny")]
    runs = plan.expand([*targets, *plan.recipe_targets([str(other)])], [], [], [3], tmp_path / "runs")
    assert [run.run_dir.name for run in runs] == [
        plan.run_dir_name(recipe, ["optim.lr=0.02"], 3),
        "tiny-seed3",
        "other-seed3",
    ]
    assert plan.run_dir_name("recipes/cifar10/wrn28_10.toml", [], 2) == "cifar10-wrn28_10-seed2"
    pinned = plan.run_dir_name("recipes/cifar10/wrn28_10_ricap_512.toml", [], 0, 8)
    assert pinned == "cifar10-wrn28_10_ricap_512-np8-seed0"


@pytest.mark.slow  # the finished run it copies trains first
def test_every_row_of_a_seed_table_is_a_run_and_the_states_show(digits_dir, tiny_run, tmp_path) -> None:
    """The real tables: a table's rows become runs (a row's --num_processes pins its process count), and a run
    directory's state is new, finished, checkpointed, or running while its lock is held."""
    heading = "CIFAR-10: WRN-28-10 + RICAP on several GPUs (global batch 512)"
    targets = plan.table_targets(ROOT / "results" / "seed_tables.toml", heading, [])
    assert [t.processes for t in targets] == [None, 2, 4, 8]
    runs_dir = tmp_path / "runs"
    run = plan.Run(str(tiny_run.recipe), (), 0, runs_dir / "tiny-seed0")
    assert str(plan.state(run)) == "new"
    shutil.copytree(tiny_run.run_dir, run.run_dir)
    assert str(plan.state(run)) == "finished"
    (run.run_dir / "final_metrics.json").unlink()
    assert str(plan.state(run)) == "checkpointed"
    assert plan.train_arguments(run, plan.state(run)) == ["--resume", str(run.run_dir)]
    from cifar_train.rundir import RunLock

    lock = RunLock(run.run_dir)
    lock.acquire()
    try:
        assert str(plan.state(run)).startswith("running (pid ")
    finally:
        lock.release()
    shutil.rmtree(run.run_dir / "checkpoints")
    assert plan.train_arguments(run, plan.state(run))[-1] == "--overwrite"  # no checkpoint: started again


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seeds", "0", "--set", "train.seed=3"], "clashes with --seeds"),
        (["--seeds", "0", "0"], "give distinct seeds"),
        (["--seeds", "0", "--set", "optim.lrr=0.1"], "did you mean 'lr'"),
        (["--seeds", "0", "--grid", "optim.lr"], "--grid 'optim.lr': give section.key=v1,v2"),
        (["--seeds", "0", "--grid", "optim.lr=0.1", "--grid", "optim.lr=0.2"], "names optim.lr twice"),
        (["--seeds", "0", "--grid", "optim.lrr=0.1,0.2"], "did you mean 'lr'"),
        (["--seeds", "0", "--rows", "1"], "--rows needs --table"),
        (["--seeds", "0", "--table", "Tiy"], "did you mean 'Tiny'"),
        (["--seeds", "0", "--table", "Tiny", "--rows", "3"], "row number 1-2 or a label"),
        (["--seeds", "0", "--executor", "slurm", "--time", "1:2:3:4"], "--time '1:2:3:4'"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(args, message, digits_dir, tmp_path) -> None:
    recipe, tables = tiny_table(tmp_path, digits_dir)
    what = [] if "--table" in args else [str(recipe)]
    result = run_main(cli.main, *what, *args, "--tables", str(tables), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_launch_prefixes_and_grid_values() -> None:
    assert local.launch_prefix("python") == [sys.executable]
    assert local.launch_prefix("accelerate") == [
        *(sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1")
    ]
    assert local.launch_prefix("python", 4)[-3:] == ["--multi_gpu", "--num_processes", "4"]
    assert plan.grid_overrides(["optim.lr=0.1,0.2", 'model.kwargs={ a = [1, 2] },{ a = "x,y" }']) == [
        ("optim.lr=0.1", "model.kwargs={ a = [1, 2] }"),
        ("optim.lr=0.1", 'model.kwargs={ a = "x,y" }'),
        ("optim.lr=0.2", "model.kwargs={ a = [1, 2] }"),
        ("optim.lr=0.2", 'model.kwargs={ a = "x,y" }'),
    ]


def test_slurm_options_reach_the_sbatch_script(tmp_path) -> None:
    """Every option the sweep passes is one submitit knows, and lands in the job script as sbatch reads it."""
    submitit_slurm = pytest.importorskip("submitit.slurm.slurm", reason="submitit (the slurm extra) writes the script")
    from cifar_train.sweep.slurm import SlurmOptions, parse_time

    options = SlurmOptions(
        time_min=parse_time("1-02:03:00"), partition="gpu", nodes=2, gpus_per_node=4, cpus_per_task=8,
        account="acct", qos="high", constraint="a100", array_parallelism=3, signal_delay_s=90, extra={"mem": "32G"},
    )  # fmt: skip
    script = submitit_slurm._make_sbatch_string(command="true", folder=tmp_path, map_count=10, **options.parameters())
    for line in ("--time=1563", "--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--cpus-per-task=8",
                 "--account=acct", "--qos=high", "--constraint=a100", "--array=0-9%3", "--signal=USR2@90",
                 "--mem=32G", "--requeue", "--ntasks-per-node=1"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert options.processes == 8
    assert [parse_time(t) for t in ("240", "4:00:00", "30:00", "2-0:30", "0:0:30")] == [240, 240, 30, 2910, 1]


def test_visible_gpus_are_the_cuda_visible_devices_entries(monkeypatch) -> None:
    class Probe:  # what `torch.cuda.device_count()` printed in the probe subprocess
        stdout = "2\n"

    monkeypatch.setattr(local.subprocess, "run", lambda *a, **k: Probe())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert local.visible_gpus() == ["5", "7"]  # each run gets one of the parent's devices, not "0" and "1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert local.visible_gpus() == ["0", "1"]
    Probe.stdout = "0\n"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # set, but no GPU there: run one after another
    assert local.visible_gpus() == []
