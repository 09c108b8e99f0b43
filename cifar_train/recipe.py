"""Recipes: one typed schema holds every default; a TOML recipe lists only what differs.

A recipe has the sections `[model] [data] [augment] [optim] [schedule] [train] [log] [hub]`. Loading
one checks every key against this schema (unknown keys get a "did you mean"), every value's type,
range and allowed choices, and the options that contradict each other, before any work starts.
Command-line overrides are `section.key=value` with the value parsed as TOML.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "HubConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "ScheduleConfig",
    "TrainConfig",
    "flatten_recipe",
    "load_recipe",
    "parse_overrides",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
]

MIXES = ("none", "mixup", "cutmix", "ricap")
PIPELINES = ("auto", "memory", "streaming")
PADDING_MODES = ("constant", "reflect", "edge")
SCHEDULES = ("constant", "multistep", "linear", "cosine", "sgdr")
WARMUPS = ("none", "linear", "exponential")
PRECISIONS = ("no", "fp16", "bf16")
NONFINITE_POLICIES = ("stop", "skip")


def _opt(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A schema field with its allowed range or choices (checked by `_check_value`)."""
    metadata = {"ge": ge, "gt": gt, "le": le, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet_preact20"  # any timm model name; CIFAR ones come from `import cifar_models`
    kwargs: dict = _opt({})  # passed to timm.create_model: drop_rate, init_mode, initial_channels, ...
    channels_last: bool = False  # memory format of model and batches
    compile: bool = False  # torch.compile the model


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"  # Hub id, alias (cifar10, cifar100, mnist, ...) or local path
    train_split: str = "train"
    val_split: str = "test"  # "" -> hold out `val_fraction` of train instead (the seed validated on test)
    val_fraction: float = _opt(0.0, ge=0.0, le=0.9)  # share of train held out (seeded) when val_split = ""
    train_limit: int = _opt(0, ge=0)  # use only the first N training images (0 = all); for quick studies
    image_column: str = ""  # "" -> detected from the features (the `Image` column)
    label_column: str = ""  # "" -> detected from the features (the `ClassLabel` column)
    pipeline: str = _opt("auto", choices=PIPELINES)  # memory: decode once; streaming: DataLoader (ImageNet)
    num_workers: int = _opt(4, ge=0)  # DataLoader workers, streaming (ImageNet-sized) datasets only
    image_size: int = _opt(224, ge=8)  # streaming: RandomResizedCrop / centre-crop size, pixels
    eval_resize: int = _opt(256, ge=8)  # streaming: shorter side before the evaluation centre crop, pixels
    min_scale: float = _opt(0.08, gt=0.0, le=1.0)  # streaming: RandomResizedCrop's smallest area share
    cache_dir: str = ""  # decoded-tensor cache; "" -> $CIFAR_RECIPES_CACHE or ~/.cache/cifar_recipes
    skip_corrupt: bool = False  # skip (and count) undecodable images instead of failing


@dataclass(frozen=True)
class AugmentConfig:
    random_crop: bool = True
    crop_padding: int = _opt(4, ge=0)  # pixels on each side before the random crop
    crop_padding_mode: str = _opt("constant", choices=PADDING_MODES)  # constant pads raw pixels with 0
    hflip: bool = True  # horizontal flip, p = 0.5
    cutout: int = _opt(0, ge=0)  # Cutout square side in pixels; 0 = off
    cutout_prob: float = _opt(1.0, ge=0.0, le=1.0)
    cutout_inside: bool = False  # keep the square's centre far enough in that it is never clipped
    random_erasing: bool = False
    random_erasing_prob: float = _opt(0.5, ge=0.0, le=1.0)
    random_erasing_area: list = _opt([0.02, 0.4])  # [min, max] share of the image erased
    random_erasing_min_aspect: float = _opt(0.3, gt=0.0, le=1.0)
    random_erasing_max_attempts: int = _opt(20, ge=1)
    mix: str = _opt("none", choices=MIXES)  # at most one batch mix; all end as soft targets
    mixup_alpha: float = _opt(1.0, gt=0.0)
    cutmix_alpha: float = _opt(1.0, gt=0.0)
    ricap_beta: float = _opt(0.3, gt=0.0)
    dual_cutout_alpha: float = _opt(0.0, ge=0.0)  # > 0 turns on Dual-Cutout with this MSE weight
    label_smoothing: float = _opt(0.0, ge=0.0, le=0.5)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd adam amsgrad adamw lars adabound adaboundw, or any timm optimizer name
    lr: float = _opt(0.1, gt=0.0)  # for the global batch
    momentum: float = _opt(0.9, ge=0.0, le=1.0)
    nesterov: bool = True
    weight_decay: float = _opt(1e-4, ge=0.0)
    no_weight_decay_on_bn: bool = False  # exempt normalisation weights and all biases
    betas: list = _opt([0.9, 0.999])
    lars_eps: float = _opt(1e-9, ge=0.0)
    lars_thresh: float = _opt(1e-2, ge=0.0)
    adabound_final_lr: float = _opt(0.1, gt=0.0)
    adabound_gamma: float = _opt(1e-3, gt=0.0)
    grad_clip: float = _opt(0.0, ge=0.0)  # max global gradient norm; 0 = off


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = _opt("multistep", choices=SCHEDULES)  # learning rate changes every step
    milestones: list = _opt([80, 120])  # epochs at which multistep multiplies the lr by `decay`
    decay: float = _opt(0.1, gt=0.0, le=1.0)
    min_factor: float = _opt(1e-3, ge=0.0, le=1.0)  # cosine / linear end at lr * min_factor
    sgdr_t0: int = _opt(10, ge=1)  # epochs in SGDR's first period
    sgdr_t_mul: int = _opt(1, ge=1)
    warmup: str = _opt("none", choices=WARMUPS)
    warmup_epochs: int = _opt(0, ge=0)
    warmup_start_factor: float = _opt(1e-3, gt=0.0, le=1.0)
    warmup_exponent: float = _opt(4.0, gt=0.0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _opt(160, ge=1)
    batch_size: int = _opt(128, ge=1)  # global: split across processes
    val_batch_size: int = _opt(256, ge=1)  # global
    grad_accum_steps: int = _opt(1, ge=1)  # batches per optimizer step
    subdivision: int = _opt(1, ge=1)  # the seed's ghost batch: chunks per batch, one step
    precision: str = _opt("no", choices=PRECISIONS)  # Accelerate mixed precision
    seed: int = _opt(0, ge=0)
    eval_every: int = _opt(1, ge=1)  # epochs; the last epoch is always evaluated
    checkpoint_every: int = _opt(10, ge=1)  # epochs; the last epoch always saves
    keep_checkpoints: int = _opt(2, ge=1)
    nonfinite_loss: str = _opt("stop", choices=NONFINITE_POLICIES)  # on NaN/inf: stop, or skip the step


@dataclass(frozen=True)
class LogConfig:
    trackers: list = _opt([])  # Accelerate trackers: tensorboard, wandb, ...
    every_steps: int = _opt(50, ge=1)  # tracker logging interval in optimizer steps
    progress: bool = True  # rich progress bar (only on a terminal)


@dataclass(frozen=True)
class HubConfig:
    push_to: str = ""  # "user/name" to upload the finished run
    private: bool = False


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

    def replace(self, **sections: Mapping[str, Any]) -> Recipe:
        """A copy with some keys changed, e.g. `recipe.replace(train={"epochs": 3})` (validated)."""
        data = recipe_to_dict(self)
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return recipe_from_dict(data)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Recipe)[f.name] for f in dataclasses.fields(Recipe)}

