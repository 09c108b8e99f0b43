"""Data larger than the disk: `data.streaming_source`, the training split read through `datasets`' streaming mode
(a real `IterableDataset` on local parquet shards), shared over processes and DataLoader workers, resumed exactly.

Each image's red channel is flat and holds its row's number, so any crop or resize keeps it and a batch says which
rows it holds; green and blue are noise, so the augmentation's draws show in the pixels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    assert_one_line_error,
    assert_same_weights,
    checkpoints,
    free_port,
    read_metrics,
    run_main,
    start_cli,
    wait_for,
    write_recipe,
)

import cifar_models  # noqa: F401  (registers resnet20)
from cifar_train.cli import evaluate_main, main
from cifar_train.data import check_data
from cifar_train.data.decoded import DatasetSource
from cifar_train.data.iterable import IterableTrainBatches, SourceStream
from cifar_train.errors import UserError
from cifar_train.schema import DataConfig, section_kwargs


def _write_shards(root: Path, shards: tuple[int, ...], *, val: int = 8, size: int = 12, label=None) -> Path:
    """`root/data/train-<i>-of-<n>.parquet` with `shards[i]` rows each, and a validation split of `val` rows."""
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"img": Image(), "label": label or ClassLabel(names=["a", "b", "c"])})
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)

    def table(rows: range) -> Dataset:
        images = rng.integers(0, 256, (len(rows), size, size, 3), dtype=np.uint8)
        images[..., 0] = np.asarray(rows, dtype=np.uint8)[:, None, None]  # the row's number, flat
        return Dataset.from_dict({"img": list(images), "label": [row % 3 for row in rows]}, features=features)

    start = 0
    for index, count in enumerate(shards):
        table(range(start, start + count)).to_parquet(
            str(root / "data" / f"train-{index:05d}-of-{len(shards):05d}.parquet")
        )
        start += count
    table(range(val)).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    return root


class _Unchanged:
    """The batch-level augmentation that changes nothing (the readers' transforms are what is tested)."""

    hflip = True

    def normalized(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, labels


def _batches(stream: SourceStream, *, rank: int = 0, replicas: int = 1, workers: int = 2, batch: int = 4):
    return IterableTrainBatches(
        stream, _Unchanged(), batch_size=batch, num_replicas=replicas, rank=rank, seed=3, device="cpu",
        mean=(0.0,) * 3, std=(1.0,) * 3, image_size=8, min_scale=0.5, num_workers=workers, shuffle_buffer=6,
    )  # fmt: skip


def _rows(images: torch.Tensor) -> list[int]:
    """The row numbers of a batch (mean 0, std 1: the red channel is row / 255)."""
    return images[:, 0, 0, 0].mul(255).round().long().tolist()


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> SourceStream:
    root = _write_shards(tmp_path_factory.mktemp("even"), (16, 16, 16, 16))
    return SourceStream.open(DatasetSource(str(root)), "train", image_column=None, label_column=None)


def test_processes_and_readers_share_each_epoch_without_overlap(even):
    assert even.num_rows == 64 and even.class_names == ["a", "b", "c"] and even.mode == "RGB"
    ranks = [_batches(even, rank=rank, replicas=2) for rank in range(2)]
    assert [len(batches) for batches in ranks] == [8, 8]  # 64 rows / (2 processes x 2 readers x 4) x 2 readers
    epoch = [[rows for images, _ in batches.epoch(0) for rows in _rows(images)] for batches in ranks]
    assert sorted(epoch[0] + epoch[1]) == list(range(64))  # every row once, over both processes
    again = [rows for images, _ in ranks[0].epoch(0) for rows in _rows(images)]
    later = [rows for images, _ in ranks[0].epoch(1) for rows in _rows(images)]
    assert again == epoch[0] and sorted(later) == sorted(epoch[0]) and later != epoch[0]  # reshuffled per epoch
    labels = torch.cat([labels for _, labels in ranks[1].epoch(0)]).tolist()
    assert labels == [row % 3 for row in epoch[1]]  # each image keeps its label


@pytest.mark.parametrize(("workers", "start"), [(2, 3), (0, 2)])
def test_resuming_inside_an_epoch_continues_bit_for_bit(even, workers, start):
    """Batch `start` on, a resumed epoch is the uninterrupted one: the same rows, the same crops and flips (also with
    the readers' round-robin starting elsewhere: batch 3 comes from the second reader)."""
    whole = list(_batches(even, workers=workers).epoch(1))
    resumed = list(_batches(even, workers=workers).epoch(1, start))
    assert len(resumed) == len(whole) - start
    for (images, labels), (expected_images, expected_labels) in zip(resumed, whole[start:], strict=True):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert not torch.equal(whole[0][0][:, 1:], whole[1][0][:, 1:])  # (the noise channels differ: it can fail)


def test_uneven_shards_give_every_process_the_same_steps(tmp_path):
    """Two shards of 24 and 8 rows over two processes: whole shards per process. Both run 32 / (2 x 4) = 4 steps;
    the process with 8 rows reads them twice, the one with 24 leaves 8 for later epochs."""
    stream = SourceStream.open(DatasetSource(str(_write_shards(tmp_path / "ds", (24, 8)))), "train",
                               image_column=None, label_column=None)  # fmt: skip
    seen = []
    for rank in range(2):
        batches = _batches(stream, rank=rank, replicas=2, workers=1)
        seen.append(Counter(row for images, _ in batches.epoch(0) for row in _rows(images)))
        assert len(batches) == 4
    big, small = sorted(seen, key=len, reverse=True)
    assert len(big) == 16 and set(big.values()) == {1} and set(big) <= set(range(24))
    assert set(small) == set(range(24, 32)) and set(small.values()) == {2}


def test_a_reader_without_a_whole_batch_is_one_line(tmp_path):
    """Shards of 30 and 2 rows over two processes: the second process's reader holds 2 rows, less than a batch of 4;
    the worker's error reaches the training process as one line, not a worker's traceback."""
    stream = SourceStream.open(DatasetSource(str(_write_shards(tmp_path / "ds", (30, 2)))), "train",
                               image_column=None, label_column=None)  # fmt: skip
    with pytest.raises(UserError) as caught:
        list(_batches(stream, rank=1, replicas=2, workers=1).epoch(0))
    message = str(caught.value)
    assert "reader 0 of process 1 got fewer than 4 rows of split 'train'" in message and "\n" not in message


def test_the_settings_that_contradict_are_refused():
    keys = section_kwargs(DataConfig(dataset="d", val_split="validation"))
    with pytest.raises(UserError, match=r'data\.streaming_source = true and data\.pipeline = "memory" contradict'):
        check_data(**{**keys, "streaming_source": True, "pipeline": "memory"})
    with pytest.raises(UserError, match=r"data\.streaming_source = true needs a named data\.val_split"):
        check_data(**{**keys, "streaming_source": True, "val_split": None, "val_fraction": 0.1})
    assert "data.shuffle_buffer" in check_data(**{**keys, "pipeline": "streaming"}).ignored
    found = check_data(**{**keys, "streaming_source": True})
    assert "data.shuffle_buffer" not in found.ignored and "data.cache_dir" in found.ignored


def test_labels_without_class_names_are_refused_in_one_line(tmp_path):
    from datasets import Value

    root = _write_shards(tmp_path / "ds", (6,), val=3, label=Value("int64"))
    recipe = write_recipe(tmp_path / "r.toml", root, data={"streaming_source": True, "val_split": "validation",
                                                           "train_limit": 0})  # fmt: skip
    result = run_main(main, str(recipe), "--output-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "data.streaming_source needs a ClassLabel data.label_column", "'label'")
    assert not (tmp_path / "run").exists()


def _recipe(path: Path, dataset: Path, **train) -> Path:
    return write_recipe(
        path, dataset,
        data={"streaming_source": True, "val_split": "validation", "train_limit": 0, "image_size": 12,
              "eval_resize": 14, "num_workers": 1, "shuffle_buffer": 8},
        augment={"crop_padding": 0, "random_crop": False},
        schedule={"name": "constant"},
        train={"batch_size": 16, "val_batch_size": 8, **train},
    )  # fmt: skip


@pytest.mark.slow
def test_two_processes_train_on_local_parquet_and_the_run_evaluates_as_it_validated(tmp_path):
    """torchrun, two CPU processes: each reads its own shards, both run the same steps and end identical; the run
    evaluates (its validation split opened alone) to the top-1 and loss of its last validation; one process then
    trains it one epoch longer."""
    root = _write_shards(tmp_path / "ds", (16, 16, 16, 16))
    recipe, run = _recipe(tmp_path / "r.toml", root, epochs=2), tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(ROOT / "train_accelerate.py"), str(recipe), "--output-dir", str(run)],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [4, 8]  # 64 rows / 16 a step (2 processes x 1 reader x 8)
    assert json.loads((run / "final_metrics.json").read_text())["ranks_in_sync"] is True
    evaluated = run_main(evaluate_main, str(run), "--json", "--num-workers", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    answer = json.loads(evaluated.stdout)
    assert answer["num_samples"] == 8 and answer["split"] == "validation"
    assert answer["top1"] == pytest.approx(rows[-1]["val_acc1"], rel=1e-5)
    assert answer["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    # one process continues it, in its own layout of the data, and says so (not "the data order continues exactly")
    longer = run_main(main, "--resume", str(run), "--set", "train.epochs=3")
    assert longer.returncode == 0, longer.stderr
    assert "the data order from here on is that of this number of processes" in longer.stdout
    assert [row["step"] for row in read_metrics(run)] == [4, 8, 12]  # the global batch: 16 on one process too


@pytest.mark.slow
def test_runs_resumed_in_the_middle_of_an_epoch_or_at_its_end_end_with_the_same_weights(tmp_path):
    """Stopped by SIGTERM in the middle of epoch 2 (each reader rereads its rows of the batches already trained),
    or ended after epoch 1 and lengthened: both resumed runs end bit for bit where the uninterrupted one did."""
    root = _write_shards(tmp_path / "ds", (32, 32, 32, 32))
    recipe = _recipe(tmp_path / "r.toml", root, epochs=2)
    whole = run_main(main, str(recipe), "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    stopped = tmp_path / "stopped"  # a metrics read every step: the stop comes at the next step, mid-epoch
    proc = start_cli(str(recipe), "--output-dir", str(stopped), "--set", "log.every_steps=1")
    wait_for(lambda: checkpoints(stopped, "step_*_e0001_*"), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert not checkpoints(stopped)[-1].name.endswith("_b000000")  # inside epoch 2
    resumed = run_main(main, "--resume", str(stopped), "--set", "log.every_steps=1", str(recipe))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(tmp_path / "whole", stopped)

    short = _recipe(tmp_path / "short.toml", root, epochs=1)
    assert run_main(main, str(short), "--output-dir", str(tmp_path / "longer")).returncode == 0
    longer = run_main(main, "--resume", str(tmp_path / "longer"), "--set", "train.epochs=2")
    assert longer.returncode == 0, longer.stderr
    assert_same_weights(tmp_path / "whole", tmp_path / "longer")
