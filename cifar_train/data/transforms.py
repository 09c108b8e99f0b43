"""The per-sample transforms of the streaming pipelines and the one record of a run's evaluation transform.

A run evaluates with exactly one transform, and it is written down once, as timm's data config
(`input_size`, `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`: the keys of
`timm.data.resolve_data_config`). Validation during training builds its transform from that config, the
export stores it as the model's `pretrained_cfg`, and evaluation builds its transform from the loaded model's
config through timm's own `create_transform(**resolve_data_config({}, model=model))`, so all three see the
same images:

- streaming (`eval_resize` set): the shorter side resized to `eval_resize` (bilinear), then the centre
  `image_size` crop; `crop_pct` is chosen so that timm's `floor(image_size / crop_pct)` gives back exactly
  `eval_resize` (the plain quotient does not for about one size pair in six);
- in memory (`eval_resize` None): the decoded image as it is, `crop_pct` 1.0 (timm's resize and centre crop
  then leave an image of the model's input size unchanged), normalised as `(x / 255 - mean) / std` in float32,
  which is what `cifar_train.augment.Normalize` computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["EVAL_INTERPOLATION", "data_config", "eval_crop_pct", "eval_transform", "train_transform"]

EVAL_INTERPOLATION = "bilinear"  # the resize of the streaming pipeline, training and evaluation alike


def eval_crop_pct(image_size: int, eval_resize: int) -> float:
    """The `crop_pct` for which timm resizes to exactly `eval_resize` (`floor(image_size / crop_pct)`)."""
    if not 0 < image_size <= eval_resize:
        raise ValueError(f"need 0 < image_size <= eval_resize, got {image_size} and {eval_resize}")
    crop_pct = image_size / eval_resize
    while math.floor(image_size / crop_pct) < eval_resize:  # the quotient rounded up: one step down
        crop_pct = math.nextafter(crop_pct, 0.0)
    while math.floor(image_size / crop_pct) > eval_resize:
        crop_pct = math.nextafter(crop_pct, 1.0)
    return crop_pct


def data_config(
    *,
    channels: int,
    image_size: Sequence[int],  # (H, W) the model sees, pixels
    mean: Sequence[float],  # per channel, in [0, 1]
    std: Sequence[float],
    eval_resize: int | None = None,  # pixels; None: the images are evaluated as decoded (no resize)
) -> dict[str, Any]:
    """timm's data config of the evaluation transform (what `resolve_data_config` returns for the exported model)."""
    height, width = image_size
    if eval_resize is None:
        crop_pct = 1.0
    else:
        if height != width:
            raise ValueError(f"the streaming pipeline crops squares, got image_size={tuple(image_size)!r}")
        crop_pct = eval_crop_pct(height, eval_resize)
    return {
        "input_size": (channels, height, width),
        "interpolation": EVAL_INTERPOLATION,
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


def eval_transform(config: Mapping[str, Any], *, normalize: bool = True) -> Any:
    """timm's evaluation transform of a data config; `normalize=False`: uint8 tensors, to be normalised by
    `cifar_train.augment.Normalize` on the device (the same float32 values, bit for bit) or counted (statistics)."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{key: config[key] for key in keys}, is_training=False, normalize=normalize)


def train_transform(
    *,
    channels: int,
    image_size: int,  # pixels
    min_scale: float = 0.08,  # RandomResizedCrop's smallest area share
    hflip: bool = True,
) -> Any:
    """timm's training transform to uint8 tensors: RandomResizedCrop (bilinear), horizontal flip; no colour jitter.

    Normalisation follows on the training device, as timm's own loader does it (its prefetcher): the workers
    and the pinned host-to-device copies carry a quarter of the bytes of float images."""
    from timm.data import create_transform

    return create_transform(
        input_size=(channels, image_size, image_size),
        is_training=True,
        scale=(min_scale, 1.0),
        hflip=0.5 if hflip else 0.0,
        color_jitter=0.0,
        interpolation=EVAL_INTERPOLATION,
        normalize=False,
    )
