"""The model card (`README.md`) of a finished run, rendered from the run's own files.

The card is what the Hub shows beside the weights: YAML front matter (library, task, tags, the dataset's Hub
id, and a `model-index` block with the final metrics, which the Hub turns into its results widget), how to
load the model from where the card lives, the results, the complete recipe and the environment. Everything
comes from the run directory (`recipe.toml`, `final_metrics.json`, `env.json`, `config.json`), so the same
card can be written again for another place: `results collect --with-weights` writes it for
`results/weights/<record>/`, whose loading line then names that folder, not a run directory the reader lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .data.source import dataset_identity
from .rounding import readable
from .rundir import CONFIG_FILE, ENV_FILE, FINAL_FILE, MODEL_CARD_FILE, RECIPE_FILE

__all__ = ["CardFacts", "card_facts", "render_model_card", "write_model_card"]

# final-metrics keys the card knows, in this order: (key, label, format); None formats a duration
_RESULT_ROWS = (
    ("val_acc1", "final validation top-1 (%)", "{:.2f}"),
    ("val_acc5", "final validation top-5 (%)", "{:.2f}"),
    ("val_loss", "final validation loss", "{:.4f}"),
    ("best_val_acc1", "best validation top-1 (%)", "{:.2f}"),
    ("epoch", "epochs trained", "{:g}"),
    ("step", "optimizer steps", "{:,.0f}"),
    ("train_loss", "last epoch's training loss", "{:.4f}"),
    ("train_acc1", "last epoch's training top-1 (%)", "{:.2f}"),
    ("lr", "final learning rate", "{:.4g}"),
    ("elapsed_seconds", "training time", None),
    ("epoch_seconds", "last epoch's time", None),
    ("images_per_second", "training throughput (images/s)", "{:,.0f}"),
    ("skipped_steps", "steps skipped for a non-finite loss", "{:,.0f}"),
)
_ENV_SHOWN = ("command", "torch", "timm", "accelerate", "datasets", "python", "device", "gpus", "num_processes",
              "mixed_precision", "cpu_threads", "cuda", "git_commit", "started")  # fmt: skip


@dataclass(frozen=True)
class CardFacts:
    """What a card says; `card_facts` reads them from a run directory."""

    run_name: str
    model_name: str
    num_params: int
    dataset: str  # data.dataset as the recipe gives it (alias, Hub id or local path)
    val_split: str  # what the validation figures were measured on
    recipe_toml: str
    results: Mapping[str, Any]  # final_metrics.json
    env: Mapping[str, Any]  # env.json
    trained_with_flips: bool  # augment.hflip: only then is flip test-time augmentation worth suggesting
    location: str  # where the card's folder is, as the reader would type it (for `local-dir:`)


def card_facts(run_dir: Path, *, location: str | None = None) -> CardFacts:
    """The facts of the finished run in `run_dir`; `location` (default: `run_dir`) is where the card will live."""
    from .recipe import load_recipe

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE, on_warning=lambda message: None)
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    env_path = run_dir / ENV_FILE
    d = recipe.data
    return CardFacts(
        run_name=run_dir.name,
        model_name=recipe.model.name,
        num_params=_parameters(config),
        dataset=d.dataset,
        val_split=d.val_split or f"{d.train_split} (held-out {d.val_fraction:g}, seed {recipe.train.seed})",
        recipe_toml=(run_dir / RECIPE_FILE).read_text(encoding="utf-8"),
        results=json.loads((run_dir / FINAL_FILE).read_text(encoding="utf-8")),
        env=json.loads(env_path.read_text(encoding="utf-8")) if env_path.is_file() else {},
        trained_with_flips=recipe.augment.hflip,
        location=str(location if location is not None else run_dir),
    )


def _parameters(config: Mapping[str, Any]) -> int:
    """The parameter count of the exported architecture, built on the meta device (no memory, no weights)."""
    import timm
    import torch

    import cifar_models  # noqa: F401  (registers the CIFAR architectures)

    with torch.device("meta"):
        model = timm.create_model(config["architecture"], **config.get("model_args", {}))
    return sum(p.numel() for p in model.parameters())


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quotes and all


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _model_index(facts: CardFacts, name: str, hub_id: str | None) -> list[str]:
    """The Hub's `model-index`: the final validation top-1 and top-5 on the dataset and split they were measured."""
    metrics = [(key, label) for key, label in (("val_acc1", "top-1 accuracy"), ("val_acc5", "top-5 accuracy"))]
    shown = [(label, facts.results[key]) for key, label in metrics if isinstance(facts.results.get(key), int | float)]
    if not shown:
        return []
    lines = ["model-index:", f"- name: {_yaml_str(facts.run_name)}", "  results:", "  - task:"]
    lines += ["      type: image-classification", "      name: Image Classification", "    dataset:"]
    lines += [f"      name: {_yaml_str(name)}", f"      type: {_yaml_str(hub_id or name)}"]
    lines += [f"      split: {_yaml_str(facts.val_split)}", "    metrics:"]
    for label, value in shown:
        lines += ["    - type: accuracy", f"      name: {_yaml_str(label)}", f"      value: {round(value, 2)}"]
    return lines


