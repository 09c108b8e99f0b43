"""Helpers shared by every test file: recipes as real TOML, the command line, tiny datasets, weights, polling.

One copy of each, so the test files cannot drift apart (they once had two `write_recipe`s with different
defaults, one of which could not write TOML tables).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train_accelerate.py"
CLASSES = ("cat", "dog", "emu")

# The standard tiny run: ResNet-20 on 128 of scikit-learn's real 8x8 digits, 4 steps of 32 an epoch.
TINY_TRAIN_IMAGES = 128
TINY_BATCH = 32
TINY_STEPS_PER_EPOCH = TINY_TRAIN_IMAGES // TINY_BATCH
TINY_EPOCHS = 3


# ----------------------------------------------------------------------------------------------------------
# Recipes


def toml_value(value: Any) -> str:
    """A Python value as TOML (independent of the project's own writer, which the tests check)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def tiny_recipe_sections(dataset: Path | str, **sections: dict) -> dict[str, dict]:
    """The standard tiny run's sections, with `sections` merged in key by key."""
    base = {
        "model": {"name": "resnet20"},
        "data": {"dataset": str(dataset), "train_limit": TINY_TRAIN_IMAGES},
        "augment": {"crop_padding": 1, "hflip": False},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine"},
        "train": {"epochs": TINY_EPOCHS, "batch_size": TINY_BATCH, "val_batch_size": 360, "checkpoint_every": 1},
        "log": {"progress": False},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def write_recipe(path: Path, dataset: Path | str, **sections: dict) -> Path:
    """Write the standard tiny run (see `tiny_recipe_sections`) as a TOML file."""
    lines = []
    for name, values in tiny_recipe_sections(dataset, **sections).items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_table(path: Path, heading: str, rows: list[dict]) -> Path:
    """A seed-tables file (results/seed_tables.toml's format) with one README table of `rows`."""
    lines = ['[documents."README.md"]', 'title = "Results"', "level = 2", "", "[[tables]]"]
    lines += ['document = "README.md"', f"heading = {toml_value(heading)}", "rows = ["]
    lines += [f"  {toml_value({'seed': '—', **row})}," for row in rows] + ["]"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# The command line


def cli_command(*args: str) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), *args]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train_accelerate.py ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT
    )


def run_sweep(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m cifar_train.sweep ARGS` in a fresh process, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "cifar_train.sweep", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_main(main, *args: str) -> Result:
    """An entry point's `main(argv)` in this process, with its output captured: the same code path as the
    command, without the seconds a fresh interpreter spends importing torch."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own errors and --help
            code = exit_.code if isinstance(exit_.code, int) else 2
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, *fragments: str, status: int = 2) -> str:
    """Exit `status`, no traceback, exactly one `error:` line on stderr holding every fragment; returns it."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's rendezvous: fixed ports collide when two test workers
    launch at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240, poll: float = 0.002):
    """Poll until `predicate()` is truthy; fail if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the awaited moment: {proc.stderr.read()}")
        time.sleep(poll)
    proc.kill()
    pytest.fail("timed out waiting for the run")


# ----------------------------------------------------------------------------------------------------------
# Run directories


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(run_dir: Path, pattern: str = "step_*") -> list[Path]:
    return sorted((run_dir / "checkpoints").glob(pattern))


def assert_same_weights(a: Path, b: Path) -> None:
    """Two run directories' exported weights are bit-identical."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to show that a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Tiny datasets, written with the real `datasets` library


def random_images(count: int, channels: int, size: int, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W[, 3]) and integer labels, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    shape = (count, size, size, channels) if channels == 3 else (count, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, num_classes, count)


def write_parquet_dataset(
    root: Path,
    *,
    splits: dict[str, int] | None = None,  # split -> images
    channels: int = 3,
    size: int = 8,  # pixels
    classes: tuple[str, ...] = CLASSES,
    subfolder: str = "data",  # the Hub's layout: <subfolder>/<split>-00000-of-00001.parquet
    image_column: str = "img",
    label_column: str = "label",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parquet shards as on the Hub, with an `Image` and a `ClassLabel` column; returns each split's arrays."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({image_column: Image(), label_column: ClassLabel(names=list(classes))})
    written = {}
    for index, (split, count) in enumerate((splits or {"train": 24, "test": 9}).items()):
        images, labels = random_images(count, channels, size, seed=index, num_classes=len(classes))
        folder = root / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        table = Dataset.from_dict({image_column: list(images), label_column: labels.tolist()}, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
        written[split] = (images, labels)
    return written


def write_imagefolder(
    root: Path,
    *,
    splits: dict[str, int] | None = None,
    channels: int = 3,
    sizes: tuple[int, ...] = (8,),  # several sizes make a mixed-size folder (the streaming pipeline)
    classes: tuple[str, ...] = CLASSES,
    extension: str = "png",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`root/<split>/<class>/<n>.png`, class-sorted as the popular folder copies are; returns the arrays
    of the first size."""
    from PIL import Image

    written = {}
    for index, (split, count) in enumerate((splits or {"train": 24, "test": 9}).items()):
        images, labels = random_images(count, channels, max(sizes), seed=index, num_classes=len(classes))
        for n, (image, label) in enumerate(zip(images, labels)):
            side = sizes[n % len(sizes)]
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[:side, :side]).save(folder / f"{n:05d}.{extension}")
        written[split] = (images, labels)
    return written


def png_bytes(image: np.ndarray) -> bytes:
    """One image (H, W[, 3]) encoded as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_save_to_disk(
    root: Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],  # split -> (images, labels)
    *,
    classes: tuple[str, ...] = CLASSES,
    corrupt_rows: tuple[int, ...] = (),  # rows of every split stored as truncated PNG bytes
) -> None:
    """A `DatasetDict.save_to_disk` folder with an `Image` column `img` and a `ClassLabel` column `label`."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    features = Features({"img": Image(), "label": ClassLabel(names=list(classes))})
    tables = {}
    for split, (images, labels) in splits.items():
        records = [
            {"bytes": png_bytes(image)[:20] if row in corrupt_rows else png_bytes(image), "path": None}
            for row, image in enumerate(images)
        ]
        tables[split] = Dataset.from_dict({"img": records, "label": labels.tolist()}, features=features)
    DatasetDict(tables).save_to_disk(str(root))