# Element types of the list fields (TOML arrays).
_LIST_ITEMS = {
    ("augment", "random_erasing_area"): (float, 2),
    ("optim", "betas"): (float, 2),
    ("schedule", "milestones"): (int, None),
    ("log", "trackers"): (str, None),
}


def _type_name(tp: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(tp, str(tp))


def _check_value(section: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    key = f"{section}.{f.name}"
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (tp is bool) != isinstance(value, bool):
        raise UserError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    if tp is list:
        item_type, length = _LIST_ITEMS[(section, f.name)]
        items = []
        for item in value:
            if item_type is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if not isinstance(item, item_type) or isinstance(item, bool):
                raise UserError(f"{key} must be an array of {_type_name(item_type)[2:]}s, got {value!r}")
            items.append(item)
        if length is not None and len(items) != length:
            raise UserError(f"{key} must have {length} items, got {value!r}")
        value = items
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise UserError(
            f"{key} = {value!r} is not allowed; choose one of {allowed}{did_you_mean(value, meta['choices'])}"
        )
    if meta.get("ge") is not None and value < meta["ge"]:
        raise UserError(f"{key} = {value!r} is out of range; it must be >= {meta['ge']}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise UserError(f"{key} = {value!r} is out of range; it must be > {meta['gt']}")
    if meta.get("le") is not None and value > meta["le"]:
        raise UserError(f"{key} = {value!r} is out of range; it must be <= {meta['le']}")
    return value


def _build_section(section: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise UserError(f"[{section}] must be a table of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(
                f"unknown key {section}.{key}{did_you_mean(key, fields)}; [{section}] has: {', '.join(fields)}"
            )
        kwargs[key] = _check_value(section, fields[key], hints[key], value)
    return cls(**kwargs)


def _check_contradictions(r: Recipe) -> None:
    a, s, t, d = r.augment, r.schedule, r.train, r.data
    if a.dual_cutout_alpha > 0 and a.mix != "none":
        raise UserError(
            f"augment.dual_cutout_alpha > 0 (Dual-Cutout) cannot be combined with augment.mix = {a.mix!r}; "
            "set one of them off"
        )
    if a.dual_cutout_alpha > 0 and a.cutout == 0:
        raise UserError("augment.dual_cutout_alpha > 0 (Dual-Cutout) needs a Cutout size: set augment.cutout, e.g. 16")
    lo, hi = a.random_erasing_area
    if not 0 < lo <= hi <= 1:
        raise UserError(
            f"augment.random_erasing_area = {a.random_erasing_area!r} must be [min, max] with 0 < min <= max <= 1"
        )
    for beta in r.optim.betas:
        if not 0 <= beta < 1:
            raise UserError(f"optim.betas = {r.optim.betas!r}: each beta must be in [0, 1)")
    if s.name == "multistep":
        ms = s.milestones
        main = t.epochs - s.warmup_epochs  # milestones count from the end of warmup, as in the seed
        if list(ms) != sorted(set(ms)) or any(m <= 0 or m >= main for m in ms):
            raise UserError(
                f"schedule.milestones = {ms!r} must be strictly increasing epochs between 1 and "
                f"{main - 1} (train.epochs - schedule.warmup_epochs - 1; they count from the end of warmup)"
            )
    if s.warmup != "none" and s.warmup_epochs == 0:
        raise UserError(f"schedule.warmup = {s.warmup!r} needs schedule.warmup_epochs >= 1")
    if s.warmup == "none" and s.warmup_epochs > 0:
        raise UserError(
            f"schedule.warmup_epochs = {s.warmup_epochs} with schedule.warmup = 'none'; "
            "choose a warmup ('linear' or 'exponential') or set warmup_epochs = 0"
        )
    if s.warmup_epochs >= t.epochs:
        raise UserError(f"schedule.warmup_epochs = {s.warmup_epochs} must be less than train.epochs = {t.epochs}")
    if t.batch_size % t.subdivision:
        raise UserError(f"train.batch_size = {t.batch_size} is not divisible by train.subdivision = {t.subdivision}")
    if t.subdivision > 1 and t.grad_accum_steps > 1:
        raise UserError("train.subdivision and train.grad_accum_steps both split the batch; use one of them")
    if d.val_split and d.val_fraction > 0:
        raise UserError(
            f"data.val_split = {d.val_split!r} and data.val_fraction = {d.val_fraction} contradict; "
            'set data.val_split = "" to hold out a fraction of train, or val_fraction = 0'
        )
    if d.pipeline == "streaming" and not d.val_split:
        raise UserError('data.pipeline = "streaming" needs a named data.val_split (e.g. "validation")')
    if d.eval_resize < d.image_size:
        raise UserError(f"data.eval_resize = {d.eval_resize} must be >= data.image_size = {d.image_size}")
    if not d.val_split and d.val_fraction == 0:
        raise UserError('data.val_split = "" needs data.val_fraction > 0 (the share of train to hold out)')


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """Validate a nested mapping (as parsed from TOML) into a `Recipe`; raises `UserError`."""
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise UserError(
                f"unknown section [{name}]{did_you_mean(name, SECTIONS)}; "
                f"a recipe has: {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        sections[name] = _build_section(name, SECTIONS[name], values)
    recipe = Recipe(**sections)
    _check_contradictions(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(recipe)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: `--set data.dataset=cifar100`


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    """`section.key=value` strings -> (path, value) pairs; values parse as TOML, bare words as strings."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r} is not of the form section.key=value (e.g. --set optim.lr=0.2)")
        path = key.split(".")
        if len(path) < 2 or not all(path):
            raise UserError(f"--set {item!r}: the key must be section.key, e.g. train.epochs; got {key!r}")
        parsed.append((path, _parse_value(text.strip())))
    return parsed


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    section, key, *rest = path
    if section not in SECTIONS:
        raise UserError(f"--set {'.'.join(path)}: unknown section [{section}]{did_you_mean(section, SECTIONS)}")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        raise UserError(f"--set {'.'.join(path)}: unknown key {section}.{key}{did_you_mean(key, names)}")
    target = data.setdefault(section, {})
    if rest:
        if (section, key) != ("model", "kwargs"):
            raise UserError(f"--set {'.'.join(path)}: {section}.{key} has no sub-keys")
        target = target.setdefault("kwargs", {})
        for part in rest[:-1]:
            target = target.setdefault(part, {})
        target[rest[-1]] = value
    else:
        target[key] = value


def load_recipe(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Recipe:
    """Read a TOML recipe (or start from the defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            known = sorted(str(p) for p in Path("recipes").rglob("*.toml")) if Path("recipes").is_dir() else []
            hint = did_you_mean(str(path), known) or (" (the recipes are under recipes/)" if known else "")
            raise UserError(f"recipe file {str(path)!r} does not exist{hint}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"recipe {str(path)!r} is not valid TOML: {err}") from None
    for key_path, value in parse_overrides(overrides):
        _apply_override(data, key_path, value)
    return recipe_from_dict(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def recipe_to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML; `load_recipe` of it gives back an equal recipe."""
    lines = []
    for section, values in recipe_to_dict(recipe).items():
        lines.append(f"[{section}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def flatten_recipe(recipe: Recipe) -> dict[str, int | float | str | bool]:
    """`section.key -> scalar` for trackers' hyperparameter tables (arrays and tables become strings)."""
    flat: dict[str, int | float | str | bool] = {}
    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
