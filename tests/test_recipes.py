"""Every recipe under recipes/ loads, builds its model and trains one step; the results tables match the recipes.

Parametrised over `recipes/**/*.toml` and over the commands in the README's results section and
docs/results.md, so a new recipe or table row is tested without new test code. Models are built once per
(architecture, kwargs, dataset shape) group, since many recipes share a model.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
import timm
import torch

import cifar_models  # noqa: F401  (registers the CIFAR architectures in timm)
from cifar_train.recipe import load_recipe
from cifar_train.schema import SECTIONS, Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RECIPE_PATHS = sorted(RECIPES.rglob("*.toml"))
# Recipes that reproduce no seed row (the lead's offline quickstart).
NOT_SEED_ROWS = {"recipes/quickstart.toml"}
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"

# dataset -> (num_classes, in_chans, test image side in pixels); ImageNet is tested at 64x64 to stay fast.
DATASET_SHAPES = {
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "mnist": (10, 1, 28),
    "fashion_mnist": (10, 1, 28),
    "kmnist": (10, 1, 28),
    "imagenet": (1000, 3, 64),
    "digits": (10, 1, 8),  # the quickstart's scikit-learn digits
}
# The deepest and widest models get one no-grad forward instead of a training step (their recipes' augmentation,
# optimizer and schedule are still built), to keep the suite fast on two CPU cores; tests/test_models.py covers
# their architectures, and every kind of step runs on the other models.
NO_STEP = {
    "vgg16_bn",
    "densenet121",
    "resnext50_32x4d",
    "resnet_preact1001",
    "resnext29_16x64d",
    "densenet100_k24",
    "densenet_bc250_k24",
    "densenet_bc190_k40",
    "pyramidnet164_270",
    "pyramidnet272_200",
}
TEST_BATCH = 2  # images per test step

COMMAND = re.compile(
    r"`(?:accelerate launch(?P<launch>[^`]*?)|python) train_accelerate\.py (?P<path>recipes/\S+?\.toml)"
    r"(?P<sets>(?: --set \S+)*)`"
)
# The "ours" cell (rendered from results/*.json by cifar_train.results): one run, or median (mean ± sd, n runs).
OURS = re.compile(r"\d+\.\d\d \((1 run|\d+\.\d\d ± \d+\.\d\d, \d+ runs); best \d+\.\d\d\)")
SEED_IN_HEADER = re.compile(r"\bseed (\d+\.\d+|none published)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _header(path: Path) -> list[str]:
    """The comment lines at the top of a recipe."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def _markdown_rows(text: str) -> list[dict[str, str]]:
    """Rows of every Markdown table in `text` as {column header: cell}."""
    rows, columns = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            columns = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if columns is None:
            columns = cells
        elif not set(line) <= set("|-: "):
            rows.append(dict(zip(columns, cells)))
    return rows


def _results_documents() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert RESULTS_START in readme and RESULTS_END in readme, "README.md has no results section markers"
    section = readme.split(RESULTS_START, 1)[1].split(RESULTS_END, 1)[0]
    assert section.lstrip().startswith("## Results")
    return {"README.md": section, "docs/results.md": (ROOT / "docs" / "results.md").read_text(encoding="utf-8")}


def _table_rows() -> list[dict[str, str]]:
    rows = []
    for doc, text in _results_documents().items():
        for row in _markdown_rows(text):
            if "command" in row:
                rows.append(dict(row, document=doc))
    return rows


def _parse_command(cell: str) -> tuple[str, list[str]] | None:
    match = COMMAND.fullmatch(cell)
    if match is None:
        return None
    return match["path"], match["sets"].split(" --set ")[1:]


def _dataset_shape(recipe: Recipe) -> tuple[int, int, int]:
    assert recipe.data.dataset in DATASET_SHAPES, f"no test shape for data.dataset = {recipe.data.dataset!r}"
    return DATASET_SHAPES[recipe.data.dataset]


