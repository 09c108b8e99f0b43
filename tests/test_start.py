"""Checks before work, kept by the real start and the dry run alike, and interrupts while a run starts.

The README promises that whatever would stop a run is found before the work begins, and that `--dry-run` finds
it too; a hostile trial found read-only folders, raw idx files, seeds numpy refuses and an offline `hub.push_to`
getting past both, and a Ctrl-C during the first decode lost. Real files, real mounts, real signals.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    TRAIN_SCRIPT,
    assert_one_line_error,
    run_main,
    write_imagefolder,
    write_parquet_dataset,
    write_recipe,
)

from cifar_train.cli import evaluate_main, main
from cifar_train.rundir import RunDirectory


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder nobody here can write to: a read-only bind mount as root (root ignores permissions), else 0o555."""
    source, folder = tmp_path / "ro_source", tmp_path / "ro"
    source.mkdir()
    folder.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", str(source), str(folder)], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)]).returncode != 0:
            if mounted:
                subprocess.run(["umount", str(folder)])
            pytest.skip("running as root without permission to mount a read-only folder")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
        return
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def _no_data(monkeypatch):
    import cifar_train.loop

    def refuse(**kwargs):
        raise AssertionError("the dataset was opened before the checks")

    monkeypatch.setattr(cifar_train.loop, "open_training_data", refuse)


@pytest.mark.parametrize("dry_run", [False, True], ids=["start", "dry-run"])
def test_a_read_only_output_directory_is_refused_before_the_data(tmp_path, digits_dir, read_only, monkeypatch, dry_run):
    _no_data(monkeypatch)
    recipe = write_recipe(tmp_path / "r.toml", digits_dir)
    result = run_main(main, str(recipe), "--output-dir", str(read_only / "run"), *(["--dry-run"] if dry_run else []))
    assert_one_line_error(result, f"output directory {str(read_only / 'run')!r} cannot be written", "read-only")
    assert not any(read_only.iterdir())


def test_a_read_only_decode_cache_warns_and_the_run_goes_on(tmp_path, read_only, monkeypatch):
    data = tmp_path / "data"
    write_parquet_dataset(data, splits={"train": 40, "test": 9})
    recipe = write_recipe(tmp_path / "r.toml", data, train={"epochs": 1}, data={"cache_dir": str(read_only)})
    result = run_main(main, str(recipe), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "decode cache" in line and "read-only" in line]
    assert len(warnings) == 2  # train and test, one line each
    assert not any(read_only.iterdir())


def test_evaluation_refuses_an_unwritable_output_folder_before_loading(tiny_run, read_only, monkeypatch):
    import cifar_train.evaluation

    def refuse(source):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(cifar_train.evaluation, "load_model", refuse)
    result = run_main(evaluate_main, str(tiny_run.run_dir), "--out-dir", str(read_only / "eval"))
    assert_one_line_error(result, "--out-dir", "read-only")
    result = run_main(evaluate_main, str(tiny_run.run_dir), "--predictions", str(read_only / "p.jsonl"))
    assert_one_line_error(result, "--predictions", "read-only")


# --------------------------------------------------------------------------------------------------
# The dry run refuses what the real start refuses


@pytest.fixture(scope="module")
def odd_datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    idx = root / "idx"
    idx.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (idx / name).write_bytes(b"\0" * 16)
    write_imagefolder(root / "one_class", splits={"train": 8, "test": 4}, classes=("cat",), sizes=(8,))
    write_parquet_dataset(root / "small", splits={"train": 16, "test": 4}, size=8)
    return {"idx": idx, "one_class": root / "one_class", "small": root / "small"}


CASES = {
    "raw idx files": ("idx", [], "holds raw idx files"),
    "a seed numpy cannot take": ("small", ["train.seed=4294967296"], "train.seed = 4294967296 is out of range"),
    "hub.push_to offline": ("small", ["hub.push_to='someone/model'"], "hub.push_to = 'someone/model'"),
    "a missing split": ("small", ["data.val_split='validation'"], "split 'validation' not found"),
    "a Cutout larger than the images": ("small", ["augment.cutout=16"], "augment.cutout = 16 is larger than the 8x8"),
    "crop padding as large as the images": ("small", ["augment.crop_padding=8"], "augment.crop_padding = 8"),
    "one class": ("one_class", [], "the dataset has 1 class(es); a classifier needs at least 2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_dry_run_refuses_what_the_start_refuses(tmp_path, odd_datasets, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dataset, overrides, fragment = CASES[case]
    recipe = write_recipe(tmp_path / "r.toml", odd_datasets[dataset], train={"epochs": 1, "batch_size": 4})
    sets = [arg for item in overrides for arg in ("--set", item)]
    lines = []
    for extra in ([], ["--dry-run"]):
        result = run_main(main, str(recipe), "--output-dir", str(tmp_path / "run"), *sets, *extra)
        lines.append(assert_one_line_error(result, fragment))
        assert not (tmp_path / "run").exists()
    assert lines[0] == lines[1]  # the same words from both


# --------------------------------------------------------------------------------------------------
# Interrupts while starting


@pytest.fixture(scope="module")
def slow_to_decode(tmp_path_factory) -> Path:
    """Enough images that the first decode runs on the worker pool for a second or more."""
    root = tmp_path_factory.mktemp("slow")
    write_parquet_dataset(root / "data", splits={"train": 12288, "test": 64}, size=16)
    return root / "data"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_during_the_first_decode_ends_the_start(tmp_path, slow_to_decode, signum):
    """As a terminal's Ctrl-C does: the whole process group gets it, the decode workers included."""
    recipe = write_recipe(tmp_path / "r.toml", slow_to_decode, train={"epochs": 1})
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), str(recipe), "--output-dir", str(tmp_path / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "CIFAR_RECIPES_CACHE": str(cache), "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    for line in proc.stdout:
        if "decoding [train]" in line:
            os.killpg(proc.pid, signum)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert stderr.strip() == f"interrupted by {name} while starting, before training; nothing was written", stderr
    assert not (tmp_path / "run").exists()
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def test_a_fresh_run_that_fails_before_its_first_epoch_leaves_no_run_directory(tmp_path):
    path = tmp_path / "run"
    with pytest.raises(RuntimeError), RunDirectory(path) as run:
        run.open(main_process=True, recipe_toml="[model]\n", env={})
        assert (path / "recipe.toml").is_file()
        raise RuntimeError("stopped while starting")
    assert not path.exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "old.txt").write_text("a previous run's")
    with pytest.raises(RuntimeError), RunDirectory(existing, overwrite=True) as run:
        run.open(main_process=True, recipe_toml="[model]\n", env={})
        raise RuntimeError("stopped while starting")
    assert existing.is_dir() and not any(existing.iterdir())  # emptied by --overwrite, as asked; nothing half-made
    shutil.rmtree(existing)


def test_an_alias_is_shown_as_the_alias_not_the_folder_it_is_cached_in(tmp_path):
    """`digits` is written once into the decode cache; the lines people read name `digits`, not that folder."""
    recipe = write_recipe(tmp_path / "r.toml", "digits", train={"epochs": 1})
    result = run_main(main, str(recipe), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("data: ") and "decoding" not in line]
    assert len(lines) == 2 and all(line.startswith("data: digits [") for line in lines), lines
    assert "sklearn_digits" not in result.stdout + result.stderr
    card = (tmp_path / "run" / "README.md").read_text()
    assert "trained on digits (scikit-learn's 8x8 handwritten digits)" in card and "sklearn_digits" not in card
