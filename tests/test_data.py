"""The data package (`cifar_train.data`) on real `datasets` with tiny local files, and on real CIFAR-10.

Loading, decoding (in this process and on a pool), caching, the warm start without `datasets`, the
class-stratified `train_limit`, the batch sources (shards, resume, padding, no host reads), streaming,
`describe_dataset`, `check_data` and the messages a user meets.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from helpers import (
    CLASSES,
    random_images,
    write_imagefolder,
    write_parquet_dataset,
    write_save_to_disk,
)
from torch.overrides import TorchFunctionMode

from cifar_train.data import (
    DATASET_ALIASES,
    DecodedSplit,
    MemoryEvalBatches,
    MemoryTrainBatches,
    ShardedBatchSampler,
    check_data,
    choose_pipeline,
    default_cache_dir,
    describe_dataset,
    load_dataset_splits,
    load_split,
    open_training_data,
    resolve_dataset,
)
from cifar_train.data import decode as decode_module
from cifar_train.data import decoded as decoded_module
from cifar_train.errors import UserError

DATA_KEYS = dict(
    train_split="train",
    val_split="test",
    val_fraction=0.0,
    train_limit=0,
    image_column=None,
    label_column=None,
    pipeline="auto",
    num_workers=0,
    image_size=224,
    eval_resize=256,
    min_scale=0.08,
    streaming_source=False,
    shuffle_buffer=2000,
    cache_dir=None,
    skip_corrupt=False,
)


def _chw(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(images)
    return tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)


def _identity(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images, labels


class _HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host (a device sync on a GPU)."""

    NAMES = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------------------
# Decoding and the cache


@pytest.mark.parametrize("channels", [3, 1])
def test_hub_layout_decodes_exact_pixels_labels_and_statistics(tmp_path: Path, channels: int) -> None:
    written = write_parquet_dataset(tmp_path / "ds", channels=channels)
    train, val, info = load_dataset_splits(str(tmp_path / "ds"), cache_dir=tmp_path / "cache")

    expected_train = _chw(written["train"][0])
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert torch.equal(train.images, expected_train)
    assert torch.equal(train.labels, torch.from_numpy(written["train"][1]))
    assert torch.equal(val.images, _chw(written["test"][0]))
    assert info.channels == channels and info.image_size == (8, 8)
    assert info.num_classes == 3 and info.class_names == list(CLASSES)
    pixels = expected_train.double() / 255
    assert info.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert info.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)


def test_decoding_on_a_process_pool_gives_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_imagefolder(tmp_path / "folder", splits={"train": 21})
    serial, _, _ = load_dataset_splits(str(tmp_path / "folder"), val_split=None, cache_dir=tmp_path / "one")
    monkeypatch.setattr(decode_module, "PARALLEL_MIN_IMAGES", 0)
    monkeypatch.setattr(decode_module, "CHUNK_IMAGES", 4)  # six chunks over the pool
    lines: list[str] = []
    pooled, _ = load_split(str(tmp_path / "folder"), split="train", cache_dir=tmp_path / "two", say=lines.append)
    assert "worker process" in lines[0]
    assert torch.equal(pooled.images, serial.images) and torch.equal(pooled.labels, serial.labels)
    assert sorted(bytes(image.numpy()) for image in pooled.images) == sorted(
        bytes(image.numpy()) for image in _chw(written["train"][0])
    )
    files = sorted((tmp_path / "folder").rglob("*.png"))
    for row in (17, 9):  # in different chunks: the first failing row is named, whichever chunk ends first
        files[row].write_bytes(files[row].read_bytes()[:30])
    with pytest.raises(UserError, match=r"corrupt image in split 'train' at index 9 "):
        load_split(str(tmp_path / "folder"), split="train", cache_dir=tmp_path / "two")
    with pytest.warns(UserWarning, match="index 9, 17"):
        kept, info = load_split(str(tmp_path / "folder"), split="train", cache_dir=tmp_path / "two", skip_corrupt=True)
    assert len(kept) == 19 and info.skipped_images == {"train": [9, 17]}