# --------------------------------------------------------------------------------------------------------------
# Each recipe on its own


@pytest.mark.parametrize("path", RECIPE_PATHS, ids=_rel)
def test_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.model.name, "a recipe must pick a model"
    _dataset_shape(recipe)


@pytest.mark.parametrize("path", [p for p in RECIPE_PATHS if _rel(p) not in NOT_SEED_ROWS], ids=_rel)
def test_recipe_lists_only_differences(path: Path) -> None:
    """Only what differs from the schema defaults; `model.name` is always written, so a recipe names its model."""
    defaults = Recipe()
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for section, values in data.items():
        for key, value in values.items():
            if (section, key) in (("model", "kwargs"), ("model", "name")):
                continue
            default = getattr(getattr(defaults, section), key)
            assert value != default, f"{_rel(path)}: {section}.{key} = {value!r} repeats the schema default"
    assert set(data) <= set(SECTIONS)


@pytest.mark.parametrize("path", [p for p in RECIPE_PATHS if _rel(p) not in NOT_SEED_ROWS], ids=_rel)
def test_recipe_header_names_seed_row_and_own_command(path: Path) -> None:
    header = _header(path)
    assert header, f"{_rel(path)} starts with no comment header"
    seeds = [m.group(1) for line in header for m in SEED_IN_HEADER.finditer(line)]
    assert seeds, f"{_rel(path)}: the header names no seed number (or 'seed none published')"
    commands = [line.lstrip("# ") for line in header if line.lstrip("# ").startswith("accelerate launch")]
    assert commands, f"{_rel(path)}: the header shows no command"
    for command in commands:
        parsed = _parse_command(f"`{command}`")
        assert parsed is not None, f"{_rel(path)}: cannot read header command {command!r}"
        assert parsed[0] == _rel(path), f"{_rel(path)}: header command runs another recipe: {command!r}"

    # The header agrees with the tables: its seed numbers and commands are those of the rows that use it.
    rows = [r for r in _table_rows() if _rel(path) in r["command"]]
    table_seeds = " ".join(r.get("seed", "") for r in rows)
    table_commands = {r["command"].strip("`") for r in rows}
    for seed in seeds:
        if seed != "none published":
            assert seed in table_seeds, f"{_rel(path)}: header seed {seed} is in no table row for this recipe"
    for command in commands:
        assert command in table_commands, f"{_rel(path)}: header command {command!r} is in no results table"


def test_wrn_ricap_is_wrn28_10_with_ricap() -> None:
    recipe = load_recipe(RECIPES / "wrn_ricap.toml")
    assert recipe.model.name == "wrn28_10"
    assert recipe.data.dataset == "cifar10"
    assert recipe.augment.mix == "ricap"
    assert recipe.augment.ricap_beta == 0.3
    assert recipe.augment.random_crop is False  # the seed's RICAP runs crop nothing
    assert recipe.train.epochs == 200


# --------------------------------------------------------------------------------------------------------------
# The results tables (README + docs/results.md)


def test_every_table_command_runs_an_existing_recipe_and_loads() -> None:
    problems = []
    for row in _table_rows():
        cell = row["command"]
        if not cell.startswith("`"):
            continue  # a row the seed ran that we cannot (pure fp16); its cell says why
        parsed = _parse_command(cell)
        if parsed is None:
            problems.append(f"{row['document']}: unreadable command {cell}")
            continue
        path, overrides = parsed
        if not (ROOT / path).is_file():
            problems.append(f"{row['document']}: {path} does not exist")
            continue
        try:
            load_recipe(ROOT / path, overrides)
        except Exception as err:  # the message names the bad key; collect them all
            problems.append(f"{row['document']}: {cell}: {err}")
    assert not problems, "\n".join(problems)


