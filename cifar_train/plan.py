"""`train_accelerate.py RECIPE --dry-run`: every check a run makes before data, and the plan, writing nothing.

It runs the same checks as a real start (recipe, model on the meta device, optimizer, trackers, batch split,
output directory), reads what the dataset's metadata says when it can be reached without downloading or
caching anything, and prints one table: model and parameters, dataset and splits, batches, steps, the lr at
a few points of the schedule, the augmentation chain, precision and the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .components import check_fit, check_model, launched_processes, preflight, resolve_precision
from .errors import UserError
from .rundir import RunDirectory, resumed_recipe
from .schedule import run_steps, schedule_curve
from .schema import Recipe, section_kwargs

__all__ = ["dry_run", "make_plan"]

_SCHEDULE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # shares of training at which the plan shows the lr


def _augmentation_chain(recipe: Recipe) -> str:
    a = recipe.augment
    steps = []
    if a.random_crop and a.crop_padding:
        steps.append(f"pad {a.crop_padding} ({a.crop_padding_mode}) + random crop")
    if a.hflip:
        steps.append("alternating flip" if a.alternating_flip else "flip")
    steps.append("normalise")
    if a.cutout:
        steps.append(f"Cutout {a.cutout}" + (f" p={a.cutout_prob}" if a.cutout_prob < 1 else ""))
    if a.random_erasing:
        steps.append(f"Random Erasing p={a.random_erasing_prob}")
    alpha = {"mixup": a.mixup_alpha, "cutmix": a.cutmix_alpha, "ricap": a.ricap_beta}.get(a.mix)
    if alpha is not None:
        steps.append(f"{a.mix} ({alpha})")
    if a.dual_cutout_alpha > 0:
        steps.append(f"Dual-Cutout (alpha {a.dual_cutout_alpha})")
    if a.label_smoothing:
        steps.append(f"label smoothing {a.label_smoothing}")
    return " -> ".join(steps)


def make_plan(recipe: Recipe | None, run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run the checks of a real start and describe the run; raises UserError as a real start would."""
    import torch

    from .data import describe_dataset

    recipe = resumed_recipe(recipe, run_dir) if resume else recipe
    t, d = recipe.train, recipe.data
    num_processes = launched_processes()
    per_process = preflight(recipe, num_processes)
    RunDirectory(run_dir, resume=resume, overwrite=overwrite)  # reads only
    dataset = describe_dataset(
        d.dataset, train_split=d.train_split, val_split=d.val_split, image_column=d.image_column,
        label_column=d.label_column,
    )  # fmt: skip
    if dataset["problems"]:  # what the real start would refuse when it opens the data
        raise UserError(dataset["problems"][0])
    num_classes, channels = dataset.get("num_classes"), dataset.get("channels")
    check_fit(recipe, num_classes=num_classes, image_size=dataset.get("image_size"))
    params = check_model(recipe.model.name, recipe.model.kwargs, num_classes=num_classes, in_chans=channels)
    train_images = (dataset.get("splits") or {}).get(d.train_split)
    if train_images is not None and d.train_limit:
        train_images = min(train_images, d.train_limit)
    if train_images is not None and d.val_split is None:
        train_images -= round(train_images * d.val_fraction)
    steps = train_images // t.batch_size // t.grad_accum_steps if train_images else None
    curve = schedule_curve(steps_per_epoch=steps or 1, epochs=t.epochs, **section_kwargs(recipe.schedule))
    total = run_steps(steps or 1, t.epochs)
    lrs = [(share, recipe.optim.lr * curve(round(share * total))) for share in _SCHEDULE_POINTS]
    try:
        precision = resolve_precision(t.precision, torch.cuda.is_available())
    except UserError as err:  # a GPU-only setting: the plan says so, the run on a GPU machine would go ahead
        precision = f"not here: {err}"
    return {
        "recipe": recipe,
        "model": recipe.model.name,
        "parameters": params,
        "num_classes": num_classes,
        "dataset": dataset,
        "train_images": train_images,
        "global_batch": t.batch_size,
        "per_process_batch": per_process,
        "num_processes": num_processes,
        "steps_per_epoch": steps,
        "epochs": t.epochs,
        "lr": lrs,
        "augmentation": _augmentation_chain(recipe),
        "precision": precision,
        "run_dir": str(run_dir),
        "run_dir_action": "resume" if resume else "overwrite" if overwrite else "new",
    }


def _dataset_text(dataset: dict[str, Any], name: str) -> str:
    if not dataset.get("reachable", True):
        return f"{name}: not reachable here ({dataset.get('reason', 'offline')})"
    parts = [name]
    if dataset.get("splits"):
        parts.append(", ".join(f"{split} {count:,}" for split, count in dataset["splits"].items()))
    if dataset.get("num_classes"):
        parts.append(f"{dataset['num_classes']} classes")
    if dataset.get("channels") and dataset.get("image_size"):
        height, width = dataset["image_size"]
        parts.append(f"{dataset['channels']}x{height}x{width}")
    return "; ".join(parts)


def dry_run(recipe: Recipe | None, run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Check, then print the plan as a table; writes nothing. Returns the plan."""
    plan = make_plan(recipe, run_dir, resume=resume, overwrite=overwrite)
    recipe = plan["recipe"]
    table = Table(
        title=f"dry run: {plan['run_dir']} ({plan['run_dir_action']}); nothing was written", show_header=False
    )
    table.add_column("what")
    table.add_column("plan")
    classes = f" at {plan['num_classes']} classes" if plan["num_classes"] else ""
    table.add_row("model", f"{plan['model']}: {plan['parameters']:,} parameters{classes}")
    table.add_row("dataset", _dataset_text(plan["dataset"], recipe.data.dataset))
    table.add_row(
        "batch",
        f"{plan['global_batch']} global = {plan['num_processes']} process(es) x {plan['per_process_batch']}",
    )
    steps = plan["steps_per_epoch"]
    table.add_row(
        "steps",
        f"{steps:,} per epoch x {plan['epochs']} epochs = {run_steps(steps, plan['epochs']):,}"
        if steps
        else f"{plan['epochs']} epochs (steps per epoch: dataset size unknown here)",
    )
    table.add_row("lr", "  ".join(f"{share:.0%}: {lr:.4g}" for share, lr in plan["lr"]))
    table.add_row("augmentation", plan["augmentation"])
    shown = {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}.get(plan["precision"])
    table.add_row("precision", f"{recipe.train.precision} -> {shown or plan['precision']} on this machine")
    Console().print(table)
    return plan
