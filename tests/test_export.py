"""Export of a run's weights + config + model card, and the push that uploads exactly that folder."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time

import pytest
import timm
import torch

import cifar_models  # noqa: F401  (registers resnet20)
from cifar_train.card import CardFacts, write_model_card
from cifar_train.cli import push_main
from cifar_train.errors import UserError
from cifar_train.export import export_model
from cifar_train.push import UPLOAD_FILES, check_run_dir, push_run
from cifar_train.recipe import load_recipe, recipe_to_dict, recipe_to_toml

_TRAINED: dict = {}


def _trained_model(in_chans=3, num_classes=5, **kwargs):
    """resnet20 after two SGD steps, so weights and BN running statistics differ from the init (cached)."""
    key = (in_chans, num_classes, tuple(sorted(kwargs.items())))
    if key not in _TRAINED:
        _TRAINED[key] = _train(in_chans, num_classes, **kwargs)
    return copy.deepcopy(_TRAINED[key])


def _train(in_chans, num_classes, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=num_classes, in_chans=in_chans, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        x = torch.randn(4, in_chans, 16, 16)  # small images keep the steps fast; the weights are size-agnostic
        y = torch.randint(0, num_classes, (4,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _export(model, run_dir, in_chans=3, size=32, num_classes=5, model_kwargs=None):
    mean = tuple(0.4 + 0.05 * c for c in range(in_chans))
    std = tuple(0.2 + 0.01 * c for c in range(in_chans))
    export_model(
        model,
        run_dir,
        model_name="resnet20",
        model_kwargs=model_kwargs or {},
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=(in_chans, size, size),
        mean=mean,
        std=std,
        class_names=[f"class_{k}" for k in range(num_classes)],
    )
    return mean, std


@pytest.mark.parametrize(("in_chans", "size"), [(3, 32), (1, 28)])
def test_export_loads_bit_for_bit(tmp_path, in_chans, size):
    model = _trained_model(in_chans)
    mean, std = _export(model, tmp_path / "run", in_chans, size)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]

    loaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval()
    x = torch.randn(4, in_chans, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    cfg = loaded.pretrained_cfg
    assert tuple(cfg["input_size"]) == (in_chans, size, size)
    assert tuple(cfg["mean"]) == pytest.approx(mean) and tuple(cfg["std"]) == pytest.approx(std)
    assert cfg["label_names"] == [f"class_{k}" for k in range(5)]
    assert loaded.num_classes == 5

    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["architecture"] == "resnet20"
    assert config["model_args"]["in_chans"] == in_chans and config["model_args"]["num_classes"] == 5


def test_model_kwargs_rebuild_the_architecture(tmp_path):
    model = _trained_model(initial_channels=8)
    _export(model, tmp_path / "run", model_kwargs={"initial_channels": 8, "init_mode": "kaiming_fan_in"})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in loaded.parameters()) < 272_474 // 3  # narrower than the default resnet20
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_args"]["initial_channels"] == 8


def test_compiled_channels_last_model_exports_clean_keys(tmp_path):
    model = _trained_model().to(memory_format=torch.channels_last)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    _export(compiled, tmp_path / "run")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_export_rejects_inconsistent_arguments_and_writes_nothing(tmp_path):
    model = _trained_model()
    with pytest.raises(ValueError, match="class_names has 3 names"):
        export_model(
            model, tmp_path / "run", model_name="resnet20", model_kwargs={}, num_classes=5, in_chans=3,
            input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.2,) * 3, class_names=["a", "b", "c"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="num_classes=10 does not match"):
        _export(model, tmp_path / "run", num_classes=10)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _card(tmp_path, dataset="uoft-cs/cifar10"):
    recipe = load_recipe(None, ["train.epochs=3", "schedule.milestones=[1, 2]", f"data.dataset={dataset!r}"])
    results = {"val_acc1": 91.234, "val_acc5": 99.5, "val_loss": 0.3123, "best_val_acc1": 91.5, "epoch": 3,
               "elapsed_seconds": 3725.0, "train_acc1": 88.20000457763672}  # fmt: skip
    facts = CardFacts(
        run_name="run", model_name="resnet20", num_params=272_474, dataset=dataset, val_split="test",
        recipe_toml=recipe_to_toml(recipe), results=results, env={"torch": "2.x", "gpus": ["H100"], "git_commit": None},
        trained_with_flips=True, location=str(tmp_path),
    )  # fmt: skip
    write_model_card(tmp_path, facts)
    return recipe, (tmp_path / "README.md").read_text(encoding="utf-8")


def test_model_card_front_matter_recipe_and_loading(tmp_path):
    recipe, card = _card(tmp_path)
    _, front, body = card.split("---\n", 2)
    assert "library_name: timm" in front and '- "uoft-cs/cifar10"' in front and "- accuracy" in front
    # the recipe in the card is complete: parsing it gives back the run's recipe
    toml_block = re.search(r"```toml\n(.*?)```", body, re.S).group(1)
    (tmp_path / "from_card.toml").write_text(toml_block, encoding="utf-8")
    assert recipe_to_dict(load_recipe(tmp_path / "from_card.toml")) == recipe_to_dict(recipe)
    # `import cifar_models` comes before timm is used
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert code.index("import cifar_models") < code.index("import timm") < code.index("local-dir:")
    assert "hf-hub:" in code
    assert "| final validation top-1 (%) | 91.23 |" in body and "| training time | 1h 02m 05s |" in body
    assert "| last epoch's training top-1 (%) | 88.20 |" in body and "88.2000" not in card
    assert "H100" in body and "git_commit" not in body  # empty environment entries are left out


def test_model_card_omits_local_dataset_from_hub_metadata(tmp_path):
    local = tmp_path / "data"
    local.mkdir()
    _, card = _card(tmp_path, dataset=str(local))
    front = card.split("---\n", 2)[1]
    assert "datasets:" not in front
    body = card.split("## Recipe")[0]  # the recipe block itself names data.dataset as the run had it
    assert str(local) not in body and "data (a local copy)" in body


def _finished_run(tmp_path):
    run = tmp_path / "run"
    model = _trained_model()
    _export(model, run)
    _card(run)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "checkpoints").mkdir()
    return run, model


def test_uploaded_files_are_exactly_what_local_dir_loads(tmp_path):
    run, model = _finished_run(tmp_path)
    assert check_run_dir(run) == run
    upload = tmp_path / "upload"
    upload.mkdir()
    for name in UPLOAD_FILES:
        shutil.copy(run / name, upload / name)
    loaded = timm.create_model(f"local-dir:{upload}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_push_refuses_incomplete_run_and_bad_repo_id(tmp_path):
    run, _ = _finished_run(tmp_path)
    with pytest.raises(UserError, match="must look like 'user/name'"):
        push_run(run, "no-slash")
    (run / "README.md").unlink()
    with pytest.raises(UserError, match=r"lacks README\.md"):
        push_run(run, "user/name")


def test_push_offline_fails_fast_without_leaking_the_token(tmp_path, monkeypatch, capsys):
    run, _ = _finished_run(tmp_path)
    secret = "hf_" + "x" * 30
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", secret)
    started = time.perf_counter()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as info:
        push_run(run, "user/name", token=secret)
    assert secret not in str(info.value)
    assert push_main([str(run), "user/name"]) == 2
    assert time.perf_counter() - started < 30  # seconds: no network retries
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert secret not in out + err
    assert not any(secret in p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file())
    assert os.environ["HF_TOKEN"] == secret  # untouched


def test_model_card_names_an_alias_by_its_hub_id_and_carries_the_results_for_the_hub(tmp_path):
    import yaml

    _, card = _card(tmp_path, dataset="cifar10")
    front = yaml.safe_load(card.split("---\n", 2)[1])
    assert front["datasets"] == ["uoft-cs/cifar10"]
    [entry] = front["model-index"]
    [result] = entry["results"]
    assert result["dataset"] == {"name": "cifar10", "type": "uoft-cs/cifar10", "split": "test"}
    assert [(m["name"], m["value"]) for m in result["metrics"]] == [("top-1 accuracy", 91.23), ("top-5 accuracy", 99.5)]
    assert "# run: resnet20 trained on cifar10 (the Hub's uoft-cs/cifar10)" in card
    assert "--dataset uoft-cs/cifar10" in card
