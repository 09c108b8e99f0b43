"""Data-dependent initialisation: the one step a model may ask for before training, on the training images.

A model asks for it by having a method `init_from_images(images)`, which takes normalised float images
(N, C, H, W) on the model's device; airbench94 (`cifar_models.cifar_airbench`) sets its whitening filters from
them. The loop calls `init_from_data` once, before `accelerator.prepare`, on a fresh run only: every process
computes it from the same first `model.data_init_images` images of the training split, in dataset order and
unaugmented, normalised as training normalises them, and the weights are then broadcast from the first process
when the model is wrapped for several processes. A resumed run takes those weights from its checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from .errors import UserError
from .normalize import normalize

__all__ = ["init_from_data", "wants_data_init"]


def wants_data_init(model: nn.Module) -> bool:
    """Whether `model` has a data-dependent initialisation (an `init_from_images` method)."""
    return callable(getattr(model, "init_from_images", None))


def init_from_data(model: nn.Module, batches: Any, *, mean: Sequence[float], std: Sequence[float], images: int) -> int:
    """Run `model.init_from_images` on the first `images` training images of `batches` (an in-memory batch source,
    whose `images` are the decoded uint8 split); returns how many images it saw (0 when the model has no such step)."""
    if not wants_data_init(model):
        return 0
    decoded = getattr(batches, "images", None)
    if decoded is None:
        raise UserError(
            f"model {type(model).__name__} initialises from the training images, which needs the in-memory pipeline "
            '(data.pipeline = "memory")'
        )
    first = decoded[:images]
    model.init_from_images(normalize(first, mean, std))
    return len(first)
