"""Evaluation: metrics against hand computations, a real run directory on a tiny parquet dataset, the CLI."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import write_parquet_dataset

import cifar_models  # noqa: F401  (registers resnet20)
from cifar_train.cli import evaluate_main as main
from cifar_train.errors import UserError
from cifar_train.eval_metrics import compute_metrics, expected_calibration_error
from cifar_train.evaluation import evaluate, predict
from cifar_train.export import export_model
from cifar_train.recipe import load_recipe, recipe_to_toml

CLASSES = ["cat", "dog", "ship"]
MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)  # deliberately not the data's: evaluation must use these


# --------------------------------------------------------------------------------------------------
# Metrics on constructed examples


def test_metrics_match_a_hand_computation():
    probs = torch.tensor(
        [
            [0.70, 0.10, 0.05, 0.05, 0.05, 0.05],  # label 0: top-1 right
            [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # label 2: top-1 wrong, in the top 5
            [0.50, 0.01, 0.09, 0.10, 0.15, 0.15],  # label 1: its probability is the smallest -> not in the top 5
            [0.05, 0.05, 0.05, 0.05, 0.10, 0.70],  # label 5: right
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 2, 1, 5])
    result = compute_metrics(probs.log(), labels, [f"c{k}" for k in range(6)])
    assert result["num_samples"] == 4 and result["num_classes"] == 6
    assert result["top1"] == pytest.approx(50.0)
    assert result["top5"] == pytest.approx(75.0)
    expected_loss = -(math.log(0.70) + math.log(0.10) + math.log(0.01) + math.log(0.70)) / 4
    assert result["loss"] == pytest.approx(expected_loss)
    confusion = torch.tensor(result["confusion_matrix"])
    assert confusion.sum() == 4 and confusion.sum(dim=1).tolist() == [1, 1, 1, 0, 0, 1]
    assert confusion[2, 1] == 1 and confusion[1, 0] == 1 and confusion[5, 5] == 1
    assert result["per_class_accuracy"] == {"c0": 100.0, "c1": 0.0, "c2": 0.0, "c3": None, "c4": None, "c5": 100.0}


def test_ece_on_constructed_examples():
    # two samples at confidence 0.95 (one right), two at 0.55 (both right):
    # |0.5 - 0.95| * 2/4 + |1.0 - 0.55| * 2/4 = 0.45
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(45.0)
    # calibrated: within each bin the accuracy equals the confidence
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)
    # bins are (lo, hi]: with 4 bins, 0.75 sits in (0.5, 0.75] and 0.751 in (0.75, 1], so they are not averaged
    probs = torch.tensor([[0.75, 0.25], [0.751, 0.249]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels, num_bins=4) == pytest.approx((0.25 + 0.751) / 2 * 100)


def _model(num_classes=3):
    torch.manual_seed(0)
    return timm.create_model("resnet20", num_classes=num_classes).eval()


def test_flip_tta_is_invariant_on_symmetric_input_and_averages_softmax():
    model = _model()
    torch.manual_seed(1)
    half = torch.randn(2, 3, 16, 8)
    symmetric = torch.cat([half, half.flip(dims=(3,))], dim=3)
    assert torch.allclose(predict(model, symmetric, "flip"), predict(model, symmetric), atol=1e-5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = (F.softmax(model(x), 1) + F.softmax(model(x.flip(dims=(3,))), 1)) / 2
    assert torch.allclose(predict(model, x, "flip").exp(), expected, atol=1e-6)
    assert not torch.allclose(predict(model, x, "flip"), predict(model, x), atol=1e-4)
    with pytest.raises(ValueError, match="tta='five-crop'"):
        predict(model, x, "five-crop")


def test_flip_translate_tta_averages_the_softmax_of_airbenchs_six_views():
    model = _model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    # By hand: reflect padding by one pixel written out as index arithmetic (-1 -> 1, 8 -> 6).
    reflect = torch.tensor([1, *range(8), 6])
    padded = x[:, :, reflect][:, :, :, reflect]
    down_right, up_left = padded[:, :, :8, :8], padded[:, :, 2:, 2:]
    assert torch.equal(down_right[:, :, 1:, 1:], x[:, :, :7, :7]) and torch.equal(
        up_left[:, :, :7, :7], x[:, :, 1:, 1:]
    )
    views = [(0.25, x), (0.25, x.flip(3))] + [(0.125, v) for m in (down_right, up_left) for v in (m, m.flip(3))]
    with torch.no_grad():
        expected = sum(weight * F.softmax(model(view), 1) for weight, view in views)
    got = predict(model, x, "flip_translate")
    torch.testing.assert_close(got.exp(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, predict(model, x, "flip"), atol=1e-4)
    constant = torch.ones(2, 3, 8, 8) * torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)  # every view is the image
    torch.testing.assert_close(predict(model, constant, "flip_translate"), predict(model, constant), atol=1e-5, rtol=0)


def test_validation_with_tta_equals_predict_with_tta():
    from accelerate import Accelerator

    from cifar_train.loop import validate

    model = _model()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    valid = torch.tensor([True] * 5 + [False])
    sums = validate(Accelerator(cpu=True), model, [(images, labels, valid)], True, tta="flip_translate")
    log_probs = predict(model, images[:5], "flip_translate")
    assert sums["val_loss"] == pytest.approx(F.nll_loss(log_probs, labels[:5]).item(), rel=1e-5)
    assert sums["val_acc1"] == pytest.approx(100 * (log_probs.argmax(1) == labels[:5]).double().mean().item())


# --------------------------------------------------------------------------------------------------
# A real run directory on a tiny parquet dataset


def _write_dataset(root, splits=None, channels=3):
    """A tiny 32x32 parquet dataset in the Hub's layout (tests/helpers.py), three classes."""
    data_dir = root / "data"
    write_parquet_dataset(
        data_dir, splits=splits or {"train": 24, "test": 18}, channels=channels, size=32, classes=tuple(CLASSES),
        subfolder="plain_text",
    )  # fmt: skip
    return data_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run: exported resnet20, its recipe, and the dataset it names."""
    root = tmp_path_factory.mktemp("eval")
    data_dir = _write_dataset(root)
    model = _model()
    run_dir = root / "run"
    export_model(model, run_dir, model_name="resnet20", model_kwargs={}, num_classes=3, in_chans=3,
                 input_size=(3, 32, 32), mean=MEAN, std=STD, class_names=CLASSES)  # fmt: skip
    recipe = load_recipe(None, [f"data.dataset={str(data_dir)!r}", f"data.cache_dir={str(root / 'cache')!r}"])
    (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    return run_dir, data_dir, model


def _hand_log_probs(model, data_dir, split="test", flip=False):
    """Log-probabilities computed directly from the parquet file, normalised with the run's mean / std."""
    from datasets import load_dataset

    ds = load_dataset(str(data_dir), split=split)
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ds["img"]]).float() / 255
    x = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = F.softmax(model(x).double(), dim=1)  # float64: an untrained net's logits are far apart
        if flip:
            probs = (probs + F.softmax(model(x.flip(dims=(3,))).double(), dim=1)) / 2
    return probs.log(), torch.tensor(ds["label"])