def test_warm_start_reads_the_cache_without_datasets_and_a_changed_folder_is_decoded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = tmp_path / "ds", tmp_path / "cache"
    write_parquet_dataset(root)
    first, _, _ = load_dataset_splits(str(root), cache_dir=cache)
    assert not list(cache.rglob("*.tmp"))

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dataset was opened or decoded again although cached")

    for name in ("load_dataset", "load_from_disk"):
        monkeypatch.setattr(datasets, name, refused)
    monkeypatch.setattr(decoded_module, "_decode", refused)
    lines: list[str] = []
    data = open_training_data(dataset=str(root), **{**DATA_KEYS, "cache_dir": str(cache)}, seed=0, say=lines.append)
    assert data.pipeline == "memory" and len(lines) == 2 and all("cache hit" in line for line in lines)
    again, _, _ = load_dataset_splits(str(root), cache_dir=cache)
    assert torch.equal(again.images, first.images)

    monkeypatch.undo()
    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_parquet_dataset(root, splits={"train": 12, "test": 9})
    changed, _, _ = load_dataset_splits(str(root), cache_dir=cache)
    assert len(changed) == 12


def test_imagefolder_and_save_to_disk(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path / "folder", splits={"train": 8, "test": 4})
    train, val, info = load_dataset_splits(str(tmp_path / "folder"), cache_dir=tmp_path / "cache")
    labels = np.concatenate([written["train"][1], written["test"][1]])
    assert info.class_names == sorted({CLASSES[label] for label in labels})
    assert len(train) == 8 and len(val) == 4 and train.images.shape == (8, 3, 8, 8)
    images = _chw(written["train"][0])
    assert {bytes(image.numpy()) for image in train.images} == {bytes(image.numpy()) for image in images}

    images, labels = random_images(12, 3, 8, seed=0, num_classes=3)
    write_save_to_disk(tmp_path / "disk", {"train": (images[:8], labels[:8]), "test": (images[8:], labels[8:])})
    train, val, _ = load_dataset_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache")
    assert torch.equal(train.images, _chw(images[:8])) and torch.equal(val.labels, torch.from_numpy(labels[8:]))


def test_label_column_detection_prefers_fine_label_and_accepts_an_explicit_one(tmp_path: Path) -> None:
    images, labels = random_images(6, 3, 8, seed=0, num_classes=3)
    features = Features(
        {"img": Image(), "coarse_label": ClassLabel(names=["a", "b"]), "fine_label": ClassLabel(names=list(CLASSES))}
    )
    coarse = (labels % 2).tolist()
    Dataset.from_dict(
        {"img": list(images), "coarse_label": coarse, "fine_label": labels.tolist()}, features=features
    ).save_to_disk(tmp_path / "c100")
    train, _, info = load_dataset_splits(str(tmp_path / "c100"), val_split=None, cache_dir=tmp_path / "cache")
    assert info.num_classes == 3 and torch.equal(train.labels, torch.from_numpy(labels))
    train, _, info = load_dataset_splits(
        str(tmp_path / "c100"), val_split=None, label_column="coarse_label", cache_dir=tmp_path / "cache"
    )
    assert info.class_names == ["a", "b"] and train.labels.tolist() == coarse


def test_held_out_fraction_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    write_parquet_dataset(tmp_path / "ds", splits={"train": 40})
    kwargs = dict(val_split=None, val_fraction=0.25, cache_dir=tmp_path / "cache")
    train, val, _ = load_dataset_splits(str(tmp_path / "ds"), seed=1, **kwargs)
    assert (len(train), len(val)) == (30, 10)
    everything = {bytes(image.numpy()) for image in torch.cat([train.images, val.images])}
    assert len(everything) == 40  # random 8x8 images are all distinct, so nothing is duplicated or lost
    same, _, _ = load_dataset_splits(str(tmp_path / "ds"), seed=1, **kwargs)
    other, _, _ = load_dataset_splits(str(tmp_path / "ds"), seed=2, **kwargs)
    assert torch.equal(same.images, train.images) and not torch.equal(other.images, train.images)


