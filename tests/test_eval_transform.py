"""One evaluation transform per run: validation during training, `evaluate.py`, the exported `pretrained_cfg` and
timm's own `create_transform(**resolve_data_config({}, model=model))` see the same images.

A trial on real JPEGs of mixed sizes found that a streaming-trained run could not be evaluated (evaluation tried to
decode the split into memory) and that its `config.json` carried the architecture's defaults (crop_pct 0.95,
bicubic) instead of the resize + centre crop the run validated with. These tests train real timm models on real
JPEGs they write themselves, evaluate the runs through `evaluate.py`, and rebuild the preprocessing with timm
alone from the exported config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import read_metrics, run_main, write_imagefolder, write_recipe
from PIL import Image
from timm.data import create_transform, resolve_data_config

import cifar_models  # noqa: F401
from cifar_train.cli import evaluate_main, main
from cifar_train.data.decoded import DatasetSource
from cifar_train.data.streaming import StreamingSplit, streaming_info
from cifar_train.data.transforms import data_config, eval_crop_pct, eval_transform
from cifar_train.errors import UserError
from cifar_train.evaluation import evaluate, evaluate_with_predictions

MODEL = "test_efficientnet"  # timm's 100k-parameter test net; its own defaults are crop_pct 0.95, bicubic, 160 px
VAL_IMAGES = 24


# --------------------------------------------------------------------------------------------------
# The recorded transform


def test_crop_pct_gives_back_the_resize_for_every_size_pair():
    """timm resizes to floor(image_size / crop_pct); the plain quotient image_size / eval_resize comes back one
    pixel short for about one pair in twenty (e.g. 64 and 93), so the crop_pct written must be one that does not."""
    short = [(size, resize) for size in range(8, 257) for resize in range(size, 2 * size + 1)
             if math.floor(size / (size / resize)) != resize]  # fmt: skip
    assert (64, 93) in short and len(short) > 1000  # the trap is real
    for size in range(8, 257):
        for resize in range(size, 2 * size + 1):
            assert math.floor(size / eval_crop_pct(size, resize)) == resize, (size, resize)
    config = data_config(channels=3, image_size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3, eval_resize=93)
    resize = create_transform(**config).transforms[0]  # timm's own transform of the recorded config
    assert resize.size == 93 and config["interpolation"] == "bilinear" and config["crop_mode"] == "center"
    assert data_config(channels=1, image_size=(28, 28), mean=(0.5,), std=(0.25,))["crop_pct"] == 1.0


def test_streaming_statistics_are_those_of_the_centre_crops(tmp_path):
    """Mean and std of a streaming split are the pixel statistics of its evaluation crops (they were computed on
    uint8 crops multiplied by 255 in uint8, which wrapped around: a dark dataset came out bright)."""
    write_imagefolder(tmp_path / "ds", splits={"train": 6, "test": 2}, sizes=(20, 14))
    files = sorted((tmp_path / "ds" / "train").rglob("*.png"))
    for path in files:  # dark images: values 0..63
        Image.fromarray(np.asarray(Image.open(path)) // 4).save(path)
    source = DatasetSource(str(tmp_path / "ds"))
    info = streaming_info(StreamingSplit.open(source, "train", setting="x", image_column=None, label_column=None),
                          image_size=12, eval_resize=16)  # fmt: skip
    config = data_config(channels=3, image_size=(12, 12), mean=(0.0,) * 3, std=(1.0,) * 3, eval_resize=16)
    crops = torch.stack([eval_transform(config)(Image.open(path).convert("RGB")) for path in files]).double()
    assert info.mean == pytest.approx(crops.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert info.std == pytest.approx(crops.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)
    assert max(info.mean) < 0.26 and info.eval_resize == 16


def test_a_negative_worker_count_is_refused_in_the_callers_words(tmp_path):
    with pytest.raises(UserError, match=r"^num_workers -1 must be at least 0$"):
        evaluate(str(tmp_path), num_workers=-1)


# --------------------------------------------------------------------------------------------------
# A run of each pipeline on real JPEGs, evaluated three ways


def _train(tmp_path: Path, sizes: tuple[int, ...], val_size: int, data: dict) -> Path:
    """Train one epoch on JPEGs of `sizes` (cycled) validated on JPEGs of one size, `val_size`: a split of one size
    is what evaluation once decoded into memory on its own, whatever the run had done."""
    write_imagefolder(tmp_path / "jpegs", splits={"train": 48}, sizes=sizes, extension="jpg")
    write_imagefolder(tmp_path / "jpegs", splits={"validation": VAL_IMAGES}, sizes=(val_size,), extension="jpg")
    recipe = write_recipe(
        tmp_path / "r.toml", tmp_path / "jpegs",
        model={"name": MODEL},
        data={"val_split": "validation", "train_limit": 0, **data},
        augment={"crop_padding": 0, "random_crop": False},
        train={"epochs": 1, "batch_size": 16, "val_batch_size": VAL_IMAGES},
    )  # fmt: skip
    run = tmp_path / "run"
    result = run_main(main, str(recipe), "--output-dir", str(run))
    assert result.returncode == 0, result.stderr
    return run


def _timm_log_probs(run: Path, folder: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The exported model and timm's own transform of its config, on the split's JPEG files, one batch."""
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    model.to(memory_format=torch.channels_last)  # as training and evaluate.py run it (model.channels_last)
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    files = sorted(folder.glob("*/*.jpg"))  # the split's order: class folders, then file names
    classes = sorted(path.name for path in folder.iterdir())
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in files])
    with torch.no_grad():
        logits = model(images.contiguous(memory_format=torch.channels_last))
    labels = torch.tensor([classes.index(path.parent.name) for path in files])
    return F.log_softmax(logits.float(), dim=1), labels, config


