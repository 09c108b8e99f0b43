"""What a sweep runs: recipes, rows of a seed table, or a grid of `--set` values, times seeds; and where each run is.

A `Run` is one training run (a recipe, its `--set` overrides, a seed, a process count) and its run directory,
`<runs-dir>/<name>[-<overrides hash>][-np<P>]-seed<S>`, where the name is the recipe's path under `recipes/`
with `-` for `/` (`cifar10-resnet110`) or, for a recipe elsewhere, its stem. `state` reads a run directory:
new, running (its lock is held), checkpointed or finished; `train_arguments` says how to start or continue it.
Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, did_you_mean
from ..recipe import load_recipe, parse_overrides
from ..records import ROOT, overrides_hash
from ..rundir import LOCK_FILE, lock_holder

__all__ = [
    "STATES",
    "Run",
    "State",
    "Target",
    "command_path",
    "expand",
    "grid_overrides",
    "recipe_targets",
    "run_dir_name",
    "state",
    "table_targets",
    "train_arguments",
]

SCRIPT = ROOT / "train_accelerate.py"
RECIPES = ROOT / "recipes"
STATES = ("new", "running", "checkpointed", "finished")


@dataclass(frozen=True)
class Target:
    """One recipe with its overrides (a table row's, a grid point's) before seeds; `processes` pinned by a row
    whose launch names it (`--num_processes 8`; None: any)."""

    recipe: str
    overrides: tuple[str, ...] = ()
    processes: int | None = None
    label: str = ""


@dataclass(frozen=True)
class Run:
    """One training run: a target at one seed, in `run_dir`; its output goes to `log`."""

    recipe: str
    overrides: tuple[str, ...]  # every --set but train.seed
    seed: int
    run_dir: Path
    processes: int | None = None  # pinned by the table row (None: as many as the executor gives)
    label: str = ""

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(f"{self.run_dir.name}.log")

    @property
    def sets(self) -> list[str]:
        return [f"train.seed={self.seed}", *self.overrides]


@dataclass(frozen=True)
class State:
    """A run directory's state (one of STATES) and, for a running one, who holds its lock."""

    name: str
    holder: str | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.holder})" if self.holder else self.name


def _recipe_name(recipe: str) -> str:
    path = Path(recipe)
    try:
        inside = path.resolve().relative_to(RECIPES)
    except ValueError:
        return path.stem
    return "-".join(inside.with_suffix("").parts)


def command_path(recipe: str | os.PathLike, base: Path | None = None) -> str:
    """A recipe path as the runs' commands give it: as is from the repository root when the sweep runs there,
    absolute elsewhere. A relative `recipe` is taken from `base` (default: the working directory)."""
    path = Path(recipe) if base is None or Path(recipe).is_absolute() else base / recipe
    if Path.cwd().resolve() == ROOT:
        return os.path.relpath(path.resolve(), ROOT) if path.resolve().is_relative_to(ROOT) else str(path.resolve())
    return str(path.resolve())


def run_dir_name(recipe: str | os.PathLike, overrides: Sequence[str], seed: int, processes: int | None = None) -> str:
    """`cifar10-resnet110-seed0`, `tiny-<overrides hash>-seed1`, `cifar10-wrn28_10_ricap_512-np8-seed0`."""
    pieces = [_recipe_name(str(recipe)), overrides_hash(overrides), f"np{processes}" if processes else ""]
    return "-".join(piece for piece in pieces if piece) + f"-seed{seed}"


# --------------------------------------------------------------------------------------------------------------
# What to run


def recipe_targets(recipes: Sequence[str]) -> list[Target]:
    for recipe in recipes:
        if Path(recipe).is_dir():
            raise UserError(f"recipe {recipe!r} is a folder; give TOML files")
    return [Target(command_path(recipe)) for recipe in recipes]


def table_targets(tables_file: str | os.PathLike, heading: str, rows: Sequence[str]) -> list[Target]:
    """The rows of the seed table titled `heading` that a recipe runs: all, or those `rows` name (label or number)."""
    from ..results import load_tables

    tables = [table for document in load_tables(tables_file) for table in document.tables]
    found = [table for table in tables if table.heading == heading]
    if not found:
        headings = [table.heading for table in tables]
        raise UserError(
            f"--table {heading!r}: no such table in {tables_file}{did_you_mean(heading, headings)}; "
            f"the headings: {'; '.join(headings)}"
        )
    table = found[0]
    numbered = list(enumerate(table.rows, start=1))
    if rows:
        chosen = []
        for item in rows:
            hits = [(n, row) for n, row in numbered if row.label == item or (item.isdigit() and int(item) == n)]
            if not hits:
                labels = list(dict.fromkeys(row.label for row in table.rows))
                raise UserError(
                    f"--rows {item!r}: not a row of {heading!r}: give a row number 1-{len(numbered)} or a label"
                    f"{did_you_mean(item, labels)}"
                )
            chosen += [hit for hit in hits if hit not in chosen]
        numbered = sorted(chosen, key=lambda hit: hit[0])
    without = [f"{n} ({row.label})" for n, row in numbered if not row.recipe]
    if rows and without:
        raise UserError(f"--rows: row(s) {', '.join(without)} of {heading!r} have no recipe (their text says why)")
    return [
        Target(
            command_path(row.recipe, ROOT),
            tuple(row.overrides),
            row.num_processes() if "--num_processes" in row.launch.split() else None,
            f"row {n}: {row.label}",
        )
        for n, row in numbered
        if row.recipe
    ]


