"""What the model, the augmentation and the person at the terminal learn about a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DatasetInfo", "mean_std", "summary_line"]


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the augmentation need to know about a dataset."""

    name: str  # what the user passed, resolved (Hub id or local path)
    num_classes: int
    class_names: list[str]
    channels: int  # 1 or 3
    image_size: tuple[int, int]  # (H, W) of the decoded images; streaming: the train crop size
    mean: tuple[float, ...]  # per channel, in [0, 1], from the training images
    std: tuple[float, ...]
    skipped_images: dict[str, list[int]] = field(default_factory=dict)  # split -> corrupt indices left out
    eval_resize: int | None = None  # streaming: shorter side before the evaluation centre crop; None: no resize

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config of the run's one evaluation transform (`cifar_train.data.transforms`)."""
        from cifar_train.data.transforms import data_config

        return data_config(
            channels=self.channels,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            eval_resize=self.eval_resize,
        )


def mean_std(sums: torch.Tensor, squares: torch.Tensor, pixels_per_image: int) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std in [0, 1] from per-image sums of pixel values (0-255) and of their squares."""
    count = max(sums.shape[0] * pixels_per_image, 1)
    mean = sums.double().sum(0) / (count * 255.0)
    second = squares.double().sum(0) / (count * 255.0**2)
    std = (second - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def summary_line(
    name: str,
    split: str,
    *,
    images: int,
    num_classes: int,
    shape: Sequence[int],  # (C, H, W)
    mean: Sequence[float],
    std: Sequence[float],
    how: str,  # "cache hit 0.4 s", "decoded in 38.2 s", "streaming"
) -> str:
    """One line per split, so a person sees what was detected: `data: NAME [split] 50,000 images, ...`."""
    values = "/".join(f"{value:.3f}" for value in mean), "/".join(f"{value:.3f}" for value in std)
    return (
        f"data: {name} [{split}] {images:,} images, {num_classes} classes, {'x'.join(map(str, shape))}, "
        f"mean {values[0]} std {values[1]}, {how}"
    )
