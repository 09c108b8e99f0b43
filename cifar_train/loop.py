"""The training loop on Hugging Face Accelerate, in the order of Accelerate's `cv_example.py` and timm's `train.py`.

`train()` checks everything it can before reading data, builds the components, calls `accelerator.prepare`,
then hands each epoch to `train_one_epoch` and `validate`, logs it and checkpoints it; the run directory
(`rundir.py`) owns every file, `TrainStep` (`step.py`) one batch. The hot path reads no device value back to
the host: the running metrics are read every `log.every_steps` optimizer steps and at the end of an epoch,
and those reads also agree a stop request (SIGINT/SIGTERM) across processes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed

from .checkpoint import TrainState, checkpointer, newest_state, start_state
from .components import (
    build_augment,
    build_model,
    build_optimizer,
    build_scheduler,
    check_fit,
    launched_processes,
    make_accelerator,
    preflight,
    sync_batchnorm,
)
from .data import open_training_data
from .data_init import init_from_data
from .errors import Interrupted, NonFiniteLoss, UserError
from .finish import finish_run
from .lookahead import ModelLookahead
from .losses import classification_sums
from .progress import EpochProgress, print_summary
from .recipe import flatten_recipe, recipe_to_toml
from .rundir import RunDirectory, collect_env, resumed_recipe
from .schedule import epoch_count, run_steps
from .schema import Recipe, section_kwargs
from .signals import stop_signals
from .step import TrainStep, nonfinite_stop
from .tta import tta_log_probs
from .wording import option, speaking

__all__ = ["train", "train_one_epoch", "validate"]


def train(
    recipe: Recipe | None,
    output_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    recipe_file: str | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train `recipe` into `output_dir` (the run directory); returns the final metrics.

    With `resume=True` the run continues from its newest complete checkpoint (`recipe` may be None: the run's
    own recipe.toml is used; when given it must equal it). `recipe_file` and `overrides` are recorded in
    env.json (the command line passes them), so a result can name the command that made it.
    """
    with speaking(command="train"), stop_signals() as signals:
        recipe = resumed_recipe(recipe, Path(output_dir)) if resume else recipe
        t = recipe.train
        per_process_batch = preflight(recipe, launched_processes())  # before anything is built
        accelerator = make_accelerator(
            precision=t.precision,
            grad_accum_steps=t.grad_accum_steps,
            trackers=recipe.log.trackers,
            project_dir=str(output_dir),
        )
        say = log or accelerator.print
        run = RunDirectory(output_dir, resume=resume, overwrite=overwrite)  # checked last, written first below

        set_seed(t.seed)
        classes = (newest_state(run.path) or TrainState()).class_names or None if resume else None
        with accelerator.local_main_process_first():  # one process per machine fills the decode cache first
            data = open_training_data(**section_kwargs(recipe.data), seed=t.seed, say=say, classes=classes)
        check_fit(recipe, num_classes=data.info.num_classes, image_size=data.info.image_size)
        model = build_model(recipe, num_classes=data.info.num_classes, in_chans=data.info.channels)
        if t.sync_bn:  # before `prepare` wraps the model (preflight checked: several CUDA processes)
            model = sync_batchnorm(model)
        model = model.to(accelerator.device, memory_format=_memory_format(recipe))
        optimizer = build_optimizer(model, recipe)  # after the move: fused kernels are chosen by device
        batches, val_batches = _batch_sources(accelerator, data, recipe, per_process_batch)
        steps_per_epoch = len(batches) // t.grad_accum_steps
        scheduler = build_scheduler(optimizer, recipe, steps_per_epoch)
        if not resume:  # a resumed run's weights, this step's result included, come from its checkpoint
            init_from_data(model, batches, mean=data.info.mean, std=data.info.std, images=recipe.model.data_init_images)
        lookahead = _lookahead(model, t, run_steps(steps_per_epoch, t.epochs))  # its slow copy starts from here
        set_seed(t.seed + accelerator.process_index)  # augmentation and dropout streams differ per process

        progress = EpochProgress(enabled=accelerator.is_main_process and recipe.log.progress)
        with run, progress, _tracking(accelerator):
            env = collect_env(accelerator, recipe_file=recipe_file, overrides=overrides)
            run.open(main_process=accelerator.is_main_process, recipe_toml=recipe_to_toml(recipe), env=env)
            accelerator.wait_for_everyone()
            model, optimizer = accelerator.prepare(model, optimizer)
            step = _train_step(accelerator, model, optimizer, recipe, steps_per_epoch, lookahead)
            state, history = start_state(
                accelerator, run, step, scheduler, resume, say, seed=t.seed, order_kept=not recipe.data.streaming_source
            )
            accelerator.init_trackers(run.path.name, config=flatten_recipe(recipe))
            save = checkpointer(accelerator, run, step, scheduler, data.info.class_names, keep=t.keep_checkpoints)
            signals.training()  # from here on a signal is a stop request: checkpoint at the next read, then stop
            for epoch in range(state.epoch, epoch_count(t.epochs)):
                started = time.perf_counter()
                row, stop_now = train_one_epoch(
                    step,
                    batches,
                    scheduler,
                    state,
                    epoch=epoch,
                    epochs=t.epochs,
                    every_steps=recipe.log.every_steps,
                    progress=progress,
                    stop=signals.requested,
                    save=save,
                )
                row.update(_validation_due(accelerator, step, val_batches, recipe, state, epoch))
                row["epoch_seconds"] = time.perf_counter() - started
                checkpoint = _end_epoch(accelerator, run, state, row, history, progress, save, t, stop_now)
                if stop_now:
                    raise Interrupted(signals.first(), checkpoint)
            return _finish(accelerator, run, model, recipe, data.info, state, history)


