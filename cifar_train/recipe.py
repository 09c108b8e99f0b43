"""Recipes: one typed schema holds every default; a TOML recipe lists only what differs.

A recipe has the sections `[model] [data] [augment] [optim] [schedule] [train] [log] [hub]`. Each section's
field names are the keyword names of the component it configures (`BatchAugment`, `create_optimizer`,
`create_scheduler`, ...), so a builder is one statement: `BatchAugment(..., **section_kwargs(recipe.augment))`.
Every default lives here, once, with a one-line help text that `train_accelerate.py --show-defaults` prints.

Loading checks, in this order: the TOML, each key against the schema (with "did you mean"), each value's
type, range and allowed choices, then each component's own rules (`check_augment`, `check_schedule`, ...),
which the components run again on direct use. Arrays arrive as tuples; in a TOML file an empty string stands
for "none" where a field may be None (`data.val_split = ""`), since TOML has no null. Settings that have no
effect under the chosen options are named in one warning.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "Findings",
    "HubConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RecipeWarning",
    "ScheduleConfig",
    "TrainConfig",
    "check_fields",
    "flatten_recipe",
    "load_recipe",
    "parse_overrides",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
    "section_kwargs",
    "show_defaults",
]

# Allowed choices, defined once; the components import them from here.
MIXES = ("none", "mixup", "cutmix", "ricap")
PIPELINES = ("auto", "memory", "streaming")
PADDING_MODES = ("constant", "reflect", "edge")
SCHEDULES = ("constant", "multistep", "linear", "cosine", "sgdr")
WARMUPS = ("none", "linear", "exponential")
PRECISIONS = ("auto", "no", "fp16", "bf16")
NONFINITE_POLICIES = ("stop", "skip")
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune")


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
    cache_dir: str | None = _opt(None, 'decoded-tensor cache; "" = $CIFAR_RECIPES_CACHE or ~/.cache/cifar_recipes')
    skip_corrupt: bool = _opt(False, "skip (and count) undecodable images instead of stopping")


@dataclass(frozen=True)
class AugmentConfig:
    random_crop: bool = _opt(True, "pad, then crop back to the image size at a random offset")
    crop_padding: int = _opt(4, "pixels of padding on each side before the random crop", ge=0)
    crop_padding_mode: str = _opt("constant", "constant pads raw pixels with 0", choices=PADDING_MODES)
    hflip: bool = _opt(True, "horizontal flip with probability 0.5")
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
    min_factor: float = _opt(1e-3, "linear, cosine, sgdr: the lr ends at lr x this", ge=0, le=1)
    sgdr_t0: int = _opt(10, "sgdr: epochs of the first period", ge=1)
    sgdr_t_mul: float = _opt(1.0, "sgdr: each period is int(previous x this) epochs", ge=1)
    warmup: str = _opt("none", "warmup curve before the main schedule", choices=WARMUPS)
    warmup_epochs: int = _opt(0, "epochs of warmup", ge=0)
    warmup_start_factor: float = _opt(1e-3, "warmup starts at lr x this", gt=0, le=1)
    warmup_exponent: float = _opt(4.0, "exponential warmup: factor = start + (1 - start) x progress^this", gt=0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _opt(160, "epochs of training", ge=1)
    batch_size: int = _opt(
        128, "global batch (images per optimizer step before accumulation), split over processes", ge=1
    )
    val_batch_size: int = _opt(256, "global validation batch", ge=1)
    grad_accum_steps: int = _opt(1, "batches per optimizer step", ge=1)
    subdivision: int = _opt(1, "the seed's ghost batch: chunks per batch, forward/backward each, one step", ge=1)
    precision: str = _opt(
        "auto", "auto = bf16 on CUDA GPUs that support it, fp32 elsewhere; no = fp32", choices=PRECISIONS
    )
    grad_clip: float = _opt(0.0, "largest global gradient L2 norm (0 = no clipping)", ge=0)
    seed: int = _opt(0, "seed of data order, augmentation and initialisation", ge=0)
    eval_every: int = _opt(1, "epochs between validations; the last epoch is always validated", ge=1)
    checkpoint_every: int = _opt(10, "epochs between checkpoints; the last epoch always saves", ge=1)
    keep_checkpoints: int = _opt(2, "newest checkpoints kept", ge=1)
    nonfinite_loss: str = _opt(
        "stop", "on a NaN/inf loss: stop (keep the last good checkpoint) or skip the step", choices=NONFINITE_POLICIES
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

    def replace(self, **sections: Mapping[str, Any]) -> Recipe:
        """A copy with some keys changed, e.g. `recipe.replace(train={"epochs": 3})` (validated)."""
        data = recipe_to_dict(self)
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return recipe_from_dict(data, on_warning=_silent)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Recipe)[f.name] for f in dataclasses.fields(Recipe)}


class RecipeWarning(UserWarning):
    """A setting that loads but will not do what its value suggests (no effect, or a milestone past the end)."""


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
        allowed = ", ".join(_toml_value(c) for c in meta["choices"])
        hint = did_you_mean(value, [c for c in meta["choices"] if isinstance(c, str)]) if isinstance(value, str) else ""
        raise UserError(f"{key} = {_toml_value(value)} is not allowed; choose one of {allowed}{hint}")
    if meta.get("length") is not None and len(value) != meta["length"]:
        raise UserError(f"{key} must have {meta['length']} items, got {_toml_value(value)}")
    for name, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        bound = meta.get(name)
        if bound is not None and value is not None and not isinstance(value, tuple) and not ok(value, bound):
            raise UserError(f"{key} = {value!r} is out of range; it must be {word} {bound}")


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


# --------------------------------------------------------------------------------------------------
# Loading


def _silent(message: str) -> None:
    pass


def _warn(message: str) -> None:
    warnings.warn(message, RecipeWarning, stacklevel=3)


def _component_checks(recipe: Recipe) -> Findings:
    """Each component's own rules (they raise UserError on contradictions) and what they found."""
    from .augment import check_augment
    from .data import check_data
    from .optim import check_optim
    from .schedule import check_schedule
    from .step import check_step

    found = Findings()
    for findings in (
        check_data(**section_kwargs(recipe.data)),
        check_augment(**section_kwargs(recipe.augment)),
        check_optim(**section_kwargs(recipe.optim)),
        check_schedule(epochs=recipe.train.epochs, **section_kwargs(recipe.schedule)),
        check_step(
            batch_size=recipe.train.batch_size,
            subdivision=recipe.train.subdivision,
            grad_accum_steps=recipe.train.grad_accum_steps,
        ),
    ):
        found.ignored.update(findings.ignored)
        found.warnings.extend(findings.warnings)
    return found