def test_every_recipe_is_in_a_results_table_and_vice_versa() -> None:
    in_tables = set()
    for row in _table_rows():
        parsed = _parse_command(row["command"])
        if parsed is not None:
            in_tables.add(parsed[0])
    on_disk = {_rel(p) for p in RECIPE_PATHS} - NOT_SEED_ROWS
    assert on_disk - in_tables == set(), "recipes that no results table runs"
    assert in_tables - on_disk == set(), "table commands whose recipe does not exist"


def test_tables_state_seed_numbers_and_ours() -> None:
    rows = _table_rows()
    seed_rows = [row for row in rows if "seed row" in row]
    assert len(seed_rows) > 300  # every seed row, sweeps included
    for row in seed_rows:
        assert "seed" in row and "ours" in row, f"table without seed/ours columns: {row}"
        assert row["seed"] == "—" or re.match(r"\d+\.\d+", row["seed"]), row
        assert row["ours"] in ("not yet run", "—") or OURS.fullmatch(row["ours"]), row
    for row in rows:  # our own runs (no seed row): last-epoch and best error, or "not yet run"
        if "seed row" not in row:
            assert row.keys() >= {"what", "hardware", "last-epoch error", "best error"}, row
            assert row["last-epoch error"] == "not yet run" or re.match(r"\d+\.\d\d", row["last-epoch error"]), row
    readme = _results_documents()["README.md"]
    assert "last epoch" in readme, "the README must say the seed's numbers are last-epoch test error"


# --------------------------------------------------------------------------------------------------------------
# Building each recipe's model and training one step


def _model_groups() -> dict[str, list[Path]]:
    """Recipes grouped by the model they build: name, kwargs and input channels (the class count is a head swap)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in RECIPE_PATHS:
        recipe = load_recipe(path)
        key = f"{recipe.model.name}-{_dataset_shape(recipe)[1]}ch"
        if recipe.model.kwargs:
            key += "-" + "-".join(f"{k}={v}" for k, v in sorted(recipe.model.kwargs.items()))
        groups[key].append(path)
    return dict(sorted(groups.items()))


MODEL_GROUPS = _model_groups()


def _step_signature(recipe: Recipe) -> tuple:
    """What changes the forward/backward/step itself; recipes of one model that agree on it share one step."""
    o, t = recipe.optim, recipe.train
    return (o.name, o.no_weight_decay_on_bn, recipe.augment.dual_cutout_alpha > 0, t.subdivision > 1, t.precision)


def _augment(recipe: Recipe, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's batch augmentation (ImageNet streams per-sample transforms instead: plain scaling there)."""
    from cifar_train.components import build_augment
    from cifar_train.data import DatasetInfo

    num_classes, channels, size = _dataset_shape(recipe)
    if recipe.data.dataset == "imagenet":
        inputs, targets = images.float().div(255).sub(0.5), torch.nn.functional.one_hot(labels, num_classes).float()
    else:
        info = DatasetInfo(
            name=recipe.data.dataset,
            num_classes=num_classes,
            class_names=[str(i) for i in range(num_classes)],
            channels=channels,
            image_size=(size, size),
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
        )
        index = torch.arange(len(images))  # the images' dataset indices (alternating flips use them)
        inputs, targets = build_augment(recipe, info)(images, labels, index=index, epoch=0)
    views = 2 if recipe.augment.dual_cutout_alpha > 0 else 1
    assert inputs.shape == (views * len(images), *images.shape[1:]), f"augmented batch {tuple(inputs.shape)}"
    assert targets.shape == (len(inputs), num_classes)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(inputs)))
    return inputs, targets


