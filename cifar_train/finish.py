"""Finishing a run: final metrics, the safetensors export with timm's config, the model card, the Hub push.

This sits above the run directory (`rundir.py`, which owns the files of a run and knows nothing of exporting),
so that every import points down: loop -> finish -> (export, card, push) -> rundir.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .card import card_facts, write_model_card
from .export import export_model
from .push import push_run
from .rundir import RunDirectory

__all__ = ["finish_run"]


def finish_run(
    run: RunDirectory,
    model: nn.Module,
    final: dict[str, Any],
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    info: Any,  # cifar_train.data.DatasetInfo
    push_to: str | None,
    private: bool,
) -> None:
    """Write final_metrics.json, model.safetensors + config.json, the model card; push when `push_to` is set."""
    run.write_final(final)
    export_model(
        model,
        run.path,
        model_name=model_name,
        model_kwargs=model_kwargs,
        num_classes=info.num_classes,
        in_chans=info.channels,
        class_names=info.class_names,
        **info.data_config,  # the run's evaluation transform: input_size, mean, std, crop_pct, crop_mode, interpolation
    )
    write_model_card(run.path, card_facts(run.path))
    if push_to:
        push_run(run.path, push_to, private=private)