def test_train_limit_is_a_seeded_class_stratified_subset_of_a_class_sorted_folder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "sorted", splits={"train": 60, "test": 3})  # files listed class by class
    kwargs = dict(cache_dir=tmp_path / "cache", train_limit=13)
    train, _, info = load_dataset_splits(str(tmp_path / "sorted"), seed=0, **kwargs)
    counts = torch.bincount(train.labels, minlength=info.num_classes)
    assert len(train) == 13 and counts.min() >= 1 and counts.max() - counts.min() <= 1  # every class, balanced
    full, _, _ = load_dataset_splits(str(tmp_path / "sorted"), cache_dir=tmp_path / "cache")
    assert torch.bincount(full.labels[:13]).count_nonzero() == 1, "the first 13 would be one class: no test"
    same, _, _ = load_dataset_splits(str(tmp_path / "sorted"), seed=0, **kwargs)
    other, _, _ = load_dataset_splits(str(tmp_path / "sorted"), seed=1, **kwargs)
    assert torch.equal(same.images, train.images) and not torch.equal(other.images, train.images)
    pixels = full.images.double() / 255  # normalised as the full run is, not by the subset's statistics
    assert info.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)


def test_summary_line_per_split_says_what_was_detected_and_whether_the_cache_served(tmp_path: Path) -> None:
    write_parquet_dataset(tmp_path / "ds")
    options = {**DATA_KEYS, "cache_dir": str(tmp_path / "cache")}
    first: list[str] = []
    data = open_training_data(dataset=str(tmp_path / "ds"), **options, seed=0, say=first.append)
    summaries = [line for line in first if "classes" in line]
    assert len(summaries) == 2 and "decoded in" in summaries[0]
    assert summaries[0].startswith(f"data: {tmp_path / 'ds'} [train] 24 images, 3 classes, 3x8x8, mean ")
    assert summaries[1].startswith(f"data: {tmp_path / 'ds'} [test] 9 images, 3 classes, 3x8x8, mean ")
    mean = "/".join(f"{value:.3f}" for value in data.info.mean)
    assert f"mean {mean} std " in summaries[0]
    again: list[str] = []
    open_training_data(dataset=str(tmp_path / "ds"), **options, seed=0, say=again.append)
    assert len(again) == 2 and all(", cache hit " in line for line in again)


# ----------------------------------------------------------------------------------------------------------
# Faults and messages


def test_the_first_corrupt_row_is_named_even_when_a_later_chunk_fails_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool returns chunks as they finish: a later failing chunk may come back before an earlier one that also
    fails. The error must still name the earlier row (here the pool is replaced by one that answers in reverse)."""
    good, bad = _png_bytes(), b"not an image"
    records = [(bad if row in (5, 14) else good, None) for row in range(16)]
    monkeypatch.setattr(decode_module, "CHUNK_IMAGES", 4)

    def reversed_pool(starts, count, read, target, workers, *, stop_early):
        for start in reversed(starts):
            yield start, decode_module.decode_chunk(read(start, min(count, start + 4)), start, target)

    monkeypatch.setattr(decode_module, "_pool_chunks", reversed_pool)
    monkeypatch.setattr(decode_module, "_worker_count", lambda: 2)
    monkeypatch.setattr(decode_module, "PARALLEL_MIN_IMAGES", 0)
    with pytest.raises(UserError, match=r"corrupt image in split 'train' at index 5\b"):
        decode_module.decode_images(
            16, lambda start, stop: records[start:stop], split="train", skip_corrupt=False, say=lambda line: None
        )


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


_UNGUARDED_SCRIPT = """
import io, sys
import numpy as np, PIL.Image
from cifar_train.data.decode import PARALLEL_MIN_IMAGES, decode_images

