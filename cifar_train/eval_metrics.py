"""The numbers of an evaluation from its predictions: loss, top-1/top-5, per-class accuracy, confusion matrix and
the expected calibration error (ECE), accuracies in percent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cifar_train.losses import classification_sums

__all__ = ["ECE_BINS", "compute_metrics", "expected_calibration_error"]

ECE_BINS = 15  # equal-width confidence bins


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """ECE in percent: sum over equal-width confidence bins of |accuracy - mean confidence| x bin share.

    Confidence is the top probability; a sample with confidence c falls in bin ceil(c * num_bins) (bins
    are (lo, hi], the first also holds c = 0).
    """
    if probs.shape[0] == 0:
        return float("nan")
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    bins = (confidence.double() * num_bins).ceil().long().sub(1).clamp(0, num_bins - 1)
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, confidence.double())
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct)
    gap = (acc_sum - conf_sum).abs()  # = count * |mean acc - mean conf| per bin
    return float(gap.sum() / probs.shape[0] * 100)


def compute_metrics(log_probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Loss, top-1, top-5, per-class accuracy, confusion matrix and ECE from log-probabilities `(N, K)`.

    Loss and top-1/top-5 come from `classification_sums`, the same function the training loop validates with.
    `confusion_matrix[i][j]` counts samples of true class i predicted as class j. A class without samples has
    per-class accuracy None.
    """
    num_samples, num_classes = log_probs.shape
    log_probs, labels = log_probs.double().cpu(), labels.long().cpu()
    loss, top1, top5, count = classification_sums(log_probs, labels).tolist()
    predicted = log_probs.argmax(dim=1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    per_class_total = confusion.sum(dim=1)
    per_class = {
        name: (float(confusion[k, k] / per_class_total[k] * 100) if per_class_total[k] else None)
        for k, name in enumerate(class_names)
    }
    nan = float("nan")
    return {
        "num_samples": num_samples,
        "num_classes": num_classes,
        "loss": loss / count if count else nan,
        "top1": 100.0 * top1 / count if count else nan,
        "top5": 100.0 * top5 / count if count else nan,
        "ece": expected_calibration_error(log_probs.exp(), labels),
        "per_class_accuracy": per_class,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
    }
