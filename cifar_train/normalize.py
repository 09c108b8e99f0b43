"""Normalisation of uint8 image batches on their device, with constants built once per data source."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Normalize", "channel_tensors", "normalize"]


def channel_tensors(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(scale, shift)` of shape (1, C, 1, 1) so that `uint8 * scale - shift == (x / 255 - mean) / std`."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), mean_t / std_t


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 `(images / 255 - mean) / std` on the same device (evaluation).

    It builds its constants on every call: for batch after batch, use `Normalize`, which builds them once.
    """
    return Normalize(mean, std, images.device)(images)


class Normalize:
    """`normalize` for one data source: the per-channel constants go to `device` once, at construction, so a
    batch costs no host-to-device copy (on a GPU each copy from a Python list waits for the host).

    It computes `(x / 255 - mean) / std` in float32 in that order, as torchvision's `ToTensor` + `Normalize` do in
    timm's evaluation transform, so decoded evaluation batches equal timm's bit for bit (`data/transforms.py`).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str) -> None:
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one value per channel each, got mean={mean!r} std={std!r}")
        self.channels = len(mean)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.channels:
            raise ValueError(f"need one mean and std per channel ({images.shape[1]}), got {self.channels}")
        return images.float().div_(255.0).sub_(self.mean).div_(self.std)
