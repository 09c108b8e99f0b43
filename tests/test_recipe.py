"""The recipe schema: defaults, strict validation, warnings, overrides, round trip, and its agreement with the
components it feeds (names and defaults), so the two cannot drift apart again."""

from __future__ import annotations

import dataclasses
import inspect
import tomllib

import pytest

from cifar_train.errors import UserError
from cifar_train.recipe import (
    flatten_recipe,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
    recipe_to_toml,
    replace_recipe,
    show_defaults,
)
from cifar_train.schema import SECTIONS, AugmentConfig, DataConfig, OptimConfig, Recipe, ScheduleConfig, section_kwargs


def _warnings(overrides: list[str]) -> list[str]:
    said: list[str] = []
    load_recipe(None, overrides, on_warning=said.append)
    return said


def test_defaults_are_the_seeds_base_settings_with_gpu_defaults_that_pay():
    r = Recipe()
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (r.train.batch_size, r.train.val_batch_size, r.train.seed) == (128, 256, 0)
    assert (r.train.precision, r.model.channels_last, r.model.compile) == ("auto", True, False)
    assert (r.augment.random_crop, r.augment.crop_padding, r.augment.crop_padding_mode) == (True, 4, "constant")
    assert r.augment.mix == "none" and r.data.val_split == "test" and r.schedule.milestones == (80, 120)


def test_every_field_has_a_default_and_a_one_line_help():
    for name, cls in SECTIONS.items():
        cls()  # would raise if a field had no default
        for field in dataclasses.fields(cls):
            help_text = field.metadata.get("help", "")
            assert help_text and "\n" not in help_text, f"{name}.{field.name} has no one-line help"


@pytest.mark.parametrize("section", ["augment", "optim", "schedule"])
def test_rule_checks_refuse_unknown_settings_and_take_the_schema_defaults(section):
    from cifar_train.augment import check_augment
    from cifar_train.optim import check_optim
    from cifar_train.schedule import check_schedule

    check = {"augment": check_augment, "optim": check_optim, "schedule": lambda **s: check_schedule(epochs=160, **s)}
    assert check[section]().warnings == []  # every default, from the schema
    with pytest.raises(UserError, match=rf"unknown key {section}.colour"):
        check[section](colour="red")


def test_show_defaults_is_a_loadable_commented_recipe():
    text = show_defaults()
    assert "lr = 0.1  " in text and "# learning rate for the global batch" in text
    assert recipe_from_dict(tomllib.loads(text)) == Recipe()


def test_overrides_parse_as_toml_and_bare_words_as_strings():
    r = load_recipe(
        None,
        [
            "optim.lr=0.2",
            "schedule.milestones=[10, 20]",
            "data.dataset=cifar100",
            "augment.hflip=false",
            "model.kwargs.drop_rate=0.3",
            "train.epochs=30",
        ],
    )
    assert r.optim.lr == 0.2 and r.schedule.milestones == (10, 20) and r.data.dataset == "cifar100"
    assert r.augment.hflip is False and r.model.kwargs == {"drop_rate": 0.3}


def test_arrays_arrive_as_tuples_and_empty_strings_as_none():
    r = load_recipe(None, ['data.val_split=""', "data.val_fraction=0.1", 'data.image_column=""', 'hub.push_to=""'])
    assert r.data.val_split is None and r.data.image_column is None and r.hub.push_to is None
    assert isinstance(r.optim.betas, tuple) and isinstance(r.augment.random_erasing_area, tuple)
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(r))) == r  # None is written as "" and read back


def test_integer_given_for_a_float_is_accepted_but_not_the_reverse():
    assert load_recipe(None, ["optim.lr=1"]).optim.lr == 1.0
    assert load_recipe(None, ["schedule.sgdr_t_mul=2", "schedule.name=sgdr"]).schedule.sgdr_t_mul == 2.0
    with pytest.raises(UserError, match=r"train.batch_size must be an integer, got float 1.5"):
        load_recipe(None, ["train.batch_size=1.5"])


