"""Labels of any usable column type, and classes matched by name wherever two sources of labels meet.

A hostile trial found that a model evaluated on a folder whose class names sort differently scored near chance
without a word (classes were matched by position), that string labels crashed, and that float labels were
truncated. These tests use real `datasets` parquet files and real trained or exported timm models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSES, assert_one_line_error, random_images, run_main, write_imagefolder, write_recipe

import cifar_models  # noqa: F401  (registers resnet20)
from cifar_train.cli import evaluate_main, main
from cifar_train.data import load_dataset_splits
from cifar_train.data.classes import class_map, encode_labels
from cifar_train.data.decoded import DatasetSource
from cifar_train.data.streaming import StreamingSplit
from cifar_train.errors import UserError
from cifar_train.evaluation import evaluate
from cifar_train.export import export_model


def _write(root: Path, splits: dict[str, tuple[np.ndarray, list]], feature) -> Path:
    """Parquet shards in the Hub's layout with an `img` Image column and a `y` label column of `feature`."""
    from datasets import Dataset, Features, Image

    (root / "data").mkdir(parents=True, exist_ok=True)
    features = Features({"img": Image(), "y": feature})
    for split, (images, labels) in splits.items():
        table = Dataset.from_dict({"img": list(images), "y": labels}, features=features)
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def _value(dtype: str):
    from datasets import Value

    return Value(dtype)


def _class_label(names):
    from datasets import ClassLabel

    return ClassLabel(names=list(names))


# --------------------------------------------------------------------------------------------------
# Encoding a label column