def test_evaluate_run_directory_matches_hand_computation(run):
    run_dir, data_dir, model = run
    result = evaluate(str(run_dir), batch_size=7, device="cpu")  # 18 images: batches of 7, 7, 4
    log_probs, labels = _hand_log_probs(model, data_dir)
    assert result["num_samples"] == 18 and result["split"] == "test"
    assert result["top1"] == pytest.approx((log_probs.argmax(1) == labels).double().mean().item() * 100)
    assert result["loss"] == pytest.approx(F.nll_loss(log_probs, labels).item(), rel=1e-5)
    assert result["mean"] == pytest.approx(MEAN) and result["std"] == pytest.approx(STD)
    confusion = torch.tensor(result["confusion_matrix"])
    assert confusion.sum() == 18 and confusion.sum(1).tolist() == torch.bincount(labels, minlength=3).tolist()
    assert confusion.sum(0).tolist() == torch.bincount(log_probs.argmax(1), minlength=3).tolist()
    assert result["class_names"] == CLASSES and result["top5"] == 100.0  # 3 classes: top-5 holds them all


def test_local_dir_source_other_split_and_tta(run):
    run_dir, data_dir, model = run
    result = evaluate(f"local-dir:{run_dir}", split="train", tta="flip", device="cpu")
    assert result["num_samples"] == 24 and result["tta"] == "flip"
    log_probs, labels = _hand_log_probs(model, data_dir, split="train", flip=True)
    assert result["loss"] == pytest.approx(F.nll_loss(log_probs, labels).item(), rel=1e-5)
    assert result["top1"] == pytest.approx((log_probs.argmax(1) == labels).double().mean().item() * 100)
    plain, _ = _hand_log_probs(model, data_dir, split="train")
    assert result["loss"] != pytest.approx(F.nll_loss(plain, labels).item(), rel=1e-5)  # TTA did change something


