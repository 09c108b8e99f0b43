"""Evaluate a trained model: loss, top-1/top-5, per-class accuracy, confusion matrix, calibration.

    python evaluate.py runs/wrn_ricap                      # a run directory: dataset and split from its recipe
    python evaluate.py runs/wrn_ricap --tta flip --json    # average the softmax of each image and its mirror
    python evaluate.py hf-hub:user/name --dataset cifar10  # a published model needs --dataset

SOURCE is a run directory, `local-dir:PATH` (the same) or `hf-hub:ID`. The model is loaded with
`timm.create_model(SOURCE, pretrained=True)` after `import cifar_models`; images are normalised with the
mean / std stored in the model's `pretrained_cfg`, which are the ones its training run used.
Accuracies, per-class accuracies and the expected calibration error (ECE) are in percent.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_train.data.classes import class_map
from cifar_train.errors import UserError
from cifar_train.eval_metrics import compute_metrics
from cifar_train.hub import check_hub_reachable
from cifar_train.rounding import readable
from cifar_train.rundir import CONFIG_FILE, RECIPE_FILE, WEIGHTS_FILE
from cifar_train.schema import TTA_MODES
from cifar_train.tta import tta_log_probs
from cifar_train.wording import option, speaking

__all__ = [
    "TTA_MODES",
    "EvalData",
    "evaluate",
    "evaluate_with_predictions",
    "load_model",
    "predict",
    "resolve_source",
]

# --------------------------------------------------------------------------------------------------
# Model and data


def resolve_source(source: str) -> tuple[str, Path | None]:
    """`(timm model name, run directory or None)` for a run directory, `local-dir:PATH` or `hf-hub:ID`."""
    if source.startswith("hf-hub:"):
        if not source[len("hf-hub:") :].strip("/"):
            raise UserError(f"source {source!r} names no repository; use hf-hub:user/name")
        return source, None
    path = Path(source[len("local-dir:") :] if source.startswith("local-dir:") else source).expanduser()
    if not path.is_dir():
        raise UserError(f"source {source!r}: no such directory; give a run directory, local-dir:PATH or hf-hub:ID")
    if not (path / WEIGHTS_FILE).is_file():
        raise UserError(
            f"source {source!r}: no {WEIGHTS_FILE} in {str(path)!r}; a run exports it when it finishes "
            "(an interrupted run has only checkpoints/)"
        )
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"source {source!r}: no {CONFIG_FILE} in {str(path)!r}, so timm cannot rebuild the model")
    return f"local-dir:{path}", path


def load_model(source: str) -> nn.Module:
    """The model behind `source` (run directory, `local-dir:PATH` or `hf-hub:ID`) with its weights, in eval mode."""
    import timm

    import cifar_models  # noqa: F401  (registers the CIFAR architectures a config may name)

    name, _ = resolve_source(source)
    if name.startswith("hf-hub:") and not _in_hf_cache(name[len("hf-hub:") :]):
        check_hub_reachable(f"source {source!r}")
    try:
        model = timm.create_model(name, pretrained=True)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # unknown architecture, bad weights, Hub errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"source {source!r} cannot be loaded with timm: {first}") from err
    return model.eval()


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the Hub repository's config is in the local Hugging Face cache (works offline)."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    found = try_to_load_from_cache(repo, "config.json", revision=revision or None)
    return isinstance(found, str)


@dataclass
class EvalData:
    """What to evaluate on: batches of uint8 images (in memory) or of normalised floats (streaming)."""

    dataset: str  # resolved name
    split: str  # a split name, or e.g. "train[held-out 0.1, seed 0]"
    class_names: list[str]
    num_samples: int
    batches: Any  # callable (batch_size) -> iterator of (images, labels)
    normalised: bool  # True when the batches are already normalised floats


def _load_data(
    dataset: str,
    *,
    split: str | None,
    recipe: Any,
    model: nn.Module,
    image_column: str | None,
    label_column: str | None,
    num_workers: int | None,
    say: Callable[[str], None],
) -> EvalData:
    from cifar_train import data as data_lib

    cfg = recipe.data if recipe is not None else None
    columns = dict(
        image_column=image_column or ((cfg.image_column or None) if cfg else None),
        label_column=label_column or ((cfg.label_column or None) if cfg else None),
    )
    options = dict(
        columns, cache_dir=(cfg.cache_dir or None) if cfg else None, skip_corrupt=bool(cfg and cfg.skip_corrupt)
    )
    if split is None and cfg is not None and not cfg.val_split:  # the run held out a fraction of train
        _, val, info = data_lib.load_dataset_splits(
            dataset,
            train_split=cfg.train_split,
            val_split=None,
            val_fraction=cfg.val_fraction,
            seed=recipe.train.seed,
            say=say,
            **options,
        )
        return _memory_data(
            val, info, f"{cfg.train_split}[held-out {cfg.val_fraction}, seed {recipe.train.seed}]", model
        )
    setting = (
        option("split")
        if split is not None or cfg is None
        else f"{option('split')} (default: the run's data.val_split)"
    )
    split = split or (cfg.val_split if cfg else "test")
    source = data_lib.DatasetSource(dataset, options["cache_dir"])
    where = dict(split=split, setting=setting, model=model, columns=columns)
    if _streams(source, cfg=cfg, skip_corrupt=options["skip_corrupt"], **where):
        if num_workers is None:
            num_workers = cfg.num_workers if cfg else min(8, os.cpu_count() or 1)
        return _streaming_data(source, workers=num_workers, say=say, **where)
    val, info = data_lib.load_split(source, split=split, setting=setting, say=say, **options)
    return _memory_data(val, info, split, model)


def note(line: str) -> None:
    """What was loaded, on stderr: stdout may be one JSON line (--json)."""
    print(line, file=sys.stderr)


def _memory_data(val: Any, info: Any, split_label: str, model: nn.Module) -> EvalData:
    """Decoded images, normalised with the model's mean and std batch by batch (padding dropped)."""
    from cifar_train.data import MemoryEvalBatches

    _check_compatible(model, channels=info.channels, image_size=info.image_size)
    cfg = model.pretrained_cfg

    def batches(size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from _real_rows(MemoryEvalBatches(val, mean=cfg["mean"], std=cfg["std"], batch_size=size))

    return EvalData(info.name, split_label, list(info.class_names), len(val), batches, normalised=True)


def _streams(
    source: Any, *, split: str, setting: str, cfg: Any, model: nn.Module, skip_corrupt: bool, columns: dict[str, Any]
) -> bool:
    """Whether evaluation streams the split. A run evaluated on its own dataset reads it as it trained (its
    pipeline, chosen on its training split as training chose); otherwise the split decides, and a model whose
    transform resizes (crop_pct below 1) always streams: decoded evaluation applies no resize."""
    from timm.data import resolve_data_config

    from cifar_train import data as data_lib

    if cfg is not None:
        if cfg.streaming_source:
            return True
        run_columns = dict(image_column=cfg.image_column or None, label_column=cfg.label_column or None)
        chosen = data_lib.choose_pipeline(
            source, pipeline=cfg.pipeline, train_split=cfg.train_split, skip_corrupt=cfg.skip_corrupt, **run_columns
        )
        return chosen == "streaming"
    if resolve_data_config({}, model=model)["crop_pct"] != 1.0:
        return True
    chosen = data_lib.choose_pipeline(source, train_split=split, skip_corrupt=skip_corrupt, setting=setting, **columns)
    return chosen == "streaming"


def _streaming_data(
    source: Any,
    *,
    split: str,
    setting: str,
    model: nn.Module,
    columns: dict[str, Any],
    workers: int,
    say: Callable[[str], None],
) -> EvalData:
    """The split decoded and transformed in `workers` DataLoader workers, batch by batch, with timm's own
    transform of the model's config (`create_transform(**resolve_data_config({}, model=model))`): the run's."""
    from timm.data import resolve_data_config

    from cifar_train import data as data_lib
    from cifar_train.progress import batch_progress

    config = resolve_data_config({}, model=model)
    one_split = data_lib.open_one_split(source, split, setting)  # no other split is downloaded or converted
    rows = data_lib.StreamingSplit.open(one_split, split, setting=setting, **columns)
    _check_compatible(model, channels=rows.channels, image_size=tuple(config["input_size"][1:]))
    resize = math.floor(config["input_size"][-1] / config["crop_pct"])

    def batches(size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = data_lib.StreamingEvalBatches(rows, data_config=config, batch_size=size, num_workers=workers)
        say(
            f"evaluating {len(rows.rows):,} images of {rows.name} [{split}] as they stream: {workers} DataLoader "
            f"workers, {len(loader):,} batches of {size}, {config['interpolation']} resize to {resize} + centre crop "
            f"{config['input_size'][-1]} (crop_pct {config['crop_pct']:.4g}, the model's config)"
        )
        yield from _real_rows(batch_progress(loader, total=len(loader), description=f"{rows.name} [{split}]"))

    return EvalData(rows.name, split, rows.class_names, len(rows.rows), batches, normalised=True)


def model_classes(model: nn.Module) -> list[str]:
    """The model's class names: its config's `label_names`, or "0".."K-1" when it has none."""
    from cifar_train.data.classes import integer_names

    names = model.pretrained_cfg.get("label_names")
    return list(names) if names else integer_names(model.num_classes)


def _real_rows(batches: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(images, labels)` of fixed-size `EvalBatches` with the padding of the last batch dropped."""
    for images, labels, valid in batches:
        yield (images, labels) if bool(valid.all()) else (images[valid], labels[valid])


def _check_compatible(model: nn.Module, *, channels: int, image_size: tuple[int, int]) -> None:
    model_chans, *model_size = model.pretrained_cfg["input_size"]
    if channels != model_chans:
        raise UserError(f"the dataset has {channels}-channel images but the model takes {model_chans} channels")
    if tuple(image_size) != tuple(model_size):
        raise UserError(
            f"the dataset's images are {image_size[0]}x{image_size[1]} but the model was trained on "
            f"{model_size[0]}x{model_size[1]}; evaluate it on the dataset it was trained for"
        )


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: torch.Tensor,  # (B, C, H, W) normalised float on the model's device
    tta: str | None = None,
) -> torch.Tensor:
    """Log-probabilities `(B, K)`; with `tta` the log of the weighted mean softmax of its views (`cifar_train.tta`:
    "flip" the image and its mirror, "flip_translate" also one-pixel moves of both)."""
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r} is not supported; choose None or one of {', '.join(TTA_MODES)}")
    images = images.contiguous(memory_format=torch.channels_last)
    if tta is None:
        return F.log_softmax(model(images).float(), dim=1)
    return tta_log_probs(model, images, tta)


def evaluate_with_predictions(
    source: str,
    *,
    dataset: str | None,
    split: str | None,
    batch_size: int,
    tta: str | None,
    device: str | torch.device | None,
    image_column: str | None = None,
    label_column: str | None = None,
    say: Callable[[str], None] = note,
    num_workers: int | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, Path | None]:
    """`evaluate()`, also returning the log-probabilities, the labels (in the model's classes) and the run directory."""
    with speaking(command="evaluate"):
        return _evaluate(source, dataset, split, batch_size, tta, device, image_column, label_column, say, num_workers)


def _evaluate(source, dataset, split, batch_size, tta, device, image_column, label_column, say, num_workers=None):
    from cifar_train.recipe import load_recipe

    if tta is not None and tta not in TTA_MODES:
        raise UserError(f"{option('tta', tta)} is not supported; choose one of {', '.join(TTA_MODES)}")
    if batch_size < 1:
        raise UserError(f"{option('batch_size')} {batch_size} must be at least 1")
    if num_workers is not None and num_workers < 0:
        raise UserError(f"{option('num_workers')} {num_workers} must be at least 0")
    _, run_dir = resolve_source(source)
    recipe = None
    if run_dir is not None and (run_dir / RECIPE_FILE).is_file():
        recipe = load_recipe(run_dir / RECIPE_FILE, on_warning=lambda message: None)
        if tta is not None and not recipe.augment.hflip:
            print(
                f"warning: {option('tta', tta)} on a model trained without horizontal flips (augment.hflip = "
                "false) usually lowers its accuracy; it sees mirrored images it never learnt",
                file=sys.stderr,
            )
    if dataset is None:
        if recipe is None:
            raise UserError(f"source {source!r} has no {RECIPE_FILE} to name its dataset; pass {option('dataset')}")
        dataset = recipe.data.dataset
    elif recipe is not None and dataset != recipe.data.dataset:
        recipe = None  # another dataset: the run's split and column settings do not apply
    model = load_model(source)
    columns = dict(image_column=image_column, label_column=label_column)
    data = _load_data(dataset, split=split, recipe=recipe, model=model, say=say, num_workers=num_workers, **columns)
    classes = model_classes(model)
    mapping = class_map(
        data.class_names, classes, what=f"the classes of {data.dataset!r} [{data.split}]", target_what="the model's"
    )

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device, memory_format=torch.channels_last)  # as training ran by default (model.channels_last)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    started = time.perf_counter()
    all_log_probs, all_labels = [], []
    for images, labels in data.batches(batch_size):
        images = images.to(device, non_blocking=True)
        if not data.normalised:
            images = (images.float().div_(255.0) - mean) / std
        all_log_probs.append(predict(model, images, tta).cpu())
        all_labels.append(labels.long().cpu())
    seconds = time.perf_counter() - started
    log_probs = torch.cat(all_log_probs) if all_log_probs else torch.empty(0, len(classes))
    labels = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    if mapping is not None:
        labels = torch.from_numpy(mapping)[labels]
    if labels.numel() == 0:
        raise UserError(f"split {data.split!r} of {data.dataset!r} holds no images to evaluate")
    result = {
        "source": source,
        "architecture": cfg.get("architecture"),
        "dataset": data.dataset,
        "split": data.split,
        "tta": tta,
        **compute_metrics(log_probs, labels, classes),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "device": str(device),
        "seconds": seconds,
        "images_per_second": len(labels) / seconds if seconds > 0 else None,
    }
    return readable(result), log_probs, labels, run_dir


def evaluate(
    source: str | os.PathLike,
    dataset: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    tta: str | None = None,
    device: str | torch.device | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate `source` (run directory, `local-dir:PATH`, `hf-hub:ID`) and return the metrics.

    Keys: `top1`, `top5`, `loss`, `ece`, `num_samples`, `per_class_accuracy` (name -> %), `confusion_matrix`
    (rows true class, columns prediction), `class_names`, `dataset`, `split`, `tta`, `mean`, `std`, ...
    `dataset` and `split` default to the run's recipe (its validation split, or its held-out fraction).
    `num_workers`: DataLoader workers where the split streams (default: the run's `data.num_workers`, else up to 8).
    """
    source = os.fspath(source)
    result, _, _, _ = evaluate_with_predictions(
        source, dataset=dataset, split=split, batch_size=batch_size, tta=tta, device=device,
        image_column=image_column, label_column=label_column, num_workers=num_workers,
    )  # fmt: skip
    return result