def _front_matter(facts: CardFacts, name: str, hub_id: str | None) -> list[str]:
    """The Hub's YAML header: library, task, tags, the dataset's Hub id where there is one, the results."""
    front = ["---", "library_name: timm", "pipeline_tag: image-classification", "tags:", "- image-classification"]
    front += ["- timm", "- cifar-recipes", f"- {_yaml_str(facts.model_name)}"]
    if hub_id is not None:
        front += ["datasets:", f"- {_yaml_str(hub_id)}"]
    front += ["metrics:", "- accuracy", *_model_index(facts, name, hub_id)]
    return [*front, "---", ""]


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """The known results in `_RESULT_ROWS` order, then the others rounded for reading."""
    rows, shown = [], {"best_epoch", "ranks_in_sync", "skipped_corrupt_images"}
    for key, label, fmt in _RESULT_ROWS:
        value = results.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append(f"| {label} | {_duration(value) if fmt is None else fmt.format(value)} |")
            shown.add(key)
    if "ranks_in_sync" in results:
        rows.append(f"| every process ended with the same weights | {'yes' if results['ranks_in_sync'] else 'NO'} |")
    for split, indices in (results.get("skipped_corrupt_images") or {}).items():
        rows.append(f"| corrupt images left out of {split} | {len(indices):,} |")
    rows += [f"| {key} | {readable(value)} |" for key, value in results.items() if key not in shown]
    return ["| | |", "|---|---|", *rows] if rows else ["No results were recorded."]


def render_model_card(facts: CardFacts) -> str:
    """The card's Markdown (see the module docstring)."""
    name, hub_id, what = dataset_identity(facts.dataset)
    argument = hub_id if hub_id is not None else facts.dataset if "/" not in facts.dataset else "PATH"
    where = f" (PATH: your copy of {name})" if argument == "PATH" else ""
    env = [f"- {key}: `{facts.env[key]}`" for key in _ENV_SHOWN if facts.env.get(key) not in (None, "", [])]
    flips = " (add `--tta flip` for flip test-time augmentation)" if facts.trained_with_flips else ""
    card = [
        *_front_matter(facts, name, hub_id),
        f"# {facts.run_name}: {facts.model_name} trained on {name} ({what})",
        "",
        f"An image classifier (`{facts.model_name}`, {facts.num_params:,} parameters) trained with cifar-recipes "
        "(timm + Hugging Face Accelerate; a re-creation of `hysts/pytorch_image_classification`). The recipe "
        "below is complete: it reproduces this run.",
        "",
        "## How to load",
        "",
        "The architecture is registered by `cifar_models`, so import it before creating the model:",
        "",
        "```python",
        "import cifar_models  # registers the CIFAR architectures with timm; must come first",
        "import timm",
        "",
        f'model = timm.create_model("local-dir:{facts.location}", pretrained=True)  # the folder of this card',
        '# or, once pushed: timm.create_model("hf-hub:<user>/<name>", pretrained=True)',
        "model.eval()",
        "# preprocessing the run used (uint8 pixels / 255, then (x - mean) / std):",
        'mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]',
        'class_names = model.pretrained_cfg["label_names"]',
        "```",
        "",
        f"Evaluate it with `python evaluate.py local-dir:{facts.location} --dataset {argument}`{where}{flips}.",
        "",
        "## Results",
        "",
        f"On {name}, split {facts.val_split}:",
        "",
        *_results_table(facts.results),
        "",
        "## Recipe",
        "",
        "```toml",
        facts.recipe_toml.rstrip(),
        "```",
        "",
        "## Environment",
        "",
        *(env or ["Not recorded."]),
        "",
        "## Notes",
        "",
        "- Accuracies are from one run with one seed, on the validation split named above (the seed project "
        "validated on the test split); expect a spread of a few tenths of a percent between seeds.",
        "- Mean and std in `config.json` are the ones this run normalised with; inputs must be normalised "
        "the same way.",
        "",
    ]
    return "\n".join(card)


def write_model_card(folder: Path, facts: CardFacts) -> Path:
    """Write `folder/README.md` atomically; returns its path."""
    path = Path(folder) / MODEL_CARD_FILE
    text = render_model_card(facts)
    write_atomic(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    return path
