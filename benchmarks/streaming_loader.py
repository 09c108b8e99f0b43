"""The streaming input pipeline against timm's own loader, on the same folder of JPEGs with the same transforms.

Both read `FOLDER/train/<class>/<image>.jpg`, decode and apply timm's ImageNet training transform
(RandomResizedCrop to `--image-size`, bilinear, scale (0.08, 1), horizontal flip; no colour jitter) to uint8
tensors in `--workers` persistent DataLoader workers, and normalise each batch of `--batch-size` on the device
(here the CPU):

- ours: `StreamingTrainBatches` (the folder opened through `datasets`, decoded and transformed by
  `Dataset.with_transform` in the workers; on the device `Normalize` and the loop's batch-level step
  `BatchAugment.normalized`);
- timm's: `timm.data.create_loader(timm.data.ImageDataset(FOLDER/train), ...)` with its defaults' prefetcher
  (uint8 batches, normalised on the device).

Each measurement times one epoch after an untimed one has started the workers; `--repeat` measurements of each
loader alternate and the median is kept. Images/s divided by the workers gives images/s per worker core.

Without `--folder` a folder of `--images` real photographs is written first: random crops of scikit-learn's two
sample photos (427 x 640), rescaled to ImageNet's usual sizes (shorter side 250-500 pixels) and saved as JPEG
(quality 90). Prints a table, or one JSON line with `--json`:

    python benchmarks/streaming_loader.py --images 512 --workers 1 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_photos(root: Path, count: int, *, classes: int = 4, seed: int = 0) -> Path:
    """`root/train/c<k>/<n>.jpg`: `count` JPEGs cut from scikit-learn's sample photographs, of mixed sizes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for n in range(count):
        photo = photos[n % len(photos)]
        width, height = int(rng.integers(200, 640)), int(rng.integers(200, 427))
        left, top = int(rng.integers(0, 641 - width)), int(rng.integers(0, 428 - height))
        scale = rng.uniform(250, 500) / min(width, height)  # ImageNet's shorter sides are mostly 250-500 pixels
        crop = photo.crop((left, top, left + width, top + height))
        crop = crop.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
        folder = root / "train" / f"c{n % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{n:05d}.jpg", quality=90)
    return root


def ours(folder: Path, *, workers: int, batch_size: int, image_size: int) -> tuple[object, int]:
    from cifar_train.augment import BatchAugment
    from cifar_train.data.decoded import DatasetSource
    from cifar_train.data.streaming import StreamingSplit, StreamingTrainBatches

    split = StreamingSplit.open(DatasetSource(str(folder)), "train", setting="--folder", image_column=None,
                                label_column=None)  # fmt: skip
    augment = BatchAugment(num_classes=split.num_classes, mean=MEAN, std=STD, random_crop=False, hflip=True)
    batches = StreamingTrainBatches(
        split, augment, batch_size=batch_size, num_replicas=1, rank=0, seed=0, device="cpu", mean=MEAN, std=STD,
        image_size=image_size, min_scale=0.08, num_workers=workers,
    )  # fmt: skip
    return (lambda epoch: batches.epoch(epoch)), len(batches) * batch_size


def timms(folder: Path, *, workers: int, batch_size: int, image_size: int) -> tuple[object, int]:
    from timm.data import ImageDataset, create_loader

    dataset = ImageDataset(str(folder / "train"))
    loader = create_loader(
        dataset, input_size=(3, image_size, image_size), batch_size=batch_size, is_training=True, scale=(0.08, 1.0),
        hflip=0.5, color_jitter=0.0, interpolation="bilinear", mean=MEAN, std=STD, num_workers=workers,
        use_prefetcher=True, persistent_workers=True, pin_memory=False, device=torch.device("cpu"),
    )  # fmt: skip
    return (lambda epoch: iter(loader)), len(loader) * batch_size


def measure(make, folder: Path, *, workers: int, batch_size: int, image_size: int) -> float:
    """Images/s of one epoch, after a first epoch has started the (persistent) workers."""
    epoch, images = make(folder, workers=workers, batch_size=batch_size, image_size=image_size)
    for _ in epoch(0):
        pass
    started = time.perf_counter()
    count = sum(len(batch[1]) for batch in epoch(1))
    seconds = time.perf_counter() - started
    assert count >= images - batch_size, (count, images)
    return count / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="a folder with train/<class>/<image> (default: written first)")
    parser.add_argument("--images", type=int, default=512, help="photos written when no --folder is given")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers to measure")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="RandomResizedCrop side, pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--repeat", type=int, default=3, help="measurements of each loader (the median is kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or write_photos(Path(tmp) / "photos", args.images)
        rows = []
        for workers in args.workers:
            row, rates = {"workers": workers}, {"ours": [], "timm": []}
            for _ in range(args.repeat):  # alternating, so a change of load on a shared machine hits both alike
                for name, make in (("ours", ours), ("timm", timms)):
                    options = dict(workers=workers, batch_size=args.batch_size, image_size=args.image_size)
                    rates[name].append(measure(make, folder, **options))
            for name, measured in rates.items():
                rate = float(np.median(measured))
                row[f"{name}_images_per_second"] = round(rate, 1)
                row[f"{name}_per_worker"] = round(rate / max(workers, 1), 1)
            row["ours_over_timm"] = round(row["ours_images_per_second"] / row["timm_images_per_second"], 3)
            rows.append(row)
    result = {"image_size": args.image_size, "batch_size": args.batch_size, "repeat": args.repeat,
              "cpu_cores": os.cpu_count(), "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'workers':>7} {'ours img/s':>11} {'timm img/s':>11} {'ours/worker':>12} {'timm/worker':>12} ratio")
        for row in rows:
            print(f"{row['workers']:>7} {row['ours_images_per_second']:>11} {row['timm_images_per_second']:>11} "
                  f"{row['ours_per_worker']:>12} {row['timm_per_worker']:>12} {row['ours_over_timm']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
