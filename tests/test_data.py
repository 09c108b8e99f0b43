"""Loading, decoding, caching and sharding (`cifar_train.data`) on real `datasets` with local files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from cifar_train import data
from cifar_train.data import (
    DATASET_ALIASES,
    ShardedBatchSampler,
    build_streaming_loader,
    choose_data_path,
    load_dataset_splits,
    streaming_dataset_info,
)
from cifar_train.errors import UserError

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
CLASSES = ["cat", "dog", "emu"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _arrays(count: int, channels: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (count, size, size, channels) if channels == 3 else (count, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, len(CLASSES), count)


def _hub_layout(root: Path, *, channels: int = 3, counts: dict[str, int] | None = None) -> dict[str, tuple]:
    """Write parquet shards as on the Hub (`data/<split>-00000-of-00001.parquet`); return the arrays."""
    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
    written = {}
    for index, (split, count) in enumerate((counts or {"train": 24, "test": 9}).items()):
        images, labels = _arrays(count, channels, seed=index)
        pil = [PIL.Image.fromarray(image) for image in images]
        dataset = Dataset.from_dict({"img": pil, "label": labels.tolist()}, features=features)
        (root / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        written[split] = (images, labels)
    return written


def _chw(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(images)
    return tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)


@pytest.mark.parametrize("channels", [3, 1])
def test_hub_layout_decodes_exact_pixels_labels_and_statistics(tmp_path: Path, channels: int) -> None:
    written = _hub_layout(tmp_path / "ds", channels=channels)
    train, val, info = load_dataset_splits(str(tmp_path / "ds"), cache_dir=tmp_path / "cache")

    expected_train = _chw(written["train"][0])
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert torch.equal(train.images, expected_train)
    assert torch.equal(train.labels, torch.from_numpy(written["train"][1]))
    assert torch.equal(val.images, _chw(written["test"][0]))
    assert info.channels == channels and info.image_size == (8, 8)
    assert info.num_classes == 3 and info.class_names == CLASSES
    pixels = expected_train.double() / 255
    assert info.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert info.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)


def test_second_call_reads_the_cache_and_a_changed_dataset_is_decoded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = tmp_path / "ds", tmp_path / "cache"
    _hub_layout(root)
    first, _, _ = load_dataset_splits(str(root), cache_dir=cache)
    assert not list(cache.rglob("*.tmp"))

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(data, "_decode_split", no_decoding)
    again, _, _ = load_dataset_splits(str(root), cache_dir=cache)
    assert torch.equal(again.images, first.images)

    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    time.sleep(0.01)  # a new modification time even on coarse clocks
    _hub_layout(root, counts={"train": 12, "test": 9})
    changed, _, _ = load_dataset_splits(str(root), cache_dir=cache)
    assert len(changed) == 12


def test_imagefolder_and_save_to_disk(tmp_path: Path) -> None:
    images, labels = _arrays(12, 3)
    for split, part in (("train", slice(0, 8)), ("test", slice(8, 12))):
        for index in range(part.start, part.stop):
            folder = tmp_path / "folder" / split / CLASSES[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(images[index]).save(folder / f"{index:03d}.png")
    train, val, info = load_dataset_splits(str(tmp_path / "folder"), cache_dir=tmp_path / "cache")
    assert info.class_names == sorted(
        {CLASSES[label] for label in labels[:8]} | {CLASSES[label] for label in labels[8:]}
    )
    assert len(train) == 8 and len(val) == 4 and train.images.shape == (8, 3, 8, 8)
    order = sorted(range(8), key=lambda index: (CLASSES[labels[index]], index))  # imagefolder lists by class
    assert {bytes(image.numpy()) for image in train.images} == {bytes(_chw(images[order]).numpy()[i]) for i in range(8)}

    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
    pil = [PIL.Image.fromarray(image) for image in images]
    full = Dataset.from_dict({"img": pil, "label": labels.tolist()}, features=features)
    DatasetDict({"train": full.select(range(8)), "test": full.select(range(8, 12))}).save_to_disk(tmp_path / "disk")
    train, val, _ = load_dataset_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache")
    assert torch.equal(train.images, _chw(images[:8])) and torch.equal(val.labels, torch.from_numpy(labels[8:]))


def test_label_column_detection_prefers_fine_label_and_accepts_an_explicit_one(tmp_path: Path) -> None:
    images, labels = _arrays(6, 3)
    features = Features(
        {"img": Image(), "coarse_label": ClassLabel(names=["a", "b"]), "fine_label": ClassLabel(names=CLASSES)}
    )
    pil = [PIL.Image.fromarray(image) for image in images]
    coarse = (labels % 2).tolist()
    Dataset.from_dict(
        {"img": pil, "coarse_label": coarse, "fine_label": labels.tolist()}, features=features
    ).save_to_disk(tmp_path / "c100")
    train, _, info = load_dataset_splits(str(tmp_path / "c100"), val_split=None, cache_dir=tmp_path / "cache")
    assert info.num_classes == 3 and torch.equal(train.labels, torch.from_numpy(labels))
    train, _, info = load_dataset_splits(
        str(tmp_path / "c100"), val_split=None, label_column="coarse_label", cache_dir=tmp_path / "cache"
    )
    assert info.class_names == ["a", "b"] and train.labels.tolist() == coarse


def test_held_out_fraction_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    _hub_layout(tmp_path / "ds", counts={"train": 40})
    kwargs = dict(val_split=None, val_fraction=0.25, cache_dir=tmp_path / "cache")
    train, val, _ = load_dataset_splits(str(tmp_path / "ds"), seed=1, **kwargs)
    assert (len(train), len(val)) == (30, 10)
    everything = {bytes(image.numpy()) for image in torch.cat([train.images, val.images])}
    assert len(everything) == 40  # random 8x8 images are all distinct, so nothing is duplicated or lost
    same, _, _ = load_dataset_splits(str(tmp_path / "ds"), seed=1, **kwargs)
    other, _, _ = load_dataset_splits(str(tmp_path / "ds"), seed=2, **kwargs)
    assert torch.equal(same.images, train.images) and not torch.equal(other.images, train.images)


def _corrupt_dataset(root: Path) -> None:
    images, labels = _arrays(5, 3)
    records = []
    for index, image in enumerate(images):
        buffer = PIL.Image.fromarray(image)
        from io import BytesIO

        stream = BytesIO()
        buffer.save(stream, format="PNG")
        records.append({"bytes": stream.getvalue()[:20] if index == 3 else stream.getvalue(), "path": None})
    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
    Dataset.from_dict({"img": records, "label": labels.tolist()}, features=features).save_to_disk(root)


def test_corrupt_image_is_named_and_leaves_no_cache_or_can_be_skipped(tmp_path: Path) -> None:
    _corrupt_dataset(tmp_path / "bad")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"corrupt image in split 'train' at index 3"):
        load_dataset_splits(str(tmp_path / "bad"), val_split=None, cache_dir=cache)
    assert not [path for path in cache.rglob("*") if path.is_file()]
    with pytest.warns(UserWarning, match="index 3"):
        train, _, info = load_dataset_splits(str(tmp_path / "bad"), val_split=None, cache_dir=cache, skip_corrupt=True)
    assert len(train) == 4
    assert info.skipped_images == {"train": [3]}


@pytest.mark.parametrize(
    ("dataset", "pattern"),
    [
        ("cifar11", r"unknown dataset alias 'cifar11' \(did you mean 'cifar10'\?\); known aliases: cifar10, cifar100"),
        ("./no/such/folder", r"local path './no/such/folder' does not exist"),
        ("nobody-here/no-such-dataset", r"'nobody-here/no-such-dataset'.*(offline|unreachable).*local copy"),
    ],
)
def test_bad_dataset_names_fail_fast_with_one_line(dataset: str, pattern: str) -> None:
    start = time.perf_counter()
    with pytest.raises(UserError, match=pattern) as raised:
        load_dataset_splits(dataset)
    assert "\n" not in str(raised.value)
    assert time.perf_counter() - start < 15  # seconds; no minute of network retries


def test_every_alias_resolves_to_a_hub_id() -> None:
    assert set(DATASET_ALIASES) == {"cifar10", "cifar100", "mnist", "fashion_mnist", "kmnist", "imagenet"}
    assert all(data.resolve_dataset(alias) == (hub_id, False) for alias, hub_id in DATASET_ALIASES.items())


def test_missing_columns_and_splits_are_listed(tmp_path: Path) -> None:
    Dataset.from_dict({"pixels": [[1, 2]], "y": [0]}).save_to_disk(tmp_path / "plain")
    with pytest.raises(UserError, match=r"no Image column detected; columns: pixels \(List\), y \(Value\)"):
        load_dataset_splits(str(tmp_path / "plain"), val_split=None, cache_dir=tmp_path / "cache")
    _hub_layout(tmp_path / "ds")
    with pytest.raises(UserError, match=r"split 'validation' not found; this dataset has: train, test"):
        load_dataset_splits(str(tmp_path / "ds"), val_split="validation", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"column 'lable' not found \(did you mean 'label'\?\)"):
        load_dataset_splits(str(tmp_path / "ds"), label_column="lable", cache_dir=tmp_path / "cache")


@pytest.mark.skipif(not CIFAR10.exists(), reason=f"real CIFAR-10 copy not found at {CIFAR10}")
def test_real_cifar10_test_split_decodes_with_dataset_statistics_and_caches(tmp_path: Path) -> None:
    split, _, info = load_dataset_splits(str(CIFAR10), train_split="test", val_split=None, cache_dir=tmp_path)
    assert split.images.shape == (10_000, 3, 32, 32) and split.images.dtype == torch.uint8
    assert torch.bincount(split.labels).tolist() == [1000] * 10
    assert info.class_names[:3] == ["airplane", "automobile", "bird"]
    assert info.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)
    assert info.std == pytest.approx((0.247, 0.243, 0.261), abs=0.01)  # not the 0.2023 of the usual typo
    start = time.perf_counter()
    cached, _, _ = load_dataset_splits(str(CIFAR10), train_split="test", val_split=None, cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0  # seconds
    assert torch.equal(cached.images, split.images)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.exists(), reason=f"real CIFAR-10 copy not found at {CIFAR10}")
def test_real_cifar10_train_starts_from_cache_in_under_a_second(tmp_path: Path) -> None:
    load_dataset_splits(str(CIFAR10), cache_dir=tmp_path)
    start = time.perf_counter()
    train, val, _ = load_dataset_splits(str(CIFAR10), cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0  # seconds
    assert (len(train), len(val)) == (50_000, 10_000)


@pytest.mark.parametrize(
    ("num_samples", "batch_size", "replicas"), [(103, 8, 1), (103, 8, 3), (96, 16, 2), (7, 2, 3), (5, 4, 8)]
)
def test_sharded_batches_are_disjoint_and_cover_the_epoch(num_samples: int, batch_size: int, replicas: int) -> None:
    def epoch(rank: int, epoch_index: int, **kwargs: bool) -> list[torch.Tensor]:
        sampler = ShardedBatchSampler(num_samples, batch_size, num_replicas=replicas, rank=rank, seed=3, **kwargs)
        sampler.set_epoch(epoch_index)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        return batches

    train = [epoch(rank, 0) for rank in range(replicas)]
    assert len({len(batches) for batches in train}) == 1  # the same number of steps on every rank
    seen = torch.cat([torch.cat(batches) for batches in train if batches] or [torch.empty(0, dtype=torch.long)])
    assert all(len(batch) == batch_size for batches in train for batch in batches)
    assert len(seen) == len(set(seen.tolist())) == (num_samples // (batch_size * replicas)) * batch_size * replicas
    assert [b.tolist() for b in epoch(0, 0)] == [b.tolist() for b in train[0]]  # seeded
    if len(train[0]) > 0:
        assert [b.tolist() for b in epoch(0, 1)] != [b.tolist() for b in train[0]]  # a new order each epoch

    evaluation = [epoch(rank, 0, shuffle=False, drop_last=False) for rank in range(replicas)]
    assert len({len(batches) for batches in evaluation}) == 1
    covered = torch.cat([torch.cat(batches) for batches in evaluation])
    assert sorted(covered.tolist()) == list(range(num_samples))


def _mixed_size_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for index in range(10):
        size = (20 + 3 * index, 30 - index)
        folder = root / "train" / CLASSES[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{index}.png")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_loader_on_a_mixed_size_imagefolder(tmp_path: Path, num_workers: int) -> None:
    _mixed_size_folder(tmp_path / "big")
    assert choose_data_path(str(tmp_path / "big")) == "streaming"
    info = streaming_dataset_info(str(tmp_path / "big"), image_size=16, eval_resize=18)
    assert info.num_classes == 2 and info.channels == 3 and info.image_size == (16, 16)
    assert all(0.4 < mean < 0.6 for mean in info.mean) and all(
        0.1 < std < 0.35 for std in info.std
    )  # resizing smooths noise

    options = dict(split="train", batch_size=4, mean=info.mean, std=info.std, image_size=16, eval_resize=18)
    train = build_streaming_loader(str(tmp_path / "big"), training=True, num_workers=num_workers, **options)
    batches = list(train)
    assert len(batches) == 2 and all(images.shape == (4, 3, 16, 16) for images, _ in batches)
    assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.int64
    evaluation = build_streaming_loader(
        str(tmp_path / "big"), training=False, num_workers=num_workers, num_replicas=2, rank=1, **options
    )
    assert sum(len(labels) for _, labels in evaluation) == 5  # rank 1 of 2: every other sample


def test_small_uniform_data_stays_in_memory(tmp_path: Path) -> None:
    _hub_layout(tmp_path / "ds")
    assert choose_data_path(str(tmp_path / "ds")) == "memory"
    assert choose_data_path(str(tmp_path / "ds"), max_memory_bytes=100) == "streaming"


def test_cache_dir_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIFAR_RECIPES_CACHE", str(tmp_path / "here"))
    assert data.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("CIFAR_RECIPES_CACHE")
    assert data.default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "cifar_recipes"
