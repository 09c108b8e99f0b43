"""Our training loop against a minimal plain-PyTorch loop doing the same work, on real CIFAR-10.

ResNet-preact-20, the seed's settings (SGD 0.1, momentum 0.9, Nesterov, weight decay 1e-4, batch 128,
pad-4 random crop + flip, validation on the 10,000 test images after every epoch), `--epochs` epochs on
`--train-images` training images (`data.train_limit`'s seeded, class-stratified subset, the same for both).
Both start from decoded uint8 tensors (decoding is not timed); the plain loop is what one would write by
hand in a notebook. Prints one JSON line:

    python benchmarks/loop_vs_plain.py --dataset ../shared/datasets/cifar10 --json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import cifar_models  # noqa: F401
from cifar_train.data import load_dataset_splits
from cifar_train.loop import train
from cifar_train.schema import Recipe


def plain_loop(train_x, train_y, val_x, val_y, mean, std, *, epochs: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = timm.create_model("resnet_preact20", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            x = F.pad(train_x[idx], (4, 4, 4, 4))
            rows = torch.randint(0, 9, (len(idx), 1)) + torch.arange(32)  # a random 32x32 crop per image
            cols = torch.randint(0, 9, (len(idx), 1)) + torch.arange(32)
            x = x[torch.arange(len(idx))[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            x = (x.float() / 255 - mean_t) / std_t
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(val_y), 256):
                x = (val_x[i : i + 256].float() / 255 - mean_t) / std_t
                correct += (model(x).argmax(1) == val_y[i : i + 256]).sum().item()
    return {"seconds": time.perf_counter() - start, "val_acc1": 100.0 * correct / len(val_y)}


def our_loop(dataset: str, *, epochs: int, batch_size: int, train_images: int, seed: int) -> dict:
    recipe = Recipe().replace(
        model={"name": "resnet_preact20"},
        data={"dataset": dataset, "train_limit": train_images},
        schedule={"name": "constant"},
        train={"epochs": epochs, "batch_size": batch_size, "seed": seed, "checkpoint_every": 1000},
        log={"progress": False},
    )
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        final = train(recipe, Path(tmp) / "run", log=lambda message: None)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "val_acc1": final["val_acc1"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", help="CIFAR-10: Hub id, alias or local copy")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    n = args.train_images
    # The same images our loop trains on: train_limit's seeded, class-stratified subset (and the decode cache warm).
    train_split, val_split, info = load_dataset_splits(args.dataset, train_limit=n, seed=args.seed)
    plain = plain_loop(
        train_split.images,
        train_split.labels,
        val_split.images,
        val_split.labels,
        info.mean,
        info.std,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    ours = our_loop(args.dataset, epochs=args.epochs, batch_size=args.batch_size, train_images=n, seed=args.seed)
    result = {
        "epochs": args.epochs,
        "train_images": n,
        "threads": torch.get_num_threads(),
        "plain_seconds": round(plain["seconds"], 1),
        "plain_val_acc1": round(plain["val_acc1"], 2),
        "ours_seconds": round(ours["seconds"], 1),
        "ours_val_acc1": round(ours["val_acc1"], 2),
        "time_ratio": round(ours["seconds"] / plain["seconds"], 3),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