def _check_one_transform(run: Path, folder: Path) -> dict:
    """evaluate.py, the last validation of the run, and timm's own transform agree; returns the exported config."""
    last = read_metrics(run)[-1]
    result = run_main(evaluate_main, str(run), "--json", "--num-workers", "1", "--batch-size", str(VAL_IMAGES))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    _, log_probs, labels, _ = evaluate_with_predictions(
        str(run), dataset=None, split=None, batch_size=VAL_IMAGES, tta=None, device="cpu", num_workers=0,
        say=lambda line: None,
    )  # fmt: skip
    timm_log_probs, timm_labels, config = _timm_log_probs(run, folder)
    assert torch.equal(labels, timm_labels)
    assert torch.equal(log_probs, timm_log_probs)  # the same images, bit for bit, give the same outputs
    top1 = 100.0 * float((timm_log_probs.argmax(1) == timm_labels).double().mean())
    loss = float(F.nll_loss(timm_log_probs.double(), timm_labels))
    assert evaluated["num_samples"] == VAL_IMAGES
    # (files written for people carry 6 significant digits: one image of 24 is 4.2 points of top-1)
    assert evaluated["top1"] == pytest.approx(top1, rel=1e-5) == pytest.approx(last["val_acc1"], rel=1e-5)
    assert evaluated["loss"] == pytest.approx(loss, rel=1e-5) == pytest.approx(last["val_loss"], rel=1e-5)
    exported = json.loads((run / "config.json").read_text())["pretrained_cfg"]
    for key in ("crop_pct", "crop_mode", "interpolation"):
        assert exported[key] == config[key]
    return exported


@pytest.mark.slow
def test_a_streaming_run_on_mixed_size_jpegs_evaluates_as_it_validated(tmp_path):
    run = _train(tmp_path, (44, 36, 52), 40, {"image_size": 32, "eval_resize": 36, "num_workers": 1})
    exported = _check_one_transform(run, tmp_path / "jpegs" / "validation")
    assert exported["input_size"] == [3, 32, 32] and exported["interpolation"] == "bilinear"
    assert math.floor(32 / exported["crop_pct"]) == 36 and exported["crop_mode"] == "center"  # not 0.95, bicubic


@pytest.mark.slow
def test_an_in_memory_run_records_no_resize_and_evaluates_bit_for_bit(tmp_path):
    run = _train(tmp_path, (32,), 32, {"pipeline": "memory"})
    exported = _check_one_transform(run, tmp_path / "jpegs" / "validation")
    assert exported["input_size"] == [3, 32, 32] and exported["crop_pct"] == 1.0  # the images as decoded
