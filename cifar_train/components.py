"""From a recipe to its components, and everything about them that can be checked before any data is read.

The builders are one statement each: a schema section's field names are its component's keywords. The checks
run in the order a user would fix them (the recipe itself was checked when it loaded): the model name (with
"did you mean" over timm's registry) and its kwargs (the model is built on the meta device, which costs no
memory and no time), the optimizer name, the trackers, the batch split over processes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.layers import convert_sync_batchnorm

from .augment import BatchAugment
from .errors import UserError, did_you_mean
from .optim import check_optimizer, create_optimizer
from .schedule import create_scheduler
from .schema import Recipe, section_kwargs
from .step import frozen_parameters, per_process_batch

__all__ = [
    "build_augment",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_fit",
    "check_model",
    "check_push",
    "check_sync_bn",
    "check_trackers",
    "launched_processes",
    "make_accelerator",
    "preflight",
    "resolve_precision",
    "sync_batchnorm",
]


def _register_cifar_models() -> None:
    import cifar_models  # noqa: F401  (registers the CIFAR architectures in timm)


def build_model(recipe: Recipe, *, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """`timm.create_model(recipe.model.name, **recipe.model.kwargs)`, with the dataset's classes and channels; with
    `model.dirac_init` each conv's first filters then start as the identity (`cifar_models._builder.init_dirac_`)."""
    check_model(recipe.model.name, recipe.model.kwargs)
    kwargs = dict(recipe.model.kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    model = timm.create_model(recipe.model.name, **kwargs)
    if recipe.model.dirac_init:
        from cifar_models._builder import init_dirac_

        init_dirac_(model)
    return model


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    return create_optimizer(model, **section_kwargs(recipe.optim))


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """The per-iteration lr schedule; `steps_per_epoch` counts optimizer steps."""
    return create_scheduler(
        optimizer, steps_per_epoch=steps_per_epoch, epochs=recipe.train.epochs, **section_kwargs(recipe.schedule)
    )


def build_augment(recipe: Recipe, info: Any) -> BatchAugment:
    """The recipe's whole-batch augmentation for a dataset (`info`: its classes, mean and std)."""
    return BatchAugment(
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        seed=recipe.train.seed,
        **section_kwargs(recipe.augment),
    )


@functools.lru_cache(maxsize=256)
def _meta_parameters(
    name: str, kwargs: tuple[tuple[str, Any], ...], num_classes: int | None, in_chans: int | None
) -> int:
    extra = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
    with torch.device("meta"):
        model = timm.create_model(name, **{**dict(kwargs), **extra})
    return sum(p.numel() for p in model.parameters())


def check_model(
    name: str, kwargs: dict[str, Any], *, num_classes: int | None = None, in_chans: int | None = None
) -> int:
    """The model's parameter count, from a build on the meta device; a UserError for an unknown name or kwargs."""
    _register_cifar_models()
    if not timm.is_model(name):
        import cifar_models

        names = [*cifar_models.list_cifar_models(), *timm.list_models()]  # ours first: this is a CIFAR project
        raise UserError(
            f"unknown model.name {name!r}{did_you_mean(name, names)}; "
            "CIFAR models: python -c 'import cifar_models; print(cifar_models.list_cifar_models())', "
            "all: timm.list_models()"
        )
    try:
        frozen = tuple(sorted((k, _hashable(v)) for k, v in kwargs.items()))
        return _meta_parameters(name, frozen, num_classes, in_chans)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        raise UserError(f"model.kwargs {dict(kwargs)!r} do not fit model {name!r}: {err}") from None


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def check_trackers(trackers: Sequence[str]) -> None:
    """Every `log.trackers` entry is an Accelerate tracker that is installed."""
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in trackers:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(
                f"log.trackers: unknown tracker {name!r}{did_you_mean(name, LOGGER_TYPE_TO_CLASS)}; "
                f"known: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
            )
        installed = getattr(accelerate.utils, f"is_{name}_available", None)
        if installed is not None and not installed():
            raise UserError(f"log.trackers: {name!r} is not installed; pip install it or remove it from the recipe")


def check_push(push_to: str | None) -> None:
    """`hub.push_to` can be honoured at the end of the run: a repository id, the Hub reachable, a token known.

    Checked before training, so a run of hours does not end in a failed upload (the run's files stay either way).
    """
    if not push_to:
        return
    from .hub import check_hub_reachable
    from .push import check_repo_id

    check_repo_id(push_to, "hub.push_to")
    check_hub_reachable(f"hub.push_to = {push_to!r}")
    from huggingface_hub import get_token

    if get_token() is None:
        raise UserError(
            f"hub.push_to = {push_to!r} needs a Hugging Face token to upload at the end: log in with "
            "`hf auth login` or set HF_TOKEN (or remove hub.push_to and push later with python -m cifar_train.push)"
        )


def check_fit(recipe: Recipe, *, num_classes: int | None, image_size: Sequence[int] | None) -> None:
    """Settings that make no sense for this data: fewer than two classes, a Cutout or crop padding as large as
    the images. `num_classes` / `image_size` (H, W) are None where not known yet (a dry run of a Hub dataset)."""
    if num_classes is not None and num_classes < 2:
        raise UserError(
            f"the dataset has {num_classes} class(es); a classifier needs at least 2 (check data.label_column, or "
            "the class folders of an imagefolder)"
        )
    if not image_size:
        return
    a, side = recipe.augment, min(image_size)
    shape = "x".join(map(str, image_size))
    if a.cutout > side:
        raise UserError(
            f"augment.cutout = {a.cutout} is larger than the {shape} images (the whole image could be cut out); "
            f"choose at most {side} (the seed used 16 on 32x32 CIFAR)"
        )
    if a.random_crop and a.crop_padding >= side:
        raise UserError(
            f"augment.crop_padding = {a.crop_padding} is not smaller than the {shape} images (a crop could hold "
            f"no image at all); choose at most {side - 1} (the seed used 4 on 32x32 CIFAR)"
        )


def preflight(recipe: Recipe, num_processes: int) -> int:
    """Everything checkable before data, in the order a user would fix it; returns the per-process batch."""
    check_model(recipe.model.name, recipe.model.kwargs)
    t = recipe.train
    if t.freeze_after_epochs:  # the names, on the model built on the meta device
        with torch.device("meta"):
            model = timm.create_model(recipe.model.name, **recipe.model.kwargs)
        frozen_parameters(model, dict(t.freeze_after_epochs))
    check_optimizer(recipe.optim.name)
    check_trackers(recipe.log.trackers)
    per_process = per_process_batch(t.batch_size, num_processes, subdivision=t.subdivision, mix=recipe.augment.mix)
    check_sync_bn(t.sync_bn, num_processes=num_processes, cuda=torch.cuda.is_available())
    check_push(recipe.hub.push_to)
    return per_process


def check_sync_bn(sync_bn: bool, *, num_processes: int, cuda: bool) -> None:
    """`train.sync_bn` needs something to synchronise (several processes) and a backend that can (CUDA GPUs:
    torch's SyncBatchNorm refuses CPU tensors in training)."""
    if not sync_bn:
        return
    if num_processes < 2:
        raise UserError(
            f"train.sync_bn = true needs several processes, this run has {num_processes}: SyncBatchNorm shares "
            "BatchNorm statistics across processes; launch with accelerate launch or torchrun, or set it false"
        )
    if not cuda:
        raise UserError(
            f"train.sync_bn = true needs CUDA GPUs: torch's SyncBatchNorm cannot train on CPU processes (here "
            f"{num_processes}); set it false"
        )


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm as its synchronised twin, same parameters and buffers; timm's converter, so that timm's fused
    BatchNorm + activation layers (`BatchNormAct2d`, e.g. the CIFAR nets' last norm) keep their activation."""
    return convert_sync_batchnorm(model)


def resolve_precision(precision: str, cuda: bool) -> str:
    """`train.precision` as Accelerate's mixed_precision: "auto" is bf16 on CUDA GPUs that support it, else fp32."""
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not cuda:
        raise UserError('train.precision = "fp16" needs a GPU; on a CPU use "bf16", "no" or "auto"')
    return precision


def launched_processes() -> int:
    """How many processes the launcher started (torchrun / accelerate launch set WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _forget_single_process_state(mixed_precision: str) -> None:
    """Let one Python process train several runs with different precisions (a notebook, the GPU check).

    Accelerate keeps its state in a process-wide singleton and refuses a second Accelerator with another
    mixed precision. Accelerate has no public reset; its own test suite resets the singleton with
    `AcceleratorState._reset_state()`. Only a single-process state is reset: a distributed launch keeps its
    process group.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, mixed_precision) and launched_processes() == 1:
        AcceleratorState._reset_state()


def make_accelerator(
    *, precision: str, grad_accum_steps: int, trackers: Sequence[str], project_dir: str
) -> Accelerator:
    """The Accelerator of a run: CPU processes when no GPU is visible (also under torchrun / accelerate launch,
    with no extra variable), and a consistent launch or a UserError on every rank before anything is written."""
    cuda = torch.cuda.is_available()
    mixed_precision = resolve_precision(precision, cuda)
    _forget_single_process_state(mixed_precision)
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        log_with=list(trackers) or None,
        project_dir=project_dir,
    )
    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise UserError(
            f"this process was launched as one of {launched} (WORLD_SIZE) but Accelerate set up "
            f"{accelerator.num_processes} process(es); launch with `accelerate launch` or `torchrun` and the same "
            "number of processes on every machine"
        )
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    return accelerator