def _batch_sources(accelerator: Accelerator, data: Any, recipe: Recipe, per_process_batch: int) -> tuple[Any, Any]:
    """This process's training and validation batch sources; refused when a batch is larger than the data."""
    t = recipe.train
    shard = dict(num_replicas=accelerator.num_processes, rank=accelerator.process_index, device=accelerator.device)
    batches = data.train_batches(build_augment(recipe, data.info), batch_size=per_process_batch, seed=t.seed, **shard)
    val_batches = data.val_batches(batch_size=max(1, t.val_batch_size // accelerator.num_processes), **shard)
    if len(batches) // t.grad_accum_steps == 0:
        raise UserError(
            f"train.batch_size = {t.batch_size} x train.grad_accum_steps = {t.grad_accum_steps} is "
            f"larger than the training set ({data.info.name})"
        )
    return batches, val_batches


def _lookahead(model: nn.Module, t: Any, total_steps: int) -> ModelLookahead | None:
    if t.lookahead_steps == 0:
        return None
    return ModelLookahead(
        model,
        total_steps=total_steps,
        lookahead_steps=t.lookahead_steps,
        lookahead_decay=t.lookahead_decay,
        lookahead_decay_power=t.lookahead_decay_power,
    )


def _train_step(
    accelerator: Accelerator, model: nn.Module, optimizer, recipe: Recipe, steps_per_epoch: int, lookahead
) -> TrainStep:
    t, a = recipe.train, recipe.augment
    return TrainStep(
        accelerator,
        model,
        optimizer,
        subdivision=t.subdivision,
        grad_clip=t.grad_clip,
        nonfinite_loss=t.nonfinite_loss,
        dual_cutout_alpha=a.dual_cutout_alpha,
        label_smoothing=a.label_smoothing,
        channels_last=recipe.model.channels_last,
        compile=recipe.model.compile,
        freeze_after={name: run_steps(steps_per_epoch, epochs) for name, epochs in t.freeze_after_epochs.items()},
        lookahead=lookahead,
    )


def train_one_epoch(
    step: TrainStep,
    batches: Any,  # a batch source: `len()` batches, `.epoch(epoch, start)` -> (images, soft targets)
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    *,
    epoch: int,
    epochs: int,
    every_steps: int,
    progress: EpochProgress,
    stop: list[int],
    save: Callable[[TrainState], Path | None],
) -> tuple[dict[str, Any], bool]:
    """Train epoch `epoch` from batch `state.batch_in_epoch` on; returns its record and whether a stop was asked.

    A fractional `epochs` ends its last epoch after the run's `run_steps` optimizer steps; that epoch's record
    says `epochs` (e.g. 9.9) as its epoch.

    Every `every_steps` optimizer steps the running metrics are read once: the progress bar and the trackers
    update, a non-finite loss stops the run ("stop" policy), and a stop request checkpoints and raises
    `Interrupted`. A stop asked after the last read of the epoch ends the epoch first (the caller saves).
    """
    accelerator = step.accelerator
    step.model.train()
    if state.batch_in_epoch == 0:  # a new epoch; a resumed one continues the sums its checkpoint holds
        step.metrics.reset()
    accumulate = accelerator.gradient_accumulation_steps
    steps_per_epoch = len(batches) // accumulate
    total = min(steps_per_epoch, run_steps(steps_per_epoch, epochs) - epoch * steps_per_epoch) * accumulate
    progress.start_epoch(epoch + 1, epochs, total, state.batch_in_epoch)
    started, images = time.perf_counter(), 0
    for index, (inputs, targets) in enumerate(batches.epoch(epoch, state.batch_in_epoch), start=state.batch_in_epoch):
        if index >= total:
            break
        images += step(inputs, targets, state.global_step + 1) * accelerator.num_processes
        state.batch_in_epoch = index + 1
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        state.global_step += 1
        if state.global_step % every_steps == 0 and _read_point(
            step, scheduler, state, progress, stop, started, images
        ):
            state.elapsed_seconds += time.perf_counter() - started
            raise Interrupted(stop[0] if stop else signal.SIGTERM, save(state))
    _synchronize(accelerator.device)
    seconds = time.perf_counter() - started
    summary, (stop_now,) = step.metrics.read(accelerator, bool(stop))
    _check_finite(summary, state, step)
    state.skipped_steps += summary["skipped"]
    row = {
        "epoch": min(epoch + 1, epochs),
        "step": state.global_step,
        "lr": scheduler.get_last_lr()[0],
        "train_loss": summary["loss"],
        "train_acc1": summary["acc1"],
        "images_per_second": images / seconds if seconds > 0 else 0.0,
    }
    return row, stop_now


def _read_point(step, scheduler, state, progress, stop, started: float, images: int) -> bool:
    """The periodic read: metrics (and the stop flag, agreed over processes) to the host once; returns stop."""
    summary, (stop_now,) = step.metrics.read(step.accelerator, bool(stop))
    _check_finite(summary, state, step)
    lr = scheduler.get_last_lr()[0]
    step.accelerator.log(
        {"train/loss": summary["loss"], "train/acc1": summary["acc1"], "lr": lr}, step=state.global_step
    )
    elapsed = max(time.perf_counter() - started, 1e-9)
    progress.update(
        state.batch_in_epoch, loss=summary["loss"], acc1=summary["acc1"], lr=lr, images_per_second=images / elapsed
    )
    return stop_now


def _check_finite(summary: dict[str, Any], state: TrainState, step: TrainStep) -> None:
    reason = nonfinite_stop(summary, policy=step.nonfinite_loss, scaled=step.scaler is not None)
    if reason:
        raise NonFiniteLoss(
            f"{reason} (seen at the metrics read after step {state.global_step}); stopping. The last good checkpoint "
            f"is kept (resume with {option('resume', 'RUN_DIR')}; set "
            'train.nonfinite_loss = "skip" to skip such steps, or lower optim.lr)'
        )


@torch.no_grad()
def validate(
    accelerator: Accelerator, model: nn.Module, batches: Any, channels_last: bool, *, tta: str = "none"
) -> dict[str, float]:
    """Validation loss, top-1 and top-5 (%) over the whole split, summed on the device, one host read.

    `batches` yields fixed-size `(normalised images, labels, valid mask)`; padding rows are masked out. With `tta`
    ("flip", "flip_translate": `cifar_train.tta`) each image's prediction averages its views.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top-1, top-5, count
    for images, labels, valid in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images) if tta == "none" else tta_log_probs(model, images, tta, channels_last=channels_last)
        sums += classification_sums(logits, labels, valid)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "val_acc1": 100.0 * top1 / count, "val_acc5": 100.0 * top5 / count}


def _validation_due(accelerator, step, val_batches, recipe: Recipe, state, epoch: int) -> dict[str, float]:
    """Validate when `train.eval_every` says so, and always after the last epoch (with `train.final_tta`)."""
    t = recipe.train
    last = epoch + 1 == epoch_count(t.epochs)
    if not (last or (epoch + 1) % t.eval_every == 0):
        return {}
    tta = t.final_tta if last else "none"
    metrics = validate(accelerator, step.eval_model, val_batches, recipe.model.channels_last, tta=tta)
    state.best_val_acc1 = max(state.best_val_acc1, metrics["val_acc1"])
    return metrics


def _end_epoch(accelerator, run, state, row, history, progress, save, t, stop_now: bool) -> Path | None:
    """Log the epoch, move the state to the next one, and checkpoint when due; returns the checkpoint."""
    state.elapsed_seconds += row["epoch_seconds"]
    if state.skipped_steps:
        row["skipped_steps"] = state.skipped_steps
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if accelerator.is_main_process:
        run.append_metrics(row)
    history.append(row)
    accelerator.log({k: v for k, v in row.items() if k not in ("epoch", "step")}, step=state.global_step)
    progress.end_epoch(row)
    if stop_now or state.epoch == epoch_count(t.epochs) or state.epoch % t.checkpoint_every == 0:
        return save(state)
    return None


def _finish(accelerator, run, model, recipe, info, state, history) -> dict[str, Any]:
    final = dict(history[-1]) if history else {}
    final.update(best_val_acc1=state.best_val_acc1, elapsed_seconds=state.elapsed_seconds)
    final["ranks_in_sync"] = _ranks_in_sync(accelerator, model)
    if info.skipped_images:  # data.skip_corrupt: which corrupt images were left out, per split
        final["skipped_corrupt_images"] = info.skipped_images
    if accelerator.is_main_process:
        finish_run(
            run,
            accelerator.unwrap_model(model),
            final,
            model_name=recipe.model.name,
            model_kwargs=dict(recipe.model.kwargs),
            info=info,
            push_to=recipe.hub.push_to,
            private=recipe.hub.private,
        )
        print_summary(history, final, run.path)
    accelerator.wait_for_everyone()
    return final


def _ranks_in_sync(accelerator: Accelerator, model: nn.Module) -> bool:
    """Whether every process ends with the same weights (a cheap fingerprint, compared across ranks)."""
    with torch.no_grad():
        tensors = [p.double() for p in model.state_dict().values() if p.is_floating_point()]
        fingerprint = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in tensors]).flatten()
    gathered = accelerator.gather(fingerprint[None])
    return bool((gathered == gathered[0]).all())


def _memory_format(recipe: Recipe) -> torch.memory_format:
    return torch.channels_last if recipe.model.channels_last else torch.contiguous_format


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures the work (GPUs run ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _tracking(accelerator: Accelerator) -> Iterator[None]:
    """Trackers are flushed and closed however the run ends."""
    try:
        yield
    finally:
        accelerator.end_training()
