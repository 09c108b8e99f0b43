"""The recipe schema: defaults, strict validation, overrides, round trip through recipe.toml."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from cifar_train.errors import UserError
from cifar_train.recipe import (
    SECTIONS,
    Recipe,
    flatten_recipe,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
    recipe_to_toml,
)


def test_defaults_are_the_seeds_base_settings():
    r = Recipe()
    assert (r.optim.name, r.optim.lr, r.optim.momentum, r.optim.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (r.train.batch_size, r.train.val_batch_size, r.train.seed, r.train.precision) == (128, 256, 0, "no")
    assert (r.augment.random_crop, r.augment.crop_padding, r.augment.crop_padding_mode) == (True, 4, "constant")
    assert r.augment.mix == "none" and r.data.val_split == "test"


def test_every_section_field_has_a_default():
    for cls in SECTIONS.values():
        cls()  # would raise if a field had no default


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
    assert r.optim.lr == 0.2 and r.schedule.milestones == [10, 20] and r.data.dataset == "cifar100"
    assert r.augment.hflip is False and r.model.kwargs == {"drop_rate": 0.3}


def test_integer_given_for_a_float_is_accepted_but_not_the_reverse():
    assert load_recipe(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(UserError, match=r"train.epochs must be an integer, got float 1.5"):
        load_recipe(None, ["train.epochs=1.5"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], r"unknown key optim.lrr \(did you mean 'lr'\?\)"),
        (["optimizer.lr=0.1"], r"unknown section \[optimizer\] \(did you mean 'optim'\?\)"),
        (["optim.lr=-0.1"], r"optim.lr = -0.1 is out of range; it must be > 0.0"),
        (["train.epochs=0"], r"train.epochs = 0 is out of range; it must be >= 1"),
        (["augment.cutout_prob=1.5"], r"augment.cutout_prob = 1.5 is out of range; it must be <= 1.0"),
        (["augment.mix=mixupp"], r"augment.mix = 'mixupp' is not allowed; choose one of .*did you mean 'mixup'"),
        (["augment.hflip=1"], r"augment.hflip must be a boolean, got 1"),
        (["optim.lr=nan"], r"optim.lr must be a finite number"),
        (["optim.betas=[0.9]"], r"optim.betas must have 2 items"),
        (["schedule.milestones=[120, 80]"], r"schedule.milestones = \[120, 80\] must be strictly increasing"),
        (["schedule.milestones=[80, 200]"], r"between 1 and 159"),
        (["augment.mix=ricap", "augment.cutout=16", "augment.dual_cutout_alpha=0.1"], r"cannot be combined"),
        (["augment.dual_cutout_alpha=0.1"], r"needs a Cutout size"),
        (["train.batch_size=100", "train.subdivision=3"], r"not divisible by train.subdivision = 3"),
        (["train.subdivision=2", "train.grad_accum_steps=2"], r"use one of them"),
        (["data.val_fraction=0.1"], r"contradict"),
        (['data.val_split=""'], r"needs data.val_fraction > 0"),
        (["schedule.warmup=linear"], r"needs schedule.warmup_epochs >= 1"),
        (["optim.lr"], r"not of the form section.key=value"),
        (["lr=0.1"], r"the key must be section.key"),
        (["optim.lr.x=1"], r"optim.lr has no sub-keys"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(UserError, match=message):
        load_recipe(None, overrides)


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


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"recipe file '.*nope.toml' does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_resolved_recipe_round_trips_through_toml():
    r = load_recipe(
        None,
        [
            "optim.lr=0.05",
            "model.kwargs.initial_channels=64",
            "model.kwargs.preact_stage=[true, false, false]",
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
    r = Recipe().replace(train={"epochs": 3}, schedule={"milestones": [1, 2]})
    assert r.train.epochs == 3
    with pytest.raises(UserError):
        Recipe().replace(train={"epochs": -1})


def test_flatten_recipe_gives_scalars_only():
    flat = flatten_recipe(load_recipe(None, ["model.kwargs.drop_rate=0.3"]))
    assert flat["optim.lr"] == 0.1 and flat["model.kwargs"] == "{'drop_rate': 0.3}"
    assert all(isinstance(v, int | float | str | bool) for v in flat.values())


def test_parse_overrides_keeps_equals_signs_in_values():
    assert parse_overrides(["data.dataset=a=b"]) == [(["data", "dataset"], "a=b")]