def recipe_from_dict(data: Mapping[str, Any], *, on_warning: Callable[[str], None] | None = None) -> Recipe:
    """Validate a nested mapping (as parsed from TOML) into a `Recipe`; raises `UserError`.

    Warnings (settings with no effect, milestones past the end) go to `on_warning`, by default as a
    `RecipeWarning`. A setting is reported as having no effect only when it differs from its default.
    """
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise UserError(
                f"unknown section [{name}]{did_you_mean(name, SECTIONS)}; "
                f"a recipe has: {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        if not isinstance(values, Mapping):
            raise UserError(f"[{name}] must be a table of keys, got {values!r}")
        sections[name] = SECTIONS[name](**check_fields(name, values))
    recipe = Recipe(**sections)
    found = _component_checks(recipe)
    say = on_warning or _warn
    defaults = recipe_to_dict(Recipe())
    current = recipe_to_dict(recipe)
    ignored = [
        f"{key} = {_toml_value(current[key.split('.')[0]][key.split('.')[1]])} ({why})"
        for key, why in found.ignored.items()
        if current[key.split(".")[0]][key.split(".")[1]] != defaults[key.split(".")[0]][key.split(".")[1]]
    ]
    if ignored:
        say(f"these settings have no effect with the chosen options: {'; '.join(ignored)}")
    for message in found.warnings:
        say(message)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    return {name: section_kwargs(getattr(recipe, name)) for name in SECTIONS}


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


def load_recipe(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    on_warning: Callable[[str], None] | None = None,
) -> Recipe:
    """Read a TOML recipe (or start from the defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"recipe {str(path)!r} is a folder; give a TOML file, e.g. recipes/quickstart.toml")
        if not path.is_file():
            known = sorted(str(p) for p in Path("recipes").rglob("*.toml")) if Path("recipes").is_dir() else []
            hint = did_you_mean(str(path), known) or (" (the recipes are under recipes/)" if known else "")
            raise UserError(f"recipe file {str(path)!r} does not exist{hint}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"recipe {str(path)!r} is not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise UserError(f"recipe {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise UserError(f"recipe {str(path)!r} cannot be read: {err.strerror or err}") from None
    for key_path, value in parse_overrides(overrides):
        _apply_override(data, key_path, value)
    return recipe_from_dict(data, on_warning=on_warning)


# --------------------------------------------------------------------------------------------------
# Writing


def _toml_value(value: Any) -> str:
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


def show_defaults() -> str:
    """Every section and key with its default and help text, as a commented TOML recipe."""
    lines = ["# Every recipe key with its default; a recipe lists only what differs.", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        rows = [
            (f"{f.name} = {_toml_value(getattr(cls(), f.name))}", f.metadata["help"]) for f in dataclasses.fields(cls)
        ]
        width = max(len(text) for text, _ in rows)
        lines.extend(f"{text:<{width}}  # {help_text}" for text, help_text in rows)
        lines.append("")
    return "\n".join(lines)


def flatten_recipe(recipe: Recipe) -> dict[str, int | float | str | bool]:
    """`section.key -> scalar` for trackers' hyperparameter tables (None, arrays and tables become strings)."""
    flat: dict[str, int | float | str | bool] = {}
    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