def _train_step(model: torch.nn.Module, recipe: Recipe, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One optimizer step as the recipe configures it, checked for a finite loss, the lr and a changed weight."""
    from cifar_train.components import build_optimizer, build_scheduler
    from cifar_train.losses import dual_cutout_loss, soft_cross_entropy
    from cifar_train.schedule import schedule_curve
    from cifar_train.schema import section_kwargs

    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=10)
    start = schedule_curve(steps_per_epoch=10, epochs=recipe.train.epochs, **section_kwargs(recipe.schedule))(0)
    lr = optimizer.param_groups[0]["lr"]
    assert math.isclose(lr, recipe.optim.lr * start), "step 0 must use the recipe's lr times its schedule's start"
    dual = recipe.augment.dual_cutout_alpha
    views = inputs.chunk(2) if dual > 0 else (inputs,)
    targets = targets[: len(views[0])]
    chunks = min(recipe.train.subdivision, len(targets))  # ghost batches, as far as a tiny batch allows
    classifier = model.get_classifier().weight
    before = classifier.detach().clone()
    model.train()
    optimizer.zero_grad()
    precision = {"auto": None, "no": None, "fp16": torch.bfloat16, "bf16": torch.bfloat16}[recipe.train.precision]
    for j in range(chunks):
        with torch.autocast("cpu", dtype=precision, enabled=precision is not None):
            outputs = [model(v.chunk(chunks)[j]) for v in views]
            target = targets.chunk(chunks)[j]
            assert outputs[0].shape == target.shape
            if dual > 0:
                loss = dual_cutout_loss(outputs[0], outputs[1], target, dual)
            else:
                loss = soft_cross_entropy(outputs[0], target)
        assert torch.isfinite(loss), f"non-finite loss {loss.item()}"
        (loss / chunks).backward()
    optimizer.step()
    scheduler.step()
    assert not torch.equal(before, classifier.detach()), "one step left the classifier unchanged"
    assert 0 < optimizer.param_groups[0]["lr"] <= recipe.optim.lr * (1 + 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("group", list(MODEL_GROUPS), ids=str)
def test_recipes_build_their_model_and_train_one_step(group: str) -> None:
    """Build the group's model once; every recipe augments a batch and builds its optimizer and schedule, and
    each distinct kind of step (optimizer, BN decay, ghost batch, Dual-Cutout, precision) trains once."""
    recipes = {path: load_recipe(path) for path in MODEL_GROUPS[group]}
    first = next(iter(recipes.values()))
    num_classes, channels, size = _dataset_shape(first)
    assert first.model.name in timm.list_models(), f"model {first.model.name!r} is not registered in timm"
    torch.manual_seed(0)
    model = timm.create_model(first.model.name, num_classes=num_classes, in_chans=channels, **first.model.kwargs)
    images = torch.randint(0, 256, (TEST_BATCH, channels, size, size), dtype=torch.uint8)
    labels = torch.arange(TEST_BATCH)
    if first.model.name in NO_STEP:
        # Train mode: at initialisation, eval-mode BN (running stats 0 / 1) lets ResNet-preact-1001 overflow to NaN.
        model.train()
        with torch.no_grad():
            logits = model(images.float().div(255))
        assert logits.shape == (TEST_BATCH, num_classes) and torch.isfinite(logits).all()

    try:
        import cifar_train.loop  # noqa: F401
    except ImportError as err:
        pytest.skip(f"the training API (cifar_train.loop) does not import yet: {err}")
    from cifar_train.loop import build_optimizer, build_scheduler

    stepped = set()
    for path, recipe in recipes.items():
        try:
            classes = _dataset_shape(recipe)[0]
            if model.get_classifier().out_features != classes:
                model.reset_classifier(classes)
            inputs, targets = _augment(recipe, images, labels % classes)
            signature = _step_signature(recipe)
            if signature not in stepped and first.model.name not in NO_STEP:
                _train_step(model, recipe, inputs, targets)
                stepped.add(signature)
            else:  # the same kind of step again (CIFAR-100 differs only in the head); optimizer and schedule build
                build_scheduler(build_optimizer(model, recipe), recipe, steps_per_epoch=10)
        except AssertionError as err:
            raise AssertionError(f"{_rel(path)}: {err}") from err
