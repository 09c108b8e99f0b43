"""The recipe schema: one typed section per component, every default once, with its meaning and unit.

A recipe has the sections `[model] [data] [augment] [optim] [schedule] [train] [log] [hub]`. Each section's
field names are the keyword names of the component it configures (`BatchAugment`, `create_optimizer`,
`schedule_curve`, ...), so a builder is one statement: `BatchAugment(..., **section_kwargs(recipe.augment))`.
Each field carries a one-line help text (`train_accelerate.py --show-defaults` prints them) and its range or
choices; `check_fields` checks values against them, for the recipe loader and for the components alike.
Arrays are tuples; a field that may be empty is `X | None` (a TOML file says "" for None).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError, did_you_mean

__all__ = [
    "COMPILE_MODES",
    "FP16_STOP_AFTER",
    "MIXES",
    "NONFINITE_POLICIES",
    "PADDING_MODES",
    "PIPELINES",
    "PRECISIONS",
    "SCHEDULES",
    "SECTIONS",
    "TTA_MODES",
    "WARMUPS",
    "AugmentConfig",
    "DataConfig",
    "Findings",
    "HubConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "ScheduleConfig",
    "TrainConfig",
    "check_fields",
    "checked_section",
    "section_kwargs",
    "toml_value",
]

# Allowed choices, defined once; the components import them from here.
MIXES = ("none", "mixup", "cutmix", "ricap")
PIPELINES = ("auto", "memory", "streaming")
PADDING_MODES = ("constant", "reflect", "edge")
SCHEDULES = ("constant", "multistep", "linear", "cosine", "sgdr", "triangle")
WARMUPS = ("none", "linear", "exponential")
PRECISIONS = ("auto", "no", "fp16", "bf16")
NONFINITE_POLICIES = ("stop", "skip")
FP16_STOP_AFTER = 20  # optimizer steps in a row with a non-finite loss after which "stop" stops an fp16 run
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune")
TTA_MODES = ("flip", "flip_translate")  # test-time augmentation (cifar_train.tta); "none" in a recipe = off


def _opt(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
    length: int | None = None,
) -> Any:
    """A schema field: its default, a one-line help text (meaning and unit), its range or choices."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices, "length": length}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt("resnet_preact20", "any timm model name; the CIFAR ones are registered by `import cifar_models`")
    kwargs: dict = _opt({}, "passed to timm.create_model: drop_rate, proj_drop_rate, initial_channels, ...")
    channels_last: bool = _opt(True, "NHWC memory format for the model and its batches (faster on GPUs and CPUs)")
    compile: bool | str = _opt(
        False,
        'torch.compile the train step: false, true (= "default"), "reduce-overhead" (CUDA graphs), "max-autotune"',
        choices=COMPILE_MODES,
    )
    dirac_init: bool = _opt(False, "identity (Dirac) start for the first min(in, out) filters of every conv (airbench)")
    data_init_images: int = _opt(
        5000, "first training images (unaugmented) a model's data-dependent init sees, if it has one (airbench94)", ge=1
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _opt("cifar10", "Hub id, alias (cifar10, cifar100, mnist, fashion_mnist, kmnist, ...) or local path")
    train_split: str = _opt("train", "split to train on")
    val_split: str | None = _opt("test", 'split to validate on (the seed used test); "" = hold out val_fraction')
    val_fraction: float = _opt(0.0, "share of train held out (seeded) for validation when val_split = ''", ge=0, le=0.9)
    train_limit: int = _opt(0, "train on a seeded, class-stratified subset of this many images (0 = all)", ge=0)
    image_column: str | None = _opt(None, 'image column; "" = detected from the features (the Image column)')
    label_column: str | None = _opt(None, 'label column; "" = detected from the features (the ClassLabel column)')
    pipeline: str = _opt("auto", "memory: decode once, augment on the device; streaming: DataLoader", choices=PIPELINES)
    num_workers: int = _opt(4, "DataLoader worker processes (streaming pipeline only)", ge=0)
    image_size: int = _opt(224, "streaming: RandomResizedCrop and centre-crop side, pixels", ge=8)
    eval_resize: int = _opt(256, "streaming: shorter side before the evaluation centre crop, pixels", ge=8)
    min_scale: float = _opt(0.08, "streaming: RandomResizedCrop's smallest area share", gt=0, le=1)
    streaming_source: bool = _opt(
        False, "streaming: read train with datasets' streaming mode (nothing downloaded first: data larger than disk)"
    )
    shuffle_buffer: int = _opt(2000, "streaming_source: rows in each reader's shuffle buffer (1 = shard order)", ge=1)
    cache_dir: str | None = _opt(None, 'decoded-tensor cache; "" = $CIFAR_RECIPES_CACHE or ~/.cache/cifar_recipes')
    skip_corrupt: bool = _opt(False, "skip (and count) undecodable images instead of stopping")


@dataclass(frozen=True)
class AugmentConfig:
    random_crop: bool = _opt(True, "pad, then crop back to the image size at a random offset")
    crop_padding: int = _opt(4, "pixels of padding on each side before the random crop", ge=0)
    crop_padding_mode: str = _opt("constant", "constant pads raw pixels with 0", choices=PADDING_MODES)
    hflip: bool = _opt(True, "horizontal flip with probability 0.5")
    alternating_flip: bool = _opt(False, "hflip derandomised: each image mirrored in every other epoch (airbench)")
    cutout: int = _opt(0, "Cutout square side, pixels (0 = off)", ge=0)
    cutout_prob: float = _opt(1.0, "probability of Cutout per image", ge=0, le=1)
    cutout_inside: bool = _opt(False, "keep the Cutout square wholly inside the image")
    random_erasing: bool = _opt(False, "Random Erasing on")
    random_erasing_prob: float = _opt(0.5, "probability of Random Erasing per image", ge=0, le=1)
    random_erasing_area: tuple[float, float] = _opt((0.02, 0.4), "[min, max] share of the image erased", length=2)
    random_erasing_min_aspect: float = _opt(0.3, "smallest aspect ratio of the erased box", gt=0, le=1)
    random_erasing_max_attempts: int = _opt(20, "boxes drawn until one fits", ge=1)
    mix: str = _opt("none", "batch mix; every mix ends as soft targets", choices=MIXES)
    mixup_alpha: float = _opt(1.0, "Mixup's Beta(alpha, alpha)", gt=0)
    cutmix_alpha: float = _opt(1.0, "CutMix's Beta(alpha, alpha)", gt=0)
    ricap_beta: float = _opt(0.3, "RICAP's Beta(beta, beta) for the split point", gt=0)
    dual_cutout_alpha: float = _opt(0.0, "Dual-Cutout: weight of the MSE between the two views' logits (0 = off)", ge=0)
    label_smoothing: float = _opt(0.0, "share of the target spread evenly over all classes", ge=0, le=0.5)


@dataclass(frozen=True)
class OptimConfig:
    name: str = _opt("sgd", "sgd adam amsgrad adamw lars adabound adaboundw, or any timm optimizer name")
    lr: float = _opt(0.1, "learning rate for the global batch", gt=0)
    momentum: float = _opt(0.9, "SGD and LARS momentum", ge=0, le=1)
    nesterov: bool = _opt(True, "Nesterov momentum (SGD)")
    weight_decay: float = _opt(1e-4, "L2 weight decay (decoupled for adamw and adaboundw)", ge=0)
    no_weight_decay_on_bn: bool = _opt(False, "exempt normalisation weights and all biases from weight decay")
    norm_bias_lr_scale: float = _opt(1.0, "lr of normalisation-layer biases = lr x this (airbench: 64)", gt=0)
    norm_bias_weight_decay_scale: float = _opt(
        1.0, "their weight decay = weight_decay x this (airbench: 1/64: the decay per step, lr x wd, is kept)", ge=0
    )
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam-family (beta1, beta2)", length=2)
    lars_eps: float = _opt(1e-9, "LARS: added to the gradient norm", ge=0)
    lars_thresh: float = _opt(1e-2, "LARS: weight norm below which the layer keeps the global rate", ge=0)
    adabound_final_lr: float = _opt(0.1, "AdaBound: the SGD rate the bounds close in on", gt=0)
    adabound_gamma: float = _opt(1e-3, "AdaBound: speed of the bounds' convergence", gt=0)


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = _opt("multistep", "learning rate curve; the lr changes every optimizer step", choices=SCHEDULES)
    milestones: tuple[int, ...] = _opt((80, 120), "multistep: epochs (after warmup) at which the lr is multiplied")
    decay: float = _opt(0.1, "multistep: factor applied at each milestone", gt=0, le=1)
    min_factor: float = _opt(1e-3, "linear, cosine, sgdr, triangle: the lr ends at lr x this", ge=0, le=1)
    sgdr_t0: int = _opt(10, "sgdr: epochs of the first period", ge=1)
    sgdr_t_mul: float = _opt(1.0, "sgdr: each period is int(previous x this) epochs", ge=1)
    triangle_start_factor: float = _opt(0.2, "triangle: the lr starts at lr x this", ge=0, le=1)
    triangle_peak: float = _opt(0.23, "triangle: share of the schedule's steps after which the lr peaks", ge=0, le=1)
    warmup: str = _opt("none", "warmup curve before the main schedule", choices=WARMUPS)
    warmup_epochs: int = _opt(0, "epochs of warmup", ge=0)
    warmup_start_factor: float = _opt(1e-3, "warmup starts at lr x this", gt=0, le=1)
    warmup_exponent: float = _opt(4.0, "exponential warmup: factor = start + (1 - start) x progress^this", gt=0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | float = _opt(
        160,
        "epochs of training; a fraction trains ceil(steps per epoch x epochs) steps, the last epoch cut short",
        gt=0,
    )
    batch_size: int = _opt(
        128, "global batch (images per optimizer step before accumulation), split over processes", ge=1
    )
    val_batch_size: int = _opt(256, "global validation batch", ge=1)
    grad_accum_steps: int = _opt(1, "batches per optimizer step", ge=1)
    subdivision: int = _opt(1, "the seed's ghost batch: chunks per batch, forward/backward each, one step", ge=1)
    sync_bn: bool = _opt(
        False, "SyncBatchNorm: BatchNorm statistics over every process's batch (several CUDA processes only)"
    )
    precision: str = _opt(
        "auto", "auto = bf16 on CUDA GPUs that support it, fp32 elsewhere; no = fp32", choices=PRECISIONS
    )
    grad_clip: float = _opt(0.0, "largest global gradient L2 norm (0 = no clipping)", ge=0)
    seed: int = _opt(
        0,
        "seed of data order, augmentation and initialisation (numpy takes seeds below 2^32; we add ranks)",
        ge=0,
        le=2**31 - 1,
    )
    eval_every: int = _opt(1, "epochs between validations; the last epoch is always validated", ge=1)
    final_tta: str = _opt(
        "none",
        "test-time augmentation of the last epoch's validation (earlier ones see plain images): flip, flip_translate",
        choices=("none", *TTA_MODES),
    )
    checkpoint_every: int = _opt(10, "epochs between checkpoints; the last epoch always saves", ge=1)
    keep_checkpoints: int = _opt(2, "newest checkpoints kept", ge=1)
    nonfinite_loss: str = _opt(
        "stop",
        "on a NaN/inf loss: stop (keep the last good checkpoint) or skip the step; under fp16 the gradient scaler "
        f"skips such steps itself and stop waits for {FP16_STOP_AFTER} in a row",
        choices=NONFINITE_POLICIES,
    )
    freeze_after_epochs: dict = _opt(
        {}, "parameter name -> epochs after which it is no longer updated (airbench: whitening bias after 3)"
    )
    lookahead_steps: int = _opt(0, "Lookahead: optimizer steps between syncs with the slow weights (0 = off)", ge=0)
    lookahead_decay: float = _opt(
        0.5, "Lookahead: the slow weights' share at a sync (1 - Zhang et al.'s alpha)", ge=0, le=1
    )
    lookahead_decay_power: float = _opt(
        0.0, "Lookahead: that share times (step / total steps)^this (airbench: 3; 0 = constant)", ge=0
    )


@dataclass(frozen=True)
class LogConfig:
    trackers: tuple[str, ...] = _opt((), "Accelerate trackers: tensorboard, wandb, ...")
    every_steps: int = _opt(50, "optimizer steps between reads of the running metrics (progress bar, trackers)", ge=1)
    progress: bool = _opt(True, "rich progress bar (on a terminal; one line per epoch elsewhere)")


@dataclass(frozen=True)
class HubConfig:
    push_to: str | None = _opt(None, '"user/name" to upload the finished run to the Hugging Face Hub ("" = no)')
    private: bool = _opt(False, "create the Hub repository as private")


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    hub: HubConfig = field(default_factory=HubConfig)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Recipe)[f.name] for f in dataclasses.fields(Recipe)}


