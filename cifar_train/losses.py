"""Losses and accuracy on soft targets, and the classification sums shared by validation and `evaluate.py`.

Every batch augmentation ends as `(images, soft targets)`, so one cross-entropy serves plain labels, label
smoothing, Mixup, CutMix and RICAP. Dual-Cutout adds a consistency term between its two views, as in the seed
(`losses/dual_cutout.py`): the mean squared error between the two views' logits, weighted by alpha.

Papers:
    Dual-Cutout: Ma et al., https://arxiv.org/abs/1908.02917
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["classification_sums", "dual_cutout_loss", "soft_correct", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k, computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def dual_cutout_loss(logits1: torch.Tensor, logits2: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """The mean of the two views' cross-entropies plus `alpha` times the MSE between the two views' logits."""
    ce = 0.5 * (soft_cross_entropy(logits1, targets) + soft_cross_entropy(logits2, targets))
    return ce + alpha * F.mse_loss(logits1.float(), logits2.float())


def soft_correct(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum over the batch of the (unsmoothed) target weight on the predicted class.

    For hard labels this is the number correct; for Mixup/CutMix/RICAP it is the area- or lambda-weighted
    number correct, as the seed reported. Smoothing is affine, so it is undone exactly.
    """
    picked = targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
    if label_smoothing > 0:
        picked = (picked - label_smoothing / targets.shape[1]) / (1.0 - label_smoothing)
    return picked.sum()


def classification_sums(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """`[sum of cross-entropy, top-1 correct, top-5 correct, count]` over the valid rows, as float64 on the device.

    `valid` masks out padding rows (fixed-size validation batches); the per-sample cross-entropy is computed
    in float32 (float64 inputs stay float64) and summed in float64. Top-5 is top-min(5, K). Log-probabilities
    work as logits (log_softmax leaves them unchanged).
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # mixed precision: the loss in float32, as in training
    losses = F.cross_entropy(logits, labels, reduction="none").double()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (top[:, 0] == labels).double()
    top5 = (top == labels[:, None]).any(dim=1).double()
    ones = torch.ones_like(top1)
    rows = torch.stack([losses, top1, top5, ones])  # (4, B)
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))  # not a product: a padding row may be non-finite
    return rows.sum(dim=1)