def _split_values(text: str) -> list[str]:
    """`0.1,0.2` -> ['0.1', '0.2']; commas inside [...], {...} or quotes stay (TOML arrays, tables, strings)."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def grid_overrides(grid: Sequence[str]) -> list[tuple[str, ...]]:
    """`["optim.lr=0.1,0.2", "train.batch_size=128,256"]` -> every combination, as `--set` strings, in order."""
    axes = []
    for item in grid:
        key, sep, text = item.partition("=")
        values = _split_values(text)
        if not sep or not key.strip() or not all(values):
            raise UserError(f"--grid {item!r}: give section.key=v1,v2,... (e.g. --grid optim.lr=0.1,0.2)")
        parse_overrides([f"{key.strip()}={value}" for value in values])
        axes.append([f"{key.strip()}={value}" for value in values])
    keys = [axis[0].partition("=")[0] for axis in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise UserError(f"--grid names {', '.join(repeated)} twice; give each key once, with all its values")
    return [tuple(point) for point in itertools.product(*axes)]


def expand(
    targets: Sequence[Target], grid: Sequence[str], overrides: Sequence[str], seeds: Sequence[int], runs_dir: Path
) -> list[Run]:
    """Every run: each target x each grid point x each seed, every one checked as a recipe before anything runs.

    Overrides apply in this order, the last winning: the target's (a row's), the grid point's, the user's `--set`.
    """
    for path, _ in parse_overrides(overrides):
        if ".".join(path) == "train.seed":
            raise UserError("--set train.seed=... clashes with --seeds; give the seeds with --seeds only")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0")
    runs, seen = [], {}
    for target in targets:
        for point in grid_overrides(grid) if grid else [()]:
            sets = (*target.overrides, *point, *overrides)
            load_recipe(target.recipe, list(sets))  # every key and value checked before anything runs
            for seed in seeds:
                name = run_dir_name(target.recipe, sets, seed, target.processes)
                run = Run(target.recipe, sets, seed, runs_dir / name, target.processes, target.label)
                other = seen.get(name)
                if other is not None and (other.recipe, other.overrides) != (run.recipe, run.overrides):
                    raise UserError(
                        f"{other.recipe} and {run.recipe} would share the run directory {run.run_dir}; "
                        "sweep them with different --runs-dir"
                    )
                if other is None:
                    seen[name] = run
                    runs.append(run)
    return runs


# --------------------------------------------------------------------------------------------------------------
# A run directory's state


def _check_own_run(run: Run) -> None:
    """A run directory already there must hold this run (a recipe of the same name elsewhere, or an edited recipe
    file, would otherwise be skipped or continued as if it were this one)."""
    try:
        theirs = load_recipe(run.run_dir / "recipe.toml")
    except UserError as err:
        raise UserError(f"{run.run_dir} exists but does not hold a run this sweep can use ({err})") from None
    if theirs != load_recipe(run.recipe, run.sets):
        raise UserError(
            f"{run.run_dir} holds a run of another recipe (or {run.recipe} changed since it started); "
            "remove it or choose another --runs-dir"
        )


def state(run: Run) -> State:
    """new (nothing yet, or no checkpoint), running (lock held), checkpointed or finished."""
    from ..checkpoint import find_checkpoints

    run_dir = run.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory; remove it or choose another --runs-dir")
    holder = lock_holder(run_dir)
    if holder is not None:
        return State("running", holder)
    if not run_dir.is_dir() or not any(entry.name != LOCK_FILE for entry in run_dir.iterdir()):
        return State("new")
    if (run_dir / "recipe.toml").is_file():
        _check_own_run(run)
    if (run_dir / "final_metrics.json").is_file():
        return State("finished")
    return State("checkpointed" if find_checkpoints(run_dir) else "new")


def train_arguments(run: Run, current: State) -> list[str]:
    """The arguments of train_accelerate.py that start (or continue) `run` from `current`."""
    if current.name == "checkpointed":
        return ["--resume", str(run.run_dir)]
    sets = [item for override in run.sets for item in ("--set", override)]
    started = run.run_dir.is_dir() and any(entry.name != LOCK_FILE for entry in run.run_dir.iterdir())
    return [run.recipe, *sets, "--output-dir", str(run.run_dir), *(["--overwrite"] if started else [])]
