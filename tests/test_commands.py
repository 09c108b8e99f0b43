"""Every command a user types works: each `train_accelerate.py` command in README.md and docs/ runs with
`--dry-run`, every recipe dry-runs offline and accepts shortened epochs, `--help` answers without torch, and
`--show-defaults` prints the schema, and the README's Python blocks run. A dry run writes nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import ROOT, run_main, tree, write_imagefolder, write_parquet_dataset, write_recipe

from cifar_train.cli import main
from cifar_train.recipe import load_recipe

RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"((?:accelerate launch|torchrun|python)[^`\n|#\"]*?train_accelerate\.py[^`\n|#\"]*)")
LAUNCHER_OPTIONS_WITH_VALUES = {"--num_processes", "--nproc_per_node", "--num_machines", "--machine_rank",
                                "--main_process_ip", "--main_process_port", "--nnodes", "--node_rank",
                                "--master_addr", "--master_port", "--rdzv_endpoint", "--rdzv_backend"}  # fmt: skip


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every train_accelerate.py command written in the README and docs."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8").replace("\\\n", " ")  # shell line continuations
        for number, line in enumerate(text.splitlines(), start=1):
            for match in COMMAND.finditer(line):
                found.append((f"{_rel(document)}:{number}", match.group(1).strip()))
    return found


def train_arguments(command: str) -> list[str]:
    """The arguments after `train_accelerate.py`, launcher and its options removed."""
    words = shlex.split(command)
    return words[[w.endswith("train_accelerate.py") for w in words].index(True) + 1 :]


# dataset -> a local stand-in of the same shape (classes, channels, size) that the tests write themselves
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stand_ins")
    cifar10, cifar100, gray = root / "cifar10", root / "cifar100", root / "mnist"
    write_parquet_dataset(cifar10, splits={"train": 20, "test": 10}, size=32, classes=tuple(f"c{i}" for i in range(10)))
    write_parquet_dataset(
        cifar100, splits={"train": 20, "test": 10}, size=32, classes=tuple(f"c{i}" for i in range(100))
    )
    write_parquet_dataset(
        gray, splits={"train": 20, "test": 10}, size=28, channels=1, classes=tuple(str(i) for i in range(10))
    )
    imagenet = root / "imagenet"
    write_imagefolder(imagenet, splits={"train": 6, "validation": 3}, sizes=(40, 48))
    return {"cifar10": cifar10, "cifar100": cifar100, "mnist": gray, "fashion_mnist": gray, "kmnist": gray,
            "imagenet": imagenet}  # fmt: skip


@pytest.fixture(scope="module")
def extendable_run(tmp_path_factory, digits_dir) -> Path:
    """A finished one-epoch run on a multistep schedule, which `--resume RUN --set train.epochs=N` can extend."""
    root = tmp_path_factory.mktemp("extendable")
    recipe = write_recipe(root / "r.toml", digits_dir, schedule={"name": "multistep"}, train={"epochs": 1})
    assert run_main(main, str(recipe), "--output-dir", str(root / "run")).returncode == 0
    return root / "run"


COMMANDS = documented_commands()


def test_the_documents_hold_the_commands_they_promise():
    assert len(COMMANDS) > 300  # every results row has one
    assert any("--resume" in command for _, command in COMMANDS)
    assert any(command.startswith("torchrun") for _, command in COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("where,command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_documented_command_dry_runs(tmp_path, stand_ins, tiny_run, extendable_run, where, command):
    args = train_arguments(command)
    if args == ["--show-defaults"]:  # prints the schema; nothing to dry-run
        result = run_main(main, *args)
        assert result.returncode == 0 and "[schedule]\nname = " in result.stdout, f"{where}: {command}"
        return
    if "--resume" in args:  # a run to resume: a copy of a finished one (one whose schedule can grow, if asked to)
        at = args.index("--resume") + 1
        longer = any(a.startswith("train.epochs=") for i, a in enumerate(args) if i and args[i - 1] == "--set")
        shutil.copytree(extendable_run if longer else tiny_run.run_dir, tmp_path / "resumable")
        args[at] = str(tmp_path / "resumable")
    else:
        for i, arg in enumerate(args):  # ../shared's CIFAR-10 copy, absent beside a user's clone: its stand-in
            if arg.startswith("data.dataset=../shared/") and not (ROOT / arg.split("=", 1)[1]).exists():
                args[i] = f"data.dataset={stand_ins['cifar10']}"
        recipe = load_recipe(ROOT / args[0], [a for i, a in enumerate(args) if i and args[i - 1] == "--set"])
        if recipe.data.dataset in stand_ins:  # the Hub is out of reach here: its local stand-in
            args += ["--set", f"data.dataset={str(stand_ins[recipe.data.dataset])!r}"]
        args = [a for i, a in enumerate(args) if a != "--output-dir" and (i == 0 or args[i - 1] != "--output-dir")]
        args += ["--output-dir", str(tmp_path / "run")]
    result = run_main(main, *args, "--dry-run")
    assert result.returncode == 0, f"{where}: {command}\n{result.stderr}"
    assert "nothing was written" in result.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_every_recipe_dry_runs_offline_and_writes_nothing(tmp_path, recipe, _private_cache):
    before = tree(_private_cache)
    result = run_main(main, str(recipe), "--dry-run", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "nothing was written" in result.stdout
    assert not (tmp_path / "run").exists() and tree(_private_cache) == before


@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_every_recipe_accepts_shortened_epochs(recipe):
    epochs = tomllib.loads(recipe.read_text()).get("train", {}).get("epochs", 160)
    for shortened in sorted({1, 2, max(1, epochs // 2)}):
        said: list[str] = []
        loaded = load_recipe(recipe, [f"train.epochs={shortened}"], on_warning=said.append)
        assert loaded.train.epochs == shortened
        assert all("\n" not in line for line in said)


def test_the_readme_example_runs_and_says_why_the_lr_will_not_drop(tmp_path):
    result = run_main(
        main,
        "recipes/cifar10/resnet_preact110.toml", "--set", "train.epochs=10", "--set", "optim.lr=0.2",
        "--dry-run", "--output-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: schedule.milestones 80, 120 are at or after the last epoch (10)" in result.stderr


ENTRY_POINTS = [("run_path", "train_accelerate.py"), ("run_path", "evaluate.py")] + [
    ("run_module", f"cifar_train.{name}") for name in ("plot", "push", "results", "sweep")
]


@pytest.mark.parametrize("runner,script", ENTRY_POINTS, ids=[script for _, script in ENTRY_POINTS])
def test_help_answers_without_importing_torch(runner, script):
    probe = f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
    probe += f"try:\n    runpy.{runner}('{script}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    probe += "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO TORCH"), f"{script} --help imported torch"
    assert "usage:" in done.stdout


def test_show_defaults_lists_every_key_with_its_help():
    result = run_main(main, "--show-defaults")
    assert result.returncode == 0
    assert "[schedule]" in result.stdout and "sgdr_t_mul = 1.0" in result.stdout
    assert "# learning rate for the global batch" in result.stdout


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_the_readme_python_blocks_run(tmp_path):
    """The Python API block trains `runs/notebook` (the quickstart recipe, 3 epochs, offline) and evaluates it;
    the loading block then loads that run as `runs/quickstart`, each in a fresh interpreter as a user would."""
    blocks = _readme_python_blocks()
    api = next(block for block in blocks if "from cifar_train import" in block)
    load = next(block for block in blocks if "local-dir:runs/quickstart" in block)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    environment = {"CIFAR_RECIPES_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}

    def run(code: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, **environment},
        )  # fmt: skip
        assert done.returncode == 0, f"{code}\n{done.stderr}"
        return done

    top1 = float(run(api).stdout.strip().splitlines()[-1])
    final = json.loads((tmp_path / "runs" / "notebook" / "final_metrics.json").read_text())
    assert top1 == pytest.approx(final["val_acc1"]) and final["epoch"] == 3
    shutil.copytree(tmp_path / "runs" / "notebook", tmp_path / "runs" / "quickstart")
    shown = run(load + "\nprint(type(model).__name__, model.num_classes, model.training)").stdout.split()
    assert shown == ["PreActResNet", "10", "False"]