count = PARALLEL_MIN_IMAGES + 100  # large enough for the worker pool
png = io.BytesIO()
PIL.Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(png, format="PNG")
records = [(png.getvalue(), None)] * count
decoded = decode_images(count, lambda start, stop: records[start:stop], split="train", skip_corrupt=False, say=print)
print("decoded", tuple(decoded.images.shape), int(decoded.images.sum()) == count * 3 * 64 * 7)
"""


def test_a_script_without_a_main_guard_decodes_in_its_own_process_without_worker_tracebacks(tmp_path: Path) -> None:
    """Each worker re-runs an unguarded script up to the decode and leaves quietly; the caller decodes itself."""
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "bootstrapping" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("data: decoding [train]") and "worker processes" in lines[0]  # said once: not by workers
    assert "could not start" in lines[1] and "__main__" in lines[1]
    assert lines[2].startswith("decoded (") and lines[2].endswith("True") and len(lines) == 3


def test_corrupt_image_is_named_and_leaves_no_cache_or_can_be_skipped(tmp_path: Path) -> None:
    images, labels = random_images(5, 3, 8, seed=0, num_classes=3)
    write_save_to_disk(tmp_path / "bad", {"train": (images, labels)}, corrupt_rows=(3,))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"corrupt image in split 'train' at index 3"):
        load_dataset_splits(str(tmp_path / "bad"), val_split=None, cache_dir=cache)
    assert not [path for path in cache.rglob("*") if path.is_file()]
    for _ in range(2):  # decoded, then from the cache: both say so
        with pytest.warns(UserWarning, match="index 3"):
            train, _, info = load_dataset_splits(
                str(tmp_path / "bad"), val_split=None, cache_dir=cache, skip_corrupt=True
            )
        assert len(train) == 4
        assert info.skipped_images == {"train": [3]}


def test_corrupt_image_in_an_imagefolder_is_named_by_its_file(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "folder", splits={"train": 9})
    broken = sorted((tmp_path / "folder" / "train").rglob("*.png"))[4]
    broken.write_bytes(broken.read_bytes()[:30])
    with pytest.raises(UserError, match=r"corrupt image in split 'train' at index 4 \(file '.*'\)") as raised:
        load_dataset_splits(str(tmp_path / "folder"), val_split=None, cache_dir=tmp_path / "cache")
    assert str(broken) in str(raised.value) and "data.skip_corrupt" in str(raised.value)
    with pytest.warns(UserWarning, match=re.escape(str(broken))):
        load_dataset_splits(str(tmp_path / "folder"), val_split=None, cache_dir=tmp_path / "cache", skip_corrupt=True)


def test_raw_idx_files_get_a_hint_instead_of_no_data_files_found(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte"):
        (tmp_path / "mnist" / "raw").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mnist" / "raw" / name).write_bytes(b"\x00\x00\x08\x03")
    with pytest.raises(UserError, match=r"raw idx files .*alias instead \(mnist, fashion_mnist, kmnist.*convert"):
        load_dataset_splits(str(tmp_path / "mnist"), cache_dir=tmp_path / "cache")
    facts = describe_dataset(str(tmp_path / "mnist"))
    assert facts["layout"] == "idx" and "raw idx files" in facts["problems"][0]


@pytest.mark.parametrize(
    ("dataset", "pattern"),
    [
        ("cifar11", r"unknown dataset alias 'cifar11' \(did you mean 'cifar10'\?\); known aliases: cifar10, cifar100"),
        ("./no/such/folder", r"local path './no/such/folder' does not exist"),
        ("nobody-here/no-such-dataset", r"'nobody-here/no-such-dataset'.*offline mode is on.*local copy"),
    ],
)
def test_bad_dataset_names_fail_fast_with_one_line(dataset: str, pattern: str) -> None:
    start = time.perf_counter()
    with pytest.raises(UserError, match=pattern) as raised:
        load_dataset_splits(dataset)
    assert "\n" not in str(raised.value)
    assert "set HF_HUB_OFFLINE=1" not in str(raised.value)  # offline already: that advice would be circular
    assert time.perf_counter() - start < 15  # seconds; no minute of network retries


def test_every_alias_resolves_to_a_hub_id() -> None:
    assert set(DATASET_ALIASES) == {"cifar10", "cifar100", "mnist", "fashion_mnist", "kmnist", "imagenet"}
    assert all(resolve_dataset(alias) == (hub_id, False) for alias, hub_id in DATASET_ALIASES.items())


def test_missing_columns_and_splits_are_listed_under_the_key_that_named_them(tmp_path: Path) -> None:
    Dataset.from_dict({"pixels": [[1, 2]], "y": [0]}).save_to_disk(tmp_path / "plain")
    with pytest.raises(UserError, match=r"no Image column detected; columns: pixels \(List\), y \(int64\)"):
        load_dataset_splits(str(tmp_path / "plain"), val_split=None, cache_dir=tmp_path / "cache")
    write_parquet_dataset(tmp_path / "ds")
    with pytest.raises(
        UserError, match=r'data.val_split: split .validation. not found; this dataset has: train, test.*""'
    ):
        load_dataset_splits(str(tmp_path / "ds"), val_split="validation", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"^--split: split 'validation' not found"):  # evaluate --split
        load_split(str(tmp_path / "ds"), split="validation", setting="--split", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"column 'lable' not found \(did you mean 'label'\?\)"):
        load_dataset_splits(str(tmp_path / "ds"), label_column="lable", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (
            {"val_fraction": 0.1},
            r'data.val_split = .test. and data.val_fraction = 0.1 contradict; set data.val_split = ""',
        ),
        ({"val_split": None}, r"needs data.val_fraction > 0"),
        ({"val_split": ""}, r"needs data.val_fraction > 0"),
        ({"pipeline": "streaming", "val_split": "", "val_fraction": 0.1}, r"streaming.*named data.val_split"),
        ({"pipeline": "streaming", "train_limit": 100}, r"data.train_limit works with the in-memory pipeline"),
        ({"image_size": 224, "eval_resize": 200}, r"data.eval_resize = 200 must be >= data.image_size = 224"),
    ],
)
def test_check_data_refuses_contradictions_by_key(changes: dict, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        check_data(dataset="cifar10", **{**DATA_KEYS, **changes})


def test_check_data_names_the_settings_without_effect_and_stays_light() -> None:
    memory = check_data(dataset="cifar10", **DATA_KEYS)
    assert set(memory.ignored) == {"data.image_size", "data.eval_resize", "data.min_scale", "data.num_workers",
                                   "data.streaming_source", "data.shuffle_buffer"}  # fmt: skip
    streaming = check_data(dataset="imagenet", **{**DATA_KEYS, "val_split": "validation", "num_workers": 999})
    assert "data.cache_dir" in streaming.ignored and "data.image_size" not in streaming.ignored
    assert any("data.num_workers = 999" in warning for warning in streaming.warnings)
    assert check_data(dataset="./some/folder", **DATA_KEYS).ignored == {}  # "auto" on unknown data: undecided


# ----------------------------------------------------------------------------------------------------------
# Real CIFAR-10


def test_real_cifar10_test_split_decodes_with_dataset_statistics_and_caches(tmp_path: Path, cifar10_dir: Path) -> None:
    split, info = load_split(str(cifar10_dir), split="test", cache_dir=tmp_path)
    assert split.images.shape == (10_000, 3, 32, 32) and split.images.dtype == torch.uint8
    assert torch.bincount(split.labels).tolist() == [1000] * 10
    assert info.class_names[:3] == ["airplane", "automobile", "bird"]
    assert info.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)
    assert info.std == pytest.approx((0.247, 0.243, 0.261), abs=0.01)  # not the 0.2023 of the usual typo
    cached, _ = load_split(str(cifar10_dir), split="test", cache_dir=tmp_path)
    assert torch.equal(cached.images, split.images)
    facts = describe_dataset(str(cifar10_dir))
    assert facts["splits"] == {"train": 50_000, "test": 10_000} and facts["image_size"] == [32, 32]
    assert facts["class_names"] == info.class_names and facts["channels"] == 3 and not facts["problems"]


@pytest.mark.slow
def test_real_cifar10_warm_start_reads_only_the_cache(
    tmp_path: Path, cifar10_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm start opens nothing through `datasets` and decodes nothing (benchmarks/startup.py times it)."""
    load_dataset_splits(str(cifar10_dir), cache_dir=tmp_path)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm start opened or decoded the dataset again")

    for name in ("load_dataset", "load_from_disk"):
        monkeypatch.setattr(datasets, name, refused)
    monkeypatch.setattr(decoded_module, "_decode", refused)
    train, val, _ = load_dataset_splits(str(cifar10_dir), cache_dir=tmp_path)
    assert (len(train), len(val)) == (50_000, 10_000)


