"""Each interface speaks its own language: the Python API is told `resume=True`, `split=`..., `train_accelerate.py`
its flags and recipe keys, `evaluate.py` its own options, never a recipe key it cannot set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_main

from cifar_train import evaluate, load_recipe, train
from cifar_train.cli import evaluate_main, main
from cifar_train.errors import Interrupted, UserError
from cifar_train.wording import speaking


def test_training_in_python_is_told_keywords_and_on_the_command_line_flags(tiny_run, tmp_path):
    recipe = load_recipe(tiny_run.recipe)
    with pytest.raises(UserError) as info:
        train(recipe, tiny_run.run_dir)
    message = str(info.value)
    assert "resume=True" in message and "overwrite=True" in message and "--" not in message
    result = run_main(main, str(tiny_run.recipe), "--output-dir", str(tiny_run.run_dir))
    assert_one_line_error(result, f"--resume {tiny_run.run_dir}", "--overwrite", "--output-dir")


def test_overrides_are_named_as_they_were_given():
    with pytest.raises(UserError, match=r"^override 'trainepochs' is not of the form section\.key=value"):
        load_recipe(None, ["trainepochs"])
    result = run_main(main, "recipes/quickstart.toml", "--set", "trainepochs", "--dry-run")
    assert_one_line_error(result, "--set 'trainepochs' is not of the form section.key=value")


def test_evaluation_is_told_its_own_options(tiny_run, tmp_path):
    with pytest.raises(UserError, match=r"^split: split 'nope' not found") as info:
        evaluate(tiny_run.run_dir, split="nope")
    assert "data.val_split" not in str(info.value)
    result = run_main(evaluate_main, str(tiny_run.run_dir), "--split", "nope")
    line = assert_one_line_error(result, "--split: split 'nope' not found")
    assert "data.val_split =" not in line  # no advice to edit a recipe evaluate.py cannot set
    result = run_main(evaluate_main, str(tiny_run.run_dir), "--label-column", "nope")
    assert_one_line_error(result, "--label-column: column 'nope' not found")
    with pytest.raises(UserError, match=r"^label_column: column 'nope' not found"):
        evaluate(tiny_run.run_dir, label_column="nope")


def test_the_run_s_own_split_missing_is_said_as_the_default_of_split(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    text = (run_dir / "recipe.toml").read_text()
    (run_dir / "recipe.toml").write_text(text.replace('val_split = "test"', 'val_split = "validation"'))
    result = run_main(evaluate_main, str(run_dir), "--json")
    assert_one_line_error(result, "--split (default: the run's data.val_split): split 'validation' not found")


def test_an_interrupt_says_how_to_continue_in_the_interface_that_ran(tmp_path):
    stop = Interrupted(2, Path("runs/x/checkpoints/step_000000010_e0001_b000000"))
    assert stop.describe().endswith("continue with: train(None, 'runs/x', resume=True)")
    with speaking(interface="cli"):
        assert stop.describe().endswith("continue with: python train_accelerate.py --resume runs/x")
    assert (
        Interrupted(15, None).describe()
        == "interrupted by SIGTERM while starting, before training; nothing was written"
    )
