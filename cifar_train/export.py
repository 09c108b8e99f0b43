"""Final weights and model card of a run, in the layout timm loads from a folder or the Hub.

`export_model` writes `model.safetensors` and `config.json` into the run directory, so that

    import cifar_models, timm
    model = timm.create_model("local-dir:runs/<name>", pretrained=True)

rebuilds the architecture with the run's kwargs, classes and preprocessing (mean / std / input size),
and `cifar_train.card` writes the model card that goes to the Hub with them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch.nn as nn
from accelerate.utils import extract_model_from_parallel
from timm.models._hub import save_config_for_hf

from .atomic import write_atomic
from .rundir import CONFIG_FILE, WEIGHTS_FILE

__all__ = ["export_model", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / FSDP / DeepSpeed wrappers and `torch.compile`."""
    return extract_model_from_parallel(model, keep_fp32_wrapper=False, keep_torch_compile=False)


def export_model(
    model: nn.Module,
    run_dir: Path,
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int, int],  # (C, H, W) the run trained on, pixels
    mean: Sequence[float],  # per channel, in [0, 1]: the normalisation the run used
    std: Sequence[float],
    class_names: Sequence[str],
    crop_pct: float = 1.0,  # the evaluation transform's centre crop share; 1.0: no resize of decoded images
    crop_mode: str = "center",
    interpolation: str = "bilinear",
) -> None:
    """Write `model.safetensors` + `config.json` (timm's hub config) into `run_dir`.

    The weights are written with safetensors directly (contiguous CPU copies, so channels_last and GPU
    models export too); the config is timm's own `save_config_for_hf`, carrying `architecture`,
    `model_args` (the run's kwargs plus `num_classes` / `in_chans`), `label_names` and a `pretrained_cfg`
    whose input size, mean, std, crop_pct, crop_mode and interpolation are the run's evaluation transform
    (`DatasetInfo.data_config`), never the architecture's defaults: evaluation and
    `timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))` read it back.
    """
    model = unwrap_model(model)
    run_dir = Path(run_dir)
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise ValueError(f"num_classes={num_classes} does not match the model's num_classes={model.num_classes}")
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names; num_classes={num_classes} needs one per class")
    if len(input_size) != 3 or input_size[0] != in_chans:
        raise ValueError(f"input_size={tuple(input_size)!r} must be (C, H, W) with C = in_chans = {in_chans}")
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != in_chans:
            raise ValueError(f"{key}={tuple(values)!r} needs one value per input channel (in_chans={in_chans})")
    if getattr(model, "in_chans", None) is None:
        model.in_chans = in_chans  # timm's convention: the config exporter reads the channel count from here
    elif model.in_chans != in_chans:
        raise ValueError(f"in_chans={in_chans} does not match the model's in_chans={model.in_chans}")

    model_args = {key: value for key, value in model_kwargs.items() if value is not None}
    model_args.update(num_classes=num_classes, in_chans=in_chans)
    try:
        json.dumps(model_args)
    except TypeError as err:
        raise ValueError(f"model_kwargs must be JSON-serialisable to be stored in config.json: {err}") from None

    # the architecture is what timm will look up; the registered name, not a tag or a wrapped name
    model_config = {
        "label_names": list(class_names),
        "pretrained_cfg": {"architecture": model_name},
    }
    data_config = {
        "input_size": tuple(input_size),
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "interpolation": interpolation,
    }
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}

    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(
        run_dir / WEIGHTS_FILE,
        lambda path: safetensors.torch.save_file(state, path, metadata={"format": "pt"}),
    )
    write_atomic(
        run_dir / CONFIG_FILE,
        lambda path: save_config_for_hf(
            model, path, model_config=model_config, model_args=model_args, data_config=data_config
        ),
    )
