"""The training loop on Hugging Face Accelerate, in the order of Accelerate's `cv_example.py`.

recipe -> data -> model -> optimizer and scheduler -> `accelerator.prepare` -> for each epoch:
train (whole-batch augmentation on the device, one soft-target loss), evaluate with
`gather_for_metrics`, log, checkpoint -> export safetensors weights, timm config and a model card.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from .augment import BatchAugment
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .data import DatasetInfo, EvalBatches, TrainBatches, open_training_data
from .errors import UserError, did_you_mean
from .optim import create_optimizer
from .progress import EpochProgress, print_summary
from .recipe import Recipe, flatten_recipe, load_recipe, recipe_to_dict, recipe_to_toml
from .rundir import RunLock, check_output_dir, collect_env, dump_json, write_text_atomic
from .schedule import build_lr_scheduler

__all__ = [
    "Interrupted",
    "NonFiniteLoss",
    "build_augment",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "soft_cross_entropy",
    "train",
]


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. `signum` says which."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite with `train.nonfinite_loss = "stop"`."""


# ----------------------------------------------------------------------------------------------------------
# Builders: the Python API, each taking the recipe and returning one component.


def build_model(recipe: Recipe, *, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """`timm.create_model(recipe.model.name, **recipe.model.kwargs)` after registering the CIFAR models."""
    import cifar_models  # noqa: F401  (registers the CIFAR architectures in timm)

    name = recipe.model.name
    if not timm.is_model(name):
        raise UserError(
            f"unknown model.name {name!r}{did_you_mean(name, timm.list_models())}; "
            "CIFAR models: python -c 'import cifar_models; print(cifar_models.list_cifar_models())', "
            "all: timm.list_models()"
        )
    kwargs = dict(recipe.model.kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"model.kwargs {recipe.model.kwargs!r} do not fit model {name!r}: {err}") from None


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    return create_optimizer(
        model,
        name=o.name,
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        no_weight_decay_on_bn=o.no_weight_decay_on_bn,
        betas=tuple(o.betas),
        lars_eps=o.lars_eps,
        lars_thresh=o.lars_thresh,
        adabound_final_lr=o.adabound_final_lr,
        adabound_gamma=o.adabound_gamma,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """Per-iteration lr schedule; `steps_per_epoch` counts optimizer steps."""
    s = recipe.schedule
    return build_lr_scheduler(
        optimizer,
        steps_per_epoch=steps_per_epoch,
        epochs=recipe.train.epochs,
        name=s.name,
        milestones=tuple(s.milestones),
        decay=s.decay,
        min_factor=s.min_factor,
        sgdr_t0=s.sgdr_t0,
        sgdr_t_mul=s.sgdr_t_mul,
        warmup=s.warmup,
        warmup_epochs=s.warmup_epochs,
        warmup_start_factor=s.warmup_start_factor,
        warmup_exponent=s.warmup_exponent,
    )


def build_augment(recipe: Recipe, info: DatasetInfo) -> BatchAugment:
    a = recipe.augment
    return BatchAugment(
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        random_crop=a.random_crop,
        crop_padding=a.crop_padding,
        crop_padding_mode=a.crop_padding_mode,
        hflip=a.hflip,
        cutout=a.cutout,
        cutout_prob=a.cutout_prob,
        cutout_inside=a.cutout_inside,
        random_erasing=a.random_erasing,
        random_erasing_prob=a.random_erasing_prob,
        random_erasing_area=tuple(a.random_erasing_area),
        random_erasing_min_aspect=a.random_erasing_min_aspect,
        random_erasing_max_attempts=a.random_erasing_max_attempts,
        mix=a.mix,
        mixup_alpha=a.mixup_alpha,
        cutmix_alpha=a.cutmix_alpha,
        ricap_beta=a.ricap_beta,
        dual_cutout=a.dual_cutout_alpha > 0,
        label_smoothing=a.label_smoothing,
    )


# ----------------------------------------------------------------------------------------------------------
# Losses and metrics: one soft-target loss serves plain labels, smoothing, Mixup, CutMix and RICAP.


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def dual_cutout_loss(logits1: torch.Tensor, logits2: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dual-Cutout: mean of the two views' cross-entropies plus alpha * MSE between their softmaxes."""
    ce = 0.5 * (soft_cross_entropy(logits1, targets) + soft_cross_entropy(logits2, targets))
    consistency = F.mse_loss(F.softmax(logits1.float(), dim=-1), F.softmax(logits2.float(), dim=-1))
    return ce + alpha * consistency


def soft_correct(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum over the batch of the (unsmoothed) target weight on the predicted class.

    For hard labels this is the number correct; for Mixup/CutMix/RICAP it is the area- or
    lambda-weighted number correct, as the seed reported. Smoothing is affine, so it is undone exactly.
    """
    picked = targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
    if label_smoothing > 0:
        k = targets.shape[1]
        picked = (picked - label_smoothing / k) / (1.0 - label_smoothing)
    return picked.sum()


@torch.no_grad()
def evaluate_model(
    accelerator: Accelerator, model: nn.Module, batches: EvalBatches, info: DatasetInfo, channels_last: bool
) -> dict[str, float]:
    """Validation loss, top-1 and top-5 (percent) over the whole split, summed over every process.

    Every batch has the same size; `valid` masks the padding, so each sample counts exactly once.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top1, top5, count
    k = min(5, info.num_classes)
    for images, labels, valid in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = model(images).float()
        losses = F.cross_entropy(logits, labels, reduction="none")
        topk = logits.topk(k, dim=1).indices
        top1 = topk[:, 0] == labels
        top5 = (topk == labels[:, None]).any(dim=1)
        weight = valid.double()
        totals += torch.stack([losses.double() @ weight, top1.double() @ weight, top5.double() @ weight, weight.sum()])
    loss, top1, top5, count = accelerator.reduce(totals, reduction="sum").tolist()
    count = max(count, 1.0)
    return {"val_loss": loss / count, "val_acc1": 100.0 * top1 / count, "val_acc5": 100.0 * top5 / count}


# ----------------------------------------------------------------------------------------------------------
# Signals: a stop request is honoured at the next optimizer step, after a checkpoint.


@contextmanager
def _stop_requests() -> Iterator[list[int]]:
    requested: list[int] = []

    def handler(signum, frame):
        requested.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _agree(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Flags OR-ed over processes, so every rank takes the same branch."""
    if accelerator.num_processes == 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(tensor, reduction="sum").tolist()]


# ----------------------------------------------------------------------------------------------------------
# The run.


def _per_process_batch(recipe: Recipe, num_processes: int) -> int:
    """The global batch split over processes; refused when it does not split evenly."""
    t = recipe.train
    per_process_batch, remainder = divmod(t.batch_size, num_processes)
    if recipe.augment.mix in ("mixup", "cutmix") and per_process_batch % 2:
        raise UserError(
            f"augment.mix = {recipe.augment.mix!r} needs an even batch per process; train.batch_size = "
            f"{t.batch_size} over {num_processes} process(es) gives {per_process_batch}"
        )
    if remainder or per_process_batch % t.subdivision:
        raise UserError(
            f"train.batch_size = {t.batch_size} must split evenly over {num_processes} "
            f"process(es) and then into train.subdivision = {t.subdivision} chunks"
        )
    return per_process_batch


def _build_data(
    recipe: Recipe, accelerator: Accelerator, per_process_batch: int, say
) -> tuple[TrainBatches, EvalBatches, DatasetInfo]:
    """Training batches (this process's shard, augmented) and validation batches, plus dataset facts."""
    t, d = recipe.train, recipe.data
    with accelerator.main_process_first():  # the main process decodes and caches; the others read the cache
        data = open_training_data(
            dataset=d.dataset,
            train_split=d.train_split,
            val_split=d.val_split,
            val_fraction=d.val_fraction,
            train_limit=d.train_limit,
            image_column=d.image_column,
            label_column=d.label_column,
            pipeline=d.pipeline,
            num_workers=d.num_workers,
            image_size=d.image_size,
            eval_resize=d.eval_resize,
            min_scale=d.min_scale,
            cache_dir=d.cache_dir,
            skip_corrupt=d.skip_corrupt,
            seed=t.seed,
            say=say if accelerator.is_main_process else lambda line: None,
        )
    ranks = dict(num_replicas=accelerator.num_processes, rank=accelerator.process_index, device=accelerator.device)
    batches = data.train_batches(build_augment(recipe, data.info), batch_size=per_process_batch, seed=t.seed, **ranks)
    val_batches = data.val_batches(batch_size=max(1, t.val_batch_size // accelerator.num_processes), **ranks)
    return batches, val_batches, data.info


def _check_resume_recipe(recipe: Recipe | None, run_dir: Path) -> Recipe:
    saved = load_recipe(run_dir / "recipe.toml")
    if recipe is not None and recipe != saved:
        a, b = recipe_to_dict(recipe), recipe_to_dict(saved)
        diffs = [f"{s}.{k}: {a[s][k]!r} here, {b[s][k]!r} in the run" for s in a for k in a[s] if a[s][k] != b[s][k]]
        raise UserError(
            f"--resume {str(run_dir)!r}: the recipe differs from the run's recipe.toml ({'; '.join(diffs)}); "
            "omit the recipe argument to continue with the saved one"
        )
    return saved


def _check_trackers(trackers: list[str]) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in trackers:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(
                f"log.trackers: unknown tracker {name!r}{did_you_mean(name, LOGGER_TYPE_TO_CLASS)}; "
                f"known: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
            )
        if not _tracker_installed(name):
            raise UserError(f"log.trackers: {name!r} is not installed; pip install it or remove it from the recipe")


def _tracker_installed(name: str) -> bool:
    import accelerate.utils as au

    check = getattr(au, f"is_{name}_available", None)
    return bool(check()) if check is not None else True


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _append_line(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def train(
    recipe: Recipe | None, output_dir: str | Path, *, resume: bool = False, overwrite: bool = False, log=None
) -> dict[str, Any]:
    """Train `recipe` into `output_dir` (the run directory); returns the final metrics.

    With `resume=True` the run continues from its newest complete checkpoint (`recipe` may be None:
    the run's own recipe.toml is used; when given it must equal it).
    """
    run_dir = Path(output_dir)
    check_output_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        recipe = _check_resume_recipe(recipe, run_dir)
    assert recipe is not None
    t = recipe.train
    _check_trackers(recipe.log.trackers)

    accelerator = Accelerator(
        mixed_precision=t.precision,
        gradient_accumulation_steps=t.grad_accum_steps,
        log_with=recipe.log.trackers or None,
        project_dir=str(run_dir),
    )
    say = log or accelerator.print
    if t.precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError('train.precision = "fp16" needs a GPU; on CPU use "bf16" or "no"')
    per_process_batch = _per_process_batch(recipe, accelerator.num_processes)

    # Data: small datasets are decoded once (the main process fills the cache first) and kept on the
    # training device; ImageNet-sized ones stream through DataLoader workers.
    set_seed(t.seed)
    batches, val_batches, info = _build_data(recipe, accelerator, per_process_batch, say)
    batches_per_epoch = len(batches) // t.grad_accum_steps * t.grad_accum_steps
    steps_per_epoch = batches_per_epoch // t.grad_accum_steps
    if steps_per_epoch == 0:
        raise UserError(
            f"train.batch_size = {t.batch_size} x grad_accum_steps {t.grad_accum_steps} is larger than the training set"
        )

    # Model, optimizer, schedule, augmentation.
    model = build_model(recipe, num_classes=info.num_classes, in_chans=info.channels)
    if recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch)
    set_seed(t.seed + accelerator.process_index)  # augmentation and dropout streams differ per process

    # Only now, with every input checked, is the run directory touched.
    lock = RunLock(run_dir)
    try:
        if accelerator.is_main_process:
            lock.acquire(expect_empty=not (resume or overwrite))
            if overwrite:
                lock.clear_run_dir()
            if not resume:
                write_text_atomic(run_dir / "recipe.toml", recipe_to_toml(recipe))
                dump_json(
                    run_dir / "env.json",
                    collect_env(
                        device=str(accelerator.device),
                        num_processes=accelerator.num_processes,
                        mixed_precision=t.precision,
                    ),
                )
        accelerator.wait_for_everyone()

        model, optimizer = accelerator.prepare(model, optimizer)
        forward_model = torch.compile(model) if recipe.model.compile else model

        state = TrainState()
        metrics_path = run_dir / "metrics.jsonl"
        if resume:
            state = load_checkpoint(accelerator, run_dir, log=say)
            scheduler.load_state_dict(state.scheduler)
            if accelerator.is_main_process:  # forget epochs logged after the checkpoint
                write_text_atomic(
                    metrics_path, "".join(json.dumps(r) + "\n" for r in _read_metrics(metrics_path, state.epoch))
                )
            say(
                f"resuming {run_dir} at epoch {state.epoch + 1}, batch {state.batch_in_epoch}, step {state.global_step}"
            )
        history = _read_metrics(metrics_path, state.epoch) if accelerator.is_main_process else []
        accelerator.init_trackers(run_dir.name, config=flatten_recipe(recipe))

        dual_alpha = recipe.augment.dual_cutout_alpha
        smoothing = recipe.augment.label_smoothing
        channels_last = recipe.model.channels_last
        progress = EpochProgress(enabled=accelerator.is_main_process and recipe.log.progress)
        interrupted: Interrupted | None = None

        def save(state_: TrainState) -> Path | None:
            state_.scheduler = scheduler.state_dict()
            return save_checkpoint(accelerator, run_dir, state_, keep=t.keep_checkpoints)

        with _stop_requests() as stop_signals:
            try:
                for epoch in range(state.epoch, t.epochs):
                    # ---- train one epoch
                    model.train()
                    epoch_start = time.perf_counter()
                    images_this_run = 0  # images trained in this process's part of the epoch, all ranks
                    progress.start_epoch(epoch + 1, t.epochs, batches_per_epoch - state.batch_in_epoch)
                    first = state.batch_in_epoch  # > 0 when resuming mid-epoch: those batches were trained
                    for batch_index, (images, targets) in enumerate(batches.epoch(epoch, first), start=first):
                        if batch_index >= batches_per_epoch:
                            break
                        if channels_last:
                            images = images.contiguous(memory_format=torch.channels_last)
                        with accelerator.accumulate(model):
                            loss, logits, first_targets = _forward_backward(
                                accelerator, forward_model, model, images, targets, t.subdivision, dual_alpha
                            )
                            loss_value = loss.item()
                            nonfinite, stop_now = _agree(accelerator, not math.isfinite(loss_value), bool(stop_signals))
                            if nonfinite and t.nonfinite_loss == "stop":
                                raise NonFiniteLoss(
                                    f"the loss is {loss_value} at epoch {epoch + 1}, step {state.global_step + 1}; "
                                    "stopping. The last good checkpoint is kept (resume with --resume; set "
                                    'train.nonfinite_loss = "skip" to skip such steps, or lower optim.lr)'
                                )
                            if nonfinite:  # "skip": drop this batch's gradients, keep the schedule moving
                                optimizer.optimizer.zero_grad(set_to_none=True)
                                state.skipped_steps += 1
                            else:
                                if recipe.optim.grad_clip > 0 and accelerator.sync_gradients:
                                    accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
                                optimizer.step()  # a no-op until the last batch of an accumulation group
                                optimizer.zero_grad(set_to_none=True)
                                state.epoch_loss_sum += loss_value * len(first_targets)
                                state.epoch_correct_sum += soft_correct(logits, first_targets, smoothing).item()
                                state.epoch_seen += len(first_targets)
                        state.batch_in_epoch = batch_index + 1
                        if accelerator.sync_gradients:
                            scheduler.step()
                            state.global_step += 1
                            if state.global_step % recipe.log.every_steps == 0:
                                accelerator.log(
                                    {"train/loss": loss_value, "lr": scheduler.get_last_lr()[0]}, step=state.global_step
                                )
                        images_this_run += len(first_targets) * accelerator.num_processes
                        progress.advance(
                            loss_value,
                            scheduler.get_last_lr()[0],
                            len(first_targets) * accelerator.num_processes,
                            state.epoch_correct_sum / max(state.epoch_seen, 1),
                        )
                        if stop_now and accelerator.sync_gradients:
                            state.elapsed_seconds += time.perf_counter() - epoch_start
                            raise Interrupted(stop_signals[0] if stop_signals else signal.SIGTERM, save(state))
                    train_seconds = time.perf_counter() - epoch_start
                    progress.end_epoch()

                    # ---- evaluate, log, checkpoint
                    sums = [state.epoch_loss_sum, state.epoch_correct_sum, float(state.epoch_seen)]
                    sums = torch.tensor(sums, dtype=torch.float64, device=accelerator.device)
                    tl, tc, tn = accelerator.reduce(sums, reduction="sum").tolist()
                    row: dict[str, Any] = {
                        "epoch": epoch + 1,
                        "step": state.global_step,
                        "lr": scheduler.get_last_lr()[0],
                        "train_loss": tl / max(tn, 1),
                        "train_acc1": 100.0 * tc / max(tn, 1),
                    }
                    last = epoch + 1 == t.epochs
                    if last or (epoch + 1) % t.eval_every == 0:
                        row.update(evaluate_model(accelerator, forward_model, val_batches, info, channels_last))
                        state.best_val_acc1 = max(state.best_val_acc1, row["val_acc1"])
                    row["epoch_seconds"] = time.perf_counter() - epoch_start
                    row["images_per_second"] = images_this_run / train_seconds if train_seconds > 0 else 0.0
                    if state.skipped_steps:
                        row["skipped_steps"] = state.skipped_steps
                    state.elapsed_seconds += row["epoch_seconds"]
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                    state.epoch_loss_sum = state.epoch_correct_sum = 0.0
                    state.epoch_seen = 0
                    if accelerator.is_main_process:
                        _append_line(metrics_path, row)
                        history.append(row)
                    accelerator.log(
                        {k: v for k, v in row.items() if k not in ("epoch", "step")}, step=state.global_step
                    )
                    progress.epoch_line(row)
                    if last or (epoch + 1) % t.checkpoint_every == 0:
                        save(state)
            except Interrupted as stop:
                interrupted = stop
            finally:
                progress.close()

        if interrupted is not None:
            accelerator.end_training()
            if accelerator.is_main_process:
                lock.release()
            raise interrupted

        final = dict(history[-1]) if history else {}
        final.update(best_val_acc1=state.best_val_acc1, elapsed_seconds=state.elapsed_seconds)
        final["ranks_in_sync"] = _ranks_in_sync(accelerator, model)
        if info.skipped_images:  # data.skip_corrupt: which corrupt images were left out, per split
            final["skipped_corrupt_images"] = info.skipped_images
        if accelerator.is_main_process:
            dump_json(run_dir / "final_metrics.json", final)
            _export(accelerator.unwrap_model(model), run_dir, recipe, info, final)
            print_summary(history, final, run_dir)
            lock.release()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return final
    finally:
        lock.release()  # also after an error, so a later run in this process can take the directory


def _ranks_in_sync(accelerator: Accelerator, model: nn.Module) -> bool:
    """Whether every process ends with the same weights (a cheap fingerprint, compared across ranks)."""
    with torch.no_grad():
        fingerprint = torch.stack(
            [
                torch.stack([p.double().sum(), p.double().square().sum()])
                for p in model.state_dict().values()
                if p.is_floating_point()
            ]
        ).flatten()
    gathered = accelerator.gather(fingerprint[None])
    return bool((gathered == gathered[0]).all())


def _forward_backward(
    accelerator: Accelerator,
    forward_model: nn.Module,
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    subdivision: int,
    dual_alpha: float,
):
    """Forward and backward one batch; returns (loss, logits, targets) for metrics.

    `subdivision` > 1 is the seed's ghost batch: chunks run one after another, gradients accumulate,
    DDP synchronises only on the last chunk. Dual-Cutout batches hold two views, [view1; view2].
    """
    if dual_alpha > 0:
        half = len(images) // 2
        views, targets = (images[:half], images[half:]), targets[:half]
    else:
        views = (images,)
    chunk_views = [v.chunk(subdivision) for v in views]
    chunk_targets = targets.chunk(subdivision)
    total = torch.zeros((), device=images.device)
    logits_parts = []
    for j in range(len(chunk_targets)):
        sync = nullcontext() if j == len(chunk_targets) - 1 else accelerator.no_sync(model)
        with sync:
            outputs = [forward_model(cv[j]) for cv in chunk_views]
            if dual_alpha > 0:
                loss = dual_cutout_loss(outputs[0], outputs[1], chunk_targets[j], dual_alpha)
            else:
                loss = soft_cross_entropy(outputs[0], chunk_targets[j])
            accelerator.backward(loss / len(chunk_targets))
        total += loss.detach() / len(chunk_targets)
        logits_parts.append(outputs[0].detach())
    return total, torch.cat(logits_parts), targets


def _export(model: nn.Module, run_dir: Path, recipe: Recipe, info: DatasetInfo, final: dict[str, Any]) -> None:
    from .export import export_model, write_model_card

    export_model(
        model,
        run_dir,
        model_name=recipe.model.name,
        model_kwargs=dict(recipe.model.kwargs),
        num_classes=info.num_classes,
        in_chans=info.channels,
        input_size=(info.channels, *info.image_size),
        mean=info.mean,
        std=info.std,
        class_names=info.class_names,
    )
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").is_file() else {}
    write_model_card(
        run_dir,
        recipe_toml=recipe_to_toml(recipe),
        model_name=recipe.model.name,
        results=final,
        env=env,
        dataset=recipe.data.dataset,
        num_params=sum(p.numel() for p in model.parameters()),
    )
    if recipe.hub.push_to:
        from .push import push_run

        push_run(run_dir, recipe.hub.push_to, private=recipe.hub.private)