@dataclass
class Findings:
    """What a component's check found besides errors: settings it ignores, and warnings."""

    ignored: dict[str, str] = field(default_factory=dict)  # "section.key" -> why it has no effect
    warnings: list[str] = field(default_factory=list)


def section_kwargs(section: Any) -> dict[str, Any]:
    """A schema section as the keyword arguments of its component (a shallow copy; tuples stay tuples)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


# --------------------------------------------------------------------------------------------------
# Types, ranges, choices


def _type_name(tp: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table"}
    if typing.get_origin(tp) is tuple:
        return "an array"
    return names.get(tp, str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """`value` (as parsed from TOML or given in Python) as the field's type, or a UserError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args:  # `str | None`: "" (TOML's way to say none) and None both mean None
            if value is None or value == "":
                return None
            return _coerce(key, next(a for a in args if a is not type(None)), value)
        if isinstance(value, bool) and bool not in args:  # `int | float`: a boolean is not a number here
            raise UserError(f"{key} must be {' or '.join(_type_name(a) for a in args)}, got {value}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value!r}")
        if isinstance(value, tuple(args)):  # `bool | str`: the choices decide
            return value
        raise UserError(f"{key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"{key} must be an array, got {value!r}")
        item_type = args[0]
        return tuple(_coerce(f"{key}[{i}]", item_type, item) for i, item in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (tp is bool) != isinstance(value, bool) or not isinstance(value, tp):
        shown = value if tp is bool or isinstance(value, bool) else f"{type(value).__name__} {value!r}"
        raise UserError(f"{key} must be {_type_name(tp)}, got {shown}")
    if tp is float and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    return value


def _check_range(key: str, meta: Mapping[str, Any], value: Any) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(toml_value(c) for c in meta["choices"])
        hint = did_you_mean(value, [c for c in meta["choices"] if isinstance(c, str)]) if isinstance(value, str) else ""
        raise UserError(f"{key} = {toml_value(value)} is not allowed; choose one of {allowed}{hint}")
    if meta.get("length") is not None and len(value) != meta["length"]:
        raise UserError(f"{key} must have {meta['length']} items, got {toml_value(value)}")
    for name, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        bound = meta.get(name)
        if bound is not None and value is not None and not isinstance(value, tuple) and not ok(value, bound):
            raise UserError(f"{key} = {value!r} is out of range; it must be {word} {bound}")


def checked_section(section: str, values: Mapping[str, Any]) -> Any:
    """`values` as the schema's section (e.g. `AugmentConfig`), checked by `check_fields`, missing keys at their
    defaults: the components' rule checks take their settings this way, so no default is written twice."""
    return SECTIONS[section](**check_fields(section, values))


def check_fields(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check `values` (some or all keys of one section) against the schema: names, types, ranges, choices.

    Returns them coerced to the schema's types. The components call this for their keyword arguments, the
    recipe loader for a section of a file; so a range is written once, here.
    """
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(
                f"unknown key {section}.{key}{did_you_mean(key, fields)}; [{section}] has: {', '.join(fields)}"
            )
        value = _coerce(f"{section}.{key}", hints[key], value)
        _check_range(f"{section}.{key}", fields[key].metadata, value)
        checked[key] = value
    return checked


def toml_value(value: Any) -> str:
    if value is None:
        return '""'  # TOML has no null; the loader reads "" back as None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else toml_value(key)