def test_encode_labels_of_each_usable_type():
    labels, names = encode_labels(["emu", "cat", "emu", "dog"], _value("string"), "y", "column 'y'")
    assert names == ["cat", "dog", "emu"] and labels.tolist() == [2, 0, 2, 1]  # classes are the sorted names
    labels, names = encode_labels([2, 0, 5], _value("int64"), "y", "column 'y'")
    assert names == ["0", "1", "2", "3", "4", "5"] and labels.tolist() == [2, 0, 5] and labels.dtype == np.int64
    labels, names = encode_labels([1, 0], _class_label(["b", "a"]), "y", "column 'y'")
    assert names == ["b", "a"] and labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("values", "dtype", "fragment"),
    [
        ([0.0, 1.7], "float64", "holds float64 values"),
        ([True, False], "bool", "holds bool values"),
        ([0, -1], "int64", "negative labels"),
        (["cat", None], "string", "without a label"),
    ],
)
def test_unusable_labels_are_refused_naming_the_column(values, dtype, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        encode_labels(values, _value(dtype), "y", "data.label_column 'y'")
    assert "data.label_column 'y'" in str(info.value)


def test_class_map_matches_by_name_and_integers_by_index():
    assert class_map(["a", "b"], ["a", "b"], what="x", target_what="y") is None
    assert class_map(["emu", "cat"], ["cat", "dog", "emu"], what="x", target_what="y").tolist() == [2, 0]
    assert class_map(["0", "1"], ["cat", "dog", "emu"], what="x", target_what="y").tolist() == [0, 1]
    with pytest.raises(UserError, match=r"'ostrich' is not among them \(theirs not found here: 'emu'\)"):
        class_map(["cat", "ostrich"], ["cat", "emu"], what="the dataset's classes", target_what="the model's")
    with pytest.raises(UserError, match="must not be more of them"):
        class_map(["0", "1", "2"], ["cat", "dog"], what="x", target_what="y")


# --------------------------------------------------------------------------------------------------
# Training on integer and string label columns, on both pipelines


@pytest.fixture(scope="module")
def label_datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labels")
    images, labels = random_images(48, 3, 8, seed=0, num_classes=3)
    made = {}
    for kind, column, feature in (
        ("int", labels.tolist(), _value("int64")),
        ("str", [CLASSES[k] for k in labels], _value("string")),
        ("float", [float(k) + 0.5 for k in labels], _value("float64")),
    ):
        made[kind] = _write(root / kind, {"train": (images, column), "test": (images[:12], column[:12])}, feature)
    return made


@pytest.mark.parametrize("pipeline", ["memory", "streaming"])
@pytest.mark.parametrize(("kind", "names"), [("int", ["0", "1", "2"]), ("str", list(CLASSES))])
def test_integer_and_string_labels_train_on_both_pipelines(tmp_path, label_datasets, pipeline, kind, names):
    recipe = write_recipe(
        tmp_path / "r.toml", label_datasets[kind],
        data={"label_column": "y", "pipeline": pipeline, "train_limit": 0, "num_workers": 0, "image_size": 8,
              "eval_resize": 8},
        train={"epochs": 1, "batch_size": 16, "val_batch_size": 12},
    )  # fmt: skip
    result = run_main(main, str(recipe), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["label_names"] == names and config["num_classes"] == 3


@pytest.mark.parametrize("dry_run", [False, True], ids=["start", "dry-run"])
def test_float_labels_are_refused_before_work_by_the_start_and_the_dry_run(tmp_path, label_datasets, dry_run):
    recipe = write_recipe(tmp_path / "r.toml", label_datasets["float"], data={"label_column": "y"})
    result = run_main(main, str(recipe), "--output-dir", str(tmp_path / "run"), *(["--dry-run"] if dry_run else []))
    assert_one_line_error(result, "data.label_column: column 'y' holds float64 values", "integers", "strings")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Two splits with their own class orders


def test_a_validation_split_with_its_own_class_order_is_matched_by_name(tmp_path):
    """A `save_to_disk` DatasetDict keeps features per split: its test split may list the classes in another
    order (Hub parquet shards share one set of features, so `datasets` itself aligns those)."""
    from datasets import Dataset, DatasetDict, Features, Image

    images, labels = random_images(30, 3, 8, seed=1, num_classes=3)
    names = [CLASSES[k] for k in labels]
    shuffled = ("emu", "cat", "dog")  # the test split's ClassLabel lists the same classes in another order

    def split(order):
        features = Features({"img": Image(), "y": _class_label(order)})
        return Dataset.from_dict({"img": list(images), "y": [order.index(n) for n in names]}, features=features)

    DatasetDict({"train": split(CLASSES), "test": split(shuffled)}).save_to_disk(str(tmp_path / "ds"))
    train, val, info = load_dataset_splits(str(tmp_path / "ds"), cache_dir=tmp_path / "cache")
    assert info.class_names == list(CLASSES)
    assert val.labels.tolist() == train.labels.tolist() == labels.tolist()  # the same images, the same classes
    source = DatasetSource(str(tmp_path / "ds"), tmp_path / "cache")
    stream = StreamingSplit.open(
        source, "test", setting="data.val_split", image_column=None, label_column=None, classes=list(CLASSES),
        classes_of="train's",
    )  # fmt: skip
    assert stream.class_names == list(CLASSES)
    assert stream.rows["__cifar_recipes_label"] == labels.tolist()


# --------------------------------------------------------------------------------------------------
# Evaluating a model on data whose classes are ordered or named differently


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported resnet20 (fixed init) and a parquet dataset with unequal class sizes (so a relabelling shows)."""
    root = tmp_path_factory.mktemp("relabel")
    torch.manual_seed(0)
    import timm

    model = timm.create_model("resnet20", num_classes=3).eval()
    export_model(
        model, root / "model", model_name="resnet20", model_kwargs={}, num_classes=3, in_chans=3, input_size=(3, 8, 8),
        mean=(0.5,) * 3, std=(0.25,) * 3, class_names=list(CLASSES),
    )  # fmt: skip
    images, _ = random_images(18, 3, 8, seed=2, num_classes=3)
    labels = [0] * 3 + [1] * 6 + [2] * 9  # 3 cats, 6 dogs, 9 emus
    _write(root / "original", {"test": (images, labels)}, _class_label(CLASSES))
    order = ("emu", "dog", "cat")  # the same images and classes, listed in another order
    _write(root / "reordered", {"test": (images, [order.index(CLASSES[k]) for k in labels])}, _class_label(order))
    return root


def test_evaluation_matches_classes_by_name_not_position(exported, tmp_path):
    kwargs = dict(split="test", device="cpu")
    original = evaluate(f"local-dir:{exported / 'model'}", dataset=str(exported / "original"), **kwargs)
    reordered = evaluate(f"local-dir:{exported / 'model'}", dataset=str(exported / "reordered"), **kwargs)
    for key in ("top1", "top5", "loss", "confusion_matrix", "per_class_accuracy", "class_names"):
        assert reordered[key] == original[key], key
    assert original["class_names"] == list(CLASSES)
    assert [sum(row) for row in original["confusion_matrix"]] == [3, 6, 9]


def test_a_renamed_class_is_refused_in_one_line_naming_it(exported, tmp_path):
    root = tmp_path / "renamed"
    write_imagefolder(root, splits={"test": 6}, classes=("cat", "dog", "ostrich"), sizes=(8,))
    result = run_main(
        evaluate_main, f"local-dir:{exported / 'model'}", "--dataset", str(root), "--split", "test", "--json"
    )
    assert_one_line_error(result, "do not match the model's by name", "'ostrich'", "'emu'")
    assert result.stdout == ""


# --------------------------------------------------------------------------------------------------
# A resumed run and its checkpoint


def _parquet_copy(root: Path, images, labels, order) -> Path:
    """The same images and classes, the ClassLabel listing them in `order` (train and test alike)."""
    shutil.rmtree(root, ignore_errors=True)
    coded = [order.index(CLASSES[k]) for k in labels]
    return _write(root, {"train": (images, coded), "test": (images[:9], coded[:9])}, _class_label(order))


@pytest.mark.slow
def test_resume_matches_the_checkpoints_classes_by_name(tmp_path):
    """A run continued on a copy whose ClassLabel lists the classes in another order ends with the same weights as
    one continued on the original: the labels are matched to the checkpoint's classes by name."""
    from helpers import assert_same_weights

    images, labels = random_images(32, 3, 8, seed=3, num_classes=3)
    data = _parquet_copy(tmp_path / "data", images, labels, CLASSES)
    recipe = write_recipe(
        tmp_path / "r.toml", data, data={"train_limit": 0}, schedule={"name": "multistep", "milestones": [5]},
        train={"epochs": 1, "batch_size": 8, "val_batch_size": 9},
    )  # fmt: skip
    first = tmp_path / "first"
    assert run_main(main, str(recipe), "--output-dir", str(first)).returncode == 0
    second = tmp_path / "second"
    shutil.copytree(first, second)
    assert run_main(main, "--resume", str(first), "--set", "train.epochs=2").returncode == 0
    _parquet_copy(data, images, labels, ("emu", "cat", "dog"))
    result = run_main(main, "--resume", str(second), "--set", "train.epochs=2")
    assert result.returncode == 0, result.stderr
    assert_same_weights(first, second)
    assert json.loads((second / "config.json").read_text())["label_names"] == list(CLASSES)


def test_resume_refuses_a_class_the_checkpoint_does_not_know(tmp_path):
    data = tmp_path / "folder"
    write_imagefolder(data, splits={"train": 24, "test": 9}, sizes=(8,))
    recipe = write_recipe(
        tmp_path / "r.toml", data, data={"train_limit": 0}, schedule={"name": "multistep", "milestones": [5]},
        train={"epochs": 1, "batch_size": 8, "val_batch_size": 9},
    )  # fmt: skip
    run = tmp_path / "run"
    assert run_main(main, str(recipe), "--output-dir", str(run)).returncode == 0
    metrics = (run / "metrics.jsonl").read_text()
    for split in ("train", "test"):
        (data / split / "emu").rename(data / split / "ostrich")
    result = run_main(main, "--resume", str(run), "--set", "train.epochs=2")
    assert_one_line_error(result, "do not match those the run's checkpoint was trained on", "'ostrich'", "'emu'")
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing written
