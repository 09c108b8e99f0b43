"""Test-time augmentation: the views of a batch, their weights, and the prediction averaged over them.

- `flip`: the image and its mirror, 1/2 each.
- `flip_translate` (airbench's level 2, https://arxiv.org/abs/2404.00498): the image and its mirror, 1/4 each, and
  the image moved one pixel down and right and one pixel up and left (cut from the image reflect-padded by one
  pixel), each with its mirror, 1/8 each.

The prediction is the log of the weighted mean of the views' softmax, as `--tta flip` has always averaged. (airbench
averages the logits instead, which is the normalised geometric mean of the softmax; the two rarely pick different
classes, and only the mean of probabilities keeps the loss and the calibration error about probabilities.) Used by
the last epoch's validation during training (`train.final_tta`) and by `evaluate.py --tta`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schema import TTA_MODES

__all__ = ["TTA_MODES", "tta_log_probs", "tta_views"]


def tta_views(images: torch.Tensor, mode: str) -> list[tuple[float, torch.Tensor]]:
    """`(weight, view)` pairs of normalised images (B, C, H, W) for `mode`; the weights sum to 1."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r} is not supported; choose one of {', '.join(TTA_MODES)}")
    views = [(0.5, images), (0.5, images.flip(dims=(3,)))]
    if mode == "flip":
        return views
    height, width = images.shape[2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    moved = [padded[:, :, :height, :width], padded[:, :, 2 : 2 + height, 2 : 2 + width]]  # down-right, up-left
    return [(0.25, images), (0.25, images.flip(dims=(3,)))] + [
        (0.125, view) for image in moved for view in (image, image.flip(dims=(3,)))
    ]


def tta_log_probs(model: nn.Module, images: torch.Tensor, mode: str, *, channels_last: bool = True) -> torch.Tensor:
    """log(sum over views of weight x softmax(model(view))) as float32 (B, K); one forward pass per view."""
    terms = []
    for weight, view in tta_views(images, mode):
        if channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        terms.append(F.log_softmax(model(view).float(), dim=1) + math.log(weight))
    return torch.logsumexp(torch.stack(terms), dim=0)