def test_epochs_may_be_fractional_but_not_a_boolean_or_infinite():
    assert load_recipe(None, ["train.epochs=9.9"]).train.epochs == 9.9
    assert load_recipe(None, ["train.epochs=3"]).train.epochs == 3  # whole epochs stay integers in recipe.toml
    with pytest.raises(UserError, match=r"train.epochs must be an integer or a number, got True"):
        load_recipe(None, ["train.epochs=true"])
    with pytest.raises(UserError, match=r"train.epochs must be a finite number, got inf"):
        load_recipe(None, ["train.epochs=inf"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], r"unknown key optim.lrr \(did you mean 'lr'\?\)"),
        (["optimizer.lr=0.1"], r"unknown section \[optimizer\] \(did you mean 'optim'\?\)"),
        (["optim.lr=-0.1"], r"optim.lr = -0.1 is out of range; it must be > 0"),
        (["train.epochs=0"], r"train.epochs = 0 is out of range; it must be > 0"),
        (["augment.cutout_prob=1.5"], r"augment.cutout_prob = 1.5 is out of range; it must be <= 1"),
        (["augment.mix=mixupp"], r"augment.mix = \"mixupp\" is not allowed; choose one of .*did you mean 'mixup'"),
        (["augment.hflip=1"], r"augment.hflip must be a boolean, got 1"),
        (["optim.lr=nan"], r"optim.lr must be a finite number"),
        (["optim.betas=[0.9]"], r"optim.betas must have 2 items"),
        (["optim.betas=['a', 0.9]"], r"optim.betas\[0\] must be a number"),
        (["optim.betas=[0.9, 1.0]"], r"beta 2 must be in \[0, 1\)"),
        (["model.compile='fast'"], r"model.compile = \"fast\" is not allowed; choose one of false, true, \"default\""),
        (["schedule.milestones=[120, 80]"], r"schedule.milestones = \[120, 80\] must be strictly increasing"),
        (["augment.mix=ricap", "augment.cutout=16", "augment.dual_cutout_alpha=0.1"], r"cannot be combined"),
        (["augment.dual_cutout_alpha=0.1"], r"needs a Cutout size"),
        (["augment.random_erasing_area=[0.5, 0.2]"], r"must be \[min, max\] with 0 < min <= max <= 1"),
        (["train.batch_size=100", "train.subdivision=3"], r"not divisible by train.subdivision = 3"),
        (["train.subdivision=2", "train.grad_accum_steps=2"], r"use one of them"),
        (["data.val_fraction=0.1"], r"contradict"),
        (['data.val_split=""'], r"needs data.val_fraction > 0"),
        (["optim.lr"], r"not of the form section.key=value"),
        (["lr=0.1"], r"the key must be section.key"),
        (["optim.lr.x=1"], r"optim.lr has no sub-keys"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(UserError, match=message):
        load_recipe(None, overrides)


def test_the_val_split_hint_works_when_followed_literally():
    with pytest.raises(UserError) as err:
        load_recipe(None, ["data.val_fraction=0.1"])
    assert 'data.val_split = ""' in str(err.value)
    assert load_recipe(None, ["data.val_fraction=0.1", 'data.val_split=""']).data.val_split is None


def test_shortened_schedules_load_with_one_warning_line():
    said = _warnings(["train.epochs=10"])  # the default milestones are 80 and 120
    assert said == [
        "schedule.milestones 80, 120 are at or after the last epoch (10): the lr will not drop there; "
        "set schedule.milestones to change that"
    ]


def test_settings_without_effect_are_named_in_one_warning():
    said = _warnings(["augment.mixup_alpha=0.5", "schedule.name=cosine", "schedule.sgdr_t_mul=2", "data.num_workers=8"])
    (line,) = [s for s in said if "no effect" in s]
    assert "augment.mixup_alpha = 0.5 (augment.mix = 'none')" in line
    assert "schedule.sgdr_t_mul = 2.0 (only sgdr uses it, not 'cosine')" in line
    assert _warnings(["augment.mix=mixup", "augment.mixup_alpha=0.5"]) == []  # used: no warning
    assert _warnings(["schedule.name=cosine", "schedule.milestones=[80, 120]"]) == []  # the default: not worth a word


def test_unknown_key_in_a_file_lists_the_sections_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nepoch = 3\n")
    with pytest.raises(UserError, match=r"unknown key train.epoch \(did you mean 'epochs'\?\); \[train\] has: epochs"):
        load_recipe(path)


def test_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nepochs = 3\nbatch_size = \n")
    with pytest.raises(UserError, match=r"not valid TOML: .*line 3"):
        load_recipe(path)


def test_missing_file_and_a_folder_are_named(tmp_path):
    with pytest.raises(UserError, match=r"recipe file '.*nope.toml' does not exist"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(UserError, match=r"is a folder; give a TOML file"):
        load_recipe(tmp_path)


def test_resolved_recipe_round_trips_through_toml():
    r = load_recipe(
        None,
        [
            "optim.lr=0.05",
            "model.kwargs.initial_channels=64",
            "model.kwargs.preact_stage=[true, false, false]",
            "model.compile='reduce-overhead'",
            "augment.mix=ricap",
            'log.trackers=["tensorboard"]',
            'data.dataset="a \\"quoted\\" path"',
        ],
    )
    text = recipe_to_toml(r)
    assert recipe_from_dict(tomllib.loads(text)) == r
    # every field of every section is written, so the file is the whole truth about the run
    parsed = tomllib.loads(text)
    for name, cls in SECTIONS.items():
        assert set(parsed[name]) == {f.name for f in dataclasses.fields(cls)}


def test_replace_validates():
    r = replace_recipe(Recipe(), train={"epochs": 3}, schedule={"milestones": [1, 2]})
    assert r.train.epochs == 3 and r.schedule.milestones == (1, 2)
    with pytest.raises(UserError, match=r"train\.epochs"):
        replace_recipe(Recipe(), train={"epochs": -1})
    with pytest.raises(UserError, match="milestones"):  # the components' rules too, not only types and ranges
        replace_recipe(Recipe(), schedule={"milestones": [120, 80]})


def test_flatten_recipe_gives_scalars_only():
    flat = flatten_recipe(load_recipe(None, ["model.kwargs.drop_rate=0.3"]))
    assert flat["optim.lr"] == 0.1 and flat["model.kwargs"] == "{'drop_rate': 0.3}"
    assert all(isinstance(v, int | float | str | bool) for v in flat.values())


def test_parse_overrides_keeps_equals_signs_in_values():
    assert parse_overrides(["data.dataset=a=b"]) == [(["data", "dataset"], "a=b")]


# --------------------------------------------------------------------------------------------------------------
# The schema feeds the components directly: same keyword names, same defaults.


def _components():
    from cifar_train.augment import BatchAugment
    from cifar_train.data import check_data
    from cifar_train.optim import create_optimizer
    from cifar_train.schedule import schedule_curve

    return [
        ("augment", AugmentConfig, BatchAugment, {"num_classes", "mean", "std", "seed"}),
        ("optim", OptimConfig, create_optimizer, {"model"}),
        ("schedule", ScheduleConfig, schedule_curve, {"steps_per_epoch", "epochs"}),
        ("data", DataConfig, check_data, set()),
    ]


COMPONENT_IDS = ["augment", "optim", "schedule", "data-check"]


@pytest.mark.parametrize("index", range(len(COMPONENT_IDS)), ids=COMPONENT_IDS)
def test_schema_section_and_component_agree_on_names_and_defaults(index):
    """(The rule checks, check_augment / check_optim / check_schedule, take `**settings` and read the defaults from
    the schema itself, so they cannot disagree; an unknown keyword is refused there by check_fields.)"""
    section, cls, component, extra = _components()[index]
    parameters = inspect.signature(component).parameters
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(parameters) - extra == fields, f"[{section}] and {component.__name__} name different settings"
    defaults = section_kwargs(cls())
    for name in fields:
        default = parameters[name].default
        if default is not inspect.Parameter.empty:
            assert default == defaults[name], (
                f"{component.__name__}({name}={default!r}) but the schema says {defaults[name]!r}"
            )
