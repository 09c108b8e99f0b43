"""A finished run directory becomes a record: one small JSON file in results/.

    python -m cifar_train.results collect runs/wrn_ricap --out results/

A record holds the recipe path and `--set` overrides the run was started with, the sha256 of its resolved
`recipe.toml`, the seed, last-epoch and best top-1, epochs, wall time, images/s, hardware, library versions and
git commit; the weights stay in the run directory (the record says where, and how to rebuild them), or, with
`--with-weights` and under 8 MiB, are copied next to the records. It reads
only the run-directory contract (recipe.toml, env.json, metrics.jsonl, final_metrics.json, model.safetensors)
and imports no torch.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import statistics
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_atomic, write_text_atomic
from .errors import UserError
from .recipe import parse_overrides
from .rounding import readable
from .rundir import CONFIG_FILE, EXPORT_FILES, MODEL_CARD_FILE, WEIGHTS_FILE, read_metrics

__all__ = [
    "canonical_overrides",
    "collect",
    "load_records",
    "overrides_hash",
    "parse_command",
    "read_run",
    "recipe_path",
    "record_filename",
    "write_json_if_changed",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
RECORD_FORMAT = 1
RUN_FILES = ("recipe.toml", "env.json", "metrics.jsonl", "final_metrics.json")

# --------------------------------------------------------------------------------------------------------------
# Overrides and recipe paths: what makes two runs "the same row"


def canonical_overrides(overrides: Iterable[str]) -> tuple[str, ...]:
    """`section.key=value` strings, last one per key winning, values re-spelt as JSON, sorted; `train.seed` dropped."""
    merged: dict[str, Any] = {}
    for path, value in parse_overrides(overrides):
        merged[".".join(path)] = value
    merged.pop("train.seed", None)
    return tuple(f"{key}={json.dumps(value, sort_keys=True)}" for key, value in sorted(merged.items()))


def overrides_hash(overrides: Iterable[str]) -> str:
    """8 hex digits naming an override set ("" for none); the same set in any order or spelling gives the same."""
    canonical = canonical_overrides(overrides)
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()[:8] if canonical else ""


def recipe_path(text: str | None) -> str | None:
    """A recipe path as records keep it: relative to the repository root when inside it, '/' separators.

    A relative path is taken as given from the repository root, where the README's commands run.
    """
    if not text:
        return None
    path = Path(text)
    if path.is_absolute():
        try:
            return path.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            return path.as_posix()
    return Path(os.path.normpath(path)).as_posix()


# --------------------------------------------------------------------------------------------------------------
# Run directory -> record


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno})") from None


def parse_command(command: str) -> tuple[str | None, list[str]]:
    """(recipe, overrides) from env.json's `command` (`train_accelerate.py RECIPE [--set K=V]... [--output-dir D]`).

    A command of anything but train_accelerate.py (the Python API inside another program) names no recipe.
    """
    tokens = command.split()
    if not tokens or not tokens[0].endswith("train_accelerate.py"):
        return None, []
    recipe, overrides, rest = None, [], iter(tokens[1:])
    for token in rest:
        if token == "--set":
            overrides.append(next(rest, ""))
        elif token.startswith("--set="):
            overrides.append(token[len("--set=") :])
        elif token in ("--output-dir", "--resume"):
            next(rest, None)
        elif not token.startswith("-") and recipe is None:
            recipe = token
    return recipe, overrides


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _not_finished(run_dir: Path, missing: list[str]) -> UserError:
    hint = ""
    if (run_dir / "checkpoints").is_dir():
        hint = f"; it stopped early: continue it with python train_accelerate.py --resume {run_dir}"
    return UserError(f"{str(run_dir)!r} is not a finished run: it has no {' and no '.join(missing)}{hint}")


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of one finished run directory; `UserError` naming what is missing for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{str(run_dir)!r} is not a directory; give finished run directories (e.g. runs/quickstart)")
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise _not_finished(run_dir, missing)
    env, final = _read_json(run_dir / "env.json"), _read_json(run_dir / "final_metrics.json")
    epochs = read_metrics(run_dir)
    if not isinstance(env, dict) or not isinstance(final, dict) or not all(isinstance(r, dict) for r in epochs):
        raise UserError(f"{str(run_dir)!r}: env.json, final_metrics.json and each metrics.jsonl line must be objects")
    evaluated = [row for row in epochs if row.get("val_acc1") is not None]
    if not evaluated or final.get("val_acc1") is None:
        raise UserError(f"{str(run_dir)!r}: metrics.jsonl / final_metrics.json hold no evaluated epoch")
    try:
        resolved = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{str(run_dir / 'recipe.toml')!r} is not valid TOML: {err}") from None
    if "recipe_file" in env:  # env.json records the command line's recipe and --set list itself
        recipe, overrides = env["recipe_file"], list(env.get("overrides") or [])
    else:
        recipe, overrides = parse_command(env.get("command", ""))
    train = resolved.get("train", {})
    best = max(evaluated, key=lambda row: row["val_acc1"])  # the first epoch reaching the best top-1
    final_top1, best_top1 = final["val_acc1"], max(final.get("best_val_acc1", best["val_acc1"]), best["val_acc1"])
    rates = [row["images_per_second"] for row in epochs if row.get("images_per_second")]
    record = {
        "format": RECORD_FORMAT,
        "recipe": recipe_path(recipe),
        "overrides": overrides,
        "recipe_sha256": _sha256(run_dir / "recipe.toml"),
        "seed": train.get("seed"),
        "dataset": resolved.get("data", {}).get("dataset"),
        "epochs": final.get("epoch", len(epochs)),
        "final_top1": final_top1,
        "best_top1": best_top1,
        "best_epoch": best["epoch"],
        "final_error": round(100.0 - final_top1, 4),  # the last epoch's test error, as the seed reports
        "best_error": round(100.0 - best_top1, 4),
        "wall_seconds": round(final.get("elapsed_seconds", sum(r.get("epoch_seconds", 0.0) for r in epochs)), 1),
        "images_per_second": round(statistics.median(rates), 1) if rates else None,  # median over epochs
        "hardware": {
            "device": env.get("device"),
            "gpus": env.get("gpus", []),
            "num_processes": env.get("num_processes", 1),
            "cpu_threads": env.get("cpu_threads"),
            "precision": env.get("mixed_precision"),
            "platform": env.get("platform"),
        },
        "versions": {key: env.get(key) for key in ("python", "torch", "timm", "accelerate", "datasets")},
        "git_commit": env.get("git_commit"),
        "started": env.get("started"),
        "command": env.get("command"),
        "run_id": hashlib.sha256((run_dir / "env.json").read_bytes()).hexdigest()[:8],
    }
    if env.get("cuda"):
        record["versions"]["cuda"] = env["cuda"]
    weights = run_dir / WEIGHTS_FILE
    if weights.is_file():
        record["weights_sha256"] = _sha256(weights)
        where = f"{run_dir.name}/model.safetensors (sha256 above) on the machine that trained it"
    else:
        where = "no model.safetensors was left in the run directory"
    record["weights"] = f"Not committed: {where}; rebuild them with `{_rebuild_command(record)}`."
    return record


def _rebuild_command(record: dict[str, Any]) -> str:
    processes = record["hardware"]["num_processes"] or 1
    launcher = f"accelerate launch --num_processes {processes}" if processes > 1 else "python"
    if record["recipe"] is None:  # the Python API: the run's own resolved recipe re-runs it
        return f"{launcher} train_accelerate.py <run dir>/recipe.toml"
    sets = "".join(f" --set {item}" for item in record["overrides"])
    return f"{launcher} train_accelerate.py {record['recipe']}{sets}"


def record_filename(record: dict[str, Any]) -> str:
    """`<recipe>-<overrides hash>-seed<S>-<run id>.json`: stable for one run, distinct across runs."""
    recipe = record["recipe"]
    if recipe is None:
        stem = "python-api"
    else:
        path = Path(recipe)
        parts = path.with_suffix("").parts
        stem = "-".join(parts[1:] if parts[0] == "recipes" and len(parts) > 1 else parts[-1:])
    pieces = [stem, overrides_hash(record["overrides"]), f"seed{record['seed']}", record["run_id"]]
    return "-".join(piece for piece in pieces if piece) + ".json"


def write_json_if_changed(path: Path, data: Any) -> bool:
    """Write `data` as JSON, atomically; False (and no write) when the file already says exactly that."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_text_atomic(path, text)
    return True