# ----------------------------------------------------------------------------------------------------------
# Sampler and batch sources


@pytest.mark.parametrize(
    ("num_samples", "batch_size", "replicas"), [(103, 8, 1), (103, 8, 3), (96, 16, 2), (7, 2, 3), (5, 4, 8)]
)
def test_sharded_batches_are_disjoint_and_cover_the_epoch(num_samples: int, batch_size: int, replicas: int) -> None:
    def epoch(rank: int, epoch_index: int, **kwargs: bool) -> list[torch.Tensor]:
        sampler = ShardedBatchSampler(num_samples, batch_size, num_replicas=replicas, rank=rank, seed=3, **kwargs)
        batches = list(sampler.batches(epoch_index))
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


def _numbered(count: int) -> DecodedSplit:
    """Images whose pixels and labels are their row number, so a batch says which rows it holds."""
    rows = torch.arange(count)
    return DecodedSplit(rows.view(-1, 1, 1, 1).expand(count, 1, 2, 2).to(torch.uint8).contiguous(), rows)


@pytest.mark.parametrize("replicas", [1, 3])
def test_memory_train_batches_cover_the_shard_resume_exactly_and_read_nothing_back(replicas: int) -> None:
    split, size = _numbered(50), 4
    ranks = [
        MemoryTrainBatches(split, _identity, batch_size=size, num_replicas=replicas, rank=rank, seed=5, device="cpu")
        for rank in range(replicas)
    ]
    epochs = [[labels for _, labels in batches.epoch(2)] for batches in ranks]
    assert {len(batches) for batches in ranks} == {50 // (size * replicas)} == {len(rows) for rows in epochs}
    seen = torch.cat([torch.cat(rows) for rows in epochs]).tolist()
    assert len(seen) == len(set(seen)) == len(ranks[0]) * size * replicas  # disjoint shards, full batches
    expected = ShardedBatchSampler(50, size, num_replicas=replicas, rank=0, seed=5).batches(2)
    assert [rows.tolist() for rows in epochs[0]] == [rows.tolist() for rows in expected]
    for start in (1, len(ranks[0]) - 1):
        resumed = [labels.tolist() for _, labels in ranks[0].epoch(2, start)]
        assert resumed == [rows.tolist() for rows in epochs[0][start:]]

    batches = ranks[0].epoch(3)
    next(batches)
    with _HostReads() as reads:
        rest = list(batches)
    assert rest and reads.count == 0


@pytest.mark.parametrize(("count", "replicas"), [(10, 1), (10, 3), (2, 3), (12, 3)])
def test_eval_batches_have_one_size_and_mask_padding_so_each_sample_counts_once(count: int, replicas: int) -> None:
    split, size = _numbered(count), 3
    ranks = [
        MemoryEvalBatches(split, mean=(0.5,), std=(0.25,), batch_size=size, num_replicas=replicas, rank=rank)
        for rank in range(replicas)
    ]
    valid_rows = []
    for batches in ranks:
        assert batches.num_samples == count
        produced = list(batches)
        assert len(produced) == len(batches) == len(ranks[0])  # every rank runs the same batches
        for images, labels, valid in produced:
            assert images.shape == (size, 1, 2, 2) and images.dtype == torch.float32
            assert labels.shape == valid.shape == (size,) and valid.dtype == torch.bool
            valid_rows += labels[valid].tolist()
            real = images[valid][:, 0, 0, 0]
            torch.testing.assert_close(real, (labels[valid].float() / 255 - 0.5) / 0.25)  # normalised
    assert sorted(valid_rows) == list(range(count))

    batches = iter(ranks[0])
    next(batches)
    with _HostReads() as reads:
        list(batches)
    assert reads.count == 0


def test_open_training_data_builds_both_batch_sources(tmp_path: Path) -> None:
    write_parquet_dataset(tmp_path / "ds", splits={"train": 24, "test": 7})
    data = open_training_data(
        dataset=str(tmp_path / "ds"), **{**DATA_KEYS, "cache_dir": str(tmp_path / "c")}, seed=0, say=lambda _: None
    )
    assert data.pipeline == "memory" and data.info.num_classes == 3
    train = data.train_batches(_identity, batch_size=5, num_replicas=2, rank=1, seed=0, device="cpu")
    assert len(train) == 2 and all(images.shape == (5, 3, 8, 8) for images, _ in train.epoch(0))
    val = data.val_batches(batch_size=4, num_replicas=2, rank=0, device="cpu")
    assert val.num_samples == 7 and len(val) == 1


# ----------------------------------------------------------------------------------------------------------
# Pipelines and streaming


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_on_a_mixed_size_imagefolder(tmp_path: Path, num_workers: int) -> None:
    from cifar_train.augment import BatchAugment

    write_imagefolder(tmp_path / "big", splits={"train": 10, "test": 5}, sizes=(20, 14))
    assert choose_pipeline(str(tmp_path / "big")) == "streaming"
    options = {**DATA_KEYS, "image_size": 16, "eval_resize": 18, "num_workers": num_workers}
    data = open_training_data(dataset=str(tmp_path / "big"), **options, seed=0, say=lambda _: None)
    info = data.info
    assert data.pipeline == "streaming" and info.num_classes == 3 and info.channels == 3
    assert info.image_size == (16, 16)
    assert all(0.4 < mean < 0.6 for mean in info.mean) and all(0.1 < std < 0.35 for std in info.std)

    augment = BatchAugment(num_classes=3, mean=info.mean, std=info.std)
    train = data.train_batches(augment, batch_size=4, num_replicas=1, rank=0, seed=0, device="cpu")
    batches = list(train.epoch(0))
    assert len(train) == len(batches) == 2 and all(images.shape == (4, 3, 16, 16) for images, _ in batches)
    assert batches[0][0].dtype == torch.float32 and batches[0][1].shape == (4, 3)  # soft targets
    assert len(list(train.epoch(1, start=1))) == 1
    val = data.val_batches(batch_size=2, num_replicas=2, rank=1, device="cpu")  # rank 1 of 2: images 3..4
    produced = list(val)
    assert len(produced) == len(val) == 2 and all(images.shape == (2, 3, 16, 16) for images, _, _ in produced)
    assert sum(int(valid.sum()) for _, _, valid in produced) == 2 and val.num_samples == 5


def test_small_uniform_data_stays_in_memory(tmp_path: Path) -> None:
    write_parquet_dataset(tmp_path / "ds")
    assert choose_pipeline(str(tmp_path / "ds")) == "memory"
    assert choose_pipeline(str(tmp_path / "ds"), max_memory_bytes=100) == "streaming"
    assert choose_pipeline("cifar100") == "memory" and choose_pipeline("imagenet") == "streaming"


def test_cache_dir_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIFAR_RECIPES_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("CIFAR_RECIPES_CACHE")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "cifar_recipes"


# ----------------------------------------------------------------------------------------------------------
# describe_dataset


def _files(*folders: Path) -> set[tuple[str, int]]:
    return {(str(path), path.stat().st_mtime_ns) for folder in folders for path in folder.rglob("*") if path.exists()}


def test_describe_dataset_writes_nothing_and_answers_offline_for_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_home, cache = tmp_path / "hf", tmp_path / "cache"
    for variable, folder in (("HF_HOME", hf_home), ("HF_DATASETS_CACHE", hf_home / "datasets")):
        monkeypatch.setenv(variable, str(folder))
    monkeypatch.setenv("CIFAR_RECIPES_CACHE", str(cache))
    write_parquet_dataset(tmp_path / "parquet")
    write_imagefolder(tmp_path / "folder", channels=1, splits={"train": 6, "validation": 3})
    images, labels = random_images(5, 3, 8, seed=0, num_classes=3)
    write_save_to_disk(tmp_path / "disk", {"train": (images[:3], labels[:3]), "test": (images[3:], labels[3:])})
    watched = (tmp_path, Path(datasets.config.HF_DATASETS_CACHE))
    before = _files(*watched)

    parquet = describe_dataset(str(tmp_path / "parquet"))
    folder = describe_dataset(str(tmp_path / "folder"), val_split="test")
    disk = describe_dataset(str(tmp_path / "disk"))
    hub = describe_dataset("cifar100")
    digits = describe_dataset("digits")
    assert _files(*watched) == before and not hf_home.exists() and not cache.exists()

    assert parquet["layout"] == "parquet" and parquet["splits"] == {"train": 24, "test": 9}
    assert parquet["class_names"] == list(CLASSES) and (parquet["image_column"], parquet["label_column"]) == (
        "img",
        "label",
    )
    assert parquet["channels"] == 3 and parquet["image_size"] == [8, 8] and parquet["problems"] == []
    assert folder["layout"] == "imagefolder" and folder["splits"] == {"train": 6, "validation": 3}
    assert folder["channels"] == 1 and folder["problems"] == [
        "data.val_split: split 'test' not found; this dataset has: train, validation (or set data.val_split = \"\" "
        "with data.val_fraction > 0 to hold out part of train)"
    ]
    assert disk["layout"] == "save_to_disk" and disk["splits"] == {"train": 3, "test": 2} and disk["num_classes"] == 3
    assert hub["reachable"] is False and "offline" in hub["reason"] and hub["resolved"] == "uoft-cs/cifar100"
    assert digits["splits"] == {"train": 1437, "test": 360} and digits["image_size"] == [8, 8]