def test_cli_flip_translate_tta_is_the_apis(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert main([str(run_dir), "--tta", "flip_translate", "--json", "--out-dir", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = evaluate(str(run_dir), tta="flip_translate", device="cpu")
    assert result["tta"] == "flip_translate" and result["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    [written] = (tmp_path / "out").glob("metrics_*.json")
    assert written.name.endswith("_test_tta-flip_translate.json")


def test_held_out_fraction_from_the_recipe(run, tmp_path):
    run_dir, data_dir, _ = run
    held = tmp_path / "held"
    held.mkdir()
    for name in ("model.safetensors", "config.json"):
        (held / name).write_bytes((run_dir / name).read_bytes())
    recipe = load_recipe(None, [f"data.dataset={str(data_dir)!r}", 'data.val_split=""', "data.val_fraction=0.25",
                                f"data.cache_dir={str(tmp_path / 'cache')!r}"])  # fmt: skip
    (held / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    result = evaluate(str(held), device="cpu")
    assert result["num_samples"] == 6  # a quarter of the 24 training images
    assert result["split"].startswith("train[held-out 0.25")


def test_cli_json_out_dir_and_predictions(run, tmp_path, capsys):
    run_dir, _, _ = run
    predictions = tmp_path / "pred.jsonl"
    code = main([str(run_dir), "--json", "--out-dir", str(tmp_path / "out"), "--predictions", str(predictions)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"top1", "top5", "loss", "num_samples", "ece"} <= result.keys()
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == result["num_samples"]
    # results carry 6 significant digits (cifar_train.rounding)
    assert sum(r["pred"] == r["label"] for r in rows) / len(rows) * 100 == pytest.approx(result["top1"], rel=6e-6)
    assert all(abs(sum(r["probs"]) - 1) < 1e-4 and max(r["probs"]) == r["confidence"] for r in rows)
    (saved_path,) = (tmp_path / "out").glob("metrics_*.json")
    assert saved_path.name.startswith("metrics_data-") and saved_path.name.endswith("_test.json")
    saved = json.loads(saved_path.read_text())
    assert saved["confusion_matrix"] == result["confusion_matrix"]
    png = tmp_path / "out" / f"confusion_{saved_path.name[len('metrics_') : -len('.json')]}.png"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing"], "no such directory"),
        (["{tmp}"], "no model.safetensors"),
        (["{run}", "--dataset", "cifar1O"], "unknown dataset alias 'cifar1O'"),
        (["local-dir:{run}", "--split", "validation"], "split 'validation' not found"),
        (["hf-hub:someone/some-model"], "pass --dataset"),
        (["hf-hub:someone/some-model", "--dataset", "cifar10"], "HF_HUB_OFFLINE"),
    ],
)
def test_bad_input_is_one_line_exit_2(run, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir, _, _ = run
    started = time.perf_counter()
    code = main([a.format(tmp=tmp_path, run=run_dir) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert time.perf_counter() - started < 60  # seconds: no waiting on the network


def test_grayscale_data_for_an_rgb_model_is_refused(run, tmp_path):
    run_dir, _, _ = run
    gray = _write_dataset(tmp_path, splits={"train": 4, "test": 4}, channels=1)
    with pytest.raises(UserError, match="1-channel images but the model takes 3"):
        evaluate(str(run_dir), dataset=str(gray), device="cpu")


def test_results_of_two_datasets_and_splits_are_kept_apart(run, tmp_path, capsys):
    """Evaluating another dataset's test split beside the run's own does not replace the first file."""
    run_dir, _, _ = run
    other = _write_dataset(tmp_path / "other")
    out = tmp_path / "out"
    for args in ([], ["--dataset", str(other)], ["--split", "train"]):
        assert main([str(run_dir), "--out-dir", str(out), *args]) == 0
    names = sorted(path.name for path in out.glob("metrics_*.json"))
    assert len(names) == 3 and len({name.rsplit("_", 1)[0] for name in names}) == 2, names  # 2 datasets, 3 files
    capsys.readouterr()


def test_json_prints_one_line_and_writes_nothing(tmp_path, tiny_run, capsys):
    """`--json` answers on stdout only; files only where asked (--out-dir / --predictions)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main([str(run_dir), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and json.loads(out)["num_samples"] == 360 and err == ""
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_weights_that_are_not_a_run_directory_are_not_written_into(tmp_path, tiny_run, capsys):
    """An export folder (as `results collect --with-weights` commits it) is read, never written: no eval/ in it."""
    export = tmp_path / "weights"
    export.mkdir()
    for name in ("model.safetensors", "config.json", "README.md"):
        (export / name).write_bytes((tiny_run.run_dir / name).read_bytes())
    assert main([f"local-dir:{export}", "--dataset", "digits"]) == 0
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "wrote" not in capsys.readouterr().out


def test_numbers_people_read_are_rounded(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert main([str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    floats = [result["top1"], result["loss"], result["ece"], *(v for v in result["per_class_accuracy"].values() if v)]
    assert all(len(f"{value:.15g}".replace("-", "").replace(".", "").lstrip("0")) <= 6 for value in floats), floats