def collect(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike = RESULTS_DIR, *, with_weights: bool = False
) -> list[tuple[Path, bool]]:
    """Record every run directory into `out`; all are read (and refused) before anything is written.

    `with_weights` also copies each run's weights, timm config and model card to `out/weights/<record name>/`
    (a folder `timm.create_model('local-dir:...')` loads), for weights small enough to commit
    (`MAX_COMMITTED_WEIGHTS` bytes). Returns (record path, changed) pairs; a run collected before gives the same
    file, rewritten only if changed.
    """
    if not run_dirs:
        raise UserError("give at least one run directory to collect")
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    records = [read_run(run_dir) for run_dir in run_dirs]
    if with_weights:
        for run_dir in run_dirs:
            _check_committable(run_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give the results folder (e.g. results/)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for run_dir, record in zip(run_dirs, records, strict=True):
        path = out / record_filename(record)
        if with_weights:
            record["weights"] = _copy_weights(run_dir, out / "weights" / path.stem)
        written.append((path, write_json_if_changed(path, readable(record))))
    return written


# bytes: larger weights belong on the Hub (python -m cifar_train.push); 8 MiB holds airbench94's fp32 weights (7.9 MB)
MAX_COMMITTED_WEIGHTS = 8 * 1024 * 1024


def _check_committable(run_dir: Path) -> None:
    missing = [name for name in EXPORT_FILES if not (run_dir / name).is_file()]
    if missing:
        raise UserError(f"{str(run_dir)!r} has no {', '.join(missing)}: --with-weights needs a finished run's export")
    size = (run_dir / WEIGHTS_FILE).stat().st_size
    if size > MAX_COMMITTED_WEIGHTS:
        raise UserError(
            f"{str(run_dir / WEIGHTS_FILE)!r} is {size / 2**20:.1f} MiB, more than the "
            f"{MAX_COMMITTED_WEIGHTS / 2**20:.0f} MiB --with-weights copies into the repository; collect it without "
            f"--with-weights and share the weights on the Hub: python -m cifar_train.push {run_dir} <user>/<name>"
        )


def _copy_weights(run_dir: Path, folder: Path) -> str:
    """Copy the weights and config into `folder` (atomically per file) and write the model card there, its loading
    line naming `folder` (the run directory's card names the run directory, which a reader of the repository does
    not have); returns the record's `weights` line."""
    from .card import card_facts, render_model_card

    try:
        shown = folder.resolve().relative_to(ROOT).as_posix()
    except ValueError:  # a records folder outside this checkout
        shown = str(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if (folder / name).is_file() and filecmp.cmp(run_dir / name, folder / name, shallow=False):
            continue  # collected before: left untouched, as an unchanged record is
        write_atomic(folder / name, lambda temporary, source=run_dir / name: shutil.copyfile(source, temporary))
    card = render_model_card(card_facts(run_dir, location=shown))
    if not (folder / MODEL_CARD_FILE).is_file() or (folder / MODEL_CARD_FILE).read_text(encoding="utf-8") != card:
        write_text_atomic(folder / MODEL_CARD_FILE, card)
    load = f"timm.create_model('local-dir:{shown}', pretrained=True)"
    return f"Committed in {shown}/: {load} after `import cifar_models`."


# what rendering reads from a record
REQUIRED_RECORD_KEYS = (
    "recipe",
    "overrides",
    "seed",
    "epochs",
    "final_error",
    "best_error",
    "wall_seconds",
    "hardware",
)


def load_records(folder: str | os.PathLike = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every `*.json` record in `folder`, sorted by file name."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        record = _read_json(path)
        missing = [key for key in REQUIRED_RECORD_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise UserError(f"{str(path)!r} is not a run record: no {', '.join(missing)} (collect runs to make one)")
        try:
            canonical_overrides(record["overrides"])
        except UserError as err:
            raise UserError(f"{str(path)!r}: its overrides do not parse: {err}") from None
        records.append(dict(record, file=path.name))
    return records
