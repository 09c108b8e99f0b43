"""Recipes: a TOML file lists only what differs from the schema's defaults (`cifar_train/schema.py`).

Loading checks, in this order: the TOML, each key against the schema (with "did you mean"), each value's
type, range and allowed choices, then each component's own rules (`check_augment`, `check_optim`,
`check_schedule`, `check_data`, `check_step`), which the components run again on direct use. Settings that
have no effect under the chosen options, and a shortened run's late milestones, are named in one warning
each. Command-line overrides are `section.key=value` with the value parsed as TOML. The resolved recipe is
written back as TOML (`recipe_to_toml`) and loads to an equal recipe.
"""

from __future__ import annotations

import dataclasses
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean
from .schema import SECTIONS, Findings, Recipe, check_fields, section_kwargs, toml_key, toml_value
from .wording import override

__all__ = [
    "RecipeWarning",
    "flatten_recipe",
    "load_recipe",
    "parse_overrides",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
    "replace_recipe",
    "show_defaults",
]


class RecipeWarning(UserWarning):
    """A setting that loads but will not do what its value suggests (no effect, or a milestone past the end)."""


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
            freeze_after_epochs=recipe.train.freeze_after_epochs,
            lookahead_steps=recipe.train.lookahead_steps,
            lookahead_decay=recipe.train.lookahead_decay,
            lookahead_decay_power=recipe.train.lookahead_decay_power,
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
        f"{key} = {toml_value(current[key.split('.')[0]][key.split('.')[1]])} ({why})"
        for key, why in found.ignored.items()
        if current[key.split(".")[0]][key.split(".")[1]] != defaults[key.split(".")[0]][key.split(".")[1]]
    ]
    if ignored:
        say(f"these settings have no effect with the chosen options: {'; '.join(ignored)}")
    for message in found.warnings:
        say(message)
    return recipe


def replace_recipe(recipe: Recipe, **sections: Mapping[str, Any]) -> Recipe:
    """A copy with some keys changed, checked like a loaded recipe: `replace_recipe(r, train={"epochs": 3})`."""
    data = recipe_to_dict(recipe)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return recipe_from_dict(data)


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
            raise UserError(f"{override(item)} is not of the form section.key=value (e.g. optim.lr=0.2)")
        path = key.split(".")
        if len(path) < 2 or not all(path):
            raise UserError(f"{override(item)}: the key must be section.key, e.g. train.epochs; got {key!r}")
        parsed.append((path, _parse_value(text.strip())))
    return parsed


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    section, key, *rest = path
    if section not in SECTIONS:
        raise UserError(f"{override('.'.join(path))}: unknown section [{section}]{did_you_mean(section, SECTIONS)}")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        raise UserError(f"{override('.'.join(path))}: unknown key {section}.{key}{did_you_mean(key, names)}")
    target = data.setdefault(section, {})
    if rest:
        if (section, key) != ("model", "kwargs"):
            raise UserError(f"{override('.'.join(path))}: {section}.{key} has no sub-keys")
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


def recipe_to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML; `load_recipe` of it gives back an equal recipe."""
    lines = []
    for section, values in recipe_to_dict(recipe).items():
        lines.append(f"[{section}]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def show_defaults() -> str:
    """Every section and key with its default and help text, as a commented TOML recipe."""
    lines = ["# Every recipe key with its default; a recipe lists only what differs.", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        rows = [
            (f"{f.name} = {toml_value(getattr(cls(), f.name))}", f.metadata["help"]) for f in dataclasses.fields(cls)
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
