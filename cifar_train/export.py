"""Final weights and model card of a run, in the layout timm loads from a folder or the Hub.

`export_model` writes `model.safetensors` and `config.json` into the run directory, so that

    import cifar_models, timm
    model = timm.create_model("local-dir:runs/<name>", pretrained=True)

rebuilds the architecture with the run's kwargs, classes and preprocessing (mean / std / input size),
and `write_model_card` writes the `README.md` that goes to the Hub with them.
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
from .rundir import CONFIG_FILE, MODEL_CARD_FILE, WEIGHTS_FILE

__all__ = ["CONFIG_FILE", "MODEL_CARD_FILE", "WEIGHTS_FILE", "export_model", "unwrap_model", "write_model_card"]


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
) -> None:
    """Write `model.safetensors` + `config.json` (timm's hub config) into `run_dir`.

    The weights are written with safetensors directly (contiguous CPU copies, so channels_last and GPU
    models export too); the config is timm's own `save_config_for_hf`, carrying `architecture`,
    `model_args` (the run's kwargs plus `num_classes` / `in_chans`), `label_names` and a `pretrained_cfg`
    whose mean / std / input size are the run's, which evaluation reads back.
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
    data_config = {"input_size": tuple(input_size), "mean": tuple(mean), "std": tuple(std)}
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


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quotes and all


def _fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


# results keys the card knows how to show, in this order: (key, label, format)
_RESULT_ROWS = (
    ("val_acc1", "final validation top-1 (%)", "{:.2f}"),
    ("val_acc5", "final validation top-5 (%)", "{:.2f}"),
    ("val_loss", "final validation loss", "{:.4f}"),
    ("best_val_acc1", "best validation top-1 (%)", "{:.2f}"),
    ("best_epoch", "epoch of best top-1", "{:.0f}"),
    ("epochs", "epochs trained", "{:.0f}"),
    ("epoch", "epochs trained", "{:.0f}"),
    ("step", "optimizer steps", "{:.0f}"),
    ("train_loss", "last epoch's training loss", "{:.4f}"),
    ("train_acc1", "last epoch's training top-1 (%)", "{:.2f}"),
    ("train_seconds", "training time", None),
    ("elapsed_seconds", "training time", None),
    ("images_per_second", "training throughput (images/s)", "{:.0f}"),
)


def _fmt_other(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _front_matter(model_name: str, dataset: str) -> list[str]:
    """The Hub's YAML header: library, task, tags, the dataset when it is a Hub id."""
    front = ["---", "library_name: timm", "pipeline_tag: image-classification", "tags:", "- image-classification"]
    front += ["- timm", "- cifar-recipes", f"- {_yaml_str(model_name)}"]
    if not Path(dataset).expanduser().exists() and dataset.count("/") == 1:  # a Hub id, not a local folder
        front += ["datasets:", f"- {_yaml_str(dataset)}"]
    return [*front, "metrics:", "- accuracy", "---", ""]


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """The known results in `_RESULT_ROWS` order, then any other key as it is."""
    rows, shown = [], set()
    for key, label, fmt in _RESULT_ROWS:
        if key in results:
            value = results[key]
            rows.append(f"| {label} | {_fmt_seconds(value) if fmt is None else fmt.format(value)} |")
            shown.add(key)
    rows += [f"| {key} | {_fmt_other(value)} |" for key, value in results.items() if key not in shown]
    return ["| | |", "|---|---|", *rows] if rows else ["No results were recorded."]


def write_model_card(
    run_dir: Path,
    *,
    recipe_toml: str,
    model_name: str,
    results: Mapping[str, float],  # val_acc1 / val_acc5 / best_val_acc1 in %, val_loss, epochs, train_seconds
    env: Mapping[str, Any],  # what `rundir.collect_env` returns
    dataset: str,  # Hub id or local path the run trained on
    num_params: int,
    trained_with_flips: bool = True,  # augment.hflip: only then is flip test-time augmentation worth suggesting
) -> None:
    """Write the run's `README.md`: Hub metadata, how to load, results, the recipe, the environment.

    Known `results` keys are listed in `_RESULT_ROWS`; any other key is shown as is after them.
    """
    run_dir = Path(run_dir)
    env_lines = [f"- {key}: `{value}`" for key, value in env.items() if value not in (None, "", [])]
    run_name = run_dir.name
    card = [
        *_front_matter(model_name, dataset),
        f"# {run_name}: {model_name} trained on {dataset}",
        "",
        f"An image classifier (`{model_name}`, {num_params:,} parameters) trained with "
        "cifar-recipes (timm + Hugging Face Accelerate; a re-creation of `hysts/pytorch_image_classification`). "
        "The recipe below is complete: it reproduces this run.",
        "",
        "## How to load",
        "",
        "The architecture is registered by `cifar_models`, so import it before creating the model:",
        "",
        "```python",
        "import cifar_models  # registers the CIFAR architectures with timm; must come first",
        "import timm",
        "",
        f'model = timm.create_model("local-dir:{run_dir}", pretrained=True)  # this run directory',
        '# or, once pushed: timm.create_model("hf-hub:<user>/<name>", pretrained=True)',
        "model.eval()",
        "# preprocessing the run used (uint8 pixels / 255, then (x - mean) / std):",
        'mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]',
        'class_names = model.pretrained_cfg["label_names"]',
        "```",
        "",
        f"Evaluate it with `python evaluate.py {run_dir}`"
        + (" (add `--tta flip` for flip test-time augmentation)." if trained_with_flips else "."),
        "",
        "## Results",
        "",
        *_results_table(results),
        "",
        "## Recipe",
        "",
        "```toml",
        recipe_toml.rstrip(),
        "```",
        "",
        "## Environment",
        "",
        *(env_lines or ["Not recorded."]),
        "",
        "## Notes",
        "",
        "- Accuracies are from one run with one seed, on the validation split named in the recipe "
        "(the seed project validated on the test split); expect a spread of a few tenths of a percent "
        "between seeds.",
        "- Mean and std in `config.json` are the ones this run normalised with; inputs must be normalised "
        "the same way.",
        "",
    ]
    write_atomic(run_dir / MODEL_CARD_FILE, lambda path: Path(path).write_text("\n".join(card), encoding="utf-8"))
